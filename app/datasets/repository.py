"""Dataset queries; every one is filtered by tenant."""

from __future__ import annotations

from app.repository import DeletableRepository
from core.db.models import Dataset

datasets = DeletableRepository(Dataset, noun="dataset", id_prefix="dst")
