"""`attach`: the one way to start adapting ranks, on one process or many.

It picks the controller: a `RankController` for a plain model, a `DistributedRankController` for
a DistributedDataParallel model (or `distributed=True`), and refuses what neither can follow.
It sits above both controllers, so that neither imports the other.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import REPORT_ATTR, InRankConfig
from ..errors import InRankValueError
from .controller import RankController
from .distributed import DEFAULT_TIMEOUT_S, DistributedRankController, check_not_sharded, is_ddp
from .sharded import ShardedCoordinator, check_shardable, is_fully_sharded


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: InRankConfig | None = None,
    *,
    seed: int = 0,
    recompile: str = "dynamic",
    distributed: bool | None = None,
    process_group=None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RankController:
    """Follow `optimizer` and adapt the ranks of `model`'s factored layers on its steps.

    `config` defaults to the one `transform` used on this model; `seed` seeds the components
    added by growth; `recompile` is the torch.compile policy (see
    `inrank_fx.training.compile_policy`).

    Multi-process training: pass the DistributedDataParallel-wrapped model and ranks are decided
    on one process and applied on all, with DDP kept in sync through every resize
    (`inrank_fx.training.distributed`; every process attaches). `distributed` defaults to
    whether `model` is DDP; `distributed=True` with a plain module is for callers that sync
    gradients themselves. `process_group` is the group that must agree (default: DDP's, else the world),
    and `timeout_s` bounds each of InRank's collectives.
    """
    check_materialized(model)
    if is_fully_sharded(model):  # FSDP2: checks gather factors, resizes re-shard them
        check_shardable(model)
        if distributed is False:
            raise InRankValueError(
                "distributed=False with a fully_shard model: its resizes are "
                "collectives; attach it on every process with distributed left unset"
            )
        config = config if config is not None else _transform_config(model)
        coordinator = ShardedCoordinator(model, process_group, timeout_s)
        return DistributedRankController(model, optimizer, config, seed=seed,
                                         recompile=recompile, coordinator=coordinator)
    check_not_sharded(model)  # other sharding (the first FSDP, DTensor models) is refused
    if config is None:
        config = _transform_config(model)
    if distributed is None:
        distributed = is_ddp(model) or process_group is not None
        processes = _world_size()
        if not distributed and processes > 1:
            raise InRankValueError(
                f"torch.distributed is initialised with {processes} processes but attach got a "
                f"plain {type(model).__name__}: pass the DistributedDataParallel-wrapped model so "
                "that ranks agree across processes, or distributed=False if every process trains "
                "a model of its own"
            )
    if distributed:
        return DistributedRankController(model, optimizer, config, process_group=process_group,
                                         timeout_s=timeout_s, seed=seed, recompile=recompile)
    if is_ddp(model):
        raise InRankValueError(
            "distributed=False with a DistributedDataParallel model: a resize would leave DDP's "
            "gradient hooks on the old factors; attach the DDP model with distributed=True"
        )
    return RankController(model, optimizer, config, seed=seed, recompile=recompile)


def _transform_config(model: nn.Module) -> InRankConfig:
    """The config `transform` used on this model (else the defaults)."""
    base = model.module if is_ddp(model) else model
    report = getattr(base, REPORT_ATTR, None)
    return report.config if report is not None else InRankConfig()


def check_materialized(model: nn.Module) -> None:
    """A model still on the meta device has shapes but no values: nothing to train yet."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise InRankValueError(
            f"'{meta}' is on the meta device: {type(model).__name__} has no values to train yet. "
            "Give it storage and initial values first with "
            "inrank_fx.materialize(model, device, init_fn=<the model's own init>), then build "
            "the optimizer on the materialised parameters"
        )


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
