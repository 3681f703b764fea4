"""Distillation training throughput: a naive loop, the best hand-tuned loop and the engine, side by side.

One JSON line per variant and device, all timed in one process on the same data, models and step count:
- plain_fp32: the loop a person writes first: fp32, the teacher's forward pass at every step.
- best_hand: teacher logits computed once, and on CUDA bf16 autocast, channels_last, a fused optimizer and a
  compiled student, written out here by hand as the reference.
- engine: worker.engine.distill.distill with a callback doing what the runner's JobGuard does (keep the
  latest progress, check stop flags) and checkpoints written like a job's (atomic file, fsync).

CPU: small_cnn width 32 -> width 8 on the built-in digits upscaled to 32x32 (needs scikit-learn).
CUDA (when present): resnet50 -> resnet18 at 32x32, batch 256, on synthetic images, so that a GPU machine
needs no dataset. The hand loops never validate; the engine validates after each epoch, so its validation set
is one batch: the figure is the training loop's. One epoch of warm-up (compilation, cuDNN autotuning) is left
out of every figure.

Usage, from the repository root: .venv/bin/python bench/distill_throughput.py [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from core.threads import host_cpus  # noqa: E402
from worker.engine.config import ADAMW_LOOP, DistillConfig  # noqa: E402
from worker.engine.distill import distill, kd_loss  # noqa: E402
from worker.engine.errors import Canceled  # noqa: E402
from worker.engine.fileio import atomic_write  # noqa: E402
from worker.engine.models import SmallCNN  # noqa: E402
from worker.engine.training import Progress  # noqa: E402

TEMPERATURE, ALPHA, LR = 4.0, 0.9, 1e-3


@dataclass(frozen=True)
class Setup:
    device: torch.device
    teacher: Callable[[], nn.Module]
    student: Callable[[], nn.Module]
    x: torch.Tensor  # host memory, as a job loads it
    y: torch.Tensor
    batch: int
    epochs: int  # timed, after one warm-up epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch

    @property
    def timed_images(self) -> int:
        return self.epochs * self.steps_per_epoch * self.batch


def cpu_setup(epochs: int) -> Setup:
    from worker.engine import data
    from worker.engine.config import InputSpec

    spec = InputSpec(image_size=32, channels=1, mean=(0.5,), std=(0.5,))
    (x, y), _ = data.train_val_tensors(data.load_builtin("digits"), spec, val_fraction=0.2, seed=0)
    return Setup(torch.device("cpu"), lambda: SmallCNN(10, width=32, in_channels=1),
                 lambda: SmallCNN(10, width=8, in_channels=1), x, y, batch=64, epochs=epochs)


def cuda_setup(epochs: int, images: int) -> Setup:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((images, 3, 32, 32), generator=generator)
    y = torch.randint(0, 100, (images,), generator=generator)
    return Setup(torch.device("cuda"), lambda: torchvision.models.resnet50(num_classes=100),
                 lambda: torchvision.models.resnet18(num_classes=100), x, y, batch=256, epochs=epochs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(setup: Setup, run_epoch: Callable[[], None]) -> float:
    """Images per second over setup.epochs epochs, after one epoch of warm-up."""
    run_epoch()
    _synchronize(setup.device)
    start = time.perf_counter()
    for _ in range(setup.epochs):
        run_epoch()
    _synchronize(setup.device)
    return setup.timed_images / (time.perf_counter() - start)


def _batches(setup: Setup) -> torch.Tensor:
    """One epoch's shuffled full batches of indices, on the device."""
    order = torch.randperm(len(setup.x), device=setup.device)
    return order[: setup.steps_per_epoch * setup.batch].view(setup.steps_per_epoch, setup.batch)


def plain_fp32(setup: Setup) -> float:
    torch.backends.cudnn.benchmark = False  # the defaults, whatever ran before
    torch.set_float32_matmul_precision("highest")
    device = setup.device
    teacher, student = setup.teacher().to(device).eval(), setup.student().to(device)
    x, y = setup.x.to(device), setup.y.to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)

    def run_epoch() -> None:
        for batch in _batches(setup):
            inputs = x[batch]
            with torch.no_grad():
                soft_targets = teacher(inputs)
            loss = kd_loss(student(inputs), soft_targets, y[batch], TEMPERATURE, ALPHA).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return _timed(setup, run_epoch)


def best_hand(setup: Setup) -> float:
    device = setup.device
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    layout = torch.channels_last if on_cuda else torch.contiguous_format
    teacher = setup.teacher().to(device, memory_format=layout).eval()
    student = setup.student().to(device, memory_format=layout)
    x, y = setup.x.to(device, memory_format=layout), setup.y.to(device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=on_cuda):
        logits = torch.cat([teacher(chunk) for chunk in x.split(setup.batch)])
    forward = torch.compile(student) if on_cuda else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, fused=on_cuda or None)

    def run_epoch() -> None:
        for batch in _batches(setup):
            with torch.autocast(device.type, torch.bfloat16, enabled=on_cuda):
                student_logits = forward(x[batch]).float()
            loss = kd_loss(student_logits, logits[batch].float(), y[batch], TEMPERATURE, ALPHA).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return _timed(setup, run_epoch)


class JobLikeGuard:
    """The runner's JobGuard without the database: keeps the latest progress as a dict, checks a stop flag, writes
    each checkpoint atomically. Also notes when each epoch ends, to leave out the warm-up epoch."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.latest: dict[str, Any] = {}
        self.cancel = threading.Event()
        self.epoch_ends: list[float] = []

    def on_progress(self, progress: Progress) -> None:
        self.latest = asdict(progress)
        if self.cancel.is_set():
            raise Canceled("canceled by request")
        if progress.val_accuracy is not None:
            self.epoch_ends.append(time.perf_counter())

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint, lambda handle: torch.save(state, handle))


def engine(setup: Setup) -> float:
    # The loop the hand-written ones are: AdamW, teacher logits computed once (no augmentation).
    config = DistillConfig(epochs=setup.epochs + 1, batch_size=setup.batch, lr=LR, temperature=TEMPERATURE,
                           alpha=ALPHA, **ADAMW_LOOP)
    val = (setup.x[: setup.batch], setup.y[: setup.batch])
    with tempfile.TemporaryDirectory() as folder:
        guard = JobLikeGuard(Path(folder) / "checkpoint.pt")
        distill(setup.teacher(), setup.student(), (setup.x, setup.y), val, config, guard.on_progress,
                guard.on_checkpoint, device=setup.device.type)
    # Each epoch end comes after the epoch's loss is read back: the device has finished it.
    return setup.timed_images / (guard.epoch_ends[-1] - guard.epoch_ends[0])


VARIANTS: dict[str, Callable[[Setup], float]] = {"plain_fp32": plain_fp32, "best_hand": best_hand, "engine": engine}


def measure(setup: Setup, repeats: int) -> list[dict[str, Any]]:
    """Median images per second of each variant; the variants take turns, so that load drifts hit all alike."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, variant in VARIANTS.items():
            _fresh_start(setup.device)
            samples[name].append(variant(setup))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return [
        {"variant": name, "device": _device_name(setup.device), "img_per_s": round(medians[name], 1),
         "ratio_vs_plain": round(medians[name] / medians["plain_fp32"], 3),
         "ratio_vs_best_hand": round(medians[name] / medians["best_hand"], 3),
         "runs": [round(value, 1) for value in samples[name]], "batch": setup.batch,
         "steps": setup.epochs * setup.steps_per_epoch, "torch": torch.__version__,
         "threads": torch.get_num_threads()}
        for name in VARIANTS
    ]


def _fresh_start(device: torch.device) -> None:
    """Each variant compiles, allocates and seeds as if it ran alone."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: the CPU, then CUDA when present")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant; the median is reported")
    parser.add_argument("--cpu-epochs", type=int, default=4, help="timed epochs of digits (22 steps each)")
    parser.add_argument("--cuda-epochs", type=int, default=5, help="timed epochs on CUDA")
    parser.add_argument("--cuda-images", type=int, default=50_000, help="synthetic 32x32 images on CUDA")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every variant (default: PyTorch's, capped to the CPUs this process has)")
    parser.add_argument("--check", action="store_true", help="exit 2 when the engine misses issue 7's targets")
    args = parser.parse_args()
    # Never more threads than the CPUs this process may use (its container's quota included), as in a worker.
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), host_cpus()))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    setups = []
    if args.device in ("cpu", "all"):
        setups.append(cpu_setup(args.cpu_epochs))
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        setups.append(cuda_setup(args.cuda_epochs, args.cuda_images))
    missed = []
    for setup in setups:
        for line in measure(setup, args.repeats):
            print(json.dumps(line), flush=True)
            if line["variant"] == "engine":
                missed += _missed_targets(line, setup.device)
    if args.check and missed:
        print("missed targets: " + "; ".join(missed), file=sys.stderr)
        return 2
    return 0


def _missed_targets(engine_line: dict[str, Any], device: torch.device) -> list[str]:
    """Issue 7's targets for the engine: vs the naive loop on both devices, vs the hand-tuned one on CUDA."""
    targets = {"ratio_vs_plain": 1.8, "ratio_vs_best_hand": 0.95} if device.type == "cuda" else {"ratio_vs_plain": 0.95}
    return [f"{device.type} {key} {engine_line[key]} < {floor}" for key, floor in targets.items()
            if engine_line[key] < floor]


if __name__ == "__main__":
    sys.exit(main())
