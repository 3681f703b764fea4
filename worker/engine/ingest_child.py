"""Ingest an upload in a short-lived child process (app.sandbox), never in the API process.

    python -m worker.engine.ingest_child --job-json '{"filename": ..., "limits": {...}}' SRC DEST
    python -m worker.engine.ingest_child --builtin NAME

prints one JSON line and exits 0: {"ok": true, <summary>, "canonical_bytes": N} once DEST holds the
canonical .npz, or {"ok": false, "error": "<message for the user>"} (with "canonical_bytes" when the
dataset would exceed the storage quota, so that the API answers 413 rather than 422).

Why a synchronous sandboxed child and not a worker task: the client gets its 201 or its 422 in the
same request as before (no pending state to poll, no API change), an upload never waits in the queue
behind jobs that run for hours, and the kernel enforces the limits (address space, CPU time, file
size, a wall-clock timeout), so a parser bug (CVE-2024-6232 in this interpreter's tarfile) or a
decompression bomb costs one child, not the server's GIL or memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.engine.errors import DataError
from worker.engine.ingest import IngestLimits, StorageQuotaError, ingest_dataset, load_builtin_summary


def ingest(job_json: str, src: Path, dest: Path) -> dict[str, Any]:
    job = json.loads(job_json)
    try:
        summary = ingest_dataset(src, job["filename"], dest, IngestLimits(**job["limits"]))
    except StorageQuotaError as exc:
        return {"ok": False, "error": str(exc), "canonical_bytes": exc.canonical_bytes}
    except DataError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, **asdict(summary), "canonical_bytes": dest.stat().st_size}


def describe_builtin(name: str) -> dict[str, Any]:
    try:
        return {"ok": True, **asdict(load_builtin_summary(name))}
    except DataError as exc:
        return {"ok": False, "error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-json", help="the client's file name and the IngestLimits, as JSON")
    parser.add_argument("--builtin", help="describe this built-in dataset instead")
    parser.add_argument("paths", nargs="*", type=Path, help="SRC DEST")
    args = parser.parse_args(argv)
    if args.builtin:
        verdict = describe_builtin(args.builtin)
    elif args.job_json and len(args.paths) == 2:
        verdict = ingest(args.job_json, *args.paths)
    else:
        parser.error("give --builtin NAME, or --job-json JSON SRC DEST")
    print(json.dumps(verdict), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
