"""Model queries; every one is filtered by tenant."""

from __future__ import annotations

from app.repository import DeletableRepository
from core.db.models import Model

models = DeletableRepository(Model, noun="model", id_prefix="mdl")
