"""The demo recipe: consistent specs, and (slow) the teacher's accuracy its docstring promises."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DigitsTeacher
from worker.engine import data, evaluate, models, recipes
from worker.engine.config import student_arch


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
def test_demo_teacher_reaches_its_accuracy(digits_teacher: DigitsTeacher) -> None:
    """The resnet18 teacher as recipes.train_digits_teacher() trains it (the session's digits_teacher, shared with
    the demo's test). The student the recipe distills from it is checked where users meet it: tests/e2e/test_demo.py
    runs the demo and asserts its accuracy (>= 0.96) on the downloaded file."""
    assert digits_teacher.accuracy >= 0.97
    _, val = data.train_val_tensors(
        data.load_builtin("digits"), recipes.DIGITS_INPUT, recipes.DIGITS_VAL_FRACTION, recipes.DIGITS_SEED
    )
    assert evaluate.accuracy(digits_teacher.model, *val) == digits_teacher.accuracy
