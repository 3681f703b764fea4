"""The demo recipe is consistent: both models run on its input and the student is >= 10x smaller."""

from __future__ import annotations

import torch

from worker.engine import models, recipes


def test_demo_recipe_models() -> None:
    teacher = models.build_model(recipes.DIGITS_TEACHER).eval()
    student = models.build_model(models.student_arch(recipes.DIGITS_STUDENT, recipes.DIGITS_TEACHER)).eval()
    assert models.param_count(teacher) >= 10 * models.param_count(student)
    batch = torch.zeros(2, 3, recipes.DIGITS_INPUT.image_size, recipes.DIGITS_INPUT.image_size)
    with torch.inference_mode():
        assert teacher(batch).shape == student(batch).shape == (2, 10)
