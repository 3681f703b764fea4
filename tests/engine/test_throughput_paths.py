"""The fast paths of distill() on CPU: cached teacher logits, device augmentation, no per-step sync, the
per-device plan (compile, fused optimizer, bf16), and background checkpoints."""

from __future__ import annotations

import io
import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.engine.conftest import small_cnn
from worker.engine import augment, distill, evaluate, models, training
from worker.engine.config import ADAMW_LOOP, DistillConfig, QuantizeConfig
from worker.engine.errors import Canceled, Interrupted
from worker.engine.training import LOSS_REFRESH_STEPS, Progress

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only planned for, never run: these tests pass on machines without a GPU
QUICK = DistillConfig(epochs=1, batch_size=64, lr=1e-2, **ADAMW_LOOP)


def _build(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(small_cnn(width))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _set_up(teacher: torch.nn.Module, train, val, config: DistillConfig) -> distill.Distillation:
    """The distillation task as distill() sets it up, before the first step."""
    student = _build(8)
    task = distill.Distillation([distill.Teacher(teacher)], student, config)
    training._Run(task, student, train, val, config.training, 0, "cpu")
    return task


def test_cached_teacher_logits_equal_recomputed_ones(digits_splits) -> None:
    train, val = digits_splits
    teacher = _build(16)
    task = _set_up(teacher, train, val, QUICK)

    [cached] = task.cached_logits
    assert cached.dtype == torch.float32  # bf16 is for CUDA only
    torch.testing.assert_close(cached, evaluate.logits(teacher, train[0]))
    batch = torch.tensor([5, 0, 700, 3])
    soft_targets = task.soft_targets(batch, task.data.inputs(batch), train[1][batch])
    torch.testing.assert_close(soft_targets, torch.softmax(teacher(train[0][batch]) / QUICK.temperature, dim=1))


def _count_teacher_calls(teacher: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    teacher.register_forward_hook(lambda _module, inputs, _output: calls.append(len(inputs[0])))
    return calls


def test_without_augmentation_the_teacher_runs_once_per_image(digits_splits) -> None:
    train, val = digits_splits
    teacher = _build(16)
    calls = _count_teacher_calls(teacher)
    distill.distill(teacher, _build(8), train, val, QUICK.replace(epochs=2), lambda _: None, device="cpu")
    assert sum(calls) == len(train[0])


def test_with_augmentation_the_teacher_runs_on_every_augmented_batch(digits_splits) -> None:
    train, val = digits_splits
    teacher = _build(16)
    calls = _count_teacher_calls(teacher)
    config = QUICK.replace(epochs=2, augment="crop")
    assert _set_up(teacher, train, val, config).cached_logits is None

    distill.distill(teacher, _build(8), train, val, config, lambda _: None, device="cpu")
    steps = 2 * (len(train[0]) // 64)
    assert calls == [64] * steps


def test_augmented_training_learns_digits(digits_splits) -> None:
    config = QUICK.replace(epochs=4, augment="crop")
    result = distill.distill(None, _build(8), *digits_splits, config, lambda _: None, device="cpu")
    assert result.final_val_accuracy >= 0.7  # chance is 0.1


def test_augmented_run_resumes_mid_epoch_exactly(digits_splits) -> None:
    """The crops come from the global generator, which checkpoints carry."""
    config = QUICK.replace(epochs=2, augment="crop_flip")
    teacher = _build(16)
    straight = _build(8)
    distill.distill(teacher, straight, *digits_splits, config, lambda _: None, device="cpu")

    def interrupt(progress: Progress) -> None:
        if progress.step == 30:
            raise Interrupted

    checkpoints: list[dict] = []
    with pytest.raises(Interrupted):
        distill.distill(teacher, _build(8), *digits_splits, config, interrupt, checkpoints.append, device="cpu")
    buffer = io.BytesIO()
    torch.save(checkpoints[-1], buffer)
    buffer.seek(0)
    resumed = _build(8, seed=1)
    distill.distill(teacher, resumed, *digits_splits, config, lambda _: None,
                    resume=torch.load(buffer, weights_only=True), device="cpu")
    assert all(torch.equal(value, _weights(straight)[key]) for key, value in _weights(resumed).items())


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_is_a_shift_of_the_reflect_padded_image(flip: bool) -> None:
    torch.manual_seed(0)
    images = torch.randn(16, 3, 8, 8)
    out = augment.random_crop(images, augment.CropDraw.sample(16, flip, CPU))
    assert out.shape == images.shape
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    for image, shifted in zip(padded, out, strict=True):
        candidates = [image[:, top : top + 8, left : left + 8] for top in range(3) for left in range(3)]
        candidates += [crop.flip(-1) for crop in candidates] if flip else []
        assert any(torch.equal(shifted, crop) for crop in candidates)


def test_the_progress_path_reads_the_loss_only_at_the_first_step_and_every_refresh(digits_splits,
                                                                                    monkeypatch) -> None:
    """Reading a tensor (item, tolist) waits for the device; between refreshes the loop must not. (The optimizer's
    own reads of its CPU step counters wait for nothing, so only the engine's are counted.)"""
    reads = 0

    def counted(read: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
        def counted_read(tensor: torch.Tensor) -> Any:
            nonlocal reads
            reads += sys._getframe(1).f_code.co_filename in (training.__file__, distill.__file__)
            return read(tensor)

        return counted_read

    monkeypatch.setattr(torch.Tensor, "item", counted(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist))
    seen: list[tuple[int, int, float | None]] = []

    def on_progress(progress: Progress) -> None:
        if progress.val_accuracy is None:
            seen.append((progress.step, reads, progress.train_loss))

    distill.distill(None, _build(8), *digits_splits, QUICK.replace(batch_size=16), on_progress, device="cpu")
    assert len(seen) > 2 * LOSS_REFRESH_STEPS
    assert seen[0][1] == 1 and seen[0][2] is not None
    for (_, before, _), (step, after, loss) in itertools.pairwise(seen):
        refreshed = step % LOSS_REFRESH_STEPS == 0
        assert after - before == (1 if refreshed else 0), step
        assert loss is not None


@pytest.mark.parametrize(("device", "compile_mode", "steps", "compiled"), [
    (CPU, "auto", 100_000, False),
    (CPU, "on", 10, True),
    (CUDA, "auto", training.COMPILE_AUTO_MIN_STEPS, True),
    (CUDA, "auto", training.COMPILE_AUTO_MIN_STEPS - 1, False),
    (CUDA, "off", 100_000, False),
])
def test_compile_mode_resolves_per_device_and_run_length(device, compile_mode, steps, compiled) -> None:
    assert training.plan(device, QUICK.replace(compile=compile_mode).training, steps).compile is compiled


def test_cuda_plan_uses_bf16_channels_last_and_a_fused_optimizer_cpu_plan_none() -> None:
    cuda, cpu = training.plan(CUDA, QUICK.training, 10), training.plan(CPU, QUICK.training, 10)
    assert (cuda.autocast, cuda.memory_format, cuda.fused_optimizer, cuda.logits_dtype) == (
        True, torch.channels_last, True, torch.bfloat16)
    assert (cpu.autocast, cpu.memory_format, cpu.fused_optimizer, cpu.logits_dtype) == (
        False, torch.contiguous_format, False, torch.float32)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_only_where_the_plan_asks(optimizer: str) -> None:
    config = QUICK.replace(optimizer=optimizer).training
    for device, fused in ((CPU, None), (CUDA, True)):
        fused_plan = training.plan(device, config, 10).fused_optimizer
        built = training._optimizer(list(_build(8).parameters()), config, fused_plan)
        assert built.defaults["fused"] is fused


def test_compiled_student_checkpoints_its_plain_state_dict(digits_splits, monkeypatch) -> None:
    # The eager backend runs Dynamo without Inductor's minute-long CPU code generation.
    real_compile = torch.compile
    compiled: list[torch.nn.Module] = []

    def eager_compile(model: torch.nn.Module) -> torch.nn.Module:
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    student = _build(8)
    checkpoints: list[dict] = []
    distill.distill(None, student, *digits_splits, QUICK.replace(compile="on"), lambda _: None,
                    checkpoints.append, device="cpu")
    assert compiled == [student]
    buffer = io.BytesIO()
    torch.save(checkpoints[-1], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["student"]
    assert list(state) == list(student.state_dict())
    _build(8, seed=1).load_state_dict(state)


def test_epoch_checkpoints_are_handed_over_in_order_off_the_loop_thread(digits_splits) -> None:
    threads: list[str] = []
    epochs: list[int] = []

    def on_checkpoint(state: dict) -> None:
        threads.append(threading.current_thread().name)
        epochs.append(state["epoch"])

    distill.distill(None, _build(8), *digits_splits, QUICK.replace(epochs=3), lambda _: None,
                    on_checkpoint, device="cpu")
    assert epochs == [1, 2, 3]
    assert threading.current_thread().name not in threads


def test_a_failed_checkpoint_write_fails_the_run(digits_splits) -> None:
    def disk_full(_state: dict) -> None:
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        distill.distill(None, _build(8), *digits_splits, QUICK, lambda _: None, disk_full, device="cpu")


def test_a_cancel_is_not_masked_by_a_failing_checkpoint_write(digits_splits) -> None:
    def disk_full(_state: dict) -> None:
        raise OSError("No space left on device")

    def cancel_in_second_epoch(progress: Progress) -> None:
        if progress.epoch == 2:
            raise Canceled("canceled by request")

    with pytest.raises(Canceled):
        distill.distill(None, _build(8), *digits_splits, QUICK.replace(epochs=2),
                        cancel_in_second_epoch, disk_full, device="cpu")


def test_training_only_fields_are_refused_where_nothing_trains() -> None:
    with pytest.raises(ValueError, match="augment"):
        QuantizeConfig(method="static", augment="crop")
    assert QuantizeConfig(method="qat", augment="crop", compile="off").qat.training.compile == "off"
