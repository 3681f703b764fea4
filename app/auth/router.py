"""GET /v1/me: check a key and see which tenant it acts for. Keys are managed with the CLI."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth.schemas import WhoAmI
from app.deps import CurrentPrincipal
from app.routing import BoundedBodyRoute
from app.schemas import error_responses

router = APIRouter(tags=["auth"], route_class=BoundedBodyRoute)


@router.get("/me", response_model=WhoAmI, responses=error_responses(), summary="Who am I")
def who_am_i(principal: CurrentPrincipal) -> WhoAmI:
    """The tenant and key prefix of the API key sent; a quick way to check that a key works."""
    return WhoAmI(tenant=principal.tenant, key_prefix=principal.key_prefix)
