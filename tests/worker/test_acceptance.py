"""The acceptance checks that decide which files are results: the chance floor, collapse, the float-source
tolerance and the max_accuracy_drop_pts gate, and the job status they lead to."""

from __future__ import annotations

from typing import Any

import pytest

from worker.jobs import acceptance


def gate(max_drop_pts: float | None = 2.0, labels: list[int] | None = None, reference: float = 0.95,
         source: float = 0.95) -> acceptance.Gate:
    return acceptance.Gate(reference="input model", reference_accuracy=reference, max_drop_pts=max_drop_pts,
                           float_source="float input model", float_source_accuracy=source, num_classes=10,
                           label_counts=labels or [36] * 10)


def entry(accuracy: float, dominant_class_share: float = 0.12) -> dict[str, Any]:
    return {"accuracy": accuracy, "agreement": accuracy, "agreement_with": "float input model",
            "dominant_class_share": dominant_class_share}


def test_a_result_within_every_limit_passes() -> None:
    verdict = acceptance.check(gate(), {"torchscript": entry(0.94)})
    assert verdict["passed_formats"] == ["torchscript"] and verdict["failed_formats"] == []
    assert verdict["formats"]["torchscript"]["drop_pts"] == 1.0 and verdict["notes"] == []


def test_the_gate_limits_the_drop_against_the_reference_and_can_be_turned_off() -> None:
    assert acceptance.check(gate(2.0), {"a": entry(0.93), "b": entry(0.9299)})["failed_formats"] == ["b"]
    assert acceptance.check(gate(None, source=0.80), {"b": entry(0.80, 0.2)})["failed_formats"] == []


def test_a_broken_format_fails_against_its_float_source_even_without_a_gate() -> None:
    verdict = acceptance.check(gate(None, source=0.97), {"onnx": entry(0.43)})
    reasons = verdict["formats"]["onnx"]["reasons"]
    assert reasons == ["scores 43.00%, 54.00 points below the float input model it was made from (97.00%; at most 3 "
                       "allowed)"]
    assert verdict["notes"][0].startswith("NOT A RESULT: the onnx file scores 43.00%")


@pytest.mark.parametrize("accuracy", [0.10, 0.149])
def test_chance_level_never_passes_even_with_everything_else_off(accuracy: float) -> None:
    # 360 balanced images, 10 classes: a guesser's accuracy has a standard error of 1.6 pts; the floor is 15%.
    verdict = acceptance.check(gate(None, reference=0.12, source=0.12), {"safetensors": entry(accuracy)})
    assert verdict["floor_accuracy"] == 0.15 and verdict["failed_formats"] == ["safetensors"]
    assert "no better than chance" in verdict["formats"]["safetensors"]["reasons"][0]


def test_the_floor_is_the_commonest_class_share_on_imbalanced_images() -> None:
    imbalanced = [300] + [10] * 9  # always answering class 0 scores 76.9%
    verdict = acceptance.check(gate(None, labels=imbalanced), {"a": entry(0.78, 0.95), "b": entry(0.95, 0.8)})
    assert verdict["constant_guess_accuracy"] == pytest.approx(300 / 390, abs=1e-4)
    assert verdict["failed_formats"] == ["a"]  # 0.78 is within the margin; b predicts class 0 as often as it is


def test_a_model_that_predicts_one_class_has_collapsed() -> None:
    verdict = acceptance.check(gate(None, reference=0.3, source=0.3), {"a": entry(0.3, 0.92)})
    assert verdict["formats"]["a"]["reasons"] == ["predicts one class for 92% of the images (collapsed)"]


def test_the_job_fails_only_when_no_result_passed_and_says_what_to_try() -> None:
    some = acceptance.check(gate(), {"torchscript": entry(0.94), "onnx": entry(0.4)})
    status, message, error = acceptance.conclusion("quantize", some)
    assert (status, error) == ("succeeded", None) and "torchscript only" in message and "onnx" in message
    none = acceptance.check(gate(), {"torchscript": entry(0.5), "onnx": entry(0.4)})
    status, message, error = acceptance.conclusion("quantize", none)
    assert status == "failed" and error is not None and message == f"failed: {error}"
    assert error.startswith("no file passed its acceptance checks: the torchscript file scores 50.00%")
    assert "1 other file(s) failed too" in error and "What to try: try method 'qat'" in error


def test_a_multi_head_file_passes_only_if_every_head_does() -> None:
    """One head at chance makes the whole file not a result, whatever the other head scores."""
    digits = acceptance.check(gate(None), {"onnx": entry(0.96), "torchscript": entry(0.95)})
    shapes = acceptance.check(gate(None, reference=0.91, source=0.90),
                              {"onnx": entry(0.10), "torchscript": entry(0.90)})
    combined = acceptance.combine({"digits": digits, "shapes": shapes})
    assert combined["failed_formats"] == ["onnx"] and combined["passed_formats"] == ["torchscript"]
    onnx = combined["formats"]["onnx"]
    assert onnx["accuracy"] == pytest.approx(0.53) and onnx["drop_pts"] == 81.0
    assert onnx["reasons"] and all(reason.startswith("shapes: ") for reason in onnx["reasons"])
    assert onnx["by_task"]["digits"]["passed"] and not onnx["by_task"]["shapes"]["passed"]
    assert len(combined["notes"]) == 1 and "onnx" in combined["notes"][0]
    status, _, error = acceptance.conclusion("distill", acceptance.combine({"shapes": shapes}))
    assert status == "succeeded" and error is None
