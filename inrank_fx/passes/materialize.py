"""`materialize`: turn a model built and transformed on the meta device into a real one.

Large models are built without memory (`with torch.device("meta"): model = ...`), sharded, and
only then given storage and initial values. `transform` accepts such a model: deciding what to
factor reads shapes and graphs, never values, and each factored layer keeps a `DenseTemplate` (the
dense module it replaced, still on meta). `materialize` then gives the model what
`model.apply(init_fn)` would have given the model before it was transformed:

    every module, children first: module.reset_parameters() where it has one, then init_fn(module)

and each factored layer, one at a time, is the spectral init (the config's `init`) of its dense
template initialised that way: init_fn sees a temporary nn.Linear (or whatever the layer
replaced) of the original shape, so a model's own init (nanoGPT's `_init_weights`) applies
unchanged. Peak extra memory is the largest dense layer. Parameters sharded by `fully_shard`
(DTensors) receive their own shard of the values.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InRankTypeError, InRankValueError
from .build import TEMPLATE_ATTR, DenseTemplate

InitFn = Callable[[nn.Module], None]


def materialize(model: nn.Module, device: torch.device | str,
                init_fn: InitFn | None = None) -> nn.Module:
    """Give a meta-device (transformed) `model` storage on `device` and initial values; returns it.

    Every module gets `reset_parameters()` where it has one, then `init_fn(module)` (children
    before parents, as `model.apply`); factored layers are initialised from a temporary dense
    module of their original type that went through the same two steps. Tied parameters stay
    tied. Raises if nothing in the model is on the meta device, or if a parameter or buffer is
    left uninitialised (give init_fn a rule for its module).
    """
    if not isinstance(model, nn.Module):
        raise InRankTypeError(f"materialize expects an nn.Module, got {type(model).__name__}")
    if init_fn is not None and not callable(init_fn):
        raise InRankTypeError(f"init_fn must be callable (module → None), got {init_fn!r}")
    device = torch.device(device)
    if device.type == "meta":
        raise InRankValueError("materialize: device must be a real device, not 'meta'")
    if not any(t.is_meta for t in _tensors(model)):
        raise InRankValueError(
            f"materialize: no parameter or buffer of {type(model).__name__} is on the meta "
            "device; materialize initialises a model built under torch.device('meta') (and "
            "transformed there). A real model needs neither: move it with model.to(device)"
        )
    templates = {path: getattr(m, TEMPLATE_ATTR) for path, m in model.named_modules()
                 if hasattr(m, TEMPLATE_ATTR)}
    ties = _tied_parameters(model)
    model.to_empty(device=device)
    _retie(model, ties)
    _poison(model)  # whatever no init reaches stays NaN, and is reported below
    with torch.no_grad():
        for path, module in _children_first(model, skip_inside=templates):
            if path in templates:
                _materialize_layer(module, templates[path], device, init_fn)
            else:
                _init_module(module, init_fn)
    _check_initialised(model)
    return model


def _materialize_layer(layer: nn.Module, template: DenseTemplate, device: torch.device,
                       init_fn: InitFn | None) -> None:
    """Initialise the dense stand-in as the original model would have been, factor it, and copy
    the factors (and bias, and W_0) into the layer; the stand-in is then freed."""
    dense = template.module.to_empty(device=device)
    for _, part in _children_first(dense, skip_inside={}):
        _init_module(part, init_fn)
    fresh = template.build(dense)
    for name, target in layer.named_modules():
        source = fresh.get_submodule(name)
        for key, param in target.named_parameters(recurse=False):
            _assign(param, getattr(source, key).detach())
        for key, buf in target.named_buffers(recurse=False):
            # W_0 holds only the active columns on a real layer (the meta one had no values to
            # tell which): take the fresh buffer whole. Buffers are never sharded.
            setattr(target, key, getattr(source, key).to(buf.device))
    template.module = dense.to("meta")  # release the dense storage
    object.__delattr__(layer, TEMPLATE_ATTR)


def _init_module(module: nn.Module, init_fn: InitFn | None) -> None:
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
    if init_fn is not None:
        init_fn(module)


def _children_first(model: nn.Module, skip_inside: dict):
    """(path, module) in post-order, as nn.Module.apply visits them; the insides of templated
    layers are skipped (the layer is initialised as a whole)."""
    def visit(path: str, module: nn.Module):
        if path not in skip_inside:
            for name, child in module.named_children():
                yield from visit(f"{path}.{name}" if path else name, child)
        yield path, module
    yield from visit("", model)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """param ← value, where param may be a DTensor shard (fully_shard): the shards are scattered
    from the mesh's first process, so that they are slices of one value even if the processes'
    random generators have drifted apart (DTensor's own random init advances them per shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                  src_data_rank=0)
    param.copy_(value)


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (weight tying), grouped."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """to_empty gives each module its own new tensor, which unties shared parameters."""
    for first, *others in ties:
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in _tensors(model):
            if tensor.is_floating_point() or tensor.is_complex():
                tensor.fill_(float("nan"))


def _check_initialised(model: nn.Module) -> None:
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if (local.is_floating_point() or local.is_complex()) and torch.isnan(local).any():
            owner = model.get_submodule(name.rpartition(".")[0])
            raise InRankValueError(
                f"materialize: '{name}' ({type(owner).__name__}) was not initialised: it has no "
                "reset_parameters() and init_fn left it alone (or wrote NaN). Give init_fn a rule "
                f"for {type(owner).__name__}"
            )
