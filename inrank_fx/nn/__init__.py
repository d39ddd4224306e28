"""The factored layers, at the bottom of the package: they import nothing from inrank_fx above.

InRankLinear / InRankConv2d / InRankMultiheadAttention / InRankExperts / ExpertList (training),
FactoredLinear / FactoredConv2d / FactoredExperts / FactoredMultiheadAttention (frozen), the nn.Transformer substitutes, the
spectrum of a pair of factors, and the module-tree helpers every stage uses.
"""
from .attention import InRankMultiheadAttention
from .conv import InRankConv2d
from .experts import ExpertList, FactoredExperts, InRankExperts
from .frozen import FactoredConv2d, FactoredLinear, FactoredMultiheadAttention
from .linear import ACTIVATIONS, INITS, FactoredLayer, InRankLinear
from .modules import factored_layers, ranks

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "FactoredConv2d",
    "ExpertList",
    "FactoredExperts",
    "FactoredLayer",
    "FactoredLinear",
    "FactoredMultiheadAttention",
    "InRankConv2d",
    "InRankExperts",
    "InRankLinear",
    "InRankMultiheadAttention",
    "factored_layers",
    "ranks",
]
