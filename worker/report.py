"""A finished job's report, published with its artifacts: report.json (everything), model_card.md (for people)
and SVG plots. Pure: built from what the runner hands over, no database, no engine calls.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from core.summary import FIGURE_NAMES, compare_runs, describe_change, format_bytes, format_figure, summarize
from worker import plots
from worker.engine import cpu
from worker.engine.fileio import atomic_write

# Distributions whose versions decide what the artifacts are and how they were measured.
# Characters that would start Markdown syntax inside a line (emphasis, code, links, tables, headings, images).
_MARKDOWN_PUNCTUATION = re.compile(r"[\\`*_\[\]|#!~]")
LIBRARIES = ("condenser", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "torchao", "numpy")


@dataclass(frozen=True)
class ReportFile:
    kind: str
    path: Path
    media_type: str


def environment(device: str) -> dict[str, Any]:
    """Where the job ran: Python, platform, device, and the versions of the libraries that matter."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "device": device, "cpu": cpu.describe(), "libraries": versions}


def build_document(job: dict[str, Any], inputs: dict[str, Any], metrics: dict[str, Any],
                   artifacts: list[dict[str, Any]], env: dict[str, Any],
                   original: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json: the job (id, kind, spec), what went in (with sha256), the before/after summary, every
    metric, the artifacts (with sha256) and the environment; for a replay, the original job's figures beside
    this run's ("replay_of"). `original`: {"id", "kind", "status", "metrics", "finished_at", "environment"} of the
    job replayed."""
    summary = summarize(job["kind"], metrics)
    document = {"report_version": 1, "generated_at": datetime.now(UTC).isoformat(timespec="seconds"), "job": job,
                "inputs": inputs, "summary": summary, "metrics": metrics, "artifacts": artifacts,
                "environment": env}
    if original is not None:
        document["replay_of"] = _replay_of(original, summary, env)
    return document


def _replay_of(original: dict[str, Any], summary: dict[str, Any] | None, env: dict[str, Any]) -> dict[str, Any]:
    original_summary = summarize(original["kind"], original["metrics"] or {})
    comparison = compare_runs(original_summary, summary) if original_summary and summary else []
    return {"job": original["id"], "status": original["status"], "finished_at": original["finished_at"],
            "summary": original_summary, "comparison": comparison,
            "changed": _environment_changes(original.get("environment"), env)}


def _environment_changes(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, list[str]] | None:
    """What differs between the original's environment and this run's: {"torch": [old, new], "device": [...]};
    None when the original's was not recorded (jobs from before lineage)."""
    if not before:
        return None
    pairs = {"python": (before.get("python"), now["python"]), "device": (before.get("device"), now["device"]),
             **{name: ((before.get("libraries") or {}).get(name), version)
                for name, version in now["libraries"].items()}}
    return {name: [str(old), str(new)] for name, (old, new) in pairs.items() if old != new}


def write_report(folder: Path, document: dict[str, Any]) -> list[ReportFile]:
    """The report's files in `folder`: the plots that apply (curves only when the job trained), the model
    card, and report.json."""
    written: list[ReportFile] = []

    def write(kind: str, filename: str, media_type: str, text: str) -> None:
        path = folder / filename
        atomic_write(path, lambda handle: handle.write(text.encode()))
        written.append(ReportFile(kind, path, media_type))

    history = document["metrics"].get("history") or []
    if history:
        write("report_curves_svg", "training_curves.svg", "image/svg+xml", plots.curves_svg(history))
    if document["summary"]:
        write("report_comparison_svg", "before_after.svg", "image/svg+xml", plots.comparison_svg(document["summary"]))
    plot_names = [item.path.name for item in written]
    write("report_model_card", "model_card.md", "text/markdown", model_card(document, plot_names))
    write("report_json", "report.json", "application/json", json.dumps(document, indent=2, sort_keys=True) + "\n")
    return written


def model_card(document: dict[str, Any], plot_names: list[str]) -> str:
    """The report for people: what went in, the spec, before and after, training, artifacts, environment."""
    job = document["job"]
    sections = [
        [f"# Model card: {job['kind']} job `{job['id']}`", "",
         f"Generated {document['generated_at']} by condenser {document['environment']['libraries']['condenser']}."],
        _inputs_section(document["inputs"]),
        ["## Spec", "", "```json", json.dumps(job["spec"], indent=2, sort_keys=True), "```"],
        _work_section(document["metrics"].get("work") or {}),
        _comparison_section(document["summary"]),
        _replay_section(document.get("replay_of")),
        _training_section(document["metrics"].get("history") or []),
        _notes_section(document["metrics"].get("notes") or []),
        _artifacts_section(document["artifacts"]),
        _environment_section(document["environment"]),
        ["## Plots", "", *[f"![{name}]({name})" for name in plot_names]] if plot_names else [],
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def _inputs_section(inputs: dict[str, Any]) -> list[str]:
    model, dataset = inputs["model"], inputs["dataset"]
    lines = ["## What went in", "", "| | |", "|---|---|",
             f"| Input model | {_cell(model['name'])} (`{model['id']}`), {model['format']}, "
             f"{format_bytes(model['bytes'])} |",
             f"| Architecture | {_code(json.dumps(model['arch'], sort_keys=True))} |",
             f"| Input | {_code(json.dumps(model['input_spec'], sort_keys=True))} |",
             f"| Model sha256 | `{model['sha256']}` |"]
    lines += _dataset_lines("Dataset", dataset)
    if inputs.get("eval_dataset"):
        lines += _dataset_lines("Evaluation dataset", inputs["eval_dataset"])
    return lines


def _dataset_lines(title: str, dataset: dict[str, Any]) -> list[str]:
    if dataset.get("builtin"):
        return [f"| {title} | built-in `{dataset['builtin']}` |"]
    return [f"| {title} | {_cell(dataset['name'])} (`{dataset['id']}`), {dataset['format']}, "
            f"{dataset['num_samples']:,} images, {dataset['num_classes']} classes |",
            f"| {title} sha256 (as uploaded) | `{dataset['sha256']}` |",
            f"| {title} sha256 (canonical .npz) | `{dataset['canonical_sha256']}` |"]


def _comparison_section(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    before, after = summary["before"], summary["after"]
    lines = ["## Before and after", "", f"{_evaluation_sentence(summary)} Latency of the TorchScript files on the "
             "worker's CPU.", "",
             f"| | {before['label']} | {after['label']} | change |", "|---|---:|---:|---:|"]
    for name, title in FIGURE_NAMES.items():
        lines.append(f"| {title} | {format_figure(name, before.get(name))} | {format_figure(name, after.get(name))} "
                     f"| {describe_change(name, before.get(name), after.get(name))} |")
    return lines + _formats_lines(summary) + _teachers_lines(summary) + _tasks_lines(summary) \
        + _control_lines(summary)


def _teachers_lines(summary: dict[str, Any]) -> list[str]:
    """Each teacher of an ensemble (the `before` column is all of them together)."""
    if not summary.get("teachers"):
        return []
    lines = ["", "### Teachers", "", "The before column is the teachers together: the accuracy of the weighted mean "
             "of their probabilities, and the sums of their sizes and latencies (every member runs).", "",
             "| teacher | task | architecture | weight | accuracy | parameters | CPU latency, batch 1 |",
             "|---|---|---|---:|---:|---:|---:|"]
    return lines + [f"| {_code(member['id'])} | {member.get('task') or '-'} | {member['arch']} | "
                    f"{member['weight']:g} | {format_figure('accuracy', member['accuracy'])} | "
                    f"{format_figure('params', member.get('params'))} | "
                    f"{format_figure('cpu_latency_ms_batch1', member.get('cpu_latency_ms_batch1'))} |"
                    for member in summary["teachers"]]


def _tasks_lines(summary: dict[str, Any]) -> list[str]:
    if not summary.get("tasks"):
        return []
    lines = ["", "### Tasks", "", "One student, one head per task, each judged on its own task's evaluation images "
             "against that task's teachers.", "",
             "| task | student head | task's teachers | change | evaluation images | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    return lines + [f"| {task['name']} | {format_figure('accuracy', task['accuracy'])} | "
                    f"{format_figure('accuracy', task['teacher_accuracy'])} | "
                    f"{describe_change('accuracy', task['teacher_accuracy'], task['accuracy'])} | "
                    f"{task['evaluation_samples']} | {'passed' if task['passed'] else '**REJECTED**'} |"
                    for task in summary["tasks"]]


def _control_lines(summary: dict[str, Any]) -> list[str]:
    control = summary.get("control")
    if not control:
        return []
    return ["", f"**Control run:** the same student trained alone on the labels (same data, budget and seed) scored "
            f"{format_figure('accuracy', control['accuracy'])}; distillation gained "
            f"{control['kd_gain_pts']:+.2f} points over it."]


def _replay_section(replay: dict[str, Any] | None) -> list[str]:
    """A replay's figures beside its original's: what changed between two runs of one spec on the same inputs."""
    if not replay:
        return []
    lines = [f"## Replay of {_code(replay['job'])}: original vs this run", ""]
    if replay["comparison"]:
        lines += [f"The same spec on the same inputs (sha256 checked); the original ended at {replay['finished_at']} "
                  f"({replay['status']}). Change: this run against the original.", "",
                  "| | original | this run | change |", "|---|---:|---:|---:|"]
        lines += [f"| {row['title']} | {format_figure(row['name'], row['original'])} | "
                  f"{format_figure(row['name'], row['replay'])} | {row['change']} |" for row in replay["comparison"]]
    else:
        lines.append(f"The original ended {replay['status']} without the figures of a finished result: nothing "
                     "to compare.")
    return [*lines, "", _changes_sentence(replay["changed"])]


def _changes_sentence(changed: dict[str, list[str]] | None) -> str:
    if changed is None:
        return "The original's environment was not recorded (it ran before condenser kept it)."
    if not changed:
        return "Same Python, device and library versions as the original."
    return "Changed since the original: " + ", ".join(f"{name} {_cell(old)} → {_cell(new)}"
                                                      for name, (old, new) in changed.items()) + "."


def _evaluation_sentence(summary: dict[str, Any]) -> str:
    evaluation = summary.get("evaluation")
    if not evaluation:
        return f"Accuracies measured on {summary['validation_samples']} held-out images."
    if evaluation["source"] == "eval_dataset":
        return (f"Accuracies measured on {evaluation['samples']} images of the evaluation dataset "
                f"{_code(evaluation['dataset'])}, which the job neither trained nor calibrated on.")
    return (f"Accuracies measured on {evaluation['samples']} images held out from the uploaded dataset "
            f"{_code(evaluation['dataset'])}: the job did not train on them, but the input model may have, so its "
            "accuracy and the drops against it may look better than on new images (give eval_dataset to avoid it).")


def _formats_lines(summary: dict[str, Any]) -> list[str]:
    """Each model file's acceptance verdict, and the CPU the figures come from."""
    lines = []
    if summary.get("formats"):
        lines += ["", "| file format | accuracy | top-1 agreement | vs input model | vs float source | verdict |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {entry['format']} | {format_figure('accuracy', entry['accuracy'])} | "
                  f"{_agreement(entry)} | {_points(entry.get('drop_pts'))} | {_points(entry.get('source_drop_pts'))} "
                  f"| {_verdict(entry)} |" for entry in summary["formats"]]
    if summary.get("failed_formats"):
        lines += ["", f"**Not results:** the {' and '.join(summary['failed_formats'])} file(s) failed their "
                  "acceptance checks and are kept only as diagnostics (REJECTED-*); see the notes."]
    if summary.get("measured_on"):
        lines += ["", f"Measured on {cpu.summary_line(summary['measured_on'])}."]
    return lines


def _agreement(entry: dict[str, Any]) -> str:
    if entry.get("agreement") is None:
        return "n/a"
    return f"{entry['agreement']:.2%} with the {_cell(entry['agreement_with'])}"


def _verdict(entry: dict[str, Any]) -> str:
    return "passed" if entry["passed"] else "**REJECTED**: " + _cell("; ".join(entry.get("reasons", [])))


def _points(drop_pts: float | None) -> str:
    return "n/a" if drop_pts is None else f"{-drop_pts:+.2f} pts"


def _training_section(history: list[dict[str, float]]) -> list[str]:
    if not history:
        return []
    rows = [f"| {entry['epoch']} | {entry['train_loss']:.4f} | {format_figure('accuracy', entry['val_accuracy'])} |"
            for entry in history]
    return ["## Training", "", "| epoch | training loss | validation accuracy |", "|---:|---:|---:|", *rows]


def _work_section(work: dict[str, list[str]]) -> list[str]:
    """What the job did to the model, and what it did not do that a reader might assume it did."""
    if not work:
        return []
    return ["## What was done", "", *[f"- {_cell(line)}" for line in work.get("done", [])], "",
            "## What was not done", "", *[f"- {_cell(line)}" for line in work.get("not_done", [])]]


def _notes_section(notes: list[str]) -> list[str]:
    return ["## Notes", "", *[f"- {_cell(note)}" for note in notes]] if notes else []


def _artifacts_section(artifacts: list[dict[str, Any]]) -> list[str]:
    rows = [f"| {item['filename']} | {_cell(item['runtime'])} | {item['bytes']:,} | `{item['sha256']}` |"
            for item in artifacts]
    return ["## Artifacts", "", "| file | runtime | bytes | sha256 |", "|---|---|---:|---|", *rows]


def _environment_section(env: dict[str, Any]) -> list[str]:
    rows = [f"| {name} | {version} |" for name, version in env["libraries"].items()]
    return ["## Environment", "", f"Python {env['python']} on {env['platform']}, device `{env['device']}`, "
            f"CPU {cpu.summary_line(env['cpu'])}.", "",
            "| library | version |", "|---|---|", *rows]


def _cell(text: str) -> str:
    """User-chosen text (a name, a library's message) as plain text in Markdown, on one line and safe in a table
    cell: HTML is shown, never rendered (a name may hold `<script>`), and no Markdown syntax takes effect."""
    one_line = " ".join(str(text).split())
    escaped = one_line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_PUNCTUATION.sub(r"\\\g<0>", escaped)


def _code(text: str) -> str:
    """`text` as an inline code span that no backtick in it can close early (CommonMark: a longer fence)."""
    one_line = " ".join(str(text).split())
    longest_run = max((len(run) for run in re.findall("`+", one_line)), default=0)
    fence = "`" * (longest_run + 1)
    # CommonMark strips one space each side, which is what lets a span start or end with a backtick.
    pad = " " if one_line.startswith("`") or one_line.endswith("`") else ""
    return f"{fence}{pad}{one_line}{pad}{fence}"
