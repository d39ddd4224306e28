"""The plan: for each weight, a Candidate to factor or a DenseRecord with the reason it stays
dense, a pure function of the weight's reads (factor a weight only if every read of it is a
matmul the pass understands)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Union

import torch
import torch.fx as fx
from torch import nn

from ..config import InRankConfig
from ..errors import InRankValueError
from ..nn.spectrum import explained_ratios, select_rank
from .analysis import WeightUse
from .matchers import MatmulSite, ModuleHandler, handled_weights, indexed_only
from .report import DenseRecord

FilterFn = Callable[[str, Union[nn.Module, fx.Node]], bool]

@dataclass(frozen=True)
class PlanContext:
    """What every weight's decision reads: nothing in it is changed by planning."""

    model: nn.Module
    config: InRankConfig
    filter_fn: FilterFn | None
    uses: dict[int, WeightUse]  # id(parameter) → its reads
    handlers: dict[int, ModuleHandler]  # id(module) → its handler (the analysis asked once)
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
    handler: ModuleHandler | None = None
    asked: bool = True  # the filters (targets / exclude / filter_fn) were asked about it
    rank: int | None = None  # measured by init_rank="auto" (else the config's rank applies)
    transposed: bool = False  # a functional read of the weight's transpose (x @ W)

def plan_weight(weight: WeightUse, ctx: PlanContext) -> Candidate | DenseRecord | None:
    """Decide one weight from its reads: a Candidate, a Dense with the reason, or None for a
    parameter that is not a matmul weight at all (embeddings, norms, ...). Changes nothing."""
    calls = weight.reads_of("call") + weight.reads_of("blind")
    sites = weight.reads_of("site")
    opaque = weight.reads_of("opaque")
    if not calls and not sites:
        return _unread(weight, opaque, ctx)
    if opaque:
        tied = f" (tied: {', '.join(weight.names)})" if len(weight.names) > 1 else ""
        return DenseRecord(weight.name, f"also {opaque[0].where}{tied}{_leaf_hint(opaque[0], ctx)}")
    if calls and sites:
        return DenseRecord(weight.name, f"read both by a call of '{calls[0].owner}' and by "
                                  f"{sites[0].where}; a weight is factored through one of the two")
    found = _called(weight, calls, ctx) if calls else _functional(weight, sites, ctx)
    if not isinstance(found, Candidate):
        return found
    return _filtered(found, ctx)

def _unread(weight: WeightUse, opaque: list, ctx: PlanContext) -> DenseRecord | None:
    """A weight no matmul reads: say why when it looks like one that should have been."""
    owner = _owner_of(ctx.model, weight.name)
    if owner is not None and id(owner) in ctx.handlers:
        # A Linear that no traced forward calls: used inside a library module, or dead.
        reason = (opaque[0].where + _leaf_hint(opaque[0], ctx) if opaque
                  else "its module is never called by a traced forward")
        return DenseRecord(weight.name, reason)
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
        return DenseRecord(weight.name, f"a 3-D parameter ({experts}x{n_out}x{n_in}; mixture-of-experts "
                                  f"weights are stored so) {opaque[0].where}: its reads cannot be "
                                  "seen or rewritten", expert_stack=True)
    if weight.param.dim() == 2 and any(r.untraced for r in opaque):
        # Possibly a matmul weight that no frontend could see.
        hint = "" if ctx.captured or not all(r.exportable for r in opaque) else \
            "; pass example_inputs to capture that forward with torch.export"
        return DenseRecord(weight.name, opaque[0].where + hint)
    return None

def _called(weight: WeightUse, calls: list, ctx: PlanContext) -> Candidate | DenseRecord | None:
    """A weight read through calls of one module with a handler (nn.Linear, ...)."""
    modules = {id(ctx.model.get_submodule(r.owner)): r.owner for r in calls}
    if len(modules) > 1:
        return DenseRecord(weight.name, f"shared by modules {', '.join(sorted(modules.values()))}")
    name, handler = calls[0].owner, calls[0].handler
    module = ctx.model.get_submodule(name)
    weights = handled_weights(module, handler)
    if weight.param is not weights[handler.weight_attr]:
        return None  # a further weight of a module whose main weight decides for both
    for path, extra in list(weights.items())[1:]:
        other = ctx.uses.get(id(extra))
        foreign = [r for r in (other.reads if other else []) if r.via not in ("call", "blind")
                   or ctx.model.get_submodule(r.owner) is not module]
        if foreign:
            return DenseRecord(weight.name, f"its module also needs {path}, which is {foreign[0].where}")
    return Candidate(name, handler.kind, weight, handler.matrix(module), module, handler)

def _expert_stack(weight: WeightUse, opaque: list, batched: list,
                  ctx: PlanContext) -> Candidate | DenseRecord:
    """A 3-D parameter read by batched matmuls: mixture-of-experts weights (E × out × in). It is
    factored where every forward that reads it was traced by fx, whose reads can then be pointed
    at the factored stack's product (`InRankExperts.weight`)."""
    experts, n_out, n_in = weight.param.shape
    where = batched[0].where
    where = f"read by {where}" if where.startswith("node") else where
    stack = f"a stack of {experts} matrices ({experts}x{n_out}x{n_in}, mixture-of-experts weights)"
    unseen = [r for r in opaque if r.untraced or not weight.name.startswith(prefix(r.owner))]
    if unseen:
        return DenseRecord(weight.name, f"{stack} {where}; also {unseen[0].where}, a read that cannot "
                                  "be rewritten (not traced)", expert_stack=True)
    found = Candidate(weight.name, "experts", weight, weight.param, asked=True)
    return _filtered(found, ctx)

def prefix(owner: str) -> str:
    return f"{owner}." if owner else ""

def _functional(weight: WeightUse, sites: list, ctx: PlanContext) -> Candidate | DenseRecord:
    """A weight read by matmul nodes (F.linear, @, matmul, mm, addmm) in traced forwards."""
    if len({r.site.transposed for r in sites}) > 1:
        return DenseRecord(weight.name, "read both as W and as its transpose by matmul nodes")
    # A library module's weight read only here (timm's F.linear(x, self.qkv.weight, qkv_bias)),
    # never by a call of the module: the layer takes the weight's place inside the module, and
    # the module's other parameters (its bias) stay where they are.
    site: MatmulSite = sites[0].site
    matrix = weight.param.T if site.transposed else weight.param
    return Candidate(weight.name, site.kind, weight, matrix, transposed=site.transposed)

def _filtered(candidate: Candidate, ctx: PlanContext) -> Candidate | DenseRecord:
    """The size floor, then the user's filters."""
    out_features, in_features = candidate.matrix.shape[-2:]
    full_rank = min(out_features, in_features)
    if full_rank < ctx.config.min_features:
        return DenseRecord(candidate.name, f"{out_features}x{in_features}: full rank {full_rank} is "
                                     f"below min_features={ctx.config.min_features}")
    if not ctx.config.selects(candidate.name):
        return DenseRecord(candidate.name, "not selected by targets/exclude", asked=True)
    sites = candidate.weight.reads_of("site")
    # the module, the matmul node, or for an expert stack the stacked parameter
    subject = (candidate.module if candidate.module is not None
               else sites[0].site.node if sites else candidate.weight.param)
    if ctx.filter_fn is not None and not ctx.filter_fn(candidate.name, subject):
        return DenseRecord(candidate.name, "rejected by filter_fn", asked=True)
    return _sized(candidate, ctx.config)

def _sized(candidate: Candidate, config: InRankConfig) -> Candidate | DenseRecord:
    """init_rank="auto" measures each layer's rank from its weight, and never makes a layer
    bigger: where the factored form at that rank would hold more parameters than the dense
    weight, the layer stays dense, and the reason says which threshold would factor it (an
    explicit init_rank, or `inrank_fx.compress` to a budget, factors it anyway)."""
    if config.init_rank != "auto":
        return candidate
    rank, _ = initial_rank(candidate.matrix, candidate.name, config)
    n_out, n_in = candidate.matrix.shape[-2:]
    factored, dense = rank * (n_out + n_in), n_out * n_in
    if factored > dense:
        below = _threshold_to_factor(candidate.matrix, config)
        hint = f"a threshold below {below:.4g} factors it, " if below is not None else ""
        return DenseRecord(candidate.name,
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

def _leaf_hint(read, ctx: PlanContext) -> str:
    """What to do about a weight handed to a function fx keeps as a leaf."""
    if not read.leaf_call:
        return ""
    if ctx.captured:
        return "; torch.export could not capture that forward either (see not traced)"
    return ("; pass example_inputs to transform to capture that forward with torch.export, "
            "which sees inside the function")

def initial_rank(matrix: torch.Tensor, name: str, config: InRankConfig) -> tuple[int, int | None]:
    """(rank, the requested rank if it had to be capped)."""
    full_rank = min(matrix.shape[-2:])
    if config.init_rank == "auto" and matrix.dim() == 3:  # experts: the largest rank any asks
        return max(initial_rank(m, name, config)[0] for m in matrix), None
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

def _owner_of(model: nn.Module, param_name: str) -> nn.Module | None:
    parent, _, _ = param_name.rpartition(".")
    try:
        return model.get_submodule(parent)
    except AttributeError:
        return None
