"""Checkpoints of a training run: snapshots taken without waiting for the device, handed over off the loop."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)


class Checkpointer:
    """Hands checkpoints to `on_checkpoint`: after an epoch on one background thread, so that writing them (a
    file and a database event, for a job) overlaps the next epoch; on an interruption at once. In order.

    `snapshot` takes the checkpoint, on the loop's thread."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]],
                 on_checkpoint: Callable[[dict[str, Any]], None] | None) -> None:
        self.snapshot = snapshot
        self.on_checkpoint = on_checkpoint
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.in_flight: Future[None] | None = None

    def in_background(self) -> None:
        if self.on_checkpoint is not None:
            state = self.snapshot()
            self.wait()
            # In the caller's context, so that what the callback logs still carries, say, the job's id.
            self.in_flight = self.pool.submit(contextvars.copy_context().run, self.on_checkpoint, state)

    def before_stopping(self) -> None:
        """A checkpoint at once, on an interruption. Never raises: the interruption (a cancel, a preemption)
        must reach the caller, not an earlier checkpoint's failure or this one's."""
        if self.on_checkpoint is None:
            return
        try:
            with contextlib.suppress(Exception):
                self.wait()  # the epoch checkpoint before this one; this one supersedes it anyway
            self.on_checkpoint(self.snapshot())
        except Exception:
            log.warning("could not write the checkpoint before stopping; a resume starts from an earlier one",
                        exc_info=True)

    def wait(self) -> None:
        """Until the checkpoint in flight is handed over; raises what its handing over raised."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.result()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise
            # The run already stops with an error of its own (Canceled, say): that one says why.
        finally:
            self.pool.shutdown()


def detached_cpu_copy(value: Any) -> Any:
    """A snapshot: state_dict()s alias live tensors that the next step would overwrite.

    GPU tensors are copied to pinned memory without blocking, so that hundreds of copies cost one wait: call
    torch.cuda.synchronize() before reading them.
    """
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            return torch.empty_like(value, device="cpu", pin_memory=True).copy_(value.detach(), non_blocking=True)
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_cpu_copy(item) for item in value)
    return value
