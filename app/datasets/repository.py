"""Dataset queries; every one is filtered by tenant."""

from __future__ import annotations

from app.repository import TenantRepository
from core.db.models import Dataset

datasets = TenantRepository(Dataset, noun="dataset", id_prefix="dst")
