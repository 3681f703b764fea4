"""Run an ONNX file's CPU kernels as an AVX2 host without VNNI would: ONNX Runtime under qemu-user with a
Haswell CPU model, whatever this host's instruction set (qemu 7.2+ emulates AVX2, not AVX-512).

ONNX Runtime picks its int8 kernels from CPUID at start, so only another process can see another CPU; the
child runs this file as a script and exchanges arrays through .npy files. Used by the tests (which then hold on
any x86-64 host) and by bench/quantize_cpu.py.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64"
# An AVX2 CPU without AVX-512 or VNNI: VPMADDUBSW is the int8 dot product there.
AVX2_CPU = "Haswell-noTSX"
TIMEOUT_S = 600


def unavailable_reason() -> str | None:
    """Why AVX2 cannot be emulated here, or None when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"emulating an x86-64 CPU needs an x86-64 host (this is {platform.machine()})"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-user)"
    return None


def onnx_logits(onnx_path: Path, x: np.ndarray, cpu: str = AVX2_CPU) -> np.ndarray:
    """The outputs of `onnx_path` on `x`, computed by ONNX Runtime on the emulated `cpu`."""
    with tempfile.TemporaryDirectory(prefix="emulated-cpu-") as folder:
        inputs, outputs = Path(folder) / "x.npy", Path(folder) / "logits.npy"
        np.save(inputs, x.astype(np.float32))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([QEMU, "-cpu", cpu, sys.executable, __file__, str(onnx_path), str(inputs), str(outputs)],
                       check=True, env=env, timeout=TIMEOUT_S, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return np.load(outputs)


def _predict_in_this_process(onnx_path: str, inputs: str, outputs: str) -> None:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.load(inputs)})[0]
    np.save(outputs, logits)


if __name__ == "__main__":
    _predict_in_this_process(*sys.argv[1:4])
