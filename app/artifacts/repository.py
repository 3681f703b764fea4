"""Artifact queries; every one is filtered by tenant. The worker writes the rows (see core.db.repository)."""

from __future__ import annotations

from app.repository import TenantRepository
from core.db.models import Artifact

artifacts = TenantRepository(Artifact, noun="artifact", id_prefix="art")
