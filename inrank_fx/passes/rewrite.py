"""The rewrite: matmul nodes against a weight become calls of a factored layer.

`factor_matmul_sites` is a plain GraphModule → GraphModule pass in the style of pytorch/examples
fx/replace_op.py. The helpers around it place the factored layers in the module tree and put the
rewritten forwards back where the original modules were.
"""
from __future__ import annotations

import copy
import inspect
import operator

import torch
import torch.fx as fx
from torch import nn

from ..errors import InRankError
from ..nn.experts import STACK_METADATA
from ..nn.modules import carry_hooks
from .matchers import MatmulSite, is_expert_index, view_chain
from .torch_internals import register_tensors_like, remove_parameter


@torch.fx.wrap
def swap_last_dims(x: torch.Tensor) -> torch.Tensor:
    """Turns W·x into (xᵀ·Wᵀ)ᵀ for a factored layer; a vector is its own transpose."""
    return x.mT if x.dim() >= 2 else x


def factor_matmul_sites(gm: fx.GraphModule, sites: list[tuple[MatmulSite, str]]) -> fx.GraphModule:
    """Replace each site's matmul node by a call of the layer at its target path.

    `sites` pairs each MatmulSite (whose nodes belong to gm.graph) with the qualified name,
    relative to gm, of the factored layer computing x·Wᵀ. Weight reads left unused are erased.
    """
    graph = gm.graph
    stale: list[fx.Node] = []
    for site, target in sites:
        with graph.inserting_before(site.node):
            x = site.x
            if site.weight_on_left:
                x = graph.call_function(swap_last_dims, (x,))
            y = graph.call_module(target, (x,))
            if site.weight_on_left:
                y = graph.call_function(swap_last_dims, (y,))
            if site.bias is not None:
                y = graph.call_function(operator.add, (y, site.bias))
        y.meta.update(site.node.meta)
        site.node.replace_all_uses_with(y)
        graph.erase_node(site.node)
        stale.append((site.param_node, target))
    _erase_unused_views(graph, [param for param, _ in stale])
    for param, target in dict(stale).items():
        if param in graph.nodes and param.users:  # metadata reads (w.dtype, w.shape) are left:
            with graph.inserting_before(param):  # the layer's .weight answers them
                weight = graph.get_attr(f"{target}.weight")
            param.replace_all_uses_with(weight)
            graph.erase_node(param)
    graph.lint()
    gm.recompile()
    return gm


def _erase_unused_views(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase weight get_attr nodes and transposes of them that no longer have users."""
    for root in dict.fromkeys(roots):
        for node in reversed(view_chain(root)):
            if not node.users:
                graph.erase_node(node)


def graph_module_like(module: nn.Module, graph: fx.Graph,
                      kind: type = fx.GraphModule) -> fx.GraphModule:
    """A GraphModule (of `kind`) running `graph` that otherwise looks like `module`: same
    children, parameters, buffers (persistence kept), plain attributes and training flag, so
    that its state_dict keys and the attributes other code reads do not change."""
    gm = kind(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        setattr(gm, name, child)  # fx copies only what the graph uses, as bare containers
    register_tensors_like(gm, module)
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in vars(gm):
            setattr(gm, key, value)
    gm.train(module.training)
    carry_hooks(module, gm)
    return gm


class CallFormsGraphModule(fx.GraphModule):
    """A rewritten forward that runs the graph traced for the call's form.

    fx traces an argument that defaults to None as if it were given, which would bake
    `if mask is not None` into the graph; so the pass traces such a forward once per call form
    (its mode, and which of those arguments a call leaves None: `self.training` is baked into a
    graph too), rewrites every graph alike, and this module picks the graph by its mode and the
    call's arguments. `graph` is the form of the module's mode at transform time that gives
    every argument; `forms` maps each `CallForm` to its graph. A required argument passed
    None, which no trace saw, raises instead of running a graph traced for a value."""

    def set_forms(self, forward, forms: dict) -> None:
        """Run `forms` (form → graph, rewritten in place), dispatched by the signature of the
        original `forward`."""
        self.__dict__["_call_signature"] = _plain_signature(forward)
        self.__dict__["_call_forms"] = forms
        self.recompile()

    @property
    def forms(self) -> dict:
        return dict(self.__dict__.get("_call_forms", {}))

    def recompile(self):
        code = super().recompile()
        if "_call_forms" in self.__dict__:
            type(self).forward = _dispatcher(self, self.__dict__["_call_signature"],
                                             self.__dict__["_call_forms"])
        return code

    def __reduce__(self):
        # fx pickles a GraphModule as the code of `graph` alone: the other forms would be lost
        # and the loaded module would run one graph for every call, silently
        raise InRankError(f"{type(self).__name__}: a forward rewritten in several call forms "
                          "cannot be pickled whole (torch.save(model)); save its state_dict "
                          "(and transform the model again to load it), or freeze and export it")

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():  # fx keeps only what `graph` reads: the
            if key not in copied.__dict__:  # other forms' constants go too
                copied.__dict__[key] = copy.deepcopy(value, memo)
        if "_call_forms" in self.__dict__:
            copied.__dict__["_call_signature"] = self.__dict__["_call_signature"]
            copied.__dict__["_call_forms"] = copy.deepcopy(self.__dict__["_call_forms"], memo)
            copied.recompile()
        return copied


def _plain_signature(forward) -> inspect.Signature:
    """The forward's signature without annotations (the dispatcher's source names no types)."""
    signature = inspect.signature(forward)
    return signature.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                         for p in signature.parameters.values()],
                             return_annotation=inspect.Signature.empty)


def _dispatcher(gm: fx.GraphModule, signature: inspect.Signature, forms: dict):
    """The forward: `signature`'s own parameters, then the graph of the call's form, called
    with every argument in order (fx makes keyword-only arguments positional)."""
    parameters = list(signature.parameters.values())
    optional = [p.name for p in parameters if p.default is None
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    compiled = {(form.training, *(name in form.left_none for name in optional)):
                _compiled(gm, graph) for form, graph in forms.items()}
    defaults = {f"_default_{p.name}": p.default for p in parameters
                if p.default is not inspect.Parameter.empty}
    header, passed, keyword_only = [], [], False
    for p in parameters:
        default = f"=_default_{p.name}" if p.default is not inspect.Parameter.empty else ""
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):  # (tracing refuses *args followed
            stars = "*" if p.kind is p.VAR_POSITIONAL else "**"  # by named parameters)
            header.append(f"{stars}{p.name}")
            passed.append(f"{stars}{p.name}")
            keyword_only = True
            continue
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            header.append("*")
            keyword_only = True
        header.append(f"{p.name}{default}")
        passed.append(p.name)
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    lines = [f"def forward(self, {', '.join(header)}):"]
    lines += [f"    if {name} is None: raise _required_none({name!r})" for name in required]
    key = "".join(f" {name} is None," for name in optional)
    lines.append(f"    return _forms[(self.training,{key})](self, {', '.join(passed)})")
    path = type(gm).__name__

    def required_none(name: str) -> InRankError:
        return InRankError(f"{path}: its forward was rewritten from a graph traced with "
                           f"{name!r} given; this call passes {name}=None, which no trace saw "
                           f"(give it a default of None in the signature, and transform traces "
                           f"both forms)")

    namespace = {"_forms": compiled, "_required_none": required_none, **defaults}
    exec(compile("\n".join(lines), f"<inrank_fx call forms of {path}>", "exec"), namespace)
    return namespace["forward"]


def _compiled(gm: fx.GraphModule, graph: fx.Graph):
    """The Python function fx generates for `graph`, run with `gm` as self."""
    return type(fx.GraphModule(gm, copy.deepcopy(graph))).forward


def install_layer(root: nn.Module, param_name: str, layer: nn.Module, *,
                  beside: bool = False) -> str:
    """Put the factored layer where the parameter was (the parameter goes away); returns the
    layer's path. `beside`, for a module whose own forward is not rewritten (its parent hands
    its weight to F.linear, as timm's attention does with `self.qkv.weight`): the layer goes
    beside the attribute, at `<attr>_factored`, and the attribute keeps reading as a tensor,
    the layer's dense product, so `.weight` reads (shapes, tools that walk nn.Linear modules)
    keep working on the module that holds it."""
    parent_name, _, attr = param_name.rpartition(".")
    parent = root.get_submodule(parent_name)
    remove_parameter(parent, attr)
    if not beside:
        parent.add_module(attr, layer)
        return param_name
    name = f"{attr}{FACTORED_SUFFIX}"
    parent.add_module(name, layer)
    if not isinstance(getattr(type(parent), attr, None), property):
        parent.__class__ = _reading_through(type(parent), attr, name)
    return f"{parent_name}.{name}" if parent_name else name


# Where a module's attribute keeps reading as a tensor, its factored layer's name is the
# attribute's with this suffix (`qkv.weight` → `qkv.weight_factored`).
FACTORED_SUFFIX = "_factored"
_READ_THROUGH: dict[tuple[type, str, str], type] = {}


def _reading_through(cls: type, attr: str, layer_name: str) -> type:
    """A subclass of `cls` whose `attr` reads the dense product of the layer at `layer_name`,
    as torch.nn.utils.parametrize does for a parametrized weight (one class per kind, cached;
    pickled as its base class and the two names, so torch.save and deepcopy work)."""
    key = (cls, attr, layer_name)
    if key not in _READ_THROUGH:
        def read(self):
            return getattr(self, layer_name).weight

        def reduce(self, protocol):
            return _restored, (cls, attr, layer_name, self.__getstate__())

        read.__doc__ = f"The dense product of the factored layer `{layer_name}` (read-only)."
        _READ_THROUGH[key] = type(f"FactoredWeight{cls.__name__}", (cls,),
                                  {attr: property(read), "__reduce_ex__": reduce,
                                   "__module__": cls.__module__})
    return _READ_THROUGH[key]


def _restored(cls: type, attr: str, layer_name: str, state: dict) -> nn.Module:
    module = object.__new__(_reading_through(cls, attr, layer_name))
    module.__setstate__(state)
    return module


def read_through_weight(gm: fx.GraphModule, targets: list[str]) -> set[str]:
    """Rewrite the reads of parameters that became factored stacks (mixture-of-experts weights,
    `InRankExperts`) in place: a matmul against the stack (`bmm(x, w)`, `x @ w.mT`, a
    two-operand einsum that is one of those, `F.linear(x, w[e], b)`) becomes a call of the
    layer (two thin matmuls); every other read (grouped mm, an op not recognised) is pointed at
    the layer's `.weight`, the stacked product: get_attr(target) → getattr(get_attr(target),
    "weight"), a tensor of the parameter's shape. Returns the targets so read (dense work)."""
    if not targets:
        return set()
    graph, product_reads = gm.graph, set()
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in targets:
            continue
        for view, user, call in _stack_matmuls(node):
            with graph.inserting_before(user):
                y = graph.call_module(node.target, call["args"], call["kwargs"])
                if call.get("bias") is not None:
                    y = graph.call_function(operator.add, (y, call["bias"]))
            y.meta.update(user.meta)
            user.replace_all_uses_with(y)
            graph.erase_node(user)
            if view is not node and not view.users:
                graph.erase_node(view)
        if any(not _stack_metadata_read(user) for user in node.users):
            product_reads.add(node.target)
            with graph.inserting_after(node):
                product = graph.call_function(getattr, (node, "weight"))
            node.replace_all_uses_with(
                product, delete_user_cb=lambda user: user is not product
                and not _stack_metadata_read(user))
        elif not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return product_reads


def _stack_matmuls(stack: fx.Node) -> list[tuple[fx.Node, fx.Node, dict]]:
    """The reads of a stack (E × out × in) that are matmuls against it, as (the node read: the
    stack, its transpose or one expert; the matmul node; the layer call replacing it)."""
    found = []
    for view in list(stack.users):
        if _swaps_last_two(view, stack):  # w.mT, w.transpose(1, 2), w.permute(0, 2, 1)
            calls = [(u, _matmul_call(u, view, transposed=True)) for u in view.users]
        elif is_expert_index(view) and view.args[0] is stack \
                and isinstance(view.args[-1], (int, fx.Node)):  # w[e], aten.select.int(w, 0, e)
            calls = [(u, _linear_call(u, view, view.args[-1])) for u in view.users]
        else:
            continue
        if calls and all(call is not None for _, call in calls):
            found += [(view, user, call) for user, call in calls]
    for user in list(stack.users):
        call = _matmul_call(user, stack, transposed=False)
        if call is not None:
            found.append((stack, user, call))
    return found


def _stack_metadata_read(node: fx.Node) -> bool:
    """A read of the stack's metadata that the layer answers itself (StackReads)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in STACK_METADATA
    return node.op == "call_method" and node.target in STACK_METADATA


_MATMUL_FUNCTIONS = (torch.bmm, torch.matmul, operator.matmul, torch.ops.aten.bmm.default,
                     torch.ops.aten.matmul.default)


def _matmul_call(node: fx.Node, operand: fx.Node, transposed: bool) -> dict | None:
    """`node` as a layer call, if it multiplies rows by `operand` (the stack or its transpose):
    bmm / matmul / @ with the operand on the right, or a two-operand einsum spelling one."""
    if node.kwargs:
        return None
    is_matmul = ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
                 or (node.op == "call_method" and node.target in ("bmm", "matmul")))
    if is_matmul and len(node.args) == 2 and node.args[1] is operand \
            and node.args[0] is not operand:
        return {"args": (node.args[0],), "kwargs": {"transposed": transposed}}
    if node.op == "call_function" and node.target is torch.einsum and not transposed:
        return _einsum_call(node, operand)
    return None


def _einsum_call(node: fx.Node, stack: fx.Node) -> dict | None:
    """`einsum("eti,eoi->eto", x, w)` is bmm(x, w.mT); `"eto,eoi->eti"` is bmm(x, w): one
    batch letter shared, one contracted, the rest passed through, operands in any order."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or operands.count(stack) != 1:
        return None
    terms, arrow, out = equation.replace(" ", "").partition("->")
    pair = terms.split(",")
    if not arrow or len(pair) != 2 or "." in equation:
        return None
    x_term, w_term = pair if operands[1] is stack else pair[::-1]
    x = operands[0] if operands[1] is stack else operands[1]
    if len(w_term) != 3 or len(x_term) != 3 or len(out) != 3:
        return None
    batch, rows, cols = w_term  # the stack is E × out(rows) × in(cols)
    contracted = x_term[2]
    if x_term[0] != batch or out[:2] != x_term[:2] or contracted not in (rows, cols):
        return None
    kept = cols if contracted == rows else rows
    if out[2] != kept or x_term[1] in w_term:
        return None
    return {"args": (x,), "kwargs": {"transposed": contracted == cols}}


_LINEARS = (torch.nn.functional.linear, torch.ops.aten.linear.default)


def _linear_call(node: fx.Node, expert: fx.Node, index) -> dict | None:
    """`F.linear(x, w[e], b)` as the layer's call for expert e (plus the bias)."""
    if node.op != "call_function" or node.target not in _LINEARS:
        return None
    args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
    if args.get("weight") is not expert or args.get("input") is expert \
            or args.get("bias") is expert:
        return None
    return {"args": (args["input"],), "kwargs": {"expert": index}, "bias": args.get("bias")}


def _swaps_last_two(node: fx.Node, source: fx.Node) -> bool:
    """Is `node` the 3-D `source` with its last two dimensions swapped?"""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("mT",)
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return False
    dims = tuple(d % 3 for d in dims)
    if node.op == "call_method" and node.target == "transpose" or \
            node.op == "call_function" and node.target in (torch.transpose, torch.ops.aten.transpose.int):
        return sorted(dims) == [1, 2]
    if node.op == "call_method" and node.target == "permute" or \
            node.op == "call_function" and node.target in (torch.permute, torch.ops.aten.permute.default):
        return dims == (0, 2, 1)
    return False
