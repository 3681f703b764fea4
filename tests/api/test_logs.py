"""Log lines of the API and the worker: JSON (one object a line) or text, both carrying the job id."""

from __future__ import annotations

import json
import logging

from core.logs import job_context, make_handler


def format_record(log_format: str, message: str, **extra: object) -> str:
    handler = make_handler(log_format)
    record = logging.LogRecord("condenser.test", logging.WARNING, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    for log_filter in handler.filters:
        assert isinstance(log_filter, logging.Filter) and log_filter.filter(record)
    assert handler.formatter is not None
    return handler.formatter.format(record)


def test_json_lines_carry_the_job_of_the_context() -> None:
    with job_context("job_abc"):
        line = format_record("json", "epoch done")
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"], entry["job_id"]) == (
        "WARNING", "condenser.test", "epoch done", "job_abc")
    assert "job_id" not in json.loads(format_record("json", "no job here"))


def test_an_explicit_job_id_wins_and_text_shows_it() -> None:
    assert json.loads(format_record("json", "event", job_id="job_x"))["job_id"] == "job_x"
    assert format_record("text", "event", job_id="job_y").endswith("condenser.test [job_y]: event")

