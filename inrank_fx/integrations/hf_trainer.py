"""InRank inside transformers' Trainer: `InRankCallback`, and transformed models saved and loaded
with `save_pretrained` (safetensors).

    model = inrank_fx.transform(GPT2LMHeadModel(config), InRankConfig(stop_after=150))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[InRankCallback()])
    trainer.train()                                  # ranks adapt on the Trainer's optimizer steps
    trainer.train(resume_from_checkpoint=True)       # ranks, schedule and history come back
    save_transformed(model, "out/final")             # save_pretrained + the InRankConfig
    model = load_transformed(GPT2LMHeadModel, "out/final")   # a transformed model, same ranks

The Trainer builds its optimizer itself and wraps it in accelerate's AcceleratedOptimizer, which
has no step hooks of its own; the callback attaches the controller to the torch optimizer
inside, whose `step()` the wrapper calls. Steps are optimizer steps, so gradient accumulation
does not advance the schedule.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._io import atomic_destination
from ..config import REPORT_ATTR, InRankConfig
from ..errors import InRankRuntimeError, InRankTypeError, InRankValueError
from ..nn.modules import ranks
from ..passes.transform import transform
from ..training.attach import attach
from ..training.controller import RankController

CONTROLLER_FILE = "inrank_controller.pt"
CONFIG_FILE = "inrank_config.json"


class InRankCallback(TrainerCallback):
    """Attach InRank to the optimizer a transformers Trainer creates.

    - on_train_begin: attaches a RankController (`self.controller`) to the Trainer's optimizer;
      when the Trainer resumes from a checkpoint, loads the controller's state from that folder
      (`resume_from` names it where it is not `output_dir/checkpoint-<step>`).
    - on_save: writes the controller's state (`inrank_controller.pt`) and the InRankConfig
      (`inrank_config.json`) into each checkpoint folder.
    - on_step_end / on_log: after a rank change, asks the Trainer to log, and adds `inrank/*`
      figures (mean, min and max rank, rank events) to its logs and to `state.log_history`, so
      they appear in trainer_state.json. Reporting callbacks (TensorBoard, W&B) see them when
      they come after this one in the callback list.
    - on_train_end: detaches the controller (ranks stay as they are).
    """

    def __init__(self, config: InRankConfig | None = None, *, seed: int = 0,
                 recompile: str = "dynamic", resume_from: str | os.PathLike | None = None):
        self.config = config
        self.seed = seed
        self.recompile = recompile
        self.resume_from = resume_from
        self.controller: RankController | None = None
        self._logged_events = 0

    # -- training -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise InRankValueError("InRankCallback needs the Trainer's model and optimizer at "
                                   "on_train_begin; got none (a transformers version that does not "
                                   "pass them to callbacks?)")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise InRankRuntimeError(
                "InRankCallback runs single-process Trainer jobs; for several processes use "
                "inrank_fx.attach(ddp_model, optimizer) in a training loop (docs/DISTRIBUTED.md)")
        if self.controller is not None:
            self.controller.detach()
        self.controller = attach(model, _torch_optimizer(optimizer), self.config, seed=self.seed,
                                 recompile=self.recompile)
        if state.global_step > 0:
            self._resume(args, state)
        self._logged_events = self.controller.rank_events

    def _resume(self, args, state) -> None:
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in candidates:
            if not isinstance(folder, (str, os.PathLike)):
                continue
            if (Path(folder) / CONTROLLER_FILE).is_file():
                saved = torch.load(Path(folder) / CONTROLLER_FILE, map_location="cpu",
                                   weights_only=True)  # tensors and plain data only
                self.controller.load_state_dict(saved)
                return
        raise FileNotFoundError(
            f"the Trainer resumed at step {state.global_step}, but no {CONTROLLER_FILE} was found "
            f"in {', '.join(str(c) for c in candidates if c)}; pass "
            "InRankCallback(resume_from=<checkpoint folder>)"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller is not None and self.controller.rank_events > self._logged_events:
            control.should_log = True  # report a rank change at the step it happened
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.controller is None or logs is None:
            return
        figures = self.figures()
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        self._logged_events = self.controller.rank_events

    def figures(self) -> dict[str, float]:
        values = list(ranks(self.controller.model).values())
        return {"inrank/mean_rank": statistics.mean(values), "inrank/min_rank": min(values),
                "inrank/max_rank": max(values), "inrank/rank_events": self.controller.rank_events}

    def on_save(self, args, state, control, **kwargs):
        if self.controller is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return  # a save the Trainer did elsewhere (hyperparameter search runs)
        with atomic_destination(folder / CONTROLLER_FILE) as tmp:
            torch.save(self.controller.state_dict(), tmp)
        self.controller.config.save(folder / CONFIG_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.detach()


# -- saving and loading transformed models ------------------------------------------------------


def save_transformed(model: torch.nn.Module, folder: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(folder, **kwargs)` (safetensors) plus the InRankConfig it was
    transformed with, so that `load_transformed` rebuilds the same layers."""
    folder = Path(folder)
    model.save_pretrained(folder, **kwargs)
    report = getattr(model, REPORT_ATTR, None)
    (report.config if report is not None else InRankConfig()).save(folder / CONFIG_FILE)
    return folder


def load_transformed(model_class, folder: str | os.PathLike,
                     config: InRankConfig | None = None) -> torch.nn.Module:
    """A transformed `model_class` with the weights and ranks saved in `folder` (by
    `save_transformed`, `save_pretrained`, or a Trainer checkpoint with InRankCallback):
    built from the folder's config.json, transformed with its inrank_config.json (or `config`),
    then loaded strictly, tied weights aside."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    if config is None:
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder / CONFIG_FILE} not found: pass the InRankConfig the "
                                    "model was transformed with as config=")
        config = InRankConfig.load(folder / CONFIG_FILE)
    model = model_class(AutoConfig.from_pretrained(folder))
    model = transform(model, config, inplace=True)
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    state = {}
    for shard in shards:
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    tied = _tied_names(model, state)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise InRankRuntimeError(f"{folder} does not fit a {model_class.__name__} transformed with "
                                 f"{config}: missing {missing[:5]}, unexpected "
                                 f"{result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _tied_names(model: torch.nn.Module, loaded: dict) -> set[str]:
    """Names of parameters that share their tensor with a loaded one (save_pretrained drops
    the duplicates of tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n for names in groups.values() if any(m in loaded for m in names) for n in names}


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    seen = optimizer  # AcceleratedOptimizer subclasses Optimizer but never initialises it
    while isinstance(getattr(seen, "optimizer", None), torch.optim.Optimizer):
        seen = seen.optimizer
    if not isinstance(seen, torch.optim.Optimizer):
        raise InRankTypeError(
            f"{type(optimizer).__name__} holds no torch.optim.Optimizer to attach to"
        )
    return seen


__all__ = ["InRankCallback", "load_transformed", "save_transformed"]
