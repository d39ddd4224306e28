"""Building the factored layer of each candidate (SVD or random init, rank from the config),
and the template that builds it again from real weights (`inrank_fx.materialize`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import InRankConfig
from ..nn.experts import ExpertList, IndexedExpertList, InRankExperts
from ..nn.linear import FactoredLayer, InRankLinear
from .matchers import ModuleHandler
from .plan import Candidate, initial_rank
from .report import FactoredRecord
from .torch_internals import stripped_copy


def build_layer(candidate: Candidate, config: InRankConfig,
                model: nn.Module) -> tuple[nn.Module, int | None]:
    """The factored layer for a candidate, at the config's starting rank and width, and the
    rank that was asked for where it had to be capped at the full rank (else None). A weight on
    the meta device gives a layer on the meta device that remembers its dense origin
    (`DenseTemplate`), for `inrank_fx.materialize` to initialise later."""
    rank, requested = ((candidate.rank, None) if candidate.rank is not None
                       else initial_rank(candidate.matrix, candidate.name, config))
    width = config.width_for(rank, min(candidate.matrix.shape[-2:]))
    template = DenseTemplate(candidate.module, None, candidate.transposed, candidate.handler,
                             rank, width - rank, config, candidate.name,
                             indexed=candidate.kind == "experts (indexed)")
    if candidate.module is None:  # a weight read by functional matmuls
        owner, _, attr = candidate.name.rpartition(".")
        template.module = weight_holder(model.get_submodule(owner), attr, candidate.weight.param)
        template.weight_attr = attr
    layer = template.build(template.module)
    if candidate.matrix.is_meta:
        object.__setattr__(layer, TEMPLATE_ATTR, template)  # not a submodule: no state, no params
    return layer, requested

# The attribute of a factored layer built on the meta device that holds its DenseTemplate.
TEMPLATE_ATTR = "_inrank_dense_template"

@dataclass
class DenseTemplate:
    """How a factored layer was built from dense weights, to build it again from real ones.

    `module` is the dense module the layer replaced (nn.Linear, nn.Conv2d, ...), or for a weight
    read by functional matmuls a stand-in for the module that held it (`weight_holder`), with
    the weight at `weight_attr`. `build(real)` factors a real module of that kind exactly as
    `transform` factored the meta one."""

    module: nn.Module | None
    weight_attr: str | None
    transposed: bool
    handler: ModuleHandler | None  # None for a weight read by functional matmuls
    rank: int
    buffer: int
    config: InRankConfig
    name: str
    indexed: bool = False  # a stack of experts read by indexing, `w[e]`, in an untraced forward

    def build(self, module: nn.Module) -> nn.Module:
        config = self.config
        if self.weight_attr is None:
            layer = self.handler.build(module, self.rank, buffer=self.buffer, init=config.init,
                                       name=self.name)
        else:
            weight = getattr(module, self.weight_attr)
            if weight.dim() == 3:  # a stack of experts' matrices: one rank, or one each
                kind = InRankExperts if config.expert_ranks != "expert" else \
                    IndexedExpertList if self.indexed else ExpertList
                layer = kind.from_stack(weight, self.rank, buffer=self.buffer, init=config.init,
                                        name=self.name)
            else:
                matrix = weight.T if self.transposed else weight
                layer = InRankLinear.from_weight(matrix, None, self.rank, buffer=self.buffer,
                                                 init=config.init, name=self.name)
        for part in layer.modules():  # a handler may build several (nn.MultiheadAttention)
            if config.activation is not None and type(part) is InRankLinear \
                    and not isinstance(layer, ExpertList):  # experts stay linear, as stacks do
                part.activation = config.activation  # convolutions stay linear
            if not config.silent_buffer and isinstance(part, FactoredLayer):
                part.randomize_buffer()
        return layer

def weight_holder(owner: nn.Module, attr: str, weight: nn.Parameter) -> nn.Module:
    """The module holding a functionally read weight, stripped to that weight alone (a shallow
    copy: same class and plain attributes, no other parameters, buffers or submodules), so that
    an init function sees a module of the original type without the rest of it."""
    return stripped_copy(owner, attr, weight)

def factored_record(candidate: Candidate, layer: nn.Module, requested: int | None) -> FactoredRecord:
    out_features, in_features = candidate.matrix.shape[-2:]
    return FactoredRecord(candidate.name, candidate.kind, out_features, in_features, layer.rank,
                          layer.width, requested)
