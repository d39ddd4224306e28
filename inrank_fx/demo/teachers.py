"""Ground truth for the rank rule: models whose layers must learn maps of known, different ranks.

- `TeacherHeads`: parallel linear heads on one input, head i regressing x·T_iᵀ with T_i of rank
  r_i. Each head's weight converges to its teacher, so its rank is known exactly.
- `TeacherStack`: a deeper net of residual blocks h ← h + A_i·gelu(h), trained with a loss on
  every block's output against a teacher of the same form whose A_i has rank r_i.

A teacher's singular values are spread evenly over [scale/2, scale] (so every mode matters and
the rank is unambiguous). `fit` trains a model with AdamW on fresh Gaussian inputs and an
optional attached RankController, and returns the losses; the benchmarks and the tests share it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InRankValueError


def low_rank_teacher(out_features: int, in_features: int, rank: int, scale: float,
                     generator: torch.Generator) -> torch.Tensor:
    """An out×in matrix of exactly `rank` singular values, evenly spread over [scale/2, scale]."""
    q_u = torch.linalg.qr(torch.randn(out_features, rank, generator=generator)).Q
    q_v = torch.linalg.qr(torch.randn(in_features, rank, generator=generator)).Q
    s = torch.linspace(scale, scale / 2, rank)
    return (q_u * s) @ q_v.T


class _Taught(nn.Module):
    """len(ranks) nn.Linear(dim, dim) layers in the ModuleList `self.<layers>`, and as a buffer
    one teacher matrix per layer, of that layer's rank."""

    layers = ""

    def __init__(self, dim: int, ranks, *, scale: float, seed: int) -> None:
        super().__init__()
        self.ranks = tuple(ranks)
        g = torch.Generator().manual_seed(seed)
        setattr(self, self.layers, nn.ModuleList(nn.Linear(dim, dim) for _ in self.ranks))
        self.register_buffer("teachers", torch.stack(
            [low_rank_teacher(dim, dim, r, scale, g) for r in self.ranks]), persistent=False)

    def true_ranks(self) -> dict[str, int]:
        return {f"{self.layers}.{i}": r for i, r in enumerate(self.ranks)}

    @torch.no_grad()
    def raise_rank(self, index: int, rank: int, *, scale: float | None = None,
                   seed: int = 1) -> None:
        """Give layer `index` a teacher of higher rank mid-training: its teacher gains
        rank − (old rank) new components, orthogonal to the ones it has, at `scale` (default:
        the old teacher's top singular value)."""
        old = self.teachers[index]
        extra = rank - self.ranks[index]
        if extra <= 0:
            raise InRankValueError(
                f"raise_rank: {rank} must exceed the teacher's rank {self.ranks[index]}"
            )
        s = torch.linalg.svdvals(old)
        scale = float(s[0]) if scale is None else scale
        g = torch.Generator().manual_seed(seed)
        dim_out, dim_in = old.shape
        u, _, vh = torch.linalg.svd(old)
        # new directions outside the old teacher's row and column spaces
        q_u = u[:, self.ranks[index]:] @ torch.linalg.qr(
            torch.randn(dim_out - self.ranks[index], extra, generator=g)).Q
        q_v = vh[self.ranks[index]:].T @ torch.linalg.qr(
            torch.randn(dim_in - self.ranks[index], extra, generator=g)).Q
        self.teachers[index] = old + (q_u * torch.linspace(scale, scale / 2, extra)) @ q_v.T
        ranks = list(self.ranks)
        ranks[index] = rank
        self.ranks = tuple(ranks)


class TeacherHeads(_Taught):
    """Parallel heads on one input; `targets(x)` are the teachers' outputs."""

    layers = "heads"

    def __init__(self, dim: int, ranks, *, scale: float = 2.0, seed: int = 0) -> None:
        super().__init__(dim, ranks, scale=scale, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hoi,bi->hbo", self.teachers, x)


class TeacherStack(_Taught):
    """Residual blocks h ← h + block_i(gelu(h)); `forward` returns every block's output."""

    layers = "blocks"

    def __init__(self, dim: int, ranks, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(dim, ranks, scale=scale, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for block in self.blocks:
            x = x + block(F.gelu(x))
            outputs.append(x)
        return torch.stack(outputs)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for teacher in self.teachers:
            x = x + F.gelu(x) @ teacher.T
            outputs.append(x)
        return torch.stack(outputs)


def fit(model: nn.Module, teacher: nn.Module, steps: int, *, lr: float = 1e-2, batch: int = 256,
        seed: int = 1, optimizer: torch.optim.Optimizer | None = None, on_step=None) -> list[float]:
    """Train `model` to reproduce `teacher.targets` on fresh N(0, 1) inputs; the losses per step.

    `model` may be `teacher` itself after `inrank_fx.transform` (the teachers are buffers, the
    student is the layers). Pass `optimizer` to attach a RankController to it beforehand.
    """
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    dim = teacher.teachers.shape[-1]
    losses = []
    for step in range(steps):
        x = torch.randn(batch, dim, generator=g)
        loss = F.mse_loss(model(x), teacher.targets(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses
