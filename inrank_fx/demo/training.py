"""The plain training loop the examples and benchmarks share: nothing InRank-specific in it
(an attached RankController runs inside optimizer.step())."""
from __future__ import annotations

import statistics
import time

import torch

from inrank_fx.demo.corpus import batches


def train_steps(
    model, optimizer, stream, steps: int, *, loss_of=None, on_step=None
) -> tuple[list[float], list[float]]:
    """Run `steps` optimizer steps on batches from `stream`; (losses, seconds of each step).

    `loss_of(x, y)` computes the loss (default: model.loss, e.g. a compiled model's forward can
    be put there); `on_step(step, loss)` is called after each step (progress bars, evaluation).
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
        optimizer.step()
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
