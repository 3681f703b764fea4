"""The before/after of any finished job in one shape, whatever its kind measured.

Distillation reports teacher and student, pruning and quantization report input and output with per-format
artifacts; the report, the API and the dashboard all read this one shape instead. Torch-free: the API
imports it.
"""

from __future__ import annotations

from typing import Any

FIGURE_NAMES = {
    "accuracy": "Top-1 accuracy",
    "params": "Parameters",
    "macs": "MACs per image",
    "file_bytes": "Weights file size",
    "torchscript_bytes": "TorchScript file size",
    "cpu_latency_ms_batch1": "CPU latency, batch 1",
    "cpu_latency_ms_batch32": "CPU latency, batch 32",
}
LATENCY_FORMAT = "torchscript"  # every kind exports its input and its result to TorchScript and times those
AFTER_LABELS = {"distill": "student", "prune": "pruned", "quantize": "int8"}


def summarize(kind: str, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """{"before": figures, "after": figures, "validation_samples": n, "evaluation": which images, "formats": each
    model file's acceptance verdict, "failed_formats": those not published as results, "measured_on": the CPU},
    or None until a job's metrics hold both
    sides (queued, running, failed, or from a version that measured less). A figure a side lacks is None:
    an int8 model has no weights file, a distillation before TorchScript sizes were kept has none of those."""
    if kind == "distill":
        source, result = metrics.get("teacher"), metrics.get("student")
        figures, labels = _distill_figures, ("teacher", "student")
    else:
        source, result = metrics.get("input"), metrics.get("output")
        figures, labels = _compression_figures, ("input", AFTER_LABELS.get(kind, "output"))
    if not source or not result:
        return None
    formats = _format_verdicts(metrics)
    return {"before": figures(labels[0], source), "after": figures(labels[1], result),
            "validation_samples": metrics.get("validation_samples"), "evaluation": metrics.get("evaluation"),
            "formats": formats, "failed_formats": [entry["format"] for entry in formats if not entry["passed"]],
            "measured_on": metrics.get("measured_on"), "control": _control(metrics.get("control")),
            "teachers": _teachers(metrics.get("teachers")), "tasks": _tasks(metrics.get("tasks"))}


def _control(control: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if control is None else {"accuracy": control["accuracy"], "kd_gain_pts": control["kd_gain_pts"]}


def _teachers(members: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not members:
        return None
    return [{"id": member["id"], "arch": member["arch"], "weight": member["weight"], "task": member.get("task"),
             "accuracy": member["accuracy"], "params": member.get("param_count"),
             "cpu_latency_ms_batch1": member.get("cpu_latency_ms_batch1")} for member in members]


def _tasks(tasks: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tasks:
        return None
    return [{"name": name, "accuracy": task["accuracy"], "teacher_accuracy": task["teacher_accuracy"],
             "evaluation_samples": task["validation_samples"], "passed": not task["acceptance"]["failed_formats"]}
            for name, task in tasks.items()]


def _format_verdicts(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model file's acceptance verdict; jobs measured before the acceptance checks had a format check against
    the float source alone, whose drop is the source drop."""
    if "acceptance" in metrics:
        return [{"format": fmt, **entry} for fmt, entry in metrics["acceptance"]["formats"].items()]
    legacy = (metrics.get("format_check") or {}).get("formats") or {}
    return [{"format": fmt, "accuracy": entry["accuracy"], "source_drop_pts": entry["drop_pts"],
             "passed": entry["passed"]} for fmt, entry in legacy.items()]


def _distill_figures(label: str, side: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "accuracy": side.get("accuracy"), "params": side.get("param_count"),
            "macs": side.get("macs"), "file_bytes": side.get("file_bytes"),
            "torchscript_bytes": side.get("torchscript_bytes"),
            "cpu_latency_ms_batch1": side.get("cpu_latency_ms_batch1"),
            "cpu_latency_ms_batch32": side.get("cpu_latency_ms_batch32")}


def _compression_figures(label: str, side: dict[str, Any]) -> dict[str, Any]:
    scripted = _scripted(side)
    return {"label": label, "accuracy": side.get("accuracy"), "params": side.get("params"), "macs": side.get("macs"),
            "file_bytes": side.get("file_bytes"), "torchscript_bytes": scripted.get("file_bytes"),
            "cpu_latency_ms_batch1": scripted.get("cpu_latency_ms_batch1"),
            "cpu_latency_ms_batch32": scripted.get("cpu_latency_ms_batch32")}


def _scripted(side: dict[str, Any]) -> dict[str, Any]:
    return (side.get("artifacts") or {}).get(LATENCY_FORMAT) or {}


# Accuracy is better higher; every other figure is better lower, and changes read as "N x smaller".
_SMALLER_WORDS = {"params": ("fewer", "more"), "macs": ("fewer", "more"), "file_bytes": ("smaller", "larger"),
                  "torchscript_bytes": ("smaller", "larger"),
                  "cpu_latency_ms_batch1": ("faster", "slower"), "cpu_latency_ms_batch32": ("faster", "slower")}


def format_figure(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if name == "accuracy":
        return f"{value * 100:.2f}%"
    if name.endswith("bytes"):
        return format_bytes(value)
    if name.startswith("cpu_latency_ms"):
        return f"{value:.3f} ms"
    return f"{round(value):,}"


def format_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:,.0f} B"
    if count < 1024**2:
        return f"{count / 1024:,.1f} KiB"
    return f"{count / 1024**2:,.1f} MiB"


def describe_change(name: str, before: float | None, after: float | None) -> str:
    """How the result compares with the input: points of accuracy, or a ratio in plain words."""
    if before is None or after is None:
        return "n/a"
    if name == "accuracy":
        return f"{(after - before) * 100:+.2f} pts"
    if not before or not after:
        return "n/a"
    if before == after:
        return "same"
    better, worse = _SMALLER_WORDS[name]
    if after <= before:
        return f"{before / after:.2f}x {better}"
    return f"{after / before:.2f}x {worse}"


def compare_runs(original: dict[str, Any], replay: dict[str, Any]) -> list[dict[str, Any]]:
    """A replay's figures beside its original's (both summaries as summarize makes them): one row per figure of
    the result, the input model's accuracy (measured again by the replay), and each model file's accuracy.
    Each row: {"name" (the figure, for format_figure), "title", "original", "replay", "change" (of the replay
    against the original, in words)}."""
    result, source = original["after"]["label"], original["before"]["label"]
    rows = [_row(name, f"{title} ({result})", original["after"].get(name), replay["after"].get(name))
            for name, title in FIGURE_NAMES.items()]
    rows.append(_row("accuracy", f"{FIGURE_NAMES['accuracy']} ({source})", original["before"].get("accuracy"),
                     replay["before"].get("accuracy")))
    accuracies = [{entry["format"]: entry["accuracy"] for entry in summary.get("formats") or []}
                  for summary in (original, replay)]
    for fmt in dict.fromkeys([*accuracies[0], *accuracies[1]]):  # both runs' formats, in order, once each
        rows.append(_row("accuracy", f"{FIGURE_NAMES['accuracy']} ({fmt} file)", accuracies[0].get(fmt),
                         accuracies[1].get(fmt)))
    return rows


def _row(name: str, title: str, original: float | None, replay: float | None) -> dict[str, Any]:
    return {"name": name, "title": title, "original": original, "replay": replay,
            "change": describe_change(name, original, replay)}
