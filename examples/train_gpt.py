"""Train a small GPT with InRank beside its dense twin on the stdlib corpus.

    python examples/train_gpt.py [--steps 200] [--stop-after 100]

The InRank model starts every factored layer at rank 2; ranks grow by the InRank rule on optimizer
steps and, InRank-Efficient style, freeze at --stop-after. Prints the final transform summary, then
training and validation loss of both models from the same seed and data, with parameter counts
and wall-clock time.
"""
from __future__ import annotations

import argparse

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import evaluate, train_steps


def train(model: GPT, train_ids, val_ids, steps: int, config: GPTConfig, seed: int,
          inrank: bool) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if inrank:
        inrank_fx.attach(model, opt, seed=seed)
    stream = batches(train_ids, config.block_size, 16, torch.Generator().manual_seed(seed))
    losses, seconds = train_steps(model, opt, stream, steps)
    val_loss = evaluate(model, val_ids, config.block_size, seed + 1)
    return {"train_loss": losses[-1], "val_loss": val_loss, "seconds": sum(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stop-after", type=int, default=100,
                        help="optimizer steps after which ranks freeze (InRank-Efficient)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
    train_ids, val_ids = split(stdlib_corpus(1_000_000))
    torch.manual_seed(args.seed)
    dense = GPT(config)
    inrank_config = inrank_fx.InRankConfig(init_rank=2, stop_after=args.stop_after)
    factored = inrank_fx.transform(dense, inrank_config)

    for name, model in (("dense", dense), ("inrank", factored)):
        result = train(model, train_ids, val_ids, args.steps, config, args.seed, name == "inrank")
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:>7}: params {params:>9,}  train loss {result['train_loss']:.3f}  "
              f"val loss {result['val_loss']:.3f}  {result['seconds']:.1f}s for {args.steps} steps")
    print("\nfinal ranks of the InRank model:\n" + str(inrank_fx.summary(factored)))


if __name__ == "__main__":
    main()
