"""/v1/pipelines: submit a chain of jobs with gates between them, follow it stage by stage, cancel it, read its
report."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response, status

from app.deps import CurrentPrincipal, DbSession, IdempotencyKey, SettingsDep, StoreDep, mark_replayed
from app.idempotency import CREATED_RESPONSE
from app.ids import PipelineId
from app.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, PageRequest, next_link
from app.pipelines import detail, service
from app.pipelines.schemas import PipelineCreate, PipelineOut, PipelinePage, PipelineReport, PipelineStatus
from app.routing import BoundedBodyRoute
from app.schemas import error_responses

router = APIRouter(prefix="/pipelines", tags=["pipelines"], route_class=BoundedBodyRoute)
MARKDOWN = "text/markdown"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=PipelineOut, summary="Submit a pipeline",
             responses={**CREATED_RESPONSE, **error_responses(404, 409, 422, 429)})
def submit_pipeline(body: PipelineCreate, response: Response, principal: CurrentPrincipal, session: DbSession,
                    settings: SettingsDep, idempotency_key: IdempotencyKey = None) -> PipelineOut:
    """Run stages one after another, each an ordinary job (same leases, retries, cancel, events and artifacts as
    POST /v1/jobs) on the model the stage before it made.

    Every stage is checked now, against the model the stage before it will make: a mistake anywhere is a 422
    before anything runs. A stage starts when the stage it comes `after` has succeeded and passed its `gate`;
    stages after the same stage run at once, on whichever workers are free. A stage that fails or misses its gate
    ends the pipeline (`failed`, with the reason); the models of the stages before it stay, usable and
    downloadable. Every stage's result is a model (`stages[].model_id`) usable in any job.
    """
    outcome = service.submit_pipeline(session, principal, body, idempotency_key, settings)
    mark_replayed(response, outcome.replayed)
    return detail.pipeline_out(session, outcome.resource)


@router.get("", response_model=PipelinePage, summary="List pipelines", responses=error_responses())
def list_pipelines(request: Request, principal: CurrentPrincipal, session: DbSession,
                   status_filter: PipelineStatus | None = Query(default=None, alias="status",
                                                                description="Only pipelines in this state."),
                   limit: LimitQuery = DEFAULT_LIMIT, cursor: CursorQuery = None) -> PipelinePage:
    """The tenant's pipelines, newest first."""
    rows, next_cursor = service.list_pipelines(session, principal.tenant, status_filter, PageRequest(limit, cursor))
    return PipelinePage(items=[detail.pipeline_out(session, row) for row in rows], next_cursor=next_cursor,
                        next=next_link(request, next_cursor))


@router.get("/{pipeline_id}", response_model=PipelineOut, summary="Get a pipeline", responses=error_responses(404))
def get_pipeline(pipeline_id: PipelineId, principal: CurrentPrincipal, session: DbSession) -> PipelineOut:
    """Its state, and each stage's: status, job, progress, the model it made, its before/after and its gate."""
    return detail.pipeline_out(session, service.get_pipeline(session, principal.tenant, pipeline_id))


@router.post("/{pipeline_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=PipelineOut,
             summary="Cancel a pipeline", responses=error_responses(404, 409))
def cancel_pipeline(pipeline_id: PipelineId, principal: CurrentPrincipal, session: DbSession) -> PipelineOut:
    """Stages not started are dropped; a queued stage is canceled, a running one stops between training steps
    (the pipeline is `canceling` until it has). 409 if the pipeline already ended."""
    return detail.pipeline_out(session, service.cancel_pipeline(session, principal, pipeline_id))


@router.post("/{pipeline_id}/replay", status_code=status.HTTP_201_CREATED, response_model=PipelineOut,
             summary="Replay a pipeline", responses={**CREATED_RESPONSE, **error_responses(404, 409, 422, 429)})
def replay_pipeline(pipeline_id: PipelineId, response: Response, principal: CurrentPrincipal, session: DbSession,
                    settings: SettingsDep, store: StoreDep, idempotency_key: IdempotencyKey = None) -> PipelineOut:
    """Run the pipeline again as stored (every stage's spec with the defaults it had) on the same input model and
    datasets, by id: to compare a result after an upgrade. 409 while the original runs, or if an input was deleted,
    no longer holds what it held then (its sha256 changed) or lost its stored file. Its report shows the original's
    rows beside its own."""
    outcome = service.replay_pipeline(session, principal, pipeline_id, idempotency_key, settings, store)
    mark_replayed(response, outcome.replayed)
    return detail.pipeline_out(session, outcome.resource)


@router.get("/{pipeline_id}/report", response_model=PipelineReport, summary="A pipeline's report",
            responses={**error_responses(404), 200: {
                "description": "JSON; with `Accept: text/markdown`, the table alone.",
                "content": {MARKDOWN: {"schema": {"type": "string"}}}}})
def pipeline_report(pipeline_id: PipelineId, request: Request, principal: CurrentPrincipal,
                    session: DbSession) -> PipelineReport | Response:
    """The input model and every stage that succeeded side by side (accuracy of each published file, parameters,
    MACs, sizes, CPU latency, gate), and the final model's lineage."""
    report = detail.pipeline_report(session, service.get_pipeline(session, principal.tenant, pipeline_id))
    if MARKDOWN in (request.headers.get("accept") or ""):
        return Response(detail.report_markdown(report), media_type=MARKDOWN)
    return report
