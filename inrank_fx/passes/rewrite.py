"""The rewrite: matmul nodes against a weight become calls of a factored layer.

`factor_matmul_sites` is a plain GraphModule → GraphModule pass in the style of pytorch/examples
fx/replace_op.py. The helpers around it place the factored layers in the module tree and put the
rewritten forwards back where the original modules were.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..nn.modules import carry_hooks
from .matchers import MatmulSite, view_chain


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


def graph_module_like(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running `graph` that otherwise looks like `module`: same children,
    parameters, buffers (persistence kept), plain attributes and training flag, so that its
    state_dict keys and the attributes other code reads do not change."""
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        setattr(gm, name, child)  # fx copies only what the graph uses, as bare containers
    for name, p in module.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, p)
    for name, b in module.named_buffers(recurse=False):
        persistent = name not in module._non_persistent_buffers_set
        if name in gm._buffers:
            if not persistent:
                gm._non_persistent_buffers_set.add(name)
        else:
            gm.register_buffer(name, b, persistent=persistent)
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in vars(gm):
            setattr(gm, key, value)
    gm.train(module.training)
    carry_hooks(module, gm)
    return gm


def install_layer(root: nn.Module, param_name: str, layer: nn.Module) -> None:
    """Put the factored layer where the parameter was (the parameter goes away)."""
    parent_name, _, attr = param_name.rpartition(".")
    parent = root.get_submodule(parent_name)
    if attr in parent._parameters:
        del parent._parameters[attr]
    parent.add_module(attr, layer)


def read_through_weight(gm: fx.GraphModule, targets: list[str]) -> fx.GraphModule:
    """Point every read of a parameter that became a factored stack (mixture-of-experts weights,
    `InRankExperts`) at the layer's `.weight`, the stacked product of its factors:
    get_attr(target) → getattr(get_attr(target), "weight"). Whatever op read the parameter (bmm,
    einsum, grouped mm, indexing one expert) reads a tensor of the same shape."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in targets:
            with gm.graph.inserting_after(node):
                product = gm.graph.call_function(getattr, (node, "weight"))
            node.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product)
    gm.recompile()
    return gm


def read_as_property(owner: nn.Module, attr: str) -> None:
    """Make `owner.<attr>` (now a factored stack, `InRankExperts`) read as the stacked product
    it replaced, for forwards that cannot be rewritten: the owner's class is swapped (as
    torch.nn.utils.parametrize does) for a subclass whose property `attr` returns
    `owner._modules[attr].weight`, so any code reading the attribute gets a tensor of the
    parameter's shape, whatever it does with it."""
    base = type(owner)
    reads = dict(getattr(base, "_inrank_stack_reads", ()))
    reads[attr] = property(lambda self, _attr=attr: self._modules[_attr].weight)
    cls = type(base.__name__, (getattr(base, "_inrank_base", base),),
               {**reads, "_inrank_stack_reads": tuple(reads.items()),
                "_inrank_base": getattr(base, "_inrank_base", base),
                "__module__": base.__module__, "__qualname__": base.__qualname__})
    owner.__class__ = cls

