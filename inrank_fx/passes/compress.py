"""`compress`: a trained model made smaller to a parameter budget, each layer's rank measured.

    factor    transform at full rank (spectral init at full rank computes the model's function)
    measure   run the calibration inputs and keep each factored layer's input Gram matrix XᵀX
    spectra   singular values of W·S, S a square root of that Gram matrix: truncating them
              truncates the layer's output error on those inputs (activation-aware, as SVD-LLM
              and ASVD); without calibration S = I, plain SVD
    allocate  "global": the budget goes, one component at a time, where it removes the largest
              share of a layer's error per parameter (where rank is cheapest to give up);
              "uniform": one rank fraction for every layer (AIMET-style, the baseline)
    truncate  each layer set to the truncated SVD of W·S mapped back by S⁻¹; a silent buffer
              added where the config asks for one, so that ranks can grow back while fine-tuning

The ranks are a measurement of the trained weights (and of what the layers see), made under the
budget; the returned model is a transformed model: `attach` fine-tunes it, `freeze` ships it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import REPORT_ATTR, InRankConfig
from ..errors import InRankTypeError, InRankValueError
from ..nn.conv import InRankConv2d
from ..nn.linear import FactoredLayer, InRankLinear
from ..nn.modules import factored_layers
from ..vocabulary import ALLOCATE_ON, ALLOCATIONS
from .plan import FilterFn
from .report import CompressedLayer, Compression
from .transform import transform


def compress(
    model: nn.Module,
    budget: float,
    calibration: Iterable | None = None,
    *,
    allocation: str = "global",
    allocate_on: str = "weights",
    config: InRankConfig | None = None,
    filter_fn: FilterFn | None = None,
    example_inputs=None,
    damping: float = 0.01,
) -> nn.Module:
    """A factored copy of a trained `model` whose factored layers hold at most `budget` (a
    fraction in (0, 1]) of the parameters they held dense, counted as `freeze` ships them.

    `calibration`: example inputs, each a tensor, a tuple of positional arguments or a dict of
    keyword arguments, as the model is called (the first of a list is transform's
    `example_inputs` unless those are given). With them each layer is truncated where its
    output changes least on those inputs (whitened by its input Gram matrix, damped by
    `damping` × its mean diagonal); without them by plain SVD. `allocation`: "global" (ranks
    where the spectra say rank is cheapest, the default) or "uniform" (one rank fraction for
    every layer). `allocate_on`: the spectra the global allocation compares, "weights" (W: the
    default, measured better after fine-tuning) or "outputs" (W·S on the calibration inputs);
    the truncation itself uses the calibration either way. `config` picks the layers (targets,
    exclude, min_features, convs, ...) and how the model then trains: `buffer` > 0 lets ranks
    grow back while fine-tuning (`attach`; measured no better than fixed ranks, docs/SLIM.md).
    A layer is never made bigger than dense. `inrank_fx.summary(model)` and
    `model._inrank_report.compression` say what was done.
    """
    config = _checked_arguments(budget, allocation, allocate_on, damping, config)
    full = replace(config, init="svd", init_rank=1.0, buffer=0, silent_buffer=True)
    if example_inputs is None and isinstance(calibration, (list, tuple)) and calibration \
            and isinstance(calibration[0], (torch.Tensor, tuple)):
        example_inputs = calibration[0]  # checks each rewritten forward against the original
    factored = transform(model, full, filter_fn=filter_fn, example_inputs=example_inputs)
    layers = factored_layers(factored)
    if not layers:
        raise InRankValueError(f"compress: nothing in {type(model).__name__} could be factored "
                               "(see the warning above)")
    notes: list[str] = []
    grams = _input_grams(factored, layers, calibration, notes) if calibration is not None else {}
    whitening = {name: _whitening(gram, damping) for name, gram in grams.items()}
    spectra = {name: _spectrum(layer, whitening.get(name)) for name, layer in layers.items()}
    weights = spectra if not grams or allocate_on == "outputs" else \
        {name: _spectrum(layer, None) for name, layer in layers.items()}
    costs = {name: _Cost.of(layer) for name, layer in layers.items()}
    chosen = _allocate(weights, costs, budget, allocation)
    records = [_compressed(name, layer, chosen[name], whitening.get(name), config=config,
                           cost=costs[name], spectrum=spectra[name], calibrated=name in grams)
               for name, layer in layers.items()]
    compression = Compression(budget, allocation, allocate_on if grams else "weights", records,
                              notes)
    _leave_on_report(factored, layers, replace(config, init="svd", init_rank=1.0), compression)
    return factored


def _checked_arguments(budget, allocation, allocate_on, damping, config) -> InRankConfig:
    """compress's arguments checked; the config (the default: no buffer)."""
    _check_budget(budget)
    if allocation not in ALLOCATIONS:
        raise InRankValueError(f"compress: allocation must be one of {ALLOCATIONS}, "
                               f"got {allocation!r}")
    if allocate_on not in ALLOCATE_ON:
        raise InRankValueError(f"compress: allocate_on must be one of {ALLOCATE_ON}, "
                               f"got {allocate_on!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
        raise InRankValueError(f"compress: damping must be a number >= 0, got {damping!r}")
    config = config if config is not None else InRankConfig(buffer=0)
    if not isinstance(config, InRankConfig):
        raise InRankTypeError(f"compress: config must be an InRankConfig, got "
                              f"{type(config).__name__}")
    if config.activation is not None:
        raise InRankValueError("compress keeps each layer the linear map it was; "
                               f"InRankConfig.activation must be None, got {config.activation!r}")
    return config


def _compressed(name: str, layer: FactoredLayer, rank: int, whitening, *, config: InRankConfig,
                cost: "_Cost", spectrum, calibrated: bool) -> CompressedLayer:
    """The layer truncated to `rank` (where its outputs change least, given a whitening), with
    its buffer of silent columns, and its record."""
    _truncate(layer, rank, whitening)
    buffer = config.buffer_for(layer.full_rank)
    if buffer:  # silent columns: the function is unchanged, ranks can grow back
        layer.grow(min(config.width_for(layer.rank, layer.full_rank), layer.full_rank))
    layer.mark_reference()
    return CompressedLayer(name, layer.full_rank, layer.rank, cost.at(layer.rank), cost.dense,
                           _kept_error(spectrum, layer.rank), calibrated)


def _leave_on_report(model: nn.Module, layers: dict[str, FactoredLayer], config: InRankConfig,
                     compression: Compression) -> None:
    """The transform's report now says what compress made: the config `attach` reads, the
    compression, and each factored record's rank and width (a module's largest, for a module
    that holds several layers)."""
    report = getattr(model, REPORT_ATTR)
    report.config, report.compression = config, compression
    for rec in report.factored:
        inside = [m for n, m in layers.items() if n == rec.name or n.startswith(rec.name + ".")]
        if inside:
            rec.rank, rec.width = max(m.rank for m in inside), max(m.width for m in inside)


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InRankTypeError(f"compress: budget must be a fraction in (0, 1], got {budget!r}")
    if not 0.0 < budget <= 1.0:
        raise InRankValueError(f"compress: budget is the fraction of the factored layers' dense "
                               f"parameters to keep and must be in (0, 1], got {budget!r}")


# -- what each layer sees ---------------------------------------------------------------------

def _input_grams(model: nn.Module, layers: dict[str, FactoredLayer], calibration,
                 notes: list[str]) -> dict[str, torch.Tensor]:
    """Each matrix layer's input Gram matrix XᵀX over every row of the calibration inputs (an
    im2col row for a convolution), accumulated in float64."""
    grams: dict[str, torch.Tensor] = {}
    skipped = {}

    def hook(name, layer):
        def record(module, args):
            rows = _rows(layer, args[0]) if args else None
            if rows is None:
                skipped[name] = "its padding is a string" if args else "called with keywords"
                return
            rows = rows.detach().to(torch.float64)
            gram = rows.T @ rows
            grams[name] = grams[name] + gram if name in grams else gram
        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer))
               for name, layer in layers.items() if _matrix_layer(layer)]
    was_training = model.training
    model.eval()
    calls = 0
    try:
        with torch.no_grad():
            for example in calibration:
                args, kwargs = _call_of(example, calls)
                model(*args, **kwargs)
                calls += 1
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if calls == 0:
        raise InRankValueError("compress: calibration holds no inputs")
    for name in skipped:
        grams.pop(name, None)
    unseen = [n for n, layer in layers.items() if n not in grams]
    if unseen:
        why = {n: skipped.get(n, "not called on the calibration inputs" if _matrix_layer(layers[n])
                              else "an expert stack") for n in unseen}
        notes.append("truncated by plain SVD (no input statistics): "
                     + ", ".join(f"{n} ({w})" for n, w in why.items()))
    return grams


def _matrix_layer(layer: FactoredLayer) -> bool:
    return type(layer) in (InRankLinear, InRankConv2d) and layer.U.dim() == 2


def _rows(layer: FactoredLayer, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as rows of its matrix's inputs (im2col patches for a convolution)."""
    if isinstance(layer, InRankConv2d):
        if isinstance(layer.padding, str):
            return None
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return patches.transpose(1, 2).reshape(-1, layer.in_features)
    return x.reshape(-1, layer.in_features)


def _call_of(example, index: int) -> tuple[tuple, dict]:
    if torch.is_tensor(example):
        return (example,), {}
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, dict):
        return (), example
    raise InRankTypeError(f"compress: calibration input {index} is a {type(example).__name__}; "
                          "expected a tensor, a tuple of positional arguments or a dict of "
                          "keyword arguments")


# -- spectra and truncation ---------------------------------------------------------------------

def _whitening(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S·Sᵀ = XᵀX + λI, λ = damping × its mean diagonal (directions the inputs
    never take keep a finite weight)."""
    lam = damping * gram.diagonal().mean().clamp_min(1e-30)
    values, vectors = torch.linalg.eigh(gram + lam * torch.eye(len(gram), dtype=gram.dtype,
                                                                device=gram.device))
    root = values.clamp_min(lam * 1e-6).sqrt()
    return vectors * root, (vectors / root).T


def _matrix(layer: FactoredLayer) -> torch.Tensor:
    return layer.U.detach().to(torch.float64) @ layer.V.detach().to(torch.float64).T


def _spectrum(layer: FactoredLayer, whitening: tuple | None) -> torch.Tensor:
    """Squared singular values, one row per matrix (a stack has one per expert), of W·S."""
    if layer.U.dim() == 3:
        return layer.singular_values().to(torch.float64).reshape(layer.U.shape[0], -1) ** 2
    w = _matrix(layer)
    if whitening is not None:
        w = w @ whitening[0].to(w.device)
    return torch.linalg.svdvals(w)[None] ** 2


@torch.no_grad()
def _truncate(layer: FactoredLayer, rank: int, whitening: tuple | None) -> None:
    """Set the layer to `rank`: W ≈ (W·S)_r·S⁻¹, split evenly between U and V."""
    if layer.U.dim() == 3 or whitening is None:  # plain SVD: the layer's own truncation
        layer.truncate(rank)
        layer.rank = rank
        return
    w = _matrix(layer)
    s, s_inv = (m.to(w.device) for m in whitening)
    p, sigma, rt = torch.linalg.svd(w @ s, full_matrices=False)
    root = sigma[:rank].sqrt()
    u = p[:, :rank] * root
    v = (rt[:rank] * root[:, None] @ s_inv).T
    dtype = layer.U.dtype
    layer.U = nn.Parameter(u.to(dtype))
    layer.V = nn.Parameter(v.to(dtype).contiguous())
    layer.rank = rank


def _kept_error(power: torch.Tensor, rank: int) -> float:
    """The share of ‖W·S‖² the truncation to `rank` leaves out."""
    total = power.sum()
    return float(power[:, rank:].sum() / total) if total > 0 else 0.0


# -- the allocation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cost:
    """Parameters of a layer as frozen: `per_rank` for each component, `fixed` (bias) always,
    `dense` for the dense layer; `ceiling` the largest rank that is not bigger than dense."""

    per_rank: int
    fixed: int
    dense: int
    full_rank: int
    ceiling: int

    @classmethod
    def of(cls, layer: FactoredLayer) -> "_Cost":
        experts = layer.U.shape[0] if layer.U.dim() == 3 else 1
        n_in, n_out = layer.in_features, layer.out_features
        bias = layer.bias.numel() if getattr(layer, "bias", None) is not None else 0
        ceiling = max(1, min(layer.full_rank, (n_in * n_out) // (n_in + n_out)))
        return cls(experts * (n_in + n_out), bias, experts * n_in * n_out + bias, layer.full_rank,
                   ceiling)

    def at(self, rank: int) -> int:
        return min(rank * self.per_rank, self.dense - self.fixed) + self.fixed


def _allocate(spectra: dict[str, torch.Tensor], costs: dict[str, _Cost], budget: float,
              allocation: str) -> dict[str, int]:
    """Ranks for every layer whose parameters as frozen sum to at most `budget` of dense."""
    allowed = budget * sum(c.dense for c in costs.values())
    least = sum(c.at(1) for c in costs.values())
    if least > allowed:
        dense = sum(c.dense for c in costs.values())
        raise InRankValueError(f"compress: budget {budget} is below what rank 1 in every factored "
                               f"layer holds ({least / dense:.4f} of their dense parameters)")
    if allocation == "uniform":
        return _uniform(costs, allowed)
    return _greedy(spectra, costs, allowed)


def _greedy(spectra: dict[str, torch.Tensor], costs: dict[str, _Cost],
            allowed: float) -> dict[str, int]:
    """From rank 1 everywhere, add the component that removes the largest share of its layer's
    error per parameter while it fits. Each layer's gains fall with the rank, so taking them in
    that order keeps every layer's components a prefix."""
    ranks = dict.fromkeys(spectra, 1)
    spent = sum(c.at(1) for c in costs.values())
    items = []
    for name, power in spectra.items():
        gains = power.sum(0) / power.sum().clamp_min(1e-300)  # each component's share of ‖W·S‖²
        for k in range(1, costs[name].ceiling):
            items.append((float(gains[k]) / costs[name].per_rank, name, k))
    items.sort(key=lambda item: (-item[0], item[1], item[2]))
    for _, name, k in items:
        cost = costs[name].per_rank
        if ranks[name] == k and spent + cost <= allowed:
            ranks[name] = k + 1
            spent += cost
    return ranks


def _uniform(costs: dict[str, _Cost], allowed: float) -> dict[str, int]:
    """The largest single fraction of full rank (rounded down per layer, at least 1, at most
    the ceiling) whose ranks fit."""

    def ranks_at(fraction: float) -> dict[str, int]:
        return {name: min(c.ceiling, max(1, math.floor(fraction * c.full_rank + 1e-9)))
                for name, c in costs.items()}

    fractions = sorted({k / c.full_rank for c in costs.values()
                        for k in range(1, c.ceiling + 1)})
    best = ranks_at(fractions[0])
    low, high = 0, len(fractions) - 1
    while low <= high:  # the cost only grows with the fraction: bisect
        middle = (low + high) // 2
        candidate = ranks_at(fractions[middle])
        if sum(costs[n].at(r) for n, r in candidate.items()) <= allowed:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best
