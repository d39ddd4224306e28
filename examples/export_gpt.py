"""Train a small GPT with InRank, freeze its final ranks and export it to ONNX, next to the dense
model's export.

    python examples/export_gpt.py [--steps 300] [--out exports]

Both files are verified in ONNX Runtime (batch sizes 1 and 3) against the PyTorch models. Each
model trains at its own tuned learning rate with the demo's recipe; at the default length this
shows the export, not which model is better (see benchmarks/bench_convergence.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT
from inrank_fx.demo.job import DEFAULT
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine
from inrank_fx.export import to_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--stop-after", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("exports"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    config, recipe = DEFAULT.gpt, DEFAULT
    train_ids, val_ids = split(stdlib_corpus(1_000_000))
    results = {}
    for name in ("dense", "inrank"):
        torch.manual_seed(0)
        model = GPT(config)
        if name == "inrank":
            cfg = inrank_fx.InRankConfig(init_rank=2, stop_after=args.stop_after)
            model = inrank_fx.transform(model, cfg)
        lr = recipe.inrank_lr if name == "inrank" else recipe.dense_lr
        opt = recipe_optimizer(model.parameters(), lr, recipe.weight_decay)
        if name == "inrank":
            inrank_fx.attach(model, opt)
        stream = batches(train_ids, config.block_size, 16, torch.Generator().manual_seed(0))
        train_steps(model, opt, stream, args.steps, clip_norm=recipe.clip_norm,
                    scheduler=warmup_cosine(opt, args.steps, args.steps // 20))
        val_loss = evaluate(model, val_ids, config.block_size, seed=1)
        example = (torch.randint(0, 256, (1, config.block_size)),)
        report = to_onnx(model, example, args.out / f"gpt_{name}.onnx")
        results[name] = (val_loss, report)

    for name, (val_loss, report) in results.items():
        print(f"== {name} (val loss {val_loss:.3f})\n{report}\n")
    dense, factored = results["dense"][1], results["inrank"][1]
    print(f"InRank / dense: parameters x{factored.parameters / dense.parameters:.3f}, "
          f"ONNX file x{factored.file_bytes / dense.file_bytes:.3f}")


if __name__ == "__main__":
    main()
