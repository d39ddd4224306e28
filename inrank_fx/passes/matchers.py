"""What counts as a matmul against a weight: a small registry of handlers.

Two kinds of handler:
- *function handlers* look at one fx node (call_function / call_method) whose operand is a 2-D
  parameter, possibly seen through transposes, and describe it as a `MatmulSite`;
- *module handlers* name module types whose call is a matmul against one of their parameters
  (nn.Linear) and how to build the factored replacement.

Users extend the pass with `register_function_handler` / `register_module_handler` instead of
editing the core.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import operator
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..config import InRankConfig
from ..errors import InRankError, InRankKeyError, InRankValueError
from ..nn.attention import InRankMultiheadAttention
from ..nn.conv import InRankConv2d
from ..nn.linear import InRankLinear
from .torch_internals import C_LINEAR

Argument = Any


@dataclass
class MatmulSite:
    """One matmul against a weight parameter, in the orientation of nn.Linear.

    The node computes  y = x·Wᵀ (+ bias), or with `weight_on_left` y = W·x (+ bias), where the
    layer weight W (out×in) is the parameter itself or, if `transposed`, its transpose.
    """

    node: fx.Node
    param_node: fx.Node  # the get_attr node of the parameter
    x: Argument
    transposed: bool
    weight_on_left: bool = False
    bias: Argument = None
    kind: str = ""


class NotFactorable(InRankError):
    """A node reads a weight in a way the pass does not factor; the message says why."""


# -- weight views: a parameter seen through transposes ---------------------------------------

_TRANSPOSE_ATTRS = ("T", "mT")
_ATEN_TRANSPOSES = (torch.ops.aten.t.default, torch.ops.aten.numpy_T.default)


def _is_01_swap(dims) -> bool:
    dims = tuple(d % 2 for d in dims)
    return sorted(dims) == [0, 1]


def view_source(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """If `node` is a transpose (or no-op view) of another node, (that node, transposes?)."""
    if node.op == "call_function" and node.target is builtins.getattr:
        if len(node.args) == 2 and node.args[1] in _TRANSPOSE_ATTRS:
            return node.args[0], True
        return None
    if node.op == "call_method" and node.args:
        src, rest = node.args[0], node.args[1:]
        if node.target == "t" and not rest:
            return src, True
        if node.target == "transpose" and len(rest) == 2 and _is_01_swap(rest):
            return src, True
        if node.target == "permute" and _permute_dims(rest) == (1, 0):
            return src, True
        if node.target == "contiguous" and not rest:
            return src, False
        return None
    if node.op == "call_function" and node.args:
        src, rest = node.args[0], node.args[1:]
        if node.target in _ATEN_TRANSPOSES and not rest:
            return src, True
        if node.target is torch.ops.aten.transpose.int and len(rest) == 2 and _is_01_swap(rest):
            return src, True
        if node.target is torch.ops.aten.permute.default and _permute_dims(rest) == (1, 0):
            return src, True
        if node.target is torch.t and not rest:
            return src, True
        if node.target is torch.transpose and len(rest) == 2 and _is_01_swap(rest):
            return src, True
        if node.target is torch.permute and _permute_dims(rest) == (1, 0):
            return src, True
    return None


def _permute_dims(rest) -> tuple | None:
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if all(isinstance(d, int) for d in rest) and len(rest) == 2:
        return tuple(d % 2 for d in rest)
    return None


def view_chain(root: fx.Node) -> list[fx.Node]:
    """`root` and every node that is a transpose (or no-op view) of it, transitively."""
    chain, frontier = [root], [root]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            source = view_source(user)
            if source is not None and source[0] is node:
                chain.append(user)
                frontier.append(user)
    return chain


# Reads of a tensor's metadata, not of its values: `w.dtype`, `w.shape`, `w.size(0)`, ... A
# factored layer answers them from its `.weight` property, so they do not keep a weight dense.
METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "is_cuda", "requires_grad",
                            "layout", "is_meta", "is_sparse", "is_quantized"})
METADATA_METHODS = frozenset({"size", "dim", "get_device", "is_floating_point", "is_complex",
                              "numel", "nelement", "element_size"})


def is_metadata_read(node: fx.Node) -> bool:
    """Does `node` read only the metadata (dtype, device, shape) of its first argument?"""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) >= 2 and node.args[1] in METADATA_ATTRS
    return node.op == "call_method" and node.target in METADATA_METHODS


# Ops that multiply stacks of matrices: what runs mixture-of-experts weights (experts × out × in).
BATCHED_MATMULS = frozenset({torch.bmm, torch.baddbmm, torch.matmul, torch.einsum,
                             operator.matmul, *filter(None, [getattr(torch, "_grouped_mm", None)]),
                             # their aten forms, as a forward captured by torch.export has them
                             torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
                             torch.ops.aten.matmul.default, torch.ops.aten.einsum.default,
                             *filter(None, [getattr(torch.ops.aten, "_grouped_mm", None)])})
BATCHED_METHODS = frozenset({"bmm", "baddbmm", "matmul"})


def is_expert_index(node: fx.Node) -> bool:
    """`w[e]` (getitem) or its aten form `aten.select.int(w, 0, e)` (what torch.export records)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    return node.target is torch.ops.aten.select.int and len(node.args) == 3 and node.args[1] == 0


def _swaps_last_two_of_stack(node: fx.Node) -> bool:
    """aten.transpose.int(w, -2, -1) / (1, 2) of a 3-D tensor, or w.mT."""
    if node.op == "call_function" and node.target is torch.ops.aten.transpose.int \
            and len(node.args) == 3:
        return sorted(d % 3 for d in node.args[1:] if isinstance(d, int)) == [1, 2]
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",)


def _is_custom_op(node: fx.Node) -> bool:
    """An op registered outside aten (torch.library): a kernel such as transformers'
    grouped_mm_fallback, which a mixture of experts hands its transposed stack to."""
    namespace = getattr(node.target, "namespace", None)
    return node.op == "call_function" and namespace not in (None, "aten", "prim", "prims")


def is_batched_matmul(node: fx.Node) -> bool:
    """Is `node` a batched matmul (bmm, baddbmm, matmul, einsum, grouped mm), or one expert
    indexed out of a stack and then multiplied (`F.linear(x, w[e])`: a loop over experts)?"""
    if is_expert_index(node):
        return any(is_batched_matmul(user) or function_handler(user) is not None
                   for user in node.users)
    if _swaps_last_two_of_stack(node):  # w.transpose(-2, -1) handed on: to a batched matmul,
        return any(is_batched_matmul(user) or _is_custom_op(user) for user in node.users)
    if node.op == "call_function":
        return node.target in BATCHED_MATMULS
    return node.op == "call_method" and node.target in BATCHED_METHODS


def weight_of(arg: Argument, param_nodes: set[fx.Node]) -> tuple[fx.Node, bool] | None:
    """(parameter get_attr node, transposed?) if `arg` is a weight parameter seen through views."""
    transposed = False
    while isinstance(arg, fx.Node):
        if arg in param_nodes:
            return arg, transposed
        source = view_source(arg)
        if source is None:
            return None
        arg, flip = source
        transposed ^= flip
    return None


# -- function handlers -------------------------------------------------------------------------

FunctionHandler = Callable[[fx.Node, set], Union[MatmulSite, None]]
_FUNCTION_HANDLERS: dict[tuple[str, Any], FunctionHandler] = {}


def register_function_handler(op: str, target, handler: FunctionHandler) -> None:
    """Handle fx nodes with this `op` ("call_function" / "call_method") and `target`.

    `handler(node, param_nodes)` returns a MatmulSite, None when no weight is involved, or raises
    NotFactorable with the reason a weight it reads cannot be factored.
    """
    if op not in ("call_function", "call_method"):
        raise InRankValueError(f"op must be 'call_function' or 'call_method', got {op!r}")
    _FUNCTION_HANDLERS[(op, target)] = handler


def function_handler(node: fx.Node) -> FunctionHandler | None:
    try:
        return _FUNCTION_HANDLERS.get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _linear(node: fx.Node, params: set) -> MatmulSite | None:
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if weight_of(x, params) is not None:
        raise NotFactorable(f"node '{node.name}' passes a weight as the input of linear")
    found = weight_of(w, params)
    if found is None:
        return None
    return MatmulSite(node, found[0], x, transposed=found[1], bias=b, kind="F.linear")


def _operand_site(node: fx.Node, a, b, params: set, kind: str, bias=None) -> MatmulSite | None:
    """The site of a two-operand matmul a @ b where one operand may be a weight."""
    left, right = weight_of(a, params), weight_of(b, params)
    if left is not None and right is not None:
        raise NotFactorable(f"node '{node.name}' multiplies two weights")
    if right is not None:  # x @ M computes x·Wᵀ with W = Mᵀ
        return MatmulSite(node, right[0], a, transposed=not right[1], bias=bias, kind=kind)
    if left is not None:  # M @ x computes W·x with W = M
        return MatmulSite(
            node, left[0], b, transposed=left[1], weight_on_left=True, bias=bias, kind=kind
        )
    return None


def _two_operand(kind: str, first: str, second: str) -> FunctionHandler:
    def handler(node: fx.Node, params: set) -> MatmulSite | None:
        return _operand_site(node, _arg(node, 0, first), _arg(node, 1, second), params, kind)

    return handler


def _addmm(node: fx.Node, params: set) -> MatmulSite | None:
    bias, m1, m2 = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
    site = _operand_site(node, m1, m2, params, "addmm", bias=bias)
    if site is not None and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        raise NotFactorable(f"node '{node.name}': addmm with beta/alpha other than 1")
    return site


_matmul = _two_operand("matmul", "input", "other")
_mm = _two_operand("mm", "input", "mat2")

for _target in [t for t in (F.linear, C_LINEAR, torch.ops.aten.linear.default) if t]:
    register_function_handler("call_function", _target, _linear)
for _target in (torch.matmul, operator.matmul, torch.ops.aten.matmul.default):
    register_function_handler("call_function", _target, _matmul)
for _target in (torch.mm, torch.ops.aten.mm.default):
    register_function_handler("call_function", _target, _mm)
for _target in (torch.addmm, torch.ops.aten.addmm.default):
    register_function_handler("call_function", _target, _addmm)
for _method in ("matmul", "__matmul__"):
    register_function_handler("call_method", _method, _matmul)
register_function_handler("call_method", "mm", _mm)
register_function_handler("call_method", "addmm", _addmm)


# -- module handlers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleHandler:
    """A module type whose call is a matmul against its parameter `weight_attr`.

    `matrix(module)` is that weight as the out×in matrix W of y = x·Wᵀ; `build(module, rank, *,
    buffer, init, name)` makes the factored replacement; `accepts(module, config)` may decline a
    particular instance (a grouped convolution, say).
    """

    module_type: Union[type, str]
    weight_attr: str
    build: Callable[..., nn.Module]  # an InRankLinear, InRankConv2d, InRankMultiheadAttention
    matrix: Callable[[nn.Module], torch.Tensor]
    accepts: Callable[[nn.Module, InRankConfig], bool]
    kind: str
    extra_weights: tuple[str, ...] = ()  # other weights the call reads and `build` factors too


_MODULE_HANDLERS: dict[Union[type, str], ModuleHandler] = {}


def register_module_handler(
    module_type: Union[type, str],
    build: Callable[..., nn.Module],
    weight_attr: str = "weight",
    *,
    matrix: Callable[[nn.Module], torch.Tensor] | None = None,
    accepts: Callable[[nn.Module, InRankConfig], bool] | None = None,
    kind: str | None = None,
    extra_weights: tuple[str, ...] = (),
) -> None:
    """Factor calls of `module_type` (a class, or a qualified class name such as
    "transformers.pytorch_utils.Conv1D" so that the package need not be imported) with
    `build(module, rank, *, buffer, init, name)`. `extra_weights` names further weights (paths
    inside the module) that its call reads and `build` factors along with the main one."""
    name = module_type if isinstance(module_type, str) else module_type.__name__
    _MODULE_HANDLERS[module_type] = ModuleHandler(
        module_type,
        weight_attr,
        build,
        matrix or (lambda m: getattr(m, weight_attr)),
        accepts or (lambda m, config: True),
        kind or name.rpartition(".")[2],
        tuple(extra_weights),
    )


def handled_weights(module: nn.Module, handler: ModuleHandler) -> dict[str, nn.Parameter]:
    """Path inside the module → parameter, for every weight a call of the module reads."""
    paths = (handler.weight_attr, *handler.extra_weights)
    return {path: module.get_parameter(path) for path in paths}


def module_handler(module: nn.Module, config=None) -> ModuleHandler | None:
    """The handler for this module's type, or for a base type whose forward it does not override
    (a subclass with its own forward computes something else and is left alone)."""
    for cls in type(module).__mro__:
        handler = _MODULE_HANDLERS.get(cls) or _MODULE_HANDLERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if handler is not None:
            if type(module).forward is not cls.forward or not handler.accepts(module, config):
                return None
            return handler
    return None


def _conv_accepts(conv: nn.Conv2d, config) -> bool:
    """Plain convolutions only; 1×1 by default, any kernel when config.convs == "all"."""
    mode = getattr(config, "convs", "1x1")
    if mode == "none" or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    return mode == "all" or tuple(conv.kernel_size) == (1, 1)


def _conv1d_build(module, rank, *, buffer=0, init="svd", name=""):
    # transformers' Conv1D computes x·W + b with W: in×out, i.e. a Linear with weight Wᵀ.
    return InRankLinear.from_weight(module.weight.T, module.bias, rank, buffer=buffer, init=init,
                                    name=name or "Conv1D")


register_module_handler(nn.Linear, InRankLinear.from_linear, kind="nn.Linear")
register_module_handler(nn.Conv2d, InRankConv2d.from_conv, accepts=_conv_accepts,
                        matrix=lambda m: m.weight.reshape(m.out_channels, -1), kind="nn.Conv2d")
register_module_handler("transformers.pytorch_utils.Conv1D", _conv1d_build,
                        matrix=lambda m: m.weight.T, kind="Conv1D")
register_module_handler(nn.MultiheadAttention, InRankMultiheadAttention.from_mha,
                        weight_attr="in_proj_weight", extra_weights=("out_proj.weight",),
                        accepts=lambda m, config: InRankMultiheadAttention.supports(m),
                        kind="nn.MultiheadAttention")


# -- the registries as a whole -----------------------------------------------------------------


@contextlib.contextmanager
def handlers_restored() -> Iterator[None]:
    """Undo, when the block ends, every handler and substitute registered, replaced or removed
    inside it: for tests, and for experiments that must not change the process's registries."""
    from .substitutes import _SUBSTITUTES

    saved = [(registry, dict(registry))
             for registry in (_FUNCTION_HANDLERS, _MODULE_HANDLERS, _SUBSTITUTES)]
    try:
        yield
    finally:
        for registry, contents in saved:
            registry.clear()
            registry.update(contents)


def unregister_module_handler(module_type: Union[type, str]) -> None:
    """Remove the handler for `module_type` (a KeyError names it if there is none)."""
    if module_type not in _MODULE_HANDLERS:
        raise InRankKeyError(f"no module handler is registered for {module_type!r}")
    del _MODULE_HANDLERS[module_type]


def unregister_function_handler(op: str, target) -> None:
    """Remove the handler for fx nodes with this `op` and `target`."""
    if (op, target) not in _FUNCTION_HANDLERS:
        raise InRankKeyError(f"no function handler is registered for {op} {target!r}")
    del _FUNCTION_HANDLERS[(op, target)]


MATMUL_NAMES = frozenset({"linear", "matmul", "mm", "bmm", "einsum", "_grouped_mm", "grouped_mm"})


def indexed_only(module: nn.Module, attr: str) -> bool:
    """Does every method of `module`'s class use `self.<attr>` only by indexing it (`self.w[e]`)
    or reading its metadata (`self.w.shape`), and hand at least one indexed expert to a matmul
    (`F.linear(x, self.w[e])`)? What a loop over the experts of a stack does (transformers'
    MixtralExperts) in a forward fx cannot trace: the source says what the graph cannot.
    Assignments (in __init__) are not uses."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module))))
    except (OSError, TypeError, SyntaxError):
        return False
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == attr
            and isinstance(n.value, ast.Name) and n.value.id == "self"
            and isinstance(n.ctx, ast.Load)]
    multiplied = False
    for use in uses:
        parent = parents.get(use)
        if isinstance(parent, ast.Attribute) and parent.attr in METADATA_ATTRS:
            continue
        if not (isinstance(parent, ast.Subscript) and parent.value is use):
            return False
        call = parents.get(parent)
        if isinstance(call, ast.Call) and parent in call.args:
            name = getattr(call.func, "attr", getattr(call.func, "id", ""))
            multiplied |= name in MATMUL_NAMES
    return multiplied

