"""Resource ids as path parameters: only what core.db.models.new_id makes gets past validation.

Ids are opaque to clients but not to us: a kind prefix and 24 hex digits. Checking the shape at the edge
means `..`, `%2e%2e`, absolute paths, NUL bytes and megabyte-long strings are a 422 before any query runs,
and no path parameter ever reaches the database or the file system as anything but an id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

# new_id(prefix) is f"{prefix}_{secrets.token_hex(12)}".
_HEX_DIGITS = 24


def _id_param(prefix: str, kind: str) -> object:
    # The length bound turns a megabyte of text away before the pattern looks at it.
    return Path(max_length=len(prefix) + 1 + _HEX_DIGITS, pattern=f"^{prefix}_[0-9a-f]{{{_HEX_DIGITS}}}$",
                description=f"The {kind}'s id ({prefix}_ + {_HEX_DIGITS} hex digits).",
                examples=[f"{prefix}_{'0' * _HEX_DIGITS}"])


ModelId = Annotated[str, _id_param("mdl", "model")]
DatasetId = Annotated[str, _id_param("dst", "dataset")]
JobId = Annotated[str, _id_param("job", "job")]
ArtifactId = Annotated[str, _id_param("art", "artifact")]
PipelineId = Annotated[str, _id_param("pip", "pipeline")]
