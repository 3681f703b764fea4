"""Schemas of a tenant's webhook settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from core.db.models import TenantWebhook
from core.views import UtcDatetime

URL_EXAMPLE = "https://ci.example.com/hooks/condenser"


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"url": URL_EXAMPLE}]})

    url: str | None = Field(max_length=2048, description="Where to announce the end of every job of this tenant "
                            "that names no webhook_url of its own; null: no default.", examples=[URL_EXAMPLE])


class WebhookOut(BaseModel):
    """The tenant's default webhook URL and whether a signing secret exists (the secret is shown only in the
    answer that created it)."""

    url: str | None = Field(examples=[URL_EXAMPLE])
    has_secret: bool
    secret: str | None = Field(default=None, description="Only in the answer that created the secret: keep it, it "
                               "is not shown again. Verify each delivery's X-Condenser-Signature with it.",
                               examples=["whsec_Vb4Xy6Jq..."])
    updated_at: UtcDatetime | None = None

    @classmethod
    def from_row(cls, row: TenantWebhook | None, new_secret: str | None = None) -> WebhookOut:
        if row is None:
            return cls(url=None, has_secret=False)
        return cls(url=row.url, has_secret=True, secret=new_secret, updated_at=row.updated_at)
