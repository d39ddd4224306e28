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

import torch.fx as fx
from torch import nn

from ..config import REPORT_ATTR, InRankConfig
from ..errors import InRankTypeError
from ..nn.experts import FACTORED_STACKS
from ..nn.linear import FactoredLayer
from ..nn.modules import carry_hooks, replace_module
from .analysis import Analysis, analyse
from .build import build_layer, factored_record
from .capture import capture_calls
from .matchers import MatmulSite
from .plan import Candidate, FilterFn, PlanContext, plan_weight, prefix
from .report import DenseRecord, TransformReport, announce, warn_unmatched_patterns
from .rewrite import (
    CallFormsGraphModule,
    factor_matmul_sites,
    graph_module_like,
    install_layer,
    read_through_weight,
)
from .substitutes import apply_substitutes, restore_unused
from .tracing import CallForm


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
    captured = (capture_calls(model, example_inputs, None if inplace else original)
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
    warn_unmatched_patterns(config, report.candidates)
    announce(model, report)
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
        factored=[factored_record(c, layer, requested) for c, layer, requested in built],
        dense=[p for p in plans if isinstance(p, DenseRecord)],
        traced=[p for p, t in traces.items() if t.ok],
        not_traced={p: t.error for p, t in traces.items() if not t.ok},
        rewritten_forwards=rewritten,
        already_factored=analysis.already_factored,
        candidates=[p.name for p in plans if p.asked],
        exported=[p for p, t in traces.items() if t.ok and t.frontend == "torch.export"],
        captured=captured,
    )


def _relative(path: str, owner: str) -> str:
    return path[len(prefix(owner)):]


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
            target = _relative(paths[prefix(read.owner) + read.site.param_node.target],
                               read.owner)
            by_owner.setdefault(read.owner, []).append((read.site, target, layer))
        if isinstance(layer, FACTORED_STACKS):
            for read in [r for r in weight.reads_of("opaque") if not r.untraced]:
                mine = [_relative(paths[n], read.owner) for n in weight.names
                        if n.startswith(prefix(read.owner))]
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


