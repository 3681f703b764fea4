"""Layers resized to recorded sizes: how a structurally pruned model is rebuilt from its spec.

Structured pruning (worker.engine.prune) gives layers fewer channels; ArchSpec.pruned_shapes records the new
size of each, by module name, so that build_model() can build the base architecture and resize those layers.
"""

from __future__ import annotations

from torch import nn

from worker.engine.config import PRUNED_SHAPES_FORMAT
from worker.engine.errors import SpecError

Shapes = dict[str, list[int]]

RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
_SHAPE_NAMES = {nn.Conv2d: "[out_channels, in_channels, groups]", nn.Linear: "[out_features, in_features]",
                nn.BatchNorm2d: "[num_features]"}
_NAMES_SHOWN = 8


def shape_of(module: nn.Module) -> list[int]:
    """A resizable layer's sizes, as pruned_shapes records them."""
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels, module.groups]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    return [module.num_features]


def resize_(model: nn.Module, shapes: Shapes, arch_name: str) -> nn.Module:
    """Replace each module named in `shapes` by a fresh one of the same type with those sizes (uninitialised
    weights, as build_model's). Raises SpecError naming the entry when `model` has no such module, or one that
    cannot be resized, or the shape does not fit its type."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        module = modules.get(name)
        if module is None or not name:
            examples = [known for known, layer in modules.items() if isinstance(layer, RESIZABLE)][:_NAMES_SHOWN]
            raise SpecError(f"pruned_shapes: {arch_name} has no module named '{name}'; its resizable layers are "
                            f"named like {', '.join(examples)}")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, _resized(name, module, shape))
    return model


def _resized(name: str, module: nn.Module, shape: list[int]) -> nn.Module:
    kind = next((kind for kind in _SHAPE_NAMES if isinstance(module, kind)), None)
    if kind is None:
        raise SpecError(f"pruned_shapes: '{name}' is a {type(module).__name__}; only Conv2d, Linear and BatchNorm2d "
                        f"layers are resized ({PRUNED_SHAPES_FORMAT})")
    if len(shape) != len(shape_of(module)):
        raise SpecError(f"pruned_shapes: '{name}' is a {kind.__name__}, whose shape is {_SHAPE_NAMES[kind]}; got "
                        f"{shape}")
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels, groups = shape
        if in_channels % groups or out_channels % groups:
            raise SpecError(f"pruned_shapes: '{name}' has {groups} groups, which must divide both its "
                            f"{in_channels} input and {out_channels} output channels")
        return nn.Conv2d(in_channels, out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, groups, module.bias is not None, module.padding_mode)
    if isinstance(module, nn.Linear):
        out_features, in_features = shape
        return nn.Linear(in_features, out_features, module.bias is not None)
    return nn.BatchNorm2d(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
