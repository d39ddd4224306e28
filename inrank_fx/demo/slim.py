"""The job behind `inrank-fx compress`: a trained model made smaller to a budget, fine-tuned
where there is text to fine-tune on, frozen, exported to ONNX (verified), written to a folder.

1. Load the model: the demo's dense checkpoint (`dense.pt`, a GPT) or a model factory.
2. Calibration inputs: batches of the demo corpus (or `--data`) for a GPT; for a factory, random
   inputs of the shape given (isotropic: the truncation is then close to plain SVD).
3. `inrank_fx.compress(model, budget, calibration)`; for a GPT, a fine-tune with the recipe the
   measurements chose (docs/RESULTS.md, "Slim models") and the validation loss before and after.
4. Freeze, export to ONNX (ONNX Runtime parity checked), and write the folder atomically:
   model.pt (the frozen module), model.onnx, compression.txt and results.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import inrank_fx
from inrank_fx._io import atomic_folder
from inrank_fx.demo.corpus import batches
from inrank_fx.demo.gpt import GPT
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine
from inrank_fx.export import to_onnx


@dataclass(frozen=True)
class FineTune:
    """The fine-tune after compression: 15% of the demo's training steps at a tenth of its peak
    learning rate, ranks fixed (benchmarks/bench_slim.py's sweep chose it; docs/SLIM.md)."""

    steps: int = 300
    lr: float = 3e-4
    batch: int = 16
    warmup_fraction: float = 0.05
    clip_norm: float = 1.0


def text_calibration(train_ids: torch.Tensor, block: int, count: int = 16, batch: int = 16,
                     seed: int = 0) -> list[torch.Tensor]:
    """`count` batches of token windows from the training text: what a GPT's layers see."""
    stream = batches(train_ids, block, batch, torch.Generator().manual_seed(20_000 + seed))
    return [next(stream)[0] for _ in range(count)]


def fine_tune(model: GPT, train_ids: torch.Tensor, recipe: FineTune, seed: int = 0) -> None:
    """The training recipe (AdamW, warm-up, cosine decay, clipping) at fixed ranks."""
    opt = recipe_optimizer(model.parameters(), recipe.lr)
    sched = warmup_cosine(opt, recipe.steps, max(1, int(recipe.warmup_fraction * recipe.steps)))
    stream = batches(train_ids, model.config.block_size, recipe.batch,
                     torch.Generator().manual_seed(30_000 + seed))
    train_steps(model, opt, stream, recipe.steps, scheduler=sched, clip_norm=recipe.clip_norm)


def run_compress(out: str | Path, model: nn.Module, budget: float, calibration, example: tuple,
                 *, allocation: str = "global", text: tuple | None = None,
                 recipe: FineTune | None = None, seed: int = 0, log=print) -> dict:
    """Compress `model`, fine-tune it on `text` (train_ids, val_ids; a GPT only) with `recipe`,
    freeze, export and write the folder `out`. Returns what results.json holds."""
    out = Path(out)
    slim = inrank_fx.compress(model, budget, calibration, allocation=allocation)
    compression = slim._inrank_report.compression
    log(str(compression))
    results = {"budget": budget, "allocation": allocation, "fraction": compression.fraction,
               "ranks": inrank_fx.ranks(slim), "notes": compression.notes,
               "calibrated": calibration is not None}
    if text is not None:
        train_ids, val_ids = text
        block = model.config.block_size

        def val(m):
            return evaluate(m, val_ids, block, 10_000 + seed)

        results["val_loss"] = {"dense": val(model), "compressed": val(slim)}
        if recipe is not None and recipe.steps > 0:
            log(f"fine-tuning {recipe.steps} steps at lr {recipe.lr:g} (ranks fixed)")
            fine_tune(slim, train_ids, recipe, seed)
            results["val_loss"]["fine_tuned"] = val(slim)
            results["fine_tune"] = {"steps": recipe.steps, "lr": recipe.lr}
        log("validation loss: " + ", ".join(f"{k} {v:.4f}"
                                            for k, v in results["val_loss"].items()))
    frozen = inrank_fx.freeze(slim)
    results["parameters"] = {"dense": sum(p.numel() for p in model.parameters()),
                             "frozen": sum(p.numel() for p in frozen.parameters())}
    with atomic_folder(out) as tmp:
        torch.save(frozen, tmp / "model.pt")
        report = to_onnx(frozen, example, tmp / "model.onnx")
        results["onnx"] = {"file": "model.onnx", "max_rel_error": report.max_rel_error,
                           "batch_sizes": report.batch_sizes, "file_bytes": report.file_bytes}
        (tmp / "compression.txt").write_text(f"{compression}\n\n{inrank_fx.summary(slim)}\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"parameters: {results['parameters']['frozen']:,} of {results['parameters']['dense']:,} "
        f"({results['parameters']['frozen'] / results['parameters']['dense']:.3f}); ONNX Runtime "
        f"parity {report.max_rel_error:.1e}; wrote {out}/model.pt, model.onnx, compression.txt, "
        f"results.json")
    return results
