"""`to_onnx`: a slim ONNX file of the frozen model, checked against ONNX Runtime."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_destination, check_destination
from ..errors import InRankValueError
from ..vocabulary import EXPORTERS
from ._common import (
    ExportError,
    ExportParityError,
    MissingDependencyError,
    check_inputs,
    compare,
    count_params,
    export_program,
    flat_outputs,
    missing_modules,
    second_batch,
)
from .freeze import freeze, frozen_ranks

RANKS_METADATA_KEY = "inrank_fx.ranks"


@dataclass
class OnnxExportReport:
    path: Path
    file_bytes: int  # the .onnx file and any external-data file beside it
    parameters: int
    ranks: dict[str, int]  # factored layers: inner dimension r; merged layers are not listed
    merged: list[str] = field(default_factory=list)
    opset: int | None = None
    providers: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    exporter: str = "dynamo"  # which torch.onnx exporter wrote the file
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"ONNX file     {self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"{self.exporter} exporter)",
            f"parameters    {self.parameters:,}",
            f"factored      {len(self.ranks)} layer(s)"
            + (f", ranks {min(self.ranks.values())}..{max(self.ranks.values())}" if self.ranks else "")
            + (f"; merged to dense: {len(self.merged)}" if self.merged else ""),
        ]
        if self.providers:
            lines.append(
                f"verified      ONNX Runtime {', '.join(self.providers)} at batch sizes "
                f"{self.batch_sizes}: max abs error {self.max_abs_error:.2e}, "
                f"max rel error {self.max_rel_error:.2e}"
            )
        else:
            lines.append("verified      no (verify=False)")
        lines += [f"note          {note}" for note in self.notes]
        return "\n".join(lines)


def to_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    debug_info: bool = False,
    exporter: str = "auto",
) -> OnnxExportReport:
    """Export `model` (frozen first if it still has InRank layers) to an ONNX file.

    `exporter="dynamo"` uses torch.onnx's torch.export-based exporter. `"auto"` (the default)
    does the same, and where torch.export captured the model but torch.onnx could not translate
    the graph (an upstream limit; the models it was seen on are in docs/MODELS.md) exports
    with torch.onnx's TorchScript exporter instead, with a warning and the reason in the report's notes; `"torchscript"` uses that exporter
    alone. Either way the file is checked the same way. The file is written atomically (nothing
    is left at `path` if anything fails) and carries the per-layer ranks in its metadata_props
    under "inrank_fx.ranks". With `verify`, ONNX Runtime (CPU, and CUDA where available) runs
    the file on the example inputs and, with `dynamic_batch`, on a second batch size, and the
    outputs must match the frozen PyTorch model to `rtol` relative to the output's largest
    magnitude; otherwise ExportParityError says by how much they differ. The dynamo exporter's
    per-node debug metadata (Python stack traces with local paths, module hierarchy) is dropped
    unless `debug_info`: it can outweigh the weights of a small factored model.
    """
    if exporter not in EXPORTERS:
        raise InRankValueError(f"to_onnx: exporter={exporter!r}; expected one of {EXPORTERS}")
    missing = missing_modules({"onnx": "onnx", "onnxscript": "onnx",
                               **({"onnxruntime": "onnx"} if verify else {})})
    if missing:
        raise MissingDependencyError("to_onnx needs " + " and ".join(missing))
    path = check_destination(path)
    inputs = check_inputs(example_inputs)
    frozen = freeze(model)  # a copy: the caller's model keeps its mode and layers
    ranks, merged = frozen_ranks(frozen)
    report = OnnxExportReport(path, 0, count_params(frozen), ranks, merged, exporter=exporter)

    onnx_program = None
    if exporter != "torchscript":
        onnx_program = _dynamo_program(model, frozen, inputs, report, dynamic_batch=dynamic_batch,
                                       opset=opset, debug_info=debug_info)

    with atomic_destination(path) as tmp:
        if onnx_program is not None:
            onnx_program.save(tmp)
        else:
            try:
                report.opset = _torchscript_export(frozen, inputs, tmp, dynamic_batch, opset,
                                                   ranks)
            except ExportError as err:
                raise ExportError("; ".join([*report.notes[:1], str(err)])) from err
        if verify:
            _verify(frozen, inputs, tmp, dynamic_batch, rtol, report)
        written = list(tmp.parent.iterdir())
        report.file_bytes = sum(p.stat().st_size for p in written)
    return report


def _dynamo_program(model: nn.Module, frozen: nn.Module, inputs, report: OnnxExportReport, *,
                    dynamic_batch: bool, opset: int | None, debug_info: bool):
    """torch.onnx's torch.export-based translation of the frozen model, or None where it could
    not translate what torch.export captured and the report's exporter allows the TorchScript
    one (the report says why)."""
    with torch.no_grad():
        program = export_program(frozen, inputs, dynamic_batch)
    try:
        with _without_torchvision_notes():
            onnx_program = torch.onnx.export(
                program, inputs, dynamo=True, opset_version=opset, optimize=True, verbose=False
            )
    except Exception as err:  # torch.export took the model; its ONNX translation did not
        message = (f"torch.onnx could not translate {type(model).__name__} (traced by "
                   f"torch.export) to ONNX: {_root_cause(err)}")
        if report.exporter == "dynamo":
            raise ExportError(message + '; exporter="torchscript" may export it') from err
        report.exporter = "torchscript"
        report.notes.append(message + "; exported with the TorchScript exporter instead")
        warnings.warn(report.notes[-1], stacklevel=3)
        return None
    report.exporter = "dynamo"
    if not debug_info:
        _drop_node_metadata(onnx_program.model)
    onnx_program.model.metadata_props[RANKS_METADATA_KEY] = json.dumps(report.ranks)
    report.opset = _opset_of(onnx_program)
    return onnx_program


# torch.onnx's registry logs a warning for each torchvision op it skips when torchvision is not
# installed, at every export: noise about ops no inrank_fx model holds.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _DropTorchvisionNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def _without_torchvision_notes():
    logger, note_filter = logging.getLogger(_REGISTRY_LOGGER), _DropTorchvisionNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def _torchscript_export(frozen: nn.Module, inputs, file: Path, dynamic_batch: bool,
                        opset: int | None, ranks: dict[str, int]) -> int | None:
    """torch.onnx's TorchScript exporter (torch.jit.trace): for graphs torch.export captures but
    the dynamo exporter cannot translate. Returns the file's opset."""
    import onnx

    if dynamic_batch:
        _refuse_baked_sizes(frozen)
    names = [f"input_{i}" for i in range(len(inputs))]
    dynamic_axes = ({n: {0: "batch"} for n, x in zip(names, inputs) if x.dim()}
                    if dynamic_batch else None)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's notes on Python values it bakes in; the ONNX Runtime check at a
            # second batch size is what tells whether the trace generalises.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            root = _Called(frozen) if isinstance(frozen, torch.fx.GraphModule) else frozen
            torch.onnx.export(root, inputs, str(file), dynamo=False, input_names=names,
                              opset_version=opset, dynamic_axes=dynamic_axes)
    except Exception as err:
        raise ExportError(f"torch.onnx's TorchScript exporter could not export "
                          f"{type(frozen).__name__} either: {_root_cause(err)}") from err
    proto = onnx.load(str(file), load_external_data=False)
    onnx.helper.set_model_props(proto, {RANKS_METADATA_KEY: json.dumps(ranks)})
    onnx.save(proto, str(file))
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _refuse_baked_sizes(frozen: nn.Module) -> None:
    """torch.jit.trace turns a size that an aten graph reads (`aten.sym_size.int(x, 0)`, in a
    forward the pass captured with torch.export) into a constant: the file would run at the
    example's batch size only. Refuse, naming the node, before writing anything."""
    import torch.fx as fx

    for path, module in frozen.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", "") == "aten" \
                    and str(getattr(node.target, "__name__", "")).startswith("sym_"):
                raise ExportError(
                    f"torch.onnx's TorchScript exporter would bake the sizes that "
                    f"{repr(path) if path else 'the root module'} reads (node {node.name!r}, "
                    f"{node.target}; a forward captured by torch.export) into the file, which "
                    "would then run at the example's batch size only; pass dynamic_batch=False "
                    "for a file at that batch size")


class _Called(nn.Module):
    """The model as a child: the TorchScript exporter takes a root GraphModule (a rewritten root
    forward) for a ScriptModule and reads its `graph` as a TorchScript graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, *inputs):
        return self.model(*inputs)


def _root_cause(err: BaseException) -> str:
    """The innermost cause's message: the exporter's own wraps it in pages of advice."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def _drop_node_metadata(model) -> None:
    from onnx_ir.traversal import RecursiveGraphIterator

    for node in RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()


def _opset_of(onnx_program) -> int | None:
    return onnx_program.model.opset_imports.get("")


def _verify(frozen: nn.Module, inputs, file: Path, dynamic_batch: bool, rtol: float,
            report: OnnxExportReport) -> None:
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    batches = [inputs]
    if dynamic_batch and inputs[0].dim():
        first = inputs[0].shape[0]
        batches.append(second_batch(inputs, 3 if first != 3 else 2))
    worst_abs, worst_rel = 0.0, 0.0
    for provider in providers:
        session = ort.InferenceSession(str(file), providers=[provider])
        names = [i.name for i in session.get_inputs()]
        for batch in batches:
            with torch.no_grad():
                expected = flat_outputs(frozen(*batch))
            feed = {n: x.detach().cpu().numpy() for n, x in zip(names, batch)}
            got = [torch.from_numpy(o) for o in session.run(None, feed)]
            what = f"ONNX Runtime ({provider}, batch {batch[0].shape[0] if batch[0].dim() else 1})"
            max_abs, max_rel = compare(expected, got, what)
            if max_rel > rtol:
                raise ExportParityError(
                    f"{what} differs from the PyTorch model: max relative error {max_rel:.3e} "
                    f"(max abs {max_abs:.3e}) exceeds rtol={rtol:g}"
                )
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
    report.providers = providers
    report.batch_sizes = [b[0].shape[0] if b[0].dim() else 1 for b in batches]
    report.max_abs_error, report.max_rel_error = worst_abs, worst_rel
