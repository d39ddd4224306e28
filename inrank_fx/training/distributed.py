"""InRank under torch.distributed: one decision, applied identically on every process.

    model = DistributedDataParallel(inrank_fx.transform(model))
    ctrl = inrank_fx.attach(model, optimizer)        # sees DDP: ranks agree across processes

Everything else in the training loop is as with one process. What happens at a rank check
(every process runs it at the same optimizer step, since optimizer steps are in lockstep):

1. the processes agree on their state: an all-gather of (step, phase, each layer's rank and
   width); a process that differs is named, with the layer and the values, on every process;
2. process 0 of the group measures every layer's spectrum and decides, and broadcasts the
   decision (rank, width, explained ratio: three numbers per layer); nobody relies on SVDs being
   bit-identical across processes;
3. every process applies the decision through `set_ranks`, so optimizer state follows in the
   same way everywhere, and the processes check that they agree again;
4. if a layer changed width, its factors (and W_0 reference) are broadcast from process 0, since
   truncation runs an SVD and growth draws new components, and DDP's reducer is rebuilt: DDP
   registered its gradient hooks and buckets on the parameters it was built with, and without a
   rebuild the new factors would silently stop being all-reduced.

InRank's own collectives run on a gloo group made at attach, on CPU tensors, with a timeout, so
a process that died or fell out of step becomes `InRankDistributedError` (naming the step and the
collective) instead of a hang. FSDP2 (fully_shard) models get a ShardedCoordinator
(`inrank_fx.training.sharded`); the first FSDP and tensor-parallel DTensor models are refused.
See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import logging
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import InRankConfig
from ..errors import InRankError, InRankValueError
from ..nn.modules import factored_layers
from ..vocabulary import Event
from .controller import Decision, Decisions, RankController
from .resize import RankChange
from .torch_internals import ddp_delays_all_reduce, ddp_lacks, rebuild_ddp_reducer

log = logging.getLogger("inrank_fx")

DEFAULT_TIMEOUT_S = 300.0


class InRankDistributedError(InRankError, RuntimeError):
    """Processes disagree, or one of them stopped answering InRank's collectives."""


class ProcessGroupCoordinator:
    """The processes of a torch.distributed group agree on every decision: process 0 decides,
    everyone applies, and the state is checked before and after (see the module's docstring).

    `model` is the DistributedDataParallel wrapper (its reducer is rebuilt after resizes) or a
    plain module whose gradients the caller keeps in sync. `process_group` is the group whose
    processes must agree (default: DDP's group, else the world). `timeout_s` bounds every one of
    InRank's collectives. Made by `attach` (through DistributedRankController), which has
    already refused sharded models.
    """

    def __init__(self, model: nn.Module, process_group=None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise InRankDistributedError(
                "attach(..., distributed=True) needs torch.distributed's default process group: "
                "call torch.distributed.init_process_group() first (torchrun sets the environment "
                "it reads), then wrap the model in DistributedDataParallel and attach"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not timeout_s > 0:
            raise InRankValueError(
                f"timeout_s must be a positive number of seconds, got {timeout_s!r}"
            )
        self.ddp = model if isinstance(model, DistributedDataParallel) else None
        self.module = model.module if self.ddp is not None else model
        if process_group is None:
            process_group = self.ddp.process_group if self.ddp is not None else dist.group.WORLD
        self.timeout_s = float(timeout_s)
        self.group = _control_group(process_group, self.timeout_s)
        self.process = dist.get_rank(self.group)
        self.processes = dist.get_world_size(self.group)
        self.source = dist.get_global_rank(self.group, 0)  # process 0 of the group decides
        # {kind: [count, seconds]} of InRank's own collectives, waiting for peers included
        self.collective_stats: dict[str, list] = {}
        # The names are the protocol: every process must have the same factored layers, in order.
        self.layer_names = list(factored_layers(self.module))
        self._names_crc = zlib.crc32("\n".join(self.layer_names).encode())
        self._step = 0  # the step of the controller being served, for error messages

    # -- the coordinator's part in a controller's life ------------------------------------------

    def agree(self, controller, event: Event, decide) -> Decisions:
        self.verify(controller, f"rank {event}")
        table = torch.zeros(len(self.layer_names), 3, dtype=torch.float64)
        if self.process == 0:
            decisions = decide()
            for i, name in enumerate(self.layer_names):
                table[i] = torch.tensor(decisions[name], dtype=torch.float64)
        self._collective(f"rank decision ({event})",
                         lambda: dist.broadcast(table, self.source, group=self.group))
        return {name: Decision(int(row[0]), int(row[1]), float(row[2]))
                for name, row in zip(self.layer_names, table)}

    def before_apply(self, controller, ranks: dict, widths: dict) -> None:
        """Nothing: every process holds the whole model (a ShardedCoordinator gathers here)."""

    def after_apply(self, controller, changes: list[RankChange]) -> None:
        # Every process checks, changed or not: a process that alone changed something must not
        # be left waiting in a collective the others skip.
        self.verify(controller, "rank change")
        resized = [c.name for c in changes if c.resized]
        if not resized:
            return
        layers = factored_layers(self.module)
        tensors = [t for name in resized for t in _layer_tensors(layers[name])]
        self._collective("factor broadcast", lambda: _broadcast_tensors(
            tensors, self.source, self.group))
        if self.ddp is not None:
            rebuild_reducer(self.ddp)

    def after_load(self, controller) -> None:
        """The controller's state was loaded (identical on every process): check that the
        processes agree, and rebuild DDP's reducer in case the shapes changed since DDP was
        built."""
        self.verify(controller, "resume")
        if self.ddp is not None:
            rebuild_reducer(self.ddp)

    def describe(self) -> str:
        return f", process={self.process} of {self.processes}, ddp={self.ddp is not None}"

    # -- the collectives ----------------------------------------------------------------------

    def _collective(self, what: str, run):
        start = time.perf_counter()
        try:
            return run()
        except Exception as error:  # gloo raises RuntimeError / DistBackendError subclasses
            raise InRankDistributedError(
                f"InRank's {what} at optimizer step {self._step} failed on process "
                f"{self.process} of {self.processes} (timeout {self.timeout_s:g} s): {error}. "
                "Every process must run the same optimizer steps and attach the same model; "
                "another process has probably died or stopped (see its log)"
            ) from error
        finally:
            stats = self.collective_stats.setdefault(what.split(" (")[0], [0, 0.0])
            stats[0] += 1
            stats[1] += time.perf_counter() - start

    def _state_tensor(self, controller) -> torch.Tensor:
        layers = factored_layers(self.module)
        values = [controller.step, int(controller.stopped), self._names_crc, len(layers)]
        for layer in layers.values():
            values += [layer.rank, layer.width]
        return torch.tensor(values, dtype=torch.int64)

    def verify(self, controller, moment: str) -> None:
        """All-gather every process's state and raise, on every process, if any differ."""
        self._step = controller.step
        mine = self._state_tensor(controller)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.processes)]
        self._collective(f"state check ({moment})", lambda: dist.all_gather(
            sizes, torch.tensor([mine.numel()]), group=self.group))
        width = max(int(s) for s in sizes)
        padded = torch.full((width,), -1, dtype=torch.int64)
        padded[: mine.numel()] = mine
        states = [torch.empty(width, dtype=torch.int64) for _ in range(self.processes)]
        self._collective(f"state check ({moment})", lambda: dist.all_gather(
            states, padded, group=self.group))
        reference = states[0]
        for process, state in enumerate(states):
            if not torch.equal(state, reference):
                raise InRankDistributedError(
                    f"InRank {moment} at optimizer step {controller.step}: processes disagree: "
                    f"{self._describe_difference(reference, state, process)}"
                )

    def _describe_difference(self, first: torch.Tensor, other: torch.Tensor, process: int) -> str:
        a, b = first.tolist(), other.tolist()
        if a[0] != b[0] or a[1] != b[1]:
            return (f"process 0 is at step {a[0]} ({_phase(a[1])}), process {process} at step "
                    f"{b[0]} ({_phase(b[1])})")
        if a[2] != b[2] or a[3] != b[3]:
            return (f"process {process} has different factored layers ({b[3]} against {a[3]} on "
                    "process 0): every process must transform the same model with the same config")
        for i, name in enumerate(self.layer_names):
            ra, wa, rb, wb = a[4 + 2 * i], a[5 + 2 * i], b[4 + 2 * i], b[5 + 2 * i]
            if (ra, wa) != (rb, wb):
                return (f"layer '{name}' has rank {ra} (width {wa}) on process 0 and rank {rb} "
                        f"(width {wb}) on process {process}")
        return f"process {process}'s state differs from process 0's"


class DistributedRankController(RankController):
    """What `attach` returns for a DDP model: a RankController with a ProcessGroupCoordinator
    (decisions made on process 0 and applied on all). Attaching is itself a collective: every
    process of the group attaches. The coordinator's figures are read through it."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: InRankConfig,
        *,
        process_group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        seed: int = 0,
        recompile: str = "dynamic",
        coordinator: ProcessGroupCoordinator | None = None,
    ) -> None:
        if coordinator is None:
            coordinator = ProcessGroupCoordinator(model, process_group, timeout_s)
        super().__init__(coordinator.module, optimizer, config, seed=seed, recompile=recompile,
                         coordinator=coordinator)
        try:
            coordinator.verify(self, "attach")
        except InRankDistributedError:
            self.detach()  # a refused controller must not stay on the optimizer's step hooks
            raise

    @property
    def ddp(self) -> DistributedDataParallel | None:
        return self.coordinator.ddp

    @property
    def process(self) -> int:
        return self.coordinator.process

    @property
    def processes(self) -> int:
        return self.coordinator.processes

    @property
    def timeout_s(self) -> float:
        return self.coordinator.timeout_s

    @property
    def collective_stats(self) -> dict[str, list]:
        return self.coordinator.collective_stats

    @property
    def collectives(self) -> int:
        return sum(count for count, _ in self.collective_stats.values())

    @property
    def collective_seconds(self) -> float:
        return sum(seconds for _, seconds in self.collective_stats.values())


# -- helpers ------------------------------------------------------------------------------------


def _phase(stopped: int) -> str:
    return "stopped" if stopped else "adapting"


def _control_group(process_group, timeout_s: float):
    """A gloo group over the same processes as `process_group`, for InRank's small collectives
    on CPU tensors with InRank's own timeout (the training group may be NCCL, with its own)."""
    timeout = timedelta(seconds=timeout_s)
    world = dist.group.WORLD
    if process_group is None or process_group is world:
        return dist.new_group(backend="gloo", timeout=timeout)
    if dist.get_backend(process_group) == "gloo":
        return process_group  # already gloo: used as it is, with the timeout it was made with
    raise InRankDistributedError(
        f"process_group uses the {dist.get_backend(process_group)!r} backend and is not the whole "
        "world; InRank's collectives need a gloo group over the same processes: make one with "
        "torch.distributed.new_group(ranks, backend='gloo') on every process and pass it as "
        "process_group"
    )


def _layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in layer.named_parameters(recurse=False)] + \
        [t for _, t in layer.named_buffers(recurse=False)]


@torch.no_grad()
def _broadcast_tensors(tensors: list[torch.Tensor], source: int, group) -> None:
    """Broadcast `tensors` from `source` in one collective per dtype (flattened on CPU)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to("cpu") for t in same])
        dist.broadcast(flat, source, group=group)
        for tensor, value in zip(same, flat.split([t.numel() for t in same])):
            tensor.copy_(value.view_as(tensor))


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


def check_not_sharded(model: nn.Module) -> None:
    """Refuse sharding other than FSDP2's fully_shard (which `attach` handles before this): the
    first FSDP's flat parameters and DTensor models (tensor parallelism) cannot be resized."""
    sharded = None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without fsdp
        return
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            sharded = name or type(model).__name__
            break
    if sharded is None:
        from torch.distributed.tensor import DTensor

        sharded = next((n for n, p in model.named_parameters() if isinstance(p, DTensor)), None)
    if sharded is not None:
        raise InRankDistributedError(
            f"'{sharded}' is sharded by FullyShardedDataParallel or holds DTensor parameters "
            "(tensor parallelism): InRank's resizes change the shapes of factored layers, which "
            "only FSDP2's fully_shard is followed through (docs/DISTRIBUTED.md). Shard with "
            "fully_shard, or adapt ranks under DistributedDataParallel with InRank-Efficient "
            "(InRankConfig(stop_after=N)), detach, and shard the fixed-rank model"
        )


def rebuild_reducer(ddp: DistributedDataParallel) -> None:
    """Rebuild DDP's reducer on the module's current parameters, as DDP's own __setstate__ does.

    DDP hooks every parameter's gradient accumulation and buckets parameters at construction;
    after a resize the new factors are not in any bucket. The old reducer's hooks are removed
    first (they would still fire for unchanged parameters and all-reduce into stale buckets).
    The rebuild itself reaches DDP's internals, so it is `torch_internals.rebuild_ddp_reducer`;
    what it cannot carry over is refused here.
    """
    missing = ddp_lacks(ddp)
    if missing:
        raise InRankDistributedError(
            f"this torch {torch.__version__} DistributedDataParallel lacks {missing}, which "
            "inrank_fx uses to rebuild its reducer after a resize"
        )
    if getattr(ddp, "mixed_precision", None) is not None or ddp_delays_all_reduce(ddp):
        raise InRankDistributedError(
            "DistributedDataParallel's mixed_precision and delay_all_reduce_named_params are not "
            "supported with InRank's resizes; use torch.autocast for mixed precision"
        )
    rebuild_ddp_reducer(ddp)
