"""distill(): learning on real digits, seeded determinism, exact resume, progress and cancel."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from tests.engine.conftest import small_cnn
from worker.engine import evaluate, models
from worker.engine.config import ADAMW_LOOP, DistillConfig
from worker.engine.distill import distill
from worker.engine.errors import Canceled, Interrupted
from worker.engine.training import LOSS_REFRESH_STEPS, Progress

QUICK = DistillConfig(epochs=3, batch_size=64, lr=1e-2, **ADAMW_LOOP)


def _build(width: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(small_cnn(width, **kwargs))


@pytest.fixture(scope="module")
def teacher(digits_splits) -> torch.nn.Module:
    train, val = digits_splits
    model = _build(32)
    distill(None, model, train, val, QUICK.replace(epochs=6), lambda _: None, device="cpu")
    return model


def test_teacher_learns_digits_from_labels(teacher, digits_splits) -> None:
    assert evaluate.accuracy(teacher, *digits_splits[1]) >= 0.9


def test_student_distilled_on_digits_far_above_chance(teacher, digits_splits) -> None:
    train, val = digits_splits
    student = _build(8)
    assert models.param_count(student) * 10 <= models.param_count(teacher)
    teacher_before = {key: value.clone() for key, value in teacher.state_dict().items()}
    events: list[Progress] = []

    result = distill(teacher, student, train, val, QUICK.replace(epochs=8), events.append, device="cpu")

    assert result.final_val_accuracy >= 0.85  # chance is 0.1
    assert result.epochs_run == 8 and [entry["epoch"] for entry in result.history] == list(range(1, 9))
    assert result.best_val_accuracy == max(*(entry["val_accuracy"] for entry in result.history),
                                           result.final_val_accuracy)
    assert result.final_val_accuracy == evaluate.accuracy(student, *val)  # BatchNorm recalibrated or not
    steps_per_epoch = len(train[0]) // 64
    total = events[0].total_steps
    assert total == 8 * steps_per_epoch
    assert {event.stage for event in events} == {"distill"}
    # The end of an epoch is reported once more at its last step, with the epoch's accuracy.
    epoch_ends = [index for index, event in enumerate(events) if index and event.step == events[index - 1].step]
    assert [events[index].val_accuracy for index in epoch_ends] == [entry["val_accuracy"] for entry in result.history]
    steps = [event for index, event in enumerate(events) if index not in epoch_ends]
    assert [event.step for event in steps] == list(range(1, total + 1))
    # Between them, the last completed epoch's accuracy: none yet during the first.
    assert [event.val_accuracy for event in steps] == [None] * steps_per_epoch + [
        entry["val_accuracy"] for entry in result.history[:-1] for _ in range(steps_per_epoch)]
    assert events[-1].eta_seconds == 0
    assert all(torch.equal(value, teacher_before[key]) for key, value in teacher.state_dict().items())
    assert not teacher.training


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_same_seed_gives_identical_weights(teacher, digits_splits) -> None:
    runs = []
    for _ in range(2):
        student = _build(8, dropout=0.3)
        distill(teacher, student, *digits_splits, QUICK.replace(epochs=2), lambda _: None, device="cpu")
        runs.append(_weights(student))
    _assert_same_weights(*runs)


@pytest.mark.parametrize(("optimizer", "scheduler"), [("adamw", "cosine"), ("sgd", "onecycle"), ("adamw", "none")])
def test_resume_from_checkpoint_equals_uninterrupted_run(teacher, digits_splits, optimizer, scheduler) -> None:
    config = QUICK.replace(optimizer=optimizer, scheduler=scheduler)
    checkpoints: list[dict] = []
    straight = _build(8, dropout=0.3)
    uninterrupted = distill(teacher, straight, *digits_splits, config, lambda _: None, checkpoints.append, device="cpu")

    # The checkpoint goes through the same trip as on a worker: torch.save, then a weights_only load.
    buffer = io.BytesIO()
    torch.save(checkpoints[0], buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _build(8, seed=123, dropout=0.3)
    steps: list[int] = []
    result = distill(teacher, resumed, *digits_splits, config, lambda p: steps.append(p.step), resume=checkpoint,
                     device="cpu")

    _assert_same_weights(_weights(straight), _weights(resumed))
    assert result.history == uninterrupted.history
    assert checkpoint["epoch"] == 1 and steps[0] == len(digits_splits[0][0]) // 64 + 1


def test_interrupted_mid_epoch_resumes_at_the_next_step_with_identical_results(teacher, digits_splits) -> None:
    straight = _build(8, dropout=0.3)
    uninterrupted = distill(teacher, straight, *digits_splits, QUICK, lambda _: None, device="cpu")
    steps_per_epoch = len(digits_splits[0][0]) // QUICK.training.batch_size
    stop_at = steps_per_epoch + 3  # three steps into the second epoch

    def interrupt(progress) -> None:
        if progress.step == stop_at:
            raise Interrupted

    checkpoints: list[dict] = []
    interrupted = _build(8, dropout=0.3)
    with pytest.raises(Interrupted):
        distill(teacher, interrupted, *digits_splits, QUICK, interrupt, checkpoints.append, device="cpu")
    mid_epoch = checkpoints[-1]
    assert (mid_epoch["epoch"], mid_epoch["step_in_epoch"]) == (1, 3)

    buffer = io.BytesIO()
    torch.save(mid_epoch, buffer)
    buffer.seek(0)
    events: list[Progress] = []
    resumed = _build(8, seed=123, dropout=0.3)
    result = distill(teacher, resumed, *digits_splits, QUICK, events.append,
                     resume=torch.load(buffer, weights_only=True), device="cpu")
    assert events[0].step == stop_at + 1
    # The first report after resuming knows the epoch's loss so far and the accuracy of the epoch before.
    assert events[0].train_loss is not None and events[0].val_accuracy == uninterrupted.history[0]["val_accuracy"]
    _assert_same_weights(_weights(straight), _weights(resumed))
    assert result.history == uninterrupted.history


def test_progress_and_history_report_the_kd_and_ce_parts_of_the_loss(teacher, digits_splits) -> None:
    temperature, alpha = 3.0, 0.7
    events: list[Progress] = []
    result = distill(teacher, _build(8), *digits_splits, QUICK.replace(epochs=2, temperature=temperature, alpha=alpha),
                     events.append, device="cpu")

    reported = [event for event in events if event.train_loss is not None]
    assert len(reported) > len(result.history)  # the running means as well as the epochs'
    assert all(event.kd_loss is None and event.ce_loss is None for event in events if event.train_loss is None)
    for loss in [*reported, *(SimpleNamespace(**entry) for entry in result.history)]:
        assert loss.kd_loss > 0 and loss.ce_loss > 0
        assert loss.train_loss == pytest.approx(alpha * temperature**2 * loss.kd_loss + (1 - alpha) * loss.ce_loss,
                                                rel=1e-5)


def test_a_short_epoch_reports_its_running_loss_from_its_first_step(digits_splits) -> None:
    train, val = digits_splits
    config = QUICK.replace(epochs=2, batch_size=128)
    steps_per_epoch = len(train[0]) // 128
    assert steps_per_epoch < LOSS_REFRESH_STEPS
    events: list[Progress] = []
    distill(None, _build(8), train, val, config, events.append, device="cpu")

    assert len(events) == 2 * (steps_per_epoch + 1)
    assert all(event.train_loss is not None and event.ce_loss == event.train_loss for event in events)


def test_plain_training_reports_the_cross_entropy_alone(digits_splits) -> None:
    events: list[Progress] = []
    result = distill(None, _build(8), *digits_splits, QUICK.replace(epochs=1), events.append, device="cpu")
    reported = [event for event in events if event.train_loss is not None]
    assert reported and all(event.kd_loss is None and event.ce_loss == event.train_loss for event in reported)
    assert set(result.history[0]) == {"epoch", "train_loss", "ce_loss", "val_accuracy"}
    assert result.history[0]["ce_loss"] == result.history[0]["train_loss"]


def test_a_checkpoint_without_the_parts_resumes_reporting_the_total_alone_until_the_epoch_ends(
        teacher, digits_splits) -> None:
    """Checkpoints written before the parts were reported hold the epoch's total loss alone."""
    straight = _build(8)
    uninterrupted = distill(teacher, straight, *digits_splits, QUICK, lambda _: None, device="cpu")
    stop_at = len(digits_splits[0][0]) // QUICK.training.batch_size + 3

    def interrupt(progress: Progress) -> None:
        if progress.step == stop_at:
            raise Interrupted

    checkpoints: list[dict] = []
    with pytest.raises(Interrupted):
        distill(teacher, _build(8), *digits_splits, QUICK, interrupt, checkpoints.append, device="cpu")
    old_layout = {key: value for key, value in checkpoints[-1].items() if key != "epoch_loss_parts_sum"}
    resumed = _build(8, seed=123)
    events: list[Progress] = []
    result = distill(teacher, resumed, *digits_splits, QUICK, events.append, resume=old_layout, device="cpu")

    _assert_same_weights(_weights(straight), _weights(resumed))
    assert [entry["train_loss"] for entry in result.history] == [entry["train_loss"] for entry in uninterrupted.history]
    assert result.history[0] == uninterrupted.history[0]  # written before the interruption, with its parts
    assert set(result.history[1]) == {"epoch", "train_loss", "val_accuracy"}
    assert result.history[2] == uninterrupted.history[2]
    assert all(event.kd_loss is None for event in events if event.epoch == 2)


def test_checkpoints_are_snapshots(teacher, digits_splits) -> None:
    checkpoints: list[dict] = []
    student = _build(8)
    distill(
        teacher, student, *digits_splits, QUICK.replace(epochs=2), lambda _: None, checkpoints.append, device="cpu")
    first, last = (checkpoint["student"]["classifier.weight"] for checkpoint in checkpoints)
    assert not torch.equal(first, last)
    assert torch.equal(last, student.state_dict()["classifier.weight"])


def test_cancel_from_the_progress_callback_stops_between_steps(digits_splits) -> None:
    seen: list[int] = []

    def cancel_at_five(progress: Progress) -> None:
        seen.append(progress.step)
        if progress.step == 5:
            raise Canceled("canceled by request")

    with pytest.raises(Canceled):
        distill(None, _build(8), *digits_splits, QUICK, cancel_at_five, device="cpu")
    assert seen == [1, 2, 3, 4, 5]


def test_a_preemption_is_not_hidden_by_a_failing_checkpoint(digits_splits) -> None:
    """The epoch's checkpoint fails in the background (a full disk, say), and so does the one written on the
    way out: the preemption still reaches the caller as itself (the job is given back, not failed as a crash)."""
    steps_per_epoch = -(-len(digits_splits[0][1]) // QUICK.training.batch_size)
    written: list[int] = []

    def disk_full(state: dict) -> None:
        written.append(state["epoch"])
        raise OSError(28, "No space left on device")

    def preempt_in_epoch_two(progress: Progress) -> None:
        if progress.step == steps_per_epoch + 3:
            raise Interrupted("SIGTERM")

    with pytest.raises(Interrupted, match="SIGTERM"):
        distill(None, _build(8), *digits_splits, QUICK, preempt_in_epoch_two, disk_full, device="cpu")
    assert len(written) == 2  # the end of epoch 1, then the attempt before stopping
