"""Random augmentation of a batch already on its device, so that no CPU worker sits between data and model.

The draws come from the device's global generator, which training checkpoints, so a resumed run repeats them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Shift by up to 1/8 of the side: the usual 4 pixels at 32x32, 28 at 224.
SHIFT_FRACTION = 8


def random_crop(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Each NCHW image shifted by a random offset, mirrored left-right at random when `flip`.

    Reflect padding rather than zeros: the inputs are normalized, where zero is the mean colour, not a border.
    Crop and mirror are one pair of gathers whose index already holds the reversed columns.
    """
    count, channels, height, width = images.shape
    pad = max(1, min(height, width) // SHIFT_FRACTION)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    device = images.device
    rows = torch.randint(0, 2 * pad + 1, (count, 1, 1, 1), device=device) + torch.arange(height, device=device).view(
        1, 1, height, 1
    )
    columns = torch.arange(width, device=device).view(1, 1, 1, width)
    if flip:
        mirrored = torch.rand((count, 1, 1, 1), device=device) < 0.5
        columns = torch.where(mirrored, width - 1 - columns, columns)
    columns = columns + torch.randint(0, 2 * pad + 1, (count, 1, 1, 1), device=device)
    shifted_rows = padded.gather(2, rows.expand(count, channels, height, width + 2 * pad))
    return shifted_rows.gather(3, columns.expand(count, channels, height, width))
