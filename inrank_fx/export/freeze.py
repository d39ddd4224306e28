"""`freeze`: a trained InRank model becomes a plain inference model.

Each InRankLinear becomes either two nn.Linear at its final rank r (`FactoredLinear`: the buffer is
truncated away by SVD of the factors) or, where factoring cannot save FLOPs, one nn.Linear with
W = U·Vᵀ; an InRankConv2d likewise becomes two nn.Conv2d (`FactoredConv2d`) or one. An
InRankMultiheadAttention whose projections both merge becomes nn.MultiheadAttention again;
otherwise `FactoredMultiheadAttention`, the same attention over those plain modules. No controller, buffer or rank state is left: only standard modules, which torch.export,
torch.compile, ONNX and TensorRT take as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import REPORT_ATTR
from ..errors import InRankValueError
from ..nn.attention import InRankMultiheadAttention
from ..nn.conv import InRankConv2d
from ..nn.experts import FactoredExperts, InRankExperts
from ..nn.frozen import (
    FactoredConv2d,
    FactoredLinear,
    FactoredMultiheadAttention,
    as_multihead_attention,
)
from ..nn.linear import FactoredLayer
from ..nn.modules import carry_hooks, factored_layers, replace_module

FROZEN_ATTR = "_inrank_frozen"


def _merged(layer: FactoredLayer) -> nn.Module:
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
    """A copy of `model` (in eval mode) with every factored layer replaced by plain modules at its
    final rank; a model without factored layers comes back as a plain copy.

    merge="auto" makes a layer one dense nn.Linear where r·(in + out) ≥ in·out (the factored
    form would cost at least as many FLOPs and parameters), and two nn.Linear otherwise;
    merge=True merges every layer, merge=False keeps every layer factored. A merged layer keeps
    all the components it trained with (merging costs nothing extra); a factored one is truncated
    to its rank r by SVD of its factors, dropping the buffer.
    """
    if merge not in ("auto", True, False):
        raise InRankValueError(f"merge must be 'auto', True or False, got {merge!r}")
    frozen = copy.deepcopy(model)
    records = []
    for name, layer in factored_layers(frozen).items():
        r, n_in, n_out = layer.rank, layer.in_features, layer.out_features
        merged = merge is True or (merge == "auto" and r * (n_in + n_out) >= n_in * n_out)
        activation = getattr(layer, "activation", None)
        if merged and activation is not None:
            if merge is True:
                raise InRankValueError(
                    f"freeze(merge=True): '{name}' has a {activation} between its "
                    "factors and is no single matrix; use merge='auto' or False"
                )
            merged = False  # a nonlinear layer has no dense form
        if isinstance(layer, InRankExperts):  # stays factored: what reads it takes .weight
            if layer.width > r:
                layer.truncate(r)
            plain = FactoredExperts(layer.U, layer.V)
            merged = False
        elif merged:
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
    frozen = _plain_attention(frozen)
    if hasattr(frozen, REPORT_ATTR):
        delattr(frozen, REPORT_ATTR)
    setattr(frozen, FROZEN_ATTR, records)
    return frozen.eval()


def _plain_attention(model: nn.Module) -> nn.Module:
    """Each InRankMultiheadAttention becomes nn.MultiheadAttention where both projections
    merged, and FactoredMultiheadAttention (plain modules inside) where one stays factored."""
    for attention in [m for m in model.modules() if type(m) is InRankMultiheadAttention]:
        plain = as_multihead_attention(attention) or \
            FactoredMultiheadAttention.from_attention(attention)
        carry_hooks(attention, plain)
        model = replace_module(model, attention, plain)
    return model


def frozen_layers(model: nn.Module) -> list[FrozenLayer]:
    """What `freeze` did to each factored layer (empty for a model that was never factored)."""
    return list(getattr(model, FROZEN_ATTR, []))


def frozen_ranks(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """({factored layer: its inner rank}, [layers merged to dense]) of a frozen model."""
    layers = frozen_layers(model)
    return {l.name: l.rank for l in layers if not l.merged}, [l.name for l in layers if l.merged]
