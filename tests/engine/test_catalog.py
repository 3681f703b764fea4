"""The torch-free list of architecture names matches torchvision's own registry."""

from __future__ import annotations

import torchvision

from worker.engine.catalog import TORCHVISION_CLASSIFIERS


def test_catalog_matches_torchvision() -> None:
    assert set(torchvision.models.list_models(module=torchvision.models)) == TORCHVISION_CLASSIFIERS
