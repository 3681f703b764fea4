"""Quantization: real int8 models (dynamic, static, QAT; x86 and qnnpack), exported to TorchScript and ONNX
files that reload with plain torch / onnxruntime and predict like the engine's int8 model.

Stated tolerances: the int8 TorchScript file reproduces the engine's int8 model exactly (same kernels);
the ONNX file is quantized by ONNX Runtime from the same float weights and calibration images, with its
own rounding, so it must agree with the engine's int8 model on at least 97% of the held-out images and
with the float model on at least 97%, on this host and on an emulated AVX2 host without VNNI (where u8 x s8
products saturate in int16), so that the property holds whatever CPU runs the tests.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime import quantization as ort_quantization
from torch import nn

from tests import emulated_cpu
from tests.engine.conftest import small_cnn
from worker.engine import evaluate, export, models, onnxio, quantize
from worker.engine.config import ADAMW_LOOP, DistillConfig
from worker.engine.distill import distill
from worker.engine.errors import SpecError

ONNX_AGREEMENT = 0.97
CALIBRATION = 128


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.fixture(scope="module")
def calibration(digits_splits) -> torch.Tensor:
    return digits_splits[0][0][:CALIBRATION]


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_static_int8_runs_int8_kernels_and_its_torchscript_reproduces_it(trained_small_cnn, calibration,
                                                                         digits_splits, backend: str,
                                                                         tmp_path: Path) -> None:
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    int8 = quantize.quantize_static(model, backend, calibration)
    report = quantize.layer_report(int8)
    assert report == {"int8_layers": ["features.0", "features.4", "features.8", "classifier"], "float_layers": []}
    with quantize.quantized_engine(backend):
        engine_logits = evaluate.logits(int8, x_val)
        quantize.export_quantized_torchscript(int8, x_val[:1], tmp_path / "int8.torchscript.pt")
        reloaded = export.load_torchscript(tmp_path / "int8.torchscript.pt")  # torch.jit.load, warning silenced
        assert torch.equal(evaluate.logits(reloaded, x_val), engine_logits)
    assert agreement(engine_logits, evaluate.logits(model, x_val)) >= 0.97


def test_x86_static_int8_has_8_bit_activations_and_7_bit_weights() -> None:
    """Either halves the u8 x s8 products that a CPU without VNNI adds in int16 (see quantize._X86_STATIC): 7-bit
    activations, PyTorch's default, cost efficientnet_b0 most (tests/engine/test_quantize_archs.py)."""
    qconfig = quantize.qconfig_mapping("x86", qat=False).global_qconfig
    activation, weight = qconfig.activation(), qconfig.weight()
    assert (activation.quant_min, activation.quant_max) == (0, 255)
    assert (weight.quant_min, weight.quant_max) == (-64, 63)


def test_onnx_qdq_int8_agrees_with_the_engine_model(trained_small_cnn, calibration, digits_splits,
                                                    tmp_path: Path) -> None:
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    onnxio.export_onnx(model, x_val[:1], tmp_path / "float.onnx")
    quantize.quantize_onnx_static(tmp_path / "float.onnx", tmp_path / "int8.onnx", calibration)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    operators = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    # Per-channel weights: the scales of the first convolution's weight have one entry per output channel.
    scales = {init.name: init for init in graph.initializer}
    weight_dq = next(node for node in graph.node if node.op_type == "DequantizeLinear" and "weight" in node.input[0])
    assert scales[weight_dq.input[1]].dims[0] > 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["float.onnx", "int8.onnx"]  # no temporaries left

    onnx_logits = evaluate.logits(onnxio.OnnxModel(tmp_path / "int8.onnx"), x_val)
    engine_logits = evaluate.logits(quantize.quantize_static(model, "x86", calibration), x_val)
    assert agreement(onnx_logits, engine_logits) >= ONNX_AGREEMENT
    assert agreement(onnx_logits, evaluate.logits(model, x_val)) >= ONNX_AGREEMENT


@pytest.fixture
def avx2_emulation() -> None:
    reason = emulated_cpu.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def test_onnx_int8_computes_the_same_on_a_cpu_without_vnni(avx2_emulation, trained_small_cnn, calibration,
                                                           digits_splits, tmp_path: Path) -> None:
    """No int16 saturation anywhere: the AVX2 kernels give this host's logits, and the predictions stay the
    float model's."""
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    onnxio.export_onnx(model, x_val[:1], tmp_path / "float.onnx")
    quantize.quantize_onnx_static(tmp_path / "float.onnx", tmp_path / "int8.onnx", calibration)
    on_avx2 = torch.from_numpy(emulated_cpu.onnx_logits(tmp_path / "int8.onnx", x_val.numpy()))
    here = evaluate.logits(onnxio.OnnxModel(tmp_path / "int8.onnx"), x_val)
    torch.testing.assert_close(on_avx2, here, rtol=1e-5, atol=1e-5)
    assert agreement(on_avx2, evaluate.logits(model, x_val)) >= ONNX_AGREEMENT


def test_full_range_int8_weights_saturate_on_a_cpu_without_vnni(avx2_emulation, trained_small_cnn, calibration,
                                                                 digits_splits, tmp_path: Path) -> None:
    """The cause, shown (and proof that the emulation can fail a test): with ONNX Runtime's default 8-bit
    weights the same model's int8 logits stray from the float ones on AVX2 many times further than with the
    7-bit weights quantize_onnx_static uses."""
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    onnxio.export_onnx(model, x_val[:1], tmp_path / "float.onnx")
    quantize.quantize_onnx_static(tmp_path / "float.onnx", tmp_path / "int8_7bit.onnx", calibration)
    ort_quantization.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "int8_8bit.onnx"),
                                     quantize._Calibration(calibration),
                                     quant_format=ort_quantization.QuantFormat.QDQ, per_channel=True,
                                     activation_type=ort_quantization.QuantType.QUInt8,
                                     weight_type=ort_quantization.QuantType.QInt8)
    float_logits = evaluate.logits(model, x_val).numpy()

    def error_on_avx2(name: str) -> float:
        return float(np.abs(emulated_cpu.onnx_logits(tmp_path / name, x_val.numpy()) - float_logits).mean())

    assert error_on_avx2("int8_8bit.onnx") > 4 * error_on_avx2("int8_7bit.onnx")


def test_dynamic_quantizes_linear_layers_in_torch_and_onnx(trained_small_cnn, digits_splits, tmp_path: Path) -> None:
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    int8 = quantize.quantize_dynamic_linear(model)
    assert quantize.layer_report(int8) == {"int8_layers": ["classifier"],
                                           "float_layers": ["features.0", "features.4", "features.8"]}
    assert agreement(evaluate.logits(int8, x_val), evaluate.logits(model, x_val)) >= 0.99
    onnxio.export_onnx(model, x_val[:1], tmp_path / "float.onnx")
    quantize.quantize_onnx_dynamic(tmp_path / "float.onnx", tmp_path / "dynamic.onnx")
    operators = {node.op_type for node in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node}
    assert "MatMulInteger" in operators and "ConvInteger" not in operators
    onnx_logits = evaluate.logits(onnxio.OnnxModel(tmp_path / "dynamic.onnx"), x_val)
    assert agreement(onnx_logits, evaluate.logits(int8, x_val)) >= 0.99


def test_pt2e_int8_program_reloads_and_scores_like_the_float_and_fx_models(trained_small_cnn, calibration,
                                                                          digits_splits, tmp_path: Path) -> None:
    _, model = trained_small_cnn
    x_val, y_val = digits_splits[1]
    export.save_program(quantize.quantize_pt2e(model, calibration), tmp_path / "int8.pt2")
    int8 = export.load_program(tmp_path / "int8.pt2")
    operators = {str(node.target) for node in int8.graph.graph.nodes if node.op == "call_function"}
    assert {"quantized_decomposed.quantize_per_tensor.default",
            "quantized_decomposed.dequantize_per_channel.default"} <= operators
    float_accuracy = evaluate.accuracy(model, x_val, y_val)
    for other in (model, quantize.quantize_static(model, "x86", calibration)):
        assert agreement(evaluate.logits(int8, x_val), evaluate.logits(other, x_val)) >= 0.97
    assert evaluate.accuracy(int8, x_val, y_val) >= float_accuracy - 0.02
    assert evaluate.logits(int8, x_val[:1]).shape == (1, 10)  # the batch dimension stays free


def test_pt2e_dynamic_quantizes_only_linear_layers(trained_small_cnn, calibration, digits_splits) -> None:
    _, model = trained_small_cnn
    x_val = digits_splits[1][0]
    program = quantize.quantize_pt2e(model, calibration, dynamic=True)
    weights = [node for node in program.graph.nodes if node.target == torch.ops.aten.linear.default
               or node.target == torch.ops.aten.conv2d.default]
    quantized = {str(node.target).split(".")[1]: node.args[1].op == "call_function" for node in weights}
    assert quantized == {"linear": True, "conv2d": False}  # a Linear weight comes from a dequantize operator
    loaded = export.LoadedProgram(program)
    assert agreement(evaluate.logits(loaded, x_val), evaluate.logits(model, x_val)) >= 0.99


def test_dynamic_without_linear_layers_is_refused_naming_them() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(SpecError, match=r"this model has none \(its compute is in convolutions such as 0, 2\); use "
                                        r"method 'static' or 'qat'"):
        quantize.quantize_dynamic_linear(model)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # control flow on a tensor's value: FX cannot trace it
            return x
        return -x


def test_a_model_fx_cannot_trace_fails_naming_the_layer(calibration) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(SpecError, match=r"cannot be traced for quantization \(FX symbolic tracing\) at layer '1' "
                                        r"\(Gate.forward, line \d+\): symbolically traced variables cannot be used"):
        quantize.quantize_static(model, "x86", calibration)


def test_qat_trains_resumes_and_gives_back_its_float_weights(trained_small_cnn, calibration, digits_splits) -> None:
    _, model = trained_small_cnn
    train, val = digits_splits
    checkpoints: list[dict] = []
    prepared = quantize.prepare_qat(model, "x86", calibration[:1])
    config = DistillConfig(epochs=1, batch_size=64, lr=1e-4, **ADAMW_LOOP)
    distill(model, prepared, train, val, config, lambda _: None, on_checkpoint=checkpoints.append, device="cpu")
    int8 = quantize.convert_qat(prepared, "x86")
    assert quantize.layer_report(int8)["float_layers"] == []
    assert evaluate.accuracy(int8, *val) >= evaluate.accuracy(model, *val) - 0.02

    # A retried job prepares the same graph and loads the checkpoint into it (observer sizes included).
    again = quantize.prepare_qat(model, "x86", calibration[:1])
    again.load_state_dict(checkpoints[-1]["student"])
    assert torch.equal(evaluate.logits(quantize.convert_qat(again, "x86"), val[0]), evaluate.logits(int8, val[0]))

    trained_float = quantize.trained_float_model(prepared, model)
    assert agreement(evaluate.logits(trained_float, val[0]), evaluate.logits(int8, val[0])) >= 0.97
    # Fake quantization has no bfloat16 kernels: the wrapper keeps autocast (as on CUDA) out of it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepared(val[0][:2]).dtype == torch.float32


def test_int8_files_are_about_four_times_smaller(tmp_path: Path) -> None:
    arch = small_cnn(64, depth=4)
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    images = torch.randn(16, 1, 8, 8)
    assert models.param_count(model) > 1_000_000
    export.export_torchscript(model, images[:1], tmp_path / "float.torchscript.pt")
    quantize.export_quantized_torchscript(quantize.quantize_static(model, "x86", images), images[:1],
                                          tmp_path / "int8.torchscript.pt")
    onnxio.export_onnx(model, images[:1], tmp_path / "float.onnx")
    quantize.quantize_onnx_static(tmp_path / "float.onnx", tmp_path / "int8.onnx", images)
    export.export_program(model, images[:1], tmp_path / "float.pt2")
    export.save_program(quantize.quantize_pt2e(model, images), tmp_path / "int8.pt2")
    for fmt in ("torchscript.pt", "onnx", "pt2"):
        ratio = (tmp_path / f"float.{fmt}").stat().st_size / (tmp_path / f"int8.{fmt}").stat().st_size
        # Besides the int8 weights, each file holds per-channel scales (the .pt2 also int64 zero points).
        assert ratio >= 3.7, (fmt, ratio)


def test_gpu_variants_are_skipped_with_a_reason_without_cuda(trained_small_cnn, calibration) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the torchao path runs instead")
    assert quantize.torchao_gpu_variants(copy.deepcopy(trained_small_cnn[1]), calibration) == {
        "skipped": "no CUDA device"}


def test_gpu_variants_are_skipped_when_the_job_asks_for_the_cpu(trained_small_cnn, calibration) -> None:
    assert quantize.torchao_gpu_variants(trained_small_cnn[1], calibration, device="cpu") == {
        "skipped": "the job asked for device 'cpu'"}
