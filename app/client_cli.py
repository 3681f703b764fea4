"""The user commands of `condenser` (models, datasets, jobs, artifacts, login, config), on app.client.

The server's URL and API key come from, in this order: the --url / --api-key options (before the
sub-command), the CONDENSER_URL / CONDENSER_API_KEY environment variables, the config file that
`condenser login` writes (~/.config/condenser/config.toml; CONDENSER_CONFIG names another).
Importing this module stays cheap: httpx, rich and yaml are imported by the commands that use them.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from app.client import Client

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_ENV, URL_ENV, CONFIG_ENV = "CONDENSER_API_KEY", "CONDENSER_URL", "CONDENSER_CONFIG"


class CliError(Exception):
    """Bad input on the command line: one line on stderr, exit code 2 (as for usage errors)."""

    exit_code = 2


@dataclass
class Connection:
    """What the root options said; the rest is filled from the environment and the config file."""

    url: str | None = None
    api_key: str | None = None


JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a summary.")]

models_app = typer.Typer(help="Upload and list models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, follow, inspect and cancel jobs.", no_args_is_help=True)
artifacts_app = typer.Typer(help="Download what jobs produced.", no_args_is_help=True)
config_app = typer.Typer(help="Where the CLI finds the server and the key.", no_args_is_help=True)


# ---- configuration ------------------------------------------------------------------------------

def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "condenser" / "config.toml"


def read_config() -> dict[str, str]:
    path = config_path()
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read the config file {path}: {exc}") from exc
    return {name: value for name, value in values.items() if isinstance(value, str)}


def write_config(values: dict[str, str]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    # Created readable by the owner only: it holds an API key. JSON strings are valid TOML strings.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items()))
    temporary.replace(path)
    return path


def resolve(connection: Connection) -> tuple[str, str | None, str]:
    """(url, api key, where the key came from)."""
    stored = read_config()
    url = connection.url or os.environ.get(URL_ENV) or stored.get("url") or DEFAULT_URL
    for value, source in ((connection.api_key, "--api-key"), (os.environ.get(KEY_ENV), KEY_ENV),
                          (stored.get("api_key"), str(config_path()))):
        if value:
            return url, value, source
    return url, None, "nowhere"


def _connection(ctx: typer.Context) -> Connection:
    root = ctx.find_root()
    if not isinstance(root.obj, Connection):
        root.obj = Connection()
    return root.obj


def open_client(ctx: typer.Context) -> Client:
    from app.client import Client

    url, key, _ = resolve(_connection(ctx))
    if not key:
        raise CliError(f"no API key: pass --api-key, set {KEY_ENV}, or run `condenser login`")
    return Client(url, key)


@contextmanager
def connected(ctx: typer.Context) -> Iterator[Client]:
    with open_client(ctx) as client:
        yield client


def login(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help=f"The server (default: {DEFAULT_URL}).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Your key (asked for when not given).")] = None,
) -> None:
    """Check a URL and key against the server and save them in the config file."""
    from app.client import Client

    root = _connection(ctx)
    url = url or root.url or os.environ.get(URL_ENV) or read_config().get("url") or DEFAULT_URL
    key = api_key or root.api_key or os.environ.get(KEY_ENV) or typer.prompt("API key", hide_input=True)
    with Client(url, key) as client:
        me = client.whoami()
    path = write_config({**read_config(), "url": url, "api_key": key})
    typer.echo(f"logged in to {url} as tenant {me['tenant']} (key cnd_{me['key_prefix']}); saved to {path}")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """The URL and key the other commands would use, and where they come from."""
    url, key, source = resolve(_connection(ctx))
    shown = f"{key[:12]}... (from {source})" if key else f"none: pass --api-key, set {KEY_ENV} or run `condenser login`"
    typer.echo(f"url      {url}\napi key  {shown}\nconfig   {config_path()}")


# ---- input files --------------------------------------------------------------------------------

def load_document(text_or_path: str) -> dict[str, Any]:
    """A JSON object given inline, or a .json / .yaml file (`-`: standard input)."""
    import yaml

    if text_or_path.lstrip().startswith("{"):
        text, where = text_or_path, "the inline spec"
    elif text_or_path == "-":
        text, where = sys.stdin.read(), "standard input"
    else:
        path = Path(text_or_path)
        if not path.is_file():
            raise CliError(f"{path}: no such file")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {path}: {exc}") from exc
    try:
        # YAML is a superset of JSON: one parser reads both.
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"{where} is neither valid YAML nor JSON: {' '.join(str(exc).split())}") from exc
    if not isinstance(document, dict):
        raise CliError(f"{where} must hold a mapping (key: value pairs), not {type(document).__name__}")
    return document


def existing_file(path: Path) -> Path:
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    return path


# ---- output -------------------------------------------------------------------------------------

def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in columns:
        # Ids and hashes are copied from here: folded when the terminal is narrow, never cut short.
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    # Piped or captured: as wide as the rows need, so each row stays one line for grep and awk.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def timestamp(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else ""


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Numbers and short strings of the (nested) metrics as dotted names; lists (histories) are skipped."""
    for name, value in metrics.items():
        if isinstance(value, dict):
            yield from flat_metrics(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            yield f"{prefix}{name}", f"{value:.4g}"
        elif isinstance(value, int | str | bool) and value is not None:
            yield f"{prefix}{name}", value


# ---- models and datasets ------------------------------------------------------------------------

@models_app.command("upload")
def models_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Weights: .safetensors or a state_dict .pt.")],
    spec: Annotated[str, typer.Option(help="Architecture and input, as JSON or a .json/.yaml file: "
                                      '{"arch": "small_cnn", "kwargs": {"num_classes": 10}, '
                                      '"input": {"image_size": 8, "channels": 1}}')],
    name: Annotated[str | None, typer.Option(help="A name to recognize it by.")] = None,
    model_format: Annotated[str | None, typer.Option("--format", help="Override the detected format.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a model; prints its id (mdl_...)."""
    with connected(ctx) as client:
        model = client.upload_model(existing_file(file), load_document(spec), name=name, model_format=model_format)
    if as_json:
        return print_json(model)
    typer.echo(model["id"])
    stderr_console().print(f"uploaded {model['name']}: {model['arch']}, {model['num_classes']} classes, "
                           f"{_count(model['param_count'])} parameters, sha256 {model['sha256'][:12]}", highlight=False)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


@models_app.command("list")
def models_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
                as_json: JsonOption = False) -> None:
    """Your models, newest first."""
    _list_resource(ctx, "models", limit, as_json, ["id", "name", "arch", "classes", "params", "created"],
                   lambda m: [m["id"], m["name"], m["arch"], m["num_classes"], _count(m["param_count"]),
                              timestamp(m["created_at"])])


@datasets_app.command("upload")
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An ImageFolder .zip/.tar, or an .npz with x and y.")],
    name: Annotated[str | None, typer.Option(help="A name to recognize it by.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset; prints its id (dst_...)."""
    with connected(ctx) as client:
        dataset = client.upload_dataset(existing_file(file), name=name)
    if as_json:
        return print_json(dataset)
    typer.echo(dataset["id"])
    stderr_console().print(f"uploaded {dataset['name']}: {dataset['num_samples']:,} images, "
                           f"{dataset['num_classes']} classes, shape {dataset['image_shape']}", highlight=False)


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
                  as_json: JsonOption = False) -> None:
    """Your datasets, newest first (the built-in `digits` needs no upload)."""
    _list_resource(ctx, "datasets", limit, as_json, ["id", "name", "images", "classes", "shape", "created"],
                   lambda d: [d["id"], d["name"], d["num_samples"], d["num_classes"], d["image_shape"],
                              timestamp(d["created_at"])])


def _list_resource(ctx: typer.Context, resource: str, limit: int, as_json: bool, columns: list[str],
                   row: Any) -> None:
    with connected(ctx) as client:
        page = client.page(resource, limit=limit)
    if as_json:
        return print_json(page)
    print_table(columns, [row(item) for item in page["items"]])


# ---- jobs ---------------------------------------------------------------------------------------

@jobs_app.command("submit")
def jobs_submit(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(help="The job as a .yaml or .json file (`-`: standard input), e.g. "
                                        "kind: distill, teacher: mdl_..., dataset: digits, "
                                        "student: {arch: small_cnn}, epochs: 10.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it with a progress bar until it ends; the exit "
                                       "code is 1 unless it succeeded.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job; prints its id (job_...)."""
    document = load_document(spec)
    with connected(ctx) as client:
        job = client.submit(document)
        if not as_json:
            typer.echo(job["id"])
        if wait:
            job = follow_with_bar(client, job["id"], timeout)
    finish_job_output(job, as_json, waited=wait)


@jobs_app.command("wait")
def jobs_wait(ctx: typer.Context, job_id: str,
              timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
              as_json: JsonOption = False) -> None:
    """Follow a job with a progress bar until it ends; the exit code is 1 unless it succeeded."""
    with connected(ctx) as client:
        job = follow_with_bar(client, job_id, timeout)
    finish_job_output(job, as_json, waited=True)


def follow_with_bar(client: Client, job_id: str, timeout: float | None) -> dict[str, Any]:
    """Progress bar on stderr (epoch, steps, the server's ETA, the latest loss and accuracy) until the end."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, console=stderr_console(), transient=False) as bar:
        task = bar.add_task("queued", total=None, eta="", metrics="")

        def show(snapshot: dict[str, Any]) -> None:
            bar.update(task, **progress_fields(snapshot))

        try:
            return client.wait(job_id, on_progress=show, timeout=timeout)
        except KeyboardInterrupt:
            raise CliError(f"stopped following; the job goes on (condenser jobs cancel {job_id} stops it)") \
                from None


def progress_fields(snapshot: dict[str, Any]) -> dict[str, Any]:
    """rich Progress fields for a {"status", "progress"} snapshot."""
    progress = snapshot.get("progress") or {}
    description = snapshot["status"]
    if progress.get("epoch") is not None:
        description += f" {progress.get('stage') or ''} epoch {progress['epoch']}/{progress.get('epochs')}"
    elif progress.get("stage"):
        description += f" {progress['stage']}"
    eta = progress.get("eta_seconds")
    metrics = "  ".join(f"{label} {progress[name]:.4f}" for name, label in
                        (("train_loss", "loss"), ("val_accuracy", "val acc")) if progress.get(name) is not None)
    return {"description": description, "completed": progress.get("step") or 0,
            "total": progress.get("total_steps"), "eta": f"ETA {_duration(eta)}" if eta is not None else "",
            "metrics": metrics}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def finish_job_output(job: dict[str, Any], as_json: bool, waited: bool) -> None:
    if as_json:
        print_json(job)
    elif waited:
        show_job(job)
    if waited and job["status"] != "succeeded":
        reason = f": {job['error']}" if job.get("error") else ""
        typer.echo(f"error: job {job['id']} {job['status']}{reason}", err=True)
        raise typer.Exit(1)


def show_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    lines = [("id", job["id"]), ("kind", job["kind"]), ("status", job["status"]),
             ("attempt", f"{job['attempt']} of {job['max_attempts']}"), ("model", job["model"]),
             ("dataset", job["dataset"]), ("created", job["created_at"]), ("finished", job.get("finished_at")),
             ("error", job.get("error"))]
    if job["status"] in ("running", "canceling") and progress.get("epoch") is not None:
        lines.append(("progress", progress_fields({"status": job["status"], "progress": progress})["description"]))
    for name, value in lines:
        if value is not None:
            typer.echo(f"{name:<10}{value}")
    summary = job.get("summary") or {}
    for entry in summary.get("formats") or []:
        verdict = "passed" if entry["passed"] else "FAILED: not a usable result"
        typer.echo(f"{'format':<10}{entry['format']}: accuracy {entry['accuracy']:.2%}, "
                   f"{-entry['drop_pts']:+.2f} pts vs its float source, {verdict}")
    metrics = list(flat_metrics(job.get("metrics") or {}))
    if metrics:
        typer.echo("metrics")
        for name, value in metrics:
            typer.echo(f"  {name:<40}{value}")
    if job.get("artifacts"):
        typer.echo("artifacts")
        print_table(["  id", "file", "runtime", "size", "sha256"],
                    [[f"  {a['id']}", a["filename"], a["runtime"], human_bytes(a["bytes"]), a["sha256"][:16]]
                     for a in job["artifacts"]])


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state (queued, running, succeeded, ...).")] =
    None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    as_json: JsonOption = False,
) -> None:
    """Your jobs, newest first."""
    with connected(ctx) as client:
        page = client.list(status=status, limit=limit)
    if as_json:
        return print_json(page)

    def epoch(job: dict[str, Any]) -> str:
        progress = job.get("progress") or {}
        return f"{progress['epoch']}/{progress.get('epochs')}" if progress.get("epoch") is not None else ""

    print_table(["id", "kind", "status", "epoch", "created", "finished"],
                [[job["id"], job["kind"], job["status"], epoch(job), timestamp(job["created_at"]),
                  timestamp(job.get("finished_at"))] for job in page["items"]])


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str, as_json: JsonOption = False) -> None:
    """State, progress, metrics and artifacts of a job."""
    with connected(ctx) as client:
        job = client.get(job_id)
    if as_json:
        return print_json(job)
    show_job(job)


@jobs_app.command("logs")
def jobs_logs(
    ctx: typer.Context,
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until the job ends.")]
    = False,
    as_json: JsonOption = False,
) -> None:
    """A job's history: state changes, finished epochs, log lines, webhook attempts."""
    with connected(ctx) as client:
        if not follow:
            for event in client.history(job_id):
                _print_event(event, as_json)
            return
        for streamed in client.events(job_id):
            if streamed.id is not None:
                _print_event(streamed.data, as_json)


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event))
        return
    data = {name: value for name, value in (event.get("data") or {}).items() if value is not None}
    details = "  " + " ".join(f"{name}={_short(value)}" for name, value in data.items()) if data else ""
    typer.echo(f"{event['at'][:19].replace('T', ' ')}  {event['kind']:<8} {event.get('status') or '':<10} "
               f"{event['message']}{details}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a queued job now, or ask a running one to stop between steps."""
    with connected(ctx) as client:
        job = client.cancel(job_id)
    typer.echo(f"{job['id']} {job['status']}")


# ---- artifacts ----------------------------------------------------------------------------------

@artifacts_app.command("download")
def artifacts_download(
    ctx: typer.Context,
    artifact_or_job: Annotated[str, typer.Argument(help="An artifact id (art_...), or a job id (job_...) for all "
                                                   "of the job's artifacts.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="A folder, or a file name for one artifact.")] =
    Path("."),
) -> None:
    """Download with a progress bar; resumes an interrupted download and checks the sha256."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with connected(ctx) as client:
        if artifact_or_job.startswith("job_"):
            ids = [artifact["id"] for artifact in client.job_artifacts(artifact_or_job)]
            if not ids:
                raise CliError(f"job {artifact_or_job} has no artifacts (yet): they appear when it succeeds")
            output.mkdir(parents=True, exist_ok=True)
        else:
            ids = [artifact_or_job]
        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                      console=stderr_console()) as bar:
            for artifact_id in ids:
                task = bar.add_task(artifact_id, total=None)
                done = client.download(artifact_id, output,
                                       on_bytes=lambda sent, total, task=task: bar.update(task, completed=sent,
                                                                                          total=total))
                bar.update(task, description=done.path.name, completed=done.bytes, total=done.bytes)
                typer.echo(f"{done.path}  sha256 {done.sha256}")


def add_commands(app: typer.Typer) -> None:
    """Attach the user commands to the root `condenser` app."""
    app.command()(login)
    app.add_typer(config_app, name="config")
    app.add_typer(models_app, name="models")
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(artifacts_app, name="artifacts")
