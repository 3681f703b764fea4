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
import multiprocessing
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import Invalid, public_text

log = logging.getLogger(__name__)

# Children that need torch fork from one server process per API process that imported these once (about
# 700 MB resident, shared copy-on-write with its children): each check then costs a fork, not seconds of
# imports. Other children start a fresh interpreter, whose address space starts small.
PRELOADED_MODULES = ("worker.engine.validate", "worker.engine.budget")
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(list(PRELOADED_MODULES))
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
    run = _run_forked if module in PRELOADED_MODULES else _run_executed
    with tempfile.TemporaryDirectory(prefix="condenser-child-") as scratch:
        stdout_path, stderr_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        returncode = run(module, args, limits, stdout_path, stderr_path)
        if returncode is None:
            raise Invalid(f"{what} took longer than {limits.timeout_seconds:g} s; "
                          "the file is too large or too complex to accept")
        verdict = _last_json_line(_tail(stdout_path))
        if verdict is None:
            stderr_tail = _tail(stderr_path)
            log.warning("%s: child %s exited %s without a verdict; stderr tail: %s",
                        what, module, returncode, stderr_tail[-2000:])
            raise Invalid(f"{what} failed: {_exit_reason(returncode, stderr_tail)}")
    return verdict


def _run_executed(module: str, args: list[str], limits: ChildLimits, stdout_path: Path,
                  stderr_path: Path) -> int | None:
    """`python -m module`: a fresh interpreter. Its exit code, or None when it timed out (and was killed)."""
    command = [sys.executable, "-m", module, *args]
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        try:
            return subprocess.run(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                  timeout=limits.timeout_seconds, check=False, env=_child_env(),
                                  preexec_fn=lambda: _apply_limits(limits)).returncode
        except subprocess.TimeoutExpired:
            return None


def _run_forked(module: str, args: list[str], limits: ChildLimits, stdout_path: Path,
                stderr_path: Path) -> int | None:
    """Fork of the forkserver that imported torch once: the same child, without seconds of imports each time."""
    child = _FORKSERVER.Process(target=_forked_main, args=(module, args, limits, stdout_path, stderr_path),
                                daemon=True)
    child.start()
    child.join(limits.timeout_seconds)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def _forked_main(module: str, args: list[str], limits: ChildLimits, stdout_path: Path, stderr_path: Path) -> None:
    """The forked child: limits first, output to the scratch files, then the module as `python -m` runs it."""
    _apply_limits(limits)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file_fd, fd)
        os.close(file_fd)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for an executed child
    sys.argv = [module, *args]
    code: object = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


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
