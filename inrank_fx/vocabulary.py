"""The words that pick a behaviour, each once: a Literal type and the tuple of its values.

Torch-free, so that the command line (`inrank-fx --help` loads no torch) reads the same choices
as the library; config, the layers, training, export and tools import them from here. The words
themselves are the glossary's (docs/ARCHITECTURE.md): rank, width, buffer, grow, truncate,
settle, stop, freeze.
"""
from __future__ import annotations

from typing import Literal, get_args

# How a factored layer starts from a dense weight: its truncated SVD ("svd"), random directions
# with the weight's top singular values ("random"), or nn.Linear's variance ("iid").
Init = Literal["svd", "random", "iid"]
# The explained ratio that picks a rank from a spectrum (docs/TRAINING.md measures them).
Criterion = Literal["variance", "variance_padded", "energy"]
# Which spectrum the rule reads: the cumulative update W - W_0, or the weight W.
Measure = Literal["update", "weight"]
# How a grown layer's new components start: U columns zero (silent), or random.
GrowInit = Literal["zero", "random"]
# The optimizer state of grown components: second moments seeded from the existing columns of
# their row, or unseeded (all zero).
GrowState = Literal["seeded", "unseeded"]
# The optimizer state of a truncated layer: moments rotated into the new basis, or reset.
TruncateState = Literal["rotated", "reset"]
# What a rank change does to torch.compile'd code.
CompilePolicy = Literal["dynamic", "reset", "none"]
# Which convolutions are factored, and how a stack of experts gets its ranks.
Convs = Literal["1x1", "all", "none"]
ExpertRanks = Literal["stack", "expert"]
# compress: how the budget is spread, and on which spectra a global allocation reads.
Allocation = Literal["global", "uniform"]
AllocateOn = Literal["weights", "outputs"]
# to_onnx's exporter, and the backends `bench` compares.
Exporter = Literal["auto", "dynamo", "torchscript"]
Backend = Literal["eager", "compile", "onnxruntime", "tensorrt"]
# What a line of the controller's history records: a check of the rule, the stop (every layer
# truncated to its rank, ranks fixed from then on), or ranks set by hand.
Event = Literal["check", "stop", "manual"]

INITS: tuple[str, ...] = get_args(Init)
CRITERIA: tuple[str, ...] = get_args(Criterion)
MEASURES: tuple[str, ...] = get_args(Measure)
GROW_INITS: tuple[str, ...] = get_args(GrowInit)
GROW_STATES: tuple[str, ...] = get_args(GrowState)
TRUNCATE_STATES: tuple[str, ...] = get_args(TruncateState)
COMPILE_POLICIES: tuple[str, ...] = get_args(CompilePolicy)
CONVS: tuple[str, ...] = get_args(Convs)
EXPERT_RANKS: tuple[str, ...] = get_args(ExpertRanks)
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
ALLOCATE_ON: tuple[str, ...] = get_args(AllocateOn)
EXPORTERS: tuple[str, ...] = get_args(Exporter)
BACKENDS: tuple[str, ...] = get_args(Backend)
EVENTS: tuple[str, ...] = get_args(Event)
