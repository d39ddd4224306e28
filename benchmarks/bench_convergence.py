"""Dense against InRank on a protocol a sceptical reviewer accepts, with the fixed-rank frontier.

    python benchmarks/bench_convergence.py [--steps 2000] [--seeds 0 1] [--arms ...]
                                           [--json FILE] [--plot FILE.png] [--quick]

The protocol:
- the demo GPT (4 layers, n_embd 128, context 64, batch 16, byte-level) on the Python standard
  library's top-level modules (4.7 MB; 2000 steps read 2 M tokens, under half an epoch);
- the usual recipe for every arm: AdamW (β 0.9/0.95, weight decay 0.1), linear warm-up over 5%
  of the steps, cosine decay to 10% of the peak, gradient norm clipped at 1;
- every arm's peak learning rate chosen by its own sweep (three values, extended by ×2 past an
  edge that wins) on the first seed; the other seeds run at the chosen rate;
- arms: dense; fixed ranks at 1/16 .. 1/2 of full from the start (spectral init): the fixed-rank
  frontier of loss against parameters; InRank adapting throughout, stopped at step 150 (the old
  demo) and stopped once its ranks settle, at α 0.99, and the library's defaults (settled,
  α 0.9995); `--arms ... settled-α0.999` the previous default, `--arms ... silu-α0.99` a SiLU
  between the factors (CoLA's form), and
  `--arms ... defaults fixed-at-defaults` the defaults' measured ranks of each seed fixed from
  the start (InRank's allocation without its growth: which of the two an outcome comes from).
Prints the sweep, the table (validation loss per seed, parameters, training FLOPs, wall-clock,
each adaptive arm's distance to the frontier at its parameter count) and whether the order of
the arms changed over the second half of training. `--json` keeps every run and is read back
on the next call, so an interrupted run resumes; `--plot` draws loss against parameters,
against training FLOPs, and the validation curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import RECIPE_BETAS, evaluate, train_steps, warmup_cosine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gradient_growth import GradientGrowth  # noqa: E402


@dataclass(frozen=True)
class Protocol:
    gpt: GPTConfig = field(default_factory=lambda: GPTConfig(block_size=64, n_layer=4, n_head=4,
                                                             n_embd=128))
    batch: int = 16
    steps: int = 2000
    warmup_fraction: float = 0.05
    floor: float = 0.1  # cosine decays to this fraction of the peak learning rate
    clip_norm: float = 1.0
    weight_decay: float = 0.1
    betas: tuple = RECIPE_BETAS
    corpus_bytes: int = 5_000_000
    evals: int = 10  # validation points over the run (the last at the final step)
    eval_batches: int = 16


QUICK = Protocol(gpt=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64), batch=8, steps=60,
                 corpus_bytes=300_000, evals=3, eval_batches=4)

DENSE_LRS = (5e-4, 1e-3, 2e-3)
FACTORED_LRS = (2e-3, 4e-3, 8e-3)


@dataclass(frozen=True)
class Arm:
    """One way of training the GPT. kind: "dense", "fixed" (rank fraction `fixed`, no
    controller), "inrank" (transform with `config`, controller attached) or "fixed-at" (no
    controller, each layer fixed from the start at the final rank that arm `ranks_of` measured
    on the same seed: InRank's allocation without its growth). `width`: the GPT's n_embd (None:
    the protocol's; a narrower dense model is `Arm("dense-w96", "dense", width=96)`);
    `dropout`, `weight_decay`: regularisation (None: the protocol's); `factor_lr`: the factored
    layers' U and V train at this multiple of the peak rate (a per-factor rate, μP-style), and U
    at `u_lr` times that; `grow_from_gradient`: components a check adds start along the top
    singular directions of the layer's weight gradient (GradMax; benchmarks/gradient_growth.py)."""

    name: str
    kind: str
    config: dict = field(default_factory=dict)
    fixed: float | None = None
    lrs: tuple = FACTORED_LRS
    ranks_of: str | None = None
    width: int | None = None
    dropout: float = 0.0
    weight_decay: float | None = None
    factor_lr: float = 1.0  # the factors' (U, V) learning rate relative to the rest's
    u_lr: float = 1.0  # U's rate relative to V's (μP: U's fan-in is the rank, V's the input)
    grow_from_gradient: bool = False  # new components along the gradient (gradient_growth.py)


ARMS = {arm.name: arm for arm in [
    Arm("dense", "dense", lrs=DENSE_LRS),
    *[Arm(f"fixed-1/{d}", "fixed", fixed=1 / d) for d in (16, 8, 4, 2)],
    Arm("throughout", "inrank", dict(stop_after=None, threshold=0.99)),  # never frozen
    Arm("step-150", "inrank", dict(stop_after=150, threshold=0.99)),     # the old demo's stop
    Arm("settled-α0.99", "inrank", dict(stop_after="settled", threshold=0.99)),
    Arm("settled-α0.999", "inrank", dict(stop_after="settled", threshold=0.999)),
    Arm("defaults", "inrank", {}),  # the library's defaults: settled, α 0.9995
    Arm("silu-α0.99", "inrank", dict(stop_after="settled", threshold=0.99, activation="silu")),
    Arm("fixed-at-α0.999", "fixed-at", ranks_of="settled-α0.999"),
    Arm("fixed-at-defaults", "fixed-at", ranks_of="defaults"),
]}
# Opt-in: CoLA's form grows to nearly full width and costs as much as the rest together; the
# defaults' ranks fixed from the start is a diagnostic (allocation against growth); α 0.999 was
# the default before α 0.9995 measured better (docs/TRAINING.md).
DEFAULT_ARMS = tuple(name for name in ARMS if name not in (
    "silu-α0.99", "settled-α0.999", "fixed-at-α0.999", "fixed-at-defaults"))


# -- one run ----------------------------------------------------------------------------------

def build(arm: Arm, protocol: Protocol, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = GPT(replace(protocol.gpt, n_embd=arm.width or protocol.gpt.n_embd,
                        dropout=arm.dropout))
    if arm.kind == "fixed":
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(init_rank=arm.fixed, buffer=0))
    elif arm.kind == "fixed-at":  # spectral init at the given ranks: full SVD, truncated
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(init_rank=1.0, buffer=0))
        inrank_fx.set_ranks(model, arm.config["ranks"])
    elif arm.kind == "inrank":
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(**arm.config))
    return model


def factored(model) -> list:
    return [m for m in model.modules() if isinstance(m, inrank_fx.InRankLinear)]


def step_flops(model, protocol: Protocol) -> tuple[int, int]:
    """(FLOPs of one training step counted by torch, FLOPs of its factored layers' matmuls)."""
    x = torch.zeros(protocol.batch, protocol.gpt.block_size, dtype=torch.long,
                    device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model.loss(x, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), _factored_flops(model, protocol)


def _factored_flops(model, protocol: Protocol) -> int:
    tokens = protocol.batch * protocol.gpt.block_size
    return 3 * tokens * sum(m.flops_per_row() for m in factored(model))  # forward + backward


def run(arm: Arm, lr: float, seed: int, protocol: Protocol, data, device="cpu") -> dict:
    """Train one arm at one peak learning rate and seed (on `device`); the measurements of the
    run."""
    train_ids, val_ids = data
    model = build(arm, protocol, seed).to(device)
    total, layer_part = step_flops(model, protocol)
    rest = total - layer_part  # attention, norms, embeddings, the tied head: the same in every arm
    weight_decay = protocol.weight_decay if arm.weight_decay is None else arm.weight_decay
    opt = torch.optim.AdamW(_param_groups(model, lr, arm.factor_lr, arm.u_lr), lr=lr,
                            betas=protocol.betas, weight_decay=weight_decay)
    ctrl = inrank_fx.attach(model, opt, seed=seed) if arm.kind == "inrank" else None
    growth = GradientGrowth(model, ctrl) if arm.grow_from_gradient else None
    if growth:
        growth.arm(1)
    steps = protocol.steps
    sched = warmup_cosine(opt, steps, max(1, int(protocol.warmup_fraction * steps)),
                          protocol.floor)
    stream = ((x.to(device), y.to(device)) for x, y in batches(
        train_ids, protocol.gpt.block_size, protocol.batch, torch.Generator().manual_seed(seed)))
    every = max(1, steps // protocol.evals)
    curve, train_curve, flops, since = [], [], [0], []

    def on_step(step, loss):
        if growth:
            growth.after()
            growth.arm(step + 1)
        flops[0] += rest + _factored_flops(model, protocol)  # widths as they are at this step
        since.append(loss)
        if step % every == 0 or step == steps:
            val = evaluate(model, val_ids, protocol.gpt.block_size, 10_000 + seed,
                           protocol.eval_batches)
            curve.append((step, val))
            train_curve.append((step, statistics.mean(since)))  # since the last evaluation
            since.clear()

    losses, seconds = train_steps(model, opt, stream, steps, on_step=on_step, scheduler=sched,
                                  clip_norm=protocol.clip_norm)
    layers = factored(model)
    params = sum(p.numel() for p in model.parameters())
    # What ships: the model frozen at its final ranks (the buffer truncated away by SVD).
    shipped = inrank_fx.freeze(model) if layers else model
    return {
        "arm": arm.name, "lr": lr, "seed": seed, "val": curve[-1][1], "curve": curve,
        "train_curve": train_curve,
        "val_frozen": evaluate(shipped, val_ids, protocol.gpt.block_size, 10_000 + seed,
                               protocol.eval_batches) if layers else curve[-1][1],
        "train": statistics.mean(losses[-max(1, steps // 20):]),
        "finite": all(map(math.isfinite, losses)),
        "params": params,  # as trained at the end, buffer included
        "params_frozen": sum(p.numel() for p in shipped.parameters()),
        "rank_fraction": statistics.mean(m.rank / m.full_rank for m in layers) if layers else 1.0,
        "ranks": inrank_fx.ranks(model) if layers else {},
        "rank_events": ctrl.rank_events if ctrl else 0,
        "trajectory": _trajectory(ctrl) if ctrl else [],
        "flops": flops[0], "seconds": sum(seconds),
        **({"seeded_from_gradient": growth.seeded} if growth else {}),
    }


def _param_groups(model, lr: float, factor_lr: float, u_lr: float = 1.0) -> list[dict]:
    """One group, or with `factor_lr` or `u_lr` != 1 the factors in groups of their own: V at
    `factor_lr` times `lr`, U at `factor_lr * u_lr` times it (a resize keeps a parameter's
    group; the schedule scales them alike)."""
    if factor_lr == 1.0 and u_lr == 1.0:
        return [{"params": list(model.parameters())}]
    us = {id(m.U) for m in factored(model)}
    vs = {id(m.V) for m in factored(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in us | vs]},
              {"params": [p for p in model.parameters() if id(p) in vs], "lr": lr * factor_lr},
              {"params": [p for p in model.parameters() if id(p) in us],
               "lr": lr * factor_lr * u_lr}]
    return [g for g in groups if g["params"]]


def _trajectory(ctrl) -> list[tuple[int, float, float]]:
    """(step, mean rank, mean width) over the layers at every check of the run."""
    by_step: dict[int, list] = {}
    for h in ctrl.history:
        by_step.setdefault(h["step"], []).append((h["rank"], h["width"]))
    return [(step, statistics.mean(r for r, _ in v), statistics.mean(w for _, w in v))
            for step, v in sorted(by_step.items())]


# -- the protocol -----------------------------------------------------------------------------

def tune(arm: Arm, lr_loss, max_extensions: int = 2) -> tuple[float, dict]:
    """The peak learning rate with the lowest validation loss over `arm.lrs`, extending the grid
    by ×2 past an edge that wins (at most `max_extensions` times). `lr_loss(lr)` trains and
    returns the validation loss (NaN or inf for a diverged run). Returns (best lr, {lr: loss})."""
    losses = {lr: lr_loss(lr) for lr in arm.lrs}
    for _ in range(max_extensions):
        best = min(losses, key=lambda lr: _finite_or_inf(losses[lr]))
        grid = sorted(losses)
        if best == grid[0]:
            new = grid[0] / 2
        elif best == grid[-1]:
            new = grid[-1] * 2
        else:
            break
        losses[new] = lr_loss(new)
    best = min(losses, key=lambda lr: _finite_or_inf(losses[lr]))
    if not math.isfinite(losses[best]):
        raise RuntimeError(f"{arm.name}: every learning rate diverged: {losses}")
    return best, dict(sorted(losses.items()))


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


class Runs:
    """Every run so far, keyed by (arm, lr, seed), saved after each run when `path` is set and
    read back from it, so that an interrupted benchmark resumes where it stopped."""

    def __init__(self, protocol: Protocol, data, path: str | None = None, log=print) -> None:
        self.protocol, self.data, self.path, self.log = protocol, data, path, log
        self.runs: dict[tuple, dict] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("protocol") == _jsonable(asdict(protocol)):
                self.runs = {(r["arm"], r["lr"], r["seed"]): r for r in saved["runs"]}
                log(f"resuming: {len(self.runs)} runs read from {path}")

    def get(self, arm: Arm, lr: float, seed: int) -> dict:
        key = (arm.name, lr, seed)
        if key not in self.runs:
            start = time.perf_counter()
            self.runs[key] = run(arm, lr, seed, self.protocol, self.data)
            r = self.runs[key]
            self.log(f"  {arm.name:<16} lr {lr:<8.2g} seed {seed}  val {r['val']:.4f}  "
                     f"params {r['params']:>9,}  {time.perf_counter() - start:5.0f} s")
            self.save()
        return self.runs[key]

    def save(self, extra: dict | None = None) -> None:
        if not self.path:
            return
        payload = {"protocol": _jsonable(asdict(self.protocol)), "runs": list(self.runs.values()),
                   **(extra or {})}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, self.path)  # never a half-written file


def _jsonable(value):
    return json.loads(json.dumps(value))


def run_protocol(arms, seeds, runs: Runs) -> dict:
    """Tune every arm on the first seed, run the others at the chosen rate. Returns
    {"chosen": {arm: lr}, "sweeps": {arm: {lr: loss}}, "runs": [final runs]}."""
    chosen, sweeps, final = {}, {}, []
    by_name = {arm.name: arm for arm in arms}

    def at_seed(arm: Arm, seed: int) -> Arm:
        if arm.kind != "fixed-at":
            return arm
        if arm.ranks_of not in chosen:
            raise ValueError(f"arm {arm.name!r} needs arm {arm.ranks_of!r} to run before it")
        source = runs.get(by_name[arm.ranks_of], chosen[arm.ranks_of], seed)
        return replace(arm, config={"ranks": source["ranks"]})

    for arm in arms:
        lr, sweep = tune(arm, lambda lr, arm=arm: _loss(runs.get(at_seed(arm, seeds[0]), lr,
                                                                 seeds[0])))
        chosen[arm.name], sweeps[arm.name] = lr, sweep
    for arm in arms:
        final.extend(runs.get(at_seed(arm, seed), chosen[arm.name], seed) for seed in seeds)
    return {"chosen": chosen, "sweeps": sweeps, "runs": final}


def _loss(r: dict) -> float:
    return r["val"] if r["finite"] and math.isfinite(r["val"]) else math.inf


# -- reading the results ----------------------------------------------------------------------

def frontier_loss(points: list[tuple[float, float]], params: float) -> float | None:
    """The fixed-rank frontier's loss at `params`, interpolated linearly in log(parameters)
    between the fixed arms' (params, loss) points; None outside their range."""
    points = sorted(points)
    for (p0, l0), (p1, l1) in zip(points, points[1:]):
        if p0 <= params <= p1:
            t = (math.log(params) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return l0 + t * (l1 - l0)
    return None


def gap_to(frontier: list[dict], r: dict, key: str = "params") -> float | None:
    """Run r's loss minus the frontier's at r's `key` (parameters or training FLOPs), the
    frontier drawn through the runs of r's seed (each a dict with "seed", `key` and "val");
    None outside their range. The dense-width frontier of bench_slim and bench_regimes."""
    points = [(f[key], f["val"]) for f in frontier if f["seed"] == r["seed"]]
    loss = frontier_loss(points, r[key])
    return None if loss is None else r["val"] - loss


def frontier_gaps(result: dict, shipped: bool = False) -> dict:
    """{(arm, seed): loss − the fixed-rank frontier's loss at the arm's parameter count} for
    every arm that is neither dense nor fixed, the frontier drawn from the fixed arms of the
    same seed. As trained (parameters with the buffer, the trained model's loss) or, with
    `shipped`, as frozen at the final ranks (the buffer truncated away)."""
    params, val = ("params_frozen", "val_frozen") if shipped else ("params", "val")
    gaps = {}
    for seed in sorted({r["seed"] for r in result["runs"]}):
        rs = [r for r in result["runs"] if r["seed"] == seed]
        points = [(r[params], r[val]) for r in rs if kind(r["arm"]) == "fixed"]
        if len(points) < 2:
            continue  # no frontier to compare with
        for r in rs:
            if kind(r["arm"]) not in ("dense", "fixed"):
                f = frontier_loss(points, r[params])
                gaps[(r["arm"], seed)] = None if f is None else r[val] - f
    return gaps


def gap_spread(gaps: dict) -> dict:
    """{arm: (mean, standard deviation, seeds)} of the distances to the frontier over the seeds
    where the arm is inside the fixed arms' range."""
    by_arm: dict[str, list[float]] = {}
    for (name, _), gap in gaps.items():
        if gap is not None:
            by_arm.setdefault(name, []).append(gap)
    return {name: (statistics.mean(g), statistics.stdev(g) if len(g) > 1 else 0.0, len(g))
            for name, g in by_arm.items()}


def kind(name: str) -> str:
    return ARMS[name].kind if name in ARMS else "inrank"


def order_changes(result: dict) -> list[str]:
    """Pairs of arms whose order by mean validation loss changed over the second half of
    training (compared at every evaluation there)."""
    names = list(result["chosen"])
    curves = {}
    for name in names:
        rs = [r for r in result["runs"] if r["arm"] == name]
        steps = [s for s, _ in rs[0]["curve"]]
        curves[name] = {s: statistics.mean(dict(r["curve"])[s] for r in rs) for s in steps}
    last = max(next(iter(curves.values())))
    late = [s for s in next(iter(curves.values())) if s >= last / 2]
    changes = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            signs = {curves[a][s] < curves[b][s] for s in late}
            if len(signs) > 1:
                changes.append(f"{a} / {b}")
    return changes


def report(result: dict) -> str:
    runs = result["runs"]
    dense = [r for r in runs if r["arm"] == "dense"]
    base = {k: statistics.mean(r[k] for r in dense) if dense else math.nan
            for k in ("params", "flops", "seconds")}
    seeds = sorted({r["seed"] for r in runs})
    gaps, shipped_gaps = frontier_gaps(result), frontier_gaps(result, shipped=True)
    lines = ["learning-rate sweep (validation loss, seed %d; * = chosen)" % seeds[0]]
    for name, sweep in result["sweeps"].items():
        cells = "  ".join(f"{lr:.2g}: {loss:.4f}{'*' if lr == result['chosen'][name] else ' '}"
                          for lr, loss in sweep.items())
        lines.append(f"  {name:<16} {cells}")
    lines += ["", f"{'arm':<16} {'lr':>7} {'val loss':>16} "
              + " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
              + f" {'params':>6} {'rank/full':>9} {'FLOPs':>6} {'time':>5} {'vs frontier':>13}"
              f" {'shipped':>7} {'params':>6} {'vs frontier':>13}"]

    def gap_text(table, name, rs):
        if (name, rs[0]["seed"]) not in table:
            return ""
        return " ".join("out" if table[(name, r["seed"])] is None
                        else f"{table[(name, r['seed'])]:+.3f}" for r in rs)

    for name in result["chosen"]:
        rs = sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"])
        vals = [r["val"] for r in rs]

        def mean(key):
            return statistics.mean(r[key] for r in rs)

        lines.append(
            f"{name:<16} {result['chosen'][name]:>7.2g} {statistics.mean(vals):.4f} ± "
            f"{statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f} "
            + " ".join(f"{v:>7.4f}" for v in vals)
            + f" {mean('params') / base['params']:>6.3f} {mean('rank_fraction'):>9.3f}"
              f" {mean('flops') / base['flops']:>6.3f} {mean('seconds') / base['seconds']:>5.2f}"
              f" {gap_text(gaps, name, rs):>13} {mean('val_frozen'):>7.4f}"
              f" {mean('params_frozen') / base['params']:>6.3f} {gap_text(shipped_gaps, name, rs):>13}")
    lines.append("")
    lines.append("params, FLOPs (training), time (training steps) and shipped params are relative to "
                 "dense; vs frontier: loss minus the fixed-rank frontier's at the same parameters, "
                 "per seed (out: outside the fixed arms' range); shipped: frozen at the final ranks")
    spread = gap_spread(gaps)
    if spread:
        lines.append("vs frontier over the seeds (as trained): " + "; ".join(
            f"{name} {m:+.3f} ± {sd:.3f} (n={n})" for name, (m, sd, n) in spread.items()))
    changes = order_changes(result)
    lines.append("order over the second half of training: " + (
        "unchanged" if not changes else "changed for " + ", ".join(changes)))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Validation loss against parameters, training FLOPs and wall-clock (the fixed-rank
    frontier drawn through the fixed arms), and the validation curves."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    runs = result["runs"]
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    palette = matplotlib.colormaps["tab20"]  # one colour per arm, the same in every panel
    colour = {name: palette(i % 20) for i, name in enumerate(result["chosen"])}
    means = {}
    for name in result["chosen"]:
        rs = [r for r in runs if r["arm"] == name]
        means[name] = {k: statistics.mean(r[k] for r in rs)
                       for k in ("params", "flops", "seconds", "val")}
    axis = (("params", "parameters as trained"), ("flops", "training FLOPs"),
            ("seconds", "training wall-clock (s)"))
    for ax, (key, label) in zip(axes, axis):
        fixed = sorted((m[key], m["val"]) for n, m in means.items() if kind(n) == "fixed")
        if fixed:
            ax.plot(*zip(*fixed), "-", color="#999999", lw=1, zorder=0,
                    label="fixed-rank frontier")
        for name, m in means.items():
            marker = {"dense": "s", "fixed": "o", "fixed-at": "D"}.get(kind(name), "*")
            ax.plot([m[key]], [m["val"]], marker, ms=10 if marker == "*" else 6, label=name,
                    color=colour[name])
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("validation loss (mean over seeds)")
    axes[0].legend(frameon=False, fontsize=7)
    ax_c = axes[3]
    for name in result["chosen"]:
        rs = [r for r in runs if r["arm"] == name]
        steps = [s for s, _ in rs[0]["curve"]]
        ax_c.plot(steps, [statistics.mean(dict(r["curve"])[s] for r in rs) for s in steps],
                  lw=1.2, label=name, color=colour[name],
                  ls="--" if kind(name) in ("fixed", "fixed-at") else "-")
    ax_c.set_xlabel("optimizer step")
    ax_c.set_ylabel("validation loss (mean over seeds)")
    ax_c.set_title("each arm at its own tuned learning rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_result(path: str) -> dict:
    """The result of a finished benchmark from its --json file (for --replot)."""
    with open(path) as f:
        saved = json.load(f)
    if "chosen" not in saved:
        raise SystemExit(f"{path}: no finished benchmark in it (run it to the end first)")
    chosen = {a: float(lr) for a, lr in saved["chosen"].items()}
    seeds = sorted({r["seed"] for r in saved["runs"]})
    runs = [r for r in saved["runs"] if chosen.get(r["arm"]) == r["lr"] and r["seed"] in seeds]
    for r in runs:
        r["curve"] = [tuple(p) for p in r["curve"]]
    sweeps = {a: {float(lr): v for lr, v in s.items()} for a, s in saved["sweeps"].items()}
    return {"chosen": chosen, "sweeps": sweeps, "runs": runs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 2000)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 (quick: 0)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(DEFAULT_ARMS),
                        help="fixed-at-defaults needs defaults before it")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 60 steps, one seed")
    parser.add_argument("--json", help="keep every run in this file (read back to resume)")
    parser.add_argument("--plot", help="write the figure to this PNG")
    parser.add_argument("--replot", metavar="JSON",
                        help="only print the table and draw --plot from a finished --json file")
    args = parser.parse_args(argv)
    if args.replot:
        result = load_result(args.replot)
        print(report(result))
        if args.plot:
            plot(result, args.plot)
        return result
    protocol = QUICK if args.quick else Protocol()
    if args.steps:
        protocol = replace(protocol, steps=args.steps)
    arms = [ARMS[a] for a in args.arms]
    if protocol.steps < 4 * 150:  # a short run: a fixed stop at the same share of the run
        arms = [replace(a, config={**a.config, "stop_after": protocol.steps // 4})
                if isinstance(a.config.get("stop_after"), int) else a for a in arms]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    data = split(stdlib_corpus(protocol.corpus_bytes))
    tokens = protocol.steps * protocol.batch * protocol.gpt.block_size
    print(f"{protocol.steps} steps × {protocol.batch} × {protocol.gpt.block_size} = {tokens:,} "
          f"tokens per run; {len(data[0]):,} training bytes: {tokens / len(data[0]):.2f} epochs")
    runs = Runs(protocol, data, args.json)
    result = run_protocol(arms, args.seeds, runs)
    runs.save({"chosen": result["chosen"],
               "sweeps": {a: {str(lr): v for lr, v in sweep.items()}
                          for a, sweep in result["sweeps"].items()}})
    print(report(result))
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return result


if __name__ == "__main__":
    main()
