"""Every int8 format on every torchvision family the quantizer takes, not only on small_cnn: resnet18 (plain
convolutions, residual adds), mobilenet_v3_small (depthwise convolutions, hardswish, squeeze-excitation) and
efficientnet_b0 (SiLU, which PyTorch's int8 runs in float between int8 convolutions; stochastic depth).

Each is trained briefly from scratch on the built-in digits at 32 px (their stride is 32), so that its predictions
mean something, then each int8 file is judged against the float model on the held-out digits: top-1 agreement,
and how far its logits stray (mean absolute error over the float logits' standard deviation).

Measured on this host, one thread (float accuracy | agreement FX static, ONNX static, torch dynamic, ONNX dynamic |
logit error FX static, ONNX static):
    resnet18            0.95 | 1.000 1.000 1.000 1.000 | 0.013 0.015
    mobilenet_v3_small  0.86 | 0.975 0.989 1.000 1.000 | 0.046 0.040
    efficientnet_b0     0.76 | 0.914 0.925 0.944 0.975 | 0.062 0.054
With PyTorch's default x86 qconfig (7-bit activations) FX static measured 0.997 / 0.969 / 0.875 agreement and
0.018 / 0.063 / 0.082 error; the thresholds below sit between, so that the 7-bit activations fail them again.
Trained for 8 epochs (too slow for a test), efficientnet_b0 (0.92 accurate) showed it plainly: FX static agreement
0.76 with 7-bit activations, 0.93 with quantize_static's; ONNX static 0.93.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import emulated_cpu
from tests.conftest import DigitsTeacher
from worker.engine import data, evaluate, export, models, onnxio, quantize
from worker.engine.batchnorm import reestimate_running_statistics_
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig, InputSpec
from worker.engine.distill import distill

pytestmark = pytest.mark.slow

DIGITS_32 = InputSpec(image_size=32, channels=3, mean=(0.5,), std=(0.5,))
CALIBRATION = 128
# Enough images to compare logits; emulating the CPU (qemu) costs 3-4 s per model at this size.
EMULATED_IMAGES = 32


@dataclass(frozen=True)
class Recipe:
    epochs: int
    min_accuracy: float  # the float model's, so that agreement is measured on real predictions
    static_agreement: float  # of each static int8 file with the float model
    max_static_error: float  # mean |int8 - float| logits / std of the float logits
    dynamic_agreement: float


ARCHS = {
    "resnet18": Recipe(epochs=1, min_accuracy=0.9, static_agreement=0.97, max_static_error=0.03,
                       dynamic_agreement=0.98),
    "mobilenet_v3_small": Recipe(epochs=1, min_accuracy=0.8, static_agreement=0.95, max_static_error=0.06,
                                 dynamic_agreement=0.98),
    # The weakest model: its small margins between classes make agreement the most sensitive to int8 noise.
    # Agreement 0.85: on an AVX2 host without VNNI (AMD EPYC) its static files agreed 0.883 (FX) and 0.864 (ONNX)
    # with the float model's small margins; the logit error, still within 0.075 there, is what catches 7-bit
    # activations (0.082).
    "efficientnet_b0": Recipe(epochs=2, min_accuracy=0.7, static_agreement=0.85, max_static_error=0.075,
                              dynamic_agreement=0.92),
}
# Small batches: more steps for the same compute, which is what training from scratch on 1437 images needs.
TRAINING = {"batch_size": 16, "lr": 3e-3}


@pytest.fixture(scope="module", autouse=True)
def one_thread(digits_teacher: DigitsTeacher) -> Iterator[None]:
    """Training three models on a busy 2-core machine took 8 minutes with torch's two threads (they spin on the
    cores other processes hold) and under 2 with one; one thread also makes each model the same every run. The
    session's resnet18 (digits_teacher, shared with the demo's tests) is trained first, as everywhere else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_32() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return data.train_val_tensors(data.load_builtin("digits"), DIGITS_32, val_fraction=0.2, seed=0)


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, digits_32) -> tuple[Recipe, nn.Module]:
    recipe = ARCHS[request.param]
    if request.param == "resnet18":
        # The session's demo teacher is this very model (resnet18, digits at 32 px, the same split), trained longer.
        return recipe, request.getfixturevalue("digits_teacher").model
    torch.manual_seed(0)
    model = models.build_model(ArchSpec(arch=request.param, kwargs={"num_classes": 10}, input=DIGITS_32))
    config = DistillConfig(epochs=recipe.epochs, **TRAINING, **ADAMW_LOOP)
    distill(None, model, *digits_32, config, lambda _: None, device="cpu")
    # MobileNetV3 and EfficientNet update BatchNorm statistics with momentum 0.01: distill() re-estimated them on
    # 512 images; the thresholds below were measured with them averaged over every training image.
    reestimate_running_statistics_(model, list(digits_32[0][0].split(256)))
    return recipe, model.eval()


@pytest.fixture(scope="module")
def float_onnx(trained, digits_32, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "float.onnx"
    onnxio.export_onnx(trained[1], digits_32[1][0][:1], path)
    return path


@pytest.fixture(scope="module")
def static_onnx(float_onnx, digits_32) -> Path:
    path = float_onnx.with_name("int8.onnx")
    quantize.quantize_onnx_static(float_onnx, path, digits_32[0][0][:CALIBRATION])
    return path


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def logit_error(int8: torch.Tensor, reference: torch.Tensor) -> float:
    return ((int8 - reference).abs().mean() / reference.std()).item()


def test_the_float_model_predicts_every_class(trained, digits_32) -> None:
    """Agreement with a model that predicts one class for everything would prove nothing."""
    recipe, model = trained
    x_val, y_val = digits_32[1]
    predictions = evaluate.predict(model, x_val)
    assert (predictions == y_val).float().mean().item() >= recipe.min_accuracy
    assert predictions.unique().numel() == 10


def test_fx_static_int8_torchscript_predicts_like_the_float_model(trained, digits_32, tmp_path: Path) -> None:
    recipe, model = trained
    x_val = digits_32[1][0]
    int8 = quantize.quantize_static(model, "x86", digits_32[0][0][:CALIBRATION])
    assert quantize.layer_report(int8)["float_layers"] == []
    with quantize.quantized_engine("x86"):
        quantize.export_quantized_torchscript(int8, x_val[:1], tmp_path / "int8.torchscript.pt")
        int8_logits = evaluate.logits(export.load_torchscript(tmp_path / "int8.torchscript.pt"), x_val)
    float_logits = evaluate.logits(model, x_val)
    assert agreement(int8_logits, float_logits) >= recipe.static_agreement
    assert logit_error(int8_logits, float_logits) <= recipe.max_static_error


def test_onnx_static_int8_predicts_like_the_float_model(trained, digits_32, static_onnx: Path) -> None:
    recipe, model = trained
    x_val = digits_32[1][0]
    int8_logits = evaluate.logits(onnxio.OnnxModel(static_onnx), x_val)
    float_logits = evaluate.logits(model, x_val)
    assert agreement(int8_logits, float_logits) >= recipe.static_agreement
    assert logit_error(int8_logits, float_logits) <= recipe.max_static_error


def test_onnx_static_int8_computes_the_same_on_a_cpu_without_vnni(trained, digits_32, static_onnx: Path) -> None:
    reason = emulated_cpu.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    x = digits_32[1][0][:EMULATED_IMAGES]
    on_avx2 = torch.from_numpy(emulated_cpu.onnx_logits(static_onnx, x.numpy()))
    torch.testing.assert_close(on_avx2, evaluate.logits(onnxio.OnnxModel(static_onnx), x), rtol=1e-5, atol=1e-5)


def test_dynamic_int8_in_torch_and_onnx_predicts_like_the_float_model(trained, digits_32, float_onnx: Path) -> None:
    recipe, model = trained
    x_val = digits_32[1][0]
    float_logits = evaluate.logits(model, x_val)
    torch_logits = evaluate.logits(quantize.quantize_dynamic_linear(model), x_val)
    assert agreement(torch_logits, float_logits) >= recipe.dynamic_agreement
    dynamic_onnx = float_onnx.with_name("dynamic.onnx")
    quantize.quantize_onnx_dynamic(float_onnx, dynamic_onnx)
    assert agreement(evaluate.logits(onnxio.OnnxModel(dynamic_onnx), x_val), float_logits) >= recipe.dynamic_agreement
