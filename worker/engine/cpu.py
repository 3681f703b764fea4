"""Which CPU the figures were measured on: int8 kernels differ by instruction set, so a latency or an int8
accuracy means little without it (an AVX2 host without VNNI multiplies u8 x s8 pairs into saturating int16).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any

# The flags (as /proc/cpuinfo names them) that decide which int8 / bf16 kernels run: x86 first, then ARM.
RELEVANT_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "sve", "bf16",
)
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
_CPUINFO = Path("/proc/cpuinfo")


@cache
def describe() -> dict[str, Any]:
    """{"model", "machine", "features", "int8_dot_product"} of this host; features are empty where the
    kernel does not publish them (not Linux)."""
    fields = _cpuinfo_fields()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    features = [name for name in RELEVANT_FEATURES if name in flags]
    return {"model": fields.get("model name") or platform.processor() or "unknown", "machine": platform.machine(),
            "features": features,
            "int8_dot_product": any(name in flags for name in INT8_DOT_PRODUCT)}


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (every core of a host reports the same)."""
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def summary_line(host: dict[str, Any]) -> str:
    """One line for people: the model and the features, e.g. `Intel Xeon ... (x86_64: avx2, avx512_vnni)`."""
    features = ", ".join(host.get("features") or []) or "features not published"
    return f"{host.get('model', 'unknown')} ({host.get('machine', '?')}: {features})"
