"""The plain training loop the examples and benchmarks share: nothing InRank-specific in it
(an attached RankController runs inside optimizer.step()).

The usual language-model recipe: `recipe_optimizer` (AdamW, β 0.9/0.95) and `warmup_cosine`
(linear warm-up, cosine decay to a floor, a torch LambdaLR); `train_steps` takes it with
gradient clipping.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from inrank_fx.demo.corpus import batches

from ..errors import InRankValueError

RECIPE_BETAS = (0.9, 0.95)  # the usual language-model betas (GPT-2/3, nanoGPT)


def recipe_optimizer(params, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """The recipe's optimizer: AdamW with β 0.9/0.95 and decoupled weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=RECIPE_BETAS, weight_decay=weight_decay)


def warmup_cosine(optimizer, steps: int, warmup: int, floor: float = 0.1):
    """Linear warm-up over `warmup` steps from 1% of each group's lr, then cosine decay to
    `floor` × lr at `steps` (a LambdaLR: it writes each group's "lr", so it keeps working when
    `set_ranks` swaps a group's parameters)."""
    if not 0 <= warmup < steps:
        raise InRankValueError(f"warmup must be in [0, steps={steps}), got {warmup}")

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(
    model, optimizer, stream, steps: int, *, loss_of=None, on_step=None, scheduler=None,
    clip_norm: float | None = None,
) -> tuple[list[float], list[float]]:
    """Run `steps` optimizer steps on batches from `stream`; (losses, seconds of each step).

    `loss_of(x, y)` computes the loss (default: model.loss, e.g. a compiled model's forward can
    be put there); `on_step(step, loss)` is called after each step (progress bars, evaluation).
    `scheduler.step()` follows every optimizer step; `clip_norm` clips the gradient norm of
    `model.parameters()` (read each step: a resize replaces factor tensors).
    """
    loss_of = loss_of or model.loss
    losses, seconds = [], []
    model.train()
    for step in range(steps):
        x, y = next(stream)
        start = time.perf_counter()
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses, seconds


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, block: int, seed: int, n_batches: int = 16,
             batch: int = 32) -> float:
    """Mean loss over `n_batches` fixed random validation batches (the model is left in
    training mode afterwards only if it was in it before)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = batches(val_ids, block, batch, torch.Generator().manual_seed(seed))
    value = statistics.mean(
        model.loss(*(t.to(device) for t in next(stream))).item() for _ in range(n_batches)
    )
    model.train(was_training)
    return value
