"""Random augmentation of a batch already on its device, so that no CPU worker sits between data and model.

The draws come from the device's global generator, which training checkpoints, so a resumed run repeats them.
One draw (CropDraw) holds each image's shift as fractions of the shift range and its mirroring, so that the same
crop can be applied to several views of the images at different sizes (a teacher that takes its own input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Shift by up to 1/8 of the side: the usual 4 pixels at 32x32, 28 at 224.
SHIFT_FRACTION = 8


@dataclass(frozen=True)
class CropDraw:
    """Per image: where in the shift range its crop starts, as fractions in [0, 1), and whether it is mirrored."""

    rows: torch.Tensor  # N floats
    columns: torch.Tensor  # N floats
    mirrored: torch.Tensor | None  # N bools; None: no flipping

    @classmethod
    def sample(cls, count: int, flip: bool, device: torch.device) -> CropDraw:
        rows, columns = torch.rand((2, count), device=device)
        return cls(rows, columns, torch.rand(count, device=device) < 0.5 if flip else None)


def random_crop(images: torch.Tensor, draw: CropDraw) -> torch.Tensor:
    """Each NCHW image shifted by its drawn offset, mirrored left-right where the draw says.

    The offset at this size is the drawn fraction of its 2 * pad + 1 possible ones (uniform over them), so views
    of the same images at different sizes are shifted by about the same fraction of their side (to a pixel).
    Reflect padding rather than zeros: the inputs are normalized, where zero is the mean colour, not a border.
    Crop and mirror are one pair of gathers whose index already holds the reversed columns.
    """
    count, channels, height, width = images.shape
    pad = max(1, min(height, width) // SHIFT_FRACTION)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    device = images.device

    def offsets(fractions: torch.Tensor) -> torch.Tensor:
        return (fractions * (2 * pad + 1)).long().clamp(max=2 * pad).view(count, 1, 1, 1)

    rows = offsets(draw.rows) + torch.arange(height, device=device).view(1, 1, height, 1)
    columns = torch.arange(width, device=device).view(1, 1, 1, width)
    if draw.mirrored is not None:
        columns = torch.where(draw.mirrored.view(count, 1, 1, 1), width - 1 - columns, columns)
    columns = columns + offsets(draw.columns)
    shifted_rows = padded.gather(2, rows.expand(count, channels, height, width + 2 * pad))
    return shifted_rows.gather(3, columns.expand(count, channels, height, width))
