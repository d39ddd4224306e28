"""`InRankConfig`: every knob of the transform and of rank adaptation, validated up front.

Validation happens at construction so that a bad value fails where the user wrote it, with the
field's name in the message, instead of deep inside a training loop.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union

from ._io import atomic_destination, check_destination
from .errors import InRankTypeError, InRankValueError
from .nn.linear import ACTIVATIONS
from .vocabulary import (
    CONVS,
    CRITERIA,
    EXPERT_RANKS,
    GROW_INITS,
    INITS,
    MEASURES,
    TRUNCATE_STATES,
    Convs,
    Criterion,
    ExpertRanks,
    GrowInit,
    Init,
    Measure,
    TruncateState,
)

# The attribute on which `transform` leaves its report (with the config it used), so that
# `attach` and `freeze` can read it without depending on the pass.
REPORT_ATTR = "_inrank_report"

RankSpec = Union[int, float, str]


@dataclass
class InRankConfig:
    """How `inrank_fx.transform` factors a model and how ranks grow during training.

    Factoring:
        init: how the factors start from the module's own weights. "svd": truncated SVD; on a
            freshly initialised model this is spectral initialisation (the model's own init
            scale and leading directions), on a trained one the best rank-r approximation.
            "random": random directions at the scale of the module's top singular values.
            "iid": i.i.d. factors at nn.Linear's default variance, ignoring the module's init.
            In every case the buffer starts silent (its U columns zero) unless
            `silent_buffer=False`.
        silent_buffer: True (default): the buffer's U columns start at zero, so a layer starts
            exactly at its rank. False: random, as in the reference implementation (kept for
            comparisons; its random components enter the spectrum the rule reads).
        init_rank: int = exact rank; float in (0, 1] = fraction of each layer's full rank;
            "auto" = the smallest rank whose explained ratio exceeds `threshold` (svd only).
        buffer: spare components beyond the rank that the layer computes with while ranks adapt
            (InRank's buffer). int = count, float in (0, 1] = fraction of the full rank.
        activation: None (default): the factored layer is the linear map U·Vᵀ. "silu", "gelu"
            or "relu": a nonlinearity between the factors, x → σ(x·V) → ·Uᵀ (CoLA, Liu et al.,
            EMNLP 2025), for training from scratch: it is a different model, never the function
            it was built from, so not for compressing a trained one. Ranks adapt on the
            component magnitudes ‖u_i‖·‖v_i‖ (measure="weight" only). nn.Conv2d stays linear.
        min_features: layers with min(in, out) below this stay dense.
        convs: which nn.Conv2d to factor (groups=1 only): "1x1" (channel matmuls, the default),
            "all" (k×k too, as a k×k conv to r channels then a 1×1 conv), or "none".
        expert_ranks: mixture-of-experts stacks (E × out × in): "stack" (the default: one rank
            for the stack, the largest any expert asks for; its matmuls stay batched) or
            "expert" (each expert its own rank, run one expert after another). Measured in
            docs/MODELS.md ("Ranks per stack or per expert").
        targets / exclude: layer-name patterns, PEFT-style. A list entry matches a name equal to
            it, ending in "." + it, or matching it as a glob; a single string is a regex that
            must match the whole name. None targets every layer.

    Adaptation (used by `inrank_fx.attach`):
        measure: which spectrum the rule reads. "update": the cumulative update W_t − W_0 since
            the layer was built (what InRank's theory says grows in rank); "weight": the whole
            weight W_t, as the reference code does.
        threshold: α of the explained-ratio rule, in (0, 1). criterion: "variance" (the paper's
            1 − var(s − s_k)/var(s) over the measured singular values), "variance_padded" (the
            reference code's exact ratio: s zero-padded to the full rank) or "energy"
            (Σ_{i<k} s_i² / Σ s_i²). docs/TRAINING.md has the measurements behind the defaults.
        ranks_only_grow: False (default): every check re-measures the rank, never below the
            rank the layer started with and never above its width, so a transient early
            spectrum does not fix the final rank (the width, i.e. memory, only grows while
            adapting). True: the reference's rule, the smallest k ≥ the current rank.
        warmup_steps, check_every: optimizer steps before the first check, and between checks.
        stop_after: when adaptation stops (InRank-Efficient: every layer is truncated to its
            rank, the buffer dropped, and training goes on at fixed ranks). An int: after this
            many optimizer steps. "settled": once the ranks have settled, i.e. over the last
            `settle_checks` checks the layers' ranks moved (max − min, summed over layers) by
            at most `settle_tolerance` of their sum; the default, chosen on the long runs of
            benchmarks/bench_convergence.py against adapting throughout and a fixed stop
            (docs/TRAINING.md). None adapts for the whole run.
        rank_multiple: round each layer's computed width up to a multiple of this (e.g. 8 for
            tensor cores).
        grow_init: how components added by growth start: "zero" (new U columns zero, new V
            columns random: the function is unchanged at the moment of growth) or "random"
            (both random at the scale of the existing factors). See docs/TRAINING.md.
        truncate_state: the optimizer state of a layer truncated at the stop: "reset" (zero
            moments, step 0; the default) or "rotated" (its moments carried into the truncated
            basis by the truncation's own linear map, step counts kept; measured no better on
            the long runs, docs/TRAINING.md).
    """

    init: Init = "svd"
    init_rank: RankSpec = 2
    buffer: Union[int, float] = 0.1
    silent_buffer: bool = True
    measure: Measure = "weight"
    threshold: float = 0.9995
    criterion: Criterion = "variance"
    ranks_only_grow: bool = False
    warmup_steps: int = 25
    check_every: int = 25
    stop_after: int | Literal["settled"] | None = "settled"
    settle_checks: int = 4
    settle_tolerance: float = 0.05
    rank_multiple: int = 1
    grow_init: GrowInit = "zero"
    truncate_state: TruncateState = "reset"
    activation: str | None = None
    min_features: int = 16
    convs: Convs = "1x1"
    expert_ranks: ExpertRanks = "stack"
    targets: Union[Sequence[str], str, None] = None
    exclude: Union[Sequence[str], str, None] = field(default=None)

    def __post_init__(self) -> None:
        for name, vocabulary in (("init", INITS), ("measure", MEASURES), ("criterion", CRITERIA),
                                 ("grow_init", GROW_INITS), ("truncate_state", TRUNCATE_STATES),
                                 ("convs", CONVS), ("expert_ranks", EXPERT_RANKS)):
            _check_word(name, getattr(self, name), vocabulary)
        _check_rank_spec("init_rank", self.init_rank, allow_auto=True)
        if self.init_rank == "auto" and self.init != "svd":
            raise InRankValueError(
                "InRankConfig.init_rank='auto' picks the rank from existing weights and needs "
                f"init='svd', got init={self.init!r}"
            )
        _check_rank_spec("buffer", self.buffer, allow_zero=True)
        _check_number("threshold", self.threshold, "(0, 1)", lambda v: 0.0 < v < 1.0)
        self._check_activation()
        for name in ("silent_buffer", "ranks_only_grow"):
            if not isinstance(getattr(self, name), bool):
                raise InRankTypeError(
                    f"InRankConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("check_every", self.check_every, minimum=1)
        if self.stop_after is not None and self.stop_after != "settled":
            if isinstance(self.stop_after, str):
                raise InRankValueError("InRankConfig.stop_after must be an int, 'settled' or "
                                       f"None, got {self.stop_after!r}")
            _check_int("stop_after", self.stop_after, minimum=0)
        _check_int("settle_checks", self.settle_checks, minimum=1)
        _check_number("settle_tolerance", self.settle_tolerance, "[0, 1)",
                      lambda v: 0.0 <= v < 1.0)
        _check_int("rank_multiple", self.rank_multiple, minimum=1)
        _check_int("min_features", self.min_features, minimum=1)
        for name in ("targets", "exclude"):
            _check_patterns(name, getattr(self, name))

    def _check_activation(self) -> None:
        if self.activation is None:
            return
        if self.activation not in ACTIVATIONS:
            raise InRankValueError(f"InRankConfig.activation must be one of "
                                   f"{tuple(ACTIVATIONS)} or None, got {self.activation!r}")
        if self.measure != "weight":
            raise InRankValueError("InRankConfig.activation needs measure='weight': with a "
                                   "nonlinearity between the factors the update is not a matrix")

    # -- saving and loading (checkpoints, `save_transformed`) --------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically), to rebuild a transformed model with it."""
        path = check_destination(path)
        with atomic_destination(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InRankConfig":
        """A config written by `save`. Fields this version does not know are ignored with a
        warning (a config saved by a newer inrank_fx); missing ones take their defaults."""
        values = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            warnings.warn(f"{path}: ignoring InRankConfig fields this version does not have: "
                          f"{', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in names})

    # -- derived values -------------------------------------------------------------------

    def rank_for(self, full_rank: int) -> int:
        """The initial rank for a layer of this full rank ('auto' is resolved by the caller)."""
        return resolve_count(self.init_rank, full_rank)

    def buffer_for(self, full_rank: int) -> int:
        return resolve_count(self.buffer, full_rank, allow_zero=True)

    def width_for(self, rank: int, full_rank: int) -> int:
        """Components a layer computes with: rank + buffer, rounded up to `rank_multiple`,
        capped at the full rank."""
        width = rank + self.buffer_for(full_rank)
        width = -(-width // self.rank_multiple) * self.rank_multiple
        return min(width, full_rank)

    def selects(self, name: str) -> bool:
        """Whether the targets / exclude patterns admit the layer called `name`."""
        if self.targets is not None and not _matches(self.targets, name):
            return False
        return self.exclude is None or not _matches(self.exclude, name)


def resolve_count(spec: int | float, full_rank: int, allow_zero: bool = False) -> int:
    """An int is a count; a float in (0, 1] is a fraction of `full_rank` (rounded up)."""
    if isinstance(spec, float):
        count = math.ceil(spec * full_rank)
        return max(count, 0 if allow_zero and spec == 0 else 1)
    return int(spec)


def _matches(patterns: Sequence[str] | str, name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(
        name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def _check_word(name: str, value, vocabulary) -> None:
    """A string that picks a behaviour: a wrong type is a TypeError, a wrong word a ValueError."""
    if not isinstance(value, str):
        raise InRankTypeError(f"InRankConfig.{name} must be a string, got {value!r}")
    if value not in vocabulary:
        raise InRankValueError(f"InRankConfig.{name} must be one of {vocabulary}, got {value!r}")


def _check_number(name: str, value, interval: str, inside) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InRankTypeError(f"InRankConfig.{name} must be a number in {interval}, got {value!r}")
    if not inside(value):
        raise InRankValueError(f"InRankConfig.{name} must be in {interval}, got {value!r}")


def _check_patterns(name: str, patterns) -> None:
    """targets / exclude: None, one regex, or a list of names and glob patterns."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as err:
            raise InRankValueError(f"InRankConfig.{name} is not a valid regex: {err}") from None
    elif not all(isinstance(p, str) for p in patterns):
        raise InRankTypeError(f"InRankConfig.{name} must be a string or a list of strings")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InRankTypeError(f"InRankConfig.{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise InRankValueError(f"InRankConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_rank_spec(name: str, value, allow_auto: bool = False, allow_zero: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool):
        raise InRankTypeError(f"InRankConfig.{name} must be an int or a float, got {value!r}")
    if isinstance(value, int):
        if value < (0 if allow_zero else 1):
            raise InRankValueError(
                f"InRankConfig.{name} must be >= {0 if allow_zero else 1}, got {value!r}"
            )
        return
    if isinstance(value, float):
        low_ok = value >= 0.0 if allow_zero else value > 0.0
        if not (low_ok and value <= 1.0):
            raise InRankValueError(
                f"InRankConfig.{name} as a float is a fraction of the full rank and must be in "
                f"{'[0' if allow_zero else '(0'}, 1], got {value!r}"
            )
        return
    kinds = "an int, a float fraction or 'auto'" if allow_auto else "an int or a float fraction"
    error = InRankValueError if isinstance(value, str) else InRankTypeError  # 'half': a wrong word
    raise error(f"InRankConfig.{name} must be {kinds}, got {value!r}")
