"""Helpers for tests that run real processes: Celery workers, the API server, the services."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from app.cli import die_with_parent

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Poll until predicate() is truthy; return its value or fail with what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc (Linux)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; fields after the closing parenthesis are fixed.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            children.append(int(entry.name))
    return children


class WorkerProcess:
    """A real `condenser worker` (Celery prefork) started with the test's environment."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 1) -> None:
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", f"--concurrency={self.concurrency}", "--loglevel=INFO"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # A pytest run that is killed takes its workers along: an orphan would consume a later run's jobs.
            preexec_fn=die_with_parent,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        """Until Celery logs that this worker consumes from the queue (its "ready." line, at INFO)."""
        wait_for(lambda: " ready." in self.log(), timeout, interval=0.2, what=f"the worker in {self.log_path.name}")
        return self

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def kill_children(self) -> list[int]:
        pids = self.children()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def kill_all(self) -> None:
        """kill -9 the parent and every child at once (the whole process group)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 120) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers_health(base_url: str) -> bool:
    """Whether an API server at `base_url` answers /healthz yet."""
    import httpx

    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class ApiServerProcess:
    """`condenser serve` over real HTTP, for clients that need a socket: the CLI, the Python client's streams and
    downloads, a browser, a fuzzer. By default the API alone (`--concurrency 0`); with workers, the whole
    embedded service."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 0, prefix: Sequence[str] = ()) -> None:
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.prefix = list(prefix)  # a command that execs the rest (unshare, for a filesystem of its own)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiServerProcess:

        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "app.cli", "serve", f"--concurrency={self.concurrency}",
             f"--port={self.port}"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_path.read_text()
            return answers_health(self.url)

        wait_for(healthy, timeout, interval=0.2, what=f"the API server on {self.url}")
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=90)  # serve stops its worker first
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class TcpProxy:
    """A TCP forwarder the test can cut: an outage drops every connection and refuses new ones.

    Lets one process (a worker) lose PostgreSQL for a few seconds while the server, and every
    other test, keep it.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.closed = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def outage(self, seconds: float) -> None:
        """Drop every open connection and refuse new ones for `seconds`."""
        self.down.set()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
            self.sockets.clear()
        time.sleep(seconds)
        self.down.clear()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
