"""`InRankMultiheadAttention`: nn.MultiheadAttention with factored in / out projections.

nn.MultiheadAttention hands its packed `in_proj_weight` (3E×E) and `out_proj.weight` to
F.multi_head_attention_forward, so the projections are invisible to a graph pass and cannot be
swapped one by one. This module keeps the attention semantics of nn.MultiheadAttention (batch_first,
unbatched inputs, key_padding_mask, attn_mask (bool or float, 2-D or 3-D), need_weights,
average_attn_weights, dropout) and computes the projections with two factored layers:
`in_proj` (E → 3E, the packed q/k/v projection, one factorisation) and `out_proj` (E → E).
Self-attention runs the packed projection once; cross-attention projects query, key and value
through the shared V factor and their own rows of U.

The projection layers may be InRankLinear (training), or FactoredLinear / nn.Linear after
`inrank_fx.freeze`: the forward works with all three.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InRankRuntimeError, InRankValueError
from .linear import InRankLinear


class InRankMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, in_proj: nn.Module, out_proj: nn.Module,
                 *, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise InRankValueError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
            )
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj, self.out_proj = in_proj, out_proj

    @property
    def rank(self) -> int:
        """The rank of the packed in-projection (out_proj has its own; see inrank_fx.ranks)."""
        return self.in_proj.rank

    @property
    def width(self) -> int:
        return self.in_proj.width

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        """Packed projections of equal dimensions, no bias_k/v, no zero-attention column."""
        return (mha.kdim == mha.embed_dim == mha.vdim and mha.in_proj_weight is not None
                and mha.bias_k is None and not mha.add_zero_attn)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, rank: int, *, buffer: int = 0,
                 init: str = "svd", name: str = "") -> "InRankMultiheadAttention":
        if not cls.supports(mha):
            raise InRankValueError(
                f"{name or 'MultiheadAttention'}: only packed projections without "
                "bias_k/bias_v/add_zero_attn can be factored"
            )
        in_proj = InRankLinear.from_weight(mha.in_proj_weight, mha.in_proj_bias, rank,
                                           buffer=buffer, init=init, name=f"{name}.in_proj")
        out_proj = InRankLinear.from_weight(mha.out_proj.weight, mha.out_proj.bias, rank,
                                            buffer=buffer, init=init, name=f"{name}.out_proj")
        layer = cls(mha.embed_dim, mha.num_heads, in_proj, out_proj, dropout=mha.dropout,
                    batch_first=mha.batch_first)
        return layer.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        # is_causal is a hint that attn_mask is the causal mask, as in nn.MultiheadAttention:
        # it needs the mask, and replaces it by a causal kernel only where nothing else is asked.
        if is_causal and attn_mask is None:
            raise InRankRuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the "
                "Transformer module method `generate_square_subsequent_mask` to "
                "create this mask."
            )
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_first = self.batch_first or unbatched
        # Project in the input's own layout (contiguous rows: plain matmuls), then split heads.
        q, k, v = self._project_qkv(query, key, value)
        (N, L, E), S = _sizes(q, k, batch_first)
        q, k, v = (self._split_heads(t, batch_first) for t in (q, k, v))
        mask = _merged_mask(attn_mask, key_padding_mask, (N, self.num_heads, L, S), q.dtype)
        out, weights = self._attend(q, k, v, mask, need_weights, causal)
        if batch_first:
            out = out.transpose(1, 2).reshape(N, L, E)
        else:
            out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _split_heads(self, t: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """(N, L, E) or (L, N, E) to (N, heads, L, head_dim)."""
        if batch_first:
            return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _attend(self, q, k, v, mask, need_weights: bool, causal: bool):
        """Attention over split heads: (output, weights or None)."""
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=causal), None
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        return F.dropout(weights, dropout, self.training) @ v, weights

    def _project_qkv(self, query, key, value):
        E = self.embed_dim
        if query is key and key is value:  # self-attention: one packed projection
            return self.in_proj(query).chunk(3, dim=-1)
        rows = (slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E))
        return tuple(_rows_of(self.in_proj, x, r) for x, r in zip((query, key, value), rows))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def _rows_of(layer: nn.Module, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Output rows `rows` of a (possibly factored or frozen) linear layer, without computing the
    others: a factored layer shares its input-side factor and slices its output-side one."""
    bias = layer.bias[rows] if getattr(layer, "bias", None) is not None else None
    if isinstance(layer, InRankLinear):  # (never a conv here)
        return F.linear(x @ layer.V, layer.U[rows], bias)
    if hasattr(layer, "down") and hasattr(layer, "up"):  # export.freeze.FactoredLinear
        up_bias = layer.up.bias[rows] if layer.up.bias is not None else None
        return F.linear(layer.down(x), layer.up.weight[rows], up_bias)
    return F.linear(x, layer.weight[rows], bias)


def _sizes(q: torch.Tensor, k: torch.Tensor, batch_first: bool) -> tuple[tuple, int]:
    """((batch N, target length L, embedding E), source length S) of projected q and k."""
    if batch_first:
        return tuple(q.shape), k.shape[1]
    L, N, E = q.shape
    return (N, L, E), k.shape[0]


def _merged_mask(attn_mask, key_padding_mask, shape: tuple[int, int, int, int], dtype):
    """One additive float mask of `shape` (N, heads, L, S) (or broadcastable to it), or None,
    with nn.MultiheadAttention's conventions: True / -inf means "do not attend"."""
    N, heads, L, S = shape
    def as_float(mask):
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    attn_mask, key_padding_mask = as_float(attn_mask), as_float(key_padding_mask)
    merged = None
    if attn_mask is not None:
        merged = attn_mask.reshape(N, heads, L, S) if attn_mask.dim() == 3 else attn_mask.reshape(1, 1, L, S)
    if key_padding_mask is not None:
        padding = key_padding_mask.reshape(N, 1, 1, S)
        merged = padding if merged is None else merged + padding
    return merged
