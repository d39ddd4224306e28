"""ONNX Runtime latency of the frozen factored model against the dense one, at equal batch.

    python benchmarks/bench_onnx_latency.py [--rank-fraction 0.125] [--runs 50]

For each case (the examples GPT, and a transformer MLP block 1024→4096→1024), both models are
exported with inrank_fx.export.to_onnx (verified in ONNX Runtime), then timed side by side in one
process on the CPU provider: median and p90 latency after warm-up. The FLOP-ideal speedup comes
from counting the FLOPs of both PyTorch models (torch.utils.flop_counter); the measured speedup is
printed next to it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import inrank_fx
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.export import to_onnx


def flops(model: nn.Module, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def latency(path: Path, inputs, runs: int, warmup: int = 5) -> list[float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


def cases(rank_fraction: float):
    gpt = GPT(GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=256)).eval()
    yield "examples GPT (4x256, batch 8x128)", gpt, (torch.randint(0, 256, (8, 128)),)
    mlp = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).eval()
    yield "MLP 1024-4096-1024 (512 rows)", mlp, (torch.randn(512, 1024),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-fraction", type=float, default=0.125)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = inrank_fx.InRankConfig(init="svd", init_rank=args.rank_fraction, buffer=0)
    print(f"ONNX Runtime CPU, {torch.get_num_threads()} threads, rank = {args.rank_fraction} of full")
    with tempfile.TemporaryDirectory() as tmp:
        for label, dense, inputs in cases(args.rank_fraction):
            frozen = inrank_fx.freeze(inrank_fx.transform(dense, cfg))
            paths = {}
            for name, model in (("dense", dense), ("factored", frozen)):
                paths[name] = Path(tmp) / f"{name}.onnx"
                to_onnx(model, inputs, paths[name])
            times = {name: latency(p, inputs, args.runs) for name, p in paths.items()}
            med = {n: statistics.median(t) for n, t in times.items()}
            p90 = {n: statistics.quantiles(t, n=10)[-1] for n, t in times.items()}
            ideal = flops(dense, inputs) / flops(frozen, inputs)
            speedup = med["dense"] / med["factored"]
            print(f"{label}")
            for name in ("dense", "factored"):
                print(f"  {name:<9} median {med[name] * 1e3:8.2f} ms   p90 {p90[name] * 1e3:8.2f} ms")
            print(f"  speedup {speedup:.2f}x   FLOP-ideal {ideal:.2f}x   "
                  f"({100 * speedup / ideal:.0f}% of ideal)")


if __name__ == "__main__":
    main()
