"""/v1/jobs: submit, list, inspect and cancel compression jobs; follow their events; list their artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import WithJsonSchema

from app.artifacts.service import artifacts_of_job
from app.deps import (
    BearerKey,
    CurrentPrincipal,
    DbSession,
    IdempotencyKey,
    SettingsDep,
    StoreDep,
    in_one_hop,
    mark_replayed,
)
from app.idempotency import CREATED_RESPONSE
from app.ids import JobId
from app.jobs import detail, service, stream
from app.jobs.schemas import JobDetail, JobEventOut, JobPage, JobSubmission
from app.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, PageRequest, next_link
from app.routing import BoundedBodyRoute
from app.schemas import error_responses
from core.views import ArtifactOut, JobOut, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=BoundedBodyRoute)


def _detail(view: service.JobView) -> JobDetail:
    return JobDetail.build(view.job, [ArtifactOut.from_row(row) for row in view.artifacts], view.events)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobDetail, summary="Submit a job",
             responses={**CREATED_RESPONSE, **error_responses(404, 409, 422, 429)})
def submit_job(body: JobSubmission, response: Response, principal: CurrentPrincipal, session: DbSession,
               settings: SettingsDep, idempotency_key: IdempotencyKey = None) -> JobDetail:
    """Queue a compression job; `kind` selects the body's shape:

    - `distill` (the default): the teacher model's knowledge is distilled into the student architecture.
    - `prune`: structured channel pruning (or unstructured sparsity) of `model`, then recovery fine-tuning
      with the unpruned model as the teacher; artifacts: safetensors + arch spec, TorchScript, ONNX.
    - `quantize`: int8 (dynamic, static or quantization-aware training) of `model`; artifacts: TorchScript
      (int8 kernels of the chosen backend) and ONNX (QDQ int8 for ONNX Runtime).

    Everything is checked before the job is queued: the model and dataset exist for this tenant, the
    settings are valid for the kind and method, classes agree, and the dataset's images can be brought to
    the model's input. Then poll GET /v1/jobs/{id} for progress, metrics (accuracy, size, latency of each
    artifact against the input model measured the same way) and artifacts.
    """
    outcome = service.submit_job(session, principal, body, idempotency_key, settings)
    mark_replayed(response, outcome.replayed)
    return _detail(service.describe_job(session, principal.tenant, outcome.resource.id))


@router.get("", response_model=JobPage, summary="List jobs", responses=error_responses())
def list_jobs(
    request: Request,
    principal: CurrentPrincipal,
    session: DbSession,
    status_filter: JobStatus | None = Query(default=None, alias="status", description="Only jobs in this state."),
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> JobPage:
    """The tenant's jobs, newest first, optionally only those in one state."""
    rows, next_cursor = service.list_jobs(session, principal.tenant, status_filter, PageRequest(limit, cursor))
    return JobPage(items=[JobOut.from_row(row) for row in rows], next_cursor=next_cursor,
                   next=next_link(request, next_cursor))


@router.get("/{job_id}", response_model=JobDetail, summary="Get a job", responses=error_responses(404))
async def get_job(job_id: JobId, request: Request, key: BearerKey) -> Response:
    """State, attempt, progress, metrics, error, timestamps, artifacts and the latest events of one job."""
    # The read clients poll: one hop, one query in the usual case, the JSON made once (response_model documents
    # it; returning the model would validate it again, on another hop).
    recent_events = request.app.state.recent_events
    body = await in_one_hop(request, lambda session: detail.job_detail_json(session, recent_events, key, job_id))
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobDetail,
             summary="Cancel a job", responses=error_responses(404, 409))
def cancel_job(job_id: JobId, principal: CurrentPrincipal, session: DbSession) -> JobDetail:
    """A queued job is canceled at once; a running one becomes `canceling` and stops between training steps.
    409 if the job already finished."""
    job = service.cancel_job(session, principal, job_id)
    return _detail(service.describe_job(session, principal.tenant, job.id))


@router.post("/{job_id}/replay", status_code=status.HTTP_201_CREATED, response_model=JobDetail,
             summary="Replay a job", responses={**CREATED_RESPONSE, **error_responses(404, 409, 422, 429)})
def replay_job(job_id: JobId, response: Response, principal: CurrentPrincipal, session: DbSession,
               settings: SettingsDep, store: StoreDep, idempotency_key: IdempotencyKey = None) -> JobDetail:
    """Run an ended job again: a new job (`replay_of` names the original) with the original's stored spec, every
    default as it was filled in then, on the same model and datasets by id. For rerunning a result after an
    upgrade and comparing: the replay's report shows the original's figures beside its own.

    409 while the original is still queued or running (wait for it, or cancel it), or when one of its inputs was
    deleted, no longer has the sha256 the original read, or lost its stored file. Otherwise checked like a new
    submission (job slots, memory budget, webhook URL).
    """
    outcome = service.replay_job(session, principal, job_id, idempotency_key, settings, store)
    mark_replayed(response, outcome.replayed)
    return _detail(service.describe_job(session, principal.tenant, outcome.resource.id))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], summary="List a job's artifacts",
            responses=error_responses(404))
def list_job_artifacts(job_id: JobId, principal: CurrentPrincipal, session: DbSession) -> list[ArtifactOut]:
    """The files a job produced (empty until it succeeds)."""
    return [ArtifactOut.from_row(row) for row in artifacts_of_job(session, principal.tenant, job_id)]


EVENTS_LIMIT = 1000
LAST_EVENT_ID_PATTERN = "^[0-9]{0,18}$"
LAST_EVENT_ID_DESCRIPTION = "Set by EventSource on reconnection: resume after this event (its id)."
MAX_EVENT_ID = 2**63 - 1  # event ids are BIGINT: a larger cursor would be a database error, not an answer


@router.get(
    "/{job_id}/events",
    response_model=list[JobEventOut],
    summary="List or stream a job's events",
    responses={**error_responses(404), 200: {
        "description": "JSON: the events after `after`, oldest first. With `Accept: text/event-stream`: a live "
        "stream (see the operation's description).",
        "content": {stream.MEDIA_TYPE: {"schema": {"type": "string"}}},
    }},
)
def job_events(
    job_id: JobId,
    request: Request,
    principal: CurrentPrincipal,
    session: DbSession,
    settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID,
                                       description="Only events with a larger id (default: all).")] = None,
    limit: Annotated[int, Query(ge=1, le=EVENTS_LIMIT, description="At most this many events (JSON only).")] = 100,
    # At most 18 digits: every such number is a BIGINT, so the schema says exactly what is accepted; published
    # as a plain string, since a header cannot carry a null ("str | None" would offer one).
    last_event_id: Annotated[
        str | None,
        WithJsonSchema({"type": "string", "pattern": LAST_EVENT_ID_PATTERN, "description": LAST_EVENT_ID_DESCRIPTION}),
        Header(alias="Last-Event-ID", pattern=LAST_EVENT_ID_PATTERN, description=LAST_EVENT_ID_DESCRIPTION),
    ] = None,
) -> Any:
    """The job's history: state changes, finished epochs, log lines and webhook attempts.

    Ask for `Accept: text/event-stream` to follow it live as Server-Sent Events: each stored event arrives
    with `id:` (its id) and `event:` (its kind: `state`, `progress`, `log`, `webhook`) and the same JSON as
    here; `event: snapshot` carries `{"status", "progress"}` (stage, epoch, step, ETA, latest loss and
    accuracy) whenever the worker reports new progress; comments keep idle connections open; after the
    final state the stream sends `event: end` (`{"status"}`) and closes. Reconnecting with `Last-Event-ID`
    (EventSource does it by itself) or `?after=` resumes without repeats or gaps.
    Example: `curl -N -H 'Accept: text/event-stream' -H "Authorization: Bearer $KEY" .../v1/jobs/job_.../events`
    """
    after_id = after if after is not None else _event_id(last_event_id)
    # Checked here, before any byte is streamed, so another tenant's job is a plain 404.
    events = service.events_after(session, principal.tenant, job_id, after_id, limit)
    if stream.wants_stream(request.headers.get("accept")):
        return stream.EventStreamResponse(request.app.state.event_hub, principal, job_id, after_id, settings)
    return [JobEventOut.model_validate(event) for event in events]


def _event_id(header: str | None) -> int:
    # The header's pattern admits only ASCII digits (or nothing: no event seen yet).
    return int(header) if header else 0
