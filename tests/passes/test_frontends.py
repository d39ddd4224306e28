"""The torch.export frontend: forwards that symbolic tracing cannot handle, given an example."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrank_fx import InRankConfig, attach, ranks, summary, transform

FULL_SVD = InRankConfig(init="svd", init_rank=1.0)


class ShapeLoop(nn.Module):
    """A Python loop over an input shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x):
        for _ in range(x.shape[0] // 2):
            x = x * 1.0
        return F.gelu(self.fc(x)) @ self.w.T


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        return self.head(torch.relu(self.inner(x)))


def test_torch_export_frontend_factors_what_fx_cannot_see(rel_err):
    model = Outer(ShapeLoop()).eval()
    x = torch.randn(4, 32)
    without = transform(model, FULL_SVD)
    assert set(ranks(without)) == {"inner.fc", "head"}  # fx alone: w is read by an untraced forward
    assert "did not trace" in {d.name: d.reason for d in summary(without).dense}["inner.w"]

    out = transform(model, FULL_SVD, example_inputs=(x,))
    # fc is called inside the captured forward: its weight is factored there, and still reads
    assert set(ranks(out)) == {"inner.fc.weight_factored", "inner.w", "head"}
    assert out.inner.fc.weight.shape == (32, 32)
    assert out._inrank_report.exported == ["inner"]
    assert "captured with torch.export" in str(summary(out))
    assert rel_err(out(x), model(x)) < 1e-5

    out.train()  # a plain, trainable module
    opt = torch.optim.AdamW(out.parameters(), lr=1e-2)
    u_before = out.inner.w.U.detach().clone()
    attach(out, opt, InRankConfig(warmup_steps=0, check_every=1, threshold=0.999))
    out(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(out.inner.w.U[:, : u_before.shape[1]], u_before)
    out.eval()
    assert out(x).shape == (4, 16)


def test_when_torch_export_fails_too_the_reason_is_kept(rel_err):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            if x.sum() > 0:
                return x @ self.w
            return x

    model = Outer(DataDependent())
    x = torch.rand(4, 32)
    out = transform(model, FULL_SVD, example_inputs=(x,))
    assert set(ranks(out)) == {"head"}
    assert "torch.export:" in out._inrank_report.not_traced["inner"]
    assert rel_err(out(x), model(x)) < 1e-5


def test_export_is_chosen_only_where_fx_misses_weights(rel_err):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    out = transform(model, FULL_SVD, example_inputs=(ids,))
    # BertModel's forwards do not trace, but every weight is in an nn.Linear: no export needed,
    # and the model keeps its class
    assert out._inrank_report.exported == [] and type(out) is type(model)
    assert len(ranks(out)) == 7
    assert rel_err(out(ids).last_hidden_state, model(ids).last_hidden_state) < 1e-5


def test_users_register_their_own_module_types(rel_err):
    from inrank_fx import InRankLinear, register_module_handler

    class RowProjection(nn.Module):
        """A third-party layer: y = x @ W with W stored in×out, and a custom forward."""

        def __init__(self, n_in, n_out):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)

        def forward(self, x):
            return torch.einsum("...i,io->...o", x, self.kernel)  # einsum: no built-in handler

    model = nn.Sequential(RowProjection(32, 48), nn.ReLU(), RowProjection(48, 16))
    x = torch.randn(3, 32)
    with pytest.warns(UserWarning, match="no matmul"):
        before = transform(model, FULL_SVD)
    assert not ranks(before)

    register_module_handler(
        RowProjection,
        lambda m, rank, *, buffer=0, init="svd", name="": InRankLinear.from_weight(
            m.kernel.T, None, rank, buffer=buffer, init=init, name=name),
        weight_attr="kernel", matrix=lambda m: m.kernel.T, kind="RowProjection")
    out = transform(model, FULL_SVD)
    assert ranks(out) == {"0": 32, "2": 16}
    assert rel_err(out(x), model(x)) < 1e-5
    assert {r.kind for r in out._inrank_report.factored} == {"RowProjection"}


def test_registries_can_be_restored():
    from inrank_fx import handlers_restored, register_module_handler, unregister_module_handler

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with handlers_restored():
        unregister_module_handler(nn.Linear)
        with pytest.warns(UserWarning, match="no matmul"):
            assert not ranks(transform(model, FULL_SVD))
        register_module_handler("my.package.Layer", lambda *a, **k: None)
    assert ranks(transform(model, FULL_SVD)) == {"0": 32, "2": 16}  # the built-ins are back
    with pytest.raises(KeyError, match="my.package.Layer"):
        unregister_module_handler("my.package.Layer")  # and the experiment's handler is gone


def gated_linear(x, weight, bias):
    """A user function fx keeps as a leaf (torch.fx.wrap below): the matmul inside is hidden
    from symbolic tracing."""
    return torch.sigmoid(F.linear(x, weight, bias)) * x


torch.fx.wrap("gated_linear")


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(gated_linear(x, self.gate.weight, self.gate.bias))


def test_weights_handed_to_a_wrapped_function_need_example_inputs():
    model = Gated()
    plain = transform(model, InRankConfig(init_rank=1.0, min_features=1))
    assert set(ranks(plain)) == {"out"}
    reason = {d.name: d.reason for d in plain._inrank_report.dense}["gate.weight"]
    assert "gated_linear(), a function fx keeps as a leaf" in reason
    assert "pass example_inputs" in reason

    x = torch.randn(1, 32)  # a batch of one: the captured graph must still take other batches
    captured = transform(model, InRankConfig(init_rank=1.0, min_features=1), example_inputs=(x,))
    assert set(ranks(captured)) == {"gate.weight_factored", "out.weight_factored"}  # exported
    assert captured.gate.weight.shape == model.gate.weight.shape  # .weight still reads
    x4 = torch.randn(4, 32)
    torch.testing.assert_close(captured(x4), model(x4), rtol=1e-5, atol=1e-5)
