"""benchmarks/bench_shipped.py: dense and slim ONNX files, float32 and int8, side by side."""
import pytest

pytest.importorskip("onnxruntime")


def test_quick_run_measures_four_files_that_onnx_runtime_runs(load_example, tmp_path, capsys):
    bench = load_example("bench_shipped", "benchmarks")
    result = bench.main(["--quick", "--json", str(tmp_path / "shipped.json")])
    models = result["models"]
    assert set(models) == {"dense", "dense int8", "slim", "slim int8"}
    # int8 weights: smaller files; the slim model: smaller still
    assert models["dense int8"]["file_bytes"] < 0.6 * models["dense"]["file_bytes"]
    assert models["slim"]["file_bytes"] < models["dense"]["file_bytes"]
    assert models["slim int8"]["file_bytes"] < models["slim"]["file_bytes"]
    for m in models.values():  # every file runs and scores like a language model
        assert 0 < m["val_loss"] < 6 and m["batch 8"]["median_ms"] > 0
    assert abs(models["dense int8"]["val_loss"] - models["dense"]["val_loss"]) < 0.2
    assert models["dense"]["batch 1"]["ratio_to_dense"] == 1.0
    assert "slim int8" in capsys.readouterr().out and (tmp_path / "shipped.json").exists()
