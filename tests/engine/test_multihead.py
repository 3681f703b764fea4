"""Multi-head models: one shared backbone, one Linear head per task; built from a spec, saved as safetensors, and
exported to files that return each task's logits by name with nothing but torch or ONNX Runtime."""

from __future__ import annotations

import warnings

import onnxruntime
import pytest
import torch
from pydantic import ValidationError

from tests.engine.conftest import DIGITS_8X8
from worker.engine import budget, evaluate, export, models, prune, quantize
from worker.engine.config import (
    ArchSpec,
    InputSpec,
    PruneConfig,
    StudentSpec,
    multitask_student_arch,
    refuse_multi_head,
)
from worker.engine.errors import ModelLoadError, SpecError
from worker.jobs import measure

HEADS = {"digits": 10, "parity": 2}


def _spec(arch: str = "small_cnn", input_spec: InputSpec = DIGITS_8X8, **kwargs) -> ArchSpec:
    return multitask_student_arch(StudentSpec(arch=arch, kwargs=kwargs), HEADS, input_spec)


def test_the_student_spec_takes_the_first_heads_classes_and_keeps_the_heads_through_storage() -> None:
    spec = _spec(width=8)
    assert spec.num_classes == 10 and spec.heads == HEADS
    assert ArchSpec.from_stored(spec.stored_arch(), spec.input.model_dump()) == spec
    document = export.arch_spec_document(spec)
    assert document["heads"] == HEADS and "heads.<task>" in document["how_to_load"]
    assert ArchSpec.from_document(document) == spec


def test_specs_that_do_not_hold_together_are_refused() -> None:
    with pytest.raises(SpecError, match="num_classes does not apply"):
        multitask_student_arch(StudentSpec(arch="small_cnn", kwargs={"num_classes": 10}), HEADS, DIGITS_8X8)
    with pytest.raises(ValidationError, match="first head"):
        ArchSpec(arch="small_cnn", kwargs={"num_classes": 2}, input=DIGITS_8X8, heads=HEADS)
    with pytest.raises(ValidationError, match="pruned_shapes"):
        ArchSpec(arch="small_cnn", kwargs={"num_classes": 10}, input=DIGITS_8X8, heads=HEADS,
                 pruned_shapes={"classifier": [10, 32]})
    for heads in ({"Digits": 10}, {"digits": 1}, {f"task{index}": 2 for index in range(9)}):
        with pytest.raises(ValidationError):
            ArchSpec(arch="small_cnn", kwargs={"num_classes": next(iter(heads.values()))}, input=DIGITS_8X8,
                     heads=heads)


@pytest.mark.parametrize(("arch", "classifier"), [("small_cnn", "classifier"), ("resnet18", "fc"),
                                                  ("mobilenet_v3_small", "classifier.3"),
                                                  ("efficientnet_b0", "classifier.1")])
def test_the_backbone_loses_its_final_linear_layer_and_each_task_gets_a_head(arch: str, classifier: str) -> None:
    input_spec = DIGITS_8X8 if arch == "small_cnn" else InputSpec(image_size=32)
    spec = _spec(arch, input_spec)
    model = models.build_model(spec).eval()
    assert isinstance(model.backbone.get_submodule(classifier), torch.nn.Identity)
    features = model.heads["digits"].in_features
    x = torch.randn(3, input_spec.channels, 32 if arch != "small_cnn" else 8, 32 if arch != "small_cnn" else 8)
    with torch.no_grad():
        outputs = model(x)
        shared = model.backbone(x)
    assert list(outputs) == list(HEADS)
    assert {task: tuple(logits.shape) for task, logits in outputs.items()} == {"digits": (3, 10), "parity": (3, 2)}
    assert shared.shape == (3, features)
    assert torch.allclose(outputs["parity"], model.heads["parity"](shared))


def test_an_architecture_without_a_linear_classifier_is_refused() -> None:
    with pytest.raises(SpecError, match="does not end in a Linear classifier"):
        models.build_model(_spec("squeezenet1_1", InputSpec(image_size=32)))


def test_safetensors_and_the_spec_rebuild_the_same_model(tmp_path) -> None:
    spec = _spec(width=8)
    torch.manual_seed(0)
    model = models.build_model(spec).eval()
    export.save_safetensors(model, tmp_path / "student.safetensors")
    rebuilt = models.load_model(tmp_path / "student.safetensors", "safetensors",
                                ArchSpec.from_document(export.arch_spec_document(spec)))
    x = torch.randn(5, 1, 8, 8)
    assert all(torch.equal(rebuilt.eval()(x)[task], model(x)[task]) for task in HEADS)

    other_classes = spec.replace(heads={"digits": 10, "parity": 3})
    with pytest.raises(ModelLoadError, match=r"head 'parity' has 3 classes but heads\.parity\.weight has shape"):
        models.load_model(tmp_path / "student.safetensors", "safetensors", other_classes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    folder = tmp_path_factory.mktemp("multihead")
    torch.manual_seed(0)
    model = models.build_model(_spec(width=8)).eval()
    example = torch.randn(1, 1, 8, 8)
    paths = {fmt: folder / f"student{measure.SUFFIXES[fmt]}" for fmt in measure.EXPORTERS}
    for fmt, exporter in measure.EXPORTERS.items():
        exporter(model, example, paths[fmt])
    x = torch.randn(7, 1, 8, 8)  # another batch size than the example's: the batch dimension stays free
    with torch.no_grad():
        expected = model(x)
    return x, expected, paths


def _assert_close_per_task(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-5)


def test_every_file_loads_without_condenser_and_returns_each_tasks_logits_by_name(exported) -> None:
    x, expected, paths = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        scripted = torch.jit.load(str(paths["torchscript"]))
    _assert_close_per_task(scripted(x), expected)
    _assert_close_per_task(torch.export.load(paths["pt2"]).module()(x), expected)
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == list(HEADS)
    named = dict(zip(list(HEADS), session.run(list(HEADS), {"input": x.numpy()}), strict=True))
    _assert_close_per_task({task: torch.from_numpy(logits) for task, logits in named.items()}, expected)


def test_head_logits_and_accuracies_read_every_format_as_measure_loads_it(exported) -> None:
    x, expected, paths = exported
    labels = {task: logits.argmax(dim=1) for task, logits in expected.items()}
    labels["parity"][:3] = 1 - labels["parity"][:3]  # three of seven wrong
    for fmt, path in paths.items():
        loaded = measure.load_artifact(path)
        _assert_close_per_task(evaluate.head_logits(loaded, x, batch_size=4), expected)
        evaluation = {task: (x, labels[task]) for task in HEADS}
        assert evaluate.head_accuracies(loaded, evaluation) == {"digits": 1.0, "parity": 4 / 7}, fmt


def test_pruning_quantizing_and_single_output_measurement_refuse_a_multi_head_model_by_name() -> None:
    """Out of scope for multi-head models, refused where each starts; measuring one output is where distilling
    from a model (or judging a prune or quantize job's input) starts."""
    spec = _spec(width=8)
    model = models.build_model(spec)
    x = torch.randn(4, 1, 8, 8)
    refusal = r"the model has one head per task \(digits, parity\); pruning, quantizing and distilling"
    with pytest.raises(SpecError, match="cannot prune: " + refusal):
        prune.prune_structured_(model, PruneConfig(channel_ratio=0.5), (x, torch.zeros(4, dtype=torch.long)), 10)
    with pytest.raises(SpecError, match="cannot prune: " + refusal):
        prune.prune_unstructured_(model, 0.5, (), 10)
    with pytest.raises(SpecError, match="cannot quantize: " + refusal):
        quantize.quantize_static(model, "x86", x)
    with pytest.raises(SpecError, match="cannot quantize: " + refusal):
        quantize.quantize_dynamic_linear(model)
    with pytest.raises(SpecError, match="cannot quantize: " + refusal):
        quantize.prepare_qat(model, "x86", x[:1])
    with pytest.raises(SpecError, match="one set of logits was asked for: " + refusal):
        evaluate.logits(model, x)
    with pytest.raises(SpecError, match="teacher 2: " + refusal):
        refuse_multi_head(spec, "teacher 2")
    refuse_multi_head(spec.replace(heads=None), "teacher 2")  # a single-output model passes


def test_the_budget_estimate_counts_every_head() -> None:
    spec = multitask_student_arch(StudentSpec(arch="small_cnn", kwargs={"width": 4, "depth": 1}), HEADS, DIGITS_8X8)
    cost = budget.estimate(spec)
    assert cost.parameters == models.param_count(models.build_model(spec))
    # conv, BatchNorm and ReLU at 4x8x8, the pooled 4 values through dropout and the removed classifier's
    # identity, then each head's logits.
    assert cost.activations_per_sample == 3 * 4 * 8 * 8 + 4 + 4 + 4 + 10 + 2
