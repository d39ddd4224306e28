"""`set_ranks`: the one way a factored layer changes shape.

The controller decides, `set_ranks` acts, and the optimizer follows in the same call: factors are
grown (new components) or truncated (SVD of the factors), the optimizer's param groups and state
are carried over (`inrank_fx.training.optim_state`), and torch.compile'd callers are kept
compiled at the cost of at most one recompile (`inrank_fx.training.compile_policy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import InRankKeyError, InRankTypeError, InRankValueError
from ..nn.modules import factored_layers
from ..vocabulary import (
    GROW_STATES,
    TRUNCATE_STATES,
    CompilePolicy,
    GrowInit,
    GrowState,
    TruncateState,
)
from .compile_policy import after_shape_change, check_policy
from .optim_state import check_mappable, replace_param

RankArg = Union[int, Mapping[str, int]]


@dataclass(frozen=True)
class RankChange:
    name: str
    old_rank: int
    rank: int
    old_width: int
    width: int

    @property
    def resized(self) -> bool:
        return self.width != self.old_width

    def __str__(self) -> str:
        text = f"{self.name} rank {self.old_rank}->{self.rank}"
        return text + (f" (width {self.old_width}->{self.width})" if self.resized else "")


def set_ranks(
    model: nn.Module,
    ranks: RankArg,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    widths: RankArg | None = None,
    grow_init: GrowInit = "zero",
    generator: torch.Generator | None = None,
    recompile: CompilePolicy = "dynamic",
    grow_state: GrowState = "seeded",
    truncate_state: TruncateState = "reset",
) -> list[RankChange]:
    """Set the rank (and computed width) of factored layers, growing or truncating them.

    Args:
        ranks: one rank for every factored layer, or {qualified name: rank}.
        optimizer: if given, its param groups and per-parameter state follow the new factors
            (as `grow_state` and `truncate_state` say).
        widths: components to compute with (rank + buffer), same forms as `ranks`; a layer
            without one computes at exactly its rank.
        grow_init: how new components start when a layer grows ("zero" or "random", as
            `InRankConfig.grow_init`; see `InRankLinear.grow`); generator: the random source
            for them.
        recompile: what happens to torch.compile'd code after a shape change: "dynamic"
            (widths become symbolic, few recompiles), "reset" (caches cleared every time) or
            "none". See `inrank_fx.training.compile_policy`. Either of the first two costs at most one
            recompile per event and never lets dynamo fall back to eager.
        grow_state: optimizer state of grown components: "seeded" (second moments from the
            existing columns of the same row, see `inrank_fx.training.optim_state`) or "unseeded" (all zero; new
            columns then take steps several times the learning rate at first, for comparison).
        truncate_state: optimizer state of truncated layers: "rotated" (moments carried into the
            new basis through the truncation's linear map, step counts kept) or "reset" (zero
            state, step 0). See `inrank_fx.training.optim_state`.

    Returns the changes made (layers whose rank and width were already as asked are left out).
    """
    _check_arguments(model, recompile, grow_state, truncate_state)
    layers = factored_layers(model)
    if not layers:
        raise InRankValueError(
            f"{type(model).__name__} has no factored layers: run inrank_fx.transform first")
    plan = _plan(layers, ranks, widths)
    if optimizer is not None:  # refuse before changing anything
        for name, layer, _, width in plan:
            if width != layer.width:
                check_mappable(optimizer, layer.U, f"{name}.U")
                check_mappable(optimizer, layer.V, f"{name}.V")
    changes = [_resize(name, layer, rank, width, optimizer, grow_init=grow_init,
                       generator=generator, grow_state=grow_state,
                       truncate_state=truncate_state)
               for name, layer, rank, width in plan]
    resized = sum(c.resized for c in changes)
    if resized:
        after_shape_change(recompile, resized, model)
    return changes


def _check_arguments(model, recompile: str, grow_state: str, truncate_state: str) -> None:
    check_policy(recompile)
    if isinstance(model, DistributedDataParallel):
        raise InRankValueError(
            "set_ranks got a DistributedDataParallel model: resizing it on one process would "
            "leave DDP's gradient hooks on the old factors and the processes apart; call "
            "controller.set_ranks(...) on every process instead (the controller that "
            "inrank_fx.attach(ddp_model, optimizer) returns)"
        )
    if grow_state not in GROW_STATES:
        raise InRankValueError(
            f"grow_state must be one of {tuple(GROW_STATES)}, got {grow_state!r}")
    if truncate_state not in TRUNCATE_STATES:
        raise InRankValueError(f"truncate_state must be one of {tuple(TRUNCATE_STATES)}, "
                               f"got {truncate_state!r}")


def _plan(layers: dict, ranks: RankArg, widths: RankArg | None
          ) -> list[tuple[str, nn.Module, int, int]]:
    """(name, layer, rank, width) of every layer whose rank or width changes, all checked."""
    wanted_widths = per_layer(widths, layers, "widths") if widths is not None else {}
    plan = []
    for name, rank in per_layer(ranks, layers, "ranks").items():
        layer = layers[name]
        _check_count(f"rank of '{name}'", rank, 1, layer.full_rank)
        width = wanted_widths.get(name, rank)
        _check_count(f"width of '{name}'", width, rank, layer.full_rank)
        if (rank, width) != (layer.rank, layer.width):
            plan.append((name, layer, rank, width))
    return plan


def _resize(name: str, layer: nn.Module, rank: int, width: int, optimizer, *, grow_init: str,
            generator, grow_state: GrowState, truncate_state: TruncateState) -> RankChange:
    """One layer to its new rank and width, its optimizer state following the factors."""
    old_rank, old_width, old_u, old_v = layer.rank, layer.width, layer.U, layer.V
    u_map = v_map = None
    if width > old_width:
        layer.grow(width, init=grow_init, generator=generator)
        mode = grow_state
    elif width < old_width:
        u_map, v_map = layer.truncate(width)
        mode = truncate_state
    if width != old_width and optimizer is not None:
        # U's gradient is ∂L/∂W·V, so it follows V's map, and V's follows U's.
        replace_param(optimizer, old_u, layer.U, mode, grad_map=v_map)
        replace_param(optimizer, old_v, layer.V, mode, grad_map=u_map)
    layer.rank = rank
    return RankChange(name, old_rank, rank, old_width, width)


def per_layer(value: RankArg, layers: dict, what: str) -> dict[str, int]:
    if isinstance(value, Mapping):
        unknown = [n for n in value if n not in layers]
        if unknown:
            raise InRankKeyError(
                f"{what}: no factored layer named {', '.join(map(repr, unknown))}; "
                f"factored layers are: {', '.join(layers)}"
            )
        return dict(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InRankTypeError(f"{what} must be an int or a {{name: int}} mapping, "
                              f"got {type(value).__name__}")
    return {name: min(value, layer.full_rank) for name, layer in layers.items()}


def _check_count(what: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InRankTypeError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise InRankValueError(f"{what} must be an int in [{low}, {high}], got {value!r}")
