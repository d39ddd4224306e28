"""A byte-level text corpus that every machine with Python already has: the standard library's
own .py sources, read in sorted order so that the corpus is the same on every run."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from ..errors import InRankValueError


def stdlib_corpus(max_bytes: int = 2_000_000) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no .py files under {root}")
    return b"".join(chunks)[:max_bytes]


def file_corpus(path, min_bytes: int = 1024) -> bytes:
    """The bytes of a user's text file, refusing files that are missing or too small to train on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if len(data) < min_bytes:
        what = "empty" if not data else f"only {len(data)} bytes"
        raise InRankValueError(f"{path}: {what}; the demo needs at least {min_bytes} bytes of text")
    return data


def split(data: bytes, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (bytes) for training and held-out validation."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def batches(ids: torch.Tensor, block: int, batch: int, generator: torch.Generator):
    """Endless random (input, target) batches of `batch` windows of `block` tokens."""
    while True:
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + block + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def step_batch(ids: torch.Tensor, block: int, batch: int, seed: int, step: int):
    """The (input, target) batch for optimizer step `step`: the same on every process and in
    every run (seeded by seed and step), so that N processes training on its slices compute what
    one process computes on the whole batch, and a resumed run sees the batches it would have."""
    return next(batches(ids, block, batch, torch.Generator().manual_seed(seed * 1_000_003 + step)))

