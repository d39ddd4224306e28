"""Choose the InRank rule's defaults from measurements on the demo GPT (stdlib corpus).

    python benchmarks/bench_rank_rule.py --sweep rule [--steps 300] [--seeds 0 1 2]
    python benchmarks/bench_rank_rule.py --sweep init
    python benchmarks/bench_rank_rule.py --sweep grow
    python benchmarks/bench_rank_rule.py --sweep start

Every run trains the same GPT (4 layers, n_embd 128, context 64, batch 16, AdamW 3e-3) from the
same seed on the same batches, InRank-Efficient style (ranks adapt for the first half of the
steps, then freeze); the dense model is trained alongside at its own GPT-2 init, at the same
learning rate and length: a reference point for the variants, not a tuned comparison with dense
(benchmarks/bench_convergence.py is that). Sweeps:
  rule - criterion (variance / energy) × α ∈ {0.8, 0.9, 0.95, 0.99} on the whole weight, and
         the cumulative update at α 0.9 and 0.99 for contrast
  init - init "svd" (spectral) / "random" (random directions, the module's scale) / "iid"
  grow - grow_init "zero" / "random"
  start - init_rank ∈ {1, 2, 4} × buffer ∈ {4, 32}, and checks every 10 steps instead of 25:
         the final ranks should not follow any of them
Prints validation loss (mean ± std over seeds), final ranks (min..max, mean), the factored
layers' parameters and the whole model's parameters as fractions of dense. `--json FILE` saves
every run; `--plot FILE.png` draws validation loss against mean final rank (the rule sweep's
curve), also from a saved run with `--replot FILE.json`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import evaluate, train_steps

GPT_CONFIG = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)

SWEEPS = {
    "rule": [dict(measure="weight", criterion=c, threshold=a)
             for c, a in itertools.product(("variance", "energy"), (0.8, 0.9, 0.95, 0.99))]
    + [dict(measure="update", criterion="variance", threshold=a) for a in (0.9, 0.99)],
    "init": [dict(init=i) for i in ("svd", "random", "iid")],
    "grow": [dict(grow_init=g) for g in ("zero", "random")],
    "start": [dict(init_rank=i, buffer=b) for i, b in itertools.product((1, 2, 4), (4, 32))]
    + [dict(warmup_steps=10, check_every=10)],
}


def run(variant: dict | None, seed: int, steps: int, data) -> dict:
    """Train one model (variant None: dense) and measure it."""
    train_ids, val_ids = data
    torch.manual_seed(seed)
    model = GPT(GPT_CONFIG)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_layer_params = sum(m.weight.numel() + m.bias.numel() for m in model.modules()
                             if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    opt_model = model
    if variant is not None:
        cfg = inrank_fx.InRankConfig(**{"warmup_steps": 25, "check_every": 25,
                                        "stop_after": steps // 2, **variant})
        opt_model = inrank_fx.transform(model, cfg)
    opt = torch.optim.AdamW(opt_model.parameters(), lr=3e-3, weight_decay=0.01)
    if variant is not None:
        inrank_fx.attach(opt_model, opt, seed=seed)
    stream = batches(train_ids, GPT_CONFIG.block_size, 16, torch.Generator().manual_seed(seed))
    losses, seconds = train_steps(opt_model, opt, stream, steps)
    result = {"variant": variant, "seed": seed,
              "val": evaluate(opt_model, val_ids, GPT_CONFIG.block_size, 10_000 + seed),
              "train": statistics.mean(losses[-20:]), "seconds": sum(seconds),
              "params": sum(p.numel() for p in opt_model.parameters()) / dense_params}
    if variant is not None:
        ranks = inrank_fx.ranks(opt_model)
        factored = sum(m.factored_params() for m in opt_model.modules()
                       if isinstance(m, inrank_fx.InRankLinear))
        result.update(ranks=ranks, layer_params=factored / dense_layer_params)
    return result


def describe(variant: dict | None) -> str:
    if variant is None:
        return "dense (same lr, not tuned)"
    return " ".join(f"{k}={v}" for k, v in variant.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="rule")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="write every run to this file")
    parser.add_argument("--plot", help="draw validation loss against mean final rank to this PNG")
    parser.add_argument("--replot", help="only redraw --plot from the runs saved in this JSON")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.plot or "rank_rule.png")
        return
    data = split(stdlib_corpus(1_000_000))
    runs = []
    for variant in [None, *SWEEPS[args.sweep]]:
        for seed in args.seeds:
            r = run(variant, seed, args.steps, data)
            runs.append(r)
            ranks = list(r.get("ranks", {}).values())
            extra = f"  ranks {min(ranks)}..{max(ranks)}" if ranks else ""
            print(f"  {describe(variant):<50} seed {seed}  val {r['val']:.4f}{extra}", flush=True)
    print(f"\n{'variant':<50} {'val loss':>15} {'ranks':>14} {'layer params':>12} "
          f"{'model params':>12}")
    for variant in [None, *SWEEPS[args.sweep]]:
        rs = [r for r in runs if r["variant"] == variant]
        vals = [r["val"] for r in rs]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        if variant is None:
            ranks_text, layer_text = "full", "1.000"
        else:
            ranks = [k for r in rs for k in r["ranks"].values()]
            ranks_text = f"{min(ranks)}..{max(ranks)} ({statistics.mean(ranks):.1f})"
            layer_text = f"{statistics.mean(r['layer_params'] for r in rs):.3f}"
        print(f"{describe(variant):<50} {statistics.mean(vals):.4f} ± {spread:.4f} "
              f"{ranks_text:>14} {layer_text:>12} "
              f"{statistics.mean(r['params'] for r in rs):>12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    if args.plot:
        plot(runs, args.plot)


def plot(runs: list[dict], path: str) -> None:
    """Mean validation loss against mean final rank, one line per variant family (the variant
    less its threshold), points labelled by α; the dense loss in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(variant):
        return json.dumps(variant, sort_keys=True)

    variants = {key(r["variant"]): r["variant"] for r in runs}
    points: dict[str, list] = {}
    for k, variant in variants.items():
        rs = [r for r in runs if key(r["variant"]) == k]
        loss = statistics.mean(r["val"] for r in rs)
        if variant is None:
            dense = loss
            continue
        rank = statistics.mean(v for r in rs for v in r["ranks"].values())
        family = describe({n: v for n, v in variant.items() if n != "threshold"}) or "defaults"
        points.setdefault(family, []).append((rank, loss, variant.get("threshold")))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for family, pts in points.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1.2, label=family)
        for rank, loss, alpha in pts:
            if alpha is not None:
                ax.annotate(f"α {alpha}", (rank, loss), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel("mean final rank over layers and seeds")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(f"demo GPT: the rank rule's threshold and criterion (dense: {dense:.3f})")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
