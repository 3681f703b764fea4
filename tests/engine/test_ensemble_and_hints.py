"""distill() with an ensemble of teachers (one with its own input, cropped as the student's), and the FitNets
feature hint: its adapter trains, checkpoints carry it, bad layer names are refused by name."""

from __future__ import annotations

import io

import pytest
import torch

from tests.engine.conftest import small_cnn
from worker.engine import data, models, training
from worker.engine.config import ArchSpec, DistillConfig, InputSpec, TrainingConfig
from worker.engine.distill import Distillation, Teacher, check_feature_layers, distill
from worker.engine.errors import Interrupted, SpecError
from worker.engine.training import Progress, fit

RGB_32 = InputSpec(image_size=32, channels=3, mean=(0.5,), std=(0.5,))
# The loop these checks were sized for (AdamW at 1e-2 learns digits in one epoch); the defaults are SGD one-cycle.
QUICK = DistillConfig(epochs=1, batch_size=64, lr=1e-2, optimizer="adamw", scheduler="cosine")
# features.2: the first block's ReLU (8x8 maps); features.6: the second's (4x4), in small_cnn.
HINT = {"loss": "feature", "feature": {"teacher_layer": "features.6", "student_layer": "features.2", "weight": 1.0}}


def _build(arch: ArchSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(arch)


def _coordinates(count: int, side: int) -> torch.Tensor:
    """Images whose channel 0 holds each pixel's column and channel 1 its row."""
    columns = torch.arange(side, dtype=torch.float32).expand(side, side)
    return torch.stack([columns, columns.T]).expand(count, 2, side, side).clone()


def _shifts_and_flips(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cropped coordinate image: the row and column shifts as fractions of the side, and whether mirrored."""
    side = crops.shape[-1]
    centre = side // 2
    mirrored = crops[:, 0, centre, centre + 1] < crops[:, 0, centre, centre]
    column_source = torch.where(mirrored, side - 1 - centre, centre)
    return ((crops[:, 1, centre, centre] - centre) / side, (crops[:, 0, centre, centre] - column_source) / side,
            mirrored)


def test_a_view_at_another_size_gets_the_students_crop() -> None:
    count = 64
    plan = training.plan(torch.device("cpu"), TrainingConfig(), 10)
    labels = torch.zeros(count, dtype=torch.long)
    device_data = training.DeviceData((_coordinates(count, 16), labels), (_coordinates(2, 16), labels[:2]), plan)
    view = device_data.place(_coordinates(count, 32))
    torch.manual_seed(0)
    batch = torch.randperm(count)[:48]

    student_rows, student_columns, student_mirrored = _shifts_and_flips(device_data.inputs(batch, "crop_flip"))
    view_rows, view_columns, view_mirrored = _shifts_and_flips(device_data.view_inputs(view, batch))

    assert torch.equal(student_mirrored, view_mirrored)
    assert 0 < student_mirrored.sum() < len(batch)
    # The same shift, as a fraction of the side, to within a pixel of the smaller image.
    for student, view in ((student_rows, view_rows), (student_columns, view_columns)):
        assert (student - view).abs().max() <= 1 / 16
        assert len(set(student.tolist())) == 5  # every shift of -2..2 pixels was drawn
    # A new batch, a new draw.
    assert not torch.equal(device_data.inputs(batch, "crop_flip"), device_data.inputs(batch, "crop_flip"))


def _digits_view(input_spec: InputSpec) -> torch.Tensor:
    """The training split's images (digits_splits' rows, in order) as a model with `input_spec` sees them."""
    digits = data.load_builtin("digits")
    train_indices, _ = data.stratified_split(digits.y, 0.2, 0)
    return data.to_model_input(digits.x[train_indices], input_spec)


def _count_inputs(model: torch.nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda _module, inputs, _output: shapes.append(tuple(inputs[0].shape)))
    return shapes


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_two_teachers_with_different_inputs_distill_a_student(digits_splits, augment: str) -> None:
    train, val = digits_splits
    small = _build(small_cnn(16))
    resnet = _build(ArchSpec(arch="resnet18", kwargs={"num_classes": 10}, input=RGB_32))
    small_inputs, resnet_inputs = _count_inputs(small), _count_inputs(resnet)
    teachers = [Teacher(small, weight=2.0), Teacher(resnet, weight=1.0, view=_digits_view(RGB_32))]
    config = QUICK.replace(augment=augment, alpha=0.5, teacher_weighting="confidence")

    result = distill(teachers, _build(small_cnn(8)), train, val, config, lambda _: None, device="cpu")

    assert result.epochs_run == 1 and result.final_val_accuracy > 0.3  # chance is 0.1
    assert all(torch.isfinite(torch.tensor([entry["train_loss"], entry["kd_loss"]])).all() for entry in result.history)
    assert {shape[1:] for shape in small_inputs} == {(1, 8, 8)}
    assert {shape[1:] for shape in resnet_inputs} == {(3, 32, 32)}
    if augment == "none":  # logits cached: each teacher sees each image once
        assert sum(shape[0] for shape in small_inputs) == sum(shape[0] for shape in resnet_inputs) == len(train[0])
    else:  # every step, both teachers
        assert [shape[0] for shape in resnet_inputs] == [shape[0] for shape in small_inputs] == [64] * (
            len(train[0]) // 64)


def test_a_view_must_match_the_training_set(digits_splits) -> None:
    view = _digits_view(RGB_32)[:-1]
    with pytest.raises(ValueError, match="view"):
        distill([Teacher(_build(small_cnn(16)), view=view)], _build(small_cnn(8)), *digits_splits, QUICK,
                lambda _: None, device="cpu")


def _hint_task(teacher: torch.nn.Module, student: torch.nn.Module, config: DistillConfig) -> Distillation:
    return Distillation([Teacher(teacher)], student, config)


def _hint_loss(task: Distillation, teacher: torch.nn.Module, student: torch.nn.Module, images: torch.Tensor) -> float:
    """The hint term of `student` through the task's adapter, on fixed images."""
    student.eval()
    with torch.no_grad():
        student(images)
        teacher(images)
        return task.hint.loss().item()


def test_the_hint_trains_its_adapter_and_lowers_the_hint_loss(digits_splits) -> None:
    train, val = digits_splits
    teacher, student = _build(small_cnn(16)), _build(small_cnn(8))
    config = QUICK.replace(epochs=3, **HINT)
    task = _hint_task(teacher, student, config)
    checkpoints: list[dict] = []

    fit(task, student, train, val, config.training, lambda _: None, checkpoints.append, device="cpu")

    adapter = task.hint.adapter
    assert isinstance(adapter, torch.nn.Conv2d) and adapter.weight.shape == (32, 8, 1, 1)
    assert adapter is task.extra_module
    first_epoch = checkpoints[0]["task_module"]
    assert not torch.equal(first_epoch["weight"], adapter.weight.detach())
    images = val[0][:256]
    final = _hint_loss(task, teacher, student, images)
    student.load_state_dict(checkpoints[0]["student"])
    adapter.load_state_dict(first_epoch)
    assert final < 0.9 * _hint_loss(task, teacher, student, images)
    task.close()
    assert not student._forward_hooks and not any(module._forward_hooks for module in student.modules())


def test_a_resumed_hint_run_restores_its_adapter(digits_splits) -> None:
    train, val = digits_splits
    teacher = _build(small_cnn(16))
    config = QUICK.replace(epochs=2, augment="crop", **HINT)
    straight_student = _build(small_cnn(8))
    straight = _hint_task(teacher, straight_student, config)
    fit(straight, straight_student, train, val, config.training, lambda _: None, device="cpu")

    def interrupt(progress: Progress) -> None:
        if progress.step == 30:
            raise Interrupted

    checkpoints: list[dict] = []
    interrupted_student = _build(small_cnn(8))
    with pytest.raises(Interrupted):
        fit(_hint_task(teacher, interrupted_student, config), interrupted_student, train, val, config.training,
            interrupt, checkpoints.append, device="cpu")
    buffer = io.BytesIO()
    torch.save(checkpoints[-1], buffer)
    buffer.seek(0)
    resumed_student = _build(small_cnn(8), seed=1)
    resumed = _hint_task(teacher, resumed_student, config)
    fit(resumed, resumed_student, train, val, config.training, lambda _: None,
        resume=torch.load(buffer, weights_only=True), device="cpu")

    for got, expected in ((resumed_student, straight_student), (resumed.extra_module, straight.extra_module)):
        assert all(torch.equal(value, expected.state_dict()[key]) for key, value in got.state_dict().items())


def test_distill_with_a_hint_removes_its_hooks(digits_splits) -> None:
    teacher, student = _build(small_cnn(16)), _build(small_cnn(8))
    result = distill(teacher, student, *digits_splits, QUICK.replace(**HINT), lambda _: None, device="cpu")
    assert result.final_val_accuracy > 0.3
    assert not any(module._forward_hooks for model in (teacher, student) for module in model.modules())


def test_unknown_layers_are_refused_by_name(digits_splits) -> None:
    teacher, student = _build(small_cnn(16)), _build(small_cnn(8))
    config = QUICK.replace(loss="feature", feature={"teacher_layer": "layer3", "student_layer": "features.2"})
    with pytest.raises(SpecError, match=r"feature.teacher_layer 'layer3' is not a module of the teacher.*features"):
        check_feature_layers(teacher, student, config.feature)
    with pytest.raises(SpecError, match="'layer3'"):
        distill(teacher, student, *digits_splits, config, lambda _: None, device="cpu")
    bad_student = config.feature.replace(teacher_layer="features.6", student_layer="features.99")
    with pytest.raises(SpecError, match=r"student_layer 'features.99'"):
        check_feature_layers(teacher, student, bad_student)
    check_feature_layers(teacher, student, bad_student.replace(student_layer="features.2"))


def test_layers_of_different_ranks_are_refused(digits_splits) -> None:
    config = QUICK.replace(loss="feature", feature={"teacher_layer": "classifier", "student_layer": "features.2"})
    with pytest.raises(SpecError, match="same rank"):
        distill(_build(small_cnn(16)), _build(small_cnn(8)), *digits_splits, config, lambda _: None, device="cpu")
