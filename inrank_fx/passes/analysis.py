"""Which weights are read where: the question the pass must answer before it rewrites anything.

A weight may be factored only when *every* read of it is a matmul the pass understands. Reads come
from three places: calls of a module type with a handler (nn.Linear), matmul nodes in traced
forwards, and everything else (library modules such as nn.Embedding, forwards that did not trace,
ops that are not matmuls). They are collected into one networkx graph

    parameter ── name (every qualified name that aliases it) ── read

so "which names and reads share this tensor" (tied weights, shared modules) is a connected
component, whatever path the tensor was reached by.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import torch.fx as fx
from torch import nn

from ..nn.linear import FactoredLayer
from .faithful import differs_from_original
from .matchers import (
    MatmulSite,
    ModuleHandler,
    NotFactorable,
    function_handler,
    handled_weights,
    indexed_only,
    is_batched_matmul,
    is_metadata_read,
    module_handler,
    view_chain,
)
from .substitutes import calls_children_only
from .tracing import (
    TraceResult,
    export_own_forward,
    has_own_forward,
    is_library_module,
    trace_own_forward,
)

# How a weight is read: through a call of its module, by a matmul node, by a module call
# assumed (its caller did not trace), or some other way.
ReadVia = Literal["call", "site", "blind", "opaque"]


@dataclass
class Read:
    """One read of a weight.

    via: "call" (a call of a module with a handler), "site" (a matmul node in a traced
    forward), "blind" (a module with a handler whose caller did not trace: assumed a call), or
    "opaque" (anything else). `owner` is the called module's path, or for a site the path of the
    module whose forward holds it; `handler` is the called module's handler.
    """

    via: ReadVia
    where: str
    owner: str = ""
    site: MatmulSite | None = None
    untraced: bool = False  # read by a forward that could not be traced
    leaf_call: bool = False  # handed to a function fx keeps as a leaf (torch.export sees in)
    handler: ModuleHandler | None = None
    batched: bool = False  # an operand of a batched matmul (bmm, einsum, ...): expert stacks
    exportable: bool = True  # untraced: torch.export may capture its forward (example_inputs)


@dataclass
class WeightUse:
    """Everything known about one parameter of 2 or more dimensions."""

    param: nn.Parameter
    names: list[str]
    reads: list[Read] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]

    def reads_of(self, via: ReadVia) -> list[Read]:
        return [r for r in self.reads if r.via == via]


@dataclass
class Analysis:
    weights: list[WeightUse]
    traces: dict[str, TraceResult]
    already_factored: list[str]
    handlers: dict[int, ModuleHandler]  # id(module) → its handler, for every module that has one


class _Reads:
    """The graph parameter ── name ── read, built as reads are found."""

    def __init__(self, model: nn.Module) -> None:
        self.graph = nx.Graph()
        self.params: dict[int, nn.Parameter] = {}
        self.reads: list[Read] = []
        factored = {id(p) for m in model.modules() if isinstance(m, FactoredLayer)
                    for p in m.parameters()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.dim() >= 2 and id(p) not in factored:
                self.params[id(p)] = p
                self.graph.add_edge(("param", id(p)), ("name", name))

    def add(self, param: nn.Parameter, name: str, read: Read) -> None:
        if id(param) in self.params:
            self.graph.add_edge(("name", name), ("read", len(self.reads)))
            self.reads.append(read)

    def add_calls(self, module: nn.Module, path: str, handler: ModuleHandler, where: str,
                  via: ReadVia) -> None:
        """The weights of `module` (at `path`), read through calls of it."""
        for wpath, p in handled_weights(module, handler).items():
            self.add(p, _join(path, wpath), Read(via, where, path, handler=handler))

    def weights(self) -> list[WeightUse]:
        found = []
        for pid, param in self.params.items():
            component = nx.node_connected_component(self.graph, ("param", pid))
            names = sorted((n[1] for n in component if n[0] == "name"), key=_name_order)
            reads = [self.reads[n[1]] for n in sorted(component, key=str) if n[0] == "read"]
            found.append(WeightUse(param, names, reads))
        return sorted(found, key=lambda w: _name_order(w.name))


def analyse(model: nn.Module, config=None, captured: dict | None = None) -> Analysis:
    """Trace every module's own forward and find all reads of every parameter of 2 or more
    dimensions (`config` lets module handlers decline instances, e.g. k×k convolutions).

    `captured` maps module paths to an example call (args, kwargs): a forward that symbolic
    tracing cannot handle is then exported with torch.export instead, and its aten graph (all
    submodules inlined) stands for the whole subtree."""
    reads = _Reads(model)
    traces: dict[str, TraceResult] = {}
    handlers: dict[int, ModuleHandler] = {}
    already: list[str] = []
    exported: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{e}.") if e else path for e in exported):
            continue  # inside a subtree that torch.export captured as one graph
        if isinstance(module, FactoredLayer):
            already.append(path)
        elif (handler := module_handler(module, config)) is not None:
            handlers[id(module)] = handler
            if not path:  # the model itself is the layer: the user calls it
                reads.add_calls(module, path, handler, "the model itself", "call")
            # otherwise its reads are the calls of it, found in its callers' traces
        elif not has_own_forward(module):
            pass  # a container (ModuleList, ModuleDict): its callers call its children
        elif calls_children_only(module):  # a substitute such as nn.TransformerEncoder's
            _children_called(module, path, config, reads,
                             f"called by {type(module).__name__} {path!r}")
        elif is_library_module(module):
            for pname, p in module.named_parameters():
                where = f"read inside {type(module).__name__} '{path}'"
                reads.add(p, _join(path, pname), Read("opaque", where, path))
        else:
            trace = _trace(module, path, captured)
            traces[path] = trace
            if trace.ok and trace.frontend == "torch.export":
                exported.append(path)
            for graph in trace.graphs:  # one per call form: a read in any of them counts
                _reads_in_graph(graph, trace.module or module, path, reads, config)
            if not trace.ok:
                _untraced(module, path, config, reads, trace)
    return Analysis(reads.weights(), traces, already, handlers)


def _trace(module: nn.Module, path: str, captured: dict | None) -> TraceResult:
    """The module's own forward, traced by fx, or by torch.export where fx loses something:
    weights read by this very forward (its nn.Linear children are swapped as leaves and its
    other children traced on their own), or weights it hands to a function fx keeps as a leaf
    (torch.fx.wrap), whose matmuls only torch.export sees."""
    trace = trace_own_forward(module, path)
    # (a stack of experts only indexed, `self.w[e]`, is factored without a graph: the forward
    # runs unchanged on the factored stack, as it does without example_inputs)
    own_weights = any(p.dim() == 2 or p.dim() >= 3 and not indexed_only(module, name)
                      for name, p in module.named_parameters(recurse=False))
    lost = ((not trace.ok and own_weights)
            or (trace.ok and _weights_into_leaves(trace.graph, module)))
    if captured and path in captured and lost and not trace.writes:
        export_trace = export_own_forward(module, path, *captured[path])
        if export_trace.ok:
            trace = export_trace
        elif not trace.ok:
            trace.error += f"; torch.export: {export_trace.error}"
    return _checked(module, trace, captured)


def _checked(module: nn.Module, trace: TraceResult, captured: dict | None) -> TraceResult:
    """The safety net: a graph that would replace the forward (it reads weights itself), run
    on the module's example call next to the original; one that differs is not used."""
    if not (trace.ok and captured and trace.path in captured):
        return trace
    if trace.frontend != "torch.export" and not trace.forms:
        return trace  # reads no weight itself: never replaces the forward
    why = differs_from_original(module, trace, captured[trace.path])
    if why is None:
        return trace
    return TraceResult(trace.path, None, why, trace.frontend)


def _children_called(module: nn.Module, path: str, config, reads: _Reads, where: str) -> None:
    """Every child with a handler counts as called (its caller is not traced), and so does every
    such module inside a container (nn.ModuleList, nn.ModuleDict: no forward of their own), as
    in `[head(x) for head in self.heads]`."""
    for cname, child in module.named_children():
        handler = module_handler(child, config)
        if handler is not None:
            reads.add_calls(child, _join(path, cname), handler, where, "blind")
        elif not has_own_forward(child):
            _children_called(child, _join(path, cname), config, reads, where)


def _untraced(module: nn.Module, path: str, config, reads: _Reads, trace: TraceResult) -> None:
    """A forward no frontend could trace (or that writes module state): its own weights are
    read unseen (opaque), so are the weights it writes in place, and its children with a
    handler are taken as called."""
    label = f"'{path}' ({type(module).__name__})" if path else type(module).__name__
    why = "writes module state, so is not traced" if trace.writes else "did not trace"
    for pname, p in module.named_parameters(recurse=False):
        reads.add(p, _join(path, pname), Read("opaque", f"read by {label}, whose forward {why}",
                                              path, untraced=True, exportable=not trace.writes))
    for target, node in trace.written.items():
        value = _resolve(module, target)
        if isinstance(value, nn.Parameter):
            reads.add(value, _join(path, target), Read(
                "opaque", f"written in place by node {node!r} in {label}", path, untraced=True))
    _children_called(module, path, config, reads,
                     f"called by {label}, whose forward did not trace")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _name_order(name: str) -> tuple[int, str]:
    return (name.count("."), name)


def _reads_in_graph(graph: fx.Graph, module: nn.Module, path: str, reads: _Reads, config) -> None:
    """Record every read of a 2-D parameter in one module's traced forward."""
    where_mod = f"'{path}'" if path else "the root forward"
    param_nodes: dict[fx.Node, nn.Parameter] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = _resolve(module, node.target)
            if isinstance(obj, nn.Parameter) and obj.dim() >= 2:
                param_nodes[node] = obj
        elif node.op == "call_module":
            child = module.get_submodule(node.target)
            handler = module_handler(child, config)
            if handler is not None:
                target = _join(path, node.target)
                reads.add_calls(child, target, handler, f"call of '{target}' in {where_mod}",
                                "call")

    candidates = set(param_nodes)
    for pnode, param in param_nodes.items():
        views = view_chain(pnode)
        readers = {user: None for view in views for user in view.users
                   if user not in views and not is_metadata_read(user)}
        for user in readers:
            reads.add(param, _join(path, pnode.target),
                      _read_at(user, pnode, candidates, path, where_mod))


def _weights_into_leaves(graph: fx.Graph, module: nn.Module) -> bool:
    """Does this forward pass a 2-D parameter straight into a function that is not a matmul
    (one that fx kept as a leaf, such as torchvision's shifted_window_attention)?"""
    for node in graph.nodes:
        if (node.op != "call_function" or function_handler(node) is not None
                or is_metadata_read(node)):
            continue
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                value = _resolve(module, arg.target)
                if isinstance(value, nn.Parameter) and value.dim() == 2:
                    return True
    return False


def _read_at(user: fx.Node, pnode: fx.Node, candidates: set, path: str, where_mod: str) -> Read:
    where = f"node '{user.name}' ({_describe(user)}) in {where_mod}"
    batched = is_batched_matmul(user)
    handler = function_handler(user)
    if handler is None:
        if user.op == "call_function" and user.target is getattr:  # w.data, w.grad, ...
            return Read("opaque", f"its attribute .{user.args[1]} read in {where_mod}", path)
        if user.op == "call_function" and pnode in (*user.args, *user.kwargs.values()):
            if _is_torch_op(user.target) or batched:  # no matmul handler (bmm, einsum, w[e])
                return Read("opaque", f"passed to {_describe(user)}() in {where_mod}", path,
                            batched=batched)
            where = (f"passed to {_describe(user)}(), a function fx keeps as a leaf "
                     f"(torch.fx.wrap), in {where_mod}")
            return Read("opaque", where, path, leaf_call=True)
        return Read("opaque", where, path, batched=batched)
    try:
        site = handler(user, candidates)
    except NotFactorable as err:
        return Read("opaque", f"{err} in {where_mod}", path, batched=batched)
    if site is None or site.param_node is not pnode:
        return Read("opaque", f"{where}: not in a weight slot", path, batched=batched)
    return Read("site", where, path, site)


def _is_torch_op(target) -> bool:
    """A torch function or operator, as opposed to a user's function fx kept as a leaf."""
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "operator", "_operator", "builtins")


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _resolve(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
