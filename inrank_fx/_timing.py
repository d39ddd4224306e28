"""How much a timing ratio can be trusted: a bootstrap interval, and the flags that say when not.

Ratios of wall-clock medians (dense over factored) move with whatever else the machine is doing;
each one is reported with the interval its own samples support, and flagged where it exceeds
what the FLOPs allow or where that interval is wide.
"""
from __future__ import annotations

import random
import statistics
from typing import Sequence

from .errors import InRankValueError

# A ratio whose 90% interval spans more than this factor (high / low) is flagged as noisy.
WIDE_INTERVAL = 1.25


def median_ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *,
                          level: float = 0.9, resamples: int = 1000,
                          seed: int = 0) -> tuple[float, float]:
    """The `level` bootstrap percentile interval of median(numerator) / median(denominator),
    each sample resampled with replacement on its own (the two are timed separately)."""
    if not numerator or not denominator:
        raise InRankValueError("median_ratio_interval needs samples on both sides")
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(numerator, k=len(numerator)))
        / statistics.median(rng.choices(denominator, k=len(denominator)))
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1 - tail) * (resamples - 1))]


def ratio_flags(ratio: float, interval: tuple[float, float],
                ideal: float | None = None) -> list[str]:
    """Why a measured speedup should not be taken at face value (empty when nothing is wrong)."""
    flags = []
    if ideal is not None and ratio > ideal:
        flags.append(f"{ratio:.2f}x is above the FLOP-ideal {ideal:.2f}x: not a speedup the "
                     f"arithmetic allows (noise, caching or a slow dense run); rerun on a quiet "
                     f"machine")
    low, high = interval
    if low > 0 and high / low > WIDE_INTERVAL:
        flags.append(f"90% interval {low:.2f}x-{high:.2f}x is wide: the machine was busy or "
                     f"the run too short (more --iters)")
    return flags


def format_rate(value: float) -> str:
    """Throughput with enough digits to read at any scale (1,234 / 56.7 / 0.0123)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
