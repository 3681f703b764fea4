"""The pruning job: model + dataset -> pruned model, fine-tuned from the unpruned one, measured and exported.

Pruning is deterministic (fixed calibration batch, eval-mode ranking), so a retried attempt re-prunes to
the same structure and then resumes fine-tuning from the checkpoint of the attempt before.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from core.jobspec import PruneJobSpec
from worker.engine import evaluate, export, models, prune
from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import ArchSpec, PruneConfig
from worker.engine.distill import distill
from worker.jobs import inputs, measure
from worker.jobs.base import Checkpoints, Guard, JobContext, JobOutcome, OutputFile, OutputModel, job_kind

RECALIBRATION_BATCH = 64  # without fine-tuning there is no training batch size; any moderate batch estimates alike
DENSE_NOTE = ("unstructured pruning only zeroes weights: shapes, file size and dense latency are those of the "
              "input model; the zeros pay off only with a sparse runtime or compression")


@job_kind("prune")
def run_prune(ctx: JobContext[PruneJobSpec], guard: Guard, checkpoints: Checkpoints) -> JobOutcome:
    guard.stage("loading")
    config = ctx.spec.prune
    loaded = inputs.load(ctx)
    arch, model, train, val = loaded.arch, loaded.model, loaded.train, loaded.val

    guard.stage("pruning")
    pruned, details = _pruned(model, config, train, arch, ctx.spec.seed)
    history: list[dict[str, float]] = []
    if config.recovery is not None:
        guard.stage("fine-tuning")
        result = distill(model, pruned, train, val, config.recovery, on_progress=guard.on_progress,
                         on_checkpoint=guard.on_checkpoint, resume=checkpoints.load(), seed=ctx.spec.seed,
                         device=ctx.spec.device)
        history, batchnorm_report = result.history, result.batchnorm
    else:
        # Removed channels change what every later BatchNorm sees: its statistics are re-estimated even untrained.
        batchnorm_report = recalibrate_batchnorm_(pruned, train[0], val, seed=ctx.spec.seed,
                                                  batch_size=RECALIBRATION_BATCH)
    if config.method == "unstructured":
        prune.make_permanent_(pruned)
        details["sparsity"] = prune.weight_sparsity(pruned, config.keep_layers, arch.num_classes)

    guard.stage("exporting", steps=len(measure.EXPORTERS))
    # The input's own record (if it was pruned before) with this pruning's changes: the output's full spec.
    output_arch = prune.pruned_arch(arch, details["pruned_shapes"])
    details["pruned_shapes"] = output_arch.pruned_shapes or {}
    files = _export(pruned, export.arch_spec_document(output_arch, with_pruned_shapes=True), val[0][:1],
                    ctx.work_dir, guard.step)

    # The input model in each format, the pruned files, then their latencies.
    guard.stage("evaluating", steps=2 * len(measure.EXPORTERS) + 1)
    metrics = _measure(ctx, model, files, loaded.evaluation, guard.step)
    notes = [*measure.batchnorm_notes(batchnorm_report), *([DENSE_NOTE] if config.method == "unstructured" else [])]
    result_model = OutputModel(file_kinds=("pruned_safetensors",), arch=output_arch.stored_arch(),
                               input_spec=arch.input.model_dump(mode="json"), num_classes=arch.num_classes,
                               param_count=metrics["output"]["params"], label="pruned")
    return JobOutcome(files=files, metrics={**metrics, "pruning": details, "history": history, "notes": notes,
                                            "evaluation": loaded.evaluation_source, "batchnorm": batchnorm_report,
                                            "work": _work(ctx.spec, details, batchnorm_report,
                                                          loaded.evaluation_source)},
                      model=result_model)


def _pruned(model: nn.Module, config: PruneConfig, train: inputs.TensorPair, arch: ArchSpec, seed: int) -> (
        tuple[nn.Module, dict[str, Any]]):
    """A pruned copy of `model`, and what was done to it."""
    pruned = copy.deepcopy(model)
    if config.method == "unstructured":
        assert config.sparsity is not None  # the config validates it
        prune.prune_unstructured_(pruned, config.sparsity, config.keep_layers, arch.num_classes)
        return pruned, {"method": "unstructured", "requested_sparsity": config.sparsity, "pruned_shapes": {}}
    calibration = inputs.calibration_subset(train, config.calibration_samples, seed)
    result = prune.prune_structured_(pruned, config, calibration, arch.num_classes)
    # Recorded (and checked to rebuild) before fine-tuning, so an unloadable result fails fast.
    shapes = prune.pruned_shapes(pruned, model)
    return pruned, {"method": "structured", "importance": config.importance, "channel_ratio": result.channel_ratio,
                    "macs_before": result.macs_before, "macs_after": result.macs_after, "pruned_shapes": shapes}


_FILES = {  # kind: (file name, media type)
    "pruned_safetensors": ("pruned.safetensors", "application/octet-stream"),
    "pruned_arch_spec": ("pruned.arch.json", "application/json"),
    "pruned_torchscript": ("pruned" + measure.SUFFIXES[measure.TORCHSCRIPT], "application/octet-stream"),
    "pruned_onnx": ("pruned" + measure.SUFFIXES[measure.ONNX], "application/octet-stream"),
    "pruned_pt2": ("pruned" + measure.SUFFIXES[measure.PT2], "application/octet-stream"),
}

_FORMATS = {"pruned_safetensors": measure.SAFETENSORS, **{f"pruned_{fmt}": fmt for fmt in measure.EXPORTERS}}


def _export(pruned: nn.Module, arch_document: dict[str, Any], example: Any, folder: Path,
            on_step: Callable[[], None]) -> list[OutputFile]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / filename for kind, (filename, _) in _FILES.items()}
    export.save_safetensors(pruned, paths["pruned_safetensors"])
    export.save_json(arch_document, paths["pruned_arch_spec"])
    runtimes = {"pruned_safetensors": "safetensors (+ pruned.arch.json)", "pruned_arch_spec": "spec"}
    for fmt, exporter in measure.EXPORTERS.items():
        exporter(pruned, example, paths[f"pruned_{fmt}"])
        runtimes[f"pruned_{fmt}"] = measure.runtime_of(fmt)
        on_step()
    return [OutputFile(kind, paths[kind], filename, media_type, runtimes[kind], _FORMATS.get(kind))
            for kind, (filename, media_type) in _FILES.items()]


def _measure(ctx: JobContext[PruneJobSpec], model: nn.Module, files: list[OutputFile],
             evaluation: inputs.TensorPair, on_step: Callable[[], None]) -> dict[str, Any]:
    """The engine model is the one rebuilt from the downloaded weights and arch spec (read as an upload reads
    it), so the measurement also proves that those two files load; TorchScript, ONNX and the .pt2 are compared
    with it."""
    paths = {output.kind: output.path for output in files}
    runtimes = {output.kind: output.runtime for output in files}
    held_out = measure.HeldOut.of(model, evaluation)
    output_arch = ArchSpec.from_document(json.loads(paths["pruned_arch_spec"].read_text()))
    engine_model = models.load_model(paths["pruned_safetensors"], "safetensors", output_arch).eval()
    engine_predictions = evaluate.predict(engine_model, held_out.x)
    output_artifacts = {fmt: measure.measure_artifact(paths[f"pruned_{fmt}"], runtimes[f"pruned_{fmt}"], held_out,
                                                      engine_predictions, on_step)
                        for fmt in measure.EXPORTERS}
    return measure.compression_metrics(
        input_summary={**measure.float_model_summary(model, held_out), "file_bytes": ctx.teacher.bytes},
        output_summary={**measure.float_model_summary(engine_model, held_out),
                        "file_bytes": paths["pruned_safetensors"].stat().st_size},
        input_artifacts=measure.input_baseline(model, held_out, ctx.work_dir / "baseline", on_step=on_step),
        output_artifacts=output_artifacts, held_out=held_out, float_source="output",
        max_drop_pts=ctx.spec.max_accuracy_drop_pts,
        paths={"input": measure.baseline_paths(ctx.work_dir / "baseline"),
               "output": {fmt: paths[f"pruned_{fmt}"] for fmt in measure.EXPORTERS}},
        on_step=on_step,
    )


def _work(spec: PruneJobSpec, details: dict[str, Any], batchnorm: dict[str, Any] | None,
          evaluation_source: dict[str, Any]) -> dict[str, list[str]]:
    config = spec.prune
    if config.method == "structured":
        done = [f"structured pruning ({config.importance} importance) to channel ratio {details['channel_ratio']:g}: "
                f"{details['macs_before']:,} -> {details['macs_after']:,} MACs per image"]
        not_done = []
    else:
        done = [f"unstructured pruning: {config.sparsity:.0%} of the weights set to zero"]
        not_done = ["no weights removed: shapes, file size and dense latency are the input model's"]
    if config.recovery is not None:
        done.append(f"recovery fine-tuning for {config.recovery.training.epochs} epochs, distilled from the unpruned "
                    "model")
    else:
        not_done.append("no recovery fine-tuning (epochs 0)")
    not_done.append("no quantization: float32 weights (a quantize job can take the pruned model)")
    return measure.work_of([*done, *measure.batchnorm_work(batchnorm)], not_done,
                           measure.common_work(spec, evaluation_source, "input model"))
