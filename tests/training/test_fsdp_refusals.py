"""What attach refuses on a fully_shard model, each named: checked on one gloo process (a fresh
interpreter, so that this test's process group cannot leak into others)."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)

SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    import inrank_fx
    from inrank_fx.training.sharded import PARAM_INTERNALS

    dist.init_process_group("gloo")

    def sharded(**options):
        model = inrank_fx.transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)),
                                    inrank_fx.InRankConfig(init_rank=4))
        fully_shard(model, **options)
        return model, torch.optim.AdamW(model.parameters())

    def refusal(model, opt, **kwargs):
        try:
            inrank_fx.attach(model, opt, **kwargs)
        except (inrank_fx.InRankDistributedError, ValueError) as error:
            return str(error)
        return "attached"

    model, opt = sharded()
    print("plain:", refusal(model, opt))
    print("not distributed:", refusal(*sharded(), distributed=False))
    print("columns:", refusal(*sharded(shard_placement_fn=lambda p: Shard(p.dim() - 1))))
    from torch.distributed.fsdp._fully_shard import _fsdp_param
    del _fsdp_param.FSDPParam.init_dtype_attrs  # as a torch without that internal would be
    print("internals:", refusal(*sharded()))
    dist.destroy_process_group()
""")


def test_fully_shard_options_that_cannot_follow_a_resize_are_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **env}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert seen["plain"] == "attached"
    assert "distributed=False with a fully_shard model" in seen["not distributed"]
    assert "default row sharding (Shard(0))" in seen["columns"]
    assert "FSDPParam.init_dtype_attrs" in seen["internals"]
