"""The Idempotency-Key race: two requests with one key, the second claiming after the first committed."""

from __future__ import annotations

import pytest

from app.idempotency import claim, idempotent_request, previous_resource
from core.db.models import IdempotencyRecord
from core.db.session import session_scope
from core.errors import Conflict
from tests.conftest import AppEnv


def test_a_lost_race_returns_the_winner(app_env: AppEnv, tenant: str) -> None:
    request = idempotent_request(tenant, "POST /v1/jobs", "k1", {"epochs": 2})
    with session_scope() as first, session_scope() as second:
        # Both looked and found nothing...
        assert previous_resource(first, request) is None
        assert previous_resource(second, request) is None
        # ...the first claims and commits...
        assert claim(first, request, "job_first") is None
        first.commit()
        # ...and the second, claiming later, is told to return the first's resource instead.
        assert claim(second, request, "job_second") == "job_first"
    with session_scope() as session:
        assert session.query(IdempotencyRecord).filter_by(tenant=tenant).count() == 1


def test_a_lost_race_with_a_different_body_is_a_conflict(app_env: AppEnv, tenant: str) -> None:
    with session_scope() as session:
        claim(session, idempotent_request(tenant, "POST /v1/jobs", "k2", {"epochs": 2}), "job_first")
    with session_scope() as session, pytest.raises(Conflict):
        claim(session, idempotent_request(tenant, "POST /v1/jobs", "k2", {"epochs": 3}), "job_second")


def test_keys_are_per_tenant_and_route(app_env: AppEnv, tenant: str) -> None:
    with session_scope() as session:
        for owner, route in ((tenant, "POST /v1/jobs"), (tenant + "-b", "POST /v1/jobs"), (tenant, "POST /v1/models")):
            assert claim(session, idempotent_request(owner, route, "same", {}), f"res_{owner}_{route[-4:]}") is None
