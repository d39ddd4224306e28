"""Train a small GPT with InRank beside its dense twin on the stdlib corpus.

    python examples/train_gpt.py [--steps 2000] [--stop-after settled]

The demo's model and recipe (inrank_fx.demo.job.DEFAULT): AdamW, linear warm-up, cosine decay,
gradient clipping, each model at the peak learning rate its own sweep chose
(benchmarks/bench_convergence.py). The InRank model starts every factored layer at rank 2; ranks
grow by the InRank rule on optimizer steps and freeze once they settle (or at --stop-after N).
Prints the final transform summary, then training and validation loss of both models from the
same seed and data, with parameter counts and wall-clock time. A much shorter run than the
default stops inside the early transient, where the small model can look better than it is.
"""
from __future__ import annotations

import argparse

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT
from inrank_fx.demo.job import DEFAULT
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine


def train(model: GPT, train_ids, val_ids, steps: int, lr: float, seed: int, inrank: bool) -> dict:
    s = DEFAULT
    opt = recipe_optimizer(model.parameters(), lr, s.weight_decay)
    if inrank:
        inrank_fx.attach(model, opt, seed=seed)
    stream = batches(train_ids, s.gpt.block_size, s.batch_size, torch.Generator().manual_seed(seed))
    losses, seconds = train_steps(model, opt, stream, steps, clip_norm=s.clip_norm,
                                  scheduler=warmup_cosine(opt, steps, min(s.warmup, steps // 10)))
    val_loss = evaluate(model, val_ids, s.gpt.block_size, seed + 1)
    return {"train_loss": losses[-1], "val_loss": val_loss, "seconds": sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    parser.add_argument("--stop-after", default="settled",
                        help="'settled' (default), a step count, or 'none' to adapt throughout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stop = {"settled": "settled", "none": None}.get(args.stop_after)
    if stop is None and args.stop_after != "none":
        stop = int(args.stop_after)

    s = DEFAULT
    train_ids, val_ids = split(stdlib_corpus(s.corpus_bytes))
    torch.manual_seed(args.seed)
    dense = GPT(s.gpt)
    factored = inrank_fx.transform(dense, inrank_fx.InRankConfig(init_rank=2, stop_after=stop))

    for name, model, lr in (("dense", dense, s.dense_lr), ("inrank", factored, s.inrank_lr)):
        result = train(model, train_ids, val_ids, args.steps, lr, args.seed, name == "inrank")
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:>7}: lr {lr:g}  params {params:>9,}  train loss {result['train_loss']:.3f}  "
              f"val loss {result['val_loss']:.3f}  {result['seconds']:.1f}s for {args.steps} steps")
    print("\nfinal ranks of the InRank model:\n" + str(inrank_fx.summary(factored)))


if __name__ == "__main__":
    main()
