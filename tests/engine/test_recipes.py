"""The demo recipe: consistent specs, and (slow) the accuracies its docstring promises."""

from __future__ import annotations

import pytest
import torch

from worker.engine import data, evaluate, models, recipes
from worker.engine.distill import distill


def _student_arch():
    return models.student_arch(recipes.DIGITS_STUDENT, recipes.DIGITS_TEACHER)


def test_demo_recipe_models() -> None:
    teacher = models.build_model(recipes.DIGITS_TEACHER).eval()
    student = models.build_model(_student_arch()).eval()
    assert models.param_count(teacher) >= 10 * models.param_count(student)
    batch = torch.zeros(2, 3, recipes.DIGITS_INPUT.image_size, recipes.DIGITS_INPUT.image_size)
    with torch.inference_mode():
        assert teacher(batch).shape == student(batch).shape == (2, 10)
    # The teacher must not be trained on the images its student is validated on.
    teacher_split = recipes.DIGITS_TEACHER_TRAINING.val_fraction, recipes.DIGITS_TEACHER_TRAINING.seed
    assert teacher_split == (recipes.DIGITS_DISTILLATION.val_fraction, recipes.DIGITS_DISTILLATION.seed)


@pytest.mark.slow
def test_demo_recipe_reaches_its_accuracies() -> None:
    """About 40 s on 2 cores: resnet18 teacher, then the distilled small_cnn student."""
    teacher, teacher_accuracy = recipes.train_digits_teacher()
    assert teacher_accuracy >= 0.97

    config = recipes.DIGITS_DISTILLATION
    train, val = data.train_val_tensors(
        data.load_builtin("digits"), recipes.DIGITS_INPUT, config.val_fraction, config.seed
    )
    assert evaluate.accuracy(teacher, *val) == teacher_accuracy
    torch.manual_seed(config.seed)
    student = models.build_model(_student_arch())
    result = distill(teacher, student, train, val, config, lambda _: None)
    assert result.final_val_accuracy >= 0.96
