"""benchmarks/bench_slim.py: slim models against the dense-width frontier, end to end (quick)."""
import json

import pytest


@pytest.fixture(scope="module")
def bench(load_example):
    return load_example("bench_slim", "benchmarks")


def test_quick_protocol_compares_every_method_with_the_frontier_at_equal_parameters(
        bench, tmp_path, capsys):
    path = tmp_path / "slim.json"
    result = bench.main(["--quick", "--json", str(path), "--plot", str(tmp_path / "slim.png")])
    methods = {r["method"] for r in result["slim"]}
    assert methods == set(bench.METHODS) | {"factor-at-30"}
    # every method at uniform's parameter count, within the budget
    fractions = {round(r["fraction"], 3) for r in result["slim"] if r["fraction"] is not None}
    assert len(fractions) == 1 and fractions.pop() <= bench.QUICK.budget
    shipped = [r["params"] for r in result["slim"]
               if r["method"] not in ("global-act-adapt", "slice")]
    assert max(shipped) <= 1.02 * min(shipped)  # equal up to the ranks' and units' rounding
    sliced = next(r for r in result["slim"] if r["method"] == "slice")
    assert 0.9 * min(shipped) <= sliced["params"] <= max(shipped)  # at most as many
    for r in result["slim"]:
        assert r["val"] < 6 and r["before"] < 6 and r["params"] < result["teachers"][0]["params"]
    out = capsys.readouterr().out
    assert "vs narrower dense" in out and "dense 32 from scratch" in out and "factor-at-30" in out
    # factored during training: dense FLOPs up to step 30, factored ones after: fewer in all
    during = next(r for r in result["slim"] if r["method"] == "factor-at-30")
    assert during["flops"] < result["teachers"][0]["flops"]
    assert (tmp_path / "slim.png").read_bytes()[:4] == b"\x89PNG"
    # the runs are kept and read back: a second call trains nothing
    saved = json.loads(path.read_text())
    assert len(saved["runs"]) >= 4 + len(bench.QUICK.widths)
    logged = []
    slim = bench.QUICK
    again = bench.run(slim, [0], bench.Bench(slim, None, str(path), log=logged.append))
    assert again["slim"] == result["slim"] and logged == [f"resuming: {len(saved['runs'])} runs "
                                                          f"read from {path}"]


def test_the_gap_is_read_from_the_frontier_of_the_same_seed(bench):
    result = {"frontier": [{"seed": 0, "params": 100, "val": 2.0},
                           {"seed": 0, "params": 400, "val": 1.0},
                           {"seed": 1, "params": 100, "val": 9.0}]}
    gap = bench.gap_to
    assert gap(result["frontier"], {"seed": 0, "params": 200, "val": 1.4}) == pytest.approx(-0.1)
    assert gap(result["frontier"], {"seed": 0, "params": 800, "val": 1.4}) is None  # outside
    assert gap(result["frontier"], {"seed": 1, "params": 100, "val": 9.5}) is None  # one point
    flops = [{"seed": 0, "flops": 10, "val": 2.0}, {"seed": 0, "flops": 40, "val": 1.0}]
    assert gap(flops, {"seed": 0, "flops": 20, "val": 1.0}, "flops") == pytest.approx(-0.5)


def test_width_pruning_keeps_the_largest_heads_and_units_and_cuts_to_the_fraction(bench):
    import torch

    from inrank_fx.demo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        gpt.transformer.h[0].attn.c_attn.weight.view(3, 4, 8, 32)[:, 2] *= 10  # head 2 matters
        assert torch.allclose(bench.prune_width(gpt, 1.0)(x), gpt(x), atol=1e-5)  # all kept
    half = bench.prune_width(gpt, 0.5)

    def linear_params(model):
        return sum(p.numel() for b in model.transformer.h
                   for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
                   for p in m.parameters())

    assert 0.48 <= linear_params(half) / linear_params(gpt) <= 0.5
    attn = half.transformer.h[0].attn
    assert attn.n_head == 2 and attn.c_attn.out_features == 3 * 2 * 8
    kept = attn.c_attn.weight.view(3, 2, 8, 32)
    assert any(torch.equal(kept[:, i], gpt.transformer.h[0].attn.c_attn.weight.view(3, 4, 8, 32)[:, 2])
               for i in range(2))
    assert half(x).shape == gpt(x).shape and torch.isfinite(half(x)).all()


def test_slicing_at_full_width_is_the_teacher_and_narrower_is_smaller(bench):
    import torch

    from inrank_fx.demo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32))
    with torch.no_grad():  # LayerNorms with a scale and shift of their own, as trained ones have
        for m in gpt.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randint(0, 256, (3, 16))
    rotation = bench.stream_rotation(gpt, [x])
    assert torch.allclose(rotation.T @ rotation, torch.eye(32, dtype=rotation.dtype), atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(bench.slice_gpt(gpt, rotation, 32)(x), gpt(x), atol=1e-5)
        half = bench.slice_gpt(gpt, rotation, 16)
        assert half.transformer.wte.weight.shape == (256, 16) and torch.isfinite(half(x)).all()
    target = sum(p.numel() for p in half.parameters())
    assert sum(p.numel() for p in bench.slice_to(gpt, [x], target).parameters()) == target
