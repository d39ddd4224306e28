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

from ..nn.attention import InRankMultiheadAttention
from ..nn.linear import FactoredLayer


class ShallowTracer(fx.Tracer):
    """Traces the root module's forward only: every submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


_LIBRARY = fx.Tracer()


def is_library_module(module: nn.Module) -> bool:
    """torch.nn's own modules (and factored layers): their forward is known, not traced."""
    if isinstance(module, (FactoredLayer, InRankMultiheadAttention)):
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
    frontend: str = "fx"  # "fx" (symbolic, this forward only) or "torch.export" (aten, inlined)
    module: nn.Module | None = None  # torch.export: the trainable GraphModule the graph runs in

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


def export_own_forward(module: nn.Module, path: str, args: tuple, kwargs: dict) -> TraceResult:
    """The torch.export frontend, for a forward that symbolic tracing could not handle.

    Exports the module at the example call (`args`, `kwargs`, captured from a run of the whole
    model) into an aten-level graph, with every submodule inlined, and hands it back as a plain
    (trainable, train()/eval()-able) GraphModule whose parameters are the module's own tensors.
    The graph is specialised to the example call: Python branches take the path they took then.
    The leading (batch) dimension of every tensor argument is left to torch.export to keep
    dynamic where the code allows (Dim.AUTO), so the graph runs at other batch sizes.
    """
    import inspect

    import torch
    from torch.utils import _pytree

    def batch_dynamic(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: torch.export.Dim.AUTO}
        return None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        dynamic = {name: _pytree.tree_map(batch_dynamic, value) for name, value in bound.items()}
        # An example batch of 1 would otherwise be specialised to 1 (0/1 specialisation).
        with _size_oblivious():
            program = torch.export.export(module, tuple(args), dict(kwargs),
                                          dynamic_shapes=dynamic, strict=False)
        unlifted = program.module()
        graph_module = fx.GraphModule(unlifted, unlifted.graph, class_name=type(module).__name__)
    except Exception as err:  # exporting user code can fail in any way: report it
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return TraceResult(path, None, f"{type(err).__name__}: {first_line}", "torch.export")
    graph_module.train(module.training)
    return TraceResult(path, graph_module.graph, None, "torch.export", graph_module)


def _size_oblivious():
    """torch.export without 0/1 specialisation, where this torch has the switch (private)."""
    import contextlib

    from torch.fx.experimental import _config

    if hasattr(_config, "backed_size_oblivious"):
        return _config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()
