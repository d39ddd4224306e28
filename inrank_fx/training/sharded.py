"""InRank on FSDP2 (`fully_shard`) models: ranks adapt while the parameters stay sharded.

    for block in model.transformer.h: fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    ctrl = inrank_fx.attach(model, optimizer)      # sees fully_shard: a ShardedCoordinator

FSDP2 shards every parameter by rows (Shard(0)) and owns it through an `FSDPParam`; InRank's
resizes change the number of *columns* of a layer's factors. Between optimizer steps, at a rank
event, every process does the same:

1. check: the factors U, V of every factored layer are all-gathered (`DTensor.full_tensor`) for
   the check only; process 0 measures and decides, as under DDP (ProcessGroupCoordinator);
2. resize: for each layer whose width changes, its full factors and their optimizer state are
   gathered, and `set_ranks` grows or truncates them exactly as with one process (same random
   generator, same optimizer-state rules); the results are broadcast from process 0;
3. re-shard: each resized factor gets a new FSDPParam in the FSDP parameter group that owned it,
   so FSDP all-gathers and reduce-scatters the new shape from the next step on; the optimizer
   points at the new sharded parameter and its state is sharded the same way.

Only the resized layers' factors are ever gathered; no other parameter is touched. FSDP2 has no
public API for changing a parameter's shape, so step 3 builds the FSDPParam as fully_shard does
(`torch.distributed.fsdp._fully_shard`, reached only through `torch_internals`, which names each
internal it uses); attach checks that those internals are present and refuses what this does not
cover: HSDP (a 2-D mesh), CPU offload, sharding other than by rows, and the first FSDP
(FullyShardedDataParallel). Checkpoints: `save_checkpoint` / `load_checkpoint`
(torch.distributed.checkpoint, resuming across rank changes). See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import io
import os
import shutil
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..nn.modules import factored_layers
from .distributed import (
    InRankDistributedError,
    ProcessGroupCoordinator,
    _broadcast_tensors,
)
from .resize import RankChange
from .torch_internals import (  # noqa: F401 - the *_INTERNALS still importable from here
    GROUP_INTERNALS,
    PARAM_INTERNALS,
    group_fqn,
    missing_fsdp_internals,
    module_parameter,
    param_groups,
    replace_sharded_parameter,
    set_module_parameter,
)

FACTORS = ("U", "V")


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether `model` or one of its modules was sharded with FSDP2's fully_shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without fsdp
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_shardable(model: nn.Module) -> None:
    """Refuse, naming it, what the sharded resize does not cover; check FSDP2's internals."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard

    legacy = next((n for n, m in model.named_modules()
                   if isinstance(m, FullyShardedDataParallel)), None)
    if legacy is not None:
        raise InRankDistributedError(
            f"'{legacy or type(model).__name__}' is wrapped in FullyShardedDataParallel (the first "
            "FSDP), whose flat parameters cannot change shape; use FSDP2's fully_shard")
    missing = missing_fsdp_internals(model)
    if missing:
        raise InRankDistributedError(
            f"this torch {torch.__version__} lacks the FSDP2 internals that inrank_fx uses to "
            f"re-shard a resized factor ({', '.join(missing)}); adapt ranks under DDP, detach "
            "and fully_shard the fixed-rank model instead (docs/DISTRIBUTED.md)")
    for group in param_groups(model):
        if isinstance(group.offload_policy, CPUOffloadPolicy):
            raise InRankDistributedError(
                f"fully_shard(offload_policy=CPUOffloadPolicy()) on '{group_fqn(group)}': CPU "
                "offload is not supported while ranks adapt (resized factors are gathered and "
                "re-sharded on the training device)")
        if group.mesh_info.mesh.ndim != 1:
            raise InRankDistributedError(
                f"'{group_fqn(group)}' is sharded over a {group.mesh_info.mesh.ndim}-D mesh "
                "(HSDP: replicate x shard); only a 1-D mesh (plain fully_shard) is supported "
                "while ranks adapt")
    layers = factored_layers(model)
    for name, layer in layers.items():
        for factor in FACTORS:
            param = getattr(layer, factor)
            if not isinstance(param, DTensor):
                raise InRankDistributedError(
                    f"'{name}.{factor}' is not sharded by fully_shard (a plain tensor beside "
                    "DTensors): shard a module that holds every factored layer, e.g. the root")
            if tuple(param.placements) != (Shard(0),):
                raise InRankDistributedError(
                    f"'{name}.{factor}' is sharded as {param.placements}; resizes need FSDP2's "
                    "default row sharding (Shard(0)), so leave shard_placement_fn unset for it")


class ShardedCoordinator(ProcessGroupCoordinator):
    """A ProcessGroupCoordinator for fully_shard models: checks read gathered factors, resizes
    run on gathered factors and optimizer state, and resized factors are re-sharded (see the
    module's docstring). Made by `attach`, which has checked `check_shardable`."""

    def __init__(self, model: nn.Module, process_group=None, timeout_s: float = 300.0) -> None:
        super().__init__(model, process_group, timeout_s)
        self._gathered: dict[tuple[str, str], nn.Parameter] = {}  # (layer, factor) → sharded

    def agree(self, controller, event: str, decide):
        self._reshard_all()
        with self._full_factors(factored_layers(self.module)):
            return super().agree(controller, event, decide)

    def before_apply(self, controller, ranks: dict, widths: dict) -> None:
        """Gather the factors (and their optimizer state) of the layers about to be resized,
        so that set_ranks works on full tensors as it does with one process."""
        layers = factored_layers(self.module)
        for name, width in widths.items():
            if width == layers[name].width:
                continue
            for factor in FACTORS:
                sharded = getattr(layers[name], factor)
                full = nn.Parameter(sharded.full_tensor(), requires_grad=sharded.requires_grad)
                _swap_in_optimizer(controller.optimizer, sharded, full, _full_state)
                set_module_parameter(layers[name], factor, full)
                self._gathered[(name, factor)] = sharded

    def after_apply(self, controller, changes: list[RankChange]) -> None:
        self.verify(controller, "rank change")
        layers = factored_layers(self.module)
        resized = [c.name for c in changes if c.resized]
        tensors = [t for name in resized for t in
                   [*(getattr(layers[name], f) for f in FACTORS), *layers[name].buffers()]]
        if tensors:
            self._collective("factor broadcast", lambda: _broadcast_tensors(
                tensors, self.source, self.group))
        for (name, factor), old in list(self._gathered.items()):
            full = getattr(layers[name], factor)
            sharded = _reshard_param(self.module, layers[name], factor, old, full)
            _swap_in_optimizer(controller.optimizer, full, sharded, _shard_state(sharded))
            del self._gathered[(name, factor)]

    def describe(self) -> str:
        return f", process={self.process} of {self.processes}, fully_shard=True"

    def _reshard_all(self) -> None:
        """A forward under no_grad leaves the root's parameters unsharded: shard them first."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def _full_factors(self, layers: dict):
        """Every layer's factors as full tensors for the duration of a check (all processes
        gather; process 0 measures)."""
        saved = {}
        try:
            for name, layer in layers.items():
                for factor in FACTORS:
                    sharded = module_parameter(layer, factor)
                    saved[(name, factor)] = sharded
                    set_module_parameter(layer, factor, nn.Parameter(
                        sharded.full_tensor().detach(), requires_grad=False))
            yield
        finally:
            for (name, factor), sharded in saved.items():
                set_module_parameter(layers[name], factor, sharded)


# -- moving one factor between its sharded and its full form ------------------------------------

def _full_state(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard_state(like):
    """Per-element state shaped like the parameter is sharded as the parameter is; counts stay."""
    from torch.distributed.tensor import distribute_tensor

    def shard(value):
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == like.shape:
            # every process holds the same full value: each keeps its rows, no communication
            return distribute_tensor(value.to(like.device), like.device_mesh, like.placements,
                                     src_data_rank=None)
        return value
    return shard


def _swap_in_optimizer(optimizer, old, new, convert) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {key: convert(value) for key, value in state.items()}


def _reshard_param(model: nn.Module, layer: nn.Module, factor: str, old: nn.Parameter,
                   full: nn.Parameter) -> nn.Parameter:
    """Give `full` (layer.<factor>, a new shape) a new FSDPParam in the FSDP parameter group that
    owned `old`, as fully_shard builds one (`torch_internals.replace_sharded_parameter`);
    returns the new sharded parameter."""
    sharded = replace_sharded_parameter(model, layer, factor, full)
    if sharded is None:
        raise InRankDistributedError(
            f"no FSDP parameter group owns the factor {factor} of a resized layer: was the model "
            "changed after attach?")
    return sharded


# -- checkpoints through torch.distributed.checkpoint -------------------------------------------

def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, controller) -> None:
    """Save a sharded model, its optimizer and the controller with torch.distributed.checkpoint
    (every process writes its shards; call it on every process). The folder is written as
    `<path>.incomplete` and renamed by process 0 once every process has finished, so a failed
    save leaves no half-written checkpoint at `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.fspath(path)
    staging = f"{path}.incomplete"
    first = not dist.is_initialized() or dist.get_rank() == 0
    if first:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    inrank = io.BytesIO()  # one opaque entry: the history's length changes between checkpoints
    torch.save(controller.state_dict(), inrank)
    inrank.seek(0)
    dcp.save({"model": model_state, "optim": optim_state, "inrank": inrank},
             checkpoint_id=staging)
    _barrier()
    if first:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, controller) -> None:
    """Resume from `save_checkpoint`, also across rank changes: the factored layers first take
    the checkpoint's widths (read from its metadata; a collective resize like any other), then
    the model, optimizer and controller state are loaded. Call it on every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.fspath(path)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    layers = factored_layers(model)
    widths = {}
    for name in layers:
        key = f"model.{name}.U"
        if key not in stored:
            raise InRankDistributedError(
                f"checkpoint {path} has no factor '{name}.U': it was saved from another model")
        widths[name] = stored[key].size[1]
    ranks = {name: min(layer.rank, widths[name]) for name, layer in layers.items()}
    controller.set_ranks(ranks, widths)  # the checkpoint's shapes; values come next
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "inrank": io.BytesIO()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    state["inrank"].seek(0)
    controller.load_state_dict(torch.load(state["inrank"]))
