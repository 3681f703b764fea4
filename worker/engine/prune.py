"""Pruning: structured channel removal (Torch-Pruning) and unstructured global magnitude pruning.

Structured pruning gives layers fewer channels, so the model is really smaller and faster with any
runtime; its new channel counts are recorded (`pruned_shapes`, ArchSpec.pruned_shapes) so that
build_model() rebuilds the architecture from its spec. A model pruned before is pruned again the same way:
its record, updated, still describes it against the base architecture. Unstructured pruning only zeroes
weights: dense shapes, dense latency.

Everything here is deterministic for the same weights and calibration batch (channels are ranked in
eval mode, without dropout or batch statistics), so a resumed job re-prunes to the same structure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import prune as torch_prune

from worker.engine.config import ArchSpec, PruneConfig
from worker.engine.errors import SpecError
from worker.engine.evaluate import TensorPair
from worker.engine.macs import count_macs
from worker.engine.models import describe_validation_error, logits_of, refuse_multi_head_model
from worker.engine.resize import RESIZABLE, Shapes, resize_, shape_of

# A channel ratio above this leaves layers too thin to recover by fine-tuning.
MAX_CHANNEL_RATIO = 0.9
# Searching the ratio for a MACs target: stop within this factor of the target, or after this many tries.
MACS_TOLERANCE = 1.02
MAX_SEARCH_TRIALS = 8
_PRUNED_TYPES = (nn.Conv2d, nn.Linear)
_NAMES_SHOWN = 8

_IMPORTANCE: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
    "taylor": tp.importance.TaylorImportance,
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
}


@dataclass(frozen=True)
class StructuredResult:
    channel_ratio: float  # the ratio applied: the requested one, or the one found for the MACs target
    macs_before: int
    macs_after: int


def prune_structured_(model: nn.Module, config: PruneConfig, calibration: TensorPair, num_classes: int) -> (
        StructuredResult):
    """Remove channels from `model` in place, by config.channel_ratio or down to config.target_macs_reduction.

    The output layer and config.keep_layers keep all their output channels. Raises SpecError naming the
    layer when the model cannot be pruned.
    """
    refuse_multi_head_model(model, "cannot prune")
    input_shape = tuple(calibration[0].shape[1:])
    macs_before = count_macs(model, input_shape)
    if config.channel_ratio is not None:
        ratio = config.channel_ratio
    else:
        assert config.target_macs_reduction is not None  # the config validates that one of them is set
        ratio = _ratio_for_macs(model, config, calibration, num_classes, macs_before)
    _prune_channels_(model, config, ratio, calibration, num_classes)
    _check_still_runs(model, calibration[0][:2], num_classes)
    return StructuredResult(channel_ratio=ratio, macs_before=macs_before, macs_after=count_macs(model, input_shape))


def _prune_channels_(model: nn.Module, config: PruneConfig, ratio: float, calibration: TensorPair,
                     num_classes: int) -> None:
    x, y = calibration
    kept = _kept_modules(model, config.keep_layers, num_classes)
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model, x[:1], importance=_IMPORTANCE[config.importance](), global_pruning=config.global_pruning,
            pruning_ratio=ratio, iterative_steps=config.iterative_steps, ignored_layers=kept,
            round_to=config.round_to,
        )
        for _ in range(config.iterative_steps):
            if config.importance == "taylor":
                _gradients_on(model, x, y)
            pruner.step()
    # Torch-Pruning fails on graphs it cannot follow with arbitrary exception types (ZeroDivisionError for
    # a channel shuffle); all of them mean the same to the user.
    except Exception as exc:
        raise SpecError(f"Torch-Pruning cannot prune this model at {_failing_operator(exc, model)}: "
                        f"{type(exc).__name__}: {exc}; this architecture cannot be pruned by channels, use "
                        "method 'unstructured'") from exc
    finally:
        model.zero_grad(set_to_none=True)


def _failing_operator(exc: BaseException, model: nn.Module) -> str:
    """The dependency-graph node Torch-Pruning was handling, named by the nearest layer feeding it."""
    node = None
    frame = exc.__traceback__
    while frame is not None:
        candidate = frame.tb_frame.f_locals.get("node")
        node = candidate if isinstance(candidate, tp.dependency.Node) else node
        frame = frame.tb_next
    if node is None:
        return "an unsupported operator"
    names = {id(module): name for name, module in model.named_modules() if name}
    queue, seen = [node], set()
    while queue:
        current = queue.pop(0)
        if id(current.module) in names:
            layer = names[id(current.module)]
            return f"layer '{layer}'" if current is node else f"operator {node.name} after layer '{layer}'"
        seen.add(id(current))
        queue += [parent for parent in current.inputs if id(parent) not in seen]
    return f"operator {node.name}"


def _gradients_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Taylor importance ranks channels by |weight x gradient| of the loss on the calibration batch."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(model(x)), y).backward()


def _ratio_for_macs(model: nn.Module, config: PruneConfig, calibration: TensorPair, num_classes: int,
                    macs_before: int) -> float:
    """The channel ratio whose pruned model needs target_macs_reduction times fewer MACs (bisection).

    Uniform channel pruning scales MACs by about (1 - ratio)², hence the first guess.
    """
    target = config.target_macs_reduction
    assert target is not None
    input_shape = tuple(calibration[0].shape[1:])
    low, high, found, reached = 0.0, MAX_CHANNEL_RATIO, None, 1.0
    ratio = min(MAX_CHANNEL_RATIO, 1 - target**-0.5)
    for _ in range(MAX_SEARCH_TRIALS):
        trial = copy.deepcopy(model)
        _prune_channels_(trial, config, ratio, calibration, num_classes)
        reached = macs_before / count_macs(trial, input_shape)
        if reached >= target:
            high = found = ratio
            if reached <= target * MACS_TOLERANCE:
                break
        else:
            low = ratio
        ratio = (low + high) / 2
    if found is None:
        raise SpecError(f"target_macs_reduction {target} is out of reach: {reached:.2f}x fewer MACs at channel "
                        f"ratio {low:.3f} with the kept layers; lower the target")
    return found


def prune_unstructured_(model: nn.Module, sparsity: float, keep_layers: tuple[str, ...], num_classes: int) -> None:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all conv and linear layers.

    The zeros are enforced by masks (so fine-tuning cannot revive them) until make_permanent_().
    """
    refuse_multi_head_model(model, "cannot prune")
    targets = [(module, "weight") for module in _unstructured_targets(model, keep_layers, num_classes)]
    if not targets:
        raise SpecError("nothing to prune: every convolution and linear layer is kept")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)


def _unstructured_targets(model: nn.Module, keep_layers: tuple[str, ...], num_classes: int) -> list[nn.Module]:
    kept = {id(module) for module in _kept_modules(model, keep_layers, num_classes)}
    return [module for module in model.modules() if isinstance(module, _PRUNED_TYPES) and id(module) not in kept]


def make_permanent_(model: nn.Module) -> None:
    """Fold the masks into the weights: a plain state_dict, the zeros stay."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")


def weight_sparsity(model: nn.Module, keep_layers: tuple[str, ...], num_classes: int) -> dict[str, float]:
    """Fraction of exact zeros in the weights that unstructured pruning targets, and in all parameters."""
    weights = [module.weight for module in _unstructured_targets(model, keep_layers, num_classes)]
    return {"pruned_weights": _zero_fraction(weights), "all_parameters": _zero_fraction(list(model.parameters()))}


def _zero_fraction(tensors: list[torch.Tensor]) -> float:
    total = sum(tensor.numel() for tensor in tensors)
    zeros = sum(int((tensor == 0).sum()) for tensor in tensors)
    return zeros / total if total else 0.0


# --- which layers are kept ------------------------------------------------------------------------


def output_layer_name(model: nn.Module, num_classes: int) -> str:
    """The layer that produces the logits: the last conv or linear layer with num_classes outputs."""
    candidates = [name for name, module in model.named_modules()
                  if isinstance(module, _PRUNED_TYPES) and shape_of(module)[0] == num_classes]
    if not candidates:
        raise SpecError(f"no layer with {num_classes} outputs (the classifier) found; it must be kept unpruned")
    return candidates[-1]


def _kept_modules(model: nn.Module, keep_layers: tuple[str, ...], num_classes: int) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [name for name in keep_layers if name not in modules]
    if unknown:
        examples = [name for name, module in modules.items() if isinstance(module, _PRUNED_TYPES)][:_NAMES_SHOWN]
        raise SpecError(f"keep_layers: no module named {', '.join(map(repr, unknown))} in the model; its "
                        f"layers are named like {', '.join(examples)}")
    return [modules[name] for name in (output_layer_name(model, num_classes), *keep_layers)]


def _check_still_runs(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """A pruned model that fails or changes its output shape names the layer it broke at."""
    with _innermost_module_tracked(model) as where:
        try:
            with torch.inference_mode():
                shape = tuple(logits_of(model.eval()(x)).shape)
        except RuntimeError as exc:
            raise SpecError(f"the pruned model fails at layer '{where[-1]}': {exc}; add it to keep_layers") from exc
    if shape != (len(x), num_classes):
        raise SpecError(f"pruning changed the output shape to {list(shape)}; keep the output layer")


@contextmanager
def _innermost_module_tracked(model: nn.Module) -> Iterator[list[str]]:
    entered: list[str] = ["(input)"]
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: entered.append(name))
             for name, module in model.named_modules() if name]
    try:
        yield entered
    finally:
        for hook in hooks:
            hook.remove()


# --- recording and rebuilding the pruned architecture ---------------------------------------------


def pruned_shapes(pruned: nn.Module, original: nn.Module) -> Shapes:
    """{module name: shape} of every layer whose channel counts changed from `original` to `pruned`.

    Conv2d: [out_channels, in_channels, groups]; Linear: [out_features, in_features];
    BatchNorm2d: [num_features]. Raises SpecError if pruning changed anything else.
    """
    before = dict(original.named_modules())
    shapes = {name: shape_of(module) for name, module in pruned.named_modules()
              if isinstance(module, RESIZABLE) and shape_of(module) != shape_of(before[name])}
    _check_rebuilds_the_same(pruned, original, shapes)
    return shapes


def pruned_arch(arch: ArchSpec, shapes: Shapes) -> ArchSpec:
    """The spec of `arch`'s model once pruning changed the layers in `shapes` (pruned_shapes()): a model pruned
    before keeps its own record, updated, so that the spec still builds from the base architecture."""
    try:
        return arch.replace(pruned_shapes={**(arch.pruned_shapes or {}), **shapes})
    except ValidationError as exc:  # a record past the spec's bounds (more layers than it allows)
        raise SpecError(f"the pruned model cannot be described by a spec: {describe_validation_error(exc)}") from exc


def _check_rebuilds_the_same(pruned: nn.Module, original: nn.Module, shapes: Shapes) -> None:
    """Pruning may touch tensors the shape record cannot describe (a bare nn.Parameter, a LayerNorm):
    refuse then, rather than publish weights that no spec can load."""
    rebuilt = resize_(copy.deepcopy(original), shapes, type(original).__name__).state_dict()
    for name, tensor in pruned.state_dict().items():
        if name not in rebuilt or rebuilt[name].shape != tensor.shape:
            owner = name.rpartition(".")[0]
            raise SpecError(f"pruning resized {name} (of a {type(pruned.get_submodule(owner)).__name__}), which the "
                            f"pruned-shapes record cannot describe; add '{owner}' to keep_layers or use method "
                            "'unstructured'")
