"""Static int8 quantization of resnet18 on CPU: our engine's artifact against a hand-written FX int8 pass.

Prints one JSON line. latency_ratio_vs_hand: ours / hand at batch 1, 224 px (target <= 1.05); size_ratio:
fp32 / int8 bytes of the TorchScript artifacts (target >= 3.9); accuracy_drop_pts: fp32 minus int8 top-1 on
the held-out digits, in points (target <= 0.5).

The int8 ONNX file, side by side with ONNX Runtime's default settings and the other remedy for int16 saturation
on CPUs without VNNI: per variant, latency / the int8 TorchScript's at batch 1, and accuracy drop on the same
held-out images here and on an emulated AVX2 CPU without VNNI (qemu-user, Haswell; "null" without qemu).
  ours (onnx_7bit_weights): u8 activations, s8 weights in 7 bits (what the quantize job ships);
  onnx_8bit_weights: ONNX Runtime's default u8 x s8 (saturates in int16 without VNNI);
  onnx_u8_weights: u8 x u8 (no saturation, other kernels).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

from common import accuracy_pts, environment, interleaved_latency_ms, print_result, trained_resnet18
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization import QuantFormat, QuantType
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from tests import emulated_cpu
from worker.engine import evaluate, export, onnxio, quantize
from worker.jobs.inputs import calibration_subset

CALIBRATION_SAMPLES, SEED = 256, 0


def hand_written_fx_int8(model: nn.Module, calibration) -> nn.Module:
    """What an engineer writes by hand from the PyTorch docs: default x86 qconfig, calibrate, convert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FX flow's deprecation notices
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
        for start in range(0, len(calibration), 64):
            prepared(calibration[start : start + 64])
        return convert_fx(prepared)


def reference_onnx_int8(folder: Path, calibration, weight_type: QuantType) -> Path:
    """ONNX Runtime's quantize_static with full-range weights of `weight_type`, as its docs show it."""
    path = folder / f"int8-{weight_type.name}.onnx"
    quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"))
    ort_quantization.quantize_static(str(folder / "pre.onnx"), str(path), quantize._Calibration(calibration),
                                     quant_format=QuantFormat.QDQ, per_channel=True,
                                     activation_type=QuantType.QUInt8, weight_type=weight_type)
    return path


def accuracy_on_avx2_pts(path: Path, val) -> float | None:
    if emulated_cpu.unavailable_reason() is not None:
        return None
    predictions = emulated_cpu.onnx_logits(path, val[0].numpy()).argmax(axis=1)
    return 100 * float((predictions == val[1].numpy()).mean())


def onnx_variants(folder: Path, calibration) -> dict[str, Path]:
    """Ours (7-bit weights, the file a quantize job ships) and ONNX Runtime's two other settings."""
    return {"onnx_7bit_weights": folder / "int8.onnx",
            "onnx_8bit_weights": reference_onnx_int8(folder, calibration, QuantType.QInt8),
            "onnx_u8_weights": reference_onnx_int8(folder, calibration, QuantType.QUInt8)}


def variant_figures(paths: dict[str, Path], sessions: dict, latency: dict[str, float], val,
                    fp32_accuracy: float) -> dict:
    result = {}
    for name, path in paths.items():
        on_avx2 = accuracy_on_avx2_pts(path, val)
        result.update({
            f"{name}_ms": latency[name], f"{name}_latency_vs_torchscript_int8": latency[name] / latency["ours"],
            f"{name}_accuracy_drop_pts": fp32_accuracy - accuracy_pts(sessions[name], val),
            f"{name}_accuracy_drop_pts_avx2_emulated": None if on_avx2 is None else fp32_accuracy - on_avx2,
        })
    return result


def main() -> None:
    model, train, val = trained_resnet18()
    calibration = calibration_subset(train, CALIBRATION_SAMPLES, SEED)[0]
    folder = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    example = val[0][:1]

    # Ours: the engine's path of a static quantization job, and its files reloaded from disk.
    export.export_torchscript(model, example, folder / "fp32.torchscript.pt")
    quantize.export_quantized_torchscript(quantize.quantize_static(model, "x86", calibration), example,
                                          folder / "int8.torchscript.pt")
    onnxio.export_onnx(model, example, folder / "fp32.onnx")
    quantize.quantize_onnx_static(folder / "fp32.onnx", folder / "int8.onnx", calibration)
    fp32_script = export.load_torchscript(folder / "fp32.torchscript.pt")
    ours = export.load_torchscript(folder / "int8.torchscript.pt")
    onnx_fp32 = onnxio.OnnxModel(folder / "fp32.onnx")
    paths = onnx_variants(folder, calibration)
    sessions = {name: onnxio.OnnxModel(path) for name, path in paths.items()}
    hand = hand_written_fx_int8(model, calibration)

    # One interleaved set, so that every ratio compares rounds taken side by side.
    latency = interleaved_latency_ms({"ours": ours, "hand": hand, "fp32": fp32_script, "onnx_fp32": onnx_fp32,
                                      **sessions})
    size = {name: (folder / name).stat().st_size for name in ("fp32.torchscript.pt", "int8.torchscript.pt",
                                                              "fp32.onnx", "int8.onnx")}
    fp32_accuracy = accuracy_pts(model, val)
    print_result({
        "benchmark": "quantize_cpu",
        "latency_ratio_vs_hand": latency["ours"] / latency["hand"],
        "size_ratio": size["fp32.torchscript.pt"] / size["int8.torchscript.pt"],
        "accuracy_drop_pts": fp32_accuracy - accuracy_pts(ours, val),
        "ours_int8_torchscript_ms": latency["ours"], "hand_fx_int8_ms": latency["hand"],
        "fp32_torchscript_ms": latency["fp32"], "speedup_vs_fp32": latency["fp32"] / latency["ours"],
        "onnx_fp32_ms": latency["onnx_fp32"], "onnx_size_ratio": size["fp32.onnx"] / size["int8.onnx"],
        **variant_figures(paths, sessions, latency, val, fp32_accuracy),
        "fp32_accuracy_pts": fp32_accuracy, "hand_accuracy_drop_pts": fp32_accuracy - accuracy_pts(hand, val),
        "agreement_ours_vs_hand": evaluate.agreement(ours, hand, val[0]),
        "fp32_bytes": size["fp32.torchscript.pt"], "int8_bytes": size["int8.torchscript.pt"],
        "calibration_samples": CALIBRATION_SAMPLES, "validation_samples": len(val[1]), **environment(),
    })


if __name__ == "__main__":
    main()
