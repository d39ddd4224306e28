"""`freeze`: a trained InRank model becomes a plain inference model.

Each InRankLinear becomes either two nn.Linear at its final rank r (`FactoredLinear`: the buffer is
truncated away by SVD of the factors) or, where factoring cannot save FLOPs, one nn.Linear with
W = U·Vᵀ; an InRankConv2d likewise becomes two nn.Conv2d (`FactoredConv2d`) or one. No controller, buffer or rank state is left: only standard modules, which torch.export,
torch.compile, ONNX and TensorRT take as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ACTIVATIONS, InRankConv2d, InRankLinear
from ..passes.rewrite import carry_hooks, replace_module
from ..summary import factored_layers
from ..transform import REPORT_ATTR

FROZEN_ATTR = "_inrank_frozen"


class FactoredLinear(nn.Module):
    """y = up(down(x)): two plain matmuls through an inner dimension `rank` (with
    `activation`, y = up(σ(down(x))): one standard elementwise op between them)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None, activation: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.activation = activation
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
                     activation: str | None = None) -> "FactoredLinear":
        """The layer x ↦ σ(x·V)·Uᵀ (+ bias), U: out×r, V: in×r (σ the identity by default)."""
        layer = cls(V.shape[0], U.shape[0], U.shape[1], bias is not None, U.device, U.dtype,
                    activation)
        layer.down.weight.copy_(V.T)
        layer.up.weight.copy_(U)
        if bias is not None:
            layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.activation is not None:
            h = ACTIVATIONS[self.activation](h)
        return self.up(h)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}{act}")


class FactoredConv2d(nn.Sequential):
    """A k×k conv to `rank` channels, then a 1×1 conv: two plain convolutions."""

    def __init__(self, layer: InRankConv2d) -> None:
        w = layer.width
        down = nn.Conv2d(layer.in_channels, w, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, bias=False, device=layer.U.device, dtype=layer.U.dtype)
        up = nn.Conv2d(w, layer.out_channels, 1, bias=layer.bias is not None,
                       device=layer.U.device, dtype=layer.U.dtype)
        with torch.no_grad():
            down.weight.copy_(layer.V.T.reshape(w, layer.in_channels, *layer.kernel_size))
            up.weight.copy_(layer.U[:, :, None, None])
            if layer.bias is not None:
                up.bias.copy_(layer.bias)
        super().__init__(down, up)
        self.rank = w


def _merged(layer: InRankLinear) -> nn.Module:
    """One dense module with W = U·Vᵀ (all trained components kept)."""
    factory = {"device": layer.U.device, "dtype": layer.U.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, InRankConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=has_bias, **factory)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, **factory)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        if has_bias:
            plain.bias.copy_(layer.bias)
    return plain


@dataclass(frozen=True)
class FrozenLayer:
    name: str
    out_features: int
    in_features: int
    rank: int  # the inner dimension, or min(in, out) where merged
    merged: bool


def freeze(model: nn.Module, *, merge: bool | str = "auto") -> nn.Module:
    """A copy of `model` (in eval mode) with every InRankLinear replaced by plain modules at its
    final rank; a model without factored layers comes back as a plain copy.

    merge="auto" makes a layer one dense nn.Linear where r·(in + out) ≥ in·out (the factored
    form would cost at least as many FLOPs and parameters), and two nn.Linear otherwise;
    merge=True merges every layer, merge=False keeps every layer factored. A merged layer keeps
    all the components it trained with (merging costs nothing extra); a factored one is truncated
    to its rank r by SVD of its factors, dropping the buffer.
    """
    if merge not in ("auto", True, False):
        raise ValueError(f"merge must be 'auto', True or False, got {merge!r}")
    frozen = copy.deepcopy(model)
    records = []
    for name, layer in factored_layers(frozen).items():
        r, n_in, n_out = layer.rank, layer.in_features, layer.out_features
        merged = merge is True or (merge == "auto" and r * (n_in + n_out) >= n_in * n_out)
        activation = getattr(layer, "activation", None)
        if merged and activation is not None:
            if merge is True:
                raise ValueError(f"freeze(merge=True): '{name}' has a {activation} between its "
                                 "factors and is no single matrix; use merge='auto' or False")
            merged = False  # a nonlinear layer has no dense form
        if merged:
            plain = _merged(layer)
        else:
            if layer.width > r:
                layer.truncate(r)
            if isinstance(layer, InRankConv2d):
                plain = FactoredConv2d(layer)
            else:
                plain = FactoredLinear.from_factors(layer.U.detach(), layer.V.detach(), layer.bias,
                                                    activation)
        carry_hooks(layer, plain)
        frozen = replace_module(frozen, layer, plain)
        records.append(FrozenLayer(name, n_out, n_in, min(n_in, n_out) if merged else r, merged))
    if hasattr(frozen, REPORT_ATTR):
        delattr(frozen, REPORT_ATTR)
    setattr(frozen, FROZEN_ATTR, records)
    return frozen.eval()


def frozen_layers(model: nn.Module) -> list[FrozenLayer]:
    """What `freeze` did to each factored layer (empty for a model that was never factored)."""
    return list(getattr(model, FROZEN_ATTR, []))


def frozen_ranks(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """({factored layer: its inner rank}, [layers merged to dense]) of a frozen model."""
    layers = frozen_layers(model)
    return {l.name: l.rank for l in layers if not l.merged}, [l.name for l in layers if l.merged]
