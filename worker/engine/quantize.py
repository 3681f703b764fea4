"""int8 quantization whose output runs on int8 kernels (the .pt2 once compiled; see below).

PyTorch artifacts come from two flows. The FX flow (torch.ao.quantization, deprecated upstream) converts to
modules that call the fbgemm / oneDNN (x86) or QNNPACK (ARM) int8 kernels and trace to TorchScript that
plain torch runs. The PT2E flow (torchao) gives an ExportedProgram (.pt2) on torch's maintained path: int8
weights between quantize / dequantize operators, which run in float as loaded and reach int8 kernels only
once compiled (torch.compile or AOTInductor); so both are published. ONNX artifacts are quantized by ONNX
Runtime's own tools (QDQ format), which ONNX Runtime fuses into int8 kernels.

BatchNorm is folded into the convolutions first, so static and QAT models share one float graph whose
weights map one to one onto the QAT model's (see trained_float_model).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.fx.experimental.optimization import fuse

from worker.engine import evaluate
from worker.engine.errors import EngineError, SpecError
from worker.engine.export import export_torchscript, exported_program
from worker.engine.fileio import atomic_write
from worker.engine.models import refuse_multi_head_model
from worker.engine.onnxio import INPUT_NAME

_DEPRECATED = r"torch\.ao\.quantization is deprecated"
with warnings.catch_warnings():
    # Deprecated in favour of torchao's PT2E flow, which is not yet a replacement for CPU artifacts (above).
    warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import (
        HistogramObserver,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        default_fused_per_channel_wt_fake_quant,
        default_per_channel_weight_observer,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

# What the artifact's runtime needs to be told: the kernels the int8 weights were packed for.
KERNELS = {"x86": "x86 fbgemm", "qnnpack": "qnnpack"}
CALIBRATION_BATCH = 64
_FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
# Without VNNI (AVX2), x86 int8 kernels add pairs of u8 x s8 products into a saturating int16. PyTorch's x86
# default avoids that with 7-bit activations, which took efficientnet_b0 (SiLU outputs requantized per tensor)
# from 0.92 to 0.74 accuracy on digits; 7-bit weights avoid it as well (255 * 64 * 2 < 2**15) and kept 0.89, as
# in quantize_onnx_static. Under qemu as a Haswell (AVX2) its logits strayed from the float ones as far as on this
# VNNI host (0.054 vs 0.052 of their std), where 8-bit weights strayed 2.4x further (0.135 vs 0.057).
# tests/engine/test_quantize_archs.py measures it per architecture. (QAT keeps PyTorch's x86 default: not measured
# on these architectures yet.)
_X86_STATIC = QConfig(
    activation=HistogramObserver.with_args(reduce_range=False),
    weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                              quant_min=-64, quant_max=63))


@contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Quantized kernels come from torch.backends.quantized.engine when a model is converted or loaded."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """An FX graph of `model` in eval mode with each BatchNorm folded into the convolution before it."""
    model = copy.deepcopy(model).eval()
    try:
        # In place on our copy, so that a tracing error's frames point at modules of `model` (named below).
        return fuse(model, inplace=True)
    # Tracing fails on Python control flow that depends on tensor values, raising one of these.
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as exc:
        raise SpecError(f"the model cannot be traced for quantization (FX symbolic tracing) at "
                        f"{_layer_in_traceback(exc, model)}: {exc}") from exc


def _layer_in_traceback(exc: BaseException, model: nn.Module) -> str:
    """The innermost layer of `model` whose forward() was running when `exc` was raised."""
    names = {id(module): name for name, module in model.named_modules()}
    where = "the model's forward()"
    frame = exc.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        if id(owner) in names:
            layer = names[id(owner)] or "(the top-level module)"
            where = f"layer '{layer}' ({type(owner).__name__}.forward, line {frame.tb_lineno})"
        frame = frame.tb_next
    return where


def qconfig_mapping(backend: str, qat: bool) -> QConfigMapping:
    """int8 activations, per-channel int8 weights, for the backend's kernels."""
    if backend == "x86":
        return get_default_qat_qconfig_mapping("x86") if qat else get_default_qconfig_mapping("x86").set_global(
            _X86_STATIC)
    # QNNPACK's defaults quantize weights per tensor; per channel keeps depthwise convolutions accurate.
    mapping = get_default_qat_qconfig_mapping("qnnpack") if qat else get_default_qconfig_mapping("qnnpack")
    weight = default_fused_per_channel_wt_fake_quant if qat else default_per_channel_weight_observer
    return mapping.set_global(QConfig(activation=mapping.global_qconfig.activation, weight=weight))


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """A copy whose Linear layers hold int8 weights; activations are quantized on the fly."""
    refuse_multi_head_model(model, "cannot quantize")
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)][:3]
        raise SpecError(f"dynamic quantization applies to Linear layers and this model has none (its compute is in "
                        f"convolutions such as {', '.join(convolutions)}); use method 'static' or 'qat'")
    with _fx_flow():
        return torch_quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_static(model: nn.Module, backend: str, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """Post-training static int8: weights per channel, activation ranges observed on `calibration`."""
    refuse_multi_head_model(model, "cannot quantize")
    with quantized_engine(backend), _fx_flow():
        prepared = prepare_fx(fold_batchnorm(model), qconfig_mapping(backend, qat=False), (calibration[:1],))
        with torch.inference_mode():
            for start in range(0, len(calibration), CALIBRATION_BATCH):
                prepared(calibration[start : start + CALIBRATION_BATCH])
        return _converted(prepared)


class Float32Only(nn.Module):
    """Runs the wrapped model in float32 even under autocast: fake quantization has no bfloat16 kernels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


def prepare_qat(model: nn.Module, backend: str, example_input: torch.Tensor) -> Float32Only:
    """A trainable copy of `model` with fake quantization of weights and activations, for distill()."""
    refuse_multi_head_model(model, "cannot quantize")
    with quantized_engine(backend), _fx_flow():
        prepared = prepare_qat_fx(fold_batchnorm(model).train(), qconfig_mapping(backend, qat=True),
                                  (example_input.cpu(),))
    return Float32Only(prepared)


def convert_qat(prepared: Float32Only, backend: str) -> torch.fx.GraphModule:
    """The int8 model that the trained QAT model simulates."""
    with quantized_engine(backend), _fx_flow():
        return _converted(copy.deepcopy(prepared.inner).cpu().eval())


def trained_float_model(prepared: Float32Only, model: nn.Module) -> torch.fx.GraphModule:
    """The BatchNorm-folded float graph of `model`, holding the QAT-trained weights (for ONNX quantization)."""
    folded = fold_batchnorm(model)
    trained = prepared.inner.state_dict()
    folded.load_state_dict({name: trained[name].cpu() for name in folded.state_dict()})
    return folded


def _converted(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    quantized = convert_fx(prepared)
    report = layer_report(quantized)
    if not report["int8_layers"]:
        raise SpecError(f"no layer could be quantized statically (the backend has no int8 kernel for them); "
                        f"float layers: {', '.join(report['float_layers'][:8])}")
    return quantized


def layer_report(quantized: nn.Module) -> dict[str, list[str]]:
    """Which convolution / linear layers run in int8, and which stayed float (an operator int8 lacks)."""
    return {
        "int8_layers": [name for name, module in quantized.named_modules() if _is_quantized_layer(module)],
        "float_layers": [name for name, module in quantized.named_modules() if type(module) in _FLOAT_LAYERS],
    }


def _is_quantized_layer(module: nn.Module) -> bool:
    # Fused int8 modules (ConvReLU2d, LinearReLU) and dynamic Linear subclass these.
    return isinstance(module, nnq.Conv2d | nnq.Linear | nnqd.Linear)


def export_quantized_torchscript(quantized: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """TorchScript of an int8 model. The tracer warns that scales are read as Python floats: they are
    constants of the converted model, so the trace is exact (export checks it reproduces the outputs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        export_torchscript(quantized, example_input, path)


@contextmanager
def _fx_flow() -> Iterator[None]:
    """Every call into torch.ao.quantization warns that it is deprecated (see the module docstring for why we
    still use it), and the default qconfigs pass reduce_range (the x86 kernels need it), which warns per
    observer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        yield


# --- PT2E (torchao): int8 ExportedPrograms ---------------------------------------------------------


def quantize_pt2e(model: nn.Module, calibration: torch.Tensor, dynamic: bool = False) -> (
        torch.export.ExportedProgram):
    """An int8 ExportedProgram by torchao's PT2E flow for x86 (X86InductorQuantizer): weights int8 per channel,
    activations uint8 per tensor calibrated on `calibration`, or with `dynamic` only the Linear layers with
    activations quantized at run time.

    The program stores int8 weights between quantize / dequantize operators: run as loaded it computes in
    float (numerically the int8 model); torch.compile or AOTInductor fuses the pairs into int8 kernels.
    """
    # Imported here: importing torchao logs a warning about its internals, and only quantization needs it.
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=dynamic)
    quantizer = (x86.X86InductorQuantizer().set_module_type_qconfig(nn.Linear, config) if dynamic
                 else x86.X86InductorQuantizer().set_global(config))
    example = calibration[:1]
    # Strict (TorchDynamo) capture names each call of a module apart; the non-strict one merges the calls of
    # a module used twice (torchvision's ResNet blocks call one ReLU twice) and the quantizer then refuses it.
    captured = exported_program(copy.deepcopy(model).cpu().eval(), example, strict=True).module()
    try:
        prepared = prepare_pt2e(captured, quantizer)
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise EngineError(f"torchao's x86 quantizer cannot annotate this model: {exc}") from exc
    with torch.no_grad():
        for start in range(0, len(calibration), CALIBRATION_BATCH):
            prepared(calibration[start : start + CALIBRATION_BATCH])
    return exported_program(_without_unused_tensors(convert_pt2e(prepared)), example)


def _without_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`graph` without the parameters and buffers no node reads: conversion leaves the float weights beside
    their int8 copies, and export would save both (the file came out larger than the float one)."""
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    unused = [name for name, _ in [*graph.named_parameters(), *graph.named_buffers()] if name not in read]
    for name in unused:
        owner, _, attribute = name.rpartition(".")
        delattr(graph.get_submodule(owner), attribute)
    return graph


# --- ONNX Runtime -----------------------------------------------------------------------------------


class _Calibration(CalibrationDataReader):
    def __init__(self, images: torch.Tensor) -> None:
        self.batches = iter(images[start : start + CALIBRATION_BATCH].numpy().astype(np.float32)
                            for start in range(0, len(images), CALIBRATION_BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_onnx_static(float_onnx: Path, output: Path, calibration: torch.Tensor) -> None:
    """QDQ int8 ONNX: per-channel 7-bit weights (int8 storage), uint8 activations calibrated (min-max) on
    `calibration`.

    Why 7 bits: without VNNI (AVX2, and AVX-512 before Cascade Lake), ONNX Runtime multiplies u8 activations by
    s8 weights with VPMADDUBSW, which adds each pair of products into a saturating int16; 255 * 127 * 2
    overflows it, so the same file lost 7 points of accuracy on an AVX2 host that it kept on a VNNI one.
    With weights in [-64, 63] a pair is at most 255 * 64 * 2 = 32640, exact on every x86-64 CPU, at no
    latency cost (the same kernels run); per-channel scales keep the lost bit's precision small.
    s8 activations lost the same points on AVX2 as u8 ones; u8 weights avoid the saturation but took 2-3x
    longer. bench/quantize_cpu.py measures the variants; tests/engine/test_quantize.py runs them on AVX2."""
    with _preprocessed(float_onnx, output) as (preprocessed, quantized):
        ort_quantization.quantize_static(
            str(preprocessed), str(quantized), _Calibration(calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def quantize_onnx_dynamic(float_onnx: Path, output: Path) -> None:
    """Dynamic int8 ONNX of the Linear layers (Gemm / MatMul), as quantize_dynamic_linear does in torch;
    ONNX Runtime would also make convolutions ConvInteger, which is slower than float on CPU."""
    with _preprocessed(float_onnx, output) as (preprocessed, quantized):
        ort_quantization.quantize_dynamic(str(preprocessed), str(quantized), weight_type=QuantType.QInt8,
                                          op_types_to_quantize=["MatMul", "Gemm"])


@contextmanager
def _preprocessed(float_onnx: Path, output: Path) -> Iterator[tuple[Path, Path]]:
    """(the float model after ONNX Runtime's recommended pre-processing, where to write the quantized one);
    the quantized file then reaches `output` atomically, and the temporaries are removed."""
    preprocessed = output.with_name(f".{output.stem}.preprocessed.onnx")
    quantized = output.with_name(f".{output.stem}.quantized.onnx")
    try:
        # Shape inference and graph optimisation (Conv+BN become one node) before quantization.
        quant_pre_process(str(float_onnx), str(preprocessed))
        yield preprocessed, quantized
        _move_atomically(quantized, output)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise EngineError(f"ONNX Runtime cannot quantize this model: {exc}") from exc
    finally:
        preprocessed.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)


def _move_atomically(source: Path, target: Path) -> None:
    """ONNX Runtime writes by path; the result still reaches `target` as every engine file does."""
    payload = source.read_bytes()
    atomic_write(target, lambda handle: handle.write(payload))


# --- GPU: torchao -----------------------------------------------------------------------------------

# int8 weight-only and float8 matmuls pay off on large Linear layers; torchao's float8 also needs
# dimensions that are multiples of 16. Convolutions stay with cuDNN (float8 Conv2d fails under compile).
GPU_MIN_FEATURES = 512
FLOAT8_MIN_CAPABILITY = (8, 9)


# What a GPU-only extra may raise: it must not fail a job whose CPU artifacts are fine, so it reports why instead.
GPU_EXTRA_ERRORS = (RuntimeError, NotImplementedError, ValueError, AssertionError)


def torchao_gpu_variants(model: nn.Module, x: torch.Tensor, device: str = "auto") -> dict[str, Any]:
    """torchao int8 weight-only and float8 versions of `model`'s large Linear layers, measured on the GPU in
    bfloat16 (how GPU users run it) against the bfloat16 model, the same way; each is skipped with the reason
    when there is no GPU (or the job asked for the CPU), nothing to gain, or torchao refuses the model."""
    if device == "cpu":
        return {"skipped": "the job asked for device 'cpu'"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        return {"skipped": f"torchao is not installed: {exc}"}
    layers = [name for name, module in model.named_modules() if _gains_on_gpu(module)]
    try:
        baseline = copy.deepcopy(model).to("cuda", torch.bfloat16).eval()
        x = x.to(torch.bfloat16)
        reference = evaluate.predict(baseline, x)
        results: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                                   "bf16": _gpu_metrics(baseline, x, reference)}
    except GPU_EXTRA_ERRORS as exc:
        return {"skipped": f"the model does not run in bfloat16 on the GPU: {type(exc).__name__}: {exc}"[:500]}
    if not layers:
        reason = f"no Linear layer with at least {GPU_MIN_FEATURES} input and output features (multiples of 16)"
        return {**results, "int8_weight_only": {"skipped": reason}, "float8": {"skipped": reason}}
    configs: dict[str, Any] = {"int8_weight_only": Int8WeightOnlyConfig}
    capability = torch.cuda.get_device_capability()
    if capability >= FLOAT8_MIN_CAPABILITY:
        configs["float8"] = lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        results["float8"] = {"skipped": f"float8 needs compute capability 8.9 or newer; this GPU has {capability}"}
    for name, make_config in configs.items():
        candidate = copy.deepcopy(baseline)
        try:
            quantize_(candidate, make_config(), filter_fn=lambda _module, fqn: fqn in layers)
            results[name] = {"layers": layers, **_gpu_metrics(candidate, x, reference)}
        except GPU_EXTRA_ERRORS as exc:
            results[name] = {"skipped": f"torchao failed: {type(exc).__name__}: {exc}"[:500]}
    return results


def _gains_on_gpu(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    sizes = (module.in_features, module.out_features)
    return min(sizes) >= GPU_MIN_FEATURES and all(size % 16 == 0 for size in sizes)


def _gpu_metrics(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    predictions = evaluate.predict(model, x)
    return {"agreement_with_bf16": (predictions == reference).sum().item() / len(x),
            **{f"gpu_latency_ms_batch{size}": _gpu_latency_ms(model, x[:1], size) for size in (1, 32)}}


def _gpu_latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int = 10,
                    iters: int = 50) -> float:
    """Median milliseconds per forward pass, synchronised so that the kernels are inside the timing."""
    batch = torch.zeros((batch_size, *example.shape[1:]), device="cuda", dtype=example.dtype)
    timings = []
    with torch.inference_mode():
        for iteration in range(warmup + iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(batch)
            torch.cuda.synchronize()
            if iteration >= warmup:
                timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)
