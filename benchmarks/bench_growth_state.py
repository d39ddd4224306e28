"""Adam state for components added by growth: how large are their first updates?

    python benchmarks/bench_growth_state.py [--grow-at 60] [--after 40] [--plot FILE.png]

Trains the demo GPT (4 layers, n_embd 128, AdamW 3e-3) at rank 8, grows every factored layer by
16 components at step --grow-at with `set_ranks(..., grow_state=...)`, and trains on:
  seeded - new columns' second moments start at their row's mean over the existing columns
           (the default);
  unseeded - all new state zero (Adam's step count is kept, so its bias correction is already
           ≈ 1 and the first updates divide a small first moment by a tiny second moment);
  none   - no growth, for the loss curve.
Prints, for the first steps after growth, the RMS update of the new U columns over that of the
existing ones (median over layers), and the mean loss over the steps after growth.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig

GPT_CONFIG = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
START_RANK, EXTRA = 8, 16


def run(grow_state: str | None, grow_at: int, after: int, data, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = inrank_fx.InRankConfig(init_rank=START_RANK, buffer=0)
    model = inrank_fx.transform(GPT(GPT_CONFIG), config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    stream = batches(data, GPT_CONFIG.block_size, 16, torch.Generator().manual_seed(seed))
    layers = [m for m in model.modules() if isinstance(m, inrank_fx.InRankLinear)]
    losses, ratios = [], []
    for step in range(1, grow_at + after + 1):
        if step == grow_at + 1 and grow_state is not None:
            inrank_fx.set_ranks(model, START_RANK, opt, widths=START_RANK + EXTRA,
                                grow_state=grow_state)
        before = [layer.U.detach().clone() for layer in layers]
        x, y = next(stream)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step > grow_at and grow_state is not None:
            per_layer = []
            for layer, old in zip(layers, before):
                delta = layer.U.detach() - old
                rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
                per_layer.append(rms(delta[:, START_RANK:]) / rms(delta[:, :START_RANK]))
            ratios.append(statistics.median(per_layer))
    return {"losses": losses, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grow-at", type=int, default=60)
    parser.add_argument("--after", type=int, default=40)
    parser.add_argument("--plot", help="write the loss curves around growth to this PNG")
    args = parser.parse_args()
    train_ids, _ = split(stdlib_corpus(1_000_000))
    runs = {name: run(None if name == "none" else name, args.grow_at, args.after, train_ids)
            for name in ("seeded", "unseeded", "none")}
    print("RMS update of new U columns / existing U columns (median over 16 layers):")
    print("step after growth  " + "  ".join(f"{i:>5}" for i in range(1, 11)))
    for name in ("seeded", "unseeded"):
        print(f"{name:<17}  " + "  ".join(f"{r:>5.2f}" for r in runs[name]["ratios"][:10]))
    print(f"\nmean training loss over the {args.after} steps after growth "
          "(same batches; the difference to no growth in brackets):")
    base = runs["none"]["losses"][args.grow_at:]
    for name, r in runs.items():
        after = r["losses"][args.grow_at:]
        diff = [a - b for a, b in zip(after, base)]
        print(f"  {name:<7} {statistics.mean(after):.4f}   ({statistics.mean(diff):+.4f}; "
              f"first 10 steps {statistics.mean(diff[:10]):+.4f})")
    if args.plot:
        plot(runs, args.grow_at, args.plot)
        print(f"plot written to {args.plot}")


def plot(runs: dict, grow_at: int, path: str) -> None:
    """Training loss minus the no-growth run's, on the same batches, around the growth step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    base = runs["none"]["losses"]
    start = max(0, grow_at - 10)
    for name, color, label in (("zero", "#c0392b", "grown, zero Adam state"),
                               ("seeded", "#2a7ab9", "grown, seeded second moments")):
        diff = [a - b for a, b in zip(runs[name]["losses"], base)]
        ax.plot(range(start + 1, len(diff) + 1), diff[start:], color=color, lw=1.2, label=label)
    ax.axhline(0.0, color="#8a8a8a", lw=0.8)
    ax.axvline(grow_at + 0.5, color="#555555", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss − loss without growth")
    ax.set_title(f"every layer grows {START_RANK} → {START_RANK + EXTRA} components "
                 f"after step {grow_at}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
