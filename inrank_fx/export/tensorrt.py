"""`to_tensorrt`: a TensorRT-compiled program of the frozen model, through torch-tensorrt's
dynamo path (torch.export → torch_tensorrt.dynamo.compile → torch_tensorrt.save).

Needs a CUDA GPU and the `[gpu]` extra (torch-tensorrt); both are imported and checked lazily, so
the rest of inrank_fx works without them.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_destination, check_destination
from ..errors import InRankValueError
from ._common import (
    ExportParityError,
    MissingDependencyError,
    check_inputs,
    compare,
    count_params,
    export_program,
    flat_outputs,
    missing_modules,
)
from .freeze import freeze, frozen_ranks

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp16/bf16 engines are compared to the PyTorch model run at the same precision.
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass
class TensorRTReport:
    path: Path
    file_bytes: int
    parameters: int
    ranks: dict[str, int]
    precision: str
    device: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    merged: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"TensorRT program {self.path} ({self.file_bytes / 1e6:.2f} MB, {self.precision}, "
                f"{self.device}), {self.parameters:,} parameters, {len(self.ranks)} factored layers")
        if self.max_rel_error is not None:
            text += f"; max rel error vs PyTorch {self.max_rel_error:.2e}"
        return text


def tensorrt_missing() -> list[str]:
    """What to_tensorrt lacks on this machine (empty when it can run)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    return missing + missing_modules({"torch_tensorrt": "gpu"})


def to_tensorrt(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    *,
    precision: str = "fp16",
    verify: bool = True,
    rtol: float | None = None,
) -> TensorRTReport:
    """Compile the frozen model with TensorRT and save it (an ExportedProgram file, `.ep`).

    The model and floating inputs are cast to `precision` ("fp32", "fp16", "bf16") and compiled
    with explicit typing, so TensorRT runs at that precision. With `verify`, the compiled program
    must match the PyTorch model at the same precision to `rtol`.
    """
    if precision not in PRECISIONS:
        raise InRankValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    missing = tensorrt_missing()
    if missing:
        raise MissingDependencyError("to_tensorrt needs " + " and ".join(missing))
    import torch_tensorrt

    path = check_destination(path)
    dtype = PRECISIONS[precision]
    frozen = freeze(model).to(device="cuda", dtype=dtype)  # a copy: the caller's model is left as it is
    inputs = tuple(x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda")
                   for x in check_inputs(example_inputs))
    with torch.no_grad():
        program = export_program(frozen, inputs, dynamic_batch=False)
        compiled = torch_tensorrt.dynamo.compile(program, arg_inputs=inputs,
                                                 **_precision_settings(torch_tensorrt, dtype))
    ranks, merged = frozen_ranks(frozen)
    report = TensorRTReport(path, 0, count_params(frozen), ranks, precision,
                            torch.cuda.get_device_name(), merged=merged)
    if verify:
        with torch.no_grad():
            expected = flat_outputs(frozen(*inputs))
            got = flat_outputs(compiled(*inputs))
        report.max_abs_error, report.max_rel_error = compare(expected, got, "TensorRT")
        limit = DEFAULT_RTOL[precision] if rtol is None else rtol
        if report.max_rel_error > limit:
            raise ExportParityError(
                f"TensorRT ({precision}) differs from the PyTorch model: max relative error "
                f"{report.max_rel_error:.3e} exceeds rtol={limit:g}"
            )
    with atomic_destination(path) as tmp:
        torch_tensorrt.save(compiled, str(tmp), arg_inputs=list(inputs))
        report.file_bytes = sum(p.stat().st_size for p in tmp.parent.iterdir())
    return report


def _precision_settings(torch_tensorrt, dtype: torch.dtype) -> dict:
    """Explicit typing where this torch-tensorrt has it (the model is already cast); older
    releases take the allowed precisions instead."""
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    if "use_explicit_typing" in params:
        return {"use_explicit_typing": True}
    return {"enabled_precisions": {dtype}}
