"""The pass's one door to torch's private internals: nothing else in `inrank_fx.passes` reaches a
private torch name. Each is used where torch offers no public equivalent; tested on torch 2.14.1
(CI; the GPU image's 2.11 is not tested yet). `missing()` names any this torch lacks, and
tests/test_torch_internals.py fails on it, and on a private name reached from another module.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.utils import _pytree

# pytree over nested args and outputs; torch has no public pytree module.
tree_map, tree_leaves, tree_flatten = _pytree.tree_map, _pytree.tree_leaves, _pytree.tree_flatten

# F.linear as a traced graph can name it: the C function behind it.
C_LINEAR = getattr(getattr(torch._C, "_nn", None), "linear", None)

# Where nn.Module keeps its parameters, buffers and children.
STORES = ("_parameters", "_buffers", "_modules")


def size_oblivious():
    """torch.export without 0/1 specialisation, where this torch has the switch."""
    from torch.fx.experimental import _config

    if hasattr(_config, "backed_size_oblivious"):
        return _config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def tensor_versions(named_tensors) -> dict[str, int]:
    """Name → the tensor's version counter (bumped by every in-place write)."""
    return {name: t._version for name, t in named_tensors}


def remove_parameter(module: nn.Module, name: str) -> None:
    """Drop the parameter `name` from `module` (a child may take its place)."""
    if name in module._parameters:
        del module._parameters[name]


def stripped_copy(module: nn.Module, attr: str, weight: nn.Parameter) -> nn.Module:
    """A shallow copy of `module` (same class and plain attributes) holding only `weight` at
    `attr`: no other parameters, buffers or children."""
    holder = copy.copy(module)
    holder._parameters = {attr: weight}
    holder._buffers, holder._modules = {}, {}
    return holder


def register_tensors_like(target: nn.Module, source: nn.Module) -> None:
    """Give `target` the parameters and buffers `source` holds directly that it lacks, each
    buffer as persistent (in the state_dict) as it was."""
    for name, p in source.named_parameters(recurse=False):
        if name not in target._parameters:
            target.register_parameter(name, p)
    for name, b in source.named_buffers(recurse=False):
        persistent = name not in source._non_persistent_buffers_set
        if name in target._buffers:
            if not persistent:
                target._non_persistent_buffers_set.add(name)
        else:
            target.register_buffer(name, b, persistent=persistent)


def stored(module: nn.Module) -> dict[str, object]:
    """The module's parameters, buffers and children by name."""
    out: dict[str, object] = {}
    for store in STORES:
        out.update(module.__dict__.get(store, {}))
    return out


def store_of(module: nn.Module, key: str) -> dict | None:
    """The store (parameters, buffers or children) that holds `key`, or None."""
    return next((s for s in (module.__dict__.get(n, {}) for n in STORES) if key in s), None)


def missing() -> list[str]:
    """The internals above this torch lacks."""
    module = nn.Linear(1, 1)
    absent = [f"nn.Module.{s}" for s in STORES if not isinstance(module.__dict__.get(s), dict)]
    if not hasattr(module, "_non_persistent_buffers_set"):
        absent.append("nn.Module._non_persistent_buffers_set")
    if not hasattr(torch.ones(1), "_version"):
        absent.append("Tensor._version")
    if C_LINEAR is None:
        absent.append("torch._C._nn.linear")
    return absent
