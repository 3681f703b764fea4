"""`condenser pipelines`: submit a chain of stages and follow it with one bar per stage, list, show, cancel, read
the report that lays the stages side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.client_cli.common import (
    CliError,
    JsonOption,
    human_bytes,
    load_document,
    print_json,
    print_table,
    stderr_console,
    timestamp,
)
from app.client_cli.connection import connected
from app.client_cli.jobs import progress_fields
from app.client_cli.uploads import print_lineage

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from app.client import Client

pipelines_app = typer.Typer(help="Submit, follow, inspect and cancel pipelines (stages run as jobs, one after "
                            "another, with gates between them).", no_args_is_help=True)
# Stages that have a job at work: their bar moves (or pulses while its steps are unknown).
ACTIVE = ("queued", "running", "canceling")
TimeoutOption = Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")]


@pipelines_app.command("submit")
def pipelines_submit(
    ctx: typer.Context,
    document: Annotated[str, typer.Argument(help="The pipeline as a .yaml or .json file (`-`: standard input): "
                                            "model, dataset, stages: [{kind, after?, gate?, ...job settings}].")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it with one live bar per stage until it ends, then "
                                       "print its report; the exit code is 1 unless it succeeded.")] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a pipeline; prints its id (pip_...)."""
    body = load_document(document)
    with connected(ctx) as client:
        pipeline = client.submit_pipeline(body)
        follow_and_finish(client, pipeline, wait, timeout, as_json)


@pipelines_app.command("replay")
def pipelines_replay(
    ctx: typer.Context,
    pipeline_id: Annotated[str, typer.Argument(help="An ended pipeline (succeeded, failed or canceled).")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it with one live bar per stage until it ends, then "
                                       "print its report; the exit code is 1 unless it succeeded.")] = False,
    timeout: TimeoutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run an ended pipeline again: its stored stages on the same model and datasets (refused if one was deleted or
    changed since); prints the new pipeline's id. Its report shows the original's rows beside its own."""
    with connected(ctx) as client:
        follow_and_finish(client, client.replay_pipeline(pipeline_id), wait, timeout, as_json)


@pipelines_app.command("wait")
def pipelines_wait(ctx: typer.Context, pipeline_id: str,
                   timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
                   as_json: JsonOption = False) -> None:
    """Follow a pipeline with one bar per stage until it ends, then print its report; the exit code is 1 unless it
    succeeded."""
    with connected(ctx) as client:
        follow_and_finish(client, client.pipeline(pipeline_id), True, timeout, as_json, announce=False)


def follow_and_finish(client: Client, pipeline: dict[str, Any], wait: bool, timeout: float | None, as_json: bool,
                      announce: bool = True) -> None:
    """What every command that starts or follows a pipeline (submit, wait; a replay answers a new pipeline too)
    prints: its id, then with `wait` the live bars until it ends, its report and an exit code."""
    if announce and not as_json:
        typer.echo(pipeline["id"])
    if not wait:
        if as_json:
            print_json(pipeline)
        return
    pipeline = follow_with_bars(client, pipeline["id"], timeout)
    if as_json:
        print_json(pipeline)
    else:
        print_report(client.pipeline_report(pipeline["id"]))
    if pipeline["status"] != "succeeded":
        reason = f": {pipeline['error']}" if pipeline.get("error") else ""
        typer.echo(f"error: pipeline {pipeline['id']} {pipeline['status']}{reason}", err=True)
        raise typer.Exit(1)


# ---- live bars ----------------------------------------------------------------------------------------

def follow_with_bars(client: Client, pipeline_id: str, timeout: float | None) -> dict[str, Any]:
    """One bar per stage on stderr (status, epoch or steps, the server's ETA, the latest loss and accuracy; waiting
    and skipped stages say so) until the pipeline ends."""
    from rich.progress import BarColumn, Progress, TextColumn

    # markup=False: these texts come from the server and the submitter, never read as rich markup.
    columns = (TextColumn("{task.fields[name]}", markup=False), TextColumn("{task.description}", markup=False),
               BarColumn(), *(TextColumn(f"{{task.fields[{field}]}}", markup=False)
                              for field in ("steps", "eta", "metrics")))
    with Progress(*columns, console=stderr_console(), transient=False) as bars:
        tasks: dict[str, TaskID] = {}
        try:
            return client.wait_pipeline(pipeline_id, on_progress=lambda p: update_bars(bars, tasks, p),
                                        timeout=timeout)
        except KeyboardInterrupt:
            raise CliError(f"stopped following; the pipeline goes on (condenser pipelines cancel {pipeline_id} "
                           "stops it)") from None


def update_bars(bars: Progress, tasks: dict[str, TaskID], pipeline: dict[str, Any]) -> None:
    width = max(len(stage["name"]) for stage in pipeline["stages"])
    for stage in pipeline["stages"]:
        if stage["name"] not in tasks:
            tasks[stage["name"]] = bars.add_task("", name=stage["name"].ljust(width), steps="", eta="", metrics="")
        bars.update(tasks[stage["name"]], **stage_fields(stage))


def stage_fields(stage: dict[str, Any]) -> dict[str, Any]:
    """rich Progress fields of one stage's bar: its job's progress as `jobs submit --wait` shows it, the stage's
    gate once it is judged, and a still bar (empty, or full once it succeeded) when no job of it is at work."""
    fields = progress_fields({"status": stage["status"], "progress": stage.get("progress") or {}})
    status, total = stage["status"], fields["total"]
    fields["steps"] = f"{fields['completed']}/{total}" if total else ""
    if status == "waiting":
        fields["description"] = f"waiting for {stage['after']}"
    if status not in ACTIVE:
        fields["eta"] = ""  # the last estimate its job made, stale once the stage has ended
    if status == "succeeded":
        fields.update(completed=total or 1, total=total or 1)
        if stage.get("model_id"):
            fields["metrics"] = f"-> {stage['model_id']}"
    elif status not in ACTIVE and not total:
        fields.update(completed=0, total=1)  # a still, empty bar: waiting, skipped, or ended before a step
    verdict = gate_verdict(stage)
    if verdict:
        fields["description"] += f", gate {verdict}"
    return fields


def gate_text(stage: dict[str, Any]) -> str:
    """`<= 3 pts vs input`: the stage's gate, or "" without one."""
    gate = stage.get("gate")
    return f"<= {gate['max_accuracy_drop_pts']:g} pts vs {gate['against']}" if gate else ""


def gate_verdict(stage: dict[str, Any]) -> str:
    """passed / MISSED once the stage succeeded and its gate was judged; "" before, or without a gate."""
    if not stage.get("gate") or stage["status"] != "succeeded":
        return ""
    return "passed" if stage.get("gate_result") is None else "MISSED"


# ---- the report -----------------------------------------------------------------------------------------

def _percent(value: float) -> str:
    return f"{value:.2%}"


# The report's columns: (key, heading, how a value reads in a terminal).
REPORT_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("stage", "stage", str), ("kind", "kind", str), ("model", "model", str), ("precision", "precision", str),
    ("accuracy", "accuracy", _percent),
    ("formats", "accuracy per file", lambda formats: ", ".join(f"{fmt} {acc:.2%}" for fmt, acc in formats.items())),
    ("params", "params", lambda count: f"{count:,}"), ("macs", "MACs", lambda count: f"{count:,}"),
    ("file_bytes", "weights", human_bytes), ("torchscript_bytes", "TorchScript", human_bytes),
    ("cpu_latency_ms_batch1", "CPU ms (b1)", lambda ms: f"{ms:.3f}"), ("gate", "gate", str),
)


def report_cells(row: dict[str, Any]) -> list[str]:
    """One report row as the terminal shows it; an unmeasured figure is `-`."""
    return ["-" if row.get(key) in (None, "", {}) else show(row[key]) for key, _, show in REPORT_COLUMNS]


def print_report(report: dict[str, Any]) -> None:
    """The input model, then each stage that succeeded, side by side; then where the final model came from."""
    headings = [heading for _, heading, _ in REPORT_COLUMNS]
    print_table(headings, [report_cells(row) for row in report["rows"]])
    pipeline = report["pipeline"]
    if report.get("original_rows"):
        typer.echo(f"\nthe original, pipeline {pipeline['replay_of']}:")
        print_table(headings, [report_cells(row) for row in report["original_rows"]])
    if pipeline.get("final_model"):
        typer.echo(f"\nfinal model {pipeline['final_model']}; its lineage:")
        print_lineage(report["final_model_lineage"])


# ---- list, show, cancel, report -----------------------------------------------------------------------

@pipelines_app.command("list")
def pipelines_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only pipelines in this state (queued, running, succeeded, "
                                               "...).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    as_json: JsonOption = False,
) -> None:
    """Your pipelines, newest first."""
    with connected(ctx) as client:
        page = client.pipelines(status=status, limit=limit)
    if as_json:
        return print_json(page)
    print_table(["id", "name", "status", "stages done", "now", "created", "finished"],
                [[pipeline["id"], pipeline["name"], pipeline["status"], stages_done(pipeline),
                  ", ".join(pipeline["current_stages"]), timestamp(pipeline["created_at"]),
                  timestamp(pipeline.get("finished_at"))] for pipeline in page["items"]])


def stages_done(pipeline: dict[str, Any]) -> str:
    stages = pipeline["stages"]
    return f"{sum(stage['status'] == 'succeeded' for stage in stages)}/{len(stages)}"


@pipelines_app.command("show")
def pipelines_show(ctx: typer.Context, pipeline_id: str, as_json: JsonOption = False) -> None:
    """State of a pipeline and of each stage: its job, progress, the model it made, its gate."""
    with connected(ctx) as client:
        pipeline = client.pipeline(pipeline_id)
    if as_json:
        return print_json(pipeline)
    show_pipeline(pipeline)


def show_pipeline(pipeline: dict[str, Any]) -> None:
    accuracy = pipeline.get("input_accuracy")
    lines = [("id", pipeline["id"]), ("name", pipeline["name"]), ("status", pipeline["status"]),
             ("model", pipeline["model"]), ("dataset", pipeline["dataset"]),
             ("eval data", pipeline.get("eval_dataset")),
             ("input acc", None if accuracy is None else _percent(accuracy)), ("created", pipeline["created_at"]),
             ("finished", pipeline.get("finished_at")), ("final", pipeline.get("final_model")),
             ("error", pipeline.get("error"))]
    for name, value in lines:
        if value is not None:
            typer.echo(f"{name:<10}{value}")
    typer.echo("stages")
    print_table(["  name", "kind", "after", "status", "job", "model", "gate"],
                [[f"  {stage['name']}", stage["kind"], stage["after"], stage_status(stage), stage.get("job_id"),
                  stage.get("model_id"), ": ".join(filter(None, (gate_text(stage), gate_verdict(stage))))]
                 for stage in pipeline["stages"]])
    for stage in pipeline["stages"]:
        for problem in (stage.get("gate_result"), stage.get("error")):
            if problem:
                typer.echo(f"  {stage['name']}: {problem}")


def stage_status(stage: dict[str, Any]) -> str:
    """The stage's status, with where its job is while it runs (`running distill epoch 3/10`)."""
    if stage["status"] not in ACTIVE:
        return stage["status"]
    return progress_fields({"status": stage["status"], "progress": stage.get("progress") or {}})["description"]


@pipelines_app.command("cancel")
def pipelines_cancel(ctx: typer.Context, pipeline_id: str) -> None:
    """Cancel a pipeline: stages not started are dropped, a queued stage canceled, a running one stopped."""
    with connected(ctx) as client:
        pipeline = client.cancel_pipeline(pipeline_id)
    typer.echo(f"{pipeline['id']} {pipeline['status']}")


@pipelines_app.command("report")
def pipelines_report(
    ctx: typer.Context,
    pipeline_id: str,
    markdown: Annotated[bool, typer.Option("--markdown", help="The server's Markdown table (for a pull request "
                                           "or a wiki).")] = False,
    as_json: JsonOption = False,
) -> None:
    """The input model and every stage that succeeded side by side: accuracy per file, parameters, MACs, sizes,
    CPU latency, gates; and the final model's lineage."""
    with connected(ctx) as client:
        report = client.pipeline_report(pipeline_id, markdown=markdown)
    if markdown:
        typer.echo(report, nl=False)
    elif as_json:
        print_json(report)
    else:
        print_report(report)
