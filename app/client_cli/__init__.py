"""The user commands of `condenser` (models, datasets, jobs, pipelines, artifacts, login, config), on app.client.

Importing this package stays cheap: httpx, rich and yaml are imported by the commands that use them.
"""

from __future__ import annotations

import typer

from app.client_cli.artifacts import artifacts_app
from app.client_cli.connection import config_app, login
from app.client_cli.jobs import jobs_app
from app.client_cli.pipelines import pipelines_app
from app.client_cli.uploads import datasets_app, models_app


def add_commands(app: typer.Typer) -> None:
    """Attach the user commands to the root `condenser` app."""
    app.command()(login)
    app.add_typer(config_app, name="config")
    app.add_typer(models_app, name="models")
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(pipelines_app, name="pipelines")
    app.add_typer(artifacts_app, name="artifacts")
