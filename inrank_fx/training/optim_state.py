"""Carrying optimizer state through a resize of factored layers.

When `set_ranks` replaces a factor by a wider or narrower tensor, the optimizer must point at the
new tensor (in the same place of its param group, so that `optimizer.state_dict()` stays aligned
with checkpoints) and its per-parameter state must follow:

- growth ("seeded"): the existing components keep their columns, so per-element state (Adam / AdamW
  moments, SGD momentum, ...) is copied into the leading columns; step counts are kept. New
  columns get zero first moments, and their second-moment statistics (Adam's exp_avg_sq,
  RMSprop's square_avg, Adagrad's sum, ...) start at the mean of the existing columns in the same
  row: with a zero second moment and a step count whose bias correction is already ≈ 1, Adam's
  first updates of a new column would be several times the learning rate (measured in
  benchmarks/bench_growth_state.py).
- truncation ("reset", the default): the SVD that truncates rotates the basis, so no column of
  the new factor corresponds to a column of the old one. Per-element state is reset to zero and
  step counts to 0, so that Adam's bias correction restarts with the moments instead of dividing
  stale counts into fresh moments (the reference implementation keeps the old moments on the
  rotated columns).
- truncation ("rotated"): the new factor is a linear map of the old one (`InRankLinear.truncate`
  returns it), and so is its gradient. First moments (Adam's exp_avg, SGD's momentum) are
  gradient averages and follow the map exactly; second moments follow it through the squared
  map (exact for uncorrelated columns, an estimate otherwise); step counts are kept. On the
  long runs of benchmarks/bench_convergence.py it was no better than "reset" (docs/TRAINING.md).

Per-element state is recognised by having the parameter's shape; scalar tensors and plain numbers
are counts and flags. Anything else (LBFGS's flat history, factored second moments) cannot be
mapped, and `OptimizerStateError` says which optimizer, which state and which shapes.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import InRankError, InRankValueError
from ..vocabulary import GROW_STATES, TRUNCATE_STATES

# Per-element statistics of the gradient's scale, which a new column should inherit from its row.
SCALE_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta")
# Per-element averages of the gradient itself, which a linear change of basis maps exactly.
GRADIENT_STATE = ("exp_avg", "momentum_buffer", "prev")

# How a resize carries a factor's optimizer state: the growth words, then the truncation words.
STATE_CARRIES = GROW_STATES + TRUNCATE_STATES


class OptimizerStateError(InRankError, TypeError):
    """The optimizer keeps per-parameter state that cannot follow a resized factor."""


def check_mappable(optimizer: torch.optim.Optimizer, param: nn.Parameter, name: str) -> None:
    """Raise OptimizerStateError before anything changes if `param`'s state cannot be mapped."""
    for key, value in optimizer.state.get(param, {}).items():
        if torch.is_tensor(value):
            if value.dim() == 0 or value.shape == param.shape:
                continue
            raise OptimizerStateError(
                f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for "
                f"'{name}' of shape {tuple(param.shape)}; inrank_fx can carry only per-element "
                "state (the parameter's shape) and scalar counts through a resize"
            )
        if value is not None and not isinstance(value, (numbers.Number, bool)):
            raise OptimizerStateError(
                f"{type(optimizer).__name__} keeps state {key!r} of type {type(value).__name__} "
                f"for '{name}'; inrank_fx cannot carry it through a resize"
            )


@torch.no_grad()
def replace_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, mode: str,
    grad_map: torch.Tensor | None = None,
) -> None:
    """Point the optimizer at `new` instead of `old` and carry the state: "seeded" (growth,
    as above), "unseeded" (growth with all new state zero, for comparison), "rotated" (truncation:
    `grad_map` maps the old gradient's columns to the new one's, ∂L/∂new = ∂L/∂old·grad_map) or
    "reset". State that "rotated" cannot map (an optimizer's own per-element statistics other
    than gradient and squared-gradient averages) falls back to "reset" for that parameter."""
    if mode not in STATE_CARRIES:
        raise InRankValueError(f"mode must be 'pad', 'pad_zero', 'rotate' or 'reset', got {mode!r}")
    if mode == "rotated" and grad_map is None:
        raise InRankValueError("mode 'rotate' needs the gradient's column map (grad_map)")
    found = False
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p is old:
                params[i] = new
                found = True
    if not found:
        return  # not optimised (requires_grad off by the user): nothing to carry
    state = optimizer.state.pop(old, None)
    if not state:
        return
    if mode == "rotated" and any(
        torch.is_tensor(v) and v.dim() > 0 and k not in GRADIENT_STATE + SCALE_STATE
        for k, v in state.items()
    ):
        mode = "reset"
    carried = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if mode == "rotated":
                m = grad_map.to(device=value.device, dtype=value.dtype)
                fresh = value @ (m if key in GRADIENT_STATE else m.square())
                carried[key] = fresh.contiguous()
                continue
            fresh = torch.zeros_like(new, dtype=value.dtype, memory_format=torch.contiguous_format)
            if mode in GROW_STATES:
                old_columns = value.shape[-1]
                fresh[..., :old_columns] = value
                if mode == "seeded" and key in SCALE_STATE and old_columns:
                    fresh[..., old_columns:] = value.mean(dim=-1, keepdim=True)
            carried[key] = fresh
        elif torch.is_tensor(value):  # a count such as Adam's step
            carried[key] = torch.zeros_like(value) if mode == "reset" and key == "step" else value
        else:
            carried[key] = 0 if mode == "reset" and key == "step" else value
    optimizer.state[new] = carried
