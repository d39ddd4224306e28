"""InRank under torch.distributed: 2 processes with gloo on localhost, launched by torchrun.

Every launch is bounded by a timeout; the whole file takes about a minute and a half on 2 cores.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import inrank_fx
from inrank_fx import InRankDistributedError
from inrank_fx.demo.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_train.py"
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
LAUNCH_TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)


def torchrun(script: Path, *args, processes: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost, whatever the hostname resolves to
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=env, cwd=ROOT)


def results(folder: Path, processes: int = 2) -> list[dict]:
    return [json.loads((folder / f"process-{i}.json").read_text()) for i in range(processes)]


def check_ran(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The example on 2 processes, saving a checkpoint after step 20 of 40."""
    out = tmp_path_factory.mktemp("ddp")
    check_ran(torchrun(EXAMPLE, "--quick", "--out", out, "--save-at", 20))
    return out, results(out)


def test_ranks_and_parameters_agree_across_processes(ddp_run):
    _, (first, second) = ddp_run
    assert first["rank_events"] >= 3  # ranks changed several times: checks, then truncation
    assert first["ranks"] == second["ranks"]
    assert len(set(first["ranks"].values())) > 1  # measured per layer, not one number for all
    assert first["ranks"] != {name: 2 for name in first["ranks"]}  # moved from init_rank
    assert first["checksum"] == second["checksum"]  # bit-identical parameters


def test_two_processes_match_one_with_the_same_global_batch(load_example, ddp_run):
    _, (first, second) = ddp_run
    alone = load_example("ddp_train").main(["--quick"])
    assert alone["ranks"] == first["ranks"]
    assert alone["rank_events"] == first["rank_events"]
    # Each process's loss is over its half of the global batch; their mean is the global loss.
    # The tolerance covers the different summation order of the all-reduced gradient.
    for step, (a, b, one) in enumerate(zip(first["losses"], second["losses"], alone["losses"])):
        assert abs((a + b) / 2 - one) < 1e-4, f"step {step}"
    assert math.isclose(first["checksum"], alone["checksum"], rel_tol=1e-6)


def test_checkpoint_saved_by_one_process_resumes_on_two(ddp_run, tmp_path):
    out, uninterrupted = ddp_run
    first = uninterrupted[0]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu")
    assert saved["step"] == 20
    check_ran(torchrun(EXAMPLE, "--quick", "--out", tmp_path, "--resume", out / "checkpoint.pt"))
    resumed = results(tmp_path)
    assert saved["controller"]["rank_events"] < first["rank_events"]  # ranks change after resume
    for process, original in zip(resumed, uninterrupted):
        assert process["start_step"] == 20
        assert process["ranks"] == first["ranks"]
        assert process["rank_events"] == first["rank_events"]
        assert process["checksum"] == first["checksum"]  # continues identically
        assert process["losses"] == original["losses"][20:]


def test_torch_compile_follows_the_resizes(ddp_run, tmp_path):
    _, (eager, _) = ddp_run
    check_ran(torchrun(EXAMPLE, "--quick", "--compile", "--out", tmp_path))
    first, second = results(tmp_path)
    assert first["ranks"] == second["ranks"] == eager["ranks"]
    assert first["checksum"] == second["checksum"]
    assert math.isclose(first["checksum"], eager["checksum"], rel_tol=1e-5)
    # Compiled throughout: each rank event recompiles at most once what the first step compiled
    # (DDP's graph splits included), and the events did recompile: never a silent fall back to
    # eager, never a recompile per step.
    before, events = first["compiled_graphs_before_events"], first["rank_events"]
    assert before >= 1 and events >= 3
    assert before < first["compiled_graphs"] <= before * (1 + events)


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    return tmp_path_factory.mktemp("worker")


def scenario(out: Path, name: str) -> list[dict]:
    """Run one of tests/training/ddp_worker.py's scenarios on 2 processes; what each process saw."""
    check_ran(torchrun(WORKER, name, out))
    return [json.loads(path.read_text()) for path in sorted(out.glob(f"{name}-*.json"))]


def test_refusals_and_the_way_to_fsdp2(worker_out):
    for seen in scenario(worker_out, "refusals"):
        assert "DistributedDataParallel-wrapped model" in seen["plain"]
        assert "distributed=True" in seen["ddp_not_distributed"]
        assert "timeout_s must be a positive number" in seen["timeout"]
        assert "CPUOffloadPolicy" in seen["fsdp"] and "not supported" in seen["fsdp"]
        assert "2-D mesh (HSDP" in seen["hsdp"]
        assert seen["sharded_ranks_kept"]
        assert all(math.isfinite(loss) for loss in seen["sharded_losses"])


def test_decisions_and_new_components_come_from_process_0(worker_out):
    first, second = scenario(worker_out, "skewed")
    assert first["error"] is None and first["rank_events"] >= 3
    assert first["ranks"] == second["ranks"]
    assert first["checksum"] == second["checksum"]
    assert "controller.set_ranks" in first["set_ranks_ddp"]
    assert set(first["manual_ranks"].values()) == {3}  # process 0's values, on both
    assert first["manual_ranks"] == second["manual_ranks"]
    assert first["manual_checksum"] == second["manual_checksum"]


def test_a_process_that_applies_another_rank_is_named(worker_out):
    for seen in scenario(worker_out, "diverge"):
        assert "processes disagree" in seen["error"]
        assert "layer 'transformer.h.0.attn.c_attn'" in seen["error"]
        assert "on process 1" in seen["error"]


def test_a_process_that_dies_is_an_error_not_a_hang(worker_out):
    seen = scenario(worker_out, "die")[0]  # process 1 died without a word
    assert seen["error"] is not None and "optimizer step 5" in seen["error"]
    assert "another process has probably died" in seen["error"]
    assert seen["seconds"] < 20 + 10


def test_a_process_that_stalls_times_out(worker_out):
    seen = scenario(worker_out, "stall")[0]
    assert seen["error"] is not None and "timeout 5 s" in seen["error"]
    assert 5 <= seen["seconds"] < 5 + 10


def test_distributed_attach_needs_a_process_group():
    assert not dist.is_initialized()
    model = inrank_fx.transform(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8)))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(InRankDistributedError, match="init_process_group"):
        inrank_fx.attach(model, optimizer, distributed=True)
