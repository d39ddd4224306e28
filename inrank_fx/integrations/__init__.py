"""Integrations with trainers users already have. Each is imported on first use, so that its
framework stays an optional dependency:

    from inrank_fx.integrations import InRankCallback      # needs transformers (and accelerate)
"""
from __future__ import annotations

_LAZY = {"InRankCallback": "hf_trainer", "load_transformed": "hf_trainer",
         "save_transformed": "hf_trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
