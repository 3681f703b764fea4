"""The demo recipe: consistent specs, and (slow) the accuracies its docstring promises."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DigitsTeacher
from worker.engine import data, evaluate, models, recipes
from worker.engine.config import student_arch
from worker.engine.distill import distill


def _student_arch():
    return student_arch(recipes.DIGITS_STUDENT, recipes.DIGITS_TEACHER)


def test_demo_recipe_models() -> None:
    teacher = models.build_model(recipes.DIGITS_TEACHER).eval()
    student = models.build_model(_student_arch()).eval()
    assert models.param_count(teacher) >= 10 * models.param_count(student)
    batch = torch.zeros(2, 3, recipes.DIGITS_INPUT.image_size, recipes.DIGITS_INPUT.image_size)
    with torch.inference_mode():
        assert teacher(batch).shape == student(batch).shape == (2, 10)


@pytest.mark.slow
def test_demo_recipe_reaches_its_accuracies(digits_teacher: DigitsTeacher) -> None:
    """The resnet18 teacher as recipes.train_digits_teacher() trains it (the session's digits_teacher, shared
    with the demo's test), then the small_cnn student distilled from it here."""
    teacher, teacher_accuracy = digits_teacher.model, digits_teacher.accuracy
    assert teacher_accuracy >= 0.97

    config = recipes.DIGITS_DISTILLATION
    train, val = data.train_val_tensors(
        data.load_builtin("digits"), recipes.DIGITS_INPUT, recipes.DIGITS_VAL_FRACTION, recipes.DIGITS_SEED
    )
    assert evaluate.accuracy(teacher, *val) == teacher_accuracy
    torch.manual_seed(recipes.DIGITS_SEED)
    student = models.build_model(_student_arch())
    result = distill(teacher, student, train, val, config, lambda _: None, seed=recipes.DIGITS_SEED)
    assert result.final_val_accuracy >= 0.96
