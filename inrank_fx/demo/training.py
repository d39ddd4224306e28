"""The plain training loop the examples and benchmarks share: nothing InRank-specific in it
(an attached RankController runs inside optimizer.step())."""
from __future__ import annotations

import statistics
import time

import torch

from inrank_fx.demo.corpus import batches


def train_steps(model, optimizer, stream, steps: int) -> tuple[list[float], list[float]]:
    """Run `steps` optimizer steps on batches from `stream`; (losses, seconds of each step)."""
    losses, seconds = [], []
    model.train()
    for _ in range(steps):
        x, y = next(stream)
        start = time.perf_counter()
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, seconds


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, block: int, seed: int, n_batches: int = 16) -> float:
    """Mean loss over `n_batches` fixed random validation batches."""
    model.eval()
    stream = batches(val_ids, block, 32, torch.Generator().manual_seed(seed))
    return statistics.mean(model.loss(*next(stream)).item() for _ in range(n_batches))
