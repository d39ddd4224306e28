"""The job behind `inrank-fx demo`: dense vs InRank on the same data, then ship it.

1. Train the demo GPT twice from the same seed on the same batches, both under torch.compile,
   each at the peak learning rate its own sweep chose (benchmarks/bench_convergence.py), with
   the same recipe (warm-up, cosine decay, clipping): dense, and InRank with the library's
   defaults: every layer starts at rank 2 from a truncated SVD of the GPT's own initialisation
   (spectral initialisation: both arms start from the same init scheme), ranks are measured by
   the InRank rule on optimizer steps and, once they have settled, fixed (adaptation stops, the buffer dropped)
   for the rest of the run.
2. Compare validation loss / perplexity, parameters, final ranks, wall-clock and tokens/s.
   Then what ships smaller: the trained dense model compressed to a budget
   (`inrank_fx.compress`, calibrated on training batches) and fine-tuned, against a narrower
   dense model of at least its size trained from scratch for as many steps in all.
3. Freeze the InRank model and the compressed one, export both to ONNX and verify them in ONNX
   Runtime.
4. Compare inference of the two models on every available backend (inrank_fx.tools.bench).
5. Write the report folder: results.json, ranks.csv, summary.txt, model.onnx, slim.onnx,
   dense.pt (the trained dense model, for `inrank-fx compress`) and PNG plots of the loss
   curves, the rank trajectories and the inference comparison. Everything is written to a
   temp folder first and renamed into place at the end, so an interruption leaves no half report.
"""
from __future__ import annotations

import collections
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import inrank_fx
from inrank_fx._io import atomic_folder
from inrank_fx._table import format_table
from inrank_fx._timing import median_ratio_interval, ratio_flags
from inrank_fx.demo.corpus import batches, file_corpus, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig, lm_loss, save_checkpoint
from inrank_fx.demo.slim import text_calibration
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine
from inrank_fx.export import to_onnx
from inrank_fx.tools import bench

from ..errors import InRankValueError


@dataclass(frozen=True)
class DemoSettings:
    """The demo's run. Both arms train with the same recipe (AdamW, linear warm-up over
    `warmup` steps, cosine decay to 10%, gradient norm clipped at 1), each at the peak learning
    rate that benchmarks/bench_convergence.py's sweep chose for it at this size."""

    gpt: GPTConfig
    batch_size: int
    steps: int
    warmup: int
    stop_after: int | str | None  # when InRank's ranks freeze (InRankConfig.stop_after)
    check_every: int
    eval_every: int
    eval_batches: int
    dense_lr: float
    inrank_lr: float
    corpus_bytes: int
    clip_norm: float = 1.0
    weight_decay: float = 0.1
    # What ships smaller: the trained dense model compressed to `budget` (its factored layers'
    # share of their dense parameters) and fine-tuned `finetune_steps` at `finetune_lr`, against
    # a narrower dense model of at least its size trained from scratch for as many steps in all
    # at `narrow_lr` (benchmarks/bench_slim.py's sweeps; docs/SLIM.md).
    budget: float = 0.4
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    narrow_lr: float = 8e-3


# Peak learning rates: each arm's own sweep. DEFAULT: `python benchmarks/bench_convergence.py`
# (dense 4e-3 of 5e-4..8e-3; InRank with the defaults 4e-3 of 2e-3..8e-3); QUICK:
# `python benchmarks/bench_convergence.py --quick --steps 200 --arms dense defaults` (2e-3, 8e-3).
DEFAULT = DemoSettings(
    gpt=GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
    batch_size=16, steps=2000, warmup=100, stop_after="settled", check_every=25, eval_every=200,
    eval_batches=16, dense_lr=4e-3, inrank_lr=4e-3, corpus_bytes=5_000_000,
)
QUICK = DemoSettings(
    gpt=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64),
    batch_size=8, steps=200, warmup=10, stop_after="settled", check_every=10, eval_every=50,
    eval_batches=6, dense_lr=2e-3, inrank_lr=8e-3, corpus_bytes=600_000, finetune_steps=30,
)


def settings_for(quick: bool = False, steps: int | None = None) -> DemoSettings:
    chosen = QUICK if quick else DEFAULT
    if steps is not None:
        if steps < 2:
            raise InRankValueError(f"--steps must be at least 2, got {steps}")
        stop = chosen.stop_after
        if isinstance(stop, int):
            stop = min(stop, max(1, steps // 2))
        chosen = replace(chosen, steps=steps, stop_after=stop,
                         warmup=min(chosen.warmup, steps // 10),
                         eval_every=min(chosen.eval_every, steps),
                         finetune_steps=max(1, round(0.15 * steps)))
    return chosen


def load_text(data: str | os.PathLike | None, max_bytes: int) -> tuple[bytes, str]:
    if data is None:
        return stdlib_corpus(max_bytes), "the Python standard library's .py sources"
    return file_corpus(data), str(data)


def run_demo(
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    device: str = "cpu",
    settings: DemoSettings = DEFAULT,
    seed: int = 0,
    compile: bool = True,
    progress: bool = True,
    backends=bench.BACKENDS,
    log=print,
) -> DemoResults:
    """Run the demo and write the report folder `out` (replacing an earlier one). Returns what
    it measured (`.to_json()`: what results.json holds)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    text, source = load_text(data, settings.corpus_bytes)
    train_ids, val_ids = split(text)
    device = torch.device(device)
    with atomic_folder(out) as tmp:
        results = _run(_Job(tmp, out, train_ids, val_ids, source, device, settings, seed,
                            compile, progress, tuple(backends), log))
    log(f"report written to {out}/")
    return results


@dataclass(frozen=True)
class _Job:
    """What every part of one demo run reads."""

    folder: Path  # the report being written (renamed to `out` at the end)
    out: Path
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    source: str  # where the text came from, in words
    device: torch.device
    settings: DemoSettings
    seed: int
    compile: bool
    progress: bool
    backends: tuple
    log: Callable


@dataclass
class Run:
    """One training of the demo: the model and what was measured (results.json holds all of it
    but the model)."""

    model: torch.nn.Module
    train_losses: list[float]
    params: int
    train_seconds: float  # every optimizer step, compilation included
    median_step_seconds: float
    step_seconds: list[float]
    step_flops: int  # one training step at the final ranks
    tokens_per_second: float
    val_curve: list[tuple[int, float]]
    val_loss: float
    val_ppl: float
    wall_seconds: float  # with evaluation; the step times hold the steps alone

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


@dataclass
class InRankRun(Run):
    """InRank trained from rank 2: also its final ranks and what the controller did."""

    final_ranks: dict[str, int] = field(default_factory=dict)
    rank_events: int = 0
    stop_step: int | None = None
    controller_seconds: float = 0.0


@dataclass(frozen=True)
class OnnxFile:
    """A model of the report exported to ONNX and checked in ONNX Runtime."""

    file: str
    file_bytes: int
    max_rel_error: float


@dataclass(frozen=True)
class ExportedOnnx(OnnxFile):
    parameters: int
    providers: list[str]
    batch_sizes: list[int]


@dataclass
class SlimRun(Run):
    """The trained dense model compressed to the budget and fine-tuned (`params`: as shipped,
    frozen)."""

    before_fine_tune: float = math.nan
    budget: float = 0.0
    fraction: float = 0.0
    final_ranks: dict[str, int] = field(default_factory=dict)
    onnx: OnnxFile | None = None

    def to_json(self) -> dict:
        return super().to_json() | {"onnx": asdict(self.onnx) if self.onnx else None}


@dataclass
class NarrowRun(Run):
    """A dense model of at least the slim one's size, trained from scratch for as many steps
    in all."""

    width: int = 0
    lr: float = 0.0
    steps: int = 0


@dataclass
class Ratios:
    """InRank over dense; `flags` read the steady step as a speedup, dense over InRank."""

    train_seconds: float
    steady_step_seconds: float
    steady_step_interval: list[float]  # its 90% bootstrap interval (runs timed one after another)
    val_loss: float
    params: float
    step_flops: float  # at the final ranks
    flags: list[str]


@dataclass
class DemoResults:
    """What the demo measured; `to_json()` is what results.json holds."""

    settings: DemoSettings
    device: str
    seed: int
    compile: bool
    data: str  # where the text came from, in words
    inrank_config: "inrank_fx.InRankConfig"
    dense: Run
    inrank: InRankRun
    ratios: Ratios
    slim: SlimRun
    narrow: NarrowRun
    onnx: ExportedOnnx
    inference: "bench.BenchResult"

    def to_json(self) -> dict:
        return {
            "settings": {**asdict(self.settings), "device": self.device, "seed": self.seed,
                         "compile": self.compile, "data": self.data,
                         "inrank_config": asdict(self.inrank_config)},
            "dense": self.dense.to_json(), "inrank": self.inrank.to_json(),
            "ratios": asdict(self.ratios), "slim": self.slim.to_json(),
            "narrow": self.narrow.to_json(), "onnx": asdict(self.onnx),
            "inference": {"meta": self.inference.meta,
                          "records": [asdict(r) for r in self.inference.records]},
        }


def _run(job: _Job) -> DemoResults:
    s, tmp = job.settings, job.folder
    job.log(f"data: {len(job.train_ids):,} training and {len(job.val_ids):,} validation bytes "
            f"from {job.source}")
    dense, inrank, controller = _train_both(job)
    save_checkpoint(dense.model, tmp / "dense.pt")  # for `inrank-fx compress --model`
    slim, narrow = _slim_and_narrow(dense.model, job)
    controller.to_csv(tmp / "ranks.csv")
    summary_text = str(inrank_fx.summary(inrank.model))

    example = (torch.randint(0, s.gpt.vocab_size, (1, s.gpt.block_size), device=job.device),)
    onnx_report = to_onnx(inrank.model, example, tmp / "model.onnx")
    job.log(f"\nONNX export of the InRank model:\n"
            f"{str(onnx_report).replace(str(tmp), str(job.out))}")
    slim_onnx = to_onnx(slim.model, example, tmp / "slim.onnx")
    slim.onnx = OnnxFile("slim.onnx", slim_onnx.file_bytes, slim_onnx.max_rel_error)

    bench_inputs = (torch.randint(0, s.gpt.vocab_size, (8, s.gpt.block_size), device=job.device),)
    comparison = bench.compare(dense.model, inrank.model, bench_inputs,
                               backends=job.backends, iters=10 if s is QUICK else 20)
    comparison.plot(tmp / "inference.png")

    onnx = ExportedOnnx("model.onnx", onnx_report.file_bytes, onnx_report.max_rel_error,
                        onnx_report.parameters, onnx_report.providers, onnx_report.batch_sizes)
    results = DemoResults(job.settings, str(job.device), job.seed, job.compile, job.source,
                          controller.config, dense, inrank, _ratios(dense, inrank), slim, narrow,
                          onnx, comparison)
    table = comparison_table(results) + "\n\n" + slim_table(results)
    text = "\n\n".join([table, summary_text, comparison.table()])
    (tmp / "summary.txt").write_text(text + "\n")
    (tmp / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    _plot_losses({"dense": dense, "inrank": inrank, "slim": slim, "narrow": narrow},
                 tmp / "loss_curves.png")
    _plot_ranks(controller.history, controller.start_ranks, controller.stop_step,
                tmp / "rank_trajectories.png")
    job.log("\n" + text)
    return results


def _train_both(job: _Job) -> tuple[Run, InRankRun, "inrank_fx.RankController"]:
    """Dense and InRank from the same seed, each at its own learning rate."""
    s = job.settings
    runs, controller = {}, None
    for name in ("dense", "inrank"):
        torch.manual_seed(job.seed)
        model = GPT(s.gpt)
        if name == "inrank":
            config = inrank_fx.InRankConfig(warmup_steps=s.check_every,
                                            check_every=s.check_every, stop_after=s.stop_after)
            model = inrank_fx.transform(model, config)
        model.to(job.device)
        lr = s.inrank_lr if name == "inrank" else s.dense_lr
        opt = recipe_optimizer(model.parameters(), lr, s.weight_decay)
        if name == "inrank":
            controller = inrank_fx.attach(model, opt, seed=job.seed)
        runs[name] = _train(name, model, opt, job, s)
    inrank = InRankRun(**vars(runs["inrank"]), final_ranks=inrank_fx.ranks(runs["inrank"].model),
                       rank_events=controller.rank_events, stop_step=controller.stop_step,
                       controller_seconds=controller.seconds)
    return runs["dense"], inrank, controller


def _ratios(dense: Run, inrank: InRankRun) -> Ratios:
    steady = inrank.median_step_seconds / dense.median_step_seconds
    interval = list(median_ratio_interval(inrank.step_seconds, dense.step_seconds))
    flops = inrank.step_flops / dense.step_flops
    return Ratios(train_seconds=inrank.train_seconds / dense.train_seconds,
                  steady_step_seconds=steady, steady_step_interval=interval,
                  val_loss=inrank.val_loss / dense.val_loss, params=inrank.params / dense.params,
                  step_flops=flops,
                  flags=ratio_flags(1 / steady, _inverted(interval), ideal=1 / flops))


def _train(name: str, model, opt, job: _Job, s: DemoSettings) -> Run:
    """Train `model` for `s.steps` (the settings of this part of the job), evaluating every
    `s.eval_every`; its measurements."""
    from tqdm.auto import tqdm

    forward = torch.compile(model) if job.compile else model
    stream = batches(job.train_ids, s.gpt.block_size, s.batch_size,
                     torch.Generator().manual_seed(job.seed))
    val_curve = []
    bar = tqdm(total=s.steps, desc=f"{name:>6}", unit="step", disable=not job.progress,
               leave=True)

    def loss_of(x, y):
        return lm_loss(forward(x.to(job.device)), y.to(job.device))

    recent = collections.deque(maxlen=50)  # one batch's loss is noisy: show a mean

    def on_step(step, loss):
        bar.update(1)
        recent.append(loss)
        if step % 5 == 0 or step == s.steps:
            postfix = {f"train loss (mean of last {len(recent)})": f"{statistics.mean(recent):.3f}"}
            layers = inrank_fx.ranks(model)
            if layers:
                postfix["mean rank"] = f"{statistics.mean(layers.values()):.1f}"
            bar.set_postfix(postfix, refresh=False)
        if step % s.eval_every == 0 or step == s.steps:
            val_curve.append((step, evaluate(model, job.val_ids, s.gpt.block_size, job.seed + 1,
                                             s.eval_batches, batch=s.batch_size)))

    start = time.perf_counter()
    losses, seconds = train_steps(model, opt, stream, s.steps, loss_of=loss_of, on_step=on_step,
                                  scheduler=warmup_cosine(opt, s.steps, s.warmup),
                                  clip_norm=s.clip_norm)
    wall = time.perf_counter() - start  # with evaluation; `seconds` holds the steps alone
    bar.close()
    return Run(model=model, **_measurements(model, s, job.device, stream, losses, seconds),
               val_curve=val_curve, val_loss=val_curve[-1][1],
               val_ppl=math.exp(val_curve[-1][1]), wall_seconds=wall)


def _measurements(model, s: DemoSettings, device, stream, losses, seconds) -> dict:
    x, y = next(stream)
    with FlopCounterMode(display=False) as counter:  # one training step at the final ranks
        lm_loss(model(x.to(device)), y.to(device)).backward()
    model.zero_grad(set_to_none=True)
    tokens = s.steps * s.batch_size * s.gpt.block_size
    return {
        "train_losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(seconds),  # every optimizer step, compilation included
        "median_step_seconds": statistics.median(seconds),
        "step_seconds": seconds,
        "step_flops": counter.get_total_flops(),
        "tokens_per_second": tokens / sum(seconds),
    }


def _slim_and_narrow(dense_model, job: _Job) -> tuple[SlimRun, NarrowRun]:
    """The trained dense model compressed to the budget (calibrated on training batches) and
    fine-tuned, and a dense model of at least its shipped size trained from scratch for the
    dense model's steps plus the fine-tune's."""
    s, seed = job.settings, job.seed
    calibration = [x.to(job.device)
                   for x in text_calibration(job.train_ids, s.gpt.block_size, seed=seed)]
    model = inrank_fx.compress(dense_model, s.budget, calibration)
    before = evaluate(model, job.val_ids, s.gpt.block_size, seed + 1, s.eval_batches,
                      batch=s.batch_size)
    tune = replace(s, steps=s.finetune_steps, warmup=max(1, s.finetune_steps // 20),
                   eval_every=s.finetune_steps)
    opt = recipe_optimizer(model.parameters(), s.finetune_lr, s.weight_decay)
    trained = vars(_train("slim", model, opt, job, tune))
    trained["params"] = sum(p.numel() for p in inrank_fx.freeze(model).parameters())  # shipped
    slim = SlimRun(**trained, before_fine_tune=before, budget=s.budget,
                   fraction=model._inrank_report.compression.fraction,
                   final_ranks=inrank_fx.ranks(model))
    width = narrow_width(s.gpt, slim.params)
    total = s.steps + s.finetune_steps
    wide = replace(s, gpt=replace(s.gpt, n_embd=width), steps=total,
                   warmup=round(s.warmup * total / s.steps))
    torch.manual_seed(seed)
    model = GPT(wide.gpt).to(job.device)
    opt = recipe_optimizer(model.parameters(), s.narrow_lr, s.weight_decay)
    narrow = NarrowRun(**vars(_train("narrow", model, opt, job, wide)), width=width,
                       lr=s.narrow_lr, steps=total)
    return slim, narrow


def narrow_width(gpt: GPTConfig, params: int) -> int:
    """The narrowest width (a multiple of the head count) whose GPT holds at least `params`."""
    width = gpt.n_head
    while sum(p.numel() for p in GPT(replace(gpt, n_embd=width)).parameters()) < params:
        width += gpt.n_head
    return width


def slim_table(results: DemoResults) -> str:
    """What ships smaller: the compressed dense model against a dense model of its size."""
    dense, inrank, slim, narrow = results.dense, results.inrank, results.slim, results.narrow
    s = results.settings
    base = dense.params
    rows = [
        ("dense (above)", f"{dense.params:,}", "1.000", f"{dense.val_loss:.4f}", f"{s.steps}"),
        ("InRank from rank 2 (above)", f"{inrank.params:,}", f"{inrank.params / base:.3f}",
         f"{inrank.val_loss:.4f}", f"{s.steps}"),
        (f"dense, width {narrow.width}, from scratch", f"{narrow.params:,}",
         f"{narrow.params / base:.3f}", f"{narrow.val_loss:.4f}", f"{narrow.steps}"),
        (f"dense compressed to {slim.budget:g} + fine-tune", f"{slim.params:,}",
         f"{slim.params / base:.3f}", f"{slim.val_loss:.4f}", f"{s.steps} + {s.finetune_steps}"),
    ]
    gap = slim.val_loss - narrow.val_loss
    notes = [f"the compressed model, {slim.before_fine_tune:.4f} right after compress(), is "
             f"{abs(gap):.4f} nats {'below' if gap < 0 else 'ABOVE'} the dense model of at "
             f"least its size trained from scratch (lr {narrow.lr:g}); compress + fine-tune "
             f"at lr {s.finetune_lr:g}, ranks fixed; it ships as slim.onnx"]
    return "\n".join([format_table(("what ships", "parameters", "/ dense", "val loss", "steps"),
                                    rows), *notes])


def comparison_table(results: DemoResults) -> str:
    dense, inrank, ratios, s = results.dense, results.inrank, results.ratios, results.settings
    ranks = list(inrank.final_ranks.values())
    low, high = ratios.steady_step_interval
    stop = inrank.stop_step
    header = ("", "dense", "InRank", "InRank / dense")
    rows = [
        ("peak lr (own sweep)", f"{s.dense_lr:g}", f"{s.inrank_lr:g}", ""),
        ("val loss", f"{dense.val_loss:.4f}", f"{inrank.val_loss:.4f}", f"{ratios.val_loss:.3f}"),
        ("val perplexity", f"{dense.val_ppl:.3f}", f"{inrank.val_ppl:.3f}", ""),
        ("parameters", f"{dense.params:,}", f"{inrank.params:,}", f"{ratios.params:.3f}"),
        ("all steps, compiles incl. (s)", f"{dense.train_seconds:.1f}",
         f"{inrank.train_seconds:.1f}", f"{ratios.train_seconds:.3f}"),
        ("median step, steady (ms)", f"{dense.median_step_seconds * 1e3:.1f}",
         f"{inrank.median_step_seconds * 1e3:.1f}",
         f"{ratios.steady_step_seconds:.3f} ({low:.3f}-{high:.3f}){' !' if ratios.flags else ''}"),
        ("tokens / s", f"{dense.tokens_per_second:,.0f}", f"{inrank.tokens_per_second:,.0f}", ""),
        ("final ranks", "full", f"{min(ranks)}..{max(ranks)} (mean {statistics.mean(ranks):.1f})", ""),
        ("adaptation stopped at step", "", "never" if stop is None else str(stop), ""),
    ]
    notes = ["all steps: every optimizer step's wall-clock, torch.compile's first compile and "
             "InRank's recompiles after rank changes included (evaluation excluded); median "
             "step: a steady-state step, compiles aside",
             "ratios of wall-clock medians carry their 90% bootstrap interval; a training step "
             f"of InRank at its final ranks costs {ratios.step_flops:.3f}x dense's FLOPs"]
    notes += [f"! median step, as a speedup: {flag}" for flag in ratios.flags]
    return "\n".join([format_table(header, rows), *notes])


def _inverted(interval: tuple[float, float]) -> tuple[float, float]:
    return 1 / interval[1], 1 / interval[0]


def _plot_losses(runs: dict[str, Run], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    colours = {"dense": "#8a8a8a", "inrank": "#2a7ab9", "narrow": "#d98c1f", "slim": "#2a9a4a"}
    for name in [n for n in colours if n in runs]:
        offset = len(runs["dense"].train_losses) if name == "slim" else 0  # after dense
        losses = runs[name].train_losses
        window = max(1, len(losses) // 30)
        smooth = [statistics.mean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
        ax.plot(range(offset + 1, offset + len(losses) + 1), smooth, color=colours[name], lw=1.2,
                label=f"{name} train")
        steps, vals = zip(*runs[name].val_curve)
        ax.plot([offset + step for step in steps], vals, "o--", color=colours[name], ms=4,
                label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("demo GPT, each at its tuned learning rate (slim: dense compressed, fine-tuned)",
                 fontsize=9)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_ranks(history: list[dict], start_ranks: dict, stop_step: int | None,
                path: Path) -> None:
    """One line per layer, coloured by layer kind (the name with its block index taken out:
    attention in, attention out, MLP in, MLP out), the highest and lowest final rank labelled."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.0))
    ax = fig.subplots()
    layers = list(dict.fromkeys(h["layer"] for h in history))
    kinds = list(dict.fromkeys(map(layer_kind, layers)))
    colours = matplotlib.colormaps["tab10"]
    finals = {}
    for layer in layers:
        points = [(0, start_ranks[layer])] + [(h["step"], h["rank"]) for h in history
                                              if h["layer"] == layer]
        steps, ranks = zip(*points)
        finals[layer] = (steps[-1], ranks[-1])
        kind = kinds.index(layer_kind(layer))
        ax.step(steps, ranks, where="post", color=colours(kind % 10), lw=1, alpha=0.8)
    for kind, name in enumerate(kinds):  # one legend entry per kind
        ax.plot([], [], color=colours(kind % 10), lw=2,
                label=f"{name} ({sum(layer_kind(l) == name for l in layers)})")
    if finals:
        for layer in {max(finals, key=lambda l: finals[l][1]), min(finals, key=lambda l: finals[l][1])}:
            step, rank = finals[layer]
            ax.annotate(f"{layer}: {rank}", (step, rank), fontsize=7, ha="right",
                        va="bottom", xytext=(-2, 2), textcoords="offset points")
    if stop_step is not None:  # where adaptation stopped (a fixed step, or where ranks settled)
        ax.axvline(stop_step, color="#aa3333", ls=":", lw=1)
        ax.text(stop_step, ax.get_ylim()[1], " adaptation stopped", color="#aa3333", va="top",
                fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank")
    ax.set_title(f"rank trajectories of {len(layers)} factored layers, by kind", fontsize=10)
    ax.legend(frameon=False, fontsize=7, loc="upper left", title="layer kind (count)",
              title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def layer_kind(name: str) -> str:
    """A layer's name with its block indices replaced by '*': transformer.h.3.mlp.c_fc →
    transformer.h.*.mlp.c_fc, the same for every block."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))
