"""Bad input: each case gets a clear message and leaves the model usable."""
import warnings

import pytest
import torch
from torch import nn

from inrank_fx import InRankConfig, ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig


def small_gpt():
    return GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, block_size=16))


def test_targets_that_match_nothing_warn_with_near_names():
    with pytest.warns(UserWarning, match=r"targets pattern 'c_fcc' matches no layer; nearest layer names: "
                                         r"transformer\.h\.0\.mlp\.c_fc"):
        out = transform(small_gpt(), InRankConfig(targets=["c_fcc", "c_attn"]))
    assert list(ranks(out)) == ["transformer.h.0.attn.c_attn"]  # the pattern that matched still works
    with pytest.warns(UserWarning, match="exclude pattern 'lm_heda' matches no layer"):
        transform(small_gpt(), InRankConfig(exclude=["lm_heda"]))


def test_non_finite_weights_are_refused_by_name():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        model[2].weight[3, 4] = float("inf")
    with pytest.raises(ValueError, match="'?2'?: 1 non-finite"):
        transform(model, InRankConfig(init="svd", init_rank=8))
    assert type(model[2]) is nn.Linear  # the input model is untouched
    out = transform(model, InRankConfig(init="iid", init_rank=8))  # reads no weight values: fine
    assert ranks(out) == {"0": 8, "2": 8}


def test_half_precision(rel_err):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).half()
    out = transform(model, InRankConfig(init="svd", init_rank=1.0))
    assert out[0].U.dtype == torch.float16
    x = torch.randn(4, 64, dtype=torch.float16)
    assert rel_err(out(x).float(), model(x).float()) < 5e-3
    assert out[0].singular_values().dtype == torch.float32  # spectra are taken in float32


def test_meta_device():
    with torch.device("meta"):
        model = small_gpt()
    for init in ("iid", "svd", "random"):  # deciding what to factor needs no values
        out = transform(model, InRankConfig(init=init, init_rank=4))
        assert all(p.is_meta for p in out.parameters()) and len(ranks(out)) == 4
    with pytest.raises(ValueError, match="meta device have no spectrum"):
        transform(model, InRankConfig(init="svd", init_rank="auto"))


def test_a_model_that_neither_traces_nor_has_leaves():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            if x.sum() > 0:  # does not trace, and holds no nn.Linear to swap
                return x @ self.w
            return x

    with pytest.warns(UserWarning, match="no matmul against a weight was factored in Opaque.*forwards "
                                         "that did not trace.*the root module \\(TraceError"):
        out = transform(Opaque(), InRankConfig(init="svd", init_rank=1.0))
    x = torch.rand(2, 32)
    assert torch.equal(out(x), x @ out.w)  # usable, unchanged


def test_depthwise_and_grouped_convolutions_stay_dense(rel_err):
    model = nn.Sequential(nn.Conv2d(32, 32, 1, groups=4), nn.Conv2d(32, 32, 3, groups=32, padding=1),
                          nn.Conv2d(32, 64, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = transform(model, InRankConfig(init="svd", init_rank=1.0, convs="all"))
    assert list(ranks(out)) == ["2"]
    x = torch.randn(1, 32, 5, 5)
    assert rel_err(out(x), model(x)) < 1e-5
