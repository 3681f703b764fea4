"""Device picking: cpu always, cuda only where there is one, auto the best there is."""

from __future__ import annotations

import pytest
import torch

from worker.engine import hardware
from worker.engine.errors import SpecError


def test_pick_device() -> None:
    assert hardware.pick_device("cpu").type == "cpu"
    assert hardware.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no usable GPU"):
            hardware.pick_device("cuda")
