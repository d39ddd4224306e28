import itertools

import pytest
import torch
from torch import nn

from inrank_fx.nn import InRankMultiheadAttention


def _pair(batch_first, dropout=0.0):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=dropout, batch_first=batch_first).eval()
    return mha, InRankMultiheadAttention.from_mha(mha, rank=32).eval()


def _inputs(batch_first, n=3, L=5, S=7, cross=False):
    shape_q = (n, L, 32) if batch_first else (L, n, 32)
    shape_k = (n, S, 32) if batch_first else (S, n, 32)
    q = torch.randn(*shape_q)
    if not cross:
        return q, q, q
    k = torch.randn(*shape_k)
    return q, k, torch.randn(*shape_k)


@pytest.mark.parametrize("batch_first, cross, need_weights, average",
                         list(itertools.product([False, True], [False, True], [True, False], [True, False])))
def test_matches_multihead_attention(rel_err, batch_first, cross, need_weights, average):
    mha, factored = _pair(batch_first)
    q, k, v = _inputs(batch_first, cross=cross)
    S = k.shape[1] if batch_first else k.shape[0]
    L = q.shape[1] if batch_first else q.shape[0]
    padding = torch.zeros(3, S, dtype=torch.bool)
    padding[0, -2:] = True
    float_mask = torch.randn(L, S)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": float_mask},
                   {"attn_mask": torch.rand(L, S) > 0.7, "key_padding_mask": padding},
                   {"attn_mask": torch.randn(3 * 4, L, S)}):
        expected, expected_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        got, got_w = factored(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        assert rel_err(got, expected) < 1e-5, kwargs
        if need_weights:
            assert got_w.shape == expected_w.shape and rel_err(got_w, expected_w) < 1e-5
        else:
            assert got_w is None and expected_w is None


def test_unbatched_and_causal(rel_err):
    mha, factored = _pair(batch_first=True)
    x = torch.randn(6, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected, w = mha(x, x, x, attn_mask=causal, is_causal=True)
    got, gw = factored(x, x, x, attn_mask=causal, is_causal=True)
    assert rel_err(got, expected) < 1e-5 and rel_err(gw, w) < 1e-5


def test_unsupported_variants_are_refused():
    assert not InRankMultiheadAttention.supports(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    assert not InRankMultiheadAttention.supports(nn.MultiheadAttention(32, 4, add_bias_kv=True))
    with pytest.raises(ValueError, match="only packed projections"):
        InRankMultiheadAttention.from_mha(nn.MultiheadAttention(32, 4, add_zero_attn=True), rank=4)


class Decoder(nn.Module):
    """Self- and cross-attention through nn.MultiheadAttention, with masks."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Linear(32, 32)

    def forward(self, x, memory, padding):
        h = x + self.self_attn(x, x, x, need_weights=False)[0]
        h = h + self.cross_attn(h, memory, memory, key_padding_mask=padding)[0]
        return self.ff(h)


def test_transform_factors_multihead_attention(rel_err):
    from inrank_fx import InRankConfig, freeze, ranks, set_ranks, transform

    torch.manual_seed(0)
    model = Decoder().eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    out = transform(model, InRankConfig(init="svd", init_rank=1.0)).eval()
    assert set(ranks(out)) == {"self_attn.in_proj", "self_attn.out_proj", "cross_attn.in_proj",
                               "cross_attn.out_proj", "ff"}
    assert isinstance(out.self_attn, InRankMultiheadAttention)
    assert rel_err(out(x, memory, padding), model(x, memory, padding)) < 1e-5
    set_ranks(out, 8)  # the projections resize like any factored layer
    reference = out(x, memory, padding)
    frozen = freeze(out)
    assert type(frozen.self_attn.in_proj).__name__ == "FactoredLinear"
    assert rel_err(frozen(x, memory, padding), reference) < 1e-5
