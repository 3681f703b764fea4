"""The quantization job: model + dataset -> int8 TorchScript, ONNX and .pt2, measured as they will run.

QAT fine-tunes with the float model as the distillation teacher and checkpoints like any training, so a
retried attempt prepares the same fake-quantized graph and resumes from the checkpoint.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.jobspec import QuantizeJobSpec
from worker.engine import evaluate, export, onnxio, quantize
from worker.engine.config import ArchSpec, QuantizeConfig
from worker.engine.distill import distill
from worker.jobs import inputs, measure
from worker.jobs.base import Checkpoints, Guard, JobContext, JobOutcome, OutputFile, OutputModel, job_kind

TORCHSCRIPT_FILE = "quantized" + measure.SUFFIXES[measure.TORCHSCRIPT]
ONNX_FILE = "quantized" + measure.SUFFIXES[measure.ONNX]
PT2_FILE = "quantized" + measure.SUFFIXES[measure.PT2]
INFO_FILE = "quantized.json"
INT8_FORMATS = (measure.TORCHSCRIPT, measure.ONNX, measure.PT2)
# A quantization that shrinks every file by less than this share has left the model as it was.
UNCHANGED_SIZE_SHARE = 0.05
PT2_EAGER = ("quantized.pt2 (torchao PT2E) was measured as torch.export.load(...).module() runs it: quantize / "
             "dequantize operators around float kernels, which is slower than the float model; torch.compile "
             "(with a C++ compiler) or AOTInductor turns it into int8 kernels on x86")
QNNPACK_ON_X86 = ("backend 'qnnpack' targets ARM CPUs; its TorchScript latency here was measured with QNNPACK's "
                  "kernels on x86, which says little about ARM: measure on the target device")


@job_kind("quantize")
def run_quantize(ctx: JobContext[QuantizeJobSpec], guard: Guard, checkpoints: Checkpoints) -> JobOutcome:
    guard.stage("loading")
    config = ctx.spec.quantize
    loaded = inputs.load(ctx)
    arch, model, train, val = loaded.arch, loaded.model, loaded.train, loaded.val
    # Dynamic quantization calibrates nothing, but the exports trace the model on an example: one training image
    # (an empty batch made every dynamic job fail at export).
    calibration = inputs.calibration_subset(train, config.calibration_samples or 1, ctx.spec.seed)[0]

    history: list[dict[str, float]] = []
    if config.qat is not None:
        guard.stage("training")
        prepared = quantize.prepare_qat(model, config.backend, calibration[:1])
        # Fake quantization trains eagerly (QuantizeConfig refuses compile 'on'): compiling observers is untested.
        training = config.qat.replace(compile="off")
        # The prepared graph's BatchNorm is folded into fake-quantized convolutions: nothing to recalibrate.
        history = distill(model, prepared, train, val, training, on_progress=guard.on_progress,
                          on_checkpoint=guard.on_checkpoint, resume=checkpoints.load(), seed=ctx.spec.seed,
                          device=ctx.spec.device, recalibrate_batchnorm=False).history
        guard.stage("converting")
        int8 = quantize.convert_qat(prepared, config.backend)
        float_source = quantize.trained_float_model(prepared, model)
    else:
        guard.stage("quantizing")
        int8 = (quantize.quantize_static(model, config.backend, calibration) if config.method == "static"
                else quantize.quantize_dynamic_linear(model))
        float_source = model

    guard.stage("exporting")
    files = _export(int8, float_source, config, arch, calibration, ctx.work_dir)

    # The input model in each format, the int8 files, then their latencies.
    guard.stage("evaluating", steps=2 * len(INT8_FORMATS) + 1)
    metrics = _measure(ctx, model, int8, config, files, loaded.evaluation, guard.step)
    details = {"method": config.method, "backend": config.backend, **quantize.layer_report(int8),
               "calibration_samples": 0 if config.method == "dynamic" else len(calibration)}
    notes = [*_unchanged_size_notes(config, metrics), PT2_EAGER,
             *([QNNPACK_ON_X86] if config.backend == "qnnpack" and _on_x86() else [])]
    metrics.update(quantization=details, history=history, notes=notes, evaluation=loaded.evaluation_source,
                   work=_work(ctx.spec, details["calibration_samples"], loaded.evaluation_source),
                   gpu=quantize.torchao_gpu_variants(model, val[0], ctx.spec.device))
    # ONNX Runtime first: the maintained int8 runtime whose file runs anywhere (TorchScript is deprecated upstream).
    result_model = OutputModel(file_kinds=("quantized_onnx", "quantized_torchscript", "quantized_pt2"),
                               arch=ctx.teacher.arch, input_spec=ctx.teacher.input_spec, num_classes=arch.num_classes,
                               param_count=metrics["input"]["params"], precision="int8", label="int8")
    return JobOutcome(files=files, metrics=metrics, model=result_model)


def _export(int8: nn.Module, float_source: nn.Module, config: QuantizeConfig, arch: ArchSpec,
            calibration: torch.Tensor, folder: Path) -> list[OutputFile]:
    """int8 TorchScript from the engine's model; int8 ONNX by ONNX Runtime and an int8 .pt2 by torchao's PT2E,
    both from the same float weights and calibration images; a JSON document saying how to run each."""
    folder.mkdir(parents=True, exist_ok=True)
    example = calibration[:1]
    with quantize.quantized_engine(config.backend):
        quantize.export_quantized_torchscript(int8, example, folder / TORCHSCRIPT_FILE)
    float_onnx = folder / "float-source.onnx"
    onnxio.export_onnx(float_source, example, float_onnx)
    if config.method == "dynamic":
        quantize.quantize_onnx_dynamic(float_onnx, folder / ONNX_FILE)
    else:
        quantize.quantize_onnx_static(float_onnx, folder / ONNX_FILE, calibration)
    float_onnx.unlink()
    export.save_program(quantize.quantize_pt2e(float_source, calibration, dynamic=config.method == "dynamic"),
                        folder / PT2_FILE)
    runtimes = _runtimes(config)
    export.save_json(_info_document(config, arch, runtimes), folder / INFO_FILE)
    return [
        OutputFile("quantized_torchscript", folder / TORCHSCRIPT_FILE, TORCHSCRIPT_FILE, "application/octet-stream",
                   runtimes[measure.TORCHSCRIPT], measure.TORCHSCRIPT),
        OutputFile("quantized_onnx", folder / ONNX_FILE, ONNX_FILE, "application/octet-stream",
                   runtimes[measure.ONNX], measure.ONNX),
        OutputFile("quantized_pt2", folder / PT2_FILE, PT2_FILE, "application/octet-stream", runtimes[measure.PT2],
                   measure.PT2),
        OutputFile("quantized_info", folder / INFO_FILE, INFO_FILE, "application/json", "spec"),
    ]


def _runtimes(config: QuantizeConfig) -> dict[str, str]:
    onnx_detail = "dynamic int8" if config.method == "dynamic" else "QDQ int8"
    return {measure.TORCHSCRIPT: measure.runtime_of(measure.TORCHSCRIPT, f"{quantize.KERNELS[config.backend]} int8"),
            measure.ONNX: measure.runtime_of(measure.ONNX, onnx_detail),
            measure.PT2: measure.runtime_of(measure.PT2, f"PT2E {onnx_detail}, eager")}


def _info_document(config: QuantizeConfig, arch: ArchSpec, runtimes: dict[str, str]) -> dict[str, Any]:
    """The input spec (preprocessing) and, per file, its runtime and the lines that run it."""
    document = export.arch_spec_document(arch)
    dynamic = config.method == "dynamic"
    document["quantization"] = {
        "method": config.method, "backend": config.backend,
        "weights": "int8, per output channel" + (" (Linear layers only)" if dynamic else ""),
        "activations": "quantized at run time per batch" if dynamic else "uint8, per tensor, calibrated",
    }
    spec = arch.input
    document["how_to_load"] = {
        TORCHSCRIPT_FILE: {"runtime": runtimes[measure.TORCHSCRIPT],
                           "code": f"torch.backends.quantized.engine = '{config.backend}'; "
                                   f"model = torch.jit.load('{TORCHSCRIPT_FILE}'); logits = model(x)"},
        ONNX_FILE: {"runtime": runtimes[measure.ONNX],
                    "code": f"session = onnxruntime.InferenceSession('{ONNX_FILE}', providers=['CPUExecutionProvider'])"
                            f"; logits = session.run(None, {{'{onnxio.INPUT_NAME}': x.numpy()}})[0]"},
        PT2_FILE: {"runtime": runtimes[measure.PT2],
                   "code": "import torch.ao.quantization.fx._decomposed  # registers the quantize / dequantize "
                           f"operators; model = torch.export.load('{PT2_FILE}').module(); logits = model(x); "
                           "for int8 kernels (x86, needs a C++ compiler): model = torch.compile(model)"},
        "input": f"x: float32 N x {spec.channels} x {spec.image_size} x {spec.image_size} (resize policy "
                 f"'{spec.resize}'), pixel values / 255, then (x - mean) / std with the input's mean and std",
    }
    return document


def _measure(ctx: JobContext[QuantizeJobSpec], model: nn.Module, int8: nn.Module, config: QuantizeConfig,
             files: list[OutputFile], evaluation: inputs.TensorPair, on_step: Callable[[], None]) -> dict[str, Any]:
    """The int8 files against the input model exported to the same formats; parameters and MACs are the
    float model's (quantization changes their width, not their number)."""
    paths = {output.kind: output.path for output in files}
    runtimes = {output.kind: output.runtime for output in files}
    held_out = measure.HeldOut.of(model, evaluation)
    input_summary = {**measure.float_model_summary(model, held_out), "file_bytes": ctx.teacher.bytes}
    baseline = ctx.work_dir / "baseline"
    input_artifacts = measure.input_baseline(model, held_out, baseline, on_step=on_step)
    output_paths = {fmt: paths[f"quantized_{fmt}"] for fmt in INT8_FORMATS}
    # The int8 TorchScript runs (and is timed) with the backend's kernels.
    with quantize.quantized_engine(config.backend):
        engine_predictions = evaluate.predict(int8, held_out.x)
        output_artifacts = {fmt: measure.measure_artifact(path, runtimes[f"quantized_{fmt}"], held_out,
                                                          engine_predictions, on_step)
                            for fmt, path in output_paths.items()}
        output_summary = {**held_out.scores(engine_predictions), "params": input_summary["params"],
                          "macs": input_summary["macs"]}
        return measure.compression_metrics(input_summary, output_summary, input_artifacts, output_artifacts,
                                           held_out, float_source="input", max_drop_pts=ctx.spec.max_accuracy_drop_pts,
                                           paths={"input": measure.baseline_paths(baseline), "output": output_paths},
                                           on_step=on_step)


def _unchanged_size_notes(config: QuantizeConfig, metrics: dict[str, Any]) -> list[str]:
    """Dynamic quantization converts only Linear layers: on a CNN, whose weights are mostly convolutions, the
    files barely shrink, which users mistake for a quantized model."""
    changes = {fmt: 1 - 1 / ratio["file_bytes"] for fmt, ratio in metrics["ratios"].items()
               if isinstance(ratio, dict) and "file_bytes" in ratio}
    if config.method != "dynamic" or not changes or max(changes.values()) >= UNCHANGED_SIZE_SHARE:
        return []
    sizes = ", ".join(f"{fmt} {change:.1%}" for fmt, change in changes.items())
    return [f"ALMOST UNCHANGED: dynamic quantization converts only Linear layers, and this model's weights are mostly "
            f"elsewhere (convolutions): the files shrank by {sizes} and run as before; use method 'static' (or 'qat') "
            "to quantize the convolutions too"]


def _on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _work(spec: QuantizeJobSpec, calibration_samples: int, evaluation_source: dict[str, Any]) -> dict[str, list[str]]:
    config = spec.quantize
    if config.method == "dynamic":
        done = [f"dynamic int8 quantization of the Linear layers ({config.backend} kernels)"]
        not_done = ["convolutions left in float32: dynamic quantization converts Linear layers only"]
    else:
        done = [f"{config.method} int8 quantization ({config.backend} kernels), calibrated on {calibration_samples} "
                "training images"]
        not_done = []
    if config.qat is not None:
        done.append(f"quantization-aware fine-tuning for {config.qat.training.epochs} epochs, distilled from the float "
                    "model")
    elif config.method != "dynamic":
        not_done.append("no quantization-aware fine-tuning (method 'qat' recovers accuracy the rounding costs)")
    not_done.append("no pruning: parameter count and MACs are the input model's")
    return measure.work_of(done, not_done, measure.common_work(spec, evaluation_source, "input model"))
