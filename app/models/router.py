"""/v1/models: upload teacher weights with their architecture, list and read them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app import quotas
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
from app.ids import ModelId
from app.models import service
from app.models.schemas import UPLOAD_OPENAPI, Lineage, ModelOut, ModelPage
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

router = APIRouter(prefix="/models", tags=["models"], route_class=BoundedBodyRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    summary="Upload a teacher model",
    openapi_extra=UPLOAD_OPENAPI,
    responses={**CREATED_RESPONSE, **error_responses(400, 409, 413, 415, 422)},
)
async def upload_model(request: Request, response: Response, principal: CurrentPrincipal, session: DbSession,
                       settings: SettingsDep, store: StoreDep, idempotency_key: IdempotencyKey = None) -> ModelOut:
    """Upload weights (multipart field `file`) and their architecture (`spec`, JSON).

    The body is streamed to disk with a size cap. The weights are then loaded into the architecture in a
    separate process; if they do not fit (missing or extra tensors, wrong shapes, wrong num_classes) the
    answer is 422 with the reason and nothing is stored.

    Example: `curl -H "Authorization: Bearer $KEY" -F file=@teacher.safetensors
    -F 'spec={"arch":"small_cnn","kwargs":{"num_classes":10},"input":{"image_size":8,"channels":1}}'
    http://localhost:8000/v1/models`
    """
    quotas.check_storage(session, principal.tenant, settings)
    release_connection(session)
    async with receive_upload(request, store, settings.max_upload_bytes, service.TEXT_FIELDS) as upload:
        outcome = await run_in_threadpool(service.register_model, session, principal.tenant, upload,
                                          idempotency_key, store, settings)
    mark_replayed(response, outcome.replayed)
    return ModelOut.from_row(outcome.resource)


@router.get("", response_model=ModelPage, summary="List models", responses=error_responses())
def list_models(request: Request, principal: CurrentPrincipal, session: DbSession,
                limit: LimitQuery = DEFAULT_LIMIT, cursor: CursorQuery = None,
                include_deleted: IncludeDeletedQuery = False) -> ModelPage:
    """The tenant's models, newest first; deleted ones only with `include_deleted=true`."""
    rows, next_cursor = service.list_models(session, principal.tenant, PageRequest(limit, cursor),
                                            include_deleted)
    return ModelPage(items=[ModelOut.from_row(row) for row in rows], next_cursor=next_cursor,
                     next=next_link(request, next_cursor))


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model", responses=error_responses(404))
def get_model(model_id: ModelId, principal: CurrentPrincipal, session: DbSession) -> ModelOut:
    """One model by id (404 if it does not exist or belongs to another tenant); a deleted one has `deleted_at`."""
    return ModelOut.from_row(service.get_model(session, principal.tenant, model_id))


@router.get("/{model_id}/lineage", response_model=Lineage, summary="A model's lineage",
            responses=error_responses(404))
def model_lineage(model_id: ModelId, principal: CurrentPrincipal, session: DbSession) -> Lineage:
    """The chain of jobs that made this model, back to the upload it started from: each job's kind, stored spec,
    inputs (model, dataset and eval_dataset ids with their sha256) and engine versions."""
    return service.model_lineage(session, principal.tenant, model_id)


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a model",
               responses=error_responses(404, 409))
def delete_model(model_id: ModelId, principal: CurrentPrincipal, session: DbSession) -> Response:
    """Delete a model: no new job may use it, listings and the storage quota leave it out, and its file is
    removed once nothing else holds the same content (a job's result model shares its file with the job's
    artifact, which stays). The record stays, with `deleted_at` set, for the jobs and lineage that name it.

    409 while a queued or running job (or an unfinished pipeline) uses it. Deleting it again is a 204 as well.
    """
    service.delete_model(session, principal.tenant, model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
