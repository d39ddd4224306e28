"""benchmarks/bench_convergence.py: every arm gets its own tuned learning rate, the frontier is
read correctly, and the quick protocol runs end to end."""
import math

import pytest


@pytest.fixture(scope="module")
def bench(load_example):
    return load_example("bench_convergence", "benchmarks")


def _arm(bench, lrs):
    return bench.Arm("a", "dense", lrs=lrs)


def test_tune_picks_the_lowest_loss_and_extends_past_a_winning_edge(bench):
    calls = []

    def valley(best):
        def loss(lr):
            calls.append(lr)
            return (math.log2(lr) - math.log2(best)) ** 2
        return loss

    assert bench.tune(_arm(bench, (1e-3, 2e-3, 4e-3)), valley(2e-3))[0] == 2e-3
    assert sorted(calls) == [1e-3, 2e-3, 4e-3]  # an interior optimum needs no extension
    calls.clear()
    lr, sweep = bench.tune(_arm(bench, (1e-3, 2e-3, 4e-3)), valley(8e-3))
    assert lr == 8e-3 and sorted(sweep) == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    lr, sweep = bench.tune(_arm(bench, (1e-3, 2e-3, 4e-3)), valley(1e-4))
    assert lr == 2.5e-4 and min(sweep) == 2.5e-4  # at most two extensions
    # a diverged run never wins, and all diverged is an error
    lr, _ = bench.tune(_arm(bench, (1e-3, 2e-3, 4e-3)), lambda lr: math.nan if lr > 1e-3 else 3.0)
    assert lr == 1e-3
    with pytest.raises(RuntimeError, match="every learning rate diverged"):
        bench.tune(_arm(bench, (1e-3, 2e-3)), lambda lr: math.inf)


def test_frontier_interpolates_in_log_parameters(bench):
    points = [(100, 3.0), (400, 2.0)]
    assert bench.frontier_loss(points, 200) == pytest.approx(2.5)
    assert bench.frontier_loss(points, 100) == pytest.approx(3.0)
    assert bench.frontier_loss(points, 50) is None and bench.frontier_loss(points, 800) is None


def test_quick_protocol_tunes_each_arm_on_its_own(bench, tmp_path):
    protocol = bench.replace(bench.QUICK, steps=24, evals=2, corpus_bytes=100_000)
    data = bench.split(bench.stdlib_corpus(protocol.corpus_bytes))
    path = tmp_path / "runs.json"
    runs = bench.Runs(protocol, data, str(path), log=lambda *_: None)
    arms = [bench.ARMS[a] for a in ("dense", "fixed-1/8", "fixed-1/2")] + [
        bench.Arm("inrank", "inrank", dict(warmup_steps=4, check_every=4, stop_after=None)),
        bench.Arm("at-inrank", "fixed-at", ranks_of="inrank")]
    result = bench.run_protocol(arms, [0, 1], runs)
    for arm in arms:
        sweep = result["sweeps"][arm.name]
        assert set(arm.lrs) <= set(sweep) and len(sweep) >= 3
        assert result["chosen"][arm.name] == min(sweep, key=sweep.get)
        # the sweep's losses are those of real runs at those rates, and the second seed ran at
        # the chosen rate
        assert all(runs.runs[(arm.name, lr, 0)]["val"] == sweep[lr] for lr in sweep)
        seed1 = [r for r in result["runs"] if r["arm"] == arm.name and r["seed"] == 1]
        assert [r["lr"] for r in seed1] == [result["chosen"][arm.name]]
    # the arms are what they say: fixed ranks as asked, InRank's ranks measured
    by_arm = {r["arm"]: r for r in result["runs"] if r["seed"] == 0}
    assert by_arm["fixed-1/8"]["rank_fraction"] == pytest.approx(1 / 8)
    assert by_arm["fixed-1/2"]["params"] > by_arm["fixed-1/8"]["params"]
    assert by_arm["dense"]["flops"] > by_arm["fixed-1/2"]["flops"] > by_arm["fixed-1/8"]["flops"]
    assert by_arm["inrank"]["rank_events"] > 0
    # InRank's allocation without its growth: each seed's final ranks, fixed from the start
    for seed in (0, 1):
        source = runs.runs[("inrank", result["chosen"]["inrank"], seed)]
        fixed_at = runs.runs[("at-inrank", result["chosen"]["at-inrank"], seed)]
        assert fixed_at["ranks"] == source["ranks"] and fixed_at["rank_events"] == 0
    assert len({tuple(runs.runs[("inrank", result["chosen"]["inrank"], s)]["ranks"].values())
                for s in (0, 1)}) == 2  # (the seeds measured different ranks: a real check)
    text = bench.report(result)
    assert "inrank" in text and "order over the second half" in text
    assert "vs frontier over the seeds" in text
    # resuming reads every run back instead of training again
    again = bench.Runs(protocol, data, str(path), log=lambda *_: None)
    assert set(again.runs) == set(runs.runs)
    # a finished run's file redraws the same table and the figure
    runs.save({"chosen": result["chosen"],
               "sweeps": {a: {str(lr): v for lr, v in s.items()} for a, s in result["sweeps"].items()}})
    assert bench.report(bench.load_result(str(path))) == text
    bench.plot(result, str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
