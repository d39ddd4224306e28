"""What `transform` did: the report left on the model (`inrank_fx.summary` reads it), and the
warnings it gives."""
from __future__ import annotations

import difflib
import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from .._table import format_table
from ..config import InRankConfig

log = logging.getLogger("inrank_fx")


@dataclass
class FactoredRecord:
    name: str
    kind: str  # "nn.Linear", "F.linear", "matmul", ...
    out_features: int
    in_features: int
    rank: int
    width: int
    requested_rank: int | None = None  # set when the requested rank exceeded the full rank

@dataclass(frozen=True)
class DenseRecord:
    """A weight left dense, and why. `asked`: it reached the filters (targets / exclude /
    filter_fn), and they said no."""

    name: str
    reason: str
    asked: bool = False
    # init_rank="auto" measured a rank at which the factored layer would hold more parameters
    # than the dense one (a flat spectrum, as an untrained model has)
    larger_factored: bool = False
    # a 3-D stack of matrices (mixture-of-experts weights, experts × out × in): not factored yet
    expert_stack: bool = False
    # with larger_factored: init_rank="auto" factors the layer at a threshold below this
    factor_threshold: float | None = None

@dataclass(frozen=True)
class CompressedLayer:
    """One layer as compressed: its rank, what it holds once frozen, the error it keeps."""

    name: str
    full_rank: int
    rank: int
    params: int  # as frozen: min(rank·(in + out), in·out) per matrix, plus the bias
    dense_params: int
    error: float  # ‖(W − W_r)·S‖² / ‖W·S‖²: on the calibration inputs where `calibrated`
    calibrated: bool


@dataclass
class Compression:
    """What `compress` did: the budget, how it was spent, and anything it could not measure."""

    budget: float
    allocation: str
    allocate_on: str  # the spectra a global allocation read: "weights" or "outputs"
    layers: list[CompressedLayer]
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def fraction(self) -> float:
        """Parameters of the factored layers, as frozen, over what they held dense."""
        return self.params / self.dense_params

    def __str__(self) -> str:
        rows = [(c.name, f"{c.rank}/{c.full_rank}", f"{c.params:,}", f"{c.dense_params:,}",
                 f"{c.error:.4f}", "yes" if c.calibrated else "no") for c in self.layers]
        head = (f"compressed {len(self.layers)} layer(s) to {self.fraction:.3f} of their dense "
                f"parameters ({self.params:,} of {self.dense_params:,}; budget {self.budget}, "
                f"allocation {self.allocation!r}"
                + (f" on the {self.allocate_on}' spectra)" if self.allocation == "global" else ")"))
        table = format_table(("layer", "rank", "params", "dense", "error", "calibrated"), rows)
        return "\n".join([head, table, *self.notes])


@dataclass
class TransformReport:
    """What `transform` did: factored layers, weights left dense (and why), and how each module's
    forward was handled."""

    config: InRankConfig = field(default_factory=InRankConfig)
    factored: list[FactoredRecord] = field(default_factory=list)
    dense: list[DenseRecord] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    not_traced: dict[str, str] = field(default_factory=dict)
    rewritten_forwards: list[str] = field(default_factory=list)
    already_factored: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)  # every layer the filters were asked about
    exported: list[str] = field(default_factory=list)  # forwards captured by torch.export instead
    captured: bool = False  # example inputs were given (the torch.export frontend was available)
    compression: Compression | None = None  # where `compress` made the model

    def __str__(self) -> str:
        lines = [f"factored {len(self.factored)} weight(s), left {len(self.dense)} dense"]
        for rec in self.factored:
            capped = f" (asked {rec.requested_rank}, capped)" if rec.requested_rank else ""
            lines.append(
                f"  factored {rec.name} [{rec.kind}] {rec.out_features}x{rec.in_features} "
                f"rank {rec.rank}{capped}, width {rec.width}"
            )
        lines += [f"  dense    {rec.name}: {rec.reason}" for rec in self.dense]
        lines.append(
            f"forwards traced: {len(self.traced)}, not traced: {len(self.not_traced)}, "
            f"rewritten as fx graphs: {', '.join(map(_label, self.rewritten_forwards)) or 'none'}"
        )
        lines += [f"  not traced {_label(p)}: {err}" for p, err in self.not_traced.items()]
        if self.exported:
            lines.append("captured with torch.export (fx could not trace them): "
                         + ", ".join(map(_label, self.exported)))
        if self.already_factored:
            lines.append(f"already factored (left as they are): {', '.join(self.already_factored)}")
        if self.compression is not None:
            lines.append(str(self.compression))
        return "\n".join(lines)

def _label(path: str) -> str:
    return f"'{path}'" if path else "the root module"

def larger_factored_note(report: TransformReport) -> str | None:
    """One line on layers init_rank="auto" kept dense because factoring them would add
    parameters, with what to do instead; None when there are none."""
    larger = [d for d in report.dense if d.larger_factored]
    if not larger:
        return None
    asked = len(larger) + len(report.factored)
    below = [d.factor_threshold for d in larger if d.factor_threshold is not None]
    threshold = (f"a threshold below {min(below):.4g} factors every one of them; "
                 if below else "")
    return (f"init_rank='auto' kept {len(larger)} of {asked} layers dense: at threshold "
            f"{report.config.threshold} their spectra ask for ranks at which factoring would add "
            f"parameters (a flat spectrum: a layer that uses most of its rank). To make a "
            f"trained model smaller to a size, use inrank_fx.compress(model, budget); "
            f"{threshold}to train from scratch, a small init_rank (e.g. 2) and attach() "
            f"grow the ranks.")

def warn_unmatched_patterns(config: InRankConfig, names: list[str]) -> None:
    """A targets / exclude pattern that matches no layer is almost always a typo: say so, with
    the layer names closest to it."""
    for field_name in ("targets", "exclude"):
        patterns = getattr(config, field_name)
        if patterns is None:
            continue
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            probe = InRankConfig(targets=pattern if isinstance(patterns, str) else [pattern])
            if any(probe.selects(n) for n in names):
                continue
            tails = {n.rpartition(".")[2]: n for n in names}
            near = difflib.get_close_matches(pattern, list(tails) + names, n=4, cutoff=0.5)
            hint = ", ".join(dict.fromkeys(tails.get(n, n) for n in near)) or ", ".join(names[:4])
            warnings.warn(
                f"inrank_fx.transform: {field_name} pattern {pattern!r} matches no layer; "
                f"nearest layer names: {hint or 'none (no factorable layers)'}",
                stacklevel=3,
            )

def announce(model: nn.Module, report: TransformReport) -> None:
    name = type(model).__name__
    note = larger_factored_note(report)
    if note:
        warnings.warn(f"inrank_fx.transform: {note}", stacklevel=3)
    if not report.factored:
        why = "; ".join(f"{d.name}: {d.reason}" for d in report.dense[:5])
        untraced = "; ".join(f"{_label(p)} ({e})" for p, e in list(report.not_traced.items())[:3])
        message = (
            f"inrank_fx.transform: no matmul against a weight was factored in {name}; "
            f"the model is returned unchanged"
            + (f" (left dense: {why})" if why else "")
            + (f"; forwards that did not trace, so their own matmuls could not be seen: {untraced}"
               if untraced else "")
        )
        warnings.warn(message, stacklevel=3)
        return
    capped = [r for r in report.factored if r.requested_rank]
    if capped:
        warnings.warn(
            "inrank_fx.transform: the requested rank exceeds the full rank of "
            + ", ".join(f"{r.name} ({r.requested_rank} > {min(r.out_features, r.in_features)})" for r in capped)
            + "; capped at the full rank",
            stacklevel=3,
        )
    log.info(
        "inrank_fx.transform: factored %d weight(s) in %s, %d left dense",
        len(report.factored), name, len(report.dense),
    )
