"""Run heavy or risky parsing in a short-lived, limited child process, never in the API process.

The API streams bytes to disk and writes rows; reading archives, decoding images and loading
weights happen in `python -m <module>` children. The kernel bounds each child (address space, CPU
time, size of any file it writes, including its own output), a wall-clock timeout kills it, and
the parent reads back at most a small tail of its output. A parser bug (CVE-2024-6232 in this
interpreter's tarfile, for one) then costs one child's limits, not the server's GIL or memory.

A child reports by printing one JSON object as its last stdout line: {"ok": true, ...} or
{"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import Invalid, public_text

log = logging.getLogger(__name__)

# The directory holding the app and worker packages, so the child imports the same code as we do.
_SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What the parent reads back of a child's stdout/stderr: a verdict is a few hundred bytes.
_OUTPUT_TAIL_BYTES = 64 << 10


@dataclass(frozen=True)
class ChildLimits:
    timeout_seconds: float
    cpu_seconds: int
    address_space_bytes: int = 8 << 30
    # RLIMIT_FSIZE: the largest file the child may write (its stdout/stderr files included).
    file_size_bytes: int = 1 << 30


def run_child(module: str, args: list[str], limits: ChildLimits, what: str) -> dict[str, object]:
    """Run `python -m module *args` under `limits`; its verdict dict, or Invalid (422) saying what failed.

    `what` names the work for messages ("reading the dataset"). A verdict with ok=false is
    returned as is: the caller words the refusal.
    """
    command = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryDirectory(prefix="condenser-child-") as scratch:
        stdout_path, stderr_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            try:
                done = subprocess.run(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                      timeout=limits.timeout_seconds, check=False, env=_child_env(),
                                      preexec_fn=lambda: _apply_limits(limits))
            except subprocess.TimeoutExpired as exc:
                raise Invalid(f"{what} took longer than {limits.timeout_seconds:g} s; "
                              "the file is too large or too complex to accept") from exc
        verdict = _last_json_line(_tail(stdout_path))
        if verdict is None:
            stderr_tail = _tail(stderr_path)
            log.warning("%s: child %s exited %s without a verdict; stderr tail: %s",
                        what, module, done.returncode, stderr_tail[-2000:])
            raise Invalid(f"{what} failed: {_exit_reason(done.returncode, stderr_tail)}")
    return verdict


def _exit_reason(returncode: int, stderr_tail: str) -> str:
    if returncode == -9 or "MemoryError" in stderr_tail:
        return "it needed more memory than an upload may use"
    if returncode == -24:  # SIGXCPU: the CPU-time limit
        return "it needed more CPU time than an upload may use"
    if returncode == -25:  # SIGXFSZ: the output-size limit
        return "its decoded form is larger than an upload may be"
    last_line = (stderr_tail.strip().splitlines() or ["no output"])[-1]
    return public_text(f"exit code {returncode}: {last_line}")


def _apply_limits(limits: ChildLimits) -> None:
    # Runs in the child between fork and exec, so the limits hold before any untrusted byte is read.
    resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes, limits.address_space_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
    # One thread is plenty to parse one file and avoids oversubscribing the API host's cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tail(path: Path) -> str:
    with path.open("rb") as stream:
        stream.seek(max(0, path.stat().st_size - _OUTPUT_TAIL_BYTES))
        return stream.read().decode("utf-8", errors="replace")


def _last_json_line(stdout: str) -> dict[str, object] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None
