"""Tracing frontend: each module's *own* forward, traced on its own.

Tracing a whole model in one piece fails on the first data-dependent branch anywhere in it, and
replacing a whole model by its graph bakes every submodule's Python (`self.training` checks,
optional arguments) into one frozen graph. So the pass traces module by module, with every
submodule call kept as a single `call_module` node: a module whose forward does not trace costs
only the matmuls written in that one forward, and the only modules that are ever replaced by a
graph are those whose own forward holds a matmul the pass rewrites.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ..attention import InRankMultiheadAttention
from ..layers import InRankLinear


class ShallowTracer(fx.Tracer):
    """Traces the root module's forward only: every submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


_LIBRARY = fx.Tracer()


def is_library_module(module: nn.Module) -> bool:
    """torch.nn's own modules (and factored layers): their forward is known, not traced."""
    if isinstance(module, (InRankLinear, InRankMultiheadAttention)):
        return True
    return _LIBRARY.is_leaf_module(module, "")


def has_own_forward(module: nn.Module) -> bool:
    """Containers such as nn.ModuleList have no forward of their own."""
    return type(module).forward is not nn.Module.forward


@dataclass
class TraceResult:
    path: str
    graph: fx.Graph | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.graph is not None


def trace_own_forward(module: nn.Module, path: str) -> TraceResult:
    """Trace `module.forward` with its submodules as leaves; never raises for trace errors."""
    try:
        graph = ShallowTracer().trace(module)
    except Exception as err:  # any error in user code during tracing means "does not trace"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return TraceResult(path, None, f"{type(err).__name__}: {first_line}")
    return TraceResult(path, graph)
