"""Inspection: the current rank of every factored layer, and a cost table against dense."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import InRankLinear
from .transform import REPORT_ATTR, DenseRecord, TransformReport


def factored_layers(model: nn.Module) -> dict[str, InRankLinear]:
    """Qualified name → InRankLinear, in module order (a shared layer is listed once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, InRankLinear)}


def ranks(model: nn.Module) -> dict[str, int]:
    """Qualified name → the rank r of each factored layer."""
    return {name: layer.rank for name, layer in factored_layers(model).items()}


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
class Summary:
    layers: list[LayerSummary]
    dense: list[DenseRecord]
    model_params: int
    report: TransformReport | None

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
        rows.append(("total", "", "", "", f"{self.dense_params:,}", f"{self.factored_params:,}",
                     f"{self.dense_flops:,}", f"{self.factored_flops:,}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
        rule = "-" * len(fmt(header))
        lines = [fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])]
        if self.layers:
            dense_model = self.model_params - self.factored_params + self.dense_params
            lines.append(
                f"factored layers: params x{self.factored_params / self.dense_params:.3f}, "
                f"FLOPs x{self.factored_flops / self.dense_flops:.3f} of dense; "
                f"model params {self.model_params:,} vs {dense_model:,} dense "
                f"(x{self.model_params / dense_model:.3f})"
            )
        else:
            lines.append("no factored layers")
        if self.dense:
            lines.append("left dense:")
            lines += [f"  {d.name}: {d.reason}" for d in self.dense]
        if self.report is not None and self.report.not_traced:
            lines.append("forwards that did not trace (their nn.Linear children swapped as leaves):")
            lines += [f"  {p or '<root>'}: {e}" for p, e in self.report.not_traced.items()]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Per factored layer: shape, rank, params and FLOPs per row, dense vs factored; totals;
    and the weights `transform` left dense, with the reason. `str()` gives the table."""
    layers = [
        LayerSummary(name, m.out_features, m.in_features, m.rank, m.width, m.dense_params(),
                     m.factored_params(), m.dense_flops_per_row(), m.flops_per_row())
        for name, m in factored_layers(model).items()
    ]
    report = getattr(model, REPORT_ATTR, None)
    active = sum(l.factored_params for l in layers)
    allocated = sum(p.numel() for m in factored_layers(model).values() for p in m.parameters())
    model_params = sum(p.numel() for p in model.parameters()) - allocated + active
    return Summary(layers, list(report.dense) if report else [], model_params, report)
