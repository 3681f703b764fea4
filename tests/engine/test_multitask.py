"""distill_tasks(): one multi-head student learns two tasks from their own teachers (one of them seeing its own
input size), with cross-task soft targets and augmentation, and resumes exactly."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.engine.conftest import DIGITS_8X8, small_cnn
from worker.engine import data, evaluate, models
from worker.engine.config import DistillConfig, InputSpec, StudentSpec, multitask_student_arch
from worker.engine.distill import distill
from worker.engine.errors import Interrupted, SpecError
from worker.engine.multitask import TaskData, TaskTeacher, distill_tasks
from worker.engine.training import Progress

# The loop these checks were sized for (AdamW at 1e-2, Hinton's alpha 0.9); the defaults are SGD one-cycle, alpha 0.5.
QUICK = DistillConfig(epochs=4, batch_size=64, lr=1e-2, optimizer="adamw", scheduler="cosine", alpha=0.9)
DIGITS_16X16 = InputSpec(image_size=16, channels=1, mean=(0.5,), std=(0.5,))


def _subset(dataset: data.ArrayDataset, keep: np.ndarray, offset: int) -> data.ArrayDataset:
    return data.ArrayDataset(dataset.x[keep], dataset.y[keep] - offset, dataset.class_names[offset : offset + 5])


def _split(dataset: data.ArrayDataset) -> tuple[data.ArrayDataset, data.ArrayDataset]:
    train, val = data.stratified_split(dataset.y, 0.25, seed=0)
    return (data.ArrayDataset(dataset.x[train], dataset.y[train], dataset.class_names),
            data.ArrayDataset(dataset.x[val], dataset.y[val], dataset.class_names))


def _teacher(train: data.ArrayDataset, val: data.ArrayDataset, input_spec: InputSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(small_cnn(16, num_classes=5, input_spec=input_spec))
    distill(None, model, (data.to_model_input(train.x, input_spec), torch.from_numpy(train.y)),
            (data.to_model_input(val.x, input_spec), torch.from_numpy(val.y)), QUICK, lambda _: None, device="cpu")
    return model.eval()


@pytest.fixture(scope="module")
def tasks() -> list[TaskData]:
    """Digits 0-4 and digits 5-9 as two tasks of five classes each, on disjoint images; the second task's teacher
    takes 16x16 inputs, not the student's 8x8."""
    digits = data.load_builtin("digits")
    made = []
    for name, offset, input_spec in (("low", 0, DIGITS_8X8), ("high", 5, DIGITS_16X16)):
        train, val = _split(_subset(digits, (digits.y >= offset) & (digits.y < offset + 5), offset))
        teacher = TaskTeacher(_teacher(train, val, input_spec), input_spec)
        made.append(TaskData(name, train.class_names, [teacher], train, val))
    return made


def _student(tasks: list[TaskData], seed: int = 0) -> torch.nn.Module:
    heads = {task.name: len(task.class_names) for task in tasks}
    torch.manual_seed(seed)
    return models.build_model(multitask_student_arch(StudentSpec(arch="small_cnn", kwargs={"width": 8}), heads,
                                                     DIGITS_8X8))


def _val(task: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.to_model_input(task.val.x, DIGITS_8X8), torch.from_numpy(task.val.y)


def test_teachers_know_their_tasks(tasks) -> None:
    for task in tasks:
        teacher = task.teachers[0]
        x = data.to_model_input(task.val.x, teacher.input)
        assert evaluate.accuracy(teacher.model, x, torch.from_numpy(task.val.y)) >= 0.9  # chance is 0.2


def test_one_student_learns_both_tasks_far_above_chance(tasks) -> None:
    student = _student(tasks)
    events: list[Progress] = []
    result = distill_tasks(tasks, student, DIGITS_8X8, QUICK, events.append, device="cpu")

    by_task = evaluate.head_accuracies(student, {task.name: _val(task) for task in tasks})
    assert result.by_task == by_task
    assert all(accuracy >= 0.8 for accuracy in by_task.values()), by_task  # chance is 0.2
    assert result.final_val_accuracy == pytest.approx(sum(by_task.values()) / 2)
    for entry in result.history:
        assert list(entry["val_accuracy_by_task"]) == ["low", "high"]
        assert entry["val_accuracy"] == pytest.approx(sum(entry["val_accuracy_by_task"].values()) / 2)
        # Without cross-task targets every term is an image's own task's: Hinton's mix of the two parts.
        assert entry["train_loss"] == pytest.approx(0.9 * 16 * entry["kd_loss"] + 0.1 * entry["ce_loss"], rel=1e-5)
    steps = (len(tasks[0].train.y) + len(tasks[1].train.y)) // 64
    assert events[-1].step == events[-1].total_steps == 4 * steps and {event.stage for event in events} == {"distill"}
    # Progress carries each head's accuracy from the end of the first epoch on (none before: nothing measured).
    assert events[0].val_accuracy_by_task is None
    assert events[-1].val_accuracy_by_task == result.history[-1]["val_accuracy_by_task"]


def test_cross_task_soft_targets_add_a_soft_term_and_the_teachers_see_the_students_crops(tasks) -> None:
    config = QUICK.replace(epochs=3, augment="crop")
    student = _student(tasks)
    result = distill_tasks(tasks, student, DIGITS_8X8, config, lambda _: None, device="cpu",
                           cross_task_soft_targets=True)

    assert all(accuracy >= 0.6 for accuracy in result.by_task.values()), result.by_task
    for entry in result.history:
        own_terms = 0.9 * 16 * entry["kd_loss"] + 0.1 * entry["ce_loss"]
        assert entry["train_loss"] > own_terms * 1.01  # the other task's teachers' soft targets on every image


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_interrupted_mid_epoch_resumes_with_identical_results(tasks) -> None:
    config = QUICK.replace(epochs=2, augment="crop")
    straight = _student(tasks)
    uninterrupted = distill_tasks(tasks, straight, DIGITS_8X8, config, lambda _: None, device="cpu",
                                  cross_task_soft_targets=True)
    stop_at = (len(tasks[0].train.y) + len(tasks[1].train.y)) // 64 + 3  # three steps into the second epoch

    def interrupt(progress: Progress) -> None:
        if progress.step == stop_at:
            raise Interrupted

    checkpoints: list[dict] = []
    with pytest.raises(Interrupted):
        distill_tasks(tasks, _student(tasks), DIGITS_8X8, config, interrupt, checkpoints.append, device="cpu",
                      cross_task_soft_targets=True)
    buffer = io.BytesIO()
    torch.save(checkpoints[-1], buffer)
    buffer.seek(0)
    resumed = _student(tasks, seed=123)
    result = distill_tasks(tasks, resumed, DIGITS_8X8, config, lambda _: None,
                           resume=torch.load(buffer, weights_only=True), device="cpu", cross_task_soft_targets=True)

    straight_weights, resumed_weights = _weights(straight), _weights(resumed)
    assert all(torch.equal(straight_weights[key], resumed_weights[key]) for key in straight_weights)
    assert result.history == uninterrupted.history and result.by_task == uninterrupted.by_task


def test_what_does_not_fit_is_refused_by_name(tasks) -> None:
    with pytest.raises(SpecError, match="one head per task"):
        distill_tasks(tasks[::-1], _student(tasks), DIGITS_8X8, QUICK, lambda _: None, device="cpu")
    with pytest.raises(SpecError, match="loss 'feature'"):
        config = QUICK.replace(loss="feature", feature={"teacher_layer": "features", "student_layer": "features"})
        distill_tasks(tasks, _student(tasks), DIGITS_8X8, config, lambda _: None, device="cpu")
    ten_classes = models.build_model(small_cnn(8, num_classes=10))
    wrong = [tasks[0], SimpleNamespace(**{**vars(tasks[1]), "teachers": [TaskTeacher(ten_classes, DIGITS_8X8)]})]
    with pytest.raises(SpecError, match="task 'high': teacher 1 predicts 10 classes but the task's dataset has 5"):
        distill_tasks(wrong, _student(tasks), DIGITS_8X8, QUICK, lambda _: None, device="cpu")
