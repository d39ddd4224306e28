"""Train the demo GPT with InRank under FSDP2 (fully_shard), ranks adapting while sharded.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_train.py [--quick] [--out DIR]
    python examples/fsdp_train.py --quick               # the same job on one process, unsharded

Every block and then the root are `fully_shard`-ed, as torchtitan does; the one InRank-specific
line is `inrank_fx.attach(model, optimizer)`: it sees fully_shard, decides ranks on process 0,
and re-shards the factors it resizes (inrank_fx.training.sharded). Every process draws the same
global batch for each step and trains on its slice, so N processes compute what one process
computes on the whole batch: the loss printed is the global batch's (all-reduced).

--save-at K writes a torch.distributed.checkpoint folder OUT/checkpoint after step K (every
process writes its shards); --resume DIR continues from one, on the same number of processes,
whatever ranks the checkpoint holds. With --out DIR each process writes DIR/process-<i>.json
(losses, ranks after every step, rank events, timings).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import inrank_fx
from inrank_fx._io import atomic_destination
from inrank_fx.demo.corpus import split, stdlib_corpus, step_batch
from inrank_fx.demo.gpt import GPT, GPTConfig, lm_loss
from inrank_fx.training.sharded import load_checkpoint, save_checkpoint

QUICK = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, steps=60, warmup=10, check_every=10,
             stop_after=50, corpus=200_000)
FULL = dict(n_layer=4, n_embd=128, n_head=4, block_size=64, steps=300, warmup=25, check_every=25,
            stop_after=150, corpus=1_000_000)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT for 60 steps (tests)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 60 quick, 300)")
    parser.add_argument("--batch", type=int, default=16, help="global batch, split over processes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for process-<i>.json and checkpoints")
    parser.add_argument("--save-at", type=int, help="save OUT/checkpoint after this step")
    parser.add_argument("--resume", type=Path, help="continue from a checkpoint folder")
    parser.add_argument("--meta", action="store_true",
                        help="build and transform on the meta device, shard, then materialize")
    parser.add_argument("--compile", action="store_true", help="train under torch.compile")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds any of InRank's collectives may take")
    args = parser.parse_args(argv)
    args.sizes = QUICK if args.quick else FULL
    args.steps = args.steps or args.sizes["steps"]
    if args.save_at is not None and args.out is None:
        parser.error("--save-at needs --out")
    return args


def start_processes() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or run alone); (this process, processes, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build(args, device, processes):
    """The transformed GPT, sharded when there are several processes; optimizer; controller."""
    from torch.distributed.fsdp import fully_shard

    s = args.sizes
    gpt_config = GPTConfig(block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                           n_embd=s["n_embd"])
    inrank_config = inrank_fx.InRankConfig(warmup_steps=s["warmup"], check_every=s["check_every"],
                                           stop_after=s["stop_after"])
    torch.manual_seed(args.seed)
    if args.meta:  # how models too large for one device are built: no memory until sharded
        with torch.device("meta"):
            model = inrank_fx.transform(GPT(gpt_config), inrank_config)
    else:
        model = inrank_fx.transform(GPT(gpt_config), inrank_config).to(device)
    if processes > 1:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    if args.meta:  # every process draws the same values and keeps its own shard of them
        inrank_fx.materialize(model, device, init_fn=model._init_weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    controller = inrank_fx.attach(model, optimizer, seed=args.seed, timeout_s=args.timeout)
    return model, optimizer, controller


def train(args, process, processes, device, model, optimizer, controller, start):
    """The training loop from `start` to args.steps: (global losses, ranks after each step,
    seconds per step)."""
    if args.batch % processes:
        raise SystemExit(f"--batch {args.batch} does not split over {processes} processes")
    local = args.batch // processes
    train_ids, _ = split(stdlib_corpus(args.sizes["corpus"]))
    forward = torch.compile(model) if args.compile else model
    losses, ranks, seconds = [], [], []
    for step in range(start, args.steps):
        x, y = step_batch(train_ids, args.sizes["block_size"], args.batch, args.seed, step)
        x, y = (t[process * local : (process + 1) * local].to(device) for t in (x, y))
        began = time.perf_counter()
        loss = lm_loss(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # fully_shard averages the gradients over processes
        optimizer.step()  # the controller runs inside, on every process at the same step
        seconds.append(time.perf_counter() - began)
        total = loss.detach().clone()
        if processes > 1:
            dist.all_reduce(total)
        losses.append(total.item() / processes)
        ranks.append(inrank_fx.ranks(model))
        if args.save_at is not None and step + 1 == args.save_at:
            save_checkpoint(args.out / "checkpoint", model, optimizer, controller)
    return losses, ranks, seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    process, processes, device = start_processes()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    model, optimizer, controller = build(args, device, processes)
    if args.resume is not None:
        load_checkpoint(args.resume, model, optimizer, controller)
    start = controller.step
    losses, ranks, seconds = train(args, process, processes, device, model, optimizer,
                                   controller, start)
    result = {
        "process": process,
        "processes": processes,
        "start_step": start,
        "losses": losses,
        "ranks_per_step": ranks,
        "ranks": inrank_fx.ranks(model),
        "rank_events": controller.rank_events,
        "median_step_ms": 1000 * statistics.median(seconds) if seconds else None,
        "inrank_seconds": controller.seconds,
        "collective_stats": getattr(controller, "collective_stats", {}),
        "compiled_graphs": (int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                            if args.compile else None),
    }
    print(f"process {process} of {processes}: steps {start}..{args.steps}, final loss "
          f"{losses[-1]:.4f}, rank events {result['rank_events']}, ranks {result['ranks']}, "
          f"median step {result['median_step_ms']:.1f} ms, InRank {controller.seconds:.2f} s")
    if args.out is not None:
        with atomic_destination(args.out / f"process-{process}.json") as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if processes > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
