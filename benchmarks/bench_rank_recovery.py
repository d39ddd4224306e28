"""Ground truth for the rank rule: do layers end at the ranks their data has?

    python benchmarks/bench_rank_recovery.py [--steps 500] [--seed 0] [--criterion variance]

Two problems from inrank_fx.demo.teachers, every layer 64×64 (full rank 64):
  heads - three parallel heads regressing teachers of rank 3, 10, 24;
  stack - four residual blocks h ← h + A_i·gelu(h), supervised at every block, A_i of rank
          4, 12, 20, 8.
Each is trained with the default rule (ranks freeze once settled, checks every 20 steps) from
init_rank ∈ {1, 2, 8} with buffer ∈ {4, 16, 64}, once per measure ("update": W_t − W_0;
"weight": W_t); --criterion, --threshold and --ranks-only-grow change the rule. Prints found / true
rank per layer, and the worst found/true ratio over the layers whose true rank is at least
init_rank (a rank never drops below init_rank).
"""
from __future__ import annotations

import argparse

import torch

import inrank_fx
from inrank_fx.demo.teachers import TeacherHeads, TeacherStack, fit

PROBLEMS = {
    "heads": lambda seed: TeacherHeads(64, (3, 10, 24), seed=seed),
    "stack": lambda seed: TeacherStack(64, (4, 12, 20, 8), seed=seed),
}


def found_ranks(problem: str, measure: str, init_rank: int, buffer: int, steps: int,
                seed: int, **overrides) -> tuple[dict, dict, float]:
    """(found ranks, true ranks, final loss) of one training run with the default rule."""
    torch.manual_seed(seed)
    teacher = PROBLEMS[problem](seed)
    cfg = inrank_fx.InRankConfig(init_rank=init_rank, buffer=buffer, measure=measure,
                                 warmup_steps=20, check_every=20, **overrides)
    model = inrank_fx.transform(teacher, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    inrank_fx.attach(model, opt, seed=seed)
    losses = fit(model, teacher, steps, optimizer=opt, seed=seed + 1)
    return inrank_fx.ranks(model), teacher.true_ranks(), losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criterion", default="variance")
    parser.add_argument("--threshold", type=float, default=None, help="α (default: the config's)")
    parser.add_argument("--ranks-only-grow", action="store_true",
                        help="the reference's k >= current rank instead of re-measuring")
    args = parser.parse_args()
    rule = {"criterion": args.criterion, "ranks_only_grow": args.ranks_only_grow}
    if args.threshold is not None:
        rule["threshold"] = args.threshold
    print(f"{'problem':<7} {'init_rank':>9} {'buffer':>6}   {'true':<16} "
          f"{'update: found':<18} {'worst':>5}   {'weight: found':<18} {'worst':>5}")
    for problem in PROBLEMS:
        for init_rank in (1, 2, 8):
            for buffer in (4, 16, 64):
                cells = []
                for measure in ("update", "weight"):
                    found, true, _ = found_ranks(problem, measure, init_rank, buffer,
                                                 args.steps, args.seed, **rule)
                    ratios = [found[n] / t for n, t in true.items() if t >= init_rank]
                    worst = max(ratios, key=lambda r: abs(r - 1.0))
                    cells.append(f"{str(list(found.values())):<18} {worst:>5.2f}")
                    truth = str(list(true.values()))
                print(f"{problem:<7} {init_rank:>9} {buffer:>6}   {truth:<16} "
                      f"{cells[0]}   {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
