"""Hypothesis fuzzing of the pass: random stacks of nn.Linear, functional matmuls in every
spelling, reshapes and residuals, with random shapes."""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from inrank_fx import InRankConfig, InRankLinear, ranks, transform

KINDS = ("linear", "f_linear", "matmul", "at_transposed", "left", "addmm", "mm_flat")


class RandomNet(nn.Module):
    """Applies `ops` in order to x of shape (B, T, d); each op maps the last dim d_in → d_out."""

    def __init__(self, ops, dims, generator):
        super().__init__()
        self.ops = ops
        for i, (kind, residual) in enumerate(ops):
            n_in, n_out = dims[i], dims[i + 1]
            init = lambda *shape: nn.Parameter(torch.randn(*shape, generator=generator) / n_in ** 0.5)  # noqa: E731
            if kind == "linear":
                setattr(self, f"m{i}", nn.Linear(n_in, n_out))
            elif kind in ("f_linear", "at_transposed", "left"):
                setattr(self, f"w{i}", init(n_out, n_in))
            else:  # matmul, addmm, mm_flat: x @ P with P: in×out
                setattr(self, f"w{i}", init(n_in, n_out))
            if kind in ("f_linear", "addmm"):
                setattr(self, f"b{i}", init(n_out))

    def forward(self, x):
        for i, (kind, residual) in enumerate(self.ops):
            w = getattr(self, f"w{i}", None)
            if kind == "linear":
                y = getattr(self, f"m{i}")(x)
            elif kind == "f_linear":
                y = F.linear(x, w, getattr(self, f"b{i}"))
            elif kind == "matmul":
                y = torch.matmul(x, w)
            elif kind == "at_transposed":
                y = x @ w.T
            elif kind == "left":
                y = (w @ x.transpose(-1, -2)).transpose(-1, -2)
            elif kind == "addmm":
                flat = x.reshape(-1, x.shape[-1])
                y = torch.addmm(getattr(self, f"b{i}"), flat, w).reshape(x.shape[0], x.shape[1], -1)
            else:  # mm_flat
                y = torch.mm(x.flatten(0, 1), w).view(x.shape[0], x.shape[1], -1)
            x = x + torch.relu(y) if residual else torch.relu(y)
        return x


@st.composite
def nets(draw):
    depth = draw(st.integers(1, 4))
    ops, dims = [], [draw(st.integers(2, 24))]
    for _ in range(depth):
        kind = draw(st.sampled_from(KINDS))
        residual = draw(st.booleans())
        dims.append(dims[-1] if residual else draw(st.integers(2, 24)))
        ops.append((kind, residual))
    seed = draw(st.integers(0, 2**16))
    return RandomNet(ops, dims, torch.Generator().manual_seed(seed)), dims, seed


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(nets())
def test_full_rank_transform_matches(case):
    net, dims, seed = case
    x = torch.randn(2, 3, dims[0], generator=torch.Generator().manual_seed(seed))
    out = transform(net, InRankConfig(init="svd", init_rank=1.0, buffer=0, min_features=1))
    assert sum(isinstance(m, InRankLinear) for m in out.modules()) == len(net.ops)
    expected = net(x)
    assert torch.allclose(out(x), expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


@FUZZ
@given(nets(), st.one_of(st.integers(1, 30), st.floats(0.05, 1.0)), st.integers(0, 5))
def test_low_rank_transform_runs_within_full_rank(case, init_rank, buffer):
    net, dims, seed = case
    x = torch.randn(2, 3, dims[0], generator=torch.Generator().manual_seed(seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capping a too-large rank is warned about; fine here
        config = InRankConfig(init="svd", init_rank=init_rank, buffer=buffer, min_features=1)
        out = transform(net, config)
    y = out(x)
    assert y.shape == net(x).shape and torch.isfinite(y).all()
    layers = {name: m for name, m in out.named_modules() if isinstance(m, InRankLinear)}
    assert len(layers) == len(net.ops)
    for name, layer in layers.items():
        # the rank asked for (capped at the layer's full rank), and the buffer on top of it
        assert ranks(out)[name] == min(config.rank_for(layer.full_rank), layer.full_rank)
        assert layer.width == min(layer.rank + buffer, layer.full_rank)
