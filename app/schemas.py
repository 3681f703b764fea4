"""Schema pieces every resource shares: error bodies, UTC timestamps, pages, readable validation errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field, ValidationError

from core.errors import Invalid

T = TypeVar("T")


DELETED_AT_DESCRIPTION = ("When the tenant deleted it (null: not deleted). A deleted model or dataset is kept for the "
                          "jobs and lineage that name it; no new job may use it.")


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path of the offending field; its location first when not the body.",
                       examples=["epochs"])
    message: str = Field(examples=["Input should be less than or equal to 1000"])


class ErrorOut(BaseModel):
    """Every error has this shape: one readable sentence, plus per-field problems on validation errors."""

    detail: str = Field(examples=["model mdl_4f0c2a9e1b7d3c5a6e8f0b1d not found"])
    errors: list[FieldProblem] | None = Field(
        default=None, description="Present on request validation errors (422): one entry per field."
    )


class Page(BaseModel, Generic[T]):
    """One page of a newest-first listing. Pass `next_cursor` back as `cursor` for the next page."""

    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="Opaque token for the next page; null on the last page.",
        examples=["WyIyMDI2LTExLTI4VDA0OjAwOjAwKzAwOjAwIiwiam9iX2FiYyJd"],
    )
    next: str | None = Field(default=None, description="The next page's URL (path and query); null on the last page.")


_ERROR_DESCRIPTIONS = {
    400: "Malformed request: a broken multipart body, or a URL holding a NUL byte or a '.' or '..' segment.",
    401: "Missing, malformed, unknown or revoked API key.",
    404: "No such resource for this tenant (another tenant's ids are 404 too).",
    409: "Conflict with the resource's state, or an Idempotency-Key reused with a different request.",
    413: "Upload larger than the server's limit, or the tenant's storage quota would be exceeded.",
    415: "Wrong Content-Type.",
    422: "The request is well-formed but invalid; `detail` says what to fix.",
    429: "The tenant already has as many unfinished jobs as the server allows; retry when one finishes.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error codes a route can return (400, 401 and 422 always can)."""
    return {code: {"model": ErrorOut, "description": _ERROR_DESCRIPTIONS[code]}
            for code in sorted({400, 401, 422, *codes})}


_ROOT = "(root)"


def field_problems(errors: Iterable[Any], prefix: Sequence[str | int] = ()) -> list[FieldProblem]:
    """Pydantic error dicts as (field path, message) pairs a person can act on."""
    problems = []
    for error in errors:
        location = [*prefix, *error["loc"]]
        if location[:1] == ["body"]:
            location = location[1:]
        problems.append(FieldProblem(field=".".join(str(part) for part in location) or _ROOT,
                                     message=_readable_message(error)))
    return problems


def _readable_message(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field; remove it (check its spelling)"
    if kind == "missing":
        return "field required"
    message: str = error["msg"]
    # Our own validators raise ValueError; pydantic prefixes their text with this.
    return message.removeprefix("Value error, ")


def summarize(problems: Sequence[FieldProblem]) -> str:
    return "; ".join(
        problem.message if problem.field == _ROOT else f"{problem.field}: {problem.message}" for problem in problems
    )


def invalid_from(exc: ValidationError, what: str) -> Invalid:
    """A 422 naming `what` (e.g. 'spec', 'student'), the field inside it and what is wrong with it."""
    return Invalid(f"invalid {what}: {summarize(field_problems(exc.errors()))}")
