"""The typed job spec: flat bodies and nested specs give the same job, the stored form reads back as itself, and
specs stored by earlier versions (flat, with every field of every method filled in) still load."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from core.jobspec import DistillJobSpec, JobSpec, PruneJobSpec, QuantizeJobSpec, load_stored, stored_form

SPEC: TypeAdapter[Any] = TypeAdapter(JobSpec)
_COMMON = {"val_fraction": 0.2, "seed": 0, "device": "auto", "time_limit_seconds": None}
_TRAINING = {"epochs": 2, "batch_size": 64, "lr": 1e-4, "weight_decay": 1e-4, "temperature": 4.0, "alpha": 0.9,
             "optimizer": "adamw", "scheduler": "cosine", "augment": "none", "compile": "auto"}
# Exactly what the version before the nested configs stored (JobCreate.model_dump() less webhook_url).
LEGACY = {
    "distill": {"kind": "distill", "teacher": "mdl_1", "dataset": "digits", **_COMMON, **_TRAINING, "epochs": 20,
                "lr": 3e-3, "student": {"arch": "small_cnn", "kwargs": {"width": 16, "num_classes": 10}}},
    "structured": {"kind": "prune", "model": "mdl_1", "dataset": "dst_1", **_COMMON, **_TRAINING, "epochs": 3,
                   "lr": 1e-3, "method": "structured", "importance": "taylor", "channel_ratio": 0.5,
                   "target_macs_reduction": None, "sparsity": None, "iterative_steps": 1, "global_pruning": False,
                   "round_to": None, "keep_layers": [], "calibration_samples": 128},
    "unstructured-no-recovery": {
        "kind": "prune", "model": "mdl_1", "dataset": "digits", **_COMMON, **_TRAINING, "epochs": 0, "lr": 1e-3,
        "method": "unstructured", "importance": "magnitude", "channel_ratio": None, "target_macs_reduction": None,
        "sparsity": 0.5, "iterative_steps": 1, "global_pruning": False, "round_to": None, "keep_layers": [],
        "calibration_samples": 128},
    "static": {"kind": "quantize", "model": "mdl_1", "dataset": "digits", **_COMMON, **_TRAINING, "method": "static",
               "backend": "x86", "calibration_samples": 256},
    "dynamic": {"kind": "quantize", "model": "mdl_1", "dataset": "digits", **_COMMON, **_TRAINING,
                "method": "dynamic", "backend": "x86", "calibration_samples": 256},
    "qat": {"kind": "quantize", "model": "mdl_1", "dataset": "digits", **_COMMON, **_TRAINING, "epochs": 1,
            "lr": 1e-5, "method": "qat", "backend": "qnnpack", "calibration_samples": 64},
}


@pytest.mark.parametrize("name", list(LEGACY))
def test_specs_stored_by_earlier_versions_still_load(name: str) -> None:
    spec = load_stored(LEGACY[name])
    assert load_stored(stored_form(spec)) == spec  # and the stored form reads back as itself
    if name == "distill":
        assert isinstance(spec, DistillJobSpec)
        assert (spec.distill.training.epochs, spec.distill.training.lr, spec.distill.alpha) == (20, 3e-3, 0.9)
        assert spec.student.kwargs == {"width": 16, "num_classes": 10}
    elif name == "structured":
        assert isinstance(spec, PruneJobSpec) and spec.prune.importance == "taylor" and spec.dataset == "dst_1"
        assert spec.prune.recovery is not None and spec.prune.recovery.training.epochs == 3
    elif name == "unstructured-no-recovery":
        assert isinstance(spec, PruneJobSpec)
        assert (spec.prune.sparsity, spec.prune.recovery, spec.prune.importance) == (0.5, None, None)
    else:
        assert isinstance(spec, QuantizeJobSpec) and spec.quantize.method == name
        assert (spec.quantize.qat is None) == (name != "qat")
        if name == "qat":
            assert spec.quantize.qat.training.lr == 1e-5 and spec.quantize.backend == "qnnpack"
        assert spec.quantize.calibration_samples == {"static": 256, "dynamic": None, "qat": 64}[name]


def test_flat_and_nested_bodies_are_the_same_job() -> None:
    flat = SPEC.validate_python({"kind": "prune", "model": "mdl_1", "dataset": "digits", "channel_ratio": 0.5,
                                 "epochs": 2, "temperature": 2.0, "seed": 3})
    nested = SPEC.validate_python({"kind": "prune", "model": "mdl_1", "dataset": "digits", "seed": 3,
                                   "prune": {"channel_ratio": 0.5,
                                             "recovery": {"temperature": 2.0, "training": {"epochs": 2}}}})
    assert flat == nested
    # The recovery's own defaults (a lower lr than a distillation's) hold under what was given.
    assert nested.prune.recovery.training.lr == 1e-3 and nested.seed == 3


@pytest.mark.parametrize(("body", "message"), [
    ({"kind": "quantize", "lr": 0.1}, "lr only apply to method 'qat'"),
    ({"kind": "prune", "channel_ratio": 0.5, "recovery": None, "lr": 0.1}, "recovery is null, which skips it"),
    ({"kind": "distill", "teacher": "mdl_1", "student": {"arch": "small_cnn"}, "epochs": 0}, "greater than or equal"),
])
def test_a_field_its_method_ignores_is_refused(body: dict[str, Any], message: str) -> None:
    body = {"model": "mdl_1", "dataset": "digits", **body}
    if body["kind"] == "distill":
        body.pop("model")
    with pytest.raises(ValidationError, match=message):
        SPEC.validate_python(body)


def test_every_spec_kind_has_a_registered_job_function_and_no_other() -> None:
    from core.jobspec import KINDS
    from worker.jobs.base import job_function, registered_kinds

    assert registered_kinds() == sorted(KINDS)
    assert job_function("prune").__module__ == "worker.jobs.prune"


@pytest.mark.parametrize(("given", "expected"), [
    ({"dataset": "photo-patches"}, "crop_flip"),
    ({"dataset": "shapes", "epochs": 3}, "crop_flip"),
    ({"dataset": "digits"}, "crop"),  # a mirrored digit may be another digit
    ({"dataset": "dst_1"}, "crop"),  # an upload may hold text: flipping is the user's call
    ({"dataset": "dst_1", "augment": "crop_flip"}, "crop_flip"),
    ({"dataset": "photo-patches", "distill": {"training": {"augment": "none"}}}, "none"),
    ({"dataset": "photo-patches", "distill": {"training": {"augment": "auto", "epochs": 2}}}, "crop_flip"),
])
def test_augment_auto_is_stored_as_what_the_dataset_allows(given: dict[str, Any], expected: str) -> None:
    spec = DistillJobSpec.model_validate({"teacher": "mdl_1", "student": {"arch": "small_cnn"}, **given})
    assert spec.distill.training.augment == expected
    assert stored_form(spec)["distill"]["training"]["augment"] == expected
    assert load_stored(stored_form(spec)) == spec


@pytest.mark.parametrize(("second", "expected"), [("photo-patches", "crop_flip"), ("digits", "crop")])
def test_augment_auto_with_tasks_flips_only_if_every_dataset_allows_it(second: str, expected: str) -> None:
    tasks = [{"name": "shapes", "teachers": [{"model": "mdl_1"}], "dataset": "shapes"},
             {"name": "other", "teachers": [{"model": "mdl_2"}], "dataset": second}]
    spec = DistillJobSpec.model_validate({"tasks": tasks, "student": {"arch": "small_cnn"}})
    assert spec.distill.training.augment == expected


def test_recovery_and_qat_fine_tune_on_the_images_as_they_are() -> None:
    prune = PruneJobSpec.model_validate({"kind": "prune", "model": "mdl_1", "dataset": "photo-patches",
                                         "channel_ratio": 0.5})
    qat = QuantizeJobSpec.model_validate({"kind": "quantize", "model": "mdl_1", "dataset": "photo-patches",
                                          "method": "qat"})
    assert prune.prune.recovery is not None and prune.prune.recovery.training.augment == "none"
    assert qat.quantize.qat is not None and qat.quantize.qat.training.augment == "none"


@pytest.mark.parametrize(("given", "lr", "weight_decay"), [
    ({}, 0.05, 5e-4),
    ({"optimizer": "adamw"}, 3e-3, 1e-4),  # SGD's lr would make AdamW diverge
    ({"optimizer": "adamw", "lr": 1e-3}, 1e-3, 1e-4),
    ({"lr": 0.1, "weight_decay": 0.0}, 0.1, 0.0),
])
def test_lr_and_weight_decay_default_by_optimizer(given: dict[str, Any], lr: float, weight_decay: float) -> None:
    spec = DistillJobSpec.model_validate({"teacher": "mdl_1", "dataset": "digits", "student": {"arch": "small_cnn"},
                                          **given})
    training = stored_form(spec)["distill"]["training"]
    assert (training["lr"], training["weight_decay"]) == (lr, weight_decay)
    assert load_stored(stored_form(spec)) == spec


@pytest.mark.parametrize("optimizer", [{}, ["sgd"], 3, None])
def test_an_optimizer_that_is_not_a_name_is_a_validation_error(optimizer: Any) -> None:
    """Found by the API fuzzer: {"optimizer": {}} reached the per-optimizer defaults' lookup and was a 500."""
    with pytest.raises(ValidationError, match="optimizer"):
        DistillJobSpec.model_validate({"teacher": "mdl_1", "dataset": "digits", "student": {"arch": "small_cnn"},
                                       "optimizer": optimizer})
