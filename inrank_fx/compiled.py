"""Keeping torch.compile'd callers compiled, and cheap, through rank changes.

Dynamo guards on parameter shapes. By default it treats them as static, so every new width is a
new compiled graph, and after `recompile_limit` (8) graphs for one function it silently runs
eager. Three policies for what `set_ranks` does after a shape change:

- "dynamic" (default): let dynamo treat parameter shapes as dynamic
  (`torch._dynamo.config.force_parameter_static_shapes = False`, a process-wide setting that only
  matters for parameters whose shapes change). The first change of a layer's width costs one
  recompile, after which that width is symbolic and later changes cost nothing. Before any
  compiled function's cache could approach the recompile limit, the caches are cleared instead.
- "reset": clear torch.compile's caches (`torch.compiler.reset()`) after every change: one full
  recompile per rank-change event, always.
- "none": leave compiled code alone (the caller manages it).

Either way a rank-change event costs at most one recompile of each compiled function, and no
compiled function reaches the limit at which dynamo gives up.
"""
from __future__ import annotations

import logging

import torch
import torch._dynamo

log = logging.getLogger("inrank_fx")

POLICIES = ("dynamic", "reset", "none")
# Cache entries a rank change may leave a compiled function with: room for the next event's
# recompile in both train and eval mode below dynamo's recompile_limit.
_HEADROOM = 3


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"recompile must be one of {POLICIES}, got {policy!r}")


def allow_dynamic_parameter_shapes() -> None:
    """Let dynamo make changed parameter dimensions symbolic instead of recompiling forever."""
    if torch._dynamo.config.force_parameter_static_shapes:
        torch._dynamo.config.force_parameter_static_shapes = False
        log.info("inrank_fx: torch._dynamo.config.force_parameter_static_shapes = False, so that "
                 "compiled code follows rank changes with few recompiles")


def after_shape_change(policy: str, layers: int) -> None:
    """Called by set_ranks once factors have changed shape."""
    if policy == "none":
        return
    if policy == "dynamic":
        allow_dynamic_parameter_shapes()
        fullest = largest_compile_cache()
        limit = torch._dynamo.config.recompile_limit
        if fullest is not None and fullest < limit - _HEADROOM:
            if fullest:
                log.info("inrank_fx: %d layer(s) changed shape; compiled callers recompile at "
                         "most once (largest compile cache: %d of %d graphs)", layers, fullest, limit)
            return
    torch.compiler.reset()
    log.info("inrank_fx: %d layer(s) changed shape; torch.compile caches cleared, compiled "
             "callers recompile once on their next call", layers)


def largest_compile_cache() -> int | None:
    """The most cached graphs any compiled function holds (None where dynamo does not say)."""
    try:
        from torch._dynamo import convert_frame
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        sizes = [len(_debug_get_cache_entry_list(code))
                 for ref in list(convert_frame.input_codes.seen) if (code := ref()) is not None]
    except (ImportError, AttributeError, RuntimeError):
        return None
    return max(sizes, default=0)
