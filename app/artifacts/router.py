"""/v1/artifacts: metadata and downloads (with Range support) of what jobs produced."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Response, status
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader
from starlette.types import Message, Receive, Scope, Send

from app.artifacts import service
from app.deps import CurrentPrincipal, DbSession, StoreDep
from app.ids import ArtifactId
from app.metrics import SERVED_BYTES
from app.routing import BoundedBodyRoute
from app.schemas import error_responses
from core.views import ArtifactOut

router = APIRouter(prefix="/artifacts", tags=["artifacts"], route_class=BoundedBodyRoute)
SHA256_HEADER = "X-Content-SHA256"
_FILE_HEADERS = {
    SHA256_HEADER: {"description": "sha256 of the whole file (not of the range).", "schema": {"type": "string"}},
    "ETag": {"description": "The sha256 in quotes: a strong validator for If-None-Match and If-Range.",
             "schema": {"type": "string"}},
    "Content-Disposition": {"description": "attachment; filename=\"<artifact filename>\"",
                            "schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}
# What jobs publish: weights and TorchScript/ONNX files, arch specs and reports, model cards, plots.
ARTIFACT_MEDIA_TYPES = ("application/octet-stream", "application/json", "text/markdown", "image/svg+xml")
_FILE_CONTENT: dict[str, Any] = {media_type: {} for media_type in ARTIFACT_MEDIA_TYPES}
# A download is a file to save, never a page: an SVG opened from here must not run script on the API's origin.
_DOWNLOAD_SAFETY = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}


class BlobResponse(FileResponse):
    # Starlette serves single and multiple ranges; beyond this many it ignores Range and sends the whole
    # file (allowed by RFC 9110), so a request for thousands of tiny ranges cannot amplify work.
    max_ranges = 4

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                SERVED_BYTES.inc(len(message.get("body", b"")))
            await send(message)

        await super().__call__(scope, receive, counting_send)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # A Range header we cannot read is ignored and the whole file sent (RFC 9110 lets a server ignore
        # Range), rather than Starlette's plain-text 400 that no client of a JSON API expects.
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []


@router.get("/{artifact_id}", response_model=ArtifactOut, summary="Get artifact metadata",
            responses=error_responses(404))
def get_artifact(artifact_id: ArtifactId, principal: CurrentPrincipal, session: DbSession) -> ArtifactOut:
    """Kind, file name, runtime, size and sha256 of one artifact."""
    return ArtifactOut.from_row(service.get_artifact(session, principal.tenant, artifact_id))


@router.get(
    "/{artifact_id}/download",
    summary="Download an artifact",
    response_class=BlobResponse,
    openapi_extra={"parameters": [
        {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
         "description": "bytes=START-END, bytes=START- or bytes=-SUFFIX; up to 4 ranges (more: the whole file).",
         "example": "bytes=0-1048575"},
        {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"},
         "description": "The ETag: serve the range only if the file is unchanged, else the whole file."},
    ]},
    responses={
        **error_responses(404),
        200: {"description": "The whole file, with the artifact's media type.", "content": _FILE_CONTENT,
              "headers": _FILE_HEADERS},
        206: {"description": "The requested byte range (Content-Range says which); several ranges come as "
              "multipart/byteranges.", "content": {**_FILE_CONTENT, "multipart/byteranges": {}},
              "headers": _FILE_HEADERS},
        304: {"description": "If-None-Match matched the ETag: you already have this file."},
        416: {"description": "The range starts beyond the end of the file."},
    },
)
def download_artifact(
    artifact_id: ArtifactId,
    principal: CurrentPrincipal,
    session: DbSession,
    store: StoreDep,
    if_none_match: str | None = Header(
        default=None, alias="If-None-Match", description="The ETag you hold: 304 if it still matches."
    ),
) -> Response:
    """The file's bytes, with `X-Content-SHA256`, a strong `ETag` (the sha256) and `Content-Disposition`.

    Resumable: send `Range: bytes=START-END` (or `bytes=-N` for the last N bytes) for a 206 with
    `Content-Range`; `If-Range` with the ETag makes the range conditional on the file being unchanged.
    """
    download = service.prepare_download(session, principal.tenant, artifact_id, store)
    headers = {SHA256_HEADER: download.sha256, "ETag": download.etag, **_DOWNLOAD_SAFETY}
    if if_none_match is not None and {download.etag, "*"} & {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return BlobResponse(download.path, media_type=download.media_type, filename=download.filename, headers=headers)
