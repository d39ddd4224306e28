"""InRank under FSDP2 (fully_shard) on 2 CPU processes with gloo: ranks adapt while sharded.

examples/fsdp_train.py --quick on one process (unsharded) is the reference; on 2 processes with
every block and the root fully_shard-ed, the global loss at every step must match it, the ranks
must change (grow at checks, truncate at the stop) identically on both processes, and a
torch.distributed.checkpoint taken after rank changes must resume to the same losses.
"""
import json

import pytest
import torch.distributed as dist

from test_distributed import ROOT, check_ran, torchrun  # tests/training is on sys.path

EXAMPLE = ROOT / "examples" / "fsdp_train.py"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)


def processes_seen(folder):
    return [json.loads((folder / f"process-{i}.json").read_text()) for i in range(2)]


def relative(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    check_ran(torchrun(EXAMPLE, "--quick", "--out", out / "sharded", "--save-at", 30))
    return out


def test_ranks_adapt_under_fully_shard_as_on_one_process_and_resume(load_example, sharded_run,
                                                                     tmp_path):
    single = load_example("fsdp_train").main(["--quick", "--out", str(tmp_path / "single")])
    first, second = processes_seen(sharded_run / "sharded")
    assert first["ranks_per_step"] == second["ranks_per_step"]  # identical on both processes
    changes = sum(a != b for a, b in zip(first["ranks_per_step"], first["ranks_per_step"][1:]))
    assert changes >= 2 and first["rank_events"] >= 2
    assert first["ranks_per_step"] == single["ranks_per_step"]
    assert relative(first["losses"], single["losses"]) < 1e-4
    assert first["losses"] == second["losses"]  # the all-reduced global loss

    saved_after = first["ranks_per_step"][29]
    assert saved_after != first["ranks_per_step"][0]  # the checkpoint holds changed ranks
    check_ran(torchrun(EXAMPLE, "--quick", "--out", tmp_path / "resumed",
                       "--resume", sharded_run / "sharded" / "checkpoint"))
    for resumed in processes_seen(tmp_path / "resumed"):
        assert resumed["start_step"] == 30
        assert resumed["ranks_per_step"] == first["ranks_per_step"][30:]
        assert relative(resumed["losses"], first["losses"][30:]) < 1e-6


def test_torch_compile_follows_the_resizes_of_a_sharded_model(sharded_run, tmp_path):
    check_ran(torchrun(EXAMPLE, "--quick", "--compile", "--out", tmp_path))
    eager = processes_seen(sharded_run / "sharded")[0]
    for compiled in processes_seen(tmp_path):
        assert compiled["ranks_per_step"] == eager["ranks_per_step"]
        assert relative(compiled["losses"], eager["losses"]) < 1e-5
        # compiled throughout, recompiled at most once per rank event (no eager fallback)
        assert 1 <= compiled["compiled_graphs"] <= 1 + compiled["rank_events"]
