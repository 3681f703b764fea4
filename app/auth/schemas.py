"""Schemas of the caller's identity."""

from __future__ import annotations

from pydantic import BaseModel, Field


class WhoAmI(BaseModel):
    tenant: str = Field(description="The tenant the key belongs to; every resource you create is theirs.",
                        examples=["acme"])
    key_prefix: str = Field(description="The prefix of the key used (the part after 'cnd_').", examples=["3f9a1c0b"])
