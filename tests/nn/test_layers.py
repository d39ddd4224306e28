import pytest
import torch
from torch import nn

from inrank_fx import InRankConfig, InRankLinear, transform
from inrank_fx.nn import factored_layers


def test_from_linear_full_rank_reproduces_the_layer(rel_err):
    linear = nn.Linear(48, 80)
    layer = InRankLinear.from_linear(linear, rank=48, init="svd")
    x = torch.randn(7, 3, 48)
    assert layer.rank == layer.full_rank == 48 and layer.buffer == 0
    assert rel_err(layer(x), linear(x)) < 1e-5


def test_from_linear_float64_is_tighter(rel_err):
    linear = nn.Linear(40, 24).double()
    layer = InRankLinear.from_linear(linear, rank=24, init="svd")
    assert layer.U.dtype == torch.float64
    x = torch.randn(5, 40, dtype=torch.float64)
    assert rel_err(layer(x), linear(x)) < 1e-12


def test_truncated_svd_is_the_best_rank_k_approximation():
    linear = nn.Linear(60, 50)
    layer = InRankLinear.from_linear(linear, rank=10, init="svd")
    s = torch.linalg.svdvals(linear.weight.detach())
    err = torch.linalg.norm(layer.weight.detach() - linear.weight.detach())
    assert err.item() == pytest.approx(s[10:].norm().item(), rel=1e-4)  # Eckart–Young


@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_large_layers_take_a_randomized_svd_close_to_the_optimum(spectrum):
    # 512 x 1024 at width 4 + 20: the sketch (34 columns) is far narrower than the full rank, so
    # spectral init is randomized; the kept rank-4 approximation must stay near Eckart-Young's
    # optimum in the spectral norm, both for a Gaussian init (flat spectrum, the hardest case)
    # and for a trained-looking decaying one.
    from inrank_fx.nn import linear as linear_module

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 1024, generator=gen) * 0.02
    if spectrum == "decaying":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        weight = (u * (s * torch.arange(1, 513) ** -0.7)) @ vh
    rng_before = torch.get_rng_state()
    linear_module.top_singular(weight, 24)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the sketch has its own generator
    layer = InRankLinear.from_weight(weight, None, rank=4, buffer=20)
    assert 4 * (layer.width + linear_module.OVERSAMPLE) <= 512  # the randomized path was taken
    s = torch.linalg.svdvals(weight.double())
    err = torch.linalg.matrix_norm((weight - layer.weight.detach()).double(), ord=2)
    assert s[4] <= err <= 1.03 * s[4]
    again = InRankLinear.from_weight(weight, None, rank=4, buffer=20)
    assert torch.equal(again.U, layer.U) and torch.equal(again.V, layer.V)  # reproducible
    if spectrum == "flat":
        return  # near-equal singular values: the next directions are not defined well enough
    # the silent buffer's V columns still span the next singular directions, roughly
    top = torch.linalg.svd(weight.double(), full_matrices=False).Vh[4:8].T
    v = torch.linalg.qr(layer.V[:, 4:].double()).Q
    assert torch.linalg.matrix_norm(v.T @ top) ** 2 > 0.9 * 4


def test_small_layers_keep_the_exact_svd():
    from inrank_fx.nn import linear as linear_module

    weight = torch.randn(3 * linear_module.EXACT_BELOW, linear_module.EXACT_BELOW - 1)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    layer = InRankLinear.from_weight(weight, None, rank=3, buffer=0)
    assert torch.equal(layer.U, (u[:, :3] * s[:3].sqrt()).float())


def test_buffer_is_computed_and_capped():
    layer = InRankLinear(32, 20, rank=4, buffer=6)
    assert (layer.rank, layer.buffer, layer.width) == (4, 6, 10)
    assert layer.U.shape == (20, 10) and layer.V.shape == (32, 10)
    capped = InRankLinear(32, 20, rank=18, buffer=6)
    assert (capped.rank, capped.width, capped.buffer) == (18, 20, 2)
    assert InRankLinear(8, 8, rank=100).rank == 8


def test_random_init_matches_dense_default_variance():
    layer = InRankLinear(512, 384, rank=32, buffer=0)
    dense = nn.Linear(512, 384)
    var = layer.weight.detach().var().item()
    assert var == pytest.approx(dense.weight.detach().var().item(), rel=0.1)
    assert var == pytest.approx(1 / (3 * 512), rel=0.1)


def test_forward_is_two_matmuls_and_the_weight_view_agrees():
    layer = InRankLinear(16, 12, rank=3, buffer=2)
    x = torch.randn(4, 16)
    expected = x @ layer.weight.T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.weight.shape == (12, 16)


def test_singular_values_from_factors():
    layer = InRankLinear(96, 64, rank=12, buffer=4)
    with torch.no_grad():
        layer.U.normal_()
        layer.V.normal_()
    expected = torch.linalg.svdvals(layer.U @ layer.V.T)[: layer.width]
    got = layer.singular_values()
    assert got.shape == (16,)
    assert torch.allclose(got, expected.detach(), rtol=1e-4)


def test_repr_is_informative():
    text = repr(InRankLinear(64, 32, rank=4, buffer=2, bias=False))
    for part in ("in_features=64", "out_features=32", "rank=4", "buffer=2", "full_rank=32",
                 "bias=False", "% of dense"):
        assert part in text


def test_non_finite_weight_refuses_svd_init():
    linear = nn.Linear(8, 8)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.3.fc.*non-finite"):
        InRankLinear.from_linear(linear, rank=4, name="blocks.3.fc")


def test_bad_sizes():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        InRankLinear(8, 8, rank=0)
    with pytest.raises(ValueError, match="init must be"):
        InRankLinear.from_linear(nn.Linear(8, 8), rank=2, init="zeros")


def test_gradients_reach_both_factors_and_train():
    torch.manual_seed(0)
    target = nn.Linear(20, 20)
    layer = InRankLinear(20, 20, rank=20)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 20)
    losses = []
    for _ in range(200):
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


def test_a_factored_conv_is_a_factored_layer_but_not_a_linear_one():
    from inrank_fx import FactoredLayer, InRankConv2d

    conv = InRankConv2d.from_conv(nn.Conv2d(8, 16, 3), rank=4)
    assert isinstance(conv, FactoredLayer) and not isinstance(conv, InRankLinear)
    model = transform(nn.Sequential(nn.Conv2d(16, 32, 1), nn.Flatten(), nn.Linear(32, 32)),
                      InRankConfig(init_rank=4, buffer=0))
    kinds = {name: type(m).__name__ for name, m in factored_layers(model).items()}
    assert kinds == {"0": "InRankConv2d", "2": "InRankLinear"}  # both found as factored layers
