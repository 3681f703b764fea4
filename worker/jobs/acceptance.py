"""Acceptance gates: which of a job's files may be published as results, judged the way a user would judge them
("is this file good?") on the job's evaluation images.

Every file that holds a model (each format) passes four checks or is not a result:
- the floor: it scores clearly above a constant guess (chance, or the largest class's share of the images);
- no collapse: it does not predict one class for nearly every image;
- it scores at most FORMAT_TOLERANCE_PTS below the float model it was made from (a broken export or kernel);
- the gate: it scores at most `max_accuracy_drop_pts` below the reference (the input model, a distillation's
  teacher), when the job sets one.

Pure and torch-free: the runner and the report read what `check` returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import fmean
from typing import Any

# How far below its float source a published format may score: int8 rounding costs a fraction of a point on a
# healthy model; a broken kernel or export costs tens.
FORMAT_TOLERANCE_PTS = 3.0
# A result must beat a constant guess by this many standard errors of a guesser's accuracy on the same number of
# images, and by at least MIN_MARGIN, so that a lucky guesser on a small set does not pass.
FLOOR_SIGMAS = 3.0
MIN_MARGIN = 0.05
# A model that gives one class to this share of the images has collapsed (unless the images are mostly that class).
COLLAPSE_SHARE = 0.9

ADVICE = {
    "distill": "try more epochs, a larger student, or a different lr; if the student scores at chance, check "
               "that the dataset is the teacher's (same classes and preprocessing)",
    "prune": "try a lower channel_ratio, more recovery epochs, or method 'unstructured'; or raise "
             "max_accuracy_drop_pts if the drop is acceptable to you",
    "quantize": "try method 'qat' (fine-tunes through the rounding), more calibration_samples, or the format that "
                "passed; or raise max_accuracy_drop_pts if the drop is acceptable to you",
}


@dataclass(frozen=True)
class Gate:
    """What every result of a job is checked against."""

    reference: str  # "input model" or "teacher"
    reference_accuracy: float
    max_drop_pts: float | None
    float_source: str  # the float model the files were made from, in words
    float_source_accuracy: float
    num_classes: int
    label_counts: list[int]  # of the evaluation images, per class

    @property
    def constant_guess(self) -> float:
        """The accuracy of always answering the commonest class (1 / num_classes on balanced images)."""
        return max(max(self.label_counts) / sum(self.label_counts), 1 / self.num_classes)

    @property
    def floor(self) -> float:
        guess, samples = self.constant_guess, sum(self.label_counts)
        return min(1.0, guess + max(MIN_MARGIN, FLOOR_SIGMAS * math.sqrt(guess * (1 - guess) / samples)))


def check(gate: Gate, formats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each format's verdict: `formats` maps a format to its "accuracy", "agreement" (top-1 agreement with
    `agreement_with`) and "dominant_class_share" (the share of images given its most frequent prediction)."""
    results = {fmt: _verdict(gate, entry) for fmt, entry in formats.items()}
    return {"reference": gate.reference, "reference_accuracy": gate.reference_accuracy,
            "max_accuracy_drop_pts": gate.max_drop_pts, "float_source": gate.float_source,
            "float_source_accuracy": gate.float_source_accuracy, "format_tolerance_pts": FORMAT_TOLERANCE_PTS,
            "constant_guess_accuracy": round(gate.constant_guess, 4), "floor_accuracy": round(gate.floor, 4),
            **_outcome(results)}


def _outcome(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every file's verdict, which passed and which did not, and a note for each that did not."""
    failed = [fmt for fmt, result in results.items() if not result["passed"]]
    return {"formats": dict(results), "passed_formats": [fmt for fmt in results if fmt not in failed],
            "failed_formats": failed,
            "notes": [f"NOT A RESULT: the {fmt} file {'; '.join(results[fmt]['reasons'])}; kept only as a "
                      f"diagnostic (REJECTED-*), do not deploy it" for fmt in failed]}


def _verdict(gate: Gate, entry: Mapping[str, Any]) -> dict[str, Any]:
    accuracy = entry["accuracy"]
    drop_pts = _points(gate.reference_accuracy - accuracy)
    source_drop_pts = _points(gate.float_source_accuracy - accuracy)
    reasons = []
    if accuracy <= gate.floor:
        reasons.append(f"scores {accuracy:.2%}, no better than chance (always answering the commonest class scores "
                       f"{gate.constant_guess:.2%}; at least {gate.floor:.2%} needed)")
    share = entry["dominant_class_share"]
    if share >= COLLAPSE_SHARE and share > gate.constant_guess + MIN_MARGIN:
        reasons.append(f"predicts one class for {share:.0%} of the images (collapsed)")
    if source_drop_pts > FORMAT_TOLERANCE_PTS:
        reasons.append(f"scores {accuracy:.2%}, {source_drop_pts:.2f} points below the {gate.float_source} it was "
                       f"made from ({gate.float_source_accuracy:.2%}; at most {FORMAT_TOLERANCE_PTS:g} allowed)")
    if gate.max_drop_pts is not None and drop_pts > gate.max_drop_pts:
        reasons.append(f"scores {accuracy:.2%}, {drop_pts:.2f} points below the {gate.reference} "
                       f"({gate.reference_accuracy:.2%}; max_accuracy_drop_pts {gate.max_drop_pts:g})")
    return {"accuracy": accuracy, "agreement": entry["agreement"], "agreement_with": entry["agreement_with"],
            "drop_pts": drop_pts, "source_drop_pts": source_drop_pts, "dominant_class_share": share,
            "passed": not reasons, "reasons": reasons}


def _points(fraction: float) -> float:
    return round(fraction * 100, 2)


def conclusion(kind: str, acceptance: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(status, closing message, error) of a job whose results were checked: it fails when none passed."""
    failed, passed = acceptance["failed_formats"], acceptance["passed_formats"]
    if not failed:
        return "succeeded", "succeeded; every file passed its acceptance checks", None
    if passed:
        return ("succeeded", f"succeeded with {', '.join(passed)} only: the {' and '.join(failed)} file(s) failed "
                f"their acceptance checks and are kept only as diagnostics (see the notes)", None)
    first = acceptance["formats"][failed[0]]
    others = f"; {len(failed) - 1} other file(s) failed too (see the notes)" if len(failed) > 1 else ""
    error = (f"no file passed its acceptance checks: the {failed[0]} file {'; '.join(first['reasons'])}{others}. "
             f"What to try: {ADVICE[kind]}")
    return "failed", f"failed: {error}", error


def combine(by_task: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One verdict per file of a multi-task model from each task's `check`: a file is a result only if every task's
    head passed (a model whose one head is at chance is not good); its figures are the worst task's (agreement,
    drops, collapse) and the mean accuracy, with every task's verdict under `by_task`."""
    first = next(iter(by_task.values()))
    formats = {fmt: _combined_verdict({task: result["formats"][fmt] for task, result in by_task.items()})
               for fmt in first["formats"]}
    return {"reference": "each task's teachers",
            "reference_accuracy": fmean(result["reference_accuracy"] for result in by_task.values()),
            "max_accuracy_drop_pts": {task: result["max_accuracy_drop_pts"] for task, result in by_task.items()},
            "float_source": first["float_source"], "format_tolerance_pts": FORMAT_TOLERANCE_PTS,
            **_outcome(formats)}


def _combined_verdict(verdicts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    entries = list(verdicts.values())
    return {"accuracy": fmean(entry["accuracy"] for entry in entries),
            "agreement": min(entry["agreement"] for entry in entries), "agreement_with": entries[0]["agreement_with"],
            "drop_pts": max(entry["drop_pts"] for entry in entries),
            "source_drop_pts": max(entry["source_drop_pts"] for entry in entries),
            "dominant_class_share": max(entry["dominant_class_share"] for entry in entries),
            "passed": all(entry["passed"] for entry in entries),
            "reasons": [f"{task}: {reason}" for task, entry in verdicts.items() for reason in entry["reasons"]],
            "by_task": dict(verdicts)}
