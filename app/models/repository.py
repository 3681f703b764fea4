"""Model queries; every one is filtered by tenant."""

from __future__ import annotations

from app.repository import TenantRepository
from core.db.models import Model

models = TenantRepository(Model, noun="model", id_prefix="mdl")
