"""Train the demo GPT with InRank under DistributedDataParallel.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py [--quick] [--out DIR]
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/ddp_train.py                            # two nodes, on every node
    python examples/ddp_train.py --quick                 # the same job on one process

The one InRank-specific line is `inrank_fx.attach(ddp_model, optimizer)`: given the DDP wrapper,
ranks are decided on process 0, applied on every process, and DDP follows every resize.

Every process draws the same global batch for each step (seeded by the step) and trains on its
slice of it, so N processes compute what one process computes on the whole batch. At the end each
process prints its final ranks and a checksum of its parameters; with --out DIR it also writes
DIR/process-<i>.json (`ranks`, `rank_events`, `checksum`, losses, timings). --save-at K makes
process 0 write DIR/checkpoint.pt after step K; --resume FILE continues a run from one, on any
number of processes.
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
from torch.nn.parallel import DistributedDataParallel

import inrank_fx
from inrank_fx._io import atomic_destination
from inrank_fx.demo.corpus import split, stdlib_corpus, step_batch
from inrank_fx.demo.gpt import GPT, GPTConfig, lm_loss

QUICK = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, steps=40, warmup=5, check_every=5,
             stop_after=30, corpus=200_000)
FULL = dict(n_layer=4, n_embd=128, n_head=4, block_size=64, steps=300, warmup=25, check_every=25,
            stop_after=150, corpus=1_000_000)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT for 40 steps (tests)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 40 quick, 300)")
    parser.add_argument("--batch", type=int, default=16, help="global batch, split over processes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for process-<i>.json and checkpoints")
    parser.add_argument("--save-at", type=int,
                        help="process 0 saves OUT/checkpoint.pt after this step")
    parser.add_argument("--resume", type=Path, help="continue from a checkpoint.pt")
    parser.add_argument("--compile", action="store_true",
                        help="train the DDP model under torch.compile")
    parser.add_argument("--find-unused-parameters", action="store_true",
                        help="DDP's find_unused_parameters (InRank keeps it in sync as well)")
    parser.add_argument("--backend", choices=("gloo", "nccl"),
                        help="default: nccl where CUDA is available, else gloo")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds any of InRank's collectives may take")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.steps = args.steps or sizes["steps"]
    args.sizes = sizes
    if args.save_at is not None and args.out is None:
        parser.error("--save-at needs --out")
    return args


def start_processes(backend: str | None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or run alone); (this process, processes, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def build(args, device, processes):
    """Model, optimizer and controller, fresh or from --resume; also the step to start at."""
    s = args.sizes
    gpt_config = GPTConfig(block_size=s["block_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                           n_embd=s["n_embd"])
    inrank_config = inrank_fx.InRankConfig(warmup_steps=s["warmup"], check_every=s["check_every"],
                                           stop_after=s["stop_after"])
    torch.manual_seed(args.seed)
    model = inrank_fx.transform(GPT(gpt_config), inrank_config)
    checkpoint = torch.load(args.resume, map_location="cpu") if args.resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # takes the checkpoint's ranks and widths
    model.to(device)
    trained = model
    if processes > 1:
        trained = DistributedDataParallel(model, find_unused_parameters=args.find_unused_parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    controller = inrank_fx.attach(trained, optimizer, seed=args.seed, timeout_s=args.timeout)
    start = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        controller.load_state_dict(checkpoint["controller"])
        start = int(checkpoint["step"])
    return model, trained, optimizer, controller, start


def save_checkpoint(path: Path, model, optimizer, controller, step: int) -> None:
    with atomic_destination(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "controller": controller.state_dict(), "step": step}, tmp)


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def train(args, process, processes, device, model, trained, optimizer, controller, start):
    """The ordinary DDP training loop from `start` to args.steps; (losses, seconds per step)."""
    if args.batch % processes:
        raise SystemExit(f"--batch {args.batch} does not split over {processes} processes")
    local = args.batch // processes
    train_ids, _ = split(stdlib_corpus(args.sizes["corpus"]))
    forward = torch.compile(trained) if args.compile else trained
    losses, seconds = [], []
    for step in range(start, args.steps):
        x, y = step_batch(train_ids, args.sizes["block_size"], args.batch, args.seed, step)
        x, y = (t[process * local : (process + 1) * local].to(device) for t in (x, y))
        began = time.perf_counter()
        loss = lm_loss(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # the controller runs inside, on every process at the same step
        seconds.append(time.perf_counter() - began)
        losses.append(loss.item())  # this process's slice; the all-reduced gradient is global
        if args.compile and step == start and controller.rank_events == 0:
            # graphs for one step before any resize: what each rank event may at most repeat
            args.graphs_before_events = _compiled_graphs()
        if args.save_at is not None and step + 1 == args.save_at:
            if process == 0:
                save_checkpoint(args.out / "checkpoint.pt", model, optimizer, controller, step + 1)
            if processes > 1:
                dist.barrier()
    return losses, seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    process, processes, device = start_processes(args.backend)
    if args.out is not None and process == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    model, trained, optimizer, controller, start = build(args, device, processes)
    losses, seconds = train(args, process, processes, device, model, trained, optimizer,
                            controller, start)

    result = {
        "process": process,
        "processes": processes,
        "device": str(device),
        "backend": dist.get_backend() if processes > 1 else None,
        "steps": args.steps,
        "start_step": start,
        "ranks": inrank_fx.ranks(model),
        "rank_events": controller.rank_events,
        "checksum": checksum(model),
        "losses": losses,
        "median_step_ms": 1000 * statistics.median(seconds) if seconds else None,
        "train_seconds": sum(seconds),
        "inrank_seconds": controller.seconds,
        "collective_seconds": getattr(controller, "collective_seconds", 0.0),
        "collectives": getattr(controller, "collectives", 0),
        "collective_stats": getattr(controller, "collective_stats", {}),
    }
    if args.compile:  # compiled graphs made (recompiles included): bounded, never an eager fallback
        result["compiled_graphs"] = _compiled_graphs()
        result["compiled_graphs_before_events"] = getattr(args, "graphs_before_events", None)
    print(f"process {process} of {processes}: ranks {result['ranks']}")
    print(f"process {process} of {processes}: rank events {result['rank_events']}, "
          f"checksum {result['checksum']:.10g}, median step {result['median_step_ms']:.1f} ms, "
          f"InRank {result['inrank_seconds']:.2f} s of which collectives "
          f"{result['collective_seconds']:.2f} s")
    if args.out is not None:
        if processes > 1:
            dist.barrier()  # the folder exists (process 0 made it)
        path = args.out / f"process-{process}.json"
        with atomic_destination(path) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if processes > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
