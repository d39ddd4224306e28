"""Controller overhead per training step on the examples GPT, as a share of step time.

    python benchmarks/bench_controller_overhead.py [--steps 300] [--check-every 25]

Trains the examples GPT (transformed, InRank rule checked every 25 optimizer steps) and measures,
in the same run, the wall-clock of every training step and the time spent inside the controller
(singular values of every layer, the rule, and any resize with its optimizer bookkeeping).
Prints the median step time and the overhead ratio. Goal: <= 2%.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--n-embd", type=int, default=128)
    args = parser.parse_args()

    config = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=args.n_embd)
    train_ids, _ = split(stdlib_corpus(1_000_000))
    torch.manual_seed(0)
    cfg = inrank_fx.InRankConfig(init_rank=2, warmup_steps=args.check_every,
                                 check_every=args.check_every)
    model = inrank_fx.transform(GPT(config), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctrl = inrank_fx.attach(model, opt)
    stream = batches(train_ids, config.block_size, 16, torch.Generator().manual_seed(0))
    _, step_times = train_steps(model, opt, stream, args.steps)  # the controller runs in opt.step()
    total = sum(step_times)
    checks = len({h["step"] for h in ctrl.history})
    print(f"examples GPT n_embd={args.n_embd}, {len(inrank_fx.ranks(model))} factored layers, "
          f"{args.steps} steps, checks every {args.check_every} ({checks} checks, "
          f"{ctrl.rank_events} rank events), {torch.get_num_threads()} threads")
    print(f"  median step {statistics.median(step_times) * 1e3:.1f} ms; controller total "
          f"{ctrl.seconds * 1e3:.1f} ms = {ctrl.seconds / checks * 1e3:.1f} ms per check")
    print(f"  controller overhead: {100 * ctrl.seconds / total:.2f}% of training time (goal <= 2%)")


if __name__ == "__main__":
    main()
