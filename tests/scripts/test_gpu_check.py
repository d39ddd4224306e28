"""benchmarks/gpu_check.py keeps working before a GPU is lent: `--cpu --tiny` runs every
section's code at toy sizes and writes the JSON with every section; without CUDA and without
--cpu it stops at once, saying why."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_cpu_tiny_writes_every_section(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu, tiny" and report["device"]["torch"] == torch.__version__
    checks = {c["name"]: c for c in report["correctness"]}
    assert set(checks) == {"layer parity fp32", "layer parity bf16",
                           "rank changes under torch.compile", "freeze parity",
                           "optimizer state across a resize"}
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["rank changes under torch.compile"]["compiled_graphs"] >= 2  # it recompiled
    training = report["training"]
    assert training["dense"]["tokens_per_s"] > 0
    inrank = training["inrank"]
    assert inrank["stop_step"] == report["sizes"]["stop_after"] and inrank["rank_events"]
    assert all(e["recompiles_next_step"] <= 1 for e in inrank["rank_events"])
    assert 0 < training["ratios"]["params_vs_dense"] < 1
    runs = report["inference"]["runs"]
    assert [r["batch"] for r in runs] == sorted(report["sizes"]["inference_batches"], reverse=True)
    assert all("amdahl_ceiling" in r for r in runs)
    assert all(r["flop_ideal"] > 1 and r["latency_s"]["frozen"] > 0 for r in runs)
    width = report["width"]  # the width trend: dense of three widths and the defaults, two seeds
    assert {(r["arm"], r["seed"]) for r in width["runs"]} == {
        (arm, seed) for arm in ("dense-w64", "defaults-w64", "dense-w32", "dense-w48")
        for seed in (0, 1)}
    assert [(g["arm"], g["seed"]) for g in width["gaps"]] == [("defaults-w64", 0),
                                                             ("defaults-w64", 1)]
    assert all(isinstance(g["vs_narrower_dense"], float) for g in width["gaps"])
    skipped = {s["what"]: s["why"] for s in report["skipped"]}
    assert {"TensorRT", "onnxruntime-gpu"} <= set(skipped)
    assert "CUDA graphs need a CUDA device" in \
        skipped["inference with CUDA graphs (mode='reduce-overhead')"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| dense |" in table and "| defaults-w64 | 64 | 1 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_stops_at_once_and_says_why(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--cpu --tiny" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
