"""Walking and editing a model's module tree: its factored layers, and swapping one module for
another in place (hooks carried over)."""
from __future__ import annotations

from torch import nn

from .linear import FactoredLayer
from .torch_internals import HOOK_DICTS, children_by_name


def factored_layers(model: nn.Module) -> dict[str, FactoredLayer]:
    """Qualified name → factored layer (InRankLinear, InRankConv2d), in module order (a shared
    layer is listed once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactoredLayer)}


def ranks(model: nn.Module) -> dict[str, int]:
    """Qualified name → the rank r of each factored layer."""
    return {name: layer.rank for name, layer in factored_layers(model).items()}


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Forward hooks registered on the module being replaced keep firing on its replacement."""
    for attr in HOOK_DICTS:
        if hasattr(old, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(old, attr))


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put `new` wherever `old` appears in root's tree (shared modules appear more than once);
    returns the new root, which is `new` itself if `old` was the root."""
    if old is root:
        return new
    for parent in list(root.modules()):
        for name, child in children_by_name(parent):
            if child is old:
                setattr(parent, name, new)
    return root
