"""A pass never changes what a model computes: optional arguments, forwards that write state,
heads in containers. Each model here has the pattern on its own, small."""
import copy
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from inrank_fx import InRankConfig, InRankError, freeze, ranks, summary, transform

FULL = InRankConfig(init="svd", init_rank=1.0, buffer=0)


class OptionalArgs(nn.Module):
    """Reads its own weight (so its forward is rewritten) and branches on arguments that
    default to None, both ways: `is not None` adds, `is None` picks another path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x, extra=None, mask=None):
        y = F.linear(x, self.w)
        if extra is not None:
            y = y + extra
        if mask is None:
            y = y * 2
        else:
            y = y.masked_fill(mask, 0.0)
        return y


CALLS = {
    "x": lambda x, e, m: ((x,), {}),
    "x, extra": lambda x, e, m: ((x, e), {}),
    "x, mask=": lambda x, e, m: ((x,), {"mask": m}),
    "x, extra, mask": lambda x, e, m: ((x, e, m), {}),
    "x, None, mask": lambda x, e, m: ((x, None, m), {}),
    "x, extra=, mask=None": lambda x, e, m: ((x,), {"extra": e, "mask": None}),
}


@pytest.mark.parametrize("call", CALLS)
def test_arguments_left_at_none_take_their_own_graph(call, rel_err):
    torch.manual_seed(0)
    model = OptionalArgs()
    out = transform(model, FULL)
    # 2 modes × (nothing left None, extra, mask, both)
    assert isinstance(out, fx.GraphModule) and len(out.forms) == 8
    assert ranks(out) == {"w": 16}
    x, e, m = torch.randn(3, 16), torch.randn(3, 16), torch.rand(3, 16) > 0.5
    args, kwargs = CALLS[call](x, e, m)
    assert rel_err(out(*args, **kwargs), model(*args, **kwargs)) < 1e-5
    for copied in (copy.deepcopy(out), freeze(out)):  # the forms survive a copy and freezing
        assert rel_err(copied(*args, **kwargs), model(*args, **kwargs)) < 1e-5


def test_a_whole_pickle_that_would_keep_one_form_is_refused(tmp_path, rel_err):
    torch.manual_seed(0)
    model = OptionalArgs()
    out = transform(model, FULL)
    with pytest.raises(InRankError, match="cannot be pickled whole"):
        pickle.dumps(out)
    torch.save(out.state_dict(), tmp_path / "state.pt")  # the way to save it
    again = transform(OptionalArgs(), FULL)
    again.load_state_dict(torch.load(tmp_path / "state.pt"))
    x = torch.randn(2, 16)
    assert rel_err(again(x), model(x)) < 1e-5


def test_call_forms_under_torch_compile(rel_err):
    torch.manual_seed(0)
    model = OptionalArgs()
    compiled = torch.compile(transform(model, FULL), backend="aot_eager")
    x, e = torch.randn(3, 16), torch.randn(3, 16)
    assert rel_err(compiled(x), model(x)) < 1e-5
    assert rel_err(compiled(x, e), model(x, e)) < 1e-5


def test_a_required_argument_passed_none_is_refused_not_guessed():
    class Required(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x, mask):  # traced with mask given: `mask is None` would be baked
            y = F.linear(x, self.w)
            return y if mask is None else y * mask

    out = transform(Required(), FULL)
    out(torch.randn(2, 16), torch.ones(2, 16))
    with pytest.raises(InRankError, match="mask=None"):
        out(torch.randn(2, 16), None)


class FlagOnFirstCall(nn.Module):
    """Scales a child's weight in place on the first call and remembers it (as RWKV does on its
    first eval call), and reads a weight of its own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.done = False

    def forward(self, x):
        if not self.done:
            with torch.no_grad():
                self.fc.weight.mul_(0.5)
            self.done = True
        return self.fc(F.linear(x, self.w))


@pytest.mark.parametrize("example", [False, True], ids=["fx", "example_inputs"])
def test_a_forward_that_writes_state_is_kept_as_it_was(example):
    torch.manual_seed(0)
    model, x = FlagOnFirstCall(), torch.randn(3, 16)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no matmul against a weight was factored"):
        out = transform(model, FULL, example_inputs=(x,) if example else None)
    assert out.done is False and model.done is False  # neither tracing nor the example ran it
    assert torch.equal(out.fc.weight, reference.fc.weight)
    assert ranks(out) == {}
    text = str(summary(out))
    assert "written in place by node 'mul_'" in text and "writes module state" in text
    for _ in range(2):  # the first call scales, the second does not: as the original
        assert torch.equal(out(x), reference(x))


def test_example_inputs_in_place_with_nothing_to_restore_from_is_an_error():
    model = FlagOnFirstCall()
    with pytest.raises(InRankError, match="fc.weight"):
        transform(model, FULL, example_inputs=(torch.randn(2, 16),), inplace=True)


class ListHeads(nn.Module):
    """Heads in an nn.ModuleList called from a root forward that does not trace."""

    def __init__(self):
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])

    def forward(self, xs):
        if xs[0].sum() > 0:  # data-dependent: fx cannot trace this forward
            xs = [x * 1.0 for x in xs]
        return [head(xs[i]) for i, head in enumerate(self.head)]


def test_heads_in_a_list_called_by_an_untraced_forward_are_factored(rel_err):
    torch.manual_seed(0)
    model = ListHeads()
    out = transform(model, FULL)
    assert set(ranks(out)) == {"head.0", "head.1", "head.2"}
    xs = [torch.randn(2, 16) for _ in range(3)]
    for a, b in zip(out(xs), model(xs)):
        assert rel_err(a, b) < 1e-5


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("merge", [True, False])
def test_freeze_leaves_standard_attention(merge, rel_err):
    from inrank_fx.nn import FactoredMultiheadAttention, InRankMultiheadAttention

    torch.manual_seed(0)
    model = Attention().eval()
    out = transform(model, InRankConfig(init="svd", init_rank=0.5, buffer=0))
    assert isinstance(out.attn, InRankMultiheadAttention)
    frozen = freeze(out, merge=merge)
    assert not any(type(m) is InRankMultiheadAttention for m in frozen.modules())
    expected = nn.MultiheadAttention if merge else FactoredMultiheadAttention
    assert type(frozen.attn) is expected
    x = torch.randn(2, 5, 32)
    assert rel_err(frozen(x), out(x)) < 1e-5


class LearnedQueries(nn.Module):
    """Learned query tokens expanded and handed to a module (DETR, Perceiver): under no_grad
    the expanded view requires grad with no gradient function, which FlopCounterMode's module
    tracker cannot hook."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(4, 32))
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.query.expand(x.shape[0], -1, -1)) + x


def test_flops_are_counted_where_the_model_needs_grad_mode():
    from inrank_fx.tools import bench

    out = transform(LearnedQueries(), FULL)
    x = torch.randn(2, 4, 32)
    flops = summary(out, (x,)).flops
    assert flops.factored_actual == 2 * (2 * 4 * 32 * 32) * 2  # two factors, full rank
    assert flops.share == 1.0
    assert bench._count_flops(out, (x,), False, None) >= flops.factored_actual


class TrainingBranch(nn.Module):
    """Reads `self.training` in a forward that is rewritten: a graph bakes the mode in."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        y = F.linear(x, self.w)
        return y * 3 if self.training else y - 1


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_the_mode_picks_its_own_graph(traced_in, rel_err):
    torch.manual_seed(0)
    model = TrainingBranch().train(traced_in == "train")
    out = transform(model, FULL)
    x = torch.randn(3, 16)
    for mode in (True, False, True):
        model.train(mode), out.train(mode)
        assert rel_err(out(x), model(x)) < 1e-5


class GradModeBranch(nn.Module):
    """Reads global state fx cannot see: the trace bakes in the grad mode it ran under."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        y = F.linear(x, self.w)
        if not torch.is_grad_enabled():  # an inference-only shortcut
            y = y.clamp(min=0)
        return y


def test_a_graph_that_differs_on_the_example_is_not_used(rel_err):
    torch.manual_seed(0)
    model, x = GradModeBranch(), torch.randn(3, 16)
    with pytest.warns(UserWarning, match="no matmul against a weight was factored"):
        out = transform(model, FULL, example_inputs=(x,))
    assert ranks(out) == {}
    assert "differs from the original on the example call" in str(summary(out))
    without = transform(model, FULL)  # without an example there is nothing to check against
    with torch.no_grad():
        assert torch.equal(out(x), model(x))
        assert rel_err(without(x), model(x)) > 0.1


class IndexedExperts(nn.Module):
    """Experts as one 3-D parameter, one expert at a time in a loop fx cannot trace (range of
    a shape), as transformers' MixtralExperts: torch.export takes the dense model."""

    def __init__(self, dim=32, hidden=48, experts=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.router = nn.Linear(dim, experts)

    def forward(self, x):
        weights = torch.softmax(self.router(x), -1)
        out = 0
        for e in range(self.w.shape[0]):  # fx: range() of a Proxy
            out = out + weights[..., e:e + 1] * F.linear(x, self.w[e])
        return out


class WithExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = IndexedExperts()
        self.head = nn.Linear(48, 16)

    def forward(self, x):
        return self.head(self.moe(x))


@pytest.mark.parametrize("example", [False, True], ids=["fx", "example_inputs"])
def test_factored_experts_still_export(example, rel_err):
    torch.manual_seed(0)
    model, x = WithExperts().eval(), torch.randn(2, 5, 32)
    torch.export.export(model, (x,))  # the dense model exports
    out = transform(model, InRankConfig(init="svd", init_rank=1.0, buffer=0, min_features=1),
                    example_inputs=(x,) if example else None)
    assert "moe.w" in ranks(out)  # factored, never dropped
    assert rel_err(out(x), model(x)) < 1e-5
    for candidate in (out, freeze(out)):
        program = torch.export.export(candidate, (x,))
        assert rel_err(program.module()(x), model(x)) < 1e-5
    assert rel_err(torch.compile(out, backend="aot_eager")(x), model(x)) < 1e-5


class BatchReshape(nn.Module):
    """fx cannot trace it (a Proxy in control flow); torch.export captures it reading the batch
    size (aten.sym_size), which torch.jit.trace would bake into a file."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x):
        if x.dim() == 3:
            x = x.reshape(x.shape[0], -1)
        return F.linear(x.reshape(x.shape[0], -1, 32), self.w).flatten(1)


def test_every_onnx_path_keeps_the_batch_dynamic_or_refuses(tmp_path):
    pytest.importorskip("onnxruntime")
    from inrank_fx.export import ExportError, to_onnx

    torch.manual_seed(0)
    # a rewritten root forward (a GraphModule at the root) through the TorchScript exporter
    report = to_onnx(transform(OptionalArgs(), FULL), (torch.randn(2, 16),),
                     tmp_path / "root.onnx", exporter="torchscript")
    assert report.batch_sizes == [2, 3]
    model, x = BatchReshape().eval(), torch.randn(1, 4, 8)
    out = transform(model, FULL, example_inputs=(x,))
    assert out.__class__.__name__ == "BatchReshape" and ranks(out) == {"w": 32}
    assert to_onnx(out, (x,), tmp_path / "dynamo.onnx").batch_sizes == [1, 3]
    with pytest.raises(ExportError, match="node 'sym_size_int_1'.*dynamic_batch=False"):
        to_onnx(out, (x,), tmp_path / "ts.onnx", exporter="torchscript")
    assert not (tmp_path / "ts.onnx").exists()
    fixed = to_onnx(out, (x,), tmp_path / "ts.onnx", exporter="torchscript", dynamic_batch=False)
    assert fixed.batch_sizes == [1]


class StackAndWeight(nn.Module):
    """A forward fx cannot trace that reads a 2-D weight and a stack of experts through bmm:
    with example_inputs, torch.export captures it, and the stack's reads are aten ops."""

    def __init__(self, dim=32, experts=4):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.w = nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)

    def forward(self, x):  # x: experts x tokens x dim
        if x.dim() == 3:  # fx: a Proxy in control flow
            x = F.linear(x, self.proj)
        return torch.bmm(x, self.w.transpose(1, 2))


def test_a_stack_in_a_forward_torch_export_captured_is_factored(rel_err):
    torch.manual_seed(0)
    model, x = StackAndWeight(), torch.randn(4, 6, 32)
    out = transform(model, InRankConfig(init="svd", init_rank=1.0, buffer=0, min_features=1),
                    example_inputs=(x,))
    assert set(ranks(out)) == {"proj", "w"}  # the stack is factored, not dropped
    assert not out.get_submodule("w").product_reads  # its bmm became the layer's two matmuls
    assert rel_err(out(x), model(x)) < 1e-5
    for candidate in (out, freeze(out)):
        assert rel_err(torch.export.export(candidate, (x,)).module()(x), model(x)) < 1e-5


def _kernel(module, x):  # outside the class, as a kernel a decorator dispatches to
    up = torch.bmm(x, module.w.transpose(1, 2))  # a tensor method of the stack
    return up + torch.bmm(x, module.w) * 0.5  # the stack handed to a torch function


class Dispatched(nn.Module):
    """Its class only indexes the stack; the kernel it dispatches to reads it otherwise."""

    def __init__(self, dim=32, experts=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)
        self.kernel = True

    def forward(self, x):
        if x.dim() == 3 and self.kernel:  # a Proxy in control flow: fx cannot trace this
            return _kernel(self, x)
        return torch.stack([F.linear(x[e], self.w[e]) for e in range(self.w.shape[0])])


@pytest.mark.parametrize("expert_ranks", ["stack", "expert"])
def test_a_stack_read_outside_the_traced_class_reads_as_the_parameter(expert_ranks, rel_err):
    torch.manual_seed(0)
    model, x = Dispatched(), torch.randn(4, 6, 32)
    out = transform(model, InRankConfig(init="svd", init_rank=1.0, buffer=0, min_features=1,
                                        expert_ranks=expert_ranks))
    assert "w" in ranks(out) or "w.0" in ranks(out)
    assert rel_err(out(x), model(x)) < 1e-5
    model.kernel = out.kernel = False  # the loop: `self.w[e]` is expert e's matrix
    assert rel_err(out(x), model(x)) < 1e-5
    assert rel_err(torch.export.export(freeze(out), (x,)).module()(x), model(x)) < 1e-5


class ConstantsInForms(nn.Module):
    """Tensor constants that only one call form's graph holds (fx stores them on the module)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x, extra=None):
        y = F.linear(x, self.w) * torch.tensor([2.0])
        if extra is not None:
            y = y * torch.tensor([3.0]) + extra
        return y


def test_every_forms_constants_survive_a_copy(rel_err):
    torch.manual_seed(0)
    model, x = ConstantsInForms(), torch.randn(2, 16)
    out = copy.deepcopy(freeze(transform(model, FULL)))
    assert rel_err(out(x, x), model(x, x)) < 1e-5 and rel_err(out(x), model(x)) < 1e-5


class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x, *rest, scale=None):
        y = F.linear(x, self.w)
        return (y if scale is None else y * scale), rest


class StarArgsLast(StarArgs):
    def forward(self, x, scale=None, *rest):
        y = F.linear(x, self.w)
        return (y if scale is None else y * scale), rest


def test_star_args_are_passed_on_or_the_forward_is_kept(rel_err):
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    kept = StarArgs()
    with pytest.warns(UserWarning, match="no matmul against a weight was factored"):
        out = transform(kept, FULL)
    assert "named arguments after *args" in str(summary(out))
    assert torch.equal(out(x, x, scale=2.0)[0], kept(x, x, scale=2.0)[0])
    model = StarArgsLast()
    out = transform(model, FULL)
    assert ranks(out) == {"w": 16}
    for args in ((x,), (x, 2.0), (x, None, x, x), (x, 3.0, x)):
        (got, rest), (expected, expected_rest) = out(*args), model(*args)
        assert rel_err(got, expected) < 1e-5 and len(rest) == len(expected_rest)
