"""`condenser artifacts`: download what jobs produced."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.client_cli.common import CliError, stderr_console
from app.client_cli.connection import connected

artifacts_app = typer.Typer(help="Download what jobs produced.", no_args_is_help=True)


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
