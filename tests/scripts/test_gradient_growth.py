"""benchmarks/gradient_growth.py: components a check adds start along the weight gradient's top
singular directions outside the existing V, at V's scale, and the function does not change."""
import pytest
import torch


@pytest.fixture(scope="module")
def growth_module(load_example):
    return load_example("gradient_growth", "benchmarks")


class _Controller:
    """What GradientGrowth reads of a controller."""

    class config:
        warmup_steps, check_every = 2, 2

    stopped = False


def _model():
    import inrank_fx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    return inrank_fx.transform(model, inrank_fx.InRankConfig(init_rank=3, buffer=0))


def test_it_captures_the_weight_gradient_only_on_check_steps(growth_module):
    model = _model()
    growth = growth_module.GradientGrowth(model, _Controller())
    layer = growth.layers["2"]
    x = torch.randn(5, 7, 24)
    growth.arm(3)  # past the warm-up, not a check step
    model(x).square().sum().backward()
    assert growth.grads == {}
    growth.arm(2)
    model.zero_grad()
    with torch.no_grad():
        model(x)  # evaluation captures nothing
    model(x).square().sum().backward()
    # G = ∂L/∂W of the dense weight U·Vᵀ, which the factored layer never forms
    w = layer.weight.detach().requires_grad_()
    h = model[1](model[0](x)).detach()
    torch.nn.functional.linear(h, w, layer.bias).square().sum().backward()
    torch.testing.assert_close(growth.grads["2"], w.grad, rtol=1e-4, atol=1e-4)


def test_grown_components_start_along_the_gradient_and_silent(growth_module):
    model = _model()
    growth = growth_module.GradientGrowth(model, _Controller())
    layer = growth.layers["0"]
    x = torch.randn(9, 24)
    growth.arm(2)
    model(x).square().sum().backward()
    grad = growth.grads["0"].clone()
    before = model(x).detach()
    old_v = layer.V.detach().clone()
    layer.grow(7)  # what the controller's check does
    growth.after()
    assert growth.seeded == 4 and growth.widths["0"] == 7
    torch.testing.assert_close(model(x), before)  # U's new columns are zero: same function
    torch.testing.assert_close(layer.V[:, :3], old_v)
    new = layer.V[:, 3:].detach()
    q, _ = torch.linalg.qr(old_v)
    assert (q.T @ new).abs().max() < 1e-4  # directions V did not span
    # they span the top singular directions of G outside V
    outside = grad - grad @ q @ q.T
    top = torch.linalg.svd(outside).Vh[:4].T
    cosines = torch.linalg.svdvals(torch.linalg.qr(new)[0].T @ top)
    assert cosines.min() > 0.999
    # at the scale of V's columns
    scale = old_v.pow(2).mean().sqrt() * 24 ** 0.5
    torch.testing.assert_close(new.norm(dim=0), scale.expand(4), rtol=1e-4, atol=1e-6)
    growth.after()  # nothing captured since: nothing seeded
    assert growth.seeded == 4
