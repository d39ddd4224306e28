"""Keeping torch.compile'd callers compiled, and cheap, through rank changes, without touching
what is not InRank's.

Dynamo guards on parameter shapes. By default it treats them as static, so every new width is a
new compiled graph, and after `recompile_limit` (8) graphs for one function it silently runs
eager. Three policies for what `set_ranks` does after a shape change:

- "dynamic" (default): let dynamo treat parameter shapes as dynamic
  (`torch._dynamo.config.force_parameter_static_shapes = False`; only parameters whose shapes
  change are affected). The first change of a layer's width costs one recompile, after which
  that width is symbolic and later changes cost nothing. The setting is held while a controller
  is attached and restored by `detach()` (`set_ranks` called on its own sets it until
  `restore_compile_settings()`). Should one of the model's own compiled forwards approach the
  recompile limit, its cache alone is cleared (`torch._dynamo.reset_code`); a compiled function
  that is not the model's (a train step that calls it, say) is never cleared: InRank warns,
  naming it, instead.
- "reset": clear every torch.compile cache in the process (`torch.compiler.reset()`) after
  every change: one full recompile per rank-change event, always, for every compiled function,
  the model's or not; said in a warning the first time.
- "none": leave compiled code alone (the caller manages it).

Either of the first two costs at most one recompile of the model's compiled forwards per event
and never lets dynamo fall back to eager for them. The dynamo internals used (its config, its
per-code caches) are reached through `torch_internals`, which names each one.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ..errors import InRankValueError
from ..vocabulary import COMPILE_POLICIES
from .torch_internals import (
    dynamo_compiled_codes,
    parameter_shapes_static,
    recompile_limit,
    reset_compiled_code,
    set_parameter_shapes_static,
)

log = logging.getLogger("inrank_fx")

POLICIES = COMPILE_POLICIES
# Cache entries a rank change may leave a compiled function with: room for the next event's
# recompile in both train and eval mode below dynamo's recompile_limit.
_HEADROOM = 3
_RESUME_PREFIX = "torch_dynamo_resume_in_"  # dynamo's name for the code after a graph break


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise InRankValueError(f"recompile must be one of {POLICIES}, got {policy!r}")


# -- the one process-wide setting, held by attached controllers ------------------------------

_holders: "weakref.WeakSet" = weakref.WeakSet()  # attached controllers that need the setting
_saved: bool | None = None  # the value before InRank changed it


def allow_dynamic_parameter_shapes() -> None:
    """Let dynamo make changed parameter dimensions symbolic instead of recompiling forever
    (remembering the previous value for `restore_compile_settings`)."""
    global _saved
    if parameter_shapes_static():
        _saved = True if _saved is None else _saved
        set_parameter_shapes_static(False)
        log.info("inrank_fx: torch._dynamo.config.force_parameter_static_shapes = False, so that "
                 "compiled code follows rank changes with few recompiles")


def hold_compile_settings(holder: object) -> None:
    """A controller attached with recompile="dynamic": the setting stays until it detaches (or
    is garbage-collected with its optimizer)."""
    _holders.add(holder)
    allow_dynamic_parameter_shapes()


def release_compile_settings(holder: object) -> None:
    """A controller detached: restore torch's setting once no live controller holds it."""
    _holders.discard(holder)
    if not _holders:
        restore_compile_settings()


def restore_compile_settings() -> None:
    """Put back the dynamo setting InRank changed (what `detach()` does for the last controller)."""
    global _saved
    if _saved is not None:
        set_parameter_shapes_static(_saved)
        log.info("inrank_fx: torch._dynamo.config.force_parameter_static_shapes restored to %s",
                 _saved)
        _saved = None


# -- after a shape change ---------------------------------------------------------------------

_warned: set = set()


def after_shape_change(policy: str, layers: int, model: nn.Module | None = None) -> None:
    """Called by set_ranks once factors of `model` have changed shape."""
    if policy == "none":
        return
    if policy == "reset":
        if "reset" not in _warned:
            _warned.add("reset")
            log.warning("inrank_fx: recompile='reset' clears every torch.compile cache in the "
                        "process after each rank change, other models' compiled code included; "
                        "recompile='dynamic' clears only this model's")
        torch.compiler.reset()
        log.info("inrank_fx: %d layer(s) changed shape; torch.compile caches cleared, compiled "
                 "callers recompile once on their next call", layers)
        return
    allow_dynamic_parameter_shapes()
    limit = recompile_limit()
    compiled = compiled_codes()
    owned = _owned_codes(model, compiled) if model is not None else set()
    for code, entries in compiled:
        if entries < limit - _HEADROOM:
            continue
        if code in owned and reset_compiled_code(code):
            log.info("inrank_fx: %d layer(s) changed shape; the compile cache of %s (%d of %d "
                     "graphs) was cleared", layers, _describe(code), entries, limit)
        elif code not in _warned:
            _warned.add(code)
            log.warning(
                "inrank_fx: compiled function %s holds %d of dynamo's %d graphs; if it calls the "
                "model it recompiles after rank changes and dynamo runs it eagerly at the limit. "
                "InRank clears only the model's own compiled code: call "
                "torch._dynamo.reset_code(fn.__code__) for it, or attach with recompile='reset'",
                _describe(code), entries, limit)


def compiled_codes() -> list[tuple[object, int]]:
    """(code object, cached graphs) for every function dynamo has compiled (empty where this
    torch does not say)."""
    return dynamo_compiled_codes()


def _owned_codes(model: nn.Module, compiled: list[tuple[object, int]]) -> set:
    """The code of the model's own forwards, and dynamo's resume functions made from them
    among the `compiled` code objects."""
    forwards = {type(m).forward.__code__ for m in model.modules()
                if hasattr(type(m).forward, "__code__")}
    forwards.discard(nn.Module.forward.__code__)
    owned = set(forwards)
    origins = {(c.co_filename, f"{_RESUME_PREFIX}{c.co_name}_at_") for c in forwards}
    for code, _ in compiled:
        if code.co_name.startswith(_RESUME_PREFIX) and any(
                code.co_filename == f and code.co_name.startswith(p) for f, p in origins):
            owned.add(code)
    return owned


def _describe(code) -> str:
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"
