"""Which device a run uses, and the process-wide backend settings it runs under there.

How many CPU threads to use is the host's decision, not the engine's: the service sizes them for its processes
(core.threads), and a library caller keeps PyTorch's default or sets its own.
"""

from __future__ import annotations

import torch

from worker.engine.errors import SpecError


def pick_device(preference: str) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise SpecError("device 'cuda' was requested but this worker has no usable GPU; use 'auto' or 'cpu'")
    return torch.device("cpu")


def configure_backends(device: torch.device) -> None:
    """Process-wide settings; a worker process runs one job at a time, so they are this run's own."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes are fixed: autotune each convolution once
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32
