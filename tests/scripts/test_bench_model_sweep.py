"""benchmarks/bench_model_sweep.py on seven small models: every column is measured and reported,
including the two that found bugs (EdgeNeXt reads a frozen conv's .weight; Mixtral's experts
run in a loop fx cannot trace) and T5, which only the TorchScript exporter translates. With
tests/passes/test_zoo.py's eight, 13 of the sweep's models run in CI."""
import json

import pytest


def test_sweep_reports_every_column(load_example, tmp_path, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    bench = load_example("bench_model_sweep", "benchmarks")
    out = tmp_path / "sweep.json"
    assert bench.main(["--models", "mobilenet_v3_small", "gpt2", "edgenext_xx_small", "mixtral",
                       "llama", "bart", "t5", "--json", str(out),
                       "--markdown", str(tmp_path / "sweep.md"), "--timeout", "300"]) == 0
    records = {r["model"]: r for r in json.loads(out.read_text())}
    gpt2 = records["gpt2"]
    assert gpt2["parity"] < 1e-5 and gpt2["coverage"] > 0.9 and gpt2["freeze"] < 1e-4
    assert gpt2["train"].startswith("ok") and gpt2["onnx"] < 1e-4
    assert records["mobilenet_v3_small"]["parity"] < 1e-5
    assert records["edgenext_xx_small"]["freeze"] < 1e-4
    mixtral = records["mixtral"]
    assert mixtral["factored"].endswith("/ 0 dense") and mixtral["parity"] < 1e-5
    assert mixtral["train"].startswith("ok") and mixtral["freeze"] < 1e-4
    assert mixtral["export"] == "ok"  # factored and frozen experts go through torch.export
    assert gpt2["export"] == "ok" and records["llama"]["export"] == "ok"
    for name in ("llama", "bart", "t5"):
        record = records[name]
        assert record["parity"] < 1e-5 and record["freeze"] < 1e-4 and record["onnx"] < 1e-4
        assert record["train"].startswith("ok")
    assert records["llama"]["coverage"] > 0.9 and records["t5"]["onnx_exporter"] in (
        "dynamo", "torchscript")
    assert "| gpt2 | transformers |" in (tmp_path / "sweep.md").read_text()
    assert "mobilenet_v3_small" in capsys.readouterr().out
