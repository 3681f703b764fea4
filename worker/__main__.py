"""`python -m worker`: a Celery worker consuming condenser's queue (what `condenser worker` runs).

The CLI lives in app/ and starts this as a program instead of importing the worker's tasks, so that the API side
never imports the worker.
"""

from __future__ import annotations

import argparse
import os
import socket

from core.broker import QUEUE
from core.logs import configure_logging
from core.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=1, help="Jobs at once on this host (one per GPU).")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level.")
    parser.add_argument("--quiet", action="store_true", help="No start-up banner.")
    options = parser.parse_args(argv)
    configure_logging(get_settings(), options.loglevel)
    from worker.tasks import celery_app  # after logging is set up: importing it connects the task signals

    # --quiet is an option of the `celery` command itself, so it goes before the sub-command.
    celery_app.worker_main([
        *(["--quiet"] if options.quiet else []), "worker", "--pool=prefork", f"--concurrency={options.concurrency}",
        f"--queues={QUEUE}", f"--loglevel={options.loglevel}",
        f"--hostname=condenser-{os.getpid()}@{socket.gethostname()}",
        # Gossip and mingle only slow the start down; the database coordinates workers.
        "--without-gossip", "--without-mingle",
    ])


if __name__ == "__main__":
    main()
