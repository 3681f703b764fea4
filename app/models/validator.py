"""Run worker.engine.validate in a short-lived child process.

Loading weights needs torch, which the API never imports: a child keeps torch's memory, threads and
any parser bug out of the server, and an address-space limit and a timeout bound what it can use.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from core.errors import Invalid
from worker.engine.config import ArchSpec

log = logging.getLogger(__name__)

VALIDATOR_MODULE = "worker.engine.validate"
ADDRESS_SPACE_LIMIT = 8 << 30
# The directory holding the app and worker packages, so the child imports the same code as we do.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_STDERR_SHOWN = 300
# Each child imports torch (hundreds of MB): a burst of uploads queues here instead of exhausting memory.
_CONCURRENT_CHECKS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class WeightsReport:
    param_count: int
    num_classes: int


def check_weights(path: Path, weights_format: str, spec: ArchSpec, timeout: float) -> WeightsReport:
    """Build `spec` and load the file into it in a child; Invalid (422) with the reason if it does not fit."""
    command = [sys.executable, "-m", VALIDATOR_MODULE, "--format", weights_format,
               "--arch-json", spec.model_dump_json(), str(path)]
    try:
        with _CONCURRENT_CHECKS:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL, env=_child_env(), preexec_fn=_limit_address_space)
    except subprocess.TimeoutExpired as exc:
        raise Invalid(f"checking the weights took longer than {timeout:g} s; is the model too large?") from exc
    verdict = _last_json_line(done.stdout)
    if verdict is None:
        log.warning("model validator exited %s without a verdict; stderr: %s", done.returncode, done.stderr)
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1][:_STDERR_SHOWN]
        raise Invalid(f"the weights could not be checked (validator exit code {done.returncode}: {last_line})")
    if not verdict.get("ok"):
        raise Invalid(f"the weights do not fit the spec: {verdict.get('error', 'unknown error')}")
    return WeightsReport(param_count=int(verdict["param_count"]), num_classes=int(verdict["num_classes"]))


def _limit_address_space() -> None:
    # Runs in the child between fork and exec: a crafted file that makes torch allocate wildly fails
    # there with MemoryError instead of pushing the API host into the OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
    # One thread is plenty to load a state_dict and avoids oversubscribing the API host's cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _last_json_line(stdout: str) -> dict[str, object] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None
