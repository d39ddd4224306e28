"""Library modules that hide their children's calls, swapped for subclasses that do not.

torch.nn's own modules are leaves to the pass: their forwards are known, not traced, so the
weights of their children count as read by code the pass cannot see. That is right for most
(nn.Embedding reads its weight as a lookup table), but it keeps every linear layer of
nn.TransformerEncoderLayer, nn.TransformerDecoderLayer and the containers around them
(nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer) dense, although apart from an
inference fast path they do nothing but call their children.

A substitute is a subclass with the same state (parameters, buffers, child names: state_dict
keys do not change) whose forward calls its children as modules; the pass then traces it like
user code, or, for containers that mark `calls_children_only`, takes each handled child as
called. The swap sets `module.__class__` in place, as torch.nn.utils.parametrize does, so the
module keeps its identity, hooks and isinstance checks; `transform` swaps back every module
inside which nothing was factored.
"""
from __future__ import annotations

from torch import nn

from ..errors import InRankTypeError
from ..nn.transformer import SUBSTITUTES as _TRANSFORMER_SUBSTITUTES

_SUBSTITUTES: dict[type, type] = {}


def register_substitute(library_type: type, substitute: type) -> None:
    """Swap modules of exactly `library_type` (subclasses with their own forward are the user's
    code and left alone) for `substitute`, a subclass of it that defines
    `substituted(module)` / `restored(module)` class hooks if it needs to adjust state."""
    if not issubclass(substitute, library_type):
        raise InRankTypeError(f"{substitute.__name__} must subclass {library_type.__name__}")
    _SUBSTITUTES[library_type] = substitute


def calls_children_only(module: nn.Module) -> bool:
    return getattr(type(module), "calls_children_only", False)


def apply_substitutes(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Swap every module with a registered substitute; (module, its original class) for each."""
    swapped = []
    for module in model.modules():
        substitute = _SUBSTITUTES.get(type(module))
        if substitute is None:
            continue
        swapped.append((module, type(module)))
        module.__class__ = substitute
        hook = getattr(substitute, "substituted", None)
        if hook is not None:
            hook(module)
    return swapped


def restore_unused(swapped: list[tuple[nn.Module, type]], is_factored) -> None:
    """Swap back every substituted module with no factored layer inside it."""
    for module, original in reversed(swapped):
        if any(is_factored(m) for m in module.modules()):
            continue
        hook = getattr(type(module), "restored", None)
        if hook is not None:
            hook(module)
        module.__class__ = original


for _library_type, _substitute in _TRANSFORMER_SUBSTITUTES.items():  # nn.Transformer and its parts
    register_substitute(_library_type, _substitute)
