"""The opt-in nonlinearity between the factors (x → σ(x·V) → ·Uᵀ, CoLA): the forward, growth
that keeps the function, truncation that keeps components instead of rotating them, the
controller on component magnitudes, freeze and ONNX."""
import pytest
import torch
import torch.nn.functional as F

from inrank_fx import InRankConfig, InRankLinear, attach, freeze, ranks, set_ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.export import FactoredLinear


def silu_layer(width=12, rank=6):
    layer = InRankLinear(24, 20, rank, buffer=width - rank, activation="silu")
    with torch.no_grad():
        layer.U.normal_()  # every component active, with different magnitudes
        layer.U.mul_(torch.linspace(0.1, 2.0, width))
    return layer


def test_forward_is_the_nonlinearity_between_the_factors():
    layer, x = silu_layer(), torch.randn(5, 24)
    expected = F.silu(x @ layer.V) @ layer.U.T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert not torch.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-3)
    assert "activation=silu" in repr(layer)
    with pytest.raises(ValueError, match="activation must be one of"):
        InRankLinear(8, 8, 2, activation="tanh")


def test_spectrum_is_the_component_magnitudes_and_truncation_keeps_the_largest():
    layer, x = silu_layer(), torch.randn(5, 24)
    norms = layer.U.norm(dim=0) * layer.V.norm(dim=0)
    assert torch.allclose(layer.singular_values(), norms.sort(descending=True).values)
    keep = norms.argsort(descending=True)[:4]
    expected = F.silu(x @ layer.V[:, keep]) @ layer.U[:, keep].T + layer.bias
    layer.truncate(4)
    assert layer.width == 4 and torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="measure='weight'"):
        layer.update_singular_values()


def test_growth_leaves_the_function_unchanged():
    layer, x = silu_layer(), torch.randn(5, 24)
    before = layer(x)
    layer.grow(16)
    assert layer.width == 16 and torch.allclose(layer(x), before, atol=1e-6)


def test_config_refuses_what_a_nonlinear_layer_cannot_do():
    with pytest.raises(ValueError, match="InRankConfig.activation"):
        InRankConfig(activation="tanh")
    with pytest.raises(ValueError, match="InRankConfig.activation needs measure='weight'"):
        InRankConfig(activation="silu", measure="update")


def test_a_gpt_with_silu_factors_trains_adapts_freezes_and_exports(rel_err, tmp_path):
    cfg = InRankConfig(activation="silu", warmup_steps=3, check_every=3, stop_after=None)
    torch.manual_seed(0)
    model = transform(GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)), cfg)
    layers = [m for m in model.modules() if isinstance(m, InRankLinear)]
    assert layers and all(m.activation == "silu" for m in layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctrl = attach(model, opt)
    x = torch.randint(0, 256, (4, 16))
    start = model.loss(x, x).item()
    for _ in range(30):
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < start and ctrl.rank_events > 0 and max(ranks(model).values()) > 2
    set_ranks(model, {n: m.rank for n, m in model.named_modules() if isinstance(m, InRankLinear)},
              opt)  # drop the buffers: the frozen model is then the same function
    model.eval()
    frozen = freeze(model)
    plain = [m for m in frozen.modules() if isinstance(m, FactoredLinear)]
    assert len(plain) == len(layers) and all(m.activation == "silu" for m in plain)
    assert rel_err(frozen(x), model(x)) < 1e-5
    with pytest.raises(ValueError, match="no single matrix"):
        freeze(model, merge=True)
    pytest.importorskip("onnxruntime")
    from inrank_fx.export import to_onnx

    report = to_onnx(model, (x,), tmp_path / "silu.onnx")
    assert report.max_rel_error <= 1e-4
