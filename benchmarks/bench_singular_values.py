"""Singular values of a factored layer: QR of the factors + a small SVD, against dense svdvals.

    python benchmarks/bench_singular_values.py [--out 1024] [--in 4096] [--rank 128]

Prints the median time of each way, measured side by side in this run, and their ratio. The dense
way is what the InRank reference does: form U·Vᵀ, then take its singular values.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from inrank_fx.nn.spectrum import factor_singular_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=1024, help="out_features")
    parser.add_argument("--in", dest="in_", type=int, default=4096, help="in_features")
    parser.add_argument("--rank", type=int, default=128, help="factor width k")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()

    torch.manual_seed(0)
    U, V = torch.randn(args.out, args.rank), torch.randn(args.in_, args.rank)
    factored = factor_singular_values(U, V)
    dense = torch.linalg.svdvals(U @ V.T)[: args.rank]
    rel = ((factored - dense).abs() / dense).max().item()

    env = {"U": U, "V": V, "factor_singular_values": factor_singular_values}
    timers = {
        "factors (QR + kxk SVD)": "factor_singular_values(U, V)",
        "dense svdvals(U @ V.T)": "torch.linalg.svdvals(U @ V.T)",
    }
    medians = {}
    for label, stmt in timers.items():
        t = benchmark.Timer(stmt, globals={**env, "torch": torch}, num_threads=torch.get_num_threads())
        medians[label] = t.blocked_autorange(min_run_time=args.min_run_time).median

    print(f"layer {args.out}x{args.in_}, k={args.rank}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for label, seconds in medians.items():
        print(f"  {label:<26} median {seconds * 1e3:9.2f} ms")
    fast, slow = medians["factors (QR + kxk SVD)"], medians["dense svdvals(U @ V.T)"]
    print(f"  speedup {slow / fast:.1f}x   (max relative difference of the values: {rel:.1e})")


if __name__ == "__main__":
    main()
