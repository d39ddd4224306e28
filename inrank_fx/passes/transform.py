"""`transform`: the public verb that turns dense matmuls against weights into InRank layers.
A straight pipeline, each step visited once:

    analyse   trace every forward, find every read of every weight (passes/analysis.py)
    plan      for each weight, a Candidate or the reason it stays Dense: a pure function of the
              reads (factor a weight only if every read of it is a matmul we understand)
    build     the factored layer of each candidate (SVD / random init, rank from the config)
    rewrite   swap modules in place; rewrite only the forwards that hold functional matmuls
    report    a TransformReport made from the plans, left on the model
"""
from __future__ import annotations

import copy
import difflib
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Union

import torch
import torch.fx as fx
from torch import nn

from ..config import REPORT_ATTR, InRankConfig
from ..errors import InRankError, InRankTypeError, InRankValueError
from ..nn.experts import FACTORED_STACKS, ExpertList, IndexedExpertList, InRankExperts
from ..nn.linear import FactoredLayer, InRankLinear
from ..nn.modules import carry_hooks, replace_module
from ..nn.spectrum import explained_ratios, select_rank
from .analysis import Analysis, WeightUse, analyse
from .matchers import MatmulSite, handled_weights, indexed_only
from .rewrite import (
    CallFormsGraphModule,
    factor_matmul_sites,
    graph_module_like,
    install_layer,
    read_through_weight,
)
from .substitutes import apply_substitutes, restore_unused
from .tracing import CallForm, state_kept

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
    # init_rank="auto" measured a rank at which the factored layer would hold more parameters
    # than the dense one (a flat spectrum, as an untrained model has)
    larger_factored: bool = False
    # a 3-D stack of matrices (mixture-of-experts weights, experts × out × in): not factored yet
    expert_stack: bool = False
    # with larger_factored: init_rank="auto" factors the layer at a threshold below this
    factor_threshold: float | None = None


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
    compression: object = None  # a passes.compress.Compression where `compress` made the model

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

    A model on the meta device is transformed from its shapes alone: its factored layers stay
    on meta until `inrank_fx.materialize` initialises them. For a model that barely fits in host
    memory, pass `inplace=True` (the copy holds the model twice at its peak) or build it on the
    meta device (benchmarks/bench_scale.py measures both).
    """
    if not isinstance(model, nn.Module):
        raise InRankTypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    config = config if config is not None else InRankConfig()
    if not isinstance(config, InRankConfig):
        raise InRankTypeError(f"config must be an InRankConfig, got {type(config).__name__}")
    original = model
    if not inplace:
        model = copy.deepcopy(model)

    substituted = apply_substitutes(model)  # e.g. nn.TransformerEncoderLayer: see nn/transformer.py
    captured = (_capture_calls(model, example_inputs, None if inplace else original)
                if example_inputs is not None else None)
    analysis = analyse(model, config, captured)
    exported = [p for p, t in analysis.traces.items() if t.ok and t.frontend == "torch.export"]
    context = PlanContext(model, config, filter_fn, {id(w.param): w for w in analysis.weights},
                          analysis.handlers, captured is not None, exported)
    plans = [plan for weight in analysis.weights
             if (plan := plan_weight(weight, context)) is not None]
    candidates = [p for p in plans if isinstance(p, Candidate)]
    built = [(candidate, *build_layer(candidate, config, model)) for candidate in candidates]
    model, installs = _install(model, built)
    model, rewritten = _rewrite_forwards(model, analysis, installs)
    restore_unused(substituted, lambda m: isinstance(m, FactoredLayer))

    report = _report(config, analysis, plans, built, rewritten, captured is not None)
    _warn_unmatched_patterns(config, report.candidates)
    _announce(model, report)
    setattr(model, REPORT_ATTR, report)
    return model


def _install(model: nn.Module, built: list) -> tuple[nn.Module, list]:
    """Put each built layer in the model: a module call's layer replaces the module; a
    functional read's goes where the weight was (beside it, where the module holding the
    weight keeps its own forward: see `install_layer`). Returns the model and the
    (weight, layer, {weight name: layer path}) of the functional reads, whose forwards are
    rewritten next."""
    for candidate, layer, _ in built:
        if candidate.module is not None:  # a module call: swap the module in place
            carry_hooks(candidate.module, layer)
            model = replace_module(model, candidate.module, layer)
    functional = [(c.weight, layer) for c, layer, _ in built if c.module is None]
    # the modules whose forwards read these weights: rewritten next, they hold their layers
    readers = {r.owner for weight, _ in functional for r in weight.reads}
    installs = []
    for weight, layer in functional:
        if isinstance(layer, FACTORED_STACKS) and weight.reads_of("opaque")[0].untraced:
            # indexed in a forward that did not trace (`self.w[e]`): the layer stays where the
            # stack was and answers `[e]` with expert e's matrix, and the metadata reads
            layer.product_reads = True
            paths = {name: install_layer(model, name, layer) for name in weight.names}
        else:
            # a stack answers reads of the tensor it replaced; a matrix's holder, if its own
            # forward stays, keeps reading its attribute as a tensor
            paths = {name: install_layer(model, name, layer, beside=not isinstance(
                        layer, FACTORED_STACKS) and name.rpartition(".")[0] not in readers)
                     for name in weight.names}
        installs.append((weight, layer, paths))
    return model, installs


def _report(config: InRankConfig, analysis, plans: list, built: list, rewritten: list,
            captured: bool) -> "TransformReport":
    traces = analysis.traces
    return TransformReport(
        config=config,
        factored=[_record(c, layer, requested) for c, layer, requested in built],
        dense=[DenseRecord(p.name, p.reason, p.larger_factored, p.expert_stack,
                           p.factor_threshold)
               for p in plans if isinstance(p, Dense)],
        traced=[p for p, t in traces.items() if t.ok],
        not_traced={p: t.error for p, t in traces.items() if not t.ok},
        rewritten_forwards=rewritten,
        already_factored=analysis.already_factored,
        candidates=[p.name for p in plans if p.asked],
        exported=[p for p, t in traces.items() if t.ok and t.frontend == "torch.export"],
        captured=captured,
    )


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


# -- the plan: for each weight, a candidate to factor or the reason it stays dense -------------

@dataclass(frozen=True)
class PlanContext:
    """What every weight's decision reads: nothing in it is changed by planning."""

    model: nn.Module
    config: InRankConfig
    filter_fn: FilterFn | None
    uses: dict[int, WeightUse]  # id(parameter) → its reads
    handlers: dict[int, object]  # id(module) → its handler (the analysis asked once)
    captured: bool  # example inputs were given
    exported: list[str]  # forwards captured by torch.export


@dataclass(frozen=True)
class Candidate:
    """A weight to factor: `matrix` (out×in) as the layer computes it, read through a call of
    `module` (swapped for the layer) or, with `module` None, by matmul nodes."""

    name: str
    kind: str
    weight: WeightUse
    matrix: torch.Tensor
    module: nn.Module | None = None
    handler: object = None
    asked: bool = True  # the filters (targets / exclude / filter_fn) were asked about it
    rank: int | None = None  # measured by init_rank="auto" (else the config's rank applies)
    transposed: bool = False  # a functional read of the weight's transpose (x @ W)


@dataclass(frozen=True)
class Dense:
    """A weight left dense, and why. `asked`: it reached the filters (and they said no)."""

    name: str
    reason: str
    asked: bool = False
    larger_factored: bool = False
    expert_stack: bool = False
    factor_threshold: float | None = None


def plan_weight(weight: WeightUse, ctx: PlanContext) -> Candidate | Dense | None:
    """Decide one weight from its reads: a Candidate, a Dense with the reason, or None for a
    parameter that is not a matmul weight at all (embeddings, norms, ...). Changes nothing."""
    calls = weight.reads_of("module") + weight.reads_of("blind")
    sites = weight.reads_of("site")
    opaque = weight.reads_of("opaque")
    if not calls and not sites:
        return _unread(weight, opaque, ctx)
    if opaque:
        tied = f" (tied: {', '.join(weight.names)})" if len(weight.names) > 1 else ""
        return Dense(weight.name, f"also {opaque[0].where}{tied}{_leaf_hint(opaque[0], ctx)}")
    if calls and sites:
        return Dense(weight.name, f"read both by a call of '{calls[0].owner}' and by "
                                  f"{sites[0].where}; a weight is factored through one of the two")
    found = _called(weight, calls, ctx) if calls else _functional(weight, sites, ctx)
    if not isinstance(found, Candidate):
        return found
    return _filtered(found, ctx)


def _unread(weight: WeightUse, opaque: list, ctx: PlanContext) -> Dense | None:
    """A weight no matmul reads: say why when it looks like one that should have been."""
    owner = _owner_of(ctx.model, weight.name)
    if owner is not None and id(owner) in ctx.handlers:
        # A Linear that no traced forward calls: used inside a library module, or dead.
        reason = (opaque[0].where + _leaf_hint(opaque[0], ctx) if opaque
                  else "its module is never called by a traced forward")
        return Dense(weight.name, reason)
    batched = [r for r in opaque if r.batched]
    if weight.param.dim() == 3 and batched:
        return _expert_stack(weight, opaque, batched, ctx)
    if weight.param.dim() == 3 and weight.param.shape[0] > 1 and any(r.untraced for r in opaque):
        # (a leading 1 is a class token or a position embedding, not a stack)
        holder, _, attr = weight.name.rpartition(".")
        if (all(r.untraced and r.owner == holder for r in opaque) and owner is not None
                and indexed_only(owner, attr)):
            # a loop over the experts (transformers' MixtralExperts): the layer is indexed as
            # the stack was, one expert's product at a time
            return _filtered(Candidate(weight.name, "experts (indexed)", weight, weight.param),
                             ctx)
        experts, n_out, n_in = weight.param.shape
        return Dense(weight.name, f"a 3-D parameter ({experts}x{n_out}x{n_in}; mixture-of-experts "
                                  f"weights are stored so) {opaque[0].where}: its reads cannot be "
                                  "seen or rewritten", expert_stack=True)
    if weight.param.dim() == 2 and any(r.untraced for r in opaque):
        # Possibly a matmul weight that no frontend could see.
        hint = "" if ctx.captured or not all(r.exportable for r in opaque) else \
            "; pass example_inputs to capture that forward with torch.export"
        return Dense(weight.name, opaque[0].where + hint)
    return None


def _called(weight: WeightUse, calls: list, ctx: PlanContext) -> Candidate | Dense | None:
    """A weight read through calls of one module with a handler (nn.Linear, ...)."""
    modules = {id(ctx.model.get_submodule(r.owner)): r.owner for r in calls}
    if len(modules) > 1:
        return Dense(weight.name, f"shared by modules {', '.join(sorted(modules.values()))}")
    name, handler = calls[0].owner, calls[0].handler
    module = ctx.model.get_submodule(name)
    weights = handled_weights(module, handler)
    if weight.param is not weights[handler.weight_attr]:
        return None  # a further weight of a module whose main weight decides for both
    for path, extra in list(weights.items())[1:]:
        other = ctx.uses.get(id(extra))
        foreign = [r for r in (other.reads if other else []) if r.kind not in ("module", "blind")
                   or ctx.model.get_submodule(r.owner) is not module]
        if foreign:
            return Dense(weight.name, f"its module also needs {path}, which is {foreign[0].where}")
    return Candidate(name, handler.kind, weight, handler.matrix(module), module, handler)


def _expert_stack(weight: WeightUse, opaque: list, batched: list,
                  ctx: PlanContext) -> Candidate | Dense:
    """A 3-D parameter read by batched matmuls: mixture-of-experts weights (E × out × in). It is
    factored where every forward that reads it was traced by fx, whose reads can then be pointed
    at the factored stack's product (`InRankExperts.weight`)."""
    experts, n_out, n_in = weight.param.shape
    where = batched[0].where
    where = f"read by {where}" if where.startswith("node") else where
    stack = f"a stack of {experts} matrices ({experts}x{n_out}x{n_in}, mixture-of-experts weights)"
    unseen = [r for r in opaque if r.untraced or not weight.name.startswith(_prefix(r.owner))]
    if unseen:
        return Dense(weight.name, f"{stack} {where}; also {unseen[0].where}, a read that cannot "
                                  "be rewritten (not traced)", expert_stack=True)
    found = Candidate(weight.name, "experts", weight, weight.param, asked=True)
    return _filtered(found, ctx)


def _prefix(owner: str) -> str:
    return f"{owner}." if owner else ""


def _relative(path: str, owner: str) -> str:
    return path[len(_prefix(owner)):]


def _functional(weight: WeightUse, sites: list, ctx: PlanContext) -> Candidate | Dense:
    """A weight read by matmul nodes (F.linear, @, matmul, mm, addmm) in traced forwards."""
    if len({r.site.transposed for r in sites}) > 1:
        return Dense(weight.name, "read both as W and as its transpose by matmul nodes")
    # A library module's weight read only here (timm's F.linear(x, self.qkv.weight, qkv_bias)),
    # never by a call of the module: the layer takes the weight's place inside the module, and
    # the module's other parameters (its bias) stay where they are.
    site: MatmulSite = sites[0].site
    matrix = weight.param.T if site.transposed else weight.param
    return Candidate(weight.name, site.kind, weight, matrix, transposed=site.transposed)


def _filtered(candidate: Candidate, ctx: PlanContext) -> Candidate | Dense:
    """The size floor, then the user's filters."""
    out_features, in_features = candidate.matrix.shape[-2:]
    full_rank = min(out_features, in_features)
    if full_rank < ctx.config.min_features:
        return Dense(candidate.name, f"{out_features}x{in_features}: full rank {full_rank} is "
                                     f"below min_features={ctx.config.min_features}")
    if not ctx.config.selects(candidate.name):
        return Dense(candidate.name, "not selected by targets/exclude", asked=True)
    sites = candidate.weight.reads_of("site")
    # the module, the matmul node, or for an expert stack the stacked parameter
    subject = (candidate.module if candidate.module is not None
               else sites[0].site.node if sites else candidate.weight.param)
    if ctx.filter_fn is not None and not ctx.filter_fn(candidate.name, subject):
        return Dense(candidate.name, "rejected by filter_fn", asked=True)
    return _sized(candidate, ctx.config)


def _sized(candidate: Candidate, config: InRankConfig) -> Candidate | Dense:
    """init_rank="auto" measures each layer's rank from its weight, and never makes a layer
    bigger: where the factored form at that rank would hold more parameters than the dense
    weight, the layer stays dense, and the reason says which threshold would factor it (an
    explicit init_rank, or `inrank_fx.compress` to a budget, factors it anyway)."""
    if config.init_rank != "auto":
        return candidate
    rank, _ = _initial_rank(candidate.matrix, candidate.name, config)
    n_out, n_in = candidate.matrix.shape[-2:]
    factored, dense = rank * (n_out + n_in), n_out * n_in
    if factored > dense:
        below = _threshold_to_factor(candidate.matrix, config)
        hint = f"a threshold below {below:.4g} factors it, " if below is not None else ""
        return Dense(candidate.name,
                     f"init_rank='auto' measured rank {rank} of {min(n_out, n_in)} at threshold "
                     f"{config.threshold}: factored, it would hold {factored:,} parameters "
                     f"against {dense:,} dense ({hint}inrank_fx.compress(model, budget) factors "
                     f"it to a size)", asked=True, larger_factored=True, factor_threshold=below)
    return replace(candidate, rank=rank)


def _threshold_to_factor(matrix: torch.Tensor, config: InRankConfig) -> float | None:
    """The explained ratio at the largest rank that is not bigger than dense: below it as the
    threshold, init_rank="auto" factors the layer (None for a stack of experts)."""
    if matrix.dim() != 2:
        return None
    n_out, n_in = matrix.shape
    ceiling = max(1, (n_out * n_in) // (n_out + n_in))
    s = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    return float(explained_ratios(s, config.criterion, min(n_out, n_in))[ceiling])


# -- building the layers ------------------------------------------------------------------------

def build_layer(candidate: Candidate, config: InRankConfig,
                model: nn.Module) -> tuple[nn.Module, int | None]:
    """The factored layer for a candidate, at the config's starting rank and width, and the
    rank that was asked for where it had to be capped at the full rank (else None). A weight on
    the meta device gives a layer on the meta device that remembers its dense origin
    (`DenseTemplate`), for `inrank_fx.materialize` to initialise later."""
    rank, requested = ((candidate.rank, None) if candidate.rank is not None
                       else _initial_rank(candidate.matrix, candidate.name, config))
    width = config.width_for(rank, min(candidate.matrix.shape[-2:]))
    template = DenseTemplate(candidate.module, None, candidate.transposed, candidate.handler,
                             rank, width - rank, config, candidate.name,
                             indexed=candidate.kind == "experts (indexed)")
    if candidate.module is None:  # a weight read by functional matmuls
        owner, _, attr = candidate.name.rpartition(".")
        template.module = weight_holder(model.get_submodule(owner), attr, candidate.weight.param)
        template.weight_attr = attr
    layer = template.build(template.module)
    if candidate.matrix.is_meta:
        object.__setattr__(layer, TEMPLATE_ATTR, template)  # not a submodule: no state, no params
    return layer, requested


# The attribute of a factored layer built on the meta device that holds its DenseTemplate.
TEMPLATE_ATTR = "_inrank_dense_template"


@dataclass
class DenseTemplate:
    """How a factored layer was built from dense weights, to build it again from real ones.

    `module` is the dense module the layer replaced (nn.Linear, nn.Conv2d, ...), or for a weight
    read by functional matmuls a stand-in for the module that held it (`weight_holder`), with
    the weight at `weight_attr`. `build(real)` factors a real module of that kind exactly as
    `transform` factored the meta one."""

    module: nn.Module | None
    weight_attr: str | None
    transposed: bool
    handler: object
    rank: int
    buffer: int
    config: InRankConfig
    name: str
    indexed: bool = False  # a stack of experts read by indexing, `w[e]`, in an untraced forward

    def build(self, module: nn.Module) -> nn.Module:
        config = self.config
        if self.weight_attr is None:
            layer = self.handler.build(module, self.rank, buffer=self.buffer, init=config.init,
                                       name=self.name)
        else:
            weight = getattr(module, self.weight_attr)
            if weight.dim() == 3:  # a stack of experts' matrices: one rank, or one each
                kind = InRankExperts if config.expert_ranks != "expert" else \
                    IndexedExpertList if self.indexed else ExpertList
                layer = kind.from_stack(weight, self.rank, buffer=self.buffer, init=config.init,
                                        name=self.name)
            else:
                matrix = weight.T if self.transposed else weight
                layer = InRankLinear.from_weight(matrix, None, self.rank, buffer=self.buffer,
                                                 init=config.init, name=self.name)
        for part in layer.modules():  # a handler may build several (nn.MultiheadAttention)
            if config.activation is not None and type(part) is InRankLinear \
                    and not isinstance(layer, ExpertList):  # experts stay linear, as stacks do
                part.activation = config.activation  # convolutions stay linear
            if not config.silent_buffer and isinstance(part, FactoredLayer):
                part.randomize_buffer()
        return layer


def weight_holder(owner: nn.Module, attr: str, weight: nn.Parameter) -> nn.Module:
    """The module holding a functionally read weight, stripped to that weight alone (a shallow
    copy: same class and plain attributes, no other parameters, buffers or submodules), so that
    an init function sees a module of the original type without the rest of it."""
    holder = copy.copy(owner)
    holder._parameters = {attr: weight}
    holder._buffers, holder._modules = {}, {}
    return holder


def _record(candidate: Candidate, layer: nn.Module, requested: int | None) -> FactoredRecord:
    out_features, in_features = candidate.matrix.shape[-2:]
    return FactoredRecord(candidate.name, candidate.kind, out_features, in_features, layer.rank,
                          layer.width, requested)


def _leaf_hint(read, ctx: PlanContext) -> str:
    """What to do about a weight handed to a function fx keeps as a leaf."""
    if not read.leaf_call:
        return ""
    if ctx.captured:
        return "; torch.export could not capture that forward either (see not traced)"
    return ("; pass example_inputs to transform to capture that forward with torch.export, "
            "which sees inside the function")


def _initial_rank(matrix: torch.Tensor, name: str, config: InRankConfig) -> tuple[int, int | None]:
    """(rank, the requested rank if it had to be capped)."""
    full_rank = min(matrix.shape[-2:])
    if config.init_rank == "auto" and matrix.dim() == 3:  # experts: the largest rank any asks
        return max(_initial_rank(m, name, config)[0] for m in matrix), None
    if config.init_rank == "auto":
        if matrix.is_meta:
            raise InRankValueError(
                f"{name}: weights on the meta device have no spectrum to choose a rank from"
            )
        if not torch.isfinite(matrix).all():
            raise InRankValueError(
                f"{name}: non-finite (NaN/Inf) entries; cannot choose a rank from them"
            )
        s = torch.linalg.svdvals(matrix.detach().to(torch.float64))
        return select_rank(s, config.threshold, config.criterion, full_rank=full_rank), None
    requested = config.rank_for(full_rank)
    if requested > full_rank:
        return full_rank, requested
    return requested, None


def _rewrite_forwards(model: nn.Module, analysis: Analysis,
                      installs: list) -> tuple[nn.Module, list[str]]:
    """Rewrite the forwards that hold functional matmuls on installed weights, or reads of
    factored expert stacks, deepest first; (the model, the paths of the rewritten forwards)."""
    rewritten = []
    by_owner: dict[str, list[tuple[MatmulSite, str, nn.Module]]] = {}
    stacks: dict[str, list[str]] = {}  # owner → get_attr targets of factored expert stacks
    layers: dict[tuple[str, str], nn.Module] = {}  # (owner, target) → the stack's layer
    for weight, layer, paths in installs:
        for read in weight.reads_of("site"):
            target = _relative(paths[_prefix(read.owner) + read.site.param_node.target],
                               read.owner)
            by_owner.setdefault(read.owner, []).append((read.site, target, layer))
        if isinstance(layer, FACTORED_STACKS):
            for read in [r for r in weight.reads_of("opaque") if not r.untraced]:
                mine = [_relative(paths[n], read.owner) for n in weight.names
                        if n.startswith(_prefix(read.owner))]
                stacks.setdefault(read.owner, []).extend(mine)
                layers.update({(read.owner, target): layer for target in mine})
    for owner in sorted({*by_owner, *stacks}, key=lambda p: -p.count(".") if p else 1):
        module = model.get_submodule(owner)
        trace = analysis.traces[owner]
        sites = by_owner.get(owner, [])
        if trace.frontend == "torch.export":
            gm = trace.module  # the exported module holds the same parameters at the same paths
            for site, target, layer in sites:
                install_layer(gm, site.param_node.target, layer,
                              beside=target != site.param_node.target)
            for target in stacks.get(owner, []):
                install_layer(gm, target, layers[owner, target])
            carry_hooks(module, gm)
            _rewrite_graph(gm, sites, stacks.get(owner, []))
        else:
            gm = _rewrite_forms(module, trace, sites, stacks.get(owner, []))
        model = replace_module(model, module, gm)
        rewritten.append(owner)
    return model, rewritten


def _rewrite_graph(gm: fx.GraphModule, sites: list, stacks: list[str]) -> fx.GraphModule:
    """Factor the matmul sites of gm's graph among `sites`, and the reads of expert stacks."""
    mine = [(site, target) for site, target, _ in sites if site.node.graph is gm.graph]
    gm = factor_matmul_sites(gm, mine)
    for target in read_through_weight(gm, stacks):
        gm.get_submodule(target).product_reads = True  # a read takes the product
    return gm


def _rewrite_forms(module: nn.Module, trace, sites: list, stacks: list[str]) -> fx.GraphModule:
    """The fx-traced forward of `module`, rewritten in every call form it was traced in."""
    # a forward with sites or stack reads reads weights: it was traced in every form
    rewritten = {form: _rewrite_graph(graph_module_like(module, graph), sites, stacks)
                 for form, graph in trace.forms.items()}
    primary = rewritten[CallForm(module.training)]
    gm = graph_module_like(module, primary.graph, CallFormsGraphModule)
    for other in rewritten.values():  # attributes only another form's graph reads (constants)
        for node in other.graph.nodes:
            if node.op == "get_attr" and not hasattr(gm, node.target.split(".")[0]):
                name = node.target.split(".")[0]
                setattr(gm, name, getattr(other, name))
    gm.set_forms(type(module).forward.__get__(module),
                 {form: other.graph for form, other in rewritten.items()})
    return gm


def _capture_calls(model: nn.Module, example_inputs,
                   original: nn.Module | None) -> dict[str, tuple[tuple, dict]]:
    """Run the model once on the example and record each module's first call (args, kwargs).

    The run leaves the model as it was: attributes its forwards set are put back, and tensors
    they write in place are copied back from `original` (the model as the user gave it; with
    None, transform(inplace=True), such a write is an error, as nothing holds the old values)."""
    versions = {name: t._version for name, t in _tensors(model)}
    with state_kept(model):
        calls = _record_calls(model, example_inputs)
    written = [name for name, t in _tensors(model) if t._version != versions.get(name)]
    if written and original is None:
        raise InRankError(f"transform(inplace=True, example_inputs=...): running the example "
                          f"wrote {', '.join(written)} in place, and nothing holds the values "
                          "before it; pass inplace=False (transform then works on a copy)")
    if written:
        before = dict(_tensors(original))
        with torch.no_grad():
            for name, t in _tensors(model):
                if name in written:
                    t.copy_(before[name])
    return calls


def _tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _record_calls(model: nn.Module, example_inputs) -> dict[str, tuple[tuple, dict]]:
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


def _announce(model: nn.Module, report: TransformReport) -> None:
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
