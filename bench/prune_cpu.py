"""Structured pruning of resnet18 at channel ratio 0.5 on CPU, recovered by distillation from the unpruned model.

Prints one JSON line. macs_reduction: MACs before / after; latency_speedup: TorchScript files before /
after at batch 1, 224 px (target >= 2.0); accuracy_drop_pts: unpruned minus pruned top-1 on the held-out
digits after recovery fine-tuning, in points (target <= 1.0).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from common import (
    LATENCY_SHAPE,
    accuracy_pts,
    environment,
    interleaved_latency_ms,
    print_result,
    trained_resnet18,
)

from worker.engine import export, models, prune
from worker.engine.config import ADAMW_LOOP, DistillConfig, PruneConfig
from worker.engine.distill import distill
from worker.engine.macs import count_macs
from worker.jobs.inputs import calibration_subset

CHANNEL_RATIO, SEED = 0.5, 0
# What a prune job does by default, with more recovery epochs: the pruned model starts near chance level.
PRUNING = PruneConfig(channel_ratio=CHANNEL_RATIO, importance="magnitude", calibration_samples=128)
# A prune job's recovery loop (AdamW, cosine, no augmentation, alpha 0.9), with more epochs; distill() takes the seed.
RECOVERY = DistillConfig(epochs=8, batch_size=64, lr=3e-3, temperature=4.0, **{**ADAMW_LOOP, "alpha": 0.9})


def main() -> None:
    model, train, val = trained_resnet18()
    pruned = copy.deepcopy(model)
    result = prune.prune_structured_(pruned, PRUNING, calibration_subset(train, PRUNING.calibration_samples, SEED),
                                     num_classes=10)
    accuracy_before_recovery = accuracy_pts(pruned, val)
    history = distill(model, pruned, train, val, RECOVERY, lambda _: None, seed=SEED).history

    folder = Path(tempfile.mkdtemp(prefix="bench-prune-"))
    example = val[0][:1]
    export.export_torchscript(model, example, folder / "input.torchscript.pt")
    export.export_torchscript(pruned, example, folder / "pruned.torchscript.pt")
    latency = interleaved_latency_ms({"input": export.load_torchscript(folder / "input.torchscript.pt"),
                                      "pruned": export.load_torchscript(folder / "pruned.torchscript.pt")})
    input_accuracy, pruned_accuracy = accuracy_pts(model, val), accuracy_pts(pruned, val)
    print_result({
        "benchmark": "prune_cpu",
        "macs_reduction": count_macs(model, LATENCY_SHAPE) / count_macs(pruned, LATENCY_SHAPE),
        "latency_speedup": latency["input"] / latency["pruned"],
        "accuracy_drop_pts": input_accuracy - pruned_accuracy,
        "input_ms": latency["input"], "pruned_ms": latency["pruned"],
        "params_reduction": models.param_count(model) / models.param_count(pruned),
        "macs_reduction_at_32px": result.macs_before / result.macs_after,
        "input_accuracy_pts": input_accuracy, "pruned_accuracy_pts": pruned_accuracy,
        "accuracy_before_recovery_pts": accuracy_before_recovery, "recovery_epochs": len(history),
        "channel_ratio": CHANNEL_RATIO, "validation_samples": len(val[1]), **environment(),
    })


if __name__ == "__main__":
    main()
