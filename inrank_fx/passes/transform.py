"""`transform`: the public verb that turns dense matmuls against weights into InRank layers.

    analyse (trace every forward, find every read of every weight)
      → decide (factor a weight only if every read of it is a matmul we understand)
      → build factored layers (random or SVD init, rank from the config)
      → rewrite (swap modules in place; rewrite only the forwards that hold functional matmuls)
"""
from __future__ import annotations

import copy
import difflib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.fx as fx
from torch import nn

from ..config import REPORT_ATTR, InRankConfig
from ..nn.linear import InRankLinear
from ..nn.modules import carry_hooks, replace_module
from ..nn.spectrum import select_rank
from .analysis import Analysis, WeightUse, analyse
from .matchers import MatmulSite, handled_weights, module_handler
from .rewrite import factor_matmul_sites, graph_module_like, install_layer
from .substitutes import apply_substitutes, restore_unused
from .tracing import is_library_module

log = logging.getLogger("inrank_fx")

FilterFn = Callable[[str, Union[nn.Module, fx.Node]], bool]

@dataclass
class FactoredRecord:
    name: str
    kind: str  # "nn.Linear", "F.linear", "matmul", ...
    out_features: int
    in_features: int
    rank: int
    width: int
    requested_rank: int | None = None  # set when the requested rank exceeded the full rank


@dataclass
class DenseRecord:
    name: str
    reason: str


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
        return "\n".join(lines)


def transform(
    model: nn.Module,
    config: InRankConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    example_inputs=None,
    inplace: bool = False,
) -> nn.Module:
    """Factor every dense matmul against a 2-D weight in `model` into an InRankLinear.

    Returns the transformed model (a copy unless `inplace`). Modules keep their class and Python
    forward wherever possible: nn.Linear modules are swapped in place, and only a module whose own
    forward computes a matmul against a weight (F.linear, @, matmul, mm, addmm) is replaced by its
    rewritten fx graph. `filter_fn(name, module_or_node)` may veto any layer: it gets the
    nn.Linear, or for a functional matmul the fx node. What was done, and why anything was left
    dense, is in `inrank_fx.summary(model)`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    config = config if config is not None else InRankConfig()
    if not isinstance(config, InRankConfig):
        raise TypeError(f"config must be an InRankConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    substituted = apply_substitutes(model)  # e.g. nn.TransformerEncoderLayer: see transformer.py
    captured = _capture_calls(model, example_inputs) if example_inputs is not None else None
    analysis = analyse(model, config, captured)
    report = TransformReport(
        config=config,
        traced=[p for p, t in analysis.traces.items() if t.ok],
        not_traced={p: t.error for p, t in analysis.traces.items() if not t.ok},
        exported=[p for p, t in analysis.traces.items() if t.ok and t.frontend == "torch.export"],
        captured=captured is not None,
        already_factored=analysis.already_factored,
    )
    swaps: list[tuple[nn.Module, InRankLinear]] = []
    installs: list[tuple[WeightUse, InRankLinear]] = []
    uses = {id(w.param): w for w in analysis.weights}
    for weight in analysis.weights:
        plan = _plan(weight, model, config, filter_fn, report, uses)
        if plan is None:
            continue
        module, layer = plan
        if module is not None:
            swaps.append((module, layer))
        else:
            installs.append((weight, layer))

    for module, layer in swaps:
        carry_hooks(module, layer)
        model = replace_module(model, module, layer)
    for weight, layer in installs:
        for name in weight.names:
            install_layer(model, name, layer)
    model = _rewrite_forwards(model, analysis, installs, report)
    restore_unused(substituted, lambda m: isinstance(m, InRankLinear))

    _warn_unmatched_patterns(config, report.candidates)
    _announce(model, report)
    setattr(model, REPORT_ATTR, report)
    return model


def _warn_unmatched_patterns(config: InRankConfig, names: list[str]) -> None:
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


def _plan(
    weight: WeightUse,
    model: nn.Module,
    config: InRankConfig,
    filter_fn: FilterFn | None,
    report: TransformReport,
    uses: dict[int, WeightUse],
) -> tuple[nn.Module | None, nn.Module] | None:
    """Decide one weight: (module to swap or None for functional reads, its factored layer),
    or None after recording why it stays dense."""
    calls = weight.reads_of("module") + weight.reads_of("blind")
    sites = weight.reads_of("site")
    opaque = weight.reads_of("opaque")
    owner_module = _owner_of(model, weight.name)
    if not calls and not sites:
        if owner_module is not None and module_handler(owner_module, config) is not None:
            # A Linear that no traced forward calls: used inside a library module, or dead.
            reason = (opaque[0].where + _leaf_hint(opaque[0], report) if opaque
                      else "its module is never called by a traced forward")
            report.dense.append(DenseRecord(weight.name, reason))
        elif weight.param.dim() == 2 and any(r.untraced for r in opaque):
            # Possibly a matmul weight that no frontend could see.
            hint = "" if report.captured else \
                "; pass example_inputs to capture that forward with torch.export"
            report.dense.append(DenseRecord(weight.name, opaque[0].where + hint))
        return None  # not a matmul weight at all (embeddings, norms, ...)

    def dense(reason: str) -> None:
        report.dense.append(DenseRecord(weight.name, reason))

    if opaque:
        tied = f" (tied: {', '.join(weight.names)})" if len(weight.names) > 1 else ""
        return dense(f"also {opaque[0].where}{tied}{_leaf_hint(opaque[0], report)}")
    if calls and sites:
        return dense(
            f"read both by a call of '{calls[0].owner}' and by {sites[0].where}; "
            "a weight is factored through one of the two"
        )

    if calls:
        modules = {id(model.get_submodule(r.owner)): r.owner for r in calls}
        if len(modules) > 1:
            return dense(f"shared by modules {', '.join(sorted(modules.values()))}")
        name = calls[0].owner
        module = model.get_submodule(name)
        handler = module_handler(module, config)
        weights = handled_weights(module, handler)
        if weight.param is not weights[handler.weight_attr]:
            return None  # a further weight of a module whose main weight decides for both
        for path, extra in list(weights.items())[1:]:
            other = uses.get(id(extra))
            foreign = [r for r in (other.reads if other else []) if r.kind not in ("module", "blind")
                       or model.get_submodule(r.owner) is not module]
            if foreign:
                return dense(f"its module also needs {path}, which is {foreign[0].where}")
        matrix, kind, subject = handler.matrix(module), handler.kind, module
    else:
        if len({r.site.transposed for r in sites}) > 1:
            return dense("read both as W and as its transpose by matmul nodes")
        inlined = all(r.owner in report.exported for r in sites)  # torch.export inlined its module
        if owner_module is not None and is_library_module(owner_module) and not inlined:
            return dense(f"a parameter of {type(owner_module).__name__} read directly by {sites[0].where}")
        module, name = None, weight.name
        site: MatmulSite = sites[0].site
        matrix = weight.param.T if site.transposed else weight.param
        kind, subject = site.kind, site.node

    out_features, in_features = matrix.shape
    full_rank = min(out_features, in_features)
    if full_rank < config.min_features:
        return dense(
            f"{out_features}x{in_features}: full rank {full_rank} is below "
            f"min_features={config.min_features}"
        )
    report.candidates.append(name)
    if not config.selects(name):
        return dense("not selected by targets/exclude")
    if filter_fn is not None and not filter_fn(name, subject):
        return dense("rejected by filter_fn")

    rank, requested = _initial_rank(matrix, name, config)
    width = config.width_for(rank, full_rank)
    if module is not None:
        layer = handler.build(module, rank, buffer=width - rank, init=config.init, name=name)
    else:
        layer = InRankLinear.from_weight(
            matrix, None, rank, buffer=width - rank, init=config.init, name=name
        )
    for part in layer.modules():  # a handler may build several (nn.MultiheadAttention)
        if config.activation is not None and type(part) is InRankLinear:
            part.activation = config.activation  # convolutions stay linear
        if not config.silent_buffer and isinstance(part, InRankLinear):
            part.randomize_buffer()
    report.factored.append(
        FactoredRecord(name, kind, out_features, in_features, layer.rank, layer.width, requested)
    )
    return module, layer


def _leaf_hint(read, report: TransformReport) -> str:
    """What to do about a weight handed to a function fx keeps as a leaf."""
    if not read.leaf_call:
        return ""
    if report.captured:
        return "; torch.export could not capture that forward either (see not traced)"
    return ("; pass example_inputs to transform to capture that forward with torch.export, "
            "which sees inside the function")


def _initial_rank(matrix: torch.Tensor, name: str, config: InRankConfig) -> tuple[int, int | None]:
    """(rank, the requested rank if it had to be capped)."""
    full_rank = min(matrix.shape)
    if config.init_rank == "auto":
        if matrix.is_meta:
            raise ValueError(f"{name}: weights on the meta device have no spectrum to choose a rank from")
        if not torch.isfinite(matrix).all():
            raise ValueError(f"{name}: non-finite (NaN/Inf) entries; cannot choose a rank from them")
        s = torch.linalg.svdvals(matrix.detach().to(torch.float64))
        return select_rank(s, config.threshold, config.criterion, full_rank=full_rank), None
    requested = config.rank_for(full_rank)
    if requested > full_rank:
        return full_rank, requested
    return requested, None


def _rewrite_forwards(
    model: nn.Module, analysis: Analysis, installs: list, report: TransformReport
) -> nn.Module:
    """Rewrite the forwards that hold functional matmuls on installed weights, deepest first."""
    by_owner: dict[str, list[tuple[MatmulSite, str, nn.Module]]] = {}
    for weight, layer in installs:
        for read in weight.reads_of("site"):
            target = read.site.param_node.target
            by_owner.setdefault(read.owner, []).append((read.site, target, layer))
    for owner in sorted(by_owner, key=lambda p: -p.count(".") if p else 1):
        module = model.get_submodule(owner)
        trace = analysis.traces[owner]
        if trace.frontend == "torch.export":
            gm = trace.module  # the exported module holds the same parameters at the same paths
            for _, target, layer in by_owner[owner]:
                install_layer(gm, target, layer)
            carry_hooks(module, gm)
        else:
            gm = graph_module_like(module, trace.graph)
        gm = factor_matmul_sites(gm, [(site, target) for site, target, _ in by_owner[owner]])
        model = replace_module(model, module, gm)
        report.rewritten_forwards.append(owner)
    return model


def _capture_calls(model: nn.Module, example_inputs) -> dict[str, tuple[tuple, dict]]:
    """Run the model once on the example and record each module's first call (args, kwargs)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)

    def recorder(path):
        def hook(module, args, kwargs):
            calls.setdefault(path, (args, kwargs))
        return hook

    handles = [m.register_forward_pre_hook(recorder(p), with_kwargs=True)
               for p, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _owner_of(model: nn.Module, param_name: str) -> nn.Module | None:
    parent, _, _ = param_name.rpartition(".")
    try:
        return model.get_submodule(parent)
    except AttributeError:
        return None


def _label(path: str) -> str:
    return f"'{path}'" if path else "the root module"


def _announce(model: nn.Module, report: TransformReport) -> None:
    name = type(model).__name__
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
