"""The layers of a frozen model: two plain matmuls (or convolutions) through the final rank.

`inrank_fx.export.freeze` builds them from trained InRank layers; they are standard modules, so
torch.export, torch.compile, ONNX and TensorRT take them as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import InRankMultiheadAttention
from .conv import InRankConv2d
from .linear import ACTIVATIONS


class FactoredLinear(nn.Module):
    """y = up(down(x)): two plain matmuls through an inner dimension `rank` (with
    `activation`, y = up(σ(down(x))): one standard elementwise op between them)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
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
        layer = cls(V.shape[0], U.shape[0], U.shape[1], bias is not None, device=U.device,
                    dtype=U.dtype, activation=activation)
        layer.down.weight.copy_(V.T)
        layer.up.weight.copy_(U)
        if bias is not None:
            layer.up.bias.copy_(bias)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense out×in product up·down, for code that reads `.weight` of what used to be an
        nn.Linear (often only its dtype, device or shape, as T5's feed-forward does). It costs a
        dense matmul; the forward never forms it, and traced code that reads only its metadata
        leaves no matmul in the graph. (With an `activation` the layer is not this linear map.)"""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

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

    # What code written for nn.Conv2d reads (EdgeNeXt's position encoding reads
    # `.weight.dtype`): the dense kernel and the bias, on demand.
    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw): the 1×1 conv's matrix times the k×k kernels."""
        down, up = self[0].weight, self[1].weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias


class FactoredMultiheadAttention(InRankMultiheadAttention):
    """The frozen form of `InRankMultiheadAttention` where a projection stays factored
    (`FactoredLinear`): nn.MultiheadAttention's semantics over plain modules, as
    FactoredLinear is InRankLinear's. Where both projections merge, `freeze` gives back an
    nn.MultiheadAttention instead (`as_multihead_attention`)."""

    @classmethod
    def from_attention(cls, attention: InRankMultiheadAttention) -> "FactoredMultiheadAttention":
        frozen = cls(attention.embed_dim, attention.num_heads, attention.in_proj,
                     attention.out_proj, dropout=attention.dropout,
                     batch_first=attention.batch_first)
        return frozen.train(attention.training)

    @property
    def rank(self) -> int:
        return getattr(self.in_proj, "rank", min(self.in_proj.weight.shape))

    @property
    def width(self) -> int:
        return self.rank


@torch.no_grad()
def as_multihead_attention(attention: InRankMultiheadAttention) -> nn.MultiheadAttention | None:
    """An nn.MultiheadAttention computing what `attention` computes, where both its projections
    are plain nn.Linear with a bias each or neither (else None)."""
    in_proj, out_proj = attention.in_proj, attention.out_proj
    if type(in_proj) is not nn.Linear or type(out_proj) is not nn.Linear:
        return None
    bias = in_proj.bias is not None
    if (out_proj.bias is not None) != bias:
        return None
    weight = in_proj.weight
    mha = nn.MultiheadAttention(attention.embed_dim, attention.num_heads, attention.dropout,
                                bias=bias, batch_first=attention.batch_first,
                                device=weight.device, dtype=weight.dtype)
    mha.in_proj_weight.copy_(weight)
    mha.out_proj.weight.copy_(out_proj.weight)
    if bias:
        mha.in_proj_bias.copy_(in_proj.bias)
        mha.out_proj.bias.copy_(out_proj.bias)
    return mha.train(attention.training)
