"""What can go wrong with several processes, staged for tests/training/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/training/ddp_worker.py SCENARIO OUT_DIR

Each process writes OUT_DIR/<scenario>-<process>.json with what it saw:

- refusals: a plain module attached in a 2-process world, and an FSDP2 (fully_shard) model
  with CPU offload or over a 2-D mesh (HSDP), must be refused with a clear error; then adapting under DDP until
  ranks freeze, detaching and sharding with fully_shard trains;
- skewed: process 1 has another threshold and another random generator (as if it would
  decide and draw on its own), under DDP(find_unused_parameters=True), where a DDP left on the
  old factors drifts apart silently; ranks and parameters must still agree bit for bit;
- diverge: process 1 applies a different rank than process 0 decided (simulating a process
  that decides on its own); both processes must raise InRankDistributedError naming the layer;
- stall: process 1 stops answering at the first rank check (sleeps); process 0 must raise
  InRankDistributedError once the timeout (5 s) has passed;
- die: process 1 exits at the first rank check; process 0 must raise InRankDistributedError
  within the timeout (20 s) instead of hanging.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: helpers, for torchrun
from helpers import load_example  # noqa: E402

import inrank_fx
from inrank_fx import InRankDistributedError


def refusals(example, args, process, processes, device) -> dict:
    model, trained, optimizer, controller, _ = example.build(args, device, processes)
    seen = {}
    try:
        inrank_fx.attach(model, optimizer)  # the plain module, not the DDP wrapper
    except ValueError as error:
        seen["plain"] = str(error)
    try:
        inrank_fx.attach(trained, optimizer, distributed=False)  # DDP, but told not to sync
    except ValueError as error:
        seen["ddp_not_distributed"] = str(error)
    try:
        inrank_fx.attach(trained, optimizer, timeout_s=0)
    except ValueError as error:
        seen["timeout"] = str(error)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    sharded = copy.deepcopy(model)  # an FSDP2 option the sharded resize does not cover
    fully_shard(sharded, mesh=init_device_mesh("cpu", (processes,)),
                offload_policy=CPUOffloadPolicy(pin_memory=False))
    try:
        inrank_fx.attach(sharded, torch.optim.AdamW(sharded.parameters()))
    except InRankDistributedError as error:
        seen["fsdp"] = str(error)
    hybrid = copy.deepcopy(model)  # HSDP: replicate over one dimension, shard over the other
    fully_shard(hybrid, mesh=init_device_mesh("cpu", (1, processes),
                                              mesh_dim_names=("replicate", "shard")))
    try:
        inrank_fx.attach(hybrid, torch.optim.AdamW(hybrid.parameters()))
    except InRankDistributedError as error:
        seen["hsdp"] = str(error)

    # The documented way to FSDP2: adapt under DDP until ranks freeze, then shard.
    example.train(args, process, processes, device, model, trained, optimizer, controller, 0)
    assert controller.stopped
    controller.detach()
    frozen_ranks = inrank_fx.ranks(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (processes,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    args.steps += 5
    losses, _ = example.train(args, process, processes, device, model, model, optimizer,
                              controller, args.steps - 5)
    seen["sharded_losses"] = losses
    seen["sharded_ranks_kept"] = inrank_fx.ranks(model) == frozen_ranks
    return seen


def train_until_error(example, args, process, processes, device, sabotage) -> dict:
    model, trained, optimizer, controller, start = example.build(args, device, processes)
    sabotage(controller)
    began = time.perf_counter()
    try:
        example.train(args, process, processes, device, model, trained, optimizer, controller,
                      start)
    except InRankDistributedError as error:
        return {"error": str(error), "seconds": time.perf_counter() - began,
                "step": controller.step}
    seen = {"error": None, "seconds": time.perf_counter() - began, "step": controller.step,
            "ranks": inrank_fx.ranks(model), "rank_events": controller.rank_events,
            "checksum": example.checksum(model)}
    # By hand: set_ranks on the DDP model is refused; the controller's is a collective in
    # which process 0's values win, and DDP keeps training after it.
    try:
        inrank_fx.set_ranks(trained, 3)
    except ValueError as error:
        seen["set_ranks_ddp"] = str(error)
    controller.set_ranks(3 + process, widths=5 + process)
    seen["manual_ranks"] = inrank_fx.ranks(model)
    args.steps += 3
    example.train(args, process, processes, device, model, trained, optimizer, controller,
                  args.steps - 3)
    seen["manual_checksum"] = example.checksum(model)
    return seen


class Sabotaged:
    """A coordinator that does what the process's real one does, except where a scenario
    overrides it: injected through `controller.coordinator`, the controller's own seam."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    example = load_example("ddp_train")
    args = example.parse_args(["--quick", "--timeout", "20"])
    process, processes, device = example.start_processes("gloo")

    if scenario == "refusals":
        seen = refusals(example, args, process, processes, device)
    elif scenario == "diverge":
        def sabotage(controller):
            if process != 1:
                return
            class DecidesDifferently(Sabotaged):
                def agree(self, ctrl, event, decide):
                    decisions = self.inner.agree(ctrl, event, decide)
                    name = next(iter(decisions))
                    rank, width, explained = decisions[name]
                    decisions[name] = (rank + 1, max(width, rank + 1), explained)
                    return decisions

            controller.coordinator = DecidesDifferently(controller.coordinator)
        seen = train_until_error(example, args, process, processes, device, sabotage)
    elif scenario == "skewed":
        args.find_unused_parameters = True  # where a stale DDP would drift apart silently
        def sabotage(controller):
            if process == 1:  # would decide other ranks and draw other components, if asked
                controller.config = dataclasses.replace(controller.config, threshold=0.5)
                controller.generator.manual_seed(12345)
        seen = train_until_error(example, args, process, processes, device, sabotage)
    elif scenario == "stall":
        def sabotage(controller):
            if process == 1:
                class Stalls(Sabotaged):
                    def agree(self, ctrl, event, decide):
                        time.sleep(args.timeout + 5)
                        os._exit(0)

                controller.coordinator = Stalls(controller.coordinator)
        args.timeout = 5.0
        seen = train_until_error(example, args, process, processes, device, sabotage)
    elif scenario == "die":
        def sabotage(controller):
            if process == 1:
                class Dies(Sabotaged):
                    def agree(self, ctrl, event, decide):
                        os._exit(0)

                controller.coordinator = Dies(controller.coordinator)
        seen = train_until_error(example, args, process, processes, device, sabotage)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")

    (out / f"{scenario}-{process}.json").write_text(json.dumps(seen))
    if scenario == "refusals":
        dist.destroy_process_group()
    # after an InRank error the group is broken: exit without further collectives
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
