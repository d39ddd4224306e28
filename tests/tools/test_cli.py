import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import inrank_fx
from inrank_fx.tools import bench
from inrank_fx.cli import main
from inrank_fx.demo import job
from inrank_fx.demo.gpt import GPTConfig

pytest.importorskip("onnxruntime")

TINY = job.DemoSettings(
    gpt=GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), batch_size=4, steps=12,
    warmup=2, stop_after=6, check_every=3, eval_every=6, eval_batches=2, dense_lr=3e-3,
    inrank_lr=3e-3, corpus_bytes=100_000, finetune_steps=3,
)
REPORT_FILES = {"results.json", "ranks.csv", "summary.txt", "model.onnx", "loss_curves.png",
                "rank_trajectories.png", "inference.png", "dense.pt", "slim.onnx"}


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    results = job.run_demo(out, settings=TINY, compile=False, progress=False,
                           backends=("eager", "onnxruntime"), log=lambda *a: None)
    return out, results


def test_demo_writes_the_report(demo_report):
    out, results = demo_report
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    saved = json.loads((out / "results.json").read_text())
    returned = json.loads(json.dumps(results.to_json()))  # what run_demo returned, typed
    assert set(saved) == set(returned) and saved["ratios"] == returned["ratios"]
    assert results.slim.params < results.narrow.params <= results.dense.params
    assert results.inrank.final_ranks == saved["inrank"]["final_ranks"]
    for key in ("val_loss", "val_ppl", "params", "train_seconds", "tokens_per_second", "val_curve"):
        assert key in saved["dense"] and key in saved["inrank"]
    assert saved["inrank"]["params"] < saved["dense"]["params"]
    # what ships smaller: compressed to the budget, against a dense model of at least its size
    slim, narrow = saved["slim"], saved["narrow"]
    assert slim["fraction"] <= 0.4 and slim["params"] < saved["dense"]["params"]
    assert narrow["params"] >= slim["params"] and narrow["steps"] == TINY.steps + 3
    assert narrow["width"] < TINY.gpt.n_embd and slim["onnx"]["max_rel_error"] <= 1e-4
    assert "dense compressed to 0.4 + fine-tune" in (out / "summary.txt").read_text()
    assert set(saved["inrank"]["final_ranks"]) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                   "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert saved["onnx"]["batch_sizes"] == [1, 3] and saved["onnx"]["max_rel_error"] <= 1e-4
    backends = {(r["backend"], r["model"]): r["status"] for r in saved["inference"]["records"]}
    assert backends == {("eager", "dense"): "ok", ("eager", "factored"): "ok",
                        ("onnxruntime", "dense"): "ok", ("onnxruntime", "factored"): "ok"}
    assert (out / "ranks.csv").read_text().startswith("step,layer,event,rank,width,explained")
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    low, high = saved["ratios"]["steady_step_interval"]
    assert low <= saved["ratios"]["steady_step_seconds"] <= high
    assert "bootstrap interval" in (out / "summary.txt").read_text()
    assert 0 < saved["ratios"]["step_flops"] < 1  # InRank's step at its final ranks is cheaper
    assert any("above the FLOP-ideal" in f for f in saved["ratios"]["flags"]) == \
        (saved["ratios"]["steady_step_seconds"] < saved["ratios"]["step_flops"])
    # a second run replaces the report
    job.run_demo(out, settings=TINY, compile=False, progress=False, backends=("eager",), log=lambda *a: None)
    assert [p.name for p in out.parent.iterdir()] == ["report"]


def test_ctrl_c_leaves_no_report(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "train_steps", interrupted)
    monkeypatch.setattr(job, "settings_for", lambda quick, steps: TINY)
    assert main(["demo", "--out", str(tmp_path / "report")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--data", "{tmp}/missing.txt"], "--data {tmp}/missing.txt: no such file"),
        (["demo", "--data", "{tmp}/empty.txt"], "--data {tmp}/empty.txt: empty"),
        (["demo", "--out", "{tmp}/no/such/report"], "--out {tmp}/no/such/report: folder"),
        (["demo", "--device", "cuda:banana"], "--device 'cuda:banana'"),
        (["bench", "--shape", "1024by4096"], "--shape '1024by4096': expected INxOUT"),
        (["bench", "--shape", "64x32", "--rank", "40"], "--rank 40: must be in [1, 32]"),
        (["bench", "--model", "nosuchpkg.models:net", "--input", "1x3"], "cannot import 'nosuchpkg.models'"),
        (["bench", "--model", "torch.nn:Linear", "--input", "1x3"], "calling Linear() failed"),
        (["bench", "--backends", "eager,tpu"], "--backends 'eager,tpu'"),
        (["summary", "--model", "torchvision.models"], "expected 'gpt' or 'package.module:function'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_bad_input_from_the_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "inrank_fx", "demo", "--data", str(tmp_path / "x.txt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"inrank-fx demo: error: --data {tmp_path / 'x.txt'}: no such file"]


def test_bench_compare_records(tmp_path):
    dense = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    factored = inrank_fx.transform(dense, inrank_fx.InRankConfig(init="svd", init_rank=8, buffer=0))
    result = bench.compare(dense, factored, (torch.randn(32, 64),), backends=("eager", "onnxruntime", "tensorrt"),
                           iters=3)
    ok = result.get("factored", "eager")
    assert ok.status == "ok" and ok.latency_median_ms > 0 and ok.throughput > 0
    assert ok.params < result.get("dense", "eager").params
    assert ok.flop_ideal_speedup == pytest.approx(result.get("dense", "eager").flops / ok.flops)
    assert ok.flop_ideal_speedup > 3 and ok.speedup is not None
    assert result.get("factored", "onnxruntime").artifact_bytes < result.get("dense", "onnxruntime").artifact_bytes
    trt = result.get("factored", "tensorrt")
    if trt.status == "skipped":
        assert "CUDA" in trt.reason or "torch-tensorrt" in trt.reason
    train = bench.compare(dense, factored, (torch.randn(32, 64),), backends=("eager", "onnxruntime"),
                          train=True, iters=3)
    assert train.get("factored", "onnxruntime").reason == "inference-only backend"
    assert train.get("factored", "eager").status == "ok"
    data = json.loads(result.to_json(tmp_path / "b.json").read_text())
    assert len(data["records"]) == 6 and data["meta"]["mode"] == "inference"
    assert result.plot(tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in result.table()
    for r in (ok, result.get("factored", "onnxruntime")):  # interval and deciles bracket
        low, high = r.speedup_interval
        assert low <= r.speedup <= high
        assert r.latency_p10_ms <= r.latency_median_ms <= r.latency_p90_ms
        assert any("above the FLOP-ideal" in f for f in r.flags) == (r.speedup > r.flop_ideal_speedup)


def test_timing_intervals_and_flags():
    from inrank_fx._timing import format_rate, median_ratio_interval, ratio_flags

    steady, noisy = [1.0, 1.01, 0.99, 1.0, 1.02] * 4, [0.5, 2.0, 0.6, 1.9, 0.4] * 4
    low, high = median_ratio_interval([2 * t for t in steady], steady)
    assert 1.9 < low <= 2.0 <= high < 2.1
    assert ratio_flags(2.0, (low, high), ideal=4.0) == []
    assert "above the FLOP-ideal" in ratio_flags(5.0, (4.9, 5.1), ideal=4.0)[0]
    wide = median_ratio_interval(noisy, steady)
    assert wide[1] / wide[0] > 1.25 and "wide" in ratio_flags(1.0, wide)[0]
    assert [format_rate(x) for x in (123456.7, 56.71, 0.01234)] == ["123,457", "56.7", "0.0123"]


def test_rank_plot_groups_layers_by_kind():
    assert job.layer_kind("transformer.h.3.mlp.c_fc") == "transformer.h.*.mlp.c_fc"
    assert job.layer_kind("encoder.layers.10.self_attn.out_proj") == \
        "encoder.layers.*.self_attn.out_proj"


def test_bench_and_summary_commands(capsys):
    assert main(["bench", "--shape", "64x128", "--rank", "8", "--rows", "16", "--backends", "eager",
                 "--iters", "3", "--no-malloc-tuning"]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "factored" in out
    pytest.importorskip("torchvision")
    assert main(["summary", "--model", "torchvision.models:resnet18", "--init-rank", "0.25"]) == 0
    assert "fc" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick_console_script(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "inrank_fx", "demo", "--quick", "--steps", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["compile"] is True
    assert saved["inrank"]["params"] < saved["dense"]["params"]
    assert saved["slim"]["fraction"] <= 0.4 and saved["settings"]["finetune_steps"] == 4  # 15%
    assert saved["narrow"]["steps"] == 30 + 4


def fresh_python(code: str) -> str:
    """stdout of `code` run by a new interpreter (nothing imported yet)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_and_usage_errors_come_before_torch():
    # --help and a bad argument are answered without importing torch
    out = fresh_python("import sys\nfrom inrank_fx.cli import main\n"
                       "for argv in (['--help'], ['summary', '--help'], ['bench', '--nope'],\n"
                       "             ['compress', '--help']):\n"
                       "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
                       "print('torch' in sys.modules)")
    assert "usage: inrank-fx" in out and out.strip().endswith("False")
    assert "usage: inrank-fx compress" in out and "--budget BUDGET" in out


def test_cli_init_choices_match_the_layers():
    from inrank_fx import cli, vocabulary
    from inrank_fx.nn import linear
    from inrank_fx.passes import compress
    from inrank_fx.tools import bench

    # one tuple each, read by the command line and the library alike
    assert cli.INITS is vocabulary.INITS is linear.INITS
    assert cli.ALLOCATIONS is vocabulary.ALLOCATIONS is compress.ALLOCATIONS
    assert cli.BACKENDS is vocabulary.BACKENDS is bench.BACKENDS


def test_compress_command_makes_the_demo_model_smaller_and_exports_it(demo_report, tmp_path,
                                                                       capsys):
    import onnxruntime as ort

    from inrank_fx.demo.gpt import load_checkpoint

    dense = load_checkpoint(demo_report[0] / "dense.pt")
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():  # the checkpoint is the demo's trained dense model
        assert torch.isfinite(dense(x)).all()
    out = tmp_path / "slim"
    assert main(["compress", "--model", str(demo_report[0] / "dense.pt"), "--budget", "0.4",
                 "--finetune-steps", "3", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.onnx", "compression.txt",
                                               "results.json"}
    results = json.loads((out / "results.json").read_text())
    assert 0.38 <= results["fraction"] <= 0.4 and results["calibrated"]
    assert set(results["val_loss"]) == {"dense", "compressed", "fine_tuned"}
    assert results["parameters"]["frozen"] < results["parameters"]["dense"]
    frozen = torch.load(out / "model.pt", weights_only=False)
    assert not any(isinstance(m, inrank_fx.FactoredLayer) for m in frozen.modules())
    session = ort.InferenceSession(str(out / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), frozen(x), atol=1e-4)
    assert "budget 0.4" in capsys.readouterr().out


def test_compress_command_takes_a_model_factory(tmp_path):
    out = tmp_path / "slim"
    assert main(["compress", "--model", "gpt", "--input", "2x16", "--budget", "0.3",
                 "--allocation", "uniform", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fraction"] <= 0.3 and "val_loss" not in results  # no text: no fine-tune
    assert len(set(results["ranks"].values())) == 1  # uniform: one rank fraction, one rank here
    assert results["onnx"]["max_rel_error"] <= 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget 0.0: a fraction in (0, 1]"),
    (["--budget", "0.4", "--model", "nope.pt"], "--model nope.pt: no such file"),
    (["--budget", "0.4", "--model", "torch.nn:Linear"], "calling Linear() failed"),
])
def test_compress_command_names_bad_input(argv, message, capsys):
    argv = ["compress", *argv] + ([] if "--model" in argv else ["--model", "x.pt"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_import_is_lazy_and_every_public_name_resolves():
    out = fresh_python("import sys, inrank_fx\nassert 'torch' not in sys.modules\n"
                       "names = [getattr(inrank_fx, n) for n in inrank_fx.__all__]\n"
                       "assert inrank_fx.integrations.InRankCallback.__name__ == 'InRankCallback'\n"
                       "print(len(names))")
    assert int(out) == len(inrank_fx.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        inrank_fx.nope  # noqa: B018


def test_the_type_checkers_names_are_the_public_names():
    """inrank_fx/__init__.py lists its public names twice (the lazy table and the imports for
    type checkers): the two lists are the same names from the same modules."""
    import ast

    source = Path(inrank_fx.__file__).read_text()
    block = next(node for node in ast.parse(source).body if isinstance(node, ast.If)
                 and getattr(node.test, "id", None) == "TYPE_CHECKING")
    imported = {alias.asname or alias.name: "." * node.level + (node.module or "")
                for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    public = {name: inrank_fx._PUBLIC[name] for name in inrank_fx._PUBLIC}
    assert imported == public


def test_summary_command_does_not_enlarge_a_model_with_flat_spectra(capsys):
    pytest.importorskip("torchvision")
    assert main(["summary", "--model", "torchvision.models:resnet18"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("note: init_rank='auto' kept") and "untrained" not in first
    assert "inrank_fx.compress(model, budget)" in first and "a threshold below 0." in first
