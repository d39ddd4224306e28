"""InRank's premise, measured: the cumulative weight update W_t − W_0 gains rank incrementally.

    python examples/theory_linear.py [--quick] [--plot docs/theory_linear.png] [--json FILE]

1. A 3-layer linear network f(x) = W3·W2·W1·x (d×d each) with orthogonal initialisation at a
   small scale, trained by full-batch gradient descent (whitened inputs: the loss is
   ½‖W3·W2·W1 − T‖²) on a teacher equal to the initial product plus a low-rank map with distinct
   singular values. The singular values of each layer's cumulative update are recorded over
   time: the modes switch on one after another, largest first (the staircase), and the
   effective rank of each update never drops.
2. The demo GPT trained densely with AdamW (every nn.Linear): the effective rank of each layer's
   cumulative update over training, where the effective rank is the rank inrank_fx's rule would
   give it (the default criterion and α, inrank_fx.InRankConfig()).
"""
from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.nn.spectrum import select_rank


def linear_staircase(dim: int = 24, singular_values=(4.0, 3.0, 2.0, 1.0), *, scale: float = 0.05,
                     lr: float = 0.05, steps: int = 800, record_every: int = 5,
                     seed: int = 0) -> dict:
    """Train the 3-layer linear network; every `record_every` steps, the singular values of each
    layer's cumulative update. Returns {"steps", "loss", "updates": [layer][record][value]}."""
    g = torch.Generator().manual_seed(seed)

    def orthonormal(n, k):
        return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q

    start = [orthonormal(dim, dim) * scale for _ in range(3)]
    modes = torch.tensor(singular_values, dtype=torch.float64)
    low_rank = (orthonormal(dim, len(modes)) * modes) @ orthonormal(dim, len(modes)).T
    teacher = start[2] @ start[1] @ start[0] + low_rank
    layers = [w.clone().requires_grad_() for w in start]
    record = {"steps": [], "loss": [], "updates": [[] for _ in layers]}
    for step in range(steps + 1):
        loss = 0.5 * (layers[2] @ layers[1] @ layers[0] - teacher).pow(2).sum()
        if step % record_every == 0:
            record["steps"].append(step)
            record["loss"].append(loss.item())
            for i, (w, w0) in enumerate(zip(layers, start)):
                record["updates"][i].append(torch.linalg.svdvals(w.detach() - w0).tolist())
        grads = torch.autograd.grad(loss, layers)
        with torch.no_grad():
            for w, grad in zip(layers, grads):
                w -= lr * grad
    record["modes"] = list(singular_values)
    return record


def saturation_steps(record: dict, layer: int, fraction: float = 0.9) -> list[int]:
    """For each teacher mode i, the first recorded step at which the i-th singular value of the
    layer's cumulative update reaches `fraction` of its final value."""
    history = record["updates"][layer]
    out = []
    for i in range(len(record["modes"])):
        final = history[-1][i]
        out.append(next(s for s, values in zip(record["steps"], history)
                        if values[i] >= fraction * final))
    return out


def effective_ranks(record: dict, layer: int, floor: float = 0.05) -> list[int]:
    """Singular values of the layer's cumulative update above `floor` × its final largest one."""
    history = record["updates"][layer]
    cut = floor * history[-1][0]
    return [sum(v > cut for v in values) for values in history]


def gpt_update_ranks(steps: int, gpt: GPTConfig, *, record_every: int, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train the demo GPT densely; every `record_every` steps, the rule's rank of each layer's
    cumulative update W_t − W_0. Returns {"steps", "ranks": {layer: [rank per record]}}."""
    rule = inrank_fx.InRankConfig()
    torch.manual_seed(seed)
    model = GPT(gpt)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.lm_head}
    start = {n: m.weight.detach().clone() for n, m in linears.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    train_ids, _ = split(stdlib_corpus(1_000_000))
    stream = batches(train_ids, gpt.block_size, 16, torch.Generator().manual_seed(seed))
    record = {"steps": [], "ranks": {n: [] for n in linears}}
    for step in tqdm(range(1, steps + 1), desc="dense GPT", disable=not progress):
        x, y = next(stream)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % record_every == 0 or step == steps:
            record["steps"].append(step)
            for n, m in linears.items():
                s = torch.linalg.svdvals((m.weight.detach() - start[n]).double())
                rank = select_rank(s, rule.threshold, rule.criterion, full_rank=s.numel())
                record["ranks"][n].append(rank)
    return record


def plot(linear: dict, gpt: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 3.8))
    history = torch.tensor(linear["updates"][0])
    for i in range(len(linear["modes"]) + 2):
        left.plot(linear["steps"], history[:, i], lw=1.2,
                  label=f"σ{i + 1}" if i < len(linear["modes"]) else None)
    left.set_xlabel("gradient descent step")
    left.set_ylabel("singular value of W1(t) − W1(0)")
    left.set_title("3-layer linear net: modes switch on in order")
    left.legend(frameon=False, fontsize=7)
    for name, ranks in gpt["ranks"].items():
        right.plot(gpt["steps"], ranks, lw=1, label=name.replace("transformer.", ""))
    right.set_xlabel("AdamW step")
    right.set_ylabel("rule's rank of W(t) − W(0)")
    right.set_title("demo GPT, dense: rank of the cumulative update")
    right.legend(frameon=False, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short GPT run (tests)")
    parser.add_argument("--plot", help="write the two figures to this PNG")
    parser.add_argument("--json", help="write the recorded trajectories to this file")
    args = parser.parse_args()

    linear = linear_staircase()
    print("3-layer linear network, teacher modes", linear["modes"])
    for layer in range(3):
        print(f"  W{layer + 1}: mode i reaches 90% of its final size at steps "
              f"{saturation_steps(linear, layer)}")
        ranks = effective_ranks(linear, layer)
        changes = [(s, r) for k, (s, r) in enumerate(zip(linear["steps"], ranks))
                   if k == 0 or r != ranks[k - 1]]
        print(f"  W{layer + 1}: effective rank of the cumulative update (step, rank): {changes}")

    if args.quick:
        gpt_cfg, steps, every = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64), 30, 10
    else:
        gpt_cfg, steps, every = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128), 600, 25
    gpt = gpt_update_ranks(steps, gpt_cfg, record_every=every)
    print(f"\ndemo GPT (dense, AdamW): rank of W_t − W_0 by the rule at steps {gpt['steps']}")
    for name, ranks in gpt["ranks"].items():
        print(f"  {name:<30} {ranks}")
    if args.plot:
        plot(linear, gpt, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"linear": linear, "gpt": gpt}, f)


if __name__ == "__main__":
    main()
