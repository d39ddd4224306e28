"""Tracing frontend: each module's *own* forward, traced on its own.

Tracing a whole model in one piece fails on the first data-dependent branch anywhere in it, and
replacing a whole model by its graph bakes every submodule's Python (`self.training` checks,
optional arguments) into one frozen graph. So the pass traces module by module, with every
submodule call kept as a single `call_module` node: a module whose forward does not trace costs
only the matmuls written in that one forward, and the only modules that are ever replaced by a
graph are those whose own forward holds a matmul the pass rewrites.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from ..nn.attention import InRankMultiheadAttention
from ..nn.linear import FactoredLayer
from .torch_internals import STORES, size_oblivious, store_of, stored, tree_map


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


class CallForm(NamedTuple):
    """What a traced graph is specialised to, beyond its tensors: the module's mode (a forward
    that reads `self.training` bakes it in) and which arguments defaulting to None the call
    leaves None."""

    training: bool
    left_none: tuple[str, ...] = ()

# The most arguments defaulting to None a forward that reads weights may have: the pass traces
# it once per call form, 2 * 2**n graphs.
MAX_OPTIONAL_ARGUMENTS = 5


@dataclass
class TraceResult:
    path: str
    graph: fx.Graph | None  # with `forms`, the graph of the call that gives every argument
    error: str | None = None
    frontend: str = "fx"  # "fx" (symbolic, this forward only) or "torch.export" (aten, inlined)
    module: nn.Module | None = None  # torch.export: the trainable GraphModule the graph runs in
    # A forward that reads weights: one graph per call form (fx would otherwise bake the mode
    # and trace `if mask is None` as if every argument were given).
    forms: dict[CallForm, fx.Graph] = field(default_factory=dict)
    # parameters the forward writes in place (target → node name): read, but never rewritten
    written: dict[str, str] = field(default_factory=dict)
    writes: bool = False  # the forward writes module state or tensors: no frontend may take it

    @property
    def ok(self) -> bool:
        return self.graph is not None

    @property
    def graphs(self) -> list[fx.Graph]:
        """Every graph of the forward: one per call form, or the one."""
        return list(self.forms.values()) if self.forms else [self.graph] if self.ok else []


def trace_own_forward(module: nn.Module, path: str) -> TraceResult:
    """Trace `module.forward` with its submodules as leaves; never raises for trace errors.

    A forward that reads weights is traced once per call form: in training and in eval mode,
    with every subset of its arguments that default to None left None. A forward that writes
    module state (an attribute, a weight in place) is not traced: a graph would replay the
    write on every call or drop it; the module is left as it was."""
    try:
        with state_kept(module) as writes:
            graph = ShallowTracer().trace(module)
    except Exception as err:  # any error in user code during tracing means "does not trace"
        return TraceResult(path, None, _first_line(err))
    written = in_place_writes(graph, module)
    if writes or written:
        what = [f"module state ({', '.join(writes)})"] if writes else []
        what += [f"{target!r} in place (node {node!r})" for target, node in written.items()]
        return TraceResult(path, None, f"its forward writes {' and '.join(what)}; a graph would "
                                       "not do what it does", written=written, writes=True)
    if not _reads_weights(graph, module):
        return TraceResult(path, graph)
    return _traced_forms(module, path, graph)


def _traced_forms(module: nn.Module, path: str, graph: fx.Graph) -> TraceResult:
    """The forward traced in every call form (`graph`: the one in its mode, all given)."""
    optional = optional_arguments(module)
    if _named_after_star_args(module):
        return TraceResult(path, None, "its forward takes named arguments after *args, which a "
                                       "rewritten forward cannot pass on as fx's graph takes them")
    if len(optional) > MAX_OPTIONAL_ARGUMENTS:
        return TraceResult(path, None, f"its forward has {len(optional)} arguments that default "
                                       f"to None ({', '.join(optional)}): the pass traces one "
                                       f"graph per call form, for at most "
                                       f"{MAX_OPTIONAL_ARGUMENTS}")
    forms = {CallForm(module.training): graph}
    for form in _call_forms(module.training, optional):
        try:
            with state_kept(module):
                module.train(form.training)
                forms[form] = ShallowTracer().trace(
                    module, concrete_args=dict.fromkeys(form.left_none) or None)
        except Exception as err:
            where = ["in training mode" if form.training else "in eval mode"]
            where += [f"{name}=None" for name in form.left_none]
            return TraceResult(path, None, f"{', '.join(where)}: {_first_line(err)}")
    return TraceResult(path, graph, forms=forms)


def optional_arguments(module: nn.Module) -> list[str]:
    """The forward's arguments that default to None, in order (not *args / **kwargs)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.default is None
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _named_after_star_args(module: nn.Module) -> bool:
    try:
        kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        return False
    star = inspect.Parameter.VAR_POSITIONAL
    return star in kinds and any(k is inspect.Parameter.KEYWORD_ONLY
                                 for k in kinds[kinds.index(star):])


def _call_forms(training: bool, optional: list[str]) -> list[CallForm]:
    """Every form but (training, nothing left None): both modes, every subset of `optional`."""
    subsets = [form for n in range(len(optional) + 1)
               for form in itertools.combinations(optional, n)]
    return [CallForm(mode, subset) for mode in (training, not training) for subset in subsets
            if (mode, subset) != (training, ())]


def _reads_weights(graph: fx.Graph, module: nn.Module) -> bool:
    """Does the graph read a parameter of two or more dimensions itself (not through a call)?"""
    for node in graph.nodes:
        if node.op == "get_attr":
            value = _attribute(module, node.target)
            if isinstance(value, nn.Parameter) and value.dim() >= 2:
                return True
    return False


def in_place_writes(graph: fx.Graph, module: nn.Module) -> dict[str, str]:
    """Parameters and buffers the graph writes in place (`w.mul_(2)`, `w.copy_(x)`, ...):
    target → the writing node's name."""
    written = {}
    for node in graph.nodes:
        if not _writes_first_argument(node) or not node.args:
            continue
        source = node.args[0]
        while isinstance(source, fx.Node) and source.op in ("call_method", "call_function") \
                and source.args and _is_view(source):
            source = source.args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr" \
                and isinstance(_attribute(module, source.target), torch.Tensor):
            written.setdefault(source.target, node.name)
    return written


def _writes_first_argument(node: fx.Node) -> bool:
    """An in-place op by PyTorch's naming: `mul_`, `copy_`, `F.relu_`, `nn.init.normal_`."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    return name.endswith("_") and not name.startswith("_")


_VIEWS = frozenset({"view", "reshape", "t", "transpose", "permute", "__getitem__", "getitem",
                    "flatten", "unsqueeze", "squeeze", "expand", "narrow", "select", "T", "mT",
                    "data", "detach", "getattr"})


def _is_view(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _VIEWS


@contextlib.contextmanager
def state_kept(module: nn.Module):
    """Run a forward (a trace, an example call) and put the module tree's plain state back as it
    was: tracing executes the forward's Python, and an assignment such as `self.done = True`
    would otherwise stay. Yields a list that is filled, on exit, with what the forward wrote
    (the attributes the tracer itself adds, its `_tensor_constant`s, are kept, not counted)."""
    modules = dict(module.named_modules(remove_duplicate=False))
    before = {path: _plain_state(m) for path, m in modules.items()}
    writes: list[str] = []
    try:
        yield writes
    finally:
        for path, m in modules.items():
            after = _plain_state(m)
            for key in after.keys() | before[path].keys():
                old, new = before[path].get(key, _MISSING), after.get(key, _MISSING)
                if key.startswith("_tensor_constant") or new is old:
                    continue
                if not _same_value(new, old):  # torch.export puts back equal copies of lists
                    writes.append(f"{path}.{key}" if path else f"self.{key}")
                _put_back(m, key, old)


_MISSING = object()


def _same_value(a, b) -> bool:
    """Equal plain values (numbers, strings, lists and tuples of them) of one type."""
    if type(a) is not type(b) or not isinstance(a, (bool, int, float, str, list, tuple)):
        return False
    try:
        return bool(a == b)
    except Exception:  # elements whose == is not a bool (tensors)
        return False


def _plain_state(module: nn.Module) -> dict[str, object]:
    """Attributes, parameters, buffers and children by name (identity of each value)."""
    state = {k: v for k, v in vars(module).items()
             if k not in STORES and not k.startswith("_forward")
             and not k.startswith("_backward") and not k.endswith("_hooks")}
    return state | stored(module)


def _put_back(module: nn.Module, key: str, value) -> None:
    store = store_of(module, key)
    if store is None:
        store = module.__dict__
    if value is _MISSING:
        store.pop(key, None)
    else:
        store[key] = value


def _attribute(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _first_line(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {first_line}"


def export_own_forward(module: nn.Module, path: str, args: tuple, kwargs: dict) -> TraceResult:
    """The torch.export frontend, for a forward that symbolic tracing could not handle.

    Exports the module at the example call (`args`, `kwargs`, captured from a run of the whole
    model) into an aten-level graph, with every submodule inlined, and hands it back as a plain
    (trainable, train()/eval()-able) GraphModule whose parameters are the module's own tensors.
    The graph is specialised to the example call: Python branches take the path they took then.
    The leading (batch) dimension of every tensor argument is left to torch.export to keep
    dynamic where the code allows (Dim.AUTO), so the graph runs at other batch sizes.
    """
    def batch_dynamic(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: torch.export.Dim.AUTO}
        return None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        dynamic = {name: tree_map(batch_dynamic, value) for name, value in bound.items()}
        # An example batch of 1 would otherwise be specialised to 1 (0/1 specialisation).
        with size_oblivious(), state_kept(module) as writes:
            program = torch.export.export(module, tuple(args), dict(kwargs),
                                          dynamic_shapes=dynamic, strict=False)
        unlifted = program.module()
        graph_module = fx.GraphModule(unlifted, unlifted.graph, class_name=type(module).__name__)
    except Exception as err:  # exporting user code can fail in any way: report it
        return TraceResult(path, None, _first_line(err), "torch.export")
    if writes:
        return TraceResult(path, None, f"its forward writes module state ({', '.join(writes)})",
                           "torch.export", writes=True)
    graph_module.train(module.training)
    return TraceResult(path, graph_module.graph, None, "torch.export", graph_module)
