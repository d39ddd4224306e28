"""Does the reference implementation's rank rule measure learning? Apply it with no training.

    python examples/reference_fixed_point.py [--shapes small medium large] [--seed 0]

The reference InRank code (src/models/layers/in_rank_efficient.py of jiaweizzhao/InRank) holds
each GPT-2 MLP weight as B·A with max_rank = min(in, out)/2 components, all drawn
Kaiming-uniform (a = √5) at construction, computes with the first `current + buffer` of them
(init 2, buffer 100), and at every check takes the singular values of that dense product (length
min(in, out), so zero-padded) and sets `current` to the first index in
range(current, min(current + buffer, max_rank − buffer)) whose ratio 1 − var(s − s_index)/var(s)
exceeds α = 0.9 (the last index of the range if none does). This script applies exactly that
rule, check after check, to the factors as they were initialised (no gradient step at all), with
inrank_fx's spectrum from factors (the same singular values as the dense SVD) and its
"variance_padded" ratio, until the rank stops moving. Whatever rank it settles at is a property of
the random initialisation alone.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.nn import init

from inrank_fx.nn.spectrum import explained_ratios, factor_singular_values

GPT2_MLP_SHAPES = {"small": (768, 3072), "medium": (1024, 4096), "large": (1280, 5120)}


def reference_factors(n_embd: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's c_fc factors as built: B (hidden × max_rank), A (max_rank × n_embd)."""
    g = torch.Generator().manual_seed(seed)
    max_rank = min(n_embd, hidden) // 2
    a, b = torch.empty(max_rank, n_embd), torch.empty(hidden, max_rank)
    for t in (a, b):  # kaiming_uniform_(a=√5), drawn from our generator for reproducibility
        bound = math.sqrt(6.0 / ((1 + 5.0) * init._calculate_correct_fan(t, "fan_in")))
        t.uniform_(-bound, bound, generator=g)
    return b, a


def fixed_point(n_embd: int, hidden: int, *, seed: int = 0, init_modes: int = 2,
                buffer: int = 100, threshold: float = 0.9, max_checks: int = 50) -> list[int]:
    """Ranks after each check of the reference rule on untrained factors, until a fixed point."""
    b, a = reference_factors(n_embd, hidden, seed)
    max_rank, full = a.shape[0], min(n_embd, hidden)
    current, trajectory = init_modes, [init_modes]
    for _ in range(max_checks):
        if current >= max_rank - buffer:  # the reference stops adapting here
            break
        width = current + buffer
        s = factor_singular_values(b[:, :width], a[:width].T)
        ratios = explained_ratios(s, "variance_padded", full_rank=full)
        candidates = range(current, min(current + buffer, max_rank - buffer))
        index = next((i for i in candidates if ratios[i] > threshold), candidates[-1])
        if index == current:
            break
        current = index
        trajectory.append(current)
    return trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(GPT2_MLP_SHAPES),
                        help="GPT-2 sizes (small, medium, large) or NxM shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buffer", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    for name in args.shapes:
        n_embd, hidden = GPT2_MLP_SHAPES.get(name) or tuple(int(v) for v in name.split("x"))
        ranks = fixed_point(n_embd, hidden, seed=args.seed, buffer=args.buffer,
                            threshold=args.threshold)
        print(f"{name:<8} {n_embd}x{hidden}: ranks per check {ranks} -> settles at {ranks[-1]} "
              f"({ranks[-1] / min(n_embd, hidden):.0%} of full rank) without any training")


if __name__ == "__main__":
    main()
