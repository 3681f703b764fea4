"""`condenser models` and `condenser datasets`: upload, list and delete; where a model came from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.client_cli.common import (
    JsonOption,
    existing_file,
    load_document,
    print_json,
    print_table,
    stderr_console,
    timestamp,
)
from app.client_cli.connection import connected

models_app = typer.Typer(help="Upload, list and delete models, and trace where one came from.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload, list and delete datasets.", no_args_is_help=True)
LimitOption = Annotated[int, typer.Option(min=1, max=100)]
IncludeDeletedOption = Annotated[bool, typer.Option("--include-deleted", help="List deleted ones too.")]


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
                           f"{_count(model['param_count'])} parameters, sha256 {model['sha256'][:12]}",
                           highlight=False, markup=False)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


@models_app.command("list")
def models_list(ctx: typer.Context, limit: LimitOption = 20, include_deleted: IncludeDeletedOption = False,
                as_json: JsonOption = False) -> None:
    """Your models, newest first."""
    _list_resource(ctx, "models", limit, include_deleted, as_json,
                   ["id", "name", "arch", "classes", "params", "created"],
                   lambda m: [m["id"], m["name"], m["arch"], m["num_classes"], _count(m["param_count"]),
                              timestamp(m["created_at"])])


@models_app.command("delete")
def models_delete(ctx: typer.Context, model_id: str) -> None:
    """Delete a model: no new job may use it, and its file goes once nothing else holds it (refused while a
    queued or running job uses it)."""
    with connected(ctx) as client:
        client.delete_model(model_id)
    typer.echo(f"deleted {model_id}")


@models_app.command("lineage")
def models_lineage(ctx: typer.Context, model_id: str, as_json: JsonOption = False) -> None:
    """Where a model came from: the job that made it, that job's input model, ... back to the upload (the server's
    JSON with --json also has each job's spec, inputs with their sha256, and engine versions)."""
    with connected(ctx) as client:
        lineage = client.model_lineage(model_id)
    if as_json:
        return print_json(lineage)
    print_lineage(lineage["chain"])


def print_lineage(chain: list[dict[str, Any]]) -> None:
    """The chain newest first, a line per model and per job between two models:
    mdl_c  name  int8 / <- quantize job_c (pipeline pip_1, stage quantize) / mdl_b ... / mdl_a  name  float32  upload"""
    for step in chain:
        model, job = step["model"], step["made_by"]
        deleted = "  (deleted)" if model.get("deleted") else ""
        typer.echo(f"{model['id']}  {model['name']}  {model['precision']}"
                   f"{'  upload' if job is None else ''}{deleted}")
        if job is not None:
            where = f" (pipeline {job['pipeline_id']}, stage {job['stage']})" if job.get("pipeline_id") else ""
            typer.echo(f"  <- {job['kind']} {job['id']}{where}")


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
                           f"{dataset['num_classes']} classes, shape {dataset['image_shape']}",
                           highlight=False, markup=False)


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, limit: LimitOption = 20, include_deleted: IncludeDeletedOption = False,
                  as_json: JsonOption = False) -> None:
    """Your datasets, newest first (the built-ins, `digits`, `photo-patches` and `shapes`, need no upload)."""
    _list_resource(ctx, "datasets", limit, include_deleted, as_json,
                   ["id", "name", "images", "classes", "shape", "created"],
                   lambda d: [d["id"], d["name"], d["num_samples"], d["num_classes"], d["image_shape"],
                              timestamp(d["created_at"])])


@datasets_app.command("delete")
def datasets_delete(ctx: typer.Context, dataset_id: str) -> None:
    """Delete an uploaded dataset: no new job may use it (refused while a queued or running job uses it)."""
    with connected(ctx) as client:
        client.delete_dataset(dataset_id)
    typer.echo(f"deleted {dataset_id}")


def _list_resource(ctx: typer.Context, resource: str, limit: int, include_deleted: bool, as_json: bool,
                   columns: list[str], row: Any) -> None:
    with connected(ctx) as client:
        page = client.page(resource, limit=limit, **({"include_deleted": "true"} if include_deleted else {}))
    if as_json:
        return print_json(page)
    rows = [row(item) for item in page["items"]]
    if include_deleted:
        columns = [*columns, "deleted"]
        rows = [[*cells, timestamp(item.get("deleted_at"))] for cells, item in zip(rows, page["items"], strict=True)]
    print_table(columns, rows)
