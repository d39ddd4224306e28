"""`compare`: dense against factored, side by side in one process, on every available backend.

    result = inrank_fx.bench.compare(dense, factored, (x,))
    print(result.table()); result.to_json("bench.json"); result.plot("bench.png")

For each model and backend: latency median, p10 and p90 after warm-up, throughput, peak memory
where the backend reports it (CUDA), parameters, FLOPs (counted by torch.utils.flop_counter while
the model runs: per-op formulas, no hand tables), artifact size for exported backends, and for the
factored model the measured speedup with its 90% bootstrap interval next to the FLOP-ideal one.
Dense and factored calls alternate within one timing loop, so that load on the machine falls on
both alike; a speedup above its FLOP-ideal or with a wide interval carries a flag saying why it
should not be trusted. Backends that cannot run here (no CUDA, no torch-tensorrt, an
inference-only backend in train mode) are records with status "skipped" and the reason.
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._flops import counted_forward
from .._io import atomic_destination, check_destination
from .._table import format_table
from .._timing import format_rate, median_ratio_interval, ratio_flags
from ..errors import InRankValueError
from ..export import check_inputs, flat_outputs
from ..export.freeze import freeze
from ..vocabulary import BACKENDS

INFERENCE_ONLY = ("onnxruntime", "tensorrt")


@dataclass
class BenchRecord:
    model: str  # "dense" or "factored"
    backend: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    mode: str = "inference"
    batch: int = 0
    latency_median_ms: float | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    throughput: float | None = None  # samples (rows of the batch dimension) per second
    peak_memory_bytes: int | None = None
    params: int = 0
    flops: int = 0  # per call (forward, or forward + backward in train mode)
    artifact_bytes: int | None = None
    speedup: float | None = None  # dense latency / factored latency, same backend
    speedup_interval: tuple[float, float] | None = None  # 90% bootstrap interval of `speedup`
    flop_ideal_speedup: float | None = None
    flags: list[str] = field(default_factory=list)  # why `speedup` should not be trusted


@dataclass
class BenchResult:
    records: list[BenchRecord]
    meta: dict = field(default_factory=dict)

    def get(self, model: str, backend: str) -> BenchRecord:
        return next(r for r in self.records if r.model == model and r.backend == backend)

    def table(self) -> str:
        header = ("backend", "model", "median ms", "p10-p90 ms", "samples/s", "peak MB",
                  "params", "GFLOPs", "file MB", "speedup (90% CI)", "FLOP-ideal", "")
        rows, notes = [], []
        for r in self.records:
            if r.status != "ok":
                notes.append(f"{r.backend} {r.model}: {r.status}: {r.reason}")
                continue
            notes += [f"! {r.backend}: {flag}" for flag in r.flags]
            rows.append((
                r.backend, r.model, f"{r.latency_median_ms:.2f}",
                f"{r.latency_p10_ms:.2f}-{r.latency_p90_ms:.2f}",
                format_rate(r.throughput), _fmt(r.peak_memory_bytes, 1e6), f"{r.params:,}",
                f"{r.flops / 1e9:.3f}", _fmt(r.artifact_bytes, 1e6), _speedup_text(r),
                f"{r.flop_ideal_speedup:.2f}x" if r.flop_ideal_speedup else "",
                "!" if r.flags else "",
            ))
        meta = ", ".join(f"{k} {v}" for k, v in self.meta.items())
        return "\n".join([format_table(header, rows, left=2), *notes, f"({meta})"])

    def to_json(self, path: str | os.PathLike) -> Path:
        path = check_destination(path)
        with atomic_destination(path) as tmp:
            tmp.write_text(json.dumps({"meta": self.meta, "records": [asdict(r) for r in self.records]}, indent=2))
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """Grouped bars of throughput per backend, dense beside factored, speedups annotated."""
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

        path = check_destination(path)
        backends = [b for b in dict.fromkeys(r.backend for r in self.records)
                    if all(self.get(m, b).status == "ok" for m in ("dense", "factored"))]
        fig = Figure(figsize=(1.8 + 1.6 * max(len(backends), 1), 3.9))
        ax = fig.subplots()
        for i, model in enumerate(("dense", "factored")):
            values = [self.get(model, b).throughput for b in backends]
            bars = ax.bar([x + (i - 0.5) * 0.38 for x in range(len(backends))], values, 0.38,
                          label=model, color=("#8a8a8a", "#2a7ab9")[i])
            if model == "factored":
                for bar, b in zip(bars, backends):
                    r = self.get(model, b)
                    low, high = r.speedup_interval
                    ax.annotate(f"{r.speedup:.2f}x{' (!)' if r.flags else ''}\n"
                                f"[{low:.2f}-{high:.2f}]\nideal {r.flop_ideal_speedup:.1f}x",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7,
                                color="#aa3333" if r.flags else "black")
        ax.set_xticks(range(len(backends)), backends)
        ax.set_ylabel("samples / s")
        ax.set_title(f"dense vs factored, {self.meta.get('mode', '')}, batch "
                     f"{self.meta.get('batch', '')}", loc="left", fontsize=10)
        ax.margins(y=0.35)
        ax.legend(frameon=False, loc="lower right", bbox_to_anchor=(1, 1), ncol=2, fontsize=8)
        left_out = [f"{b} ({self.get('factored', b).reason or self.get('dense', b).reason})"
                    for b in dict.fromkeys(r.backend for r in self.records) if b not in backends]
        footer = "speedup [90% bootstrap interval]; (!) flagged, see the table"
        if left_out:
            footer += "\nnot run: " + "; ".join(left_out)
        fig.text(0.01, 0.01, footer, fontsize=6.5, va="bottom", color="#555555", wrap=True)
        fig.tight_layout(rect=(0, 0.07 + 0.03 * bool(left_out), 1, 1))
        with atomic_destination(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        return path


def compare(
    dense_model: nn.Module,
    factored_model: nn.Module,
    example_inputs,
    *,
    backends=BACKENDS,
    train: bool = False,
    warmup: int = 3,
    iters: int = 20,
    loss_fn: Callable[[object], torch.Tensor] | None = None,
) -> BenchResult:
    """Time both models on each backend, side by side. See the module docstring.

    Inference uses the frozen form of the factored model (what ships). `train=True` times a full
    training step (forward, backward, AdamW step) of the models as given, on eager and compile.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InRankValueError(f"unknown backend(s) {unknown}; choose from {BACKENDS}")
    inputs = check_inputs(example_inputs)
    device = inputs[0].device
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    mode = "train" if train else "inference"
    models = {"dense": dense_model, "factored": factored_model}
    if not train:
        models = {k: freeze(m) for k, m in models.items()}  # copies, in eval mode
    else:
        models = {k: copy.deepcopy(m).train() for k, m in models.items()}
    models = {k: m.to(device) for k, m in models.items()}
    loss_fn = loss_fn or _default_loss
    flops = {k: _count_flops(m, inputs, train, loss_fn) for k, m in models.items()}

    records = []
    with tempfile.TemporaryDirectory(prefix="inrank-bench-") as workdir:
        for backend in backends:
            pair, steps = {}, {}
            for name, model in models.items():
                pair[name] = BenchRecord(name, backend, "ok", mode=mode, batch=batch,
                                         params=sum(p.numel() for p in model.parameters()),
                                         flops=flops[name])
                steps[name] = _prepared_step(pair[name], model, inputs, Path(workdir), train,
                                             loss_fn, warmup=warmup)
                records.append(pair[name])
            ok = [name for name in models if pair[name].status == "ok"]
            times, peaks = _time_alternating({name: steps[name] for name in ok}, iters,
                                             device.type == "cuda" and backend != "onnxruntime")
            for name in ok:
                _record_times(pair[name], times[name], peaks.get(name))
            _record_speedup(pair["dense"], pair["factored"], times)
    meta = {"mode": mode, "batch": batch, "device": _device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    return BenchResult(records, meta)


def _prepared_step(record: BenchRecord, model, inputs, workdir: Path, train: bool, loss_fn, *,
                   warmup: int):
    """The model's step on the record's backend, run `warmup` times; None where the backend
    skipped or failed (the record says which, and why)."""
    try:
        step = _backend_step(record, model, inputs, workdir, train, loss_fn)
        for _ in range(warmup):  # compilation, allocation, ORT's first run
            step()
        return step
    except _Skip as skip:
        record.status, record.reason = "skipped", str(skip)
    except Exception as err:  # a backend failing is a result, not a crash
        record.status = "failed"
        record.reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return None


def _record_speedup(dense: BenchRecord, factored: BenchRecord, times: dict) -> None:
    if not dense.status == factored.status == "ok":
        return
    factored.speedup = dense.latency_median_ms / factored.latency_median_ms
    factored.speedup_interval = median_ratio_interval(times["dense"], times["factored"])
    factored.flop_ideal_speedup = dense.flops / factored.flops if factored.flops else None
    factored.flags = ratio_flags(factored.speedup, factored.speedup_interval,
                                 factored.flop_ideal_speedup)


class _Skip(Exception):
    pass


def _default_loss(output) -> torch.Tensor:
    return flat_outputs(output)[0].float().pow(2).mean()


def _count_flops(model, inputs, train, loss_fn) -> int:
    if not train:
        return counted_forward(model, inputs).get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(*inputs)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _backend_step(record, model, inputs, workdir, train, loss_fn) -> Callable[[], None]:
    """One timed call of `model` on `record.backend` (a training step with `train`)."""
    backend = record.backend
    if train and backend in INFERENCE_ONLY:
        raise _Skip("inference-only backend")
    if backend == "eager":
        call = model
    elif backend == "compile":
        call = torch.compile(model)
    elif backend == "onnxruntime":
        call = _onnxruntime_call(record, model, inputs, workdir)
    else:
        call = _tensorrt_call(record, model, inputs, workdir)

    if train:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = loss_fn(call(*inputs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        def step():
            with torch.no_grad():
                call(*inputs)
    return step


def _time_alternating(steps: dict, iters: int, cuda: bool) -> tuple[dict, dict]:
    """Seconds of `iters` calls of each step, the steps taking turns (their order reversed every
    round), so that a burst of load on the machine lands on all of them alike; and on CUDA each
    step's peak memory. Returns ({name: seconds}, {name: peak bytes})."""
    times = {name: [] for name in steps}
    peaks = {}
    names = list(steps)
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
    return times, peaks


def _record_times(record, times: list[float], peak: int | None) -> None:
    record.latency_median_ms = statistics.median(times) * 1e3
    if len(times) > 1:
        deciles = statistics.quantiles(times, n=10)
        record.latency_p10_ms, record.latency_p90_ms = deciles[0] * 1e3, deciles[-1] * 1e3
    else:
        record.latency_p10_ms = record.latency_p90_ms = record.latency_median_ms
    record.throughput = record.batch / (record.latency_median_ms / 1e3)
    record.peak_memory_bytes = peak


def _onnxruntime_call(record, model, inputs, workdir):
    try:
        import onnxruntime as ort
    except ImportError:
        raise _Skip("onnxruntime is not installed (pip install 'inrank-fx[onnx]')") from None
    from ..export.onnx import to_onnx

    path = workdir / f"{record.model}.onnx"
    report = to_onnx(model, inputs, path)
    record.artifact_bytes = report.file_bytes
    providers = ["CPUExecutionProvider"]
    if inputs[0].is_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return lambda *_: session.run(None, feed)


def _tensorrt_call(record, model, inputs, workdir):
    from ..export.tensorrt import tensorrt_missing, to_tensorrt

    missing = tensorrt_missing()
    if missing:
        raise _Skip("needs " + " and ".join(missing))
    path = workdir / f"{record.model}.ep"
    report = to_tensorrt(model, inputs, path, precision="fp16")
    record.artifact_bytes = report.file_bytes
    program = torch.export.load(str(path)).module()
    half = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    return lambda *_: program(*half)


def _device_name(device: torch.device) -> str:
    """The accelerator's or CPU's model name (not the architecture)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU's marketing name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _speedup_text(record: BenchRecord) -> str:
    if not record.speedup:
        return ""
    low, high = record.speedup_interval  # set with the speedup
    return f"{record.speedup:.2f}x ({low:.2f}-{high:.2f})"


def tune_cpu_allocator() -> bool:
    """Keep glibc from returning large freed blocks to the OS, as tcmalloc/jemalloc setups do.

    Otherwise every large output tensor is fresh memory whose page faults are paid on first
    touch (docs/RESULTS.md, "Inference timing on CPU", says how much), a cost the same for
    dense and factored layers that hides the factored layer's speedup. Returns whether it
    applied.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))


def _fmt(value, scale) -> str:
    return "" if value is None else f"{value / scale:.2f}"
