"""How should components added by rank growth start? Train the examples GPT with each option.

    python benchmarks/bench_growth_init.py [--steps 300] [--seeds 0 1]

Same model seed, same data order, same InRank schedule; only InRankConfig.grow_init differs:
  zero   - new U columns zero, new V columns random (the function is unchanged at growth)
  random - new U and V columns random at the scale of the existing factors
Prints final train loss (mean of the last 20 steps) and validation loss for each, per seed.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import evaluate, train_steps


def run(grow_init: str, seed: int, steps: int, data) -> dict:
    train_ids, val_ids = data
    config = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(seed)
    cfg = inrank_fx.InRankConfig(init="random", init_rank=2, grow_init=grow_init)
    model = inrank_fx.transform(GPT(config), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ctrl = inrank_fx.attach(model, opt, seed=seed)
    stream = batches(train_ids, config.block_size, 16, torch.Generator().manual_seed(seed))
    losses, seconds = train_steps(model, opt, stream, steps)
    val_loss = evaluate(model, val_ids, config.block_size, 10_000 + seed)
    mean_rank = statistics.mean(inrank_fx.ranks(model).values())
    return {"train": statistics.mean(losses[-20:]), "val": val_loss, "mean_rank": mean_rank,
            "events": ctrl.rank_events, "seconds": sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    data = split(stdlib_corpus(1_000_000))
    results = {name: [] for name in ("zero", "random")}
    for seed in args.seeds:
        for name in results:
            r = run(name, seed, args.steps, data)
            results[name].append(r)
            print(f"seed {seed} grow_init={name:<6} train {r['train']:.4f}  val {r['val']:.4f}  "
                  f"mean rank {r['mean_rank']:.1f}  rank events {r['events']}  {r['seconds']:.0f}s")
    print("mean over seeds:")
    for name, rs in results.items():
        print(f"  grow_init={name:<6} train {statistics.mean(r['train'] for r in rs):.4f}  "
              f"val {statistics.mean(r['val'] for r in rs):.4f}")


if __name__ == "__main__":
    main()
