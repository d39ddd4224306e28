"""The paper's GPT comparison, scaled down to CPU: is InRank's adapted rank better than picking one?

    python examples/gpt_table.py [--steps 300] [--seeds 0 1 2] [--alphas 0.8 0.9]
                                 [--json FILE] [--plot FILE.png] [--quick]

On the stdlib corpus, from the same seed and batches, the demo GPT (4 layers, n_embd 128,
context 64, batch 16, AdamW 3e-3) trained as:
  dense       - every nn.Linear dense, at the GPT's own init;
  inrank      - InRank adapting throughout (inrank_fx defaults, α as given);
  efficient   - InRank-Efficient: ranks adapt for the first quarter of the steps, then freeze;
  fixed       - fixed rank from the start, at the efficient arm's final ranks (same parameters:
                is adapting better than just picking the rank?);
  reference   - the reference implementation's rule: i.i.d. random factors, a random buffer,
                the whole-weight spectrum, the zero-padded ratio, k ≥ r (efficient schedule).
Prints validation loss and perplexity (mean ± std over seeds), final ranks as a fraction of full,
parameters and wall-clock time relative to dense, per α.

This is a short run at one learning rate shared by every arm: it compares rank rules with each
other, not InRank with dense (a shared rate and a run inside the early transient favour the
small models). benchmarks/bench_convergence.py is the comparison with a tuned dense model.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from tqdm.auto import tqdm

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import evaluate, train_steps

ARMS = ("dense", "inrank", "efficient", "fixed", "reference")
REFERENCE_RULE = dict(init="iid", silent_buffer=False, criterion="variance_padded",
                      ranks_only_grow=True, grow_init="random")


def train_arm(arm: str, alpha: float, seed: int, steps: int, gpt: GPTConfig, data,
              fixed_ranks: dict | None = None) -> dict:
    """Train one arm; validation loss, parameters, seconds, and the factored layers' ranks."""
    train_ids, val_ids = data
    torch.manual_seed(seed)
    model = GPT(gpt)
    check = max(1, steps // 12)
    schedule = dict(threshold=alpha, warmup_steps=check, check_every=check, stop_after=None)
    if arm in ("efficient", "reference"):
        schedule["stop_after"] = max(1, steps // 4)
    if arm in ("inrank", "efficient"):
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(**schedule))
    elif arm == "reference":
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(**schedule, **REFERENCE_RULE))
    elif arm == "fixed":
        model = inrank_fx.transform(model, inrank_fx.InRankConfig(init_rank=1.0, buffer=0))
        inrank_fx.set_ranks(model, fixed_ranks)  # truncated SVD of the same init
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if arm in ("inrank", "efficient", "reference"):
        inrank_fx.attach(model, opt, seed=seed)
    stream = batches(train_ids, gpt.block_size, 16, torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    train_steps(model, opt, stream, steps)
    seconds = time.perf_counter() - start
    val = evaluate(model, val_ids, gpt.block_size, 10_000 + seed)
    layers = [m for m in model.modules() if isinstance(m, inrank_fx.InRankLinear)]
    return {"arm": arm, "alpha": alpha, "seed": seed, "val": val, "seconds": seconds,
            "params": sum(p.numel() for p in model.parameters()),
            "ranks": inrank_fx.ranks(model) if layers else {},
            "rank_fraction": (statistics.mean(m.rank / m.full_rank for m in layers)
                              if layers else 1.0)}


def run_table(steps: int, seeds, alphas, gpt: GPTConfig, progress: bool = True) -> list[dict]:
    data = split(stdlib_corpus(1_000_000))
    plan = [(seed, None, "dense") for seed in seeds] + [
        (seed, alpha, arm) for seed in seeds for alpha in alphas for arm in ARMS[1:]]
    runs, bar = [], tqdm(plan, desc="gpt table", disable=not progress)
    for seed, alpha, arm in bar:
        bar.set_postfix({"seed": seed, "alpha": alpha, "arm": arm})
        fixed = None
        if arm == "fixed":  # the efficient arm of the same seed and α ran just before
            fixed = next(r["ranks"] for r in reversed(runs)
                         if (r["arm"], r["seed"], r["alpha"]) == ("efficient", seed, alpha))
        runs.append(train_arm(arm, alpha, seed, steps, gpt, data, fixed))
    return runs


def table(runs: list[dict]) -> str:
    dense = [r for r in runs if r["arm"] == "dense"]
    dense_params = dense[0]["params"]
    dense_seconds = statistics.mean(r["seconds"] for r in dense)
    rows = [f"{'arm':<10} {'α':>4} {'val loss':>16} {'ppl':>7} {'rank/full':>9} "
            f"{'params':>7} {'time':>6}"]
    keys = [("dense", None)] + sorted({(r["arm"], r["alpha"]) for r in runs if r["arm"] != "dense"},
                                      key=lambda k: (k[1], ARMS.index(k[0])))
    for arm, alpha in keys:
        rs = [r for r in runs if (r["arm"], r["alpha"]) == (arm, alpha)]
        vals = [r["val"] for r in rs]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(
            f"{arm:<10} {alpha or '':>4} {statistics.mean(vals):.4f} ± {spread:.4f} "
            f"{math.exp(statistics.mean(vals)):>7.3f} "
            f"{statistics.mean(r['rank_fraction'] for r in rs):>9.3f} "
            f"{statistics.mean(r['params'] for r in rs) / dense_params:>7.3f} "
            f"{statistics.mean(r['seconds'] for r in rs) / dense_seconds:>6.2f}")
    rows.append("(one shared lr, a short run: compares the rules; not a comparison with a tuned "
                "dense model, for which see benchmarks/bench_convergence.py)")
    return "\n".join(rows)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for arm, marker in zip(ARMS, "os^Dv"):
        for alpha in sorted({r["alpha"] for r in runs if r["arm"] == arm}, key=lambda a: a or 0):
            rs = [r for r in runs if (r["arm"], r["alpha"]) == (arm, alpha)]
            x = statistics.mean(r["rank_fraction"] for r in rs)
            y = statistics.mean(r["val"] for r in rs)
            ax.plot([x], [y], marker, ms=6, label=f"{arm}" + (f" α {alpha}" if alpha else ""))
    ax.set_xscale("log")
    ax.set_xlabel("mean final rank / full rank (log)")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("scaled-down GPT: loss against rank")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 24 steps, one seed")
    parser.add_argument("--json", help="write every run to this file")
    parser.add_argument("--plot", help="write loss against rank to this PNG")
    args = parser.parse_args()
    gpt = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
    if args.quick:
        gpt = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)
        args.steps, args.seeds = 24, [0]
    runs = run_table(args.steps, args.seeds, args.alphas, gpt)
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    if args.plot:
        plot(runs, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
