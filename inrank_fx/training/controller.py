"""`RankController`: ranks that grow during an ordinary training loop (`inrank_fx.attach` makes one).

    ctrl = inrank_fx.attach(model, optimizer)     # registers an optimizer post-step hook
    for x, y in data:
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()

Steps are counted in optimizer steps, so evaluation passes and gradient-accumulation
micro-batches never advance the schedule (a step that GradScaler skips is not counted either).
After `warmup_steps`, every `check_every` steps, each layer's singular values are taken from its
factors (those of the weight, or of the cumulative update W_t − W_0: `InRankConfig.measure`)
and its rank becomes the smallest k whose explained ratio exceeds the threshold: at least the
rank the layer started adaptation with (init_rank), at most its current width (a layer grows by
at most its buffer per check). The rank is re-measured at every check and can fall back when an
early spectrum was transient, but the width (what the layer computes and stores) only grows
while adapting: the layer computes at max(width, k + buffer). `ranks_only_grow=True` keeps the
reference's k ≥ r instead. With `stop_after=N` (InRank-Efficient), at step N every layer
is truncated to its rank, the buffer is dropped and ranks stay fixed; `stop_after="settled"`
(the default) does the same at the first check after which the ranks have stopped moving.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._io import atomic_destination, check_destination
from ..config import InRankConfig
from ..errors import InRankKeyError, InRankValueError
from ..nn.modules import factored_layers
from ..nn.spectrum import explained_ratios, select_rank
from ..vocabulary import Event
from .compile_policy import check_policy, hold_compile_settings, release_compile_settings
from .resize import RankArg, RankChange, per_layer, set_ranks

log = logging.getLogger("inrank_fx")

HISTORY_FIELDS = ("step", "layer", "event", "rank", "width", "explained")

class Decision(NamedTuple):
    """One layer's decision at a check."""

    rank: int
    width: int  # the rank plus the buffer
    explained: float  # the explained ratio at that rank


Decisions = dict[str, Decision]  # layer name → its decision, for every layer


class LocalCoordinator:
    """Where the processes that train one model agree on its ranks: with one process, there is
    nothing to agree on. `inrank_fx.training.distributed.ProcessGroupCoordinator` is the one for
    torch.distributed; a controller takes either (or a test's own)."""

    def agree(self, controller: "RankController", event: Event, decide) -> Decisions:
        """The decision every process applies; `decide()` measures on this process."""
        return decide()

    def before_apply(self, controller: "RankController", ranks: dict, widths: dict) -> None:
        """What must precede applying a decision (under fully_shard: gather what is resized)."""

    def after_apply(self, controller: "RankController", changes: list[RankChange]) -> None:
        """What must follow a change (under DDP: check, broadcast resized factors, rebuild)."""

    def after_load(self, controller: "RankController") -> None:
        """What must follow loading the controller's state (under DDP: check and rebuild)."""

    def describe(self) -> str:
        return ""


class RankController:
    """Decides ranks on optimizer steps and applies them through `set_ranks`.

    `history` is plain data: one record per layer per check or truncation, with the fields of
    HISTORY_FIELDS. `state_dict()` / `load_state_dict()` carry the step count, the phase, the
    history and the random state used for new components, so a resumed run continues exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: InRankConfig,
        *,
        seed: int = 0,
        recompile: str = "dynamic",
        coordinator: LocalCoordinator | None = None,
    ) -> None:
        if not factored_layers(model):
            raise InRankValueError(
                f"{type(model).__name__} has no factored layers: run inrank_fx.transform first"
            )
        check_policy(recompile)
        self._holds_compile_settings = recompile == "dynamic"
        if self._holds_compile_settings:
            hold_compile_settings(self)  # before the first compile, ideally; detach restores
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.recompile = recompile
        self.coordinator = coordinator if coordinator is not None else LocalCoordinator()
        self.step = 0
        self.stopped = False
        self.history: list[dict] = []
        self.rank_events = 0
        self.seconds = 0.0  # time spent deciding and applying ranks: the controller's overhead
        self.generator = torch.Generator().manual_seed(seed)
        # The floor of each layer's rank: what it had when adaptation started (init_rank).
        self.start_ranks = {name: layer.rank for name, layer in factored_layers(model).items()}
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)

    # -- the schedule -------------------------------------------------------------------------

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        start = time.perf_counter()
        self.step += 1
        self.update()
        self.seconds += time.perf_counter() - start

    def update(self) -> list[RankChange]:
        """Run whatever the schedule asks for at the current step."""
        cfg = self.config
        if self.stopped:
            return []
        if isinstance(cfg.stop_after, int) and self.step >= cfg.stop_after:
            return self.stop()
        if self.step < cfg.warmup_steps or self.step % cfg.check_every:
            return []
        changes = self.check()
        if cfg.stop_after == "settled" and self.settled():
            changes += self.stop()
        return changes

    def settled(self) -> bool:
        """Whether the ranks have stopped moving: over the last `settle_checks` checks, the
        layers' rank ranges (max − min of each layer's rank over those checks and the one
        before) add up to at most `settle_tolerance` of the ranks' sum. Per-layer ranges, not
        the sum, so that layers still moving in opposite directions do not look settled. Read
        from the history, which every process of a distributed run holds alike."""
        window = self.config.settle_checks + 1
        by_step: dict[int, dict[str, int]] = {}
        for h in self.history:
            if h["event"] == "check":
                by_step.setdefault(h["step"], {})[h["layer"]] = h["rank"]
        if len(by_step) < window:
            return False
        checks = [by_step[step] for step in sorted(by_step)[-window:]]
        moved = sum(max(c.get(name, 0) for c in checks) - min(c.get(name, 0) for c in checks)
                    for name in checks[-1])
        return moved <= self.config.settle_tolerance * sum(checks[-1].values())

    @property
    def stop_step(self) -> int | None:
        """The optimizer step at which adaptation stopped (ranks fixed from then on), or None."""
        return next((h["step"] for h in self.history if h["event"] == "stop"), None)

    def spectrum(self, layer) -> torch.Tensor:
        """The singular values the rule reads for `layer` (`InRankConfig.measure`)."""
        if self.config.measure == "update":
            return layer.update_singular_values()
        return layer.singular_values()

    def _explained(self, layer, s: torch.Tensor, k: int) -> float:
        if s.dim() == 2:  # a stack of experts: the least explained expert
            return min(self._explained(layer, row, k) for row in s)
        ratios = explained_ratios(s, self.config.criterion, layer.full_rank)
        return float(ratios[min(k, s.numel())])

    def _select(self, layer, s: torch.Tensor, floor: int) -> int:
        """The rule's rank for a spectrum; for a stack of experts (one spectrum per expert), the
        largest rank any expert asks for, so that none is cut below what it needs."""
        if s.dim() == 2:
            return max(self._select(layer, row, floor) for row in s)
        return select_rank(s, self.config.threshold, self.config.criterion, min_rank=floor,
                           full_rank=layer.full_rank)

    @torch.no_grad()
    def check(self) -> list[RankChange]:
        """One application of the InRank rule to every layer."""
        decisions = self.coordinator.agree(self, "check", self._measure)
        return self._act(decisions, "check", "grew")

    @torch.no_grad()
    def stop(self) -> list[RankChange]:
        """InRank-Efficient: truncate every layer to its rank (buffer dropped); ranks stay fixed."""
        decisions = self.coordinator.agree(self, "stop", self._truncation)
        self.stopped = True
        return self._act(decisions, "stop", "truncated to their ranks (adaptation stopped)")

    @torch.no_grad()
    def set_ranks(self, ranks: RankArg, widths: RankArg | None = None) -> list[RankChange]:
        """Set ranks by hand, as `inrank_fx.set_ranks` with this controller's optimizer, and
        record them in the history ("manual"). Under DDP this is a collective: call it on every
        process; process 0's values are applied everywhere and DDP follows the resize."""
        layers = factored_layers(self.model)
        wanted = per_layer(ranks, layers, "ranks")
        wanted_widths = per_layer(widths, layers, "widths") if widths is not None else {}

        def decide():
            decisions = {}
            for name, layer in layers.items():
                rank = wanted.get(name, layer.rank)
                width = wanted_widths.get(name, rank if name in wanted else layer.width)
                decisions[name] = Decision(rank, width,
                                          self._explained(layer, self.spectrum(layer), rank))
            return decisions

        return self._act(self.coordinator.agree(self, "manual", decide), "manual", "set by hand")

    # -- deciding and acting ------------------------------------------------------------------
    # A decision is {layer name: (rank, width, explained ratio at that rank)} for every layer;
    # the coordinator is where the processes agree on one.

    def _measure(self) -> Decisions:
        cfg = self.config
        decisions = {}
        for name, layer in factored_layers(self.model).items():
            s = self.spectrum(layer)
            floor = layer.rank if cfg.ranks_only_grow else self.start_ranks.get(name, layer.rank)
            rank = self._select(layer, s, floor)
            rank = min(rank, layer.width)  # the buffer bounds growth per check
            width = max(cfg.width_for(rank, layer.full_rank), layer.width)
            decisions[name] = Decision(rank, width, self._explained(layer, s, rank))
        return decisions

    def _truncation(self) -> Decisions:
        multiple = self.config.rank_multiple
        decisions = {}
        for name, layer in factored_layers(self.model).items():
            width = min(-(-layer.rank // multiple) * multiple, layer.full_rank)
            explained = self._explained(layer, self.spectrum(layer), layer.rank)
            decisions[name] = Decision(layer.rank, width, explained)
        return decisions

    def _act(self, decisions: Decisions, event: Event, verb: str) -> list[RankChange]:
        layers = factored_layers(self.model)
        ranks, widths = {}, {}
        for name, (rank, width, explained) in decisions.items():
            changed = (rank, width) != (layers[name].rank, layers[name].width)
            if event != "manual" or changed:
                self._record(name, event, rank, width, explained)
            if event == "stop" or changed:
                ranks[name], widths[name] = rank, width
        changes = self._apply(ranks, widths, verb)
        self.coordinator.after_apply(self, changes)
        return changes

    def _apply(self, ranks: dict, widths: dict, verb: str) -> list[RankChange]:
        if not ranks:
            return []
        self.coordinator.before_apply(self, ranks, widths)
        changes = set_ranks(
            self.model, ranks, self.optimizer, widths=widths,
            grow_init=self.config.grow_init, generator=self.generator, recompile=self.recompile,
            truncate_state=self.config.truncate_state,
        )
        if changes:
            self.rank_events += 1
            log.info("inrank_fx step %d: %d layer(s) %s: %s", self.step, len(changes), verb,
                     ", ".join(map(str, changes)))
        return changes

    def _record(self, name: str, event: Event, rank: int, width: int, explained: float) -> None:
        self.history.append(
            {"step": self.step, "layer": name, "event": event, "rank": rank, "width": width,
             "explained": explained}
        )

    # -- inspection and persistence ----------------------------------------------------------

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the history as CSV (atomically: nothing half-written is left on failure)."""
        path = check_destination(path)
        with atomic_destination(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(self.history)
        return path

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "stopped": self.stopped,
            "rank_events": self.rank_events,
            "history": [dict(r) for r in self.history],
            "generator": self.generator.get_state(),
            "start_ranks": dict(self.start_ranks),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state)
        self.step = int(state["step"])
        self.stopped = bool(state["stopped"])
        self.rank_events = int(state.get("rank_events", 0))
        self.history = [dict(r) for r in state["history"]]
        self.generator.set_state(state["generator"])
        self.start_ranks = dict(state.get("start_ranks", self.start_ranks))
        self.coordinator.after_load(self)

    def detach(self) -> None:
        """Stop following the optimizer, and give back the compile setting the controller held
        (restored once no attached controller needs it; see inrank_fx.training.compile_policy)."""
        self._hook.remove()
        if self._holds_compile_settings:
            self._holds_compile_settings = False
            release_compile_settings(self)

    def __repr__(self) -> str:
        phase = "stopped" if self.stopped else "adapting"
        return (f"{type(self).__name__}(step={self.step}, {phase}, "
                f"layers={len(factored_layers(self.model))}, rank_events={self.rank_events}"
                f"{self.coordinator.describe()})")


# What a controller's state_dict must hold to resume.
STATE_KEYS = ("step", "stopped", "history", "generator")


def _check_state(state: dict) -> None:
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        renamed = (" (a state saved before 'frozen' was renamed 'stopped': rename that key, and "
                   "the history event 'truncate' to 'stop')" if "frozen" in state else "")
        raise InRankKeyError(f"RankController.load_state_dict: the state lacks "
                             f"{', '.join(map(repr, missing))}{renamed}")
