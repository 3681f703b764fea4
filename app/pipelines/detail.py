"""A pipeline as clients read it: each stage with its job's state and what it made, and the report that lays the
stages side by side."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.pipelines import repository
from app.pipelines.schemas import PipelineOut, PipelineReport, StageGate, StageOut
from core import pipelines as machine
from core.db.models import Job, Model, Pipeline
from core.lineage import lineage
from core.summary import summarize
from core.views import JobProgress

ACTIVE_STAGE = frozenset({"queued", "running", "canceling"})


def pipeline_out(session: Session, pipeline: Pipeline) -> PipelineOut:
    jobs = machine.stage_jobs(session, pipeline.id)
    outputs = repository.stage_outputs(session, list(jobs.values()))
    stages = [_stage_out(pipeline, stage, jobs.get(stage["name"]), outputs) for stage in machine.stages(pipeline)]
    last = stages[-1]
    spec = pipeline.spec
    return PipelineOut(
        id=pipeline.id, name=pipeline.name, status=pipeline.status,
        current_stages=[stage.name for stage in stages if stage.status in ACTIVE_STAGE], error=pipeline.error,
        model=spec["model"], dataset=spec["dataset"], eval_dataset=spec.get("eval_dataset"),
        input_accuracy=pipeline.input_accuracy,
        final_model=last.model_id if pipeline.status == "succeeded" else None, stages=stages, spec=spec,
        replay_of=pipeline.replay_of, created_at=pipeline.created_at, started_at=pipeline.started_at,
        finished_at=pipeline.finished_at, updated_at=pipeline.updated_at)


def _stage_out(pipeline: Pipeline, stage: dict[str, Any], job: Job | None, outputs: dict[str, Model]) -> StageOut:
    gate = StageGate.model_validate(stage["gate"]) if stage.get("gate") else None
    kind = stage["job"]["kind"]
    if job is None:
        status = "skipped" if pipeline.status in machine.FINISHED else "waiting"
        return StageOut(name=stage["name"], kind=kind, after=stage["after"], gate=gate, status=status, job_id=None,
                        model_id=None, progress=None, summary=None, error=None)
    model = outputs.get(job.id)
    metrics = job.metrics or {}
    missed = (machine.gate_miss(stage, metrics.get("acceptance") or {}, pipeline.input_accuracy)
              if job.status == "succeeded" else None)
    return StageOut(name=stage["name"], kind=kind, after=stage["after"], gate=gate, status=job.status, job_id=job.id,
                    model_id=model.id if model is not None else None,
                    progress=JobProgress.model_validate(job.progress or {}), summary=summarize(kind, metrics),
                    gate_result=missed, error=job.error)


# The report's columns: (key, heading).
_COLUMNS = (("stage", "Stage"), ("kind", "Kind"), ("model", "Model"), ("precision", "Precision"),
            ("accuracy", "Accuracy"), ("formats", "Accuracy per file"), ("params", "Parameters"),
            ("macs", "MACs"), ("file_bytes", "Weights bytes"), ("torchscript_bytes", "TorchScript bytes"),
            ("cpu_latency_ms_batch1", "CPU ms (batch 1)"), ("gate", "Gate"))


def pipeline_report(session: Session, pipeline: Pipeline) -> PipelineReport:
    out = pipeline_out(session, pipeline)
    rows = _rows(out)
    final = session.get(Model, out.final_model) if out.final_model else None
    original = session.get(Pipeline, pipeline.replay_of) if pipeline.replay_of else None
    original_rows = _rows(pipeline_out(session, original)) if original is not None else None
    return PipelineReport(pipeline=out, rows=rows, table_markdown=markdown_table(rows),
                          final_model_lineage=lineage(session, final) if final is not None else [],
                          original_rows=original_rows,
                          original_table_markdown=markdown_table(original_rows) if original_rows else None)


def _rows(out: PipelineOut) -> list[dict[str, Any]]:
    return [_input_row(out)] + [_stage_row(stage) for stage in out.stages if stage.summary is not None]


def _input_row(out: PipelineOut) -> dict[str, Any]:
    """The input model's figures, as the first stage that took it measured them."""
    first = next((stage for stage in out.stages if stage.after == machine.INPUT and stage.summary), None)
    figures = first.summary.before.model_dump() if first is not None and first.summary else {}
    return {"stage": "input", "kind": "", "model": out.model, "precision": "float32",
            **{key: figures.get(key) for key in ("accuracy", "params", "macs", "file_bytes", "torchscript_bytes",
                                                 "cpu_latency_ms_batch1")},
            "formats": {}, "gate": ""}


def _stage_row(stage: StageOut) -> dict[str, Any]:
    assert stage.summary is not None
    after = stage.summary.after.model_dump()
    gate = "" if stage.gate is None else (
        f"<= {stage.gate.max_accuracy_drop_pts:g} pts vs {stage.gate.against}: "
        + ("passed" if stage.gate_result is None else "MISSED"))
    return {"stage": stage.name, "kind": stage.kind, "model": stage.model_id,
            "precision": "int8" if stage.kind == "quantize" else "float32",
            **{key: after.get(key) for key in ("accuracy", "params", "macs", "file_bytes", "torchscript_bytes",
                                               "cpu_latency_ms_batch1")},
            "formats": {check.format: check.accuracy for check in stage.summary.formats if check.passed},
            "gate": gate}


def report_markdown(report: PipelineReport) -> str:
    """The report's table; a replay's is followed by its original's."""
    if report.original_table_markdown is None:
        return report.table_markdown
    return (f"{report.table_markdown}\nThe original, pipeline {report.pipeline.replay_of}:\n\n"
            f"{report.original_table_markdown}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(heading for _, heading in _COLUMNS) + " |",
             "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(key, row.get(key)) for key, _ in _COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if value is None or value == "" or value == {}:
        return "-"
    if key == "formats":
        return ", ".join(f"{fmt} {accuracy:.2%}" for fmt, accuracy in value.items())
    if key == "accuracy":
        return f"{value:.2%}"
    if key == "cpu_latency_ms_batch1":
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    # Names come from the client: no character of theirs may break the table.
    return str(value).replace("|", "\\|").replace("\n", " ")
