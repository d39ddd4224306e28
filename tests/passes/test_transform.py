import copy
import importlib.metadata
import io
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from models import FunctionalNet, Untraceable, mlp
from torch import nn

import inrank_fx
from inrank_fx import InRankConfig, InRankLinear, ranks, summary, transform
from inrank_fx.demo.gpt import GPT, GPTConfig

FULL_SVD = InRankConfig(init="svd", init_rank=1.0)


def n_factored(model: nn.Module) -> int:
    return sum(isinstance(m, InRankLinear) for m in model.modules())


def called_linears(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


def test_mlp_full_rank_svd_reproduces_outputs(rel_err):
    model = mlp()
    out = transform(model, FULL_SVD)
    assert n_factored(out) == 3 and called_linears(out) == 0
    x = torch.randn(10, 32)
    assert rel_err(out(x), model(x)) < 1e-5


def test_float64_is_tighter(rel_err):
    model = mlp().double()
    out = transform(model, FULL_SVD)
    x = torch.randn(10, 32, dtype=torch.float64)
    assert rel_err(out(x), model(x)) < 1e-12


def test_gpt_full_rank_and_tied_head_stays_dense(rel_err):
    model = GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32)).eval()
    out = transform(model, FULL_SVD).eval()
    assert isinstance(out, GPT)  # only modules were swapped: the class and its methods remain
    assert n_factored(out) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert type(out.lm_head) is nn.Linear
    assert out.lm_head.weight is out.transformer.wte.weight
    idx = torch.randint(0, 256, (3, 32))
    assert rel_err(out(idx), model(idx)) < 1e-5
    dense = {d.name: d.reason for d in summary(out).dense}
    assert "tied" in dense["lm_head.weight"] and "transformer.wte.weight" in dense["lm_head.weight"]
    # state_dict keys of untouched modules are unchanged
    assert "transformer.h.0.ln_1.weight" in out.state_dict()
    assert "transformer.h.0.attn.c_attn.U" in out.state_dict()


def test_functional_matmuls_are_rewritten(rel_err):
    model = FunctionalNet()
    out = transform(model, FULL_SVD)
    assert isinstance(out, fx.GraphModule)
    assert set(ranks(out)) == {"w", "proj", "back", "skip"}
    graph_ops = [n.target for n in out.graph.nodes if n.op == "call_function"]
    for op in (F.linear, torch.matmul, torch.addmm, torch.mm):
        assert op not in graph_ops
    import operator

    assert operator.matmul not in graph_ops
    assert not [n for n in out.graph.nodes if n.op == "get_attr" and n.target in {"w", "proj", "back", "skip"}]
    assert len([n for n in out.graph.nodes if n.op == "call_module"]) == 5  # skip is read twice
    x = torch.randn(6, 32)
    assert rel_err(out(x), model(x)) < 1e-5
    assert "b" in dict(out.named_parameters())  # the bias of F.linear stays a parameter
    # orientation: x @ proj is x·Wᵀ with W = projᵀ; back @ x is W·x with W = back
    assert (out.proj.out_features, out.proj.in_features) == (40, 48)
    assert (out.back.out_features, out.back.in_features) == (32, 40)
    assert (out.skip.out_features, out.skip.in_features) == (40, 32)


def test_weight_read_in_both_orientations_stays_dense():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return x @ self.w + x @ self.w.T

    with pytest.warns(UserWarning, match="no matmul"):
        out = transform(Both(), FULL_SVD)
    assert "transpose" in summary(out).dense[0].reason and not ranks(out)


def test_functional_in_a_submodule_keeps_the_parent(rel_err):
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = FunctionalNet()
            self.head = nn.Linear(40, 20)

        def forward(self, x):
            return self.head(self.inner(x))

    model = Parent()
    out = transform(model, FULL_SVD)
    assert type(out) is Parent and isinstance(out.inner, fx.GraphModule)
    assert n_factored(out) == 5
    x = torch.randn(4, 32)
    assert rel_err(out(x), model(x)) < 1e-5


def test_torchvision_resnet18(rel_err):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    out = transform(model, FULL_SVD).eval()
    # the classifier and the three 1x1 downsampling convolutions (channel matmuls)
    assert ranks(out) == {"layer2.0.downsample.0": 64, "layer3.0.downsample.0": 128,
                          "layer4.0.downsample.0": 256, "fc": 512}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
    every_conv = transform(model, InRankConfig(init="svd", init_rank=1.0, convs="all")).eval()
    assert len(ranks(every_conv)) == 20 + 1  # every convolution (opt-in k×k) and the classifier
    with torch.no_grad():
        assert rel_err(every_conv(x), model(x)) < 1e-5
    assert list(ranks(transform(model, InRankConfig(convs="none")))) == ["fc"]


@pytest.mark.slow
def test_torchvision_vit_b_16(rel_err):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16().eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    out = transform(model, FULL_SVD).eval()
    # per block: the MLP's two linears and the attention's in / out projections; and the head
    assert n_factored(out) == 12 * 4 + 1
    assert not summary(out).dense
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5


def test_random_init_rank4_trains_with_adamw():
    model = GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32))
    out = transform(model, InRankConfig(init="random", init_rank=4, buffer=0))
    assert set(ranks(out).values()) == {4} and len(ranks(out)) == 8
    before = {n: p.detach().clone() for n, p in out.named_parameters()}
    opt = torch.optim.AdamW(out.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (8, 33))
    losses = []
    for _ in range(15):
        loss = out.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, p in out.named_parameters():
        if name.endswith((".U", ".V")):
            assert not torch.equal(p, before[name]), name


def test_untraceable_forward_falls_back_to_modules(rel_err):
    model = Untraceable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # falling back is reported, not warned about
        out = transform(model, FULL_SVD)
    report = out._inrank_report
    assert "" in report.not_traced and "control flow" in report.not_traced[""]
    assert type(out) is Untraceable
    assert {"a", "b", "direct"} <= set(ranks(out))  # swapped as leaves
    assert isinstance(out.inner, fx.GraphModule) and n_factored(out.inner) == 4
    for sign in (1.0, -1.0):  # both branches
        x = sign * (torch.rand(5, 32) + 0.1)
        assert rel_err(out(x), model(x)) < 1e-5
    assert "did not trace" in str(summary(out))


def test_shared_module_is_factored_once(rel_err):
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    out = transform(model, FULL_SVD)
    assert out[0] is out[2] and isinstance(out[0], InRankLinear)
    x = torch.randn(3, 32)
    assert rel_err(out(x), model(x)) < 1e-5


def test_weights_with_other_reads_stay_dense_with_the_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))
            self.fc1 = nn.Linear(32, 32)
            self.fc2 = nn.Linear(32, 32)
            self.fc2.weight = self.fc1.weight  # tied between two Linears
            self.ok = nn.Linear(32, 32)

        def forward(self, x):
            return self.ok(self.fc2(self.fc1(x @ self.w))) + self.w.sum()

    out = transform(Mixed(), FULL_SVD)
    dense = {d.name: d.reason for d in summary(out).dense}
    assert "sum" in dense["w"]
    assert "shared by modules fc1, fc2" in dense["fc1.weight"]
    assert list(ranks(out)) == ["ok"]


def test_no_matmul_returns_unchanged_with_a_warning():
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU())
    with pytest.warns(UserWarning, match="no matmul against a weight"):
        out = transform(model)
    x = torch.randn(2, 8)
    assert torch.equal(out(x), model(x)) and n_factored(out) == 0


def test_init_rank_above_full_rank_is_capped_and_reported():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 128))
    with pytest.warns(UserWarning, match=r"0 \(64 > 32\).*capped"):
        out = transform(model, InRankConfig(init="svd", init_rank=64))
    assert ranks(out) == {"0": 32, "2": 48}
    assert [r.requested_rank for r in out._inrank_report.factored] == [64, 64]


def test_input_model_is_not_modified():
    model = mlp()
    transform(model, FULL_SVD)
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))


def test_transform_is_idempotent():
    once = transform(mlp(), InRankConfig(init_rank=4))
    with pytest.warns(UserWarning, match="no matmul"):
        twice = transform(once, InRankConfig(init_rank=8))
    assert ranks(twice) == ranks(once) == {"0": 4, "2": 4, "4": 4}
    assert twice._inrank_report.already_factored == ["0", "2", "4"]


def test_filters_min_features_targets_and_filter_fn():
    model = GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32))
    out = transform(model, InRankConfig(targets=["c_fc"], exclude=["transformer.h.1.*"]))
    assert list(ranks(out)) == ["transformer.h.0.mlp.c_fc"]
    seen = []
    out = transform(model, filter_fn=lambda name, m: seen.append((name, m)) or "attn" in name)
    assert set(ranks(out)) == {f"transformer.h.{i}.attn.{p}" for i in (0, 1) for p in ("c_attn", "c_proj")}
    assert all(isinstance(m, nn.Linear) for _, m in seen)
    small = transform(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8)), InRankConfig(min_features=16))
    assert list(ranks(small)) == ["0"]  # the 8-wide layer is below min_features
    assert "below min_features=16" in summary(small).dense[0].reason


@pytest.mark.parametrize("true_rank", [6, 20])
def test_auto_rank_reads_the_spectrum(true_rank):
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(64, true_rank) @ torch.randn(true_rank, 64))
    out = transform(model, InRankConfig(init="svd", init_rank="auto", buffer=0))
    assert ranks(out)["2"] == true_rank  # an exactly low-rank weight: its rank, found
    # a random weight needs most of its spectrum; factored at that rank it would be bigger than
    # dense, so 'auto' leaves it dense and says why
    assert "0" not in ranks(out)
    first = next(d for d in summary(out).dense if d.name == "0")
    assert first.larger_factored and "init_rank='auto' measured rank" in first.reason


def test_auto_rank_never_makes_the_model_bigger():
    torch.manual_seed(0)
    model = mlp()  # freshly initialised: flat spectra everywhere
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64))  # one layer of rank 4
    with pytest.warns(UserWarning, match="init_rank='auto' kept 2 of 3 layers dense"):
        out = transform(model, InRankConfig(init_rank="auto", buffer=0))
    assert ranks(out) == {"2": 4}
    text = str(summary(out))
    assert text.splitlines()[0].startswith("note: init_rank='auto' kept 2 of 3 layers dense")
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    # an explicit rank is the user asking: factored even where it is bigger
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = transform(model, InRankConfig(init_rank=1.0, buffer=0))
    assert set(ranks(full)) == {"0", "2", "4"} and "note:" not in str(summary(full))


def test_summary_table():
    model = GPT(GPTConfig(n_layer=1, n_embd=64, block_size=32))
    out = transform(model, InRankConfig(init_rank=8, buffer=0))
    text = str(summary(out))
    for part in ("layer", "shape", "rank", "params dense", "FLOPs/row factored", "total",
                 "transformer.h.0.mlp.c_fc", "256x64", "left dense", "lm_head.weight"):
        assert part in text
    s = summary(out)
    assert s.factored_params < s.dense_params
    c_fc = next(l for l in s.layers if l.name.endswith("c_fc"))
    assert c_fc.factored_flops == 2 * 8 * (64 + 256) and c_fc.dense_flops == 2 * 64 * 256


def test_forward_hooks_survive_the_swap():
    model = FunctionalNet()
    model.fc = nn.Linear(40, 40)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append("root"))
    mlp_model = mlp()
    mlp_model[2].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    transform(model, FULL_SVD)(torch.randn(2, 32))
    transform(mlp_model, FULL_SVD)(torch.randn(2, 32))
    assert seen == ["root", "InRankLinear"]


def test_root_linear():
    out = transform(nn.Linear(32, 32), InRankConfig(init="svd", init_rank=1.0))
    assert isinstance(out, InRankLinear)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        transform(lambda x: x)
    with pytest.raises(TypeError, match="InRankConfig"):
        transform(mlp(), {"init_rank": 4})
    # the version the package reports is the one it was installed as
    assert inrank_fx.__version__ == importlib.metadata.version("inrank-fx")


def test_a_rank_above_the_full_rank_is_capped_warned_and_reported():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"exceeds the full rank of 0 \(40 > 32\)"):
        out = transform(model, InRankConfig(init_rank=40, buffer=0))
    records = {r.name: r for r in summary(out).report.factored}
    assert (records["0"].rank, records["0"].requested_rank) == (32, 40)
    assert (records["1"].rank, records["1"].requested_rank) == (40, None)  # 40 ≤ 64: as asked


class ReadsWeightMetadata(nn.Module):
    """Reads of a weight's dtype / shape / size(), as positional encodings and casts do: a
    module's weight read by its parent, and a bare parameter read beside its F.linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 48)
        self.w = nn.Parameter(torch.randn(40, 48) / 7)

    def forward(self, x):
        h = self.proj(x.to(self.proj.weight.dtype)) / self.proj.weight.shape[1]
        scale = self.w.size(0) / self.w.T.shape[0]  # through a view as well
        return F.linear(h.to(self.w.dtype), self.w) * scale + self.w.ndim


def test_metadata_reads_do_not_keep_weights_dense(rel_err):
    torch.manual_seed(0)
    model = ReadsWeightMetadata()
    x = torch.randn(4, 32)
    out = transform(model, FULL_SVD)
    assert set(ranks(out)) == {"proj", "w"}, summary(out).dense
    assert rel_err(out(x), model(x)) < 1e-5
    low = transform(model, InRankConfig(init_rank=4, buffer=0))
    assert low(x).shape == (4, 40)
    fx.symbolic_trace(low)  # the rewritten forward traces again


def test_a_torch_op_without_a_handler_is_not_called_a_leaf_function():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(40, 48))

        def forward(self, x):
            return torch.flip(self.w, (0,)).sum() + F.linear(x, self.w)

    reason = summary(transform(Stacked(), FULL_SVD)).dense[0].reason
    assert "passed to flip() in the root forward" in reason and "leaf" not in reason


def test_an_attribute_read_is_named_as_one():
    class ReadsData(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(40, 48))

        def forward(self, x):
            return F.linear(x, self.w) + self.w.data.sum()

    out = transform(ReadsData(), FULL_SVD)
    assert ranks(out) == {}
    assert "its attribute .data read in the root forward" in summary(out).dense[0].reason


class FusedBiasAttention(nn.Module):
    """timm's pattern: the parent hands its nn.Linear's weight to F.linear with a bias it builds
    itself (q and v biases, none for k), and never calls the module."""

    def __init__(self, dim: int = 32, qkv_bias: bool = False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_bias = nn.Parameter(torch.randn(dim) / 10)
        self.v_bias = nn.Parameter(torch.randn(dim) / 10)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        if self.qkv.bias is not None:
            bias = bias + self.qkv.bias
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.mT / 8, dim=-1) @ v
        return self.proj(attn)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_a_modules_weight_handed_to_f_linear_by_its_parent_is_factored(rel_err, qkv_bias):
    torch.manual_seed(0)
    model = FusedBiasAttention(qkv_bias=qkv_bias)
    x = torch.randn(2, 5, 32)
    out = transform(model, FULL_SVD)
    assert set(ranks(out)) == {"qkv.weight_factored", "proj"}, summary(out).dense
    assert rel_err(out(x), model(x)) < 1e-5
    assert ("qkv.bias" in dict(out.named_parameters())) == qkv_bias  # its bias stays in place
    # .weight still reads as the tensor it was (the layer's product), on an nn.Linear
    assert isinstance(out.qkv, nn.Linear) and isinstance(out.qkv.weight, torch.Tensor)
    assert rel_err(out.qkv.weight, model.qkv.weight) < 1e-5
    assert [n for n, m in out.named_modules() if n.endswith("weight")] == []
    saved = io.BytesIO()
    torch.save(out.qkv, saved)  # the holder pickles (its class is made per kind)
    saved.seek(0)
    assert torch.equal(torch.load(saved, weights_only=False).weight, out.qkv.weight)
    again = transform(FusedBiasAttention(qkv_bias=qkv_bias), FULL_SVD)
    again.load_state_dict(copy.deepcopy(out).state_dict())  # saved and copied as a module is
    assert rel_err(again(x), model(x)) < 1e-5
    low = transform(model, InRankConfig(init_rank=4, buffer=0))
    opt = torch.optim.AdamW(low.parameters(), lr=1e-2)
    low(x).square().mean().backward()
    opt.step()  # trains: the layer inside qkv gets gradients
    assert ranks(low)["qkv.weight_factored"] == 4
    with torch.no_grad():
        assert rel_err(inrank_fx.freeze(low)(x), low(x)) < 1e-5  # freezes, and runs


class TinyMoE(nn.Module):
    """A mixture-of-experts feed-forward: a router, top-2 gating, and the experts' weights stacked
    (experts × out × in) and run as batched matmuls, as MoE implementations store them."""

    def __init__(self, dim: int = 32, hidden: int = 64, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = ExpertStack(dim, hidden, experts)

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)
        top, index = gates.topk(2, dim=-1)
        weights = torch.zeros_like(gates).scatter(-1, index, top)  # tokens × experts
        return torch.einsum("te,ted->td", weights, self.experts(x))


class ExpertStack(nn.Module):
    def __init__(self, dim, hidden, experts):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)

    def forward(self, x):  # every expert on every token (tokens × experts × dim)
        h = torch.bmm(x.unsqueeze(0).expand(self.w_in.shape[0], -1, -1), self.w_in.mT).relu()
        return torch.bmm(h, self.w_out.mT).transpose(0, 1)


def test_expert_stacks_are_factored_per_expert_adapt_freeze_and_export(rel_err, tmp_path):
    torch.manual_seed(0)
    model, x = TinyMoE(), torch.randn(10, 32)
    full = transform(model, InRankConfig(init_rank=1.0, buffer=0, min_features=1))
    stacks = {n: m for n, m in full.named_modules() if isinstance(m, inrank_fx.nn.InRankExperts)}
    assert set(stacks) == {"experts.w_in", "experts.w_out"} and not summary(full).dense
    assert stacks["experts.w_in"].U.shape == (4, 64, 32)  # experts x out x rank
    assert rel_err(full(x), model(x)) < 1e-5  # full rank: the function itself
    # the batched matmuls became calls of the stacks (two thin matmuls each); .shape is answered
    # by the layer without forming the product
    assert not any(m.product_reads for m in stacks.values())
    code = full.experts.code
    assert "bmm" not in code and ".weight" not in code and "w_in.shape" in code
    s = summary(full, (x,))
    assert s.flops.left_dense == 0 and s.flops.share == 1.0
    dense_work = 2 * 2 * 10 * 4 * 64 * 32  # two stacks, every expert on every token
    assert s.flops.factored_dense_equivalent >= dense_work
    quarter = summary(transform(model, InRankConfig(init_rank=4, buffer=0, min_features=1)), (x,))
    assert quarter.flops.factored_actual < 0.25 * quarter.flops.factored_dense_equivalent

    low = transform(model, InRankConfig(init_rank=2, min_features=1, warmup_steps=2,
                                        check_every=2, stop_after=8))
    opt = torch.optim.AdamW(low.parameters(), lr=1e-2)
    ctrl = inrank_fx.attach(low, opt)
    seen = []
    for _ in range(10):
        loss = (low(x) - torch.sin(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(ranks(low)["experts.w_in"])
    assert seen[0] == 2 and len(set(seen)) >= 3 and ctrl.stopped  # grew, then stopped
    layer = low.experts.w_in
    assert layer.width == layer.rank < 32 and layer.U.shape[-1] == layer.rank  # truncated
    frozen = inrank_fx.freeze(low)
    assert not any(isinstance(m, inrank_fx.FactoredLayer) for m in frozen.modules())
    with torch.no_grad():
        assert rel_err(frozen(x), low(x)) < 1e-5
    from inrank_fx.export import to_onnx

    report = to_onnx(low, (x,), tmp_path / "moe.onnx")
    assert report.max_rel_error < 1e-4


def test_expert_ranks_per_expert_adapt_apart_freeze_and_export(rel_err, tmp_path):
    torch.manual_seed(0)
    per_expert = InRankConfig(init_rank=1.0, buffer=0, min_features=1, expert_ranks="expert")
    for model, x in ((TinyMoE(), torch.randn(10, 32)), (EinsumExperts(), torch.randn(3, 7, 32)),
                     (RoutedExperts(), torch.randn(12, 32))):
        full = transform(model, per_expert)
        assert rel_err(full(x), model(x)) < 1e-5, type(model).__name__
    assert isinstance(full._modules["w"], inrank_fx.nn.ExpertList)  # read through the property
    assert {"w.0", "w.3"} <= set(ranks(full))  # each expert is a layer of its own

    model, x = TinyMoE(), torch.randn(10, 32)
    low = transform(model, InRankConfig(init_rank=2, min_features=1, warmup_steps=2,
                                        check_every=2, stop_after=8, expert_ranks="expert"))
    stack = low.experts.w_in
    assert isinstance(stack, inrank_fx.nn.ExpertList) and stack.shape == (4, 64, 32)
    assert summary(low, (x,)).flops.left_dense == 0  # every expert matmul ran thin
    opt = torch.optim.AdamW(low.parameters(), lr=1e-2)
    ctrl = inrank_fx.attach(low, opt)
    for _ in range(10):
        loss = (low(x) - torch.sin(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    experts = [ranks(low)[f"experts.w_in.{e}"] for e in range(4)]
    assert ctrl.stopped and min(experts) > 2 and len(set(experts)) > 1  # grew, each its own way
    assert [e.U.shape[-1] for e in stack] == experts  # truncated to their own ranks
    frozen = inrank_fx.freeze(low)
    with torch.no_grad():
        assert rel_err(frozen(x), low(x)) < 1e-5
    from inrank_fx.export import to_onnx

    assert to_onnx(low, (x,), tmp_path / "moe.onnx").max_rel_error < 1e-4
    with pytest.raises(ValueError, match="expert_ranks must be one of"):
        InRankConfig(expert_ranks="per-expert")


def test_an_expert_stack_read_where_fx_cannot_see_stays_dense_with_the_reason():
    class Opaque(ExpertStack):
        def forward(self, x):  # data-dependent control flow: fx cannot trace this forward
            if x.sum() > 0:
                return super().forward(x)
            return super().forward(-x)

    model = TinyMoE()
    model.experts.__class__ = Opaque
    out = transform(model, InRankConfig(init_rank=2, buffer=0, min_features=1))
    stacks = {d.name: d for d in summary(out).dense if d.expert_stack}
    assert set(stacks) == {"experts.w_in", "experts.w_out"}
    assert "a 3-D parameter (4x64x32; mixture-of-experts weights are stored so)" in \
        stacks["experts.w_in"].reason and "did not trace" in stacks["experts.w_in"].reason
    assert set(ranks(out)) == {"router"}
    x = torch.randn(10, 32)
    s = summary(out, (x,))
    assert s.flops.left_dense >= 2 * 2 * 10 * 4 * 64 * 32 and s.flops.share < 0.1


def test_other_3d_parameters_are_not_expert_stacks():
    class Tokens(nn.Module):  # a ViT's class token and position embedding: 3-D, no matmul
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 32))
            self.pos = nn.Parameter(torch.randn(1, 5, 32))
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.proj(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos)

    out = transform(Tokens(), FULL_SVD)
    assert set(ranks(out)) == {"proj"} and not summary(out).dense


def test_experts_run_in_a_loop_over_a_stack_are_factored(rel_err):
    class LoopedExperts(nn.Module):  # one expert at a time: F.linear(x, w[e])
        def __init__(self, experts=3):
            super().__init__()
            self.experts = experts
            self.w = nn.Parameter(torch.randn(experts, 48, 32) / 32 ** 0.5)

        def forward(self, x):
            return torch.stack([F.linear(x, self.w[e]) for e in range(self.experts)])

    model, x = LoopedExperts(), torch.randn(5, 32)
    out = transform(model, InRankConfig(init_rank=1.0, buffer=0, min_features=1))
    assert isinstance(out.w, inrank_fx.nn.InRankExperts) and ranks(out) == {"w": 32}
    assert rel_err(out(x), model(x)) < 1e-5
    assert not out.w.product_reads and "expert = 2" in out.code  # F.linear(x, w[e]): thin
    low = transform(model, InRankConfig(init_rank=4, buffer=0, min_features=1))
    assert low.w.U.shape == (3, 48, 4) and torch.isfinite(low(x)).all()


class EinsumExperts(nn.Module):
    """Expert stacks stored both ways round and multiplied through einsum and @."""

    def __init__(self, dim=32, hidden=48, experts=3):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(experts, dim, hidden) / dim ** 0.5)  # E x in x out
        self.w_down = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)
        self.w_gate = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.w_odd = nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)

    def forward(self, x):  # x: E x T x dim
        h = torch.einsum("etd,edh->eth", x, self.w_up)  # x @ w_up
        h = h * torch.einsum("ehd,etd->eth", self.w_gate, x).sigmoid()  # x @ w_gate.mT
        y = torch.einsum("eth,edh->etd", h, self.w_down)  # h @ w_down.mT
        return torch.baddbmm(y, x, self.w_odd)  # not rewritten: reads the product


def test_expert_stacks_read_by_einsum_and_matmul_run_thin_and_others_read_the_product(rel_err):
    torch.manual_seed(0)
    model, x = EinsumExperts(), torch.randn(3, 7, 32)
    out = transform(model, InRankConfig(init_rank=1.0, buffer=0, min_features=1))
    assert rel_err(out(x), model(x)) < 1e-5
    assert {n: out.get_submodule(n).product_reads for n in ("w_up", "w_gate", "w_down", "w_odd")} \
        == {"w_up": False, "w_gate": False, "w_down": False, "w_odd": True}
    assert "einsum" not in out.code and out.code.count(".weight") == 1
    s = summary(out, (x,))
    # baddbmm ran on w_odd's product, and forming the product (full rank 32) is work too
    assert s.flops.left_dense == 2 * 3 * 7 * 32 * 32 + 2 * 3 * 32 * 32 * 32
    low = transform(model, InRankConfig(init_rank=4, buffer=0, min_features=1))
    assert low.w_up.U.shape == (3, 32, 4)  # the parameter's layout: E x in(32) x out(48)
    loss = low(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in low.parameters())
    assert rel_err(inrank_fx.freeze(low)(x), low(x)) < 1e-5


class RoutedExperts(nn.Module):
    """Experts run in a loop over the experts that tokens were routed to, as transformers'
    MixtralExperts: data-dependent control flow, so fx cannot trace the forward."""

    def __init__(self, dim=32, hidden=48, experts=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, hidden, dim) / dim ** 0.5)
        self.table = nn.Parameter(torch.randn(experts, hidden, 1))  # indexed, never multiplied
        self.router = nn.Linear(dim, experts)

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = x.new_zeros(x.shape[0], self.w.shape[1])
        for e in choice.unique():  # data-dependent: fx cannot trace this
            rows = choice == e
            out[rows] = F.linear(x[rows], self.w[e]) + self.table[e].T
        return out


def test_experts_in_a_loop_fx_cannot_trace_are_factored_and_read_as_the_stack(rel_err):
    torch.manual_seed(0)
    model, x = RoutedExperts(), torch.randn(12, 32)
    out = transform(model, InRankConfig(init_rank=1.0, buffer=0, min_features=1))
    assert type(out) is RoutedExperts  # still the model's own class and forward
    assert out.w.shape == (4, 48, 32) and out.w[1].shape == (48, 32)  # read as the stack was
    assert out._modules["w"].product_reads  # the loop's matmuls run on the product
    assert set(ranks(out)) == {"w", "router"}  # the table is indexed but never multiplied
    assert rel_err(out(x), model(x)) < 1e-5
    low = transform(model, InRankConfig(init_rank=4, buffer=2, min_features=1, warmup_steps=0,
                                        check_every=1, measure="update", threshold=0.999,
                                        stop_after=None))
    opt = torch.optim.AdamW(low.parameters(), lr=1e-3)
    inrank_fx.attach(low, opt)
    low(x).square().mean().backward()
    opt.step()
    assert ranks(low)["w"] > 4  # the stack's factors trained and grew
    frozen = inrank_fx.freeze(low)
    with torch.no_grad():
        assert rel_err(frozen(x), low(x)) < 1e-5
