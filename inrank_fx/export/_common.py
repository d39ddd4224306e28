"""What the exporters share: torch.export with errors that name the failing module, second-batch
inputs and output comparison."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import InRankError, InRankTypeError


class ExportError(InRankError, RuntimeError):
    """The model could not be traced for export; the message names the module and source line."""


class MissingDependencyError(InRankError, ImportError, RuntimeError):
    """An exporter's optional dependency, or the hardware it needs, is missing; the message says
    which and how to install it. (An ImportError, as a missing module is; a RuntimeError, as
    to_tensorrt's refusal was before.)"""


def missing_modules(needed: dict[str, str]) -> list[str]:
    """The modules of {module: pip extra} that cannot be imported here, with how to get them."""
    return [f"{module} (pip install 'inrank-fx[{extra}]')" for module, extra in needed.items()
            if importlib.util.find_spec(module) is None]


class ExportParityError(InRankError, AssertionError):
    """The exported artifact does not compute what the PyTorch model computes."""


def check_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    bad = [i for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)]
    if not inputs or bad:
        raise InRankTypeError(
            "example_inputs must be a tensor or a tuple of tensors"
            + (f"; positions {bad} are not tensors" if bad else "")
        )
    return inputs


def export_program(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> torch.export.ExportedProgram:
    """torch.export the model; on failure say which module's forward (and which line) failed."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim.DYNAMIC
        dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)
        if any(x.dim() and x.shape[0] == 1 for x in inputs):
            # torch.export specialises a dimension of size 1; trace at batch 2 to keep it dynamic.
            inputs = second_batch(inputs, 2)
    try:
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        raise ExportError(_explain_trace_failure(model, err)) from err


def _explain_trace_failure(model: nn.Module, err: BaseException) -> str:
    """Name the innermost module forward on the failing stack, with its file and line."""
    forwards: dict = {}
    for name, module in model.named_modules():
        forwards.setdefault(type(module).forward.__code__, (name, type(module).__name__))
    culprit, where = None, None
    chain, seen = err, set()
    while chain is not None and id(chain) not in seen:  # the exception and what caused it
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            hit = forwards.get(tb.tb_frame.f_code)
            if hit is not None:
                culprit, where = hit, f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    label = type(model).__name__
    if culprit is not None:
        name, cls = culprit
        module = f"module {name!r}" if name else "its own forward"
        label += f": the failure is in {module} ({cls}) at {where}"
    return f"torch.export could not trace {label}: {type(err).__name__}: {first}"


def second_batch(inputs: Sequence[torch.Tensor], size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs with batch `size` built from the examples: tiled, and varied per copy (noise for
    floating inputs, a roll for integer ones) so that rows differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if x.dim() == 0:
            out.append(x)
            continue
        copies = []
        for i in range(-(-size // x.shape[0])):
            if i == 0:
                copies.append(x)
            elif x.is_floating_point():
                noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
                copies.append(x + 0.1 * noise.to(x.device) * x.detach().float().std().clamp(min=1e-3).to(x.dtype))
            else:
                copies.append(x.roll(i, dims=-1))
        out.append(torch.cat(copies)[:size])
    return tuple(out)


def flat_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for o in output for t in flat_outputs(o)]


def compare(reference: list[torch.Tensor], candidate: list, what: str) -> tuple[float, float]:
    """(max abs error, max error relative to the reference's largest magnitude) over outputs."""
    if len(reference) != len(candidate):
        raise ExportParityError(f"{what}: {len(candidate)} outputs, the model has {len(reference)}")
    max_abs, max_rel = 0.0, 0.0
    for i, (ref, got) in enumerate(zip(reference, candidate)):
        got = torch.as_tensor(got).to(ref.device)
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportParityError(f"{what}: output {i} has shape {tuple(got.shape)}, the model gives {tuple(ref.shape)}")
        diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return max_abs, max_rel


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
