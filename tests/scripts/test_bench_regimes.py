"""benchmarks/bench_regimes.py: InRank from scratch read against the dense-width frontier, end to
end on the quick setting, and the pieces that decide what is compared with what."""
import json
import re
import statistics

import pytest


@pytest.fixture(scope="module")
def bench(load_example):
    return load_example("bench_regimes", "benchmarks")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """The quick benchmark, every part, two seeds (about 20 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("regimes")
    results = bench.main(["--quick", "--seeds", "0", "1", "--json-dir", str(folder),
                          "--plot", str(folder / "regimes.png")])
    return results, folder


def test_sweeps_move_with_width_by_powers_of_two(bench):
    assert bench.width_scaled((2e-3, 4e-3), 128, 128) == (2e-3, 4e-3)
    assert bench.width_scaled((2e-3, 4e-3), 64, 128) == (4e-3, 8e-3)
    assert bench.width_scaled((2e-3, 4e-3), 256, 128) == (1e-3, 2e-3)
    assert bench.width_scaled((2e-3,), 96, 128) == (2e-3,)  # 4/3: the nearest power is 1
    arm = bench.at_width(bench.ARMS["defaults"], 256, 128)
    assert arm.name == "defaults-w256" and arm.width == 256 and arm.config == {}
    # dense at the reference width is bench_convergence's own arm (its runs are shared)
    assert bench.dense_at(128, 128, (4e-3,)).name == "dense"
    narrow = bench.dense_at(64, 128, (4e-3,))
    assert (narrow.name, narrow.width, narrow.lrs) == ("dense-w64", 64, (8e-3,))


def test_regularised_arms_train_with_what_their_name_says(bench):
    from bench_convergence import QUICK, build

    dense = bench.Arm("dense-w32", "dense", width=32)
    dropped = bench.regularised(dense, "dropout", 0.2)
    decayed = bench.regularised(dense, "weight_decay", 1.0)
    assert dropped.name == "dense-w32 do0.2" and decayed.name == "dense-w32 wd1"
    model = build(dropped, QUICK, 0)
    assert model.config.n_embd == 32 and model.config.dropout == 0.2
    assert decayed.weight_decay == 1.0 and build(decayed, QUICK, 0).config.dropout == 0.0


def test_every_part_reads_each_arm_against_the_narrower_dense_model(bench, quick):
    results, folder = quick
    assert set(results) == set(bench.PARTS)
    frontier = results["frontier"]["frontier"]
    assert {r["width"] for r in frontier} == set(bench.QUICK.widths)
    assert {r["seed"] for r in frontier} == {0, 1}
    # the frontier passes through its own points, and the arms' gaps are their loss minus it
    for r in frontier:
        assert bench.gap_to(frontier, r) == pytest.approx(0.0, abs=1e-12)
    defaults = results["frontier"]["arms"]["defaults"]
    widths = {r["width"]: r for r in frontier if r["seed"] == 0}
    r = next(r for r in defaults if r["seed"] == 0)
    lo, hi = max(w for w in widths if widths[w]["params"] <= r["params"]), \
        min(w for w in widths if widths[w]["params"] >= r["params"])
    assert widths[lo]["params"] <= r["params"] <= widths[hi]["params"]
    text = "\n".join(results["frontier"]["text"])
    assert "vs narrower dense" in text and "at equal FLOPs" in text and "dense 32" in text
    assert (folder / "regimes.png").read_bytes()[:4] == b"\x89PNG"


def test_data_limited_reads_every_arm_at_its_best_checkpoint(bench, quick):
    results, _ = quick
    part = results["data-limited"]
    runs = part["frontier"] + part["plain"] + [r for rs in part["arms"].values() for r in rs]
    for r in runs:
        best_step, best = min(r["curve"], key=lambda p: p[1])
        assert r["val"] == best <= r["val_end"] and r["best_step"] == best_step
        assert r["curve"][-1][1] == r["val_end"]
    # the regulariser was chosen on the first seed: the variant run is the better of the two
    saved = json.loads((quick[1] / "quick-regimes-data-limited-20k.json").read_text())
    by_key = {(r["arm"], r["lr"], r["seed"]): r for r in saved["runs"]}
    for name, variant in saved["variants"].items():
        lr = saved["chosen"][name]
        best = lambda key: min(v for _, v in by_key[(key, lr, 0)]["curve"])  # noqa: E731
        plain, tried = best(name), [best(k) for (k, l, s) in by_key
                                    if k.startswith(name + " ") and l == lr and s == 0]
        if name.startswith("dense"):
            assert tried, f"{name}: no regulariser was tried"
        assert best(variant) == min([plain, *tried])
    assert "best validation checkpoint" in "\n".join(part["text"])


def test_lr_grid_and_width_parts_compare_at_equal_parameters(bench, quick):
    results, _ = quick
    rows = results["lr-grid"]["rows"]
    assert [row["lr"] for row in rows] == list(bench.QUICK.lr_grid)
    width_rows = {row["width"]: row for row in results["width"]["rows"]}
    assert set(width_rows) == {*bench.QUICK.trend, bench.QUICK.protocol.gpt.n_embd}
    for row in width_rows.values():
        assert len(row["defaults_vs_dense"]) == 2 and 0 < row["params"] < 1


def test_a_second_call_reads_the_runs_back_and_trains_nothing(bench, quick, capsys):
    _, folder = quick
    before = {p.name: p.read_text() for p in folder.glob("*.json")}
    capsys.readouterr()
    again = bench.main(["--quick", "--seeds", "0", "1", "--json-dir", str(folder)])
    out = capsys.readouterr().out
    assert not re.search(r"seed \d+ +val .* s$", out, re.M)  # no run was trained (and logged)
    assert "resuming" in out
    assert statistics.mean(r["val"] for r in again["frontier"]["frontier"]) > 0
    assert {p.name: p.read_text() for p in folder.glob("*.json")} == before


def test_a_run_of_another_protocol_is_not_taken_as_a_start(bench, tmp_path):
    source = tmp_path / "convergence.json"
    source.write_text(json.dumps({"protocol": {"steps": 1}, "runs": []}))
    target = tmp_path / "regimes.json"
    bench.seeded_from(str(target), str(source), bench.Setting().protocol, log=lambda *_: None)
    assert not target.exists()
    source.write_text(json.dumps({"protocol": bench._asdict(bench.Setting().protocol),
                                  "runs": []}))
    bench.seeded_from(str(target), str(source), bench.Setting().protocol, log=lambda *_: None)
    assert target.exists()


def test_the_width_part_can_run_the_defaults_alone(bench, quick, capsys):
    """--width-arms defaults: the fixed ranks at the other widths are not run, and say so."""
    _, folder = quick
    capsys.readouterr()
    results = bench.main(["--quick", "--parts", "width", "--widths", "48", "--width-arms",
                          "defaults", "--seeds", "0", "1", "--json-dir", str(folder)])
    rows = {row["width"]: row for row in results["width"]["rows"]}
    assert rows[48]["fixed-1/4_vs_dense"] == [] and rows[48]["defaults_vs_fixed"] == []
    assert len(rows[48]["defaults_vs_dense"]) == 2
    assert len(rows[64]["fixed-1/4_vs_dense"]) == 2  # the protocol's width: from the frontier
    line = next(l for l in results["width"]["text"] if l.strip().startswith("48"))
    assert "not run" in line
    assert "defaults-w48" in capsys.readouterr().out  # it trained the defaults at 48


def test_the_closing_part_trains_each_lever_at_the_defaults_rate(bench, quick):
    from bench_convergence import QUICK, _param_groups, build

    import inrank_fx

    results, _ = quick
    arms = results["closing"]["arms"]
    assert set(arms) == {"defaults", "defaults, factors x0.5 lr", "defaults, factors x2 lr",
                         "defaults, U x2 lr", "defaults, U x4 lr",
                         "defaults, growth from gradient", "silu-α0.9"}
    assert all(len(rs) == 2 and rs[0]["lr"] == arms["defaults"][0]["lr"] for rs in arms.values())
    # the gradient lever seeded the components its checks added
    assert all(r["seeded_from_gradient"] > 0 for r in arms["defaults, growth from gradient"])
    model = build(bench.ARMS["defaults"], QUICK, 0)
    rest, vs, us = _param_groups(model, 1e-3, 2.0)
    assert vs["lr"] == us["lr"] == 2e-3 and "lr" not in rest
    layers = [m for m in model.modules() if isinstance(m, inrank_fx.InRankLinear)]
    assert [id(p) for p in vs["params"]] == [id(m.V) for m in layers]
    assert [id(p) for p in us["params"]] == [id(m.U) for m in layers]
    assert len(rest["params"]) + len(layers) * 2 == len(list(model.parameters()))
    _, vs, us = _param_groups(model, 1e-3, 1.0, u_lr=4.0)
    assert "lr" in vs and vs["lr"] == 1e-3 and us["lr"] == 4e-3
    assert len(_param_groups(model, 1e-3, 1.0)) == 1


def test_the_width_trend_is_a_least_squares_line_in_log_width(bench, quick):
    rows = [{"width": 64, "g": [0.3, 0.2]}, {"width": 128, "g": [0.2, 0.1]},
            {"width": 256, "g": [0.1, None]}]
    t = bench.trend(rows, "g")
    # by hand: x = log2 width = 6 6 7 7 8, mean 6.8; y mean 0.18; Sxy = -0.22, Sxx = 2.8
    slope = -0.22 / 2.8
    intercept = 0.18 - slope * 6.8
    residual = sum((y - intercept - slope * x) ** 2
                   for x, y in [(6, .3), (6, .2), (7, .2), (7, .1), (8, .1)])
    assert t["points"] == 5 and t["slope"] == pytest.approx(slope)
    assert t["se"] == pytest.approx((residual / 3 / 2.8) ** 0.5)
    assert t["zero_width"] == pytest.approx(2 ** (-intercept / slope))
    assert bench.trend([{"width": 64, "g": [0.1, 0.2]}], "g") is None  # one width: no line
    rising = bench.trend([{"width": 64, "g": [0.1, 0.1]}, {"width": 128, "g": [0.2, 0.3]}], "g")
    assert rising["zero_width"] is None and rising["slope"] > 0
    results, _ = quick
    assert set(results["width"]["trends"]) == {"defaults_vs_dense", "fixed-1/4_vs_dense",
                                               "fixed-1/2_vs_dense"}
    assert any("per doubling" in line for line in results["width"]["text"])
