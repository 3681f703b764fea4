"""`condenser jobs`: submit, follow with a progress bar, list, show, print the history, cancel, replay."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.client import TERMINAL
from app.client_cli.common import (
    CliError,
    JsonOption,
    flat_metrics,
    human_bytes,
    load_document,
    print_json,
    print_table,
    stderr_console,
    timestamp,
)
from app.client_cli.connection import connected

if TYPE_CHECKING:
    from app.client import Client

WaitOption = Annotated[bool, typer.Option("--wait", help="Follow it with a progress bar until it ends; the exit "
                                          "code is 1 unless it succeeded.")]
TimeoutOption = Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")]

jobs_app = typer.Typer(help="Submit, follow, inspect and cancel jobs.", no_args_is_help=True)


@jobs_app.command("submit")
def jobs_submit(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(help="The job as a .yaml or .json file (`-`: standard input), e.g. "
                                        "kind: distill, teacher: mdl_..., dataset: digits, "
                                        "student: {arch: small_cnn}, epochs: 10. An ensemble names "
                                        "teachers: [{model: mdl_...}, {model: mdl_..., weight: 2}] instead of "
                                        "teacher; a multi-task job tasks: [{name, dataset, teachers}, ...] "
                                        "instead of teacher and dataset.")],
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job; prints its id (job_...)."""
    document = load_document(spec)
    _create_and_follow(ctx, lambda client: client.submit(document), wait, timeout, as_json)


@jobs_app.command("replay")
def jobs_replay(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="An ended job (succeeded, failed or canceled).")],
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run an ended job again: its stored spec on the same model and datasets (refused if one was deleted or
    changed since); prints the new job's id. Its report shows the original's figures beside its own."""
    _create_and_follow(ctx, lambda client: client.replay_job(job_id), wait, timeout, as_json)


def _create_and_follow(ctx: typer.Context, create: Callable[[Client], dict[str, Any]], wait: bool,
                       timeout: float | None, as_json: bool) -> None:
    """Create a job, print its id, and with --wait follow it to its end."""
    with connected(ctx) as client:
        job = create(client)
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
    if description not in TERMINAL:  # once finished, the last progress written is of a stage the job has left
        description += _stage(progress)
    eta = progress.get("eta_seconds")
    metrics = "  ".join(f"{label} {progress[name]:.4f}" for name, label in
                        (("train_loss", "loss"), ("val_accuracy", "val acc")) if progress.get(name) is not None)
    # A multi-task run: each head's accuracy after the mean.
    metrics += "".join(f"  {task} {accuracy:.4f}" for task, accuracy in
                       (progress.get("val_accuracy_by_task") or {}).items())
    return {"description": description, "completed": progress.get("step") or 0,
            "total": progress.get("total_steps"), "eta": f"ETA {_duration(eta)}" if eta is not None else "",
            "metrics": metrics}


def _stage(progress: dict[str, Any]) -> str:
    if progress.get("stage_steps"):
        return f" {progress.get('stage')} {progress.get('stage_step') or 0}/{progress['stage_steps']}"
    if progress.get("epoch") is not None:
        return f" {progress.get('stage') or ''} epoch {progress['epoch']}/{progress.get('epochs')}"
    return f" {progress['stage']}" if progress.get("stage") else ""


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


def format_line(entry: dict[str, Any]) -> str:
    """One file's verdict: accuracy, agreement with its float source, drop against the input model."""
    parts = [f"{entry['format']}: accuracy {entry['accuracy']:.2%}"]
    if entry.get("agreement") is not None:
        parts.append(f"agreement {entry['agreement']:.2%} with the {entry['agreement_with']}")
    for key, against in (("drop_pts", "the input model"), ("source_drop_pts", "its float source")):
        if entry.get(key) is not None:
            parts.append(f"{-entry[key]:+.2f} pts vs {against}")
            break
    parts.append("passed" if entry["passed"] else f"REJECTED: {'; '.join(entry.get('reasons') or ['failed'])}")
    return ", ".join(parts)


def show_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    lines = [("id", job["id"]), ("kind", job["kind"]), ("status", job["status"]),
             ("attempt", f"{job['attempt']} of {job['max_attempts']}"), ("model", job["model"]),
             ("dataset", job["dataset"]), ("replay of", job.get("replay_of")), ("pipeline", job.get("pipeline_id")),
             ("stage", job.get("stage")), ("created", job["created_at"]), ("finished", job.get("finished_at")),
             ("error", job.get("error"))]
    if job["status"] in ("running", "canceling") and progress.get("epoch") is not None:
        lines.append(("progress", progress_fields({"status": job["status"], "progress": progress})["description"]))
    for name, value in lines:
        if value is not None:
            typer.echo(f"{name:<10}{value}")
    summary = job.get("summary") or {}
    if summary.get("evaluation"):
        typer.echo(f"{'evaluated':<10}{summary['evaluation']['note']}")
    for entry in summary.get("formats") or []:
        typer.echo(f"{'format':<10}{format_line(entry)}")
    for task in summary.get("tasks") or []:
        typer.echo(f"{'task':<10}{task['name']}: {task['accuracy']:.2%} (its teachers {task['teacher_accuracy']:.2%}), "
                   f"{'passed' if task['passed'] else 'REJECTED'}")
    if summary.get("control"):
        control = summary["control"]
        typer.echo(f"{'control':<10}the student trained alone {control['accuracy']:.2%}; KD gain "
                   f"{control['kd_gain_pts']:+.2f} pts")
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
