"""Meta-device models: transform decides on shapes alone, materialize gives the values that
model.apply(init) would have given the dense model, factored."""
import pytest
import torch
from torch import nn

import inrank_fx
from inrank_fx import InRankConfig, InRankValueError, materialize, ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.nn import factored_layers


def spectral_norms(model):
    return {n: torch.linalg.matrix_norm(m.weight.detach(), ord=2).item()
            for n, m in factored_layers(model).items()}


def test_a_meta_gpt_materialises_like_one_built_directly_and_trains():
    # 256 wide: spectral init takes the randomized SVD here, as it does at scale
    config = GPTConfig(n_layer=2, n_embd=256, n_head=4, block_size=32)
    with torch.device("meta"):
        model = GPT(config)
    model = transform(model)
    assert all(p.is_meta for p in model.parameters())
    out = materialize(model, "cpu", init_fn=model._init_weights)
    assert out is model and not any(t.is_meta for t in [*out.parameters(), *out.buffers()])
    assert out.transformer.wte.weight is out.lm_head.weight  # weight tying survives to_empty
    torch.manual_seed(1)
    direct = transform(GPT(config))
    assert ranks(out) == ranks(direct)
    got, want = spectral_norms(out), spectral_norms(direct)
    for name in want:  # c_proj's scaled init (7x smaller here) comes through init_fn too
        assert got[name] == pytest.approx(want[name], rel=0.10), name
    for name, layer in factored_layers(out).items():
        assert layer.U0.shape[1] == layer.rank and torch.equal(layer.U0, layer.U[:, :layer.rank])
    opt = torch.optim.AdamW(out.parameters(), lr=3e-3)
    ctrl = inrank_fx.attach(out, opt, InRankConfig(warmup_steps=2, check_every=2))
    data = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = out.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()  # attach follows the optimizer's steps
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert ctrl.step == 8 and ranks(out) != ranks(direct)  # and the ranks adapted


@torch.no_grad()
def deterministic_init(module):
    """Values from the shapes alone, so a real and a meta model can be compared exactly."""
    for name, param in module.named_parameters(recurse=False):
        gen = torch.Generator().manual_seed(param.numel() + len(name))
        param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)


class Mixed(nn.Module):
    """A module call (nn.Linear), a handler that builds several layers (MultiheadAttention), a
    1x1 conv, and a bare weight read by a functional matmul (x @ W)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.conv = nn.Conv2d(32, 32, 1)
        self.w = nn.Parameter(torch.empty(32, 40))

    def forward(self, x):
        h = self.proj(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return h @ self.w


def test_every_kind_of_factored_layer_materialises_to_the_real_models_factors(rel_err):
    config = InRankConfig(init_rank=1.0, buffer=0)  # full rank: the function itself must survive
    real = Mixed()
    real.apply(deterministic_init)
    x = torch.randn(2, 5, 24)
    with torch.device("meta"):
        meta = Mixed()
    meta = transform(meta, config)
    assert len(ranks(meta)) == 5  # proj, attn's in and out projections, conv, w
    materialize(meta, "cpu", init_fn=deterministic_init)
    assert rel_err(meta(x), real(x)) < 1e-5
    assert rel_err(transform(real, config)(x), real(x)) < 1e-5


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.empty(16))  # no reset_parameters initialises this

    def forward(self, x):
        return self.fc(x) * self.scale


def test_bad_input_to_materialize_and_to_training_names_the_problem():
    with pytest.raises(InRankValueError, match="no parameter or buffer of Bare is on the meta"):
        materialize(Bare(), "cpu")
    with torch.device("meta"):
        model = transform(Bare(), InRankConfig(init_rank=4))
    with pytest.raises(InRankValueError, match="'scale' is on the meta device: Bare has no values"):
        inrank_fx.attach(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(InRankValueError, match=r"'scale' \(Bare\) was not initialised"):
        materialize(model, "cpu")

    def init(module):
        if isinstance(module, Bare):
            nn.init.ones_(module.scale)

    with torch.device("meta"):
        model = transform(Bare(), InRankConfig(init_rank=4))
    materialize(model, "cpu", init_fn=init)
    assert torch.equal(model.scale, torch.ones(16)) and model.fc.rank == 4
    with pytest.raises(InRankValueError, match="not 'meta'"):
        materialize(model, "meta")
