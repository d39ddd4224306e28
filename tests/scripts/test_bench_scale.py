"""benchmarks/bench_scale.py --quick: every phase runs in its own process and is reported."""
import json


def test_quick_scale_bench_measures_every_phase(load_example, tmp_path, capsys):
    bench = load_example("bench_scale", "benchmarks")
    out = tmp_path / "scale.json"
    assert bench.main(["--quick", "--steps", "2", "--json", str(out), "--timeout", "300"]) == 0
    results = json.loads(out.read_text())
    assert [r["phase"] for r in results] == list(bench.PHASES)
    assert bench.median_of([{"a_s": 1.0, "b_mb": 5}, {"a_s": 3.0, "b_mb": 2}, {"a_s": 2.0, "b_mb": 1}]) \
        == {"a_s": 2.0, "a_s_all": [1.0, 3.0, 2.0], "b_mb": 5, "runs": 3}
    by = {r["phase"]: r for r in results}
    assert by["transform copy"]["transform_s"] > 0 and by["meta"]["materialize_s"] > 0
    assert by["train inrank"]["step_s"] > 0 and by["train dense"]["step_s"] > 0
    assert all(r["peak_mb"] >= r["baseline_mb"] > 0 for r in results)
    table = capsys.readouterr().out
    assert "tiny" in table and "materialize" in table and "failed" not in table
