"""The safety net: a traced forward is checked against the original before the pass uses it.

Where an example call of a module is known (transform's `example_inputs`), the graph that would
replace the module's forward runs on it with the dense weights still in place, next to the
original forward, from the same random state; a graph that gives another result (or fails) is
not used: the forward stays as it was and the weights it reads stay dense, with the difference
as the reason. Both runs leave the module as they found it (attributes, buffers, RNG).
"""
from __future__ import annotations

import torch
from torch import nn

from .rewrite import CallFormsGraphModule, graph_module_like
from .torch_internals import tree_flatten, tree_leaves
from .tracing import CallForm, TraceResult, state_kept

# Outputs agree when |graph - original| <= RTOL * max|original| + ATOL elementwise: the graph
# runs the same ops, so only a different op order may move the last bits.
RTOL, ATOL = 1e-4, 1e-6


def differs_from_original(module: nn.Module, trace: TraceResult,
                          call: tuple[tuple, dict]) -> str | None:
    """Why the traced forward would not compute what `module.forward` computes on `call`
    (args, kwargs), or None where it does."""
    args, kwargs = call
    replacement = _replacement(module, trace)
    try:
        expected = _run(module, module.forward, args, kwargs)
    except Exception:  # the original itself fails on its recorded call: nothing to compare
        return None
    try:
        got = _run(module, replacement.forward, args, kwargs)
    except Exception as err:
        return f"its traced forward fails on the example call where the original runs " \
               f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
    return _difference(got, expected)


def _replacement(module: nn.Module, trace: TraceResult) -> nn.Module:
    if trace.frontend == "torch.export":
        return trace.module
    # an fx trace that reads weights always has its forms (tracing.trace_own_forward)
    primary = trace.forms[CallForm(module.training)]
    replacement = graph_module_like(module, primary, CallFormsGraphModule)
    replacement.set_forms(type(module).forward.__get__(module), trace.forms)
    return replacement


def _run(module: nn.Module, forward, args: tuple, kwargs: dict):
    """`forward(*args, **kwargs)` without autograd, from a fixed random state, leaving the
    module's attributes, buffers and the random state as they were."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    devices = sorted({t.device.index or 0 for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), state_kept(module):
            torch.manual_seed(0)
            return forward(*args, **kwargs)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])


def _difference(got, expected) -> str | None:
    got_leaves, got_spec = tree_flatten(got)
    expected_leaves, expected_spec = tree_flatten(expected)
    if got_spec != expected_spec:
        return "its traced forward returns another structure than the original on the example call"
    for a, b in zip(got_leaves, expected_leaves):
        if isinstance(b, torch.Tensor) != isinstance(a, torch.Tensor):
            return "its traced forward returns another kind of output on the example call"
        if not isinstance(b, torch.Tensor):
            if a != b:
                return f"its traced forward returns {a!r} where the original returns {b!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return (f"its traced forward returns shape {tuple(a.shape)} {a.dtype} where the "
                    f"original returns {tuple(b.shape)} {b.dtype} on the example call")
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return ("its traced forward returns other values than the original on the "
                        "example call")
            continue
        gap = (a.double() - b.double()).abs()
        bound = RTOL * b.double().abs().max() + ATOL
        if not bool((gap <= bound).all()):
            return (f"its traced forward differs from the original on the example call "
                    f"(max |difference| {gap.max().item():.3g})")
    return None
