"""The `condenser` command: run the service, manage keys, run the demo.

Importing this module must stay cheap and torch-free; commands import what they need.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from app.client_cli import add_commands
from app.client_cli.common import CliError
from app.client_cli.connection import Connection
from core.errors import DomainError


class CondenserGroup(TyperGroup):
    """What a user can act on (a server's refusal, an unreachable server, a bad file or argument) is one
    line on stderr and a non-zero exit code, never a traceback."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except typer.TyperException as exc:  # typer's click errors: a missing argument, a bad option value
            usage = getattr(exc, "ctx", None)
            where = f" (see: {usage.command_path} --help)" if usage is not None else ""
            message, code = f"{exc.format_message()}{where}", exc.exit_code
        except CliError as exc:
            message, code = str(exc), exc.exit_code
        except DomainError as exc:  # the server-side commands (keys) refuse as the API would
            message, code = exc.message, 1
        except Exception as exc:
            from app.client import ClientError

            if not isinstance(exc, ClientError | OSError):
                raise
            message, code = str(exc), 1
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code)


app = typer.Typer(help="condenser: distill, prune and quantize PyTorch vision models over HTTP.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=CondenserGroup)
keys_app = typer.Typer(help="Manage API keys (run on the server: writes to its database).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
add_commands(app)


@app.callback()
def connection_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="The server, for the user commands (default: CONDENSER_URL, "
                                            "then the config file, then http://127.0.0.1:8000).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Your API key (default: CONDENSER_API_KEY, then the "
                                                "config file written by `condenser login`).")] = None,
) -> None:
    ctx.obj = Connection(url=url, api_key=api_key)


@app.command()
def migrate() -> None:
    """Run the database migrations to head."""
    from core.db.migrate import upgrade_to_head
    from core.settings import get_settings

    upgrade_to_head(get_settings().database_url)
    typer.echo("database at head")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs at once on this host (one per GPU).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    quiet: Annotated[bool, typer.Option(help="No start-up banner.")] = False,
) -> None:
    """Start a Celery worker alone (more hosts, more GPUs)."""
    # The worker is its own program (python -m worker): the API side never imports it.
    os.execv(sys.executable, [sys.executable, "-m", "worker", *_worker_options(concurrency, loglevel, quiet)])


def _worker_options(concurrency: int, loglevel: str, quiet: bool) -> list[str]:
    return [f"--concurrency={concurrency}", f"--loglevel={loglevel}", *(["--quiet"] if quiet else [])]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind the API to.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    concurrency: Annotated[int, typer.Option(help="Worker processes to start; 0 for none.")] = 1,
) -> None:
    """Start the API and a Celery worker process (the embedded default needs no other server)."""
    import uvicorn

    from core.db.migrate import upgrade_to_head
    from core.logs import configure_logging
    from core.settings import get_settings

    settings = get_settings()
    configure_logging(settings)
    wait_for_database(settings.database_url)
    upgrade_to_head(settings.database_url)
    worker_process = _start_worker(concurrency) if concurrency > 0 else None
    from app.main import app as api

    quiet_garbage_collector()
    try:
        # No log_config: uvicorn's records go through the root handler, in CONDENSER_LOG_FORMAT. Past
        # limit_concurrency connections uvicorn answers 503; the backlog queues connections not yet accepted.
        uvicorn.run(api, host=host, port=port, log_level="warning", log_config=None,
                    limit_concurrency=settings.http_max_connections, backlog=settings.http_max_connections,
                    timeout_keep_alive=settings.http_keepalive_seconds,
                    h11_max_incomplete_event_size=settings.http_max_header_bytes)
    finally:
        if worker_process is not None:
            _stop_worker(worker_process)


def quiet_garbage_collector() -> None:
    """Keep full garbage collections out of request latency (measured: bench/api_under_load.py's p99 with 1,000
    open event streams, 134 ms before, about 40 ms after).

    Every object imported so far (FastAPI, pydantic, SQLAlchemy: hundreds of thousands) lives as long as the
    process, yet CPython's collector walks them all on each full collection: freezing them takes them out of its
    walk. The youngest generation is then collected after 100,000 allocations instead of 700, so a thousand
    streams' small objects do not set off a collection every few requests; reference cycles are still freed.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def wait_for_database(url: str, first_delay: float = 0.5, max_delay: float = 10.0) -> None:
    """Return once the database takes a connection, retrying with backoff: in a compose file or a cluster the
    database may start after the service, and a service that exits would need a restart policy to recover."""
    import logging
    import time

    from sqlalchemy import create_engine, make_url
    from sqlalchemy.exc import OperationalError

    target = make_url(url)
    where = f"{target.host}:{target.port or 5432}/{target.database}" if target.host else target.database
    engine = create_engine(target)
    delay = first_delay
    try:
        for attempt in itertools.count(1):
            try:
                engine.connect().close()
                return
            except OperationalError as exc:
                reason = " ".join(str(exc.orig).split())[:200]
                logging.getLogger("condenser.serve").warning(
                    "waiting for the database at %s ... (attempt %d; retrying in %.1f s): %s", where, attempt, delay,
                    reason)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    finally:
        engine.dispose()


def _start_worker(concurrency: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker", *_worker_options(concurrency, "WARNING", quiet=True)],
                            preexec_fn=die_with_parent)


def die_with_parent() -> None:
    """Linux: SIGTERM the worker when `serve` dies, even by kill -9, so no orphan keeps running."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM: a running job checkpoints and is requeued for the next start.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="The tenant that owns what this key creates.")]) -> None:
    """Create a key and print it once; only its hash is stored."""
    from app.auth.service import create_key
    from core.db.migrate import upgrade_to_head
    from core.db.session import session_scope
    from core.settings import get_settings

    upgrade_to_head(get_settings().database_url)
    with session_scope() as session:
        _, plaintext = create_key(session, tenant)
    typer.echo(plaintext)


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant whose keys to list.")]) -> None:
    """List a tenant's keys by prefix."""
    from app.auth.service import list_keys
    from core.db.session import session_scope

    with session_scope() as session:
        for key in list_keys(session, tenant):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            typer.echo(f"{key.prefix}  {key.created_at:%Y-%m-%d %H:%M}  {state}")


@keys_app.command("revoke")
def keys_revoke(
    tenant: Annotated[str, typer.Option(help="Tenant that owns the key.")],
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
) -> None:
    """Revoke a key; requests with it fail at once."""
    from app.auth.service import revoke_key
    from core.db.session import session_scope

    with session_scope() as session:
        revoke_key(session, tenant, prefix)
    typer.echo(f"revoked {prefix}")


@app.command()
def demo(
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object last.")] = False,
    url: Annotated[str | None, typer.Option(help="Use a running server instead of starting one.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="CONDENSER_API_KEY", help="Key for --url.")] = None,
) -> None:
    """Train a teacher on digits, distill it through the HTTP API, download and check the student."""
    from app.demo import run_demo

    raise typer.Exit(run_demo(json_output=json_output, url=url, api_key=api_key))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
