"""Every downloadable model format loads and runs where condenser cannot be imported, as users run it.

One child interpreter (isolated mode, a temporary working directory, and an import hook refusing condenser's
packages, which the virtual environment installs in editable mode) loads each file with the lines the
how-to-load documents give, and returns its logits for the parent to compare with the engine's models.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from worker.engine import evaluate, export, onnxio, quantize

CHILD = textwrap.dedent("""
    import importlib.abc, sys

    class RefuseCondenser(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"app", "core", "worker", "condenser"}:
                raise ImportError(f"{name} is condenser's")

    sys.meta_path.insert(0, RefuseCondenser())
    try:
        import worker
        raise SystemExit("condenser is importable: this check proves nothing")
    except ImportError:
        pass

    import onnxruntime, torch
    import torch.ao.quantization.fx._decomposed  # the int8 .pt2's quantize / dequantize operators

    x = torch.load("x.pt")
    session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    logits = {
        "torchscript": torch.jit.load("model.torchscript.pt")(x),
        "onnx": torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
        "pt2": torch.export.load("model.pt2").module()(x),
        "int8_pt2": torch.export.load("int8.pt2").module()(x),
    }
    torch.save({name: value.detach() for name, value in logits.items()}, "logits.pt")
""")


def test_each_format_runs_without_condenser(trained_small_cnn, digits_splits, tmp_path: Path) -> None:
    _, model = trained_small_cnn
    x = digits_splits[1][0][:32]
    export.export_torchscript(model, x[:1], tmp_path / "model.torchscript.pt")
    onnxio.export_onnx(model, x[:1], tmp_path / "model.onnx")
    export.export_program(model, x[:1], tmp_path / "model.pt2")
    int8 = quantize.quantize_pt2e(model, digits_splits[0][0][:128])
    export.save_program(int8, tmp_path / "int8.pt2")
    torch.save(x, tmp_path / "x.pt")

    child = subprocess.run([sys.executable, "-I", "-c", CHILD], cwd=tmp_path, capture_output=True, text=True,
                           check=False)
    assert child.returncode == 0, child.stderr[-3000:]

    logits = torch.load(tmp_path / "logits.pt")
    expected = evaluate.logits(model, x)
    for fmt in ("torchscript", "onnx", "pt2"):
        assert torch.allclose(logits[fmt], expected, atol=1e-4), fmt
    assert torch.allclose(logits["int8_pt2"], evaluate.logits(export.LoadedProgram(int8), x), atol=1e-5)
