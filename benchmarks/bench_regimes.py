"""InRank from scratch against the narrower dense model: on the convergence protocol, across
learning rates, in a data-limited regime and as the width grows.

    python benchmarks/bench_regimes.py [--parts frontier lr-grid data-limited width closing]
                                       [--seeds 0 1] [--widths 64 96 192] [--limited-bytes N]
                                       [--json-dir DIR] [--plot FILE.png] [--quick]

Every part trains bench_convergence's GPT with its recipe (AdamW, warm-up + cosine, clipping,
every arm at the peak learning rate its own sweep chose on the first seed) and reads each
from-scratch arm against **the dense-width frontier**: dense GPTs of every width (32 .. 128,
n_head 4) trained the same way, loss against shipped parameters and against training FLOPs,
interpolated in log(parameters) between the widths of the same seed.

- frontier: the protocol of bench_convergence (4 layers, n_embd 128, 2000 steps, the 4.7 MB
  stdlib corpus: under half an epoch). The fixed-rank arms and InRank's defaults against the
  narrower dense models. Runs bench_convergence already measured (its --json file,
  docs/convergence.json) are read, not repeated.
- lr-grid: the fixed-rank frontier and the defaults at every peak learning rate of a grid
  (one shared rate for every arm), so the gap to each frontier is read at every rate.
- data-limited: the paper's regime. A 30 kB corpus (27 kB for training) read 38 times in 1000
  steps, so that a dense model overfits within the run (`--limited-bytes` another size: 100 kB
  is read 11 times and does not overfit); every arm read at its best validation checkpoint
  (early stopping for all), the dense models (width 128 and the narrower ones) with their
  regularisation tuned after their learning rate (dropout 0.1 / 0.2 / 0.3, weight decay 1.0),
  InRank's defaults and InRank-Efficient (ranks adapting for the first 130 steps only) without.
- width: the protocol at n_embd 64, 96 and 192 (steps, batch and context held, so every width
  reads the same 2 M tokens and tokens per parameter fall with width): dense of that width and
  of 1/2 and 3/4 of it, fixed ranks 1/4 and 1/2, the defaults. The gaps at 128 come from the
  frontier part.
- closing: levers that might close the gap, on the defaults at their own rate: the factors
  (U, V) trained at 0.5x and 2x the rest's learning rate (a per-factor rate); U alone at 2x and
  4x (μP's direction: U's fan-in is the rank, V's the input's); components a check adds
  started along the weight gradient's top singular directions (GradMax,
  benchmarks/gradient_growth.py); CoLA's form (SiLU between the factors) with its own rank
  signal at α 0.9, at its own rate (its own sweep).

Prints a table per part. `--json-dir` keeps every run (one file per protocol, read back on the
next call, so an interrupted run resumes); `--plot` draws the parts that have run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import (  # noqa: E402
    ARMS,
    QUICK as QUICK_PROTOCOL,
    Arm,
    Protocol,
    Runs,
    gap_to,
    tune,
)
from inrank_fx.demo.corpus import split, stdlib_corpus  # noqa: E402

WIDTHS = (32, 48, 64, 80, 96, 112, 128)  # the dense-width frontier at width 128
DENSE_LRS = (2e-3, 4e-3, 8e-3)
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
REGULARISERS = (("dropout", 0.1), ("dropout", 0.2), ("dropout", 0.3), ("weight_decay", 1.0))
FROM_SCRATCH = ("fixed-1/16", "fixed-1/8", "fixed-1/4", "fixed-1/2", "defaults")
WIDTH_ARMS = ("defaults", "fixed-1/4", "fixed-1/2")
FACTOR_LRS = (0.5, 2.0)  # the closing part: the factors' rate relative to the rest's
U_LRS = (2.0, 4.0)  # the closing part: U's rate relative to V's and the rest's
SILU_ALPHAS = (0.9,)  # the closing part: CoLA's form, its rank signal at these α


@dataclass(frozen=True)
class Setting:
    """Everything a run of this benchmark depends on besides the seeds."""

    protocol: Protocol = field(default_factory=Protocol)
    # 30 kB (27 kB for training) read 38 times in 1000 steps: dense overfits within the run
    data_limited: Protocol = field(default_factory=lambda: Protocol(steps=1000,
                                                                    corpus_bytes=30_000,
                                                                    evals=20))
    widths: tuple = WIDTHS
    trend: tuple = (64, 96, 192)  # the other widths of the width part (128 is the protocol's)
    dense_lrs: tuple = DENSE_LRS
    lr_grid: tuple = LR_GRID
    regularisers: tuple = REGULARISERS
    width_arms: tuple = WIDTH_ARMS  # the from-scratch arms of the width part
    extensions: int = 2  # how often a sweep may extend past a winning edge
    factor_lrs: tuple = FACTOR_LRS
    u_lrs: tuple = U_LRS
    silu_alphas: tuple = SILU_ALPHAS
    factored_lrs: tuple | None = None  # replaces every factored arm's sweep (quick)


QUICK = Setting(
    protocol=QUICK_PROTOCOL,
    data_limited=replace(QUICK_PROTOCOL, corpus_bytes=20_000, evals=4),
    widths=(32, 48, 64), trend=(32,), dense_lrs=(4e-3,), lr_grid=(4e-3,),
    regularisers=(("dropout", 0.1),), extensions=0, factored_lrs=(4e-3,))


# -- arms ---------------------------------------------------------------------------------------

def width_scaled(lrs: tuple, width: int, reference: int) -> tuple:
    """A sweep moved to another width: scaled by the power of two nearest reference / width
    (the best rate falls as a model widens; the sweep extends past an edge that wins)."""
    factor = 2.0 ** round(math.log2(reference / width))
    return tuple(float(f"{lr * factor:.3g}") for lr in lrs)


def at_width(arm: Arm, width: int, reference: int) -> Arm:
    """The arm on a GPT of another width (its name says which), its sweep moved with it."""
    return replace(arm, name=f"{arm.name}-w{width}", width=width,
                   lrs=width_scaled(arm.lrs, width, reference))


def dense_at(width: int, reference: int, lrs: tuple) -> Arm:
    """Dense of this width, the sweep `lrs` (for width `reference`) moved to it; at the
    reference width, bench_convergence's own dense arm (its runs are shared)."""
    lrs = width_scaled(lrs, width, reference)
    if width == reference:
        return replace(ARMS["dense"], lrs=lrs, width=width)
    return Arm(f"dense-w{width}", "dense", lrs=lrs, width=width)


def regularised(arm: Arm, what: str, value: float) -> Arm:
    short = {"dropout": "do", "weight_decay": "wd"}[what]
    return replace(arm, name=f"{arm.name} {short}{value:g}", **{what: value})


def efficient() -> Arm:
    """InRank-Efficient's schedule: ranks adapt over the first 130 optimizer steps, then each
    layer is truncated to its rank and trains at it."""
    return Arm("efficient-130", "inrank", dict(stop_after=130))


# -- running ------------------------------------------------------------------------------------

class Regime:
    """One protocol's runs (kept in `path`): arms tuned on the first seed, then run on all."""

    def __init__(self, protocol: Protocol, setting: Setting, path: str | None,
                 best_checkpoint: bool = False, log=print):
        self.protocol, self.setting, self.best_checkpoint = protocol, setting, best_checkpoint
        self.data = split(stdlib_corpus(protocol.corpus_bytes))
        self.runs = Runs(protocol, self.data, path, log=log)
        self.chosen: dict[str, float] = {}
        self.sweeps: dict[str, dict] = {}
        self.variant: dict[str, Arm] = {}

    def loss(self, r: dict) -> float:
        value = min(v for _, v in r["curve"]) if self.best_checkpoint else r["val"]
        return value if r["finite"] and math.isfinite(value) else math.inf

    def tuned(self, arm: Arm, seeds, regularise: bool = False) -> list[dict]:
        """The arm at its own learning rate (and, with `regularise`, the regulariser that wins
        at that rate, or none), run on every seed; its runs named after the arm."""
        first = seeds[0]
        if arm.kind != "dense" and self.setting.factored_lrs:
            arm = replace(arm, lrs=self.setting.factored_lrs)
        if arm.name not in self.chosen:
            lr, sweep = tune(arm, lambda lr: self.loss(self.runs.get(arm, lr, first)),
                             max_extensions=self.setting.extensions)
            self.chosen[arm.name], self.sweeps[arm.name] = lr, sweep
            best = arm
            if regularise:
                for what, value in self.setting.regularisers:
                    candidate = regularised(arm, what, value)
                    if self.loss(self.runs.get(candidate, lr, first)) < \
                            self.loss(self.runs.get(best, lr, first)):
                        best = candidate
            self.variant[arm.name] = best
        lr, best = self.chosen[arm.name], self.variant[arm.name]
        return [self.read(self.runs.get(best, lr, seed), arm.name) for seed in seeds]

    def at_lr(self, arm: Arm, lr: float, seeds) -> list[dict]:
        return [self.read(self.runs.get(arm, lr, seed), arm.name) for seed in seeds]

    def read(self, r: dict, name: str) -> dict:
        """The run as this regime reads it: at its best checkpoint or at the end."""
        out = {**r, "arm": name, "variant": r["arm"], "val_end": r["val"]}
        if self.best_checkpoint:
            step, val = min(r["curve"], key=lambda p: p[1])
            out.update(val=val, best_step=step)
        return out

    def frontier(self, widths, seeds, regularise: bool = False) -> list[dict]:
        """The dense-width frontier: every width at its own learning rate, every seed."""
        return [r | {"width": w} for w in widths
                for r in self.tuned(self.dense_arm(w), seeds, regularise)]

    def dense_arm(self, width: int) -> Arm:
        return dense_at(width, self.protocol.gpt.n_embd, self.setting.dense_lrs)

    def save(self) -> None:
        self.runs.save({"chosen": self.chosen,
                        "sweeps": {a: {str(lr): v for lr, v in s.items()}
                                   for a, s in self.sweeps.items()},
                        "variants": {a: v.name for a, v in self.variant.items()}})


def seeded_from(path: str | None, source: str, protocol: Protocol, log=print) -> None:
    """Start `path` from `source` (bench_convergence's --json file) when it measured the same
    protocol: its runs are this benchmark's runs too."""
    if not path or os.path.exists(path) or not os.path.exists(source):
        return
    with open(source) as f:
        saved = json.load(f)
    if saved.get("protocol") == json.loads(json.dumps(_asdict(protocol))):
        shutil.copyfile(source, path)
        log(f"starting from the {len(saved['runs'])} runs of {source}")


def _asdict(protocol: Protocol) -> dict:
    from dataclasses import asdict
    return asdict(protocol)


# -- reading the results ------------------------------------------------------------------------

def shipped(r: dict) -> dict:
    """The run as shipped: frozen at its final ranks."""
    return {**r, "params": r.get("params_frozen", r["params"]),
            "val": r.get("val_frozen", r["val"]) if "best_step" not in r else r["val"]}


def _cell(g) -> str:
    return "out" if g is None else f"{g:+.3f}"


def _cells(gaps: list) -> str:
    """Per-seed gaps; "not run" where the arm was not asked for."""
    return " ".join(map(_cell, gaps)) or "not run"


def _per_seed(rs, f) -> str:
    return " ".join(_cell(f(r)) for r in rs)


def table(rows: dict[str, list[dict]], dense_frontier: list[dict], base: dict,
          fixed_frontier: list[dict] | None = None) -> list[str]:
    """One line per arm: per-seed loss, shipped parameters and training FLOPs (relative to
    `base`), the distance to the dense-width frontier at equal shipped parameters and at equal
    training FLOPs and, given, to the fixed-rank frontier at equal parameters."""
    seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
    w = max(22, *map(len, rows))
    head = (f"{'arm':<{w}} {'lr':>7} " + " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
            + f" {'mean':>7} {'params':>6} {'FLOPs':>6}   {'vs narrower dense':>17}"
            f"   {'at equal FLOPs':>15}" + ("   vs fixed-rank" if fixed_frontier else ""))
    lines = [head, "-" * len(head)]
    for name, rs in rows.items():
        rs = sorted((shipped(r) for r in rs), key=lambda r: r["seed"])
        vals = [r["val"] for r in rs]
        line = (f"{name:<{w}} {rs[0]['lr']:>7.2g} " + " ".join(f"{v:>7.4f}" for v in vals)
                + f" {statistics.mean(vals):>7.4f}"
                f" {statistics.mean(r['params'] for r in rs) / base['params']:>6.3f}"
                f" {statistics.mean(r['flops'] for r in rs) / base['flops']:>6.3f}"
                f"   {_per_seed(rs, lambda r: gap_to(dense_frontier, r, 'params')):>17}"
                f"   {_per_seed(rs, lambda r: gap_to(dense_frontier, r, 'flops')):>15}")
        if fixed_frontier and not name.startswith("dense"):
            line += f"   {_per_seed(rs, lambda r: gap_to(fixed_frontier, r, 'params'))}"
        lines.append(line)
    return lines


def _base(runs: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in runs) for k in ("params", "flops")}


def sweeps_text(regime: Regime) -> list[str]:
    lines = ["learning-rate sweeps (validation loss, first seed; * = chosen)"]
    for name, sweep in regime.sweeps.items():
        cells = "  ".join(f"{lr:.2g}: {v:.4f}{'*' if lr == regime.chosen[name] else ' '}"
                          for lr, v in sweep.items())
        variant = regime.variant[name].name
        lines.append(f"  {name:<20} {cells}" + (f"  -> {variant}" if variant != name else ""))
    return lines


# -- the parts ----------------------------------------------------------------------------------

def part_frontier(regime: Regime, seeds) -> dict:
    s = regime.setting
    frontier = regime.frontier(s.widths, seeds)
    arms = {name: regime.tuned(ARMS[name], seeds) for name in FROM_SCRATCH}
    fixed = [r for name, rs in arms.items() if name.startswith("fixed") for r in rs]
    base = _base([r for r in frontier if r["width"] == regime.protocol.gpt.n_embd])
    lines = ["", "== frontier: from scratch against the narrower dense model "
             f"({regime.protocol.steps} steps, width {regime.protocol.gpt.n_embd}) =="]
    lines += sweeps_text(regime) + [""]
    rows = {f"dense {w}": [r for r in frontier if r["width"] == w] for w in s.widths[::-1]}
    lines += table(rows | arms, frontier, base, fixed)
    lines.append("params (shipped, frozen) and FLOPs (training) relative to dense "
                 f"{regime.protocol.gpt.n_embd}; vs: loss minus the frontier's at the same "
                 "parameters (or training FLOPs), per seed; out: outside its range")
    return {"text": lines, "frontier": frontier, "arms": arms}


def part_lr_grid(regime: Regime, seeds, dense_frontier: list[dict]) -> dict:
    """The defaults and the fixed-rank frontier at every rate of the grid, on `seeds`."""
    s = regime.setting
    names = [n for n in FROM_SCRATCH if n != "fixed-1/16"]
    grid = {lr: {n: regime.at_lr(ARMS[n], lr, seeds) for n in names} for lr in s.lr_grid}
    own = {n: regime.tuned(ARMS[n], seeds) for n in names}
    own_fixed = [shipped(r) for n, rs in own.items() if n.startswith("fixed") for r in rs]
    lines = ["", "== lr-grid: one shared peak learning rate for every arm ==",
             f"{'lr':>7} {'defaults':>8} {'params':>6}  {'vs fixed-rank at this lr':>24}"
             f"  {'vs fixed-rank, own lr':>21}  {'vs narrower dense':>17}"]
    base = _base([r for r in dense_frontier if r["width"] == regime.protocol.gpt.n_embd])
    rows = []
    for lr, arms in grid.items():
        fixed = [shipped(r) for n, rs in arms.items() if n.startswith("fixed") for r in rs]
        rs = [shipped(r) for r in arms["defaults"]]
        row = {"lr": lr, "val": statistics.mean(r["val"] for r in rs),
               "params": statistics.mean(r["params"] for r in rs) / base["params"],
               "vs_fixed": [gap_to(fixed, r, "params") for r in rs],
               "vs_fixed_own": [gap_to(own_fixed, r, "params") for r in rs],
               "vs_dense": [gap_to(dense_frontier, r, "params") for r in rs]}
        rows.append(row)
        lines.append(f"{lr:>7.2g} {row['val']:>8.4f} {row['params']:>6.3f}"
                     f"  {' '.join(map(_cell, row['vs_fixed'])):>24}"
                     f"  {' '.join(map(_cell, row['vs_fixed_own'])):>21}"
                     f"  {' '.join(map(_cell, row['vs_dense'])):>17}")
    lines.append("per seed; the fixed-rank frontier at this lr: fixed ranks 1/8 .. 1/2 trained "
                 "at the same rate; own lr: each at the rate its sweep chose")
    return {"text": lines, "rows": rows}


def part_closing(regime: Regime, seeds, dense_frontier: list[dict]) -> dict:
    """Levers that might close the gap, each at the defaults' own rate: the factors (U, V)
    trained at a multiple of the rest's rate; U alone faster (μP's direction: U's fan-in is the
    rank); new components along the gradient (GradMax); CoLA's form with its own rank signal
    at a lower α."""
    lr = regime.chosen["defaults"]
    rows = {"defaults": regime.tuned(ARMS["defaults"], seeds)}
    for arm in closing_arms(regime.setting):
        # CoLA's form is another model: its own sweep; the rest are the defaults at their rate
        other_model = arm.config.get("activation") is not None
        rows[arm.name] = (regime.tuned(arm, seeds) if other_model
                          else regime.at_lr(arm, lr, seeds))
    base = _base([r for r in dense_frontier if r["width"] == regime.protocol.gpt.n_embd])
    lines = ["", f"== closing: levers on the defaults, at their own rate {lr:g} (CoLA's form "
                 "at its own) =="]
    lines += table(rows, dense_frontier, base)
    return {"text": lines, "arms": rows}


def closing_arms(s: Setting) -> list[Arm]:
    defaults = ARMS["defaults"]
    return [*[replace(defaults, name=f"defaults, factors x{m:g} lr", factor_lr=m)
              for m in s.factor_lrs],
            *[replace(defaults, name=f"defaults, U x{m:g} lr", u_lr=m) for m in s.u_lrs],
            replace(defaults, name="defaults, growth from gradient", grow_from_gradient=True),
            *[Arm(f"silu-α{a:g}", "inrank", dict(stop_after="settled", threshold=a,
                                                 activation="silu")) for a in s.silu_alphas]]


def part_data_limited(regime: Regime, seeds) -> dict:
    s = regime.setting
    width = regime.protocol.gpt.n_embd
    widths = [w for w in s.widths if w >= width // 2 and w % 32 == 0] or [width]
    frontier = regime.frontier(widths, seeds, regularise=True)
    arms = {"defaults": regime.tuned(ARMS["defaults"], seeds),
            "efficient-130": regime.tuned(efficient(), seeds)}
    # dense of the full width at InRank's rate, unregularised: what InRank's bias is up against
    same_lr = regime.chosen["defaults"]
    plain = regime.at_lr(regime.dense_arm(width), same_lr, seeds)
    plain_name = f"dense {width} at {same_lr:g}"
    tokens = regime.protocol.steps * regime.protocol.batch * regime.protocol.gpt.block_size
    epochs = tokens / len(regime.data[0])
    lines = ["", f"== data-limited: {len(regime.data[0]):,} training bytes, {epochs:.1f} epochs, "
             "every arm at its best validation checkpoint =="]
    lines += sweeps_text(regime) + [""]
    base = _base([r for r in frontier if r["width"] == width])
    rows = {f"dense {w} (tuned reg.)": [r for r in frontier if r["width"] == w]
            for w in widths[::-1]}
    lines += table(rows | {plain_name: plain} | arms, frontier, base)
    lines.append("")
    lines.append(f"{'arm':<22} {'variant':<22} {'best step':>9} {'best val':>8} {'end val':>8} "
                 f"{'end train':>9}")
    for name, rs in (rows | {plain_name: plain} | arms).items():
        for r in rs:
            lines.append(f"{name:<22} {r['variant']:<22} {r['best_step']:>9} {r['val']:>8.4f} "
                         f"{r['val_end']:>8.4f} {r['train']:>9.4f}  (seed {r['seed']})")
    lines.append(f"{plain_name}: unregularised, at the defaults' rate; best step: the best "
                 "checkpoint's; end: the last (validation and the training loss since the "
                 "evaluation before)")
    return {"text": lines, "frontier": frontier, "arms": arms, "plain": plain,
            "plain_name": plain_name}


def part_width(regime: Regime, seeds, at_protocol: dict | None) -> dict:
    """The gaps at other widths (and at the protocol's, from the frontier part)."""
    s = regime.setting
    lines = ["", "== width: the gaps as the model widens (steps, batch, context held) =="]
    table_rows = []
    for width in s.trend:
        frontier = regime.frontier(sorted({width // 2, 3 * width // 4, width}), seeds)
        arms = {name: regime.tuned(at_width(ARMS[name], width, regime.protocol.gpt.n_embd),
                                   seeds)
                for name in s.width_arms}
        table_rows.append(_width_row(width, frontier, arms))
    if at_protocol:
        width = regime.protocol.gpt.n_embd
        widths = {width // 2, 3 * width // 4, width}
        frontier = [r for r in at_protocol["frontier"] if r["width"] in widths]
        arms = {n: at_protocol["arms"][n] for n in WIDTH_ARMS}
        table_rows.append(_width_row(width, frontier, arms))
    table_rows.sort(key=lambda row: row["width"])
    lines.append(f"{'width':>5} {'dense':>7} {'defaults':>8} {'params':>6}  "
                 f"{'defaults vs narrower dense':>26}  {'fixed 1/4 vs narrower':>21}  "
                 f"{'fixed 1/2 vs narrower':>21}  {'defaults vs fixed-rank':>22}")
    for row in table_rows:
        lines.append(f"{row['width']:>5} {row['dense']:>7.4f} {row['defaults']:>8.4f} "
                     f"{row['params']:>6.3f}  {_cells(row['defaults_vs_dense']):>26}"
                     f"  {_cells(row['fixed-1/4_vs_dense']):>21}"
                     f"  {_cells(row['fixed-1/2_vs_dense']):>21}"
                     f"  {_cells(row['defaults_vs_fixed']):>22}")
    lines.append("per seed; narrower dense: dense of 1/2, 3/4 and the full width, each at its own "
                 "rate; params: the defaults' shipped parameters relative to dense of the width")
    trends = {key: trend(table_rows, key) for key in
              ("defaults_vs_dense", "fixed-1/4_vs_dense", "fixed-1/2_vs_dense")}
    lines.append("the gap to the narrower dense model against log2(width), least squares over "
                 "the per-seed gaps:")
    for key, t in trends.items():
        if t:
            zero = f"{t['zero_width']:.0f}" if t["zero_width"] else "never (not falling)"
            lines.append(f"  {key.split('_vs')[0]:<9} {t['slope']:+.3f} ± {t['se']:.3f} nats per "
                         f"doubling (standard error, {t['points']} points); zero at width {zero}")
    return {"text": lines, "rows": table_rows, "trends": trends}


def trend(rows: list[dict], key: str) -> dict | None:
    """The straight line gap = a + b·log2(width) through every per-seed gap in `rows[*][key]`:
    its slope b (nats per doubling), the slope's standard error and the width where the line
    reaches zero (None where it does not fall). None with fewer than three points or widths."""
    points = [(math.log2(row["width"]), g) for row in rows for g in row[key] if g is not None]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    xs, ys = zip(*points)
    slope, intercept = statistics.linear_regression(xs, ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    mean = statistics.fmean(xs)
    spread = sum((x - mean) ** 2 for x in xs)
    se = math.sqrt(residual / (len(points) - 2) / spread)
    zero = 2 ** (-intercept / slope) if slope < 0 else None
    return {"slope": slope, "se": se, "zero_width": zero, "points": len(points)}


def _width_row(width: int, frontier: list[dict], arms: dict) -> dict:
    """The gaps at one width; an arm that did not run (--width-arms) leaves its cells empty."""
    fixed = [shipped(r) for n in ("fixed-1/4", "fixed-1/2") for r in arms.get(n, [])]
    dense_runs = [r for r in frontier if r["width"] == width]
    row = {"width": width, "dense": statistics.mean(r["val"] for r in dense_runs),
           "defaults": statistics.mean(r["val"] for r in arms["defaults"]),
           "params": statistics.mean(shipped(r)["params"] for r in arms["defaults"])
           / statistics.mean(r["params"] for r in dense_runs),
           "defaults_vs_fixed": [gap_to(fixed, shipped(r), "params") for r in arms["defaults"]]
           if fixed else []}
    for name in WIDTH_ARMS:
        row[f"{name}_vs_dense"] = [gap_to(frontier, shipped(r), "params")
                                   for r in arms.get(name, [])]
    return row


# -- the figure ---------------------------------------------------------------------------------

def plot(results: dict, path: str) -> None:
    """Loss against shipped parameters and training FLOPs (frontier part), the data-limited
    validation curves, and the gaps against width."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    panels = [p for p in ("frontier", "data-limited", "width") if p in results]
    fig = Figure(figsize=(5 * (len(panels) + ("frontier" in results)), 4))
    axes = list(fig.subplots(1, len(panels) + ("frontier" in results), squeeze=False)[0])
    if "frontier" in results:
        res = results["frontier"]
        for ax, key, label in ((axes.pop(0), "params", "shipped parameters"),
                               (axes.pop(0), "flops", "training FLOPs")):
            _frontier_panel(ax, res, key, label)
    if "data-limited" in results:
        _curves_panel(axes.pop(0), results["data-limited"])
    if "width" in results:
        _width_panel(axes.pop(0), results["width"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _mean_point(rs, key):
    rs = [shipped(r) for r in rs]
    return statistics.mean(r[key] for r in rs), statistics.mean(r["val"] for r in rs)


def _frontier_panel(ax, res, key, label):
    widths = sorted({r["width"] for r in res["frontier"]})
    ax.plot(*zip(*[_mean_point([r for r in res["frontier"] if r["width"] == w], key)
                   for w in widths]), "s-", color="#333333", label="dense, narrower widths")
    fixed = sorted(_mean_point(rs, key) for n, rs in res["arms"].items() if n.startswith("fixed"))
    ax.plot(*zip(*fixed), "o--", color="#999999", label="fixed rank 1/16 .. 1/2")
    ax.plot(*_mean_point(res["arms"]["defaults"], key), "*", ms=13, color="tab:red",
            label="InRank defaults")
    ax.set_xscale("log")
    ax.set_xlabel(f"{label} (log)")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.legend(frameon=False, fontsize=7)


def _curves_panel(ax, res):
    named = {res["plain_name"] + ", no reg.": res["plain"],
             "dense, tuned reg.": [r for r in res["frontier"]
                                   if r["width"] == max(x["width"] for x in res["frontier"])],
             **res["arms"]}
    for name, rs in named.items():
        steps = [s for s, _ in rs[0]["curve"]]
        ax.plot(steps, [statistics.mean(dict(r["curve"])[s] for r in rs) for s in steps],
                label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("data-limited: many epochs", fontsize=9)
    ax.legend(frameon=False, fontsize=7)


def _width_panel(ax, res):
    rows = res["rows"]
    for key, label in (("defaults_vs_dense", "defaults"), ("fixed-1/4_vs_dense", "fixed 1/4"),
                       ("fixed-1/2_vs_dense", "fixed 1/2")):
        pts = [(row["width"], statistics.mean(g for g in row[key] if g is not None))
               for row in rows if any(g is not None for g in row[key])]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.axhline(0, color="#333333", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width (n_embd)")
    ax.set_ylabel("loss minus the narrower dense model's")
    ax.legend(frameon=False, fontsize=7)


# -- main ---------------------------------------------------------------------------------------

PARTS = ("frontier", "lr-grid", "data-limited", "width", "closing")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1")
    parser.add_argument("--grid-seeds", type=int, nargs="+",
                        help="the lr grid's seeds (default: the first of --seeds)")
    parser.add_argument("--widths", type=int, nargs="+",
                        help="the width part's (default 64 96 192)")
    parser.add_argument("--width-arms", nargs="+", choices=WIDTH_ARMS,
                        help="the width part's from-scratch arms (default: all; the defaults "
                             "always run)")
    parser.add_argument("--limited-bytes", type=int,
                        help="the data-limited part's corpus size (default: the Setting's)")
    parser.add_argument("--quick", action="store_true", help="tiny GPTs, 60 steps, one lr each")
    parser.add_argument("--json-dir", help="keep every run in this folder (read back to resume)")
    parser.add_argument("--plot", help="write the figure to this PNG")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else Setting()
    if args.widths:
        setting = replace(setting, trend=tuple(args.widths))
    if args.width_arms:
        setting = replace(setting, width_arms=tuple(dict.fromkeys(("defaults",
                                                                   *args.width_arms))))
    if args.limited_bytes:
        setting = replace(setting, data_limited=replace(setting.data_limited,
                                                        corpus_bytes=args.limited_bytes))
    seeds = args.seeds or [0, 1]
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    folder = Path(args.json_dir) if args.json_dir else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    prefix = "quick-" if args.quick else ""
    main_path = folder and str(folder / f"{prefix}regimes.json")
    if not args.quick:
        seeded_from(main_path, str(Path(__file__).resolve().parents[1] / "docs"
                                   / "convergence.json"), setting.protocol)
    main_regime = Regime(setting.protocol, setting, main_path)
    results = {}
    if {"frontier", "lr-grid", "width", "closing"} & set(args.parts):
        results["frontier"] = part_frontier(main_regime, seeds)
    if "lr-grid" in args.parts:
        results["lr-grid"] = part_lr_grid(main_regime, args.grid_seeds or seeds[:1],
                                          results["frontier"]["frontier"])
    if "width" in args.parts:
        results["width"] = part_width(main_regime, seeds, results["frontier"])
    if "closing" in args.parts:
        results["closing"] = part_closing(main_regime, seeds, results["frontier"]["frontier"])
    main_regime.save()
    if "data-limited" in args.parts:
        limited = Regime(setting.data_limited, setting,
                         folder and str(folder / f"{prefix}regimes-data-limited-"
                                                 f"{setting.data_limited.corpus_bytes // 1000}k.json"),
                         best_checkpoint=True)
        results["data-limited"] = part_data_limited(limited, seeds)
        limited.save()
    for part in PARTS:
        if part in results and (part in args.parts):
            print("\n".join(results[part]["text"]))
    if args.plot:
        plot({p: r for p, r in results.items() if p in args.parts}, args.plot)
        print(f"plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
