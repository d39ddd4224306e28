"""Inspection: the current rank of every factored layer, and a cost table against dense."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._flops import counted_forward
from .._table import format_table
from ..config import REPORT_ATTR
from ..nn.experts import FACTORED_STACKS
from ..nn.modules import factored_layers
from ..passes.report import DenseRecord, TransformReport, larger_factored_note


@dataclass
class LayerSummary:
    name: str
    out_features: int
    in_features: int
    rank: int
    width: int
    dense_params: int
    factored_params: int
    dense_flops: int  # per input row
    factored_flops: int


@dataclass
class FlopCoverage:
    """Weight-matmul FLOPs of one forward, measured with torch.utils.flop_counter."""

    factored_dense_equivalent: int  # what the factored layers would cost dense
    factored_actual: int
    left_dense: int  # matmul / convolution FLOPs outside factored layers and tied heads
    tied: int  # in layers tied to an embedding (kept dense by design)

    @property
    def share(self) -> float:
        total = self.factored_dense_equivalent + self.left_dense
        return self.factored_dense_equivalent / total if total else 0.0

    def __str__(self) -> str:
        return (f"matmul FLOPs factored: {self.share:.1%} of "
                f"{(self.factored_dense_equivalent + self.left_dense) / 1e9:.3f} GFLOPs outside "
                f"embedding-tied layers ({self.tied / 1e9:.3f} GFLOPs there); factored layers "
                f"run {self.factored_actual / 1e9:.3f} GFLOPs instead of "
                f"{self.factored_dense_equivalent / 1e9:.3f}")


@dataclass
class Summary:
    layers: list[LayerSummary]
    dense: list[DenseRecord]
    model_params: int
    report: TransformReport | None
    flops: FlopCoverage | None = None

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def factored_params(self) -> int:
        return sum(layer.factored_params for layer in self.layers)

    @property
    def dense_flops(self) -> int:
        return sum(layer.dense_flops for layer in self.layers)

    @property
    def factored_flops(self) -> int:
        return sum(layer.factored_flops for layer in self.layers)

    def __str__(self) -> str:
        header = ("layer", "shape", "rank", "width", "params dense", "params factored",
                  "FLOPs/row dense", "FLOPs/row factored")
        rows = [
            (l.name, f"{l.out_features}x{l.in_features}", str(l.rank), str(l.width),
             f"{l.dense_params:,}", f"{l.factored_params:,}", f"{l.dense_flops:,}",
             f"{l.factored_flops:,}")
            for l in self.layers
        ]
        total = ("total", "", "", "", f"{self.dense_params:,}", f"{self.factored_params:,}",
                 f"{self.dense_flops:,}", f"{self.factored_flops:,}")
        note = larger_factored_note(self.report) if self.report is not None else None
        lines = [f"note: {note}"] if note else []
        if self.layers:
            lines.append(format_table(header, rows, left=2, total=total))
            dense_model = self.model_params - self.factored_params + self.dense_params
            lines.append(
                f"factored layers: params x{self.factored_params / self.dense_params:.3f}, "
                f"FLOPs x{self.factored_flops / self.dense_flops:.3f} of dense; "
                f"model params {self.model_params:,} vs {dense_model:,} dense "
                f"(x{self.model_params / dense_model:.3f})"
            )
        else:
            lines.append("no factored layers")
        if self.flops is not None:
            lines.append(str(self.flops))
        if self.dense:
            lines.append("left dense:")
            lines += [f"  {d.name}: {d.reason}" for d in self.dense]
        if self.report is not None and self.report.exported:
            lines.append("frontends: torch.fx symbolic tracing, except these forwards, captured with "
                         "torch.export at the example call: "
                         + ", ".join(p or "<root>" for p in self.report.exported))
        if self.report is not None and self.report.not_traced:
            lines.append("forwards that did not trace (their nn.Linear children swapped as leaves):")
            lines += [f"  {p or '<root>'}: {e}" for p, e in self.report.not_traced.items()]
        return "\n".join(lines)


def summary(model: nn.Module, example_inputs=None) -> Summary:
    """Per factored layer: shape, rank, params and FLOPs per row, dense vs factored; totals;
    and the weights `transform` left dense, with the reason. `str()` gives the table.

    With `example_inputs`, one forward is run under torch.utils.flop_counter to measure which
    share of the model's weight-matmul FLOPs the factored layers carry (`.flops`).
    """
    layers = [
        LayerSummary(name, m.out_features, m.in_features, m.rank, m.width, m.dense_params(),
                     m.factored_params(), m.dense_flops_per_row(), m.flops_per_row())
        for name, m in factored_layers(model).items()
    ]
    report = getattr(model, REPORT_ATTR, None)
    model_params = sum(p.numel() for p in model.parameters())
    result = Summary(layers, list(report.dense) if report else [], model_params, report)
    if example_inputs is not None:
        result.flops = flop_coverage(model, example_inputs)
    return result


def _op_name(op) -> str:
    return str(op).rpartition(".")[2].split("'")[0]


def _is_weight_matmul(op) -> bool:
    return _op_name(op) in ("mm", "addmm", "convolution", "_convolution")


def _is_batched_matmul(op) -> bool:
    """What runs stacked expert weights (and attention, so counted only inside experts)."""
    return _op_name(op) in ("bmm", "baddbmm", "_grouped_mm")


def flop_coverage(model: nn.Module, example_inputs) -> FlopCoverage:
    """Measure how much of one forward's weight-matmul work the factored layers carry."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    counts = counted_forward(model, inputs).get_flop_counts()
    root = type(model).__name__

    def flops(path: str, only_weight_ops: bool = True, kind=_is_weight_matmul) -> int:
        ops = counts.get(f"{root}.{path}" if path else root, {})
        return sum(v for op, v in ops.items() if not only_weight_ops or kind(op))

    layers = factored_layers(model)
    # Everything a factored layer counts is a matmul of its factors, whatever aten op ran it.
    actual = {name: flops(name, only_weight_ops=False) for name in layers}
    equivalent = sum(actual[n] * l.dense_flops_per_row() / l.flops_per_row() for n, l in layers.items())
    report = getattr(model, REPORT_ATTR, None)
    tied_paths = [d.name.rpartition(".")[0] for d in (report.dense if report else []) if "tied" in d.reason]
    tied = sum(flops(p) for p in tied_paths)
    left = flops("") - sum(flops(name) for name in layers) - tied
    # Stacked expert weights run as batched matmuls in the module that holds them: dense work
    # where the stack was left dense or its product is read; a factored stack's own calls (thin
    # matmuls, counted above) are not.
    stacks = {d.name.rpartition(".")[0] for d in (report.dense if report else []) if d.expert_stack}
    factored_stacks = [n for n, m in model.named_modules() if isinstance(m, FACTORED_STACKS)]
    stacks |= {n.rpartition(".")[0] for n in factored_stacks}
    left += sum(flops(p, kind=_is_batched_matmul) for p in stacks)
    left -= sum(flops(n, kind=_is_batched_matmul) for n in factored_stacks)
    return FlopCoverage(int(equivalent), sum(actual.values()), max(left, 0), tied)
