"""The demo recipe: a resnet18 teacher on the built-in digits, distilled into a ~460x smaller CNN.

Measured on the 2-core development CPU with seed 0 and a 20% stratified validation split (359 images):
the teacher (11.18 M parameters) trains to 0.983 validation accuracy in about 30 s; the student
(24 k parameters) distills to 0.989 in about 10 s (0.983 when trained from labels alone), and runs a
batch of one in 0.24 ms against the teacher's 2.9 ms."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig, InputSpec, StudentSpec

if TYPE_CHECKING:
    from torch import nn

    from worker.engine.training import Progress

# The 8x8 digits upscaled to 32x32: resnet18's stride-32 trunk still ends on a 1x1 map there.
DIGITS_INPUT = InputSpec(image_size=32, channels=3, mean=(0.5,), std=(0.5,), resize="resize")

DIGITS_TEACHER = ArchSpec(arch="resnet18", kwargs={"num_classes": 10}, input=DIGITS_INPUT)

DIGITS_STUDENT = StudentSpec(arch="small_cnn", kwargs={"width": 16, "depth": 3})

# distill(teacher=None, ...) with this trains the teacher from labels alone. The teacher's split (seed and
# val_fraction) is the distillation's, so it never sees the images its student is validated on.
DIGITS_SEED, DIGITS_VAL_FRACTION = 0, 0.2
DIGITS_TEACHER_TRAINING = DistillConfig(epochs=10, batch_size=64, lr=3e-3, **ADAMW_LOOP)

DIGITS_DISTILLATION = DistillConfig(epochs=30, batch_size=64, lr=1e-2, temperature=4.0, alpha=0.9,
                                    **ADAMW_LOOP)


def train_digits_teacher(on_progress: Callable[[Progress], None] | None = None) -> tuple[nn.Module, float]:
    """DIGITS_TEACHER trained on the built-in digits: (model, validation accuracy)."""
    # Imported here so that reading the recipe's specs does not load torch.
    import torch

    from worker.engine.data import load_builtin, train_val_tensors
    from worker.engine.distill import distill
    from worker.engine.models import build_model

    config = DIGITS_TEACHER_TRAINING
    train, val = train_val_tensors(load_builtin("digits"), DIGITS_INPUT, DIGITS_VAL_FRACTION, DIGITS_SEED)
    torch.manual_seed(DIGITS_SEED)
    teacher = build_model(DIGITS_TEACHER)
    result = distill(None, teacher, train, val, config, on_progress or (lambda _: None), seed=DIGITS_SEED)
    return teacher, result.final_val_accuracy
