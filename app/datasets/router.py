"""/v1/datasets: upload image datasets, list and read them, and describe the built-ins."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app import quotas
from app.datasets import service
from app.datasets.schemas import BUILTIN_DESCRIPTIONS, UPLOAD_OPENAPI, BuiltinDatasetOut, DatasetOut, DatasetPage
from app.deps import (
    CurrentPrincipal,
    DbSession,
    IdempotencyKey,
    SettingsDep,
    StoreDep,
    mark_replayed,
    release_connection,
)
from app.idempotency import CREATED_RESPONSE
from app.ids import DatasetId
from app.pagination import (
    DEFAULT_LIMIT,
    CursorQuery,
    IncludeDeletedQuery,
    LimitQuery,
    PageRequest,
    next_link,
)
from app.routing import BoundedBodyRoute
from app.schemas import error_responses
from app.uploads import receive_upload
from worker.engine.config import BUILTIN_DATASETS

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=BoundedBodyRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset",
    openapi_extra=UPLOAD_OPENAPI,
    responses={**CREATED_RESPONSE, **error_responses(400, 409, 413, 415, 422)},
)
async def upload_dataset(request: Request, response: Response, principal: CurrentPrincipal, session: DbSession,
                         settings: SettingsDep, store: StoreDep, idempotency_key: IdempotencyKey = None) -> DatasetOut:
    """Upload a labelled image dataset (multipart field `file`).

    Accepted: an `.npz` with arrays `x` (N x H x W [x C] images) and `y` (N integer labels, optionally
    `class_names`), or a zip / tar(.gz) archive of class folders (`cat/1.png`, `dog/2.jpg`, ...). Archives are
    read with limits on entries, sizes, compression ratio and image pixels; members outside their folder,
    links and special files are refused (422 with the reason, nothing stored). The storage quota counts the
    canonical .npz (uint8 images), not the upload: a dataset whose canonical form does not fit is a 413.

    Example: `curl -H "Authorization: Bearer $KEY" -F file=@flowers.zip http://localhost:8000/v1/datasets`
    """
    quotas.check_storage(session, principal.tenant, settings)
    release_connection(session)
    async with receive_upload(request, store, settings.max_upload_bytes, service.TEXT_FIELDS) as upload:
        outcome = await run_in_threadpool(service.register_dataset, session, principal.tenant, upload,
                                          idempotency_key, store, settings)
    mark_replayed(response, outcome.replayed)
    return DatasetOut.from_row(outcome.resource)


@router.get("", response_model=DatasetPage, summary="List datasets", responses=error_responses())
def list_datasets(request: Request, principal: CurrentPrincipal, session: DbSession,
                  limit: LimitQuery = DEFAULT_LIMIT, cursor: CursorQuery = None,
                  include_deleted: IncludeDeletedQuery = False) -> DatasetPage:
    """The tenant's uploaded datasets, newest first (deleted ones only with `include_deleted=true`). `builtin`
    names the datasets every tenant can use."""
    rows, next_cursor = service.list_datasets(session, principal.tenant, PageRequest(limit, cursor),
                                              include_deleted)
    return DatasetPage(items=[DatasetOut.from_row(row) for row in rows], next_cursor=next_cursor,
                       next=next_link(request, next_cursor))


@router.get("/builtin", response_model=list[BuiltinDatasetOut], summary="List built-in datasets",
            responses=error_responses())
def list_builtin_datasets(_: CurrentPrincipal) -> list[BuiltinDatasetOut]:
    """Datasets that need no upload: pass the name as a job's `dataset`."""
    return [
        BuiltinDatasetOut(name=name, description=BUILTIN_DESCRIPTIONS[name],
                          **service.builtin_summary(name).model_dump())
        for name in BUILTIN_DATASETS
    ]


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset", responses=error_responses(404))
def get_dataset(dataset_id: DatasetId, principal: CurrentPrincipal, session: DbSession) -> DatasetOut:
    """One uploaded dataset by id (404 if it does not exist or belongs to another tenant); a deleted one has
    `deleted_at`."""
    return DatasetOut.from_row(service.get_dataset(session, principal.tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a dataset",
               responses=error_responses(404, 409))
def delete_dataset(dataset_id: DatasetId, principal: CurrentPrincipal, session: DbSession) -> Response:
    """Delete an uploaded dataset: no new job may use it, listings and the storage quota leave it out, and its
    file is removed once no other dataset holds the same images. The record stays, with `deleted_at` set, for the
    jobs and lineage that name it.

    409 while a queued or running job (or an unfinished pipeline) uses it. Deleting it again is a 204 as well.
    """
    service.delete_dataset(session, principal.tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
