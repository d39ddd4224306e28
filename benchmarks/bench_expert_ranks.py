"""Expert stacks: ranks applied per stack (one width, the largest any expert asks for) or per
expert (each its own)? Measured on a mixture-of-experts GPT trained on the stdlib corpus.

    python benchmarks/bench_expert_ranks.py [--steps 600] [--seeds 0 1] [--stop-after N]
                                            [--json FILE]

The demo GPT (4 layers, n_embd 128, context 64, batch 16; AdamW with warm-up and cosine, the
demo's lr) with every MLP a mixture of 4 experts (top-2 routing, experts' weights stacked
E × out × in and run as batched matmuls), transformed with InRank's defaults. At every check
the rule is applied to each expert's spectrum on its own (what per-expert ranks would be) next
to the stack's decision (the largest of them: what the library applies). Reported per stack at
the InRank-Efficient stop: the experts' own ranks, the stack's, and the parameters of both
schemes; then the time of one forward + backward of a stack at those ranks, side by side in one
loop: the batched thin matmuls at the stack's rank (`expert_ranks="stack"`) against a loop over
the experts, each at its own rank (`expert_ranks="expert"`, no ragged kernels), also for more
experts (`--experts`). Then the same runs trained with `expert_ranks="expert"`: validation
loss, the stacks' factor parameters and the median step time of both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import inrank_fx
from inrank_fx.demo.corpus import split, stdlib_corpus, step_batch
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine
from inrank_fx.nn import ExpertList, InRankExperts, factored_layers
from inrank_fx.nn.spectrum import select_rank

GPT_CONFIG = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
EXPERTS, TOP_K, HIDDEN = 4, 2, 256
BATCH, LR, WARMUP = 16, 4e-3, 60


class MoEFeedForward(nn.Module):
    """Top-k routed experts, their weights stacked (experts × out × in); every expert runs on
    every token and the gates (zero for experts a token was not routed to) mix them, so each
    expert learns from its own tokens only."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, dim) * 0.02)
        self.w_out = nn.Parameter(torch.randn(experts, dim, hidden) * 0.02 / (2 * 4) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(1, B * T, C).expand(self.w_in.shape[0], -1, -1)
        gates = torch.softmax(self.router(x.reshape(B * T, C)), dim=-1)
        top, index = gates.topk(self.top_k, dim=-1)
        mix = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
        h = F.gelu(torch.bmm(tokens, self.w_in.mT))
        out = torch.bmm(h, self.w_out.mT)  # experts × tokens × dim
        return torch.einsum("te,etc->tc", mix, out).reshape(B, T, C)


def moe_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPT_CONFIG)
    for block in model.transformer.h:
        block.mlp = MoEFeedForward(GPT_CONFIG.n_embd, HIDDEN, EXPERTS, TOP_K)
    return model


def expert_ranks(ctrl, layer: InRankExperts) -> list[int]:
    """The rule applied to each expert's spectrum alone (what per-expert ranks would be)."""
    cfg = ctrl.config
    return [select_rank(s, cfg.threshold, cfg.criterion, min_rank=1, full_rank=layer.full_rank)
            for s in ctrl.spectrum(layer)]


def train(seed: int, steps: int, data, stop_after) -> dict:
    train_ids, _ = data
    config = inrank_fx.InRankConfig()
    if stop_after is not None:
        config = inrank_fx.InRankConfig(stop_after=stop_after)
    model = inrank_fx.transform(moe_gpt(seed), config)
    stacks = {n: m for n, m in factored_layers(model).items()
              if isinstance(m, InRankExperts)}
    assert stacks and not any(m.product_reads for m in stacks.values())
    opt = recipe_optimizer(model.parameters(), LR)
    ctrl = inrank_fx.attach(model, opt)
    sched = warmup_cosine(opt, steps, min(WARMUP, steps // 10))
    checks: list[dict] = []

    def on_step(step: int, loss: float) -> None:
        if ctrl.stopped and checks and checks[-1].get("stopped"):
            return
        if step % ctrl.config.check_every == 0 or ctrl.stopped:
            checks.append({"step": step, "loss": loss, "stopped": ctrl.stopped, "stacks": {
                n: {"stack": m.rank, "experts": expert_ranks(ctrl, m)} for n, m in stacks.items()}})

    stream = (step_batch(train_ids, GPT_CONFIG.block_size, BATCH, seed, s) for s in range(steps))
    losses, seconds = train_steps(model, opt, stream, steps, on_step=on_step, scheduler=sched,
                                  clip_norm=1.0)
    final = {n: {"stack": m.rank, "experts": expert_ranks(ctrl, m), "in": m.in_features,
                 "out": m.out_features} for n, m in stacks.items()}
    return {"seed": seed, "stop_step": ctrl.stop_step, "final_loss": statistics.mean(losses[-50:]),
            "val_loss": evaluate(model, data[1], GPT_CONFIG.block_size, seed=1234),
            "stack_params": sum(m.factored_params() for m in stacks.values()),
            "median_step_s": statistics.median(seconds[-100:]), "checks": checks, "final": final}


def train_per_expert(seed: int, steps: int, data, stop_after) -> dict:
    """The same run with ranks applied per expert (`expert_ranks="expert"`)."""
    train_ids, val_ids = data
    config = inrank_fx.InRankConfig(expert_ranks="expert", **(
        {} if stop_after is None else {"stop_after": stop_after}))
    model = inrank_fx.transform(moe_gpt(seed), config)
    lists = {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}
    assert lists and not any(m.product_reads for m in lists.values())
    opt = recipe_optimizer(model.parameters(), LR)
    ctrl = inrank_fx.attach(model, opt)
    sched = warmup_cosine(opt, steps, min(WARMUP, steps // 10))
    stream = (step_batch(train_ids, GPT_CONFIG.block_size, BATCH, seed, s) for s in range(steps))
    losses, seconds = train_steps(model, opt, stream, steps, scheduler=sched, clip_norm=1.0)
    return {"seed": seed, "stop_step": ctrl.stop_step, "final_loss": statistics.mean(losses[-50:]),
            "val_loss": evaluate(model, val_ids, GPT_CONFIG.block_size, seed=1234),
            "stack_params": sum(e.factored_params() for m in lists.values() for e in m),
            "median_step_s": statistics.median(seconds[-100:]),
            "final": {n: [e.rank for e in m] for n, m in lists.items()}}


def time_stack(out_f: int, in_f: int, stack_rank: int, ranks: list[int], tokens: int,
               repeats: int = 60) -> dict:
    """Forward + backward of one stack: batched thin matmuls at the stack's rank against a loop
    over experts at their own ranks, timed in turns."""
    g = torch.Generator().manual_seed(0)
    E = len(ranks)
    x = torch.randn(E, tokens, in_f, generator=g)
    stacked = [torch.randn(E, in_f, stack_rank, generator=g).requires_grad_(),
               torch.randn(E, out_f, stack_rank, generator=g).requires_grad_()]
    own = [(torch.randn(in_f, r, generator=g).requires_grad_(),
            torch.randn(out_f, r, generator=g).requires_grad_()) for r in ranks]

    def batched():
        v, u = stacked
        torch.bmm(torch.bmm(x, v), u.mT).sum().backward()

    def looped():
        sum(((x[e] @ v) @ u.mT).sum() for e, (v, u) in enumerate(own)).backward()

    times = {"stack": [], "per_expert": []}
    for i in range(repeats):
        order = (("stack", batched), ("per_expert", looped))
        for name, fn in (order if i % 2 else order[::-1]):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v[repeats // 6:]) for k, v in times.items()}


def expert_count_scaling(rows: list[dict], counts: list[int]) -> list[dict]:
    """Per-expert against per-stack as the number of experts grows: each expert's rank drawn
    (seeded) from the ranks measured on the w_in stacks, the stack at their largest."""
    measured = [r for row in rows if row["stack"].endswith("w_in") for r in row["experts"]]
    g = torch.Generator().manual_seed(0)
    result = []
    for experts in counts:
        ranks = [measured[i] for i in torch.randint(len(measured), (experts,), generator=g)]
        tokens = max(1, BATCH * GPT_CONFIG.block_size * TOP_K // experts)
        t = time_stack(HIDDEN, GPT_CONFIG.n_embd, max(ranks), ranks, tokens, repeats=30)
        result.append({"experts": experts, "tokens": tokens, "ranks": ranks,
                       "params_per_expert_over_stack": sum(ranks) / (experts * max(ranks)),
                       "time_per_expert_over_stack": t["per_expert"] / t["stack"],
                       "seconds": t})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="InRank-Efficient stop step (default: the library's, 'settled')")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64],
                        help="expert counts for the timing of more experts")
    parser.add_argument("--json", help="write every run's record here")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    data = split(stdlib_corpus(args.corpus_bytes))
    runs = [train(seed, args.steps, data, args.stop_after) for seed in args.seeds]
    expert_runs = [train_per_expert(seed, args.steps, data, args.stop_after) for seed in args.seeds]

    tokens = BATCH * GPT_CONFIG.block_size * TOP_K // EXPERTS  # tokens an expert gets, routed
    rows = []
    for run in runs:
        for name, f in run["final"].items():
            per_stack = len(f["experts"]) * f["stack"] * (f["in"] + f["out"])
            per_expert = sum(f["experts"]) * (f["in"] + f["out"])
            t = time_stack(f["out"], f["in"], f["stack"], f["experts"], tokens)
            rows.append({"seed": run["seed"], "stack": name, "experts": f["experts"],
                         "stack_rank": f["stack"], "params_per_expert_over_stack":
                         per_expert / per_stack, "seconds": t})
    print(f"stop step per seed: {[r['stop_step'] for r in runs]}; final train loss "
          f"{[round(r['final_loss'], 3) for r in runs]}")
    print(f"{'seed':>4}  {'stack':<26} {'expert ranks':<18} {'stack':>5}  "
          f"{'params per-expert/stack':>23}  {'time per-expert/stack':>21}")
    for r in rows:
        ratio = r["seconds"]["per_expert"] / r["seconds"]["stack"]
        print(f"{r['seed']:>4}  {r['stack']:<26} {str(r['experts']):<18} {r['stack_rank']:>5}  "
              f"{r['params_per_expert_over_stack']:>23.3f}  {ratio:>20.2f}x")
    saving = statistics.mean(r["params_per_expert_over_stack"] for r in rows)
    slow = statistics.median(r["seconds"]["per_expert"] / r["seconds"]["stack"] for r in rows)
    print(f"mean: per-expert ranks would hold {saving:.3f}x the stacks' factor parameters; "
          f"run as a loop over experts, a stack's forward+backward takes {slow:.2f}x (median)")
    print("\ntrained both ways (validation loss, the stacks' factor parameters, median step):")
    for arm, arm_runs in (("per stack", runs), ("per expert", expert_runs)):
        for r in arm_runs:
            print(f"  {arm:<10} seed {r['seed']}: val {r['val_loss']:.4f}  stop {r['stop_step']}  "
                  f"stack params {r['stack_params']:,}  step {r['median_step_s'] * 1e3:.1f} ms")
    scaling = expert_count_scaling(rows, args.experts)
    print("\nmore experts (ranks drawn from those measured above; a top-2 router's tokens "
          "spread over them; stack 256 x 128):")
    print(f"{'experts':>7}  {'tokens each':>11}  {'params per-expert/stack':>23}  "
          f"{'time per-expert/stack':>21}")
    for r in scaling:
        print(f"{r['experts']:>7}  {r['tokens']:>11}  {r['params_per_expert_over_stack']:>23.3f}  "
              f"{r['time_per_expert_over_stack']:>20.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "per_expert_runs": expert_runs, "rows": rows,
                       "scaling": scaling}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
