"""The layers' one door to torch's private internals: nothing else in `inrank_fx.nn` reaches a
private torch name. Each is used where torch offers no public equivalent; tested on torch 2.14.1
(CI; the GPU image's 2.11 is not tested yet). `missing()` names any this torch lacks, and
tests/test_torch_internals.py fails on it, and on a private name reached from another module.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils import _pytree

# pytree's map over nested (args, kwargs); torch has no public pytree module.
tree_map = _pytree.tree_map

# An int or a pair as a pair, as nn.Conv2d reads its kernel size, stride and dilation.
pair = _pair

# The forward hooks a module keeps (nn.Module has no public way to list or move them).
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def children_by_name(parent: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, child) of `parent`, a child held under two names listed twice
    (named_children lists it once)."""
    return list(parent._modules.items())


def initialised(module: nn.Module) -> bool:
    """Whether nn.Module.__init__ has run (its parameter store exists): attribute lookups that
    read parameters are safe."""
    return "_parameters" in module.__dict__


def missing() -> list[str]:
    """The internals above this torch lacks."""
    module = nn.Linear(1, 1)
    absent = [name for name in HOOK_DICTS if not isinstance(getattr(module, name, None), dict)]
    if not isinstance(getattr(module, "_modules", None), dict):
        absent.append("nn.Module._modules")
    if "_parameters" not in module.__dict__:
        absent.append("nn.Module._parameters")
    return absent
