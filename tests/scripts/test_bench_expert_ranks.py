"""benchmarks/bench_expert_ranks.py at a toy length: a mixture-of-experts GPT transformed with
the defaults runs every expert matmul thin, trains, and each stack's per-expert ranks and the
two schemes' parameters and times are reported."""
import json


def test_expert_ranks_are_measured_per_expert_and_per_stack(load_example, tmp_path, capsys):
    bench = load_example("bench_expert_ranks", "benchmarks")
    out = tmp_path / "ranks.json"
    assert bench.main(["--steps", "30", "--seeds", "0", "--corpus-bytes", "200000",
                       "--stop-after", "25", "--experts", "4", "8", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert len(rows) == 8  # two stacks in each of 4 blocks
    for row in rows:
        assert len(row["experts"]) == 4 and row["stack_rank"] >= max(row["experts"]) >= 1
        assert 0 < row["params_per_expert_over_stack"] <= 1
        assert row["seconds"]["stack"] > 0 and row["seconds"]["per_expert"] > 0
    run = record["runs"][0]
    assert run["stop_step"] == 25  # after the stop a stack's width is its rank: no expert above
    assert run["checks"] and all(c["stacks"] for c in run["checks"])
    assert "per-expert ranks would hold" in capsys.readouterr().out
    assert [r["experts"] for r in record["scaling"]] == [4, 8]
    both = record["runs"][0], record["per_expert_runs"][0]
    assert all(r["stop_step"] == 25 and r["val_loss"] > 0 for r in both)
    assert all(r["stack_params"] > 0 for r in both)
    assert all(len(ranks) == 4 for ranks in both[1]["final"].values())  # one rank per expert
    assert all(r["time_per_expert_over_stack"] > 0 for r in record["scaling"])


def test_each_experts_own_rank_is_read_from_its_own_spectrum(load_example):
    import torch

    import inrank_fx

    bench = load_example("bench_expert_ranks", "benchmarks")
    g = torch.Generator().manual_seed(0)
    # expert e has exact rank e + 1; the stack holds them at width 6 (rank 4 plus a buffer)
    stack = torch.stack([torch.randn(24, e + 1, generator=g) @ torch.randn(e + 1, 16, generator=g)
                         for e in range(4)])
    layer = inrank_fx.nn.InRankExperts.from_stack(stack, 4, buffer=2)
    model = torch.nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = inrank_fx.attach(model, opt, inrank_fx.InRankConfig(min_features=1))
    assert bench.expert_ranks(ctrl, layer) == [1, 2, 3, 4]
    ctrl.detach()
