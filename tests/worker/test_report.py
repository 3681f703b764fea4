"""The report builder on its own: the three kinds' metrics in one before/after shape, a model card holding the
real numbers, and SVG plots that are well-formed XML with one point per epoch."""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from core.summary import describe_change, format_figure, summarize
from worker import plots, report
from worker.engine import cpu
from worker.jobs import acceptance

SVG = "{http://www.w3.org/2000/svg}"
HISTORY = [{"epoch": 1, "train_loss": 1.9, "val_accuracy": 0.41}, {"epoch": 2, "train_loss": 0.8, "val_accuracy": 0.77},
           {"epoch": 3, "train_loss": 0.5, "val_accuracy": 0.868}]
DISTILL_METRICS: dict[str, Any] = {
    "validation_samples": 450,
    "teacher": {"accuracy": 0.9711, "param_count": 123456, "macs": 2000000, "file_bytes": 500000,
                "torchscript_bytes": 520000,
                "cpu_latency_ms_batch1": 0.9, "cpu_latency_ms_batch32": 6.0},
    "student": {"accuracy": 0.9533, "param_count": 5321, "macs": 100000, "file_bytes": 22000,
                "torchscript_bytes": 30000, "cpu_latency_ms_batch1": 0.3, "cpu_latency_ms_batch32": 1.5},
    "history": HISTORY,
}


def side(accuracy: float, params: int, file_bytes: int | None, script_bytes: int, latency: float) -> dict[str, Any]:
    measured = {"file_bytes": script_bytes, "cpu_latency_ms_batch1": latency, "cpu_latency_ms_batch32": latency * 8}
    return {"accuracy": accuracy, "params": params, "macs": params * 10,
            **({"file_bytes": file_bytes} if file_bytes else {}), "artifacts": {"torchscript": measured,
                                                                                "onnx": measured}}


PRUNE_METRICS = {"validation_samples": 450, "input": side(0.95, 4000, 17000, 25000, 0.4),
                 "output": side(0.93, 1000, 5000, 9000, 0.2), "history": HISTORY[:2], "notes": []}
QUANTIZE_METRICS = {"validation_samples": 450, "input": side(0.95, 4000, 17000, 25000, 0.4),
                    "output": side(0.94, 4000, None, 8000, 0.25), "history": [], "notes": ["no ExportedProgram"]}
PROVENANCE = {
    "model": {"id": "mdl_1", "name": "teacher | v2", "format": "safetensors", "sha256": "a" * 64, "bytes": 500000,
              "arch": {"arch": "small_cnn", "kwargs": {"width": 32}}, "input_spec": {"image_size": 8}},
    "dataset": {"builtin": "digits"},
}
ARTIFACTS = [{"kind": "student_safetensors", "filename": "student.safetensors", "runtime": "safetensors",
              "sha256": "b" * 64, "bytes": 22000}]
ENVIRONMENT = report.environment("cpu")


def document(kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    job = {"id": "job_1", "kind": kind, "attempt": 1, "spec": {"kind": kind, "epochs": 3}}
    return report.build_document(job, PROVENANCE, metrics, ARTIFACTS, ENVIRONMENT)


def test_every_kind_summarizes_to_one_before_after_shape() -> None:
    distill = summarize("distill", DISTILL_METRICS)
    assert distill is not None
    assert (distill["before"]["label"], distill["after"]["label"]) == ("teacher", "student")
    assert distill["after"]["params"] == 5321 and distill["after"]["file_bytes"] == 22000
    pruned = summarize("prune", PRUNE_METRICS)
    assert pruned is not None and pruned["after"]["file_bytes"] == 5000
    assert pruned["after"]["torchscript_bytes"] == 9000
    assert pruned["after"]["cpu_latency_ms_batch32"] == pytest.approx(1.6)
    # An int8 model has no weights file; its TorchScript file compares like with like with the input's.
    quantized = summarize("quantize", QUANTIZE_METRICS)
    assert quantized is not None and quantized["after"]["file_bytes"] is None
    assert (quantized["before"]["torchscript_bytes"], quantized["after"]["torchscript_bytes"]) == (25000, 8000)
    assert summarize("distill", {}) is None and summarize("prune", {"input": {}}) is None


def test_figures_and_changes_read_plainly() -> None:
    assert format_figure("accuracy", 0.9533) == "95.33%"
    assert format_figure("params", 123456) == "123,456"
    assert format_figure("file_bytes", 22000) == "21.5 KiB"
    assert describe_change("accuracy", 0.9711, 0.9533) == "-1.78 pts"
    assert describe_change("params", 123456, 5321) == "23.20x fewer"
    assert describe_change("cpu_latency_ms_batch1", 0.3, 0.6) == "2.00x slower"
    assert describe_change("params", 4000, 4000) == "same" and describe_change("file_bytes", 1, None) == "n/a"


def test_model_card_holds_the_real_numbers() -> None:
    card = report.model_card(document("distill", DISTILL_METRICS), ["training_curves.svg"])
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ")}
    assert "97.11%" in rows["Top-1 accuracy"] and "95.33%" in rows["Top-1 accuracy"]
    assert "123,456" in rows["Parameters"] and "5,321" in rows["Parameters"] and "23.20x fewer" in rows["Parameters"]
    assert "0.900 ms" in rows["CPU latency, batch 1"] and "3.00x faster" in rows["CPU latency, batch 1"]
    assert "a" * 64 in card and "b" * 64 in card  # input and artifact hashes
    assert "teacher \\| v2" in card  # a pipe in a name does not break the table
    assert f"| torch | {ENVIRONMENT['libraries']['torch']} |" in card
    assert "| 3 | 0.5000 | 86.80% |" in card
    assert "![training_curves.svg](training_curves.svg)" in card


def test_model_card_shows_user_chosen_text_and_renders_none_of_it() -> None:
    hostile = {**PROVENANCE["model"], "name": "<script>alert(1)</script> **bold** `x` [link](http://evil)",
               "arch": {"arch": "small_cnn", "kwargs": {"note": "`` <img src=x onerror=alert(1)>"}}}
    metrics = {**DISTILL_METRICS, "notes": ["<b>note</b> from _a_ library"]}
    job = {"id": "job_1", "kind": "distill", "attempt": 1, "spec": {"kind": "distill", "epochs": 3}}
    card = report.model_card(report.build_document(job, {**PROVENANCE, "model": hostile}, metrics, ARTIFACTS,
                                                   ENVIRONMENT), [])
    model_row = next(line for line in card.splitlines() if line.startswith("| Input model |"))
    assert "<script>" not in card and "<b>" not in card
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\*\\*bold\\*\\* \\`x\\` \\[link\\](http://evil)" in model_row
    assert "- &lt;b&gt;note&lt;/b&gt; from \\_a\\_ library" in card
    # Inside a code span HTML is shown as written; the fence outlasts the backticks in the text.
    assert '```{"arch": "small_cnn", "kwargs": {"note": "`` <img src=x onerror=alert(1)>"}}```' in card


def test_curves_svg_has_one_point_per_epoch_per_series() -> None:
    root = ET.fromstring(plots.curves_svg(HISTORY))
    assert root.tag == f"{SVG}svg"
    for series in ("train_loss", "val_accuracy"):
        points = [c for c in root.iter(f"{SVG}circle") if c.get("data-series") == series]
        assert [int(p.get("data-epoch", 0)) for p in points] == [1, 2, 3]
    # Lower loss is drawn higher up the panel's pixel axis (y grows downwards): later epochs sit lower.
    loss_y = [float(c.get("cy", 0)) for c in root.iter(f"{SVG}circle") if c.get("data-series") == "train_loss"]
    assert loss_y == sorted(loss_y)


def test_comparison_svg_draws_a_bar_pair_per_figure() -> None:
    summary = summarize("quantize", QUANTIZE_METRICS)
    assert summary is not None
    root = ET.fromstring(plots.comparison_svg(summary))
    figures = [bar.get("data-figure") for bar in root.iter(f"{SVG}rect") if bar.get("class") == "bar"]
    # Every figure both sides have, twice; the int8 side has no weights file, so that pair is left out.
    assert len(figures) == 12 and "file_bytes" not in figures and "torchscript_bytes" in figures


@pytest.mark.parametrize(("kind", "metrics", "curves"), [("distill", DISTILL_METRICS, True),
                                                         ("prune", PRUNE_METRICS, True),
                                                         ("quantize", QUANTIZE_METRICS, False)])
def test_written_report_files_parse(tmp_path: Path, kind: str, metrics: dict[str, Any], curves: bool) -> None:
    files = {item.kind: item for item in report.write_report(tmp_path, document(kind, metrics))}
    expected = {"report_json", "report_model_card", "report_comparison_svg"} | ({"report_curves_svg"} if curves
                                                                               else set())
    assert set(files) == expected
    parsed = json.loads(files["report_json"].path.read_text())
    assert parsed["inputs"]["model"]["sha256"] == "a" * 64 and parsed["metrics"] == metrics
    assert parsed["environment"]["libraries"]["torch"] == ENVIRONMENT["libraries"]["torch"]
    for item in files.values():
        if item.media_type == "image/svg+xml":
            ET.parse(item.path)
    if not curves:
        assert "## Training" not in files["report_model_card"].path.read_text()


def test_summary_and_model_card_show_each_files_verdict_the_evaluation_and_the_cpu() -> None:
    host = {"model": "Some CPU", "machine": "x86_64", "features": ["avx2", "avx512_vnni"], "int8_dot_product": True}
    gate = acceptance.Gate(reference="input model", reference_accuracy=0.95, max_drop_pts=2.0,
                           float_source="float input model", float_source_accuracy=0.95, num_classes=10,
                           label_counts=[36] * 10)
    verdicts = acceptance.check(gate, {
        "torchscript": {"accuracy": 0.94, "agreement": 0.98, "agreement_with": "float input model",
                        "dominant_class_share": 0.11},
        "onnx": {"accuracy": 0.40, "agreement": 0.41, "agreement_with": "float input model",
                 "dominant_class_share": 0.3}})
    evaluation = {"source": "split", "dataset": "digits", "samples": 360, "note": "a split"}
    metrics = {**QUANTIZE_METRICS, "measured_on": host, "acceptance": verdicts, "evaluation": evaluation}
    summary = summarize("quantize", metrics)
    assert summary is not None and summary["failed_formats"] == ["onnx"] and summary["measured_on"] == host
    assert summary["evaluation"] == evaluation
    assert [(entry["format"], entry["passed"]) for entry in summary["formats"]] == [("torchscript", True),
                                                                                     ("onnx", False)]
    card = report.model_card(document("quantize", metrics), [])
    assert ("| onnx | 40.00% | 41.00% with the float input model | -55.00 pts | -55.00 pts | **REJECTED**: scores "
            "40.00%, 55.00 points below the float input model") in card
    assert "| torchscript | 94.00% | 98.00% with the float input model | -1.00 pts | -1.00 pts | passed |" in card
    assert "**Not results:** the onnx file(s) failed their acceptance checks" in card
    assert "images held out from the uploaded dataset `digits`:" in card and "may have" in card
    assert "Measured on Some CPU (x86_64: avx2, avx512_vnni)." in card
    assert f"CPU {cpu.summary_line(cpu.describe())}." in card  # the environment: the host that wrote the report


def test_a_job_measured_before_the_acceptance_checks_still_summarizes() -> None:
    legacy = {"formats": {"onnx": {"accuracy": 0.4, "drop_pts": 55.0, "passed": False}}}
    summary = summarize("quantize", {**QUANTIZE_METRICS, "format_check": legacy})
    assert summary is not None and summary["failed_formats"] == ["onnx"]
    assert summary["formats"] == [{"format": "onnx", "accuracy": 0.4, "source_drop_pts": 55.0, "passed": False}]


def test_cpu_features_come_from_the_host() -> None:
    host = cpu.describe()
    assert set(host) == {"model", "machine", "features", "int8_dot_product"}
    assert set(host["features"]) <= set(cpu.RELEVANT_FEATURES)
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert ("avx2" in host["features"]) == ("avx2" in flags)
        assert host["int8_dot_product"] == bool(flags & set(cpu.INT8_DOT_PRODUCT))


def original_run(metrics: dict[str, Any], environment: dict[str, Any] | None, kind: str = "prune",
                 status: str = "succeeded") -> dict[str, Any]:
    return {"id": "job_0", "kind": kind, "status": status, "metrics": metrics,
            "finished_at": "2026-11-01T10:00:00+00:00", "environment": environment}


def test_a_replays_report_sets_the_originals_figures_beside_its_own() -> None:
    host = {"model": "Some CPU", "machine": "x86_64", "features": [], "int8_dot_product": False}
    gate = acceptance.Gate(reference="input model", reference_accuracy=0.95, max_drop_pts=5.0,
                           float_source="float input model", float_source_accuracy=0.95, num_classes=10,
                           label_counts=[36] * 10)

    def checked(torchscript: float, onnx: float) -> dict[str, Any]:
        return acceptance.check(gate, {fmt: {"accuracy": accuracy, "agreement": 1.0,
                                             "agreement_with": "float input model", "dominant_class_share": 0.1}
                                       for fmt, accuracy in (("torchscript", torchscript), ("onnx", onnx))})

    older = {**ENVIRONMENT, "libraries": {**ENVIRONMENT["libraries"], "torch": "2.0.0"}}
    original = original_run({**PRUNE_METRICS, "measured_on": host, "acceptance": checked(0.93, 0.92),
                             "output": side(0.93, 1000, 5000, 9000, 0.25)}, older)
    replayed = {**PRUNE_METRICS, "measured_on": host, "acceptance": checked(0.94, 0.94),
                "output": side(0.94, 1000, 4000, 9000, 0.2)}
    job = {"id": "job_1", "kind": "prune", "attempt": 1, "spec": {"kind": "prune"}}
    built = report.build_document(job, PROVENANCE, replayed, ARTIFACTS, ENVIRONMENT, original)

    entry = built["replay_of"]
    assert (entry["job"], entry["status"]) == ("job_0", "succeeded")
    assert entry["summary"]["after"]["accuracy"] == 0.93
    assert entry["changed"] == {"torch": ["2.0.0", ENVIRONMENT["libraries"]["torch"]]}
    rows = {row["title"]: row for row in entry["comparison"]}
    assert (rows["Top-1 accuracy (pruned)"]["original"], rows["Top-1 accuracy (pruned)"]["replay"]) == (0.93, 0.94)
    assert rows["Top-1 accuracy (onnx file)"]["change"] == "+2.00 pts"

    card = report.model_card(built, [])
    assert "## Replay of `job_0`: original vs this run" in card
    assert card.index("## Before and after") < card.index("## Replay of") < card.index("## Artifacts")
    cells = {parts[1].strip(): [cell.strip() for cell in parts[2:-1]]
             for parts in (line.split("|") for line in card.split("## Replay of")[1].splitlines())
             if len(parts) > 2 and parts[1].strip()}
    assert cells["Top-1 accuracy (pruned)"] == ["93.00%", "94.00%", "+1.00 pts"]
    assert cells["Weights file size (pruned)"] == ["4.9 KiB", "3.9 KiB", "1.25x smaller"]
    assert cells["CPU latency, batch 1 (pruned)"] == ["0.250 ms", "0.200 ms", "1.25x faster"]
    assert cells["Parameters (pruned)"] == ["1,000", "1,000", "same"]
    assert cells["Top-1 accuracy (input)"] == ["95.00%", "95.00%", "+0.00 pts"]
    assert cells["Top-1 accuracy (torchscript file)"] == ["93.00%", "94.00%", "+1.00 pts"]
    assert f"Changed since the original: torch 2.0.0 → {ENVIRONMENT['libraries']['torch']}." in card


def test_a_replay_of_a_job_without_figures_says_so() -> None:
    job = {"id": "job_1", "kind": "prune", "attempt": 1, "spec": {"kind": "prune"}}
    failed = original_run({"error": "out of memory"}, None, status="failed")
    built = report.build_document(job, PROVENANCE, PRUNE_METRICS, ARTIFACTS, ENVIRONMENT, failed)
    assert built["replay_of"]["comparison"] == [] and built["replay_of"]["changed"] is None
    card = report.model_card(built, [])
    assert "The original ended failed without the figures of a finished result: nothing to compare." in card
    assert "The original's environment was not recorded" in card
    same = report.build_document(job, PROVENANCE, PRUNE_METRICS, ARTIFACTS, ENVIRONMENT,
                                 original_run(PRUNE_METRICS, ENVIRONMENT))
    assert "Same Python, device and library versions as the original." in report.model_card(same, [])
    assert "replay_of" not in document("prune", PRUNE_METRICS)


def _verdicts(accuracy: float, passed: bool) -> dict[str, Any]:
    entry = {"accuracy": accuracy, "agreement": 0.97, "agreement_with": "digits teachers", "drop_pts": 1.0,
             "source_drop_pts": 0.0, "dominant_class_share": 0.12, "passed": passed,
             "reasons": [] if passed else ["scores 10.00%, no better than chance"]}
    return {"formats": {"safetensors": entry, "onnx": entry}, "failed_formats": [] if passed else ["onnx"]}


MANY_TEACHERS_METRICS: dict[str, Any] = {
    **DISTILL_METRICS,
    "control": {"accuracy": 0.94, "kd_gain_pts": 1.33, "what": "the same student trained alone"},
    "teachers": [{"id": "mdl_a", "arch": "small_cnn", "weight": 1.0, "task": "digits", "accuracy": 0.97,
                  "param_count": 100, "cpu_latency_ms_batch1": 0.2},
                 {"id": "mdl_b", "arch": "resnet18", "weight": 2.0, "task": "shapes", "accuracy": 0.91,
                  "param_count": 11_000_000, "cpu_latency_ms_batch1": 2.5}],
    "tasks": {"digits": {"accuracy": 0.95, "teacher_accuracy": 0.97, "validation_samples": 360,
                         "acceptance": _verdicts(0.95, True)},
              "shapes": {"accuracy": 0.12, "teacher_accuracy": 0.91, "validation_samples": 400,
                         "acceptance": _verdicts(0.12, False)}},
}


def test_a_distillation_with_teachers_tasks_and_a_control_run_summarizes_and_reports_each() -> None:
    summary = summarize("distill", MANY_TEACHERS_METRICS)
    assert summary is not None
    assert summary["control"] == {"accuracy": 0.94, "kd_gain_pts": 1.33}
    assert [(member["id"], member["task"], member["params"]) for member in summary["teachers"]] == [
        ("mdl_a", "digits", 100), ("mdl_b", "shapes", 11_000_000)]
    assert [(task["name"], task["evaluation_samples"], task["passed"]) for task in summary["tasks"]] == [
        ("digits", 360, True), ("shapes", 400, False)]
    card = report.model_card(document("distill", MANY_TEACHERS_METRICS), [])
    assert "| digits | 95.00% | 97.00% | -2.00 pts | 360 | passed |" in card
    assert "| shapes | 12.00% | 91.00% | -79.00 pts | 400 | **REJECTED** |" in card
    assert "| `mdl_b` | shapes | resnet18 | 2 | 91.00% | 11,000,000 | 2.500 ms |" in card
    assert "scored 94.00%; distillation gained +1.33 points over it" in card
    plain = report.model_card(document("distill", DISTILL_METRICS), [])
    assert "### Tasks" not in plain and "Control run" not in plain and "### Teachers" not in plain


def test_the_cli_shows_each_head_and_the_control_run(capsys: pytest.CaptureFixture[str]) -> None:
    from app.client_cli.jobs import show_job

    show_job({"id": "job_1", "kind": "distill", "status": "succeeded", "attempt": 1, "max_attempts": 3,
              "model": "mdl_a", "dataset": "digits", "created_at": "2026-11-30T00:00:00Z",
              "summary": summarize("distill", MANY_TEACHERS_METRICS), "metrics": {}})
    shown = capsys.readouterr().out
    assert "task      digits: 95.00% (its teachers 97.00%), passed" in shown
    assert "task      shapes: 12.00% (its teachers 91.00%), REJECTED" in shown
    assert "control   the student trained alone 94.00%; KD gain +1.33 pts" in shown


def test_cli_progress_shows_each_heads_accuracy() -> None:
    from app.client_cli.jobs import progress_fields

    fields = progress_fields({"status": "running", "progress": {
        "stage": "distill", "epoch": 2, "epochs": 5, "step": 10, "total_steps": 50, "train_loss": 0.5,
        "val_accuracy": 0.8, "val_accuracy_by_task": {"digits": 0.9, "shapes": 0.7}}})
    assert fields["metrics"] == "loss 0.5000  val acc 0.8000  digits 0.9000  shapes 0.7000"
