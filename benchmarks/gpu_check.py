"""One prepared device check: what only a GPU can measure, in one short run.

    python benchmarks/gpu_check.py --out DIR              # one CUDA GPU: about 7 minutes at most
    python benchmarks/gpu_check.py --cpu --tiny --out DIR # the same code at toy sizes on CPU (CI)

Writes DIR/gpu_check.json (every section below, with what was skipped and why) and
DIR/gpu_check.md (a short table). Sections, in the order they run:

  device       the GPU's name, memory and capability; torch, CUDA and library versions
  correctness  the CUDA checks (tests/gpu/test_cuda.py runs the same functions): factored
               layer parity in fp32 and bf16, rank changes under torch.compile (compiled output
               against eager, recompiles counted, never a fall back to eager), freeze parity,
               optimizer state across a resize
  training     a GPT-2-small-shaped model (12 x 768, context 1024, vocab 50304, bf16 autocast,
               torch.compile, AdamW) on text from the Python standard library's sources, dense
               vs InRank while its ranks adapt and after the InRank-Efficient stop, in one
               process: tokens/s and their ratios, recompiles per rank event, peak memory
  inference    dense vs frozen at 25% rank, compiled, batch 1 and 32 (context 1024, bf16):
               latency ratio next to the FLOP-ideal and the time-based (Amdahl) ceiling, then
               with CUDA graphs (mode="reduce-overhead", static shapes)
  width        the run that would settle the width trend of docs/RESULTS.md section 3
               (bench_regimes' width part, past the CPU's reach): the protocol GPT of
               bench_convergence at n_embd 512 and 1024, dense at 1/2, 3/4 and the full width
               and InRank's defaults at the full width, each at the rate its sweep chose at
               width 128 moved to the width; seed 0, then seed 1 while the budget lasts; the
               defaults' distance to the narrower dense model at equal shipped parameters
  skipped      what did not run (TensorRT, onnxruntime-gpu, a section past the time budget)

`--budget` (seconds, default 400) bounds the run: a part that would start past it is skipped
with that reason, and the JSON is always written. Exit status: 0, or 1 when a correctness
check failed, or 2 at once without CUDA and without --cpu.

`--cpu --tiny` runs every section's code on the CPU at toy sizes, compiling with the aot_eager
backend (dynamo and AOTAutograd guard, trace and recompile as under inductor, without its
code generation): its figures are not performance figures; it exists so that this script keeps
working before a GPU is lent (tests/scripts/test_gpu_check.py runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    layers: int
    heads: int
    embd: int
    context: int
    vocab: int
    train_batch: int
    warmup_steps: int  # optimizer steps before InRank's first rank check
    check_every: int
    stop_after: int  # InRank-Efficient: ranks freeze (truncation) after this many steps
    timed_steps: int  # dense, and InRank after the stop
    inference_batches: tuple[int, ...]
    inference_calls: int
    trend_widths: tuple[int, ...]  # the width section's model widths
    trend_quick: bool  # the width section on bench_convergence's quick protocol


FULL = Sizes(layers=12, heads=12, embd=768, context=1024, vocab=50304, train_batch=8,
             warmup_steps=10, check_every=10, stop_after=30, timed_steps=30,
             inference_batches=(32, 1), inference_calls=30, trend_widths=(512, 1024),
             trend_quick=False)
TINY = Sizes(layers=2, heads=2, embd=64, context=64, vocab=256, train_batch=4,
             warmup_steps=2, check_every=2, stop_after=8, timed_steps=4,
             inference_batches=(4, 1), inference_calls=5, trend_widths=(64,), trend_quick=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


# -- correctness: the CUDA checks (tests/gpu/test_cuda.py calls these too) -------------------


def _rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _mlp(device, dtype=None):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device, dtype)


def check_layer_parity(device: str, dtype_name: str) -> dict:
    """A full-rank factored MLP computes the dense one's function, forward and backward."""
    import torch

    import inrank_fx

    dtype = getattr(torch, dtype_name)
    tolerance = {"float32": 1e-4, "bfloat16": 3e-2}[dtype_name]
    dense = _mlp(device)
    full = inrank_fx.transform(dense, inrank_fx.InRankConfig(init="svd", init_rank=1.0, buffer=0,
                                                             min_features=1)).to(dtype=dtype)
    dense = dense.to(dtype=dtype)
    x = torch.randn(128, 64, device=device, dtype=dtype)
    with _no_tf32():
        with torch.no_grad():
            error = _rel_err(full(x), dense(x))
        x_grad = x.clone().requires_grad_()
        full(x_grad).square().mean().backward()
        x_dense = x.clone().requires_grad_()
        dense(x_dense).square().mean().backward()
        grad_error = _rel_err(x_grad.grad, x_dense.grad)
    return {"passed": error < tolerance and grad_error < tolerance, "output_rel_err": error,
            "input_grad_rel_err": grad_error, "tolerance": tolerance}


@contextlib.contextmanager
def _no_tf32():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def check_rank_changes_under_compile(device: str, backend: str, events: int = 6) -> dict:
    """Rank changes (growth and truncation) with a compiled training step: the compiled output
    matches eager after every change, at most one recompile per event, and dynamo must not
    give up (hitting the recompile limit raises instead of falling back to eager)."""
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import inrank_fx

    torch._dynamo.reset()
    model = inrank_fx.transform(_mlp(device), inrank_fx.InRankConfig(init="random", init_rank=2,
                                                                      buffer=0, min_features=1))
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 64, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    worst, per_event = 0.0, []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), _no_tf32():
        compiled(x).square().mean().backward()
        for event in range(events):
            rank = [5, 3, 9, 14, 4, 12][event % 6]
            inrank_fx.set_ranks(model, rank, opt, widths=rank + 1, generator=generator)
            frames = counter.frame_count
            out = compiled(x)
            per_event.append(counter.frame_count - frames)
            worst = max(worst, _rel_err(out, model(x)))
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
    return {"passed": worst < 1e-4 and max(per_event) <= 1, "events": events,
            "recompiles_per_event": per_event, "compiled_graphs": counter.frame_count,
            "compiled_vs_eager_rel_err": worst, "backend": backend}


def check_freeze_parity(device: str) -> dict:
    """A model at 25% rank, frozen to plain modules, computes what it computed."""
    import torch

    import inrank_fx

    model = inrank_fx.transform(_mlp(device), inrank_fx.InRankConfig(init="svd", init_rank=0.25,
                                                                      buffer=4, min_features=1))
    frozen = inrank_fx.freeze(model)
    x = torch.randn(32, 64, device=device)
    with torch.no_grad(), _no_tf32():
        error = _rel_err(frozen(x), model(x))
    on_device = all(p.device.type == torch.device(device).type for p in frozen.parameters())
    return {"passed": error < 1e-5 and on_device, "rel_err": error, "ranks": inrank_fx.ranks(model)}


def check_optimizer_state_across_resize(device: str) -> dict:
    """AdamW's moments follow a layer through growth and truncation: shapes match the new
    factors, the kept components' moments are carried over, and training goes on."""
    import torch

    import inrank_fx

    model = inrank_fx.transform(_mlp(device), inrank_fx.InRankConfig(init="svd", init_rank=4,
                                                                      buffer=0, min_features=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64, device=device)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    layer = model[0]
    before = opt.state[layer.V]["exp_avg"].clone()
    inrank_fx.set_ranks(model, {"0": 8}, opt)  # growth
    grown = opt.state[layer.V]["exp_avg"]
    carried = bool(torch.equal(grown[:, :4], before)) and bool((grown[:, 4:] == 0).all())
    inrank_fx.set_ranks(model, {"0": 3}, opt)  # truncation
    shapes_ok = all(opt.state[p]["exp_avg"].shape == p.shape for p in (layer.U, layer.V))
    model(x).square().mean().backward()
    opt.step()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"passed": carried and shapes_ok and finite, "moments_carried_on_growth": carried,
            "state_shapes_match": shapes_ok, "finite_after_step": bool(finite)}


def correctness_checks(device: str, compile_backend: str) -> dict[str, callable]:
    return {
        "layer parity fp32": lambda: check_layer_parity(device, "float32"),
        "layer parity bf16": lambda: check_layer_parity(device, "bfloat16"),
        "rank changes under torch.compile": lambda: check_rank_changes_under_compile(
            device, compile_backend),
        "freeze parity": lambda: check_freeze_parity(device),
        "optimizer state across a resize": lambda: check_optimizer_state_across_resize(device),
    }


def run_correctness(device: str, compile_backend: str) -> list[dict]:
    results = []
    for name, check in correctness_checks(device, compile_backend).items():
        start = time.perf_counter()
        try:
            result = check()
        except Exception as error:  # recorded, not raised: the other sections still run
            result = {"passed": False, "error": f"{type(error).__name__}: {error}"[:500],
                      "traceback": traceback.format_exc()[-2000:]}
        results.append({"name": name, **result, "seconds": time.perf_counter() - start})
    return results


# -- training throughput --------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gpt_config(sizes: Sizes):
    from inrank_fx.demo.gpt import GPTConfig

    return GPTConfig(block_size=sizes.context, vocab_size=sizes.vocab, n_layer=sizes.layers,
                     n_head=sizes.heads, n_embd=sizes.embd)


def run_training(device, sizes: Sizes, backend: str, budget: Budget) -> dict:
    """Dense, then InRank (adapting, then after its stop), each compiled, bf16 autocast."""
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import inrank_fx
    from inrank_fx.demo.corpus import split, stdlib_corpus, step_batch
    from inrank_fx.demo.gpt import GPT, lm_loss
    from inrank_fx.nn import factored_layers

    config = _gpt_config(sizes)
    tokens_per_step = sizes.train_batch * sizes.context
    train_ids, _ = split(stdlib_corpus(max(200_000, 4 * tokens_per_step * 4)))

    def batch(step):
        x, y = step_batch(train_ids, sizes.context, sizes.train_batch, 0, step)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def make_step(model, opt):
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter)

        def step(i):
            x, y = batch(i)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(compiled(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        return step, counter

    def timed(step, i):
        _sync(device)
        start = time.perf_counter()
        loss = step(i)
        _sync(device)
        return time.perf_counter() - start, loss.detach().item()

    result: dict = {"model": f"GPT {sizes.layers}x{sizes.embd}, context {sizes.context}, vocab "
                             f"{sizes.vocab}, batch {sizes.train_batch}",
                    "tokens_per_step": tokens_per_step, "compile_backend": backend,
                    "autocast": "bfloat16"}

    # dense
    torch._dynamo.reset()
    _reset_peak(device)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    result["dense_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step, counter = make_step(model, opt)
    start = time.perf_counter()
    for i in range(2):  # compile, then one more warm step
        timed(step, i)
    result["dense_first_steps_s"] = time.perf_counter() - start
    times = [timed(step, 2 + i)[0] for i in range(sizes.timed_steps)]
    dense_step = statistics.median(times)
    result["dense"] = {"median_step_s": dense_step, "tokens_per_s": tokens_per_step / dense_step,
                       "compiled_graphs": counter.frame_count, "peak_memory": _peak_memory(device)}
    del model, opt, step
    if not budget.allows(2.5 * result["dense_first_steps_s"] + 60):
        result["inrank"] = {"skipped": f"time budget: {budget.elapsed():.0f} s of "
                                       f"{budget.seconds:.0f} s used after dense"}
        return result

    # InRank: adapting from init_rank 2 with the library's rule, then the InRank-Efficient stop
    torch._dynamo.reset()
    _reset_peak(device)
    torch.manual_seed(0)
    cfg = inrank_fx.InRankConfig(warmup_steps=sizes.warmup_steps, check_every=sizes.check_every,
                                 stop_after=sizes.stop_after)
    model = inrank_fx.transform(GPT(config).to(device), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ctrl = inrank_fx.attach(model, opt)
    step, counter = make_step(model, opt)
    adapting, events = [], []
    start_adapting = time.perf_counter()
    layers = factored_layers(model)

    def shapes():
        return {name: (layer.rank, layer.width) for name, layer in layers.items()}

    for i in range(sizes.stop_after):
        before, frames = shapes(), counter.frame_count
        seconds, loss = timed(step, i)
        after = shapes()
        resized = sum(after[n][1] != before[n][1] for n in after)  # widths: what recompiles
        adapting.append({"step": i + 1, "seconds": seconds, "rank_event": after != before,
                         "recompiles": counter.frame_count - frames})
        if after != before:
            events.append({"step": i + 1, "layers_resized": resized,
                           "ranks_changed": sum(after[n][0] != before[n][0] for n in after),
                           "mean_rank": statistics.mean(r for r, _ in after.values())})
    adapting_wall = time.perf_counter() - start_adapting
    # a recompile after an event shows at the next compiled call: attribute it to that event
    for event in events:
        after = [s for s in adapting if s["step"] == event["step"] + 1]
        event["recompiles_next_step"] = after[0]["recompiles"] if after else None
    peak_adapting = _peak_memory(device)
    _reset_peak(device)
    frames = counter.frame_count
    after_stop = [timed(step, sizes.stop_after + i) for i in range(sizes.timed_steps)]
    if events and events[-1]["step"] == sizes.stop_after:  # the stop's truncation
        events[-1]["recompiles_next_step"] = counter.frame_count - frames
    # Throughput while adapting: every step after the first two (compile, warm-up) that did
    # not recompile, rank checks included; the compiles are counted and timed apart.
    steady = [s["seconds"] for s in adapting[2:] if not s["recompiles"]]
    inrank_after = statistics.median(t for t, _ in after_stop)
    ranks = inrank_fx.ranks(model)
    result["inrank"] = {
        "config": {"warmup_steps": cfg.warmup_steps, "check_every": cfg.check_every,
                   "stop_after": cfg.stop_after, "init_rank": cfg.init_rank,
                   "threshold": cfg.threshold},
        "stop_step": ctrl.stop_step,
        "rank_events": events,
        "compiled_graphs": counter.frame_count,
        "adapting": {
            "mean_step_s": statistics.mean(steady) if steady else None,
            "tokens_per_s": tokens_per_step / statistics.mean(steady) if steady else None,
            "steps_timed": len(steady),
            "wall_s_with_compiles": adapting_wall, "peak_memory": peak_adapting,
        },
        "after_stop": {"median_step_s": inrank_after, "tokens_per_s": tokens_per_step / inrank_after,
                       "peak_memory": _peak_memory(device)},
        "final_ranks": {"min": min(ranks.values()), "max": max(ranks.values()),
                        "mean": statistics.mean(ranks.values())},
        "params": sum(p.numel() for p in model.parameters()),
    }
    dense_rate = result["dense"]["tokens_per_s"]
    result["ratios"] = {
        "adapting_tokens_per_s_vs_dense": (result["inrank"]["adapting"]["tokens_per_s"] or 0)
        / dense_rate,
        "after_stop_tokens_per_s_vs_dense": result["inrank"]["after_stop"]["tokens_per_s"]
        / dense_rate,
        "params_vs_dense": result["inrank"]["params"] / result["dense_params"],
    }
    if device.type == "cuda":
        result["ratios"]["peak_memory_after_stop_vs_dense"] = (
            result["inrank"]["after_stop"]["peak_memory"] / result["dense"]["peak_memory"])
    ctrl.detach()
    return result


# -- inference latency -----------------------------------------------------------------------


def _free_stand_ins(model, names):
    """A copy of `model` whose layers `names` cost (almost) nothing: each returns its input's
    first feature broadcast to its output width. Its latency is the rest of the model's."""
    import torch
    from torch import nn

    class Free(nn.Module):
        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :1].expand(*x.shape[:-1], self.out_features)

    copy_ = copy.deepcopy(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        layer = copy_.get_submodule(name)
        setattr(copy_.get_submodule(parent), attr, Free(layer.out_features))
    return copy_


def _flops(model, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def run_inference(device, sizes: Sizes, backend: str | None, budget: Budget,
                  skipped: list) -> dict:
    """Dense vs frozen-at-25% vs the dense model with its factored layers free, compiled."""
    import torch
    import torch._dynamo

    import inrank_fx
    from inrank_fx.demo.gpt import GPT

    torch.manual_seed(0)
    dense = GPT(_gpt_config(sizes)).to(device).eval()
    factored = inrank_fx.transform(dense, inrank_fx.InRankConfig(init="svd", init_rank=0.25,
                                                                 buffer=0))
    names = list(inrank_fx.ranks(factored))
    frozen = inrank_fx.freeze(factored)
    rest = _free_stand_ins(dense, names)
    models = {name: m.to(dtype=torch.bfloat16) for name, m in
              (("dense", dense), ("frozen", frozen), ("rest", rest))}
    result: dict = {"model": f"GPT {sizes.layers}x{sizes.embd}, context {sizes.context}, "
                             f"vocab {sizes.vocab}, bf16 weights, frozen at init_rank=0.25",
                    "compile_backend": backend or "inductor", "runs": []}
    # In order of what matters most if the budget runs short: compiled latency at the large
    # batch, CUDA graphs where launch overhead dominates (batch 1), then the other two. Each
    # (model, mode, batch) is its own static-shape compile.
    large, small = max(sizes.inference_batches), min(sizes.inference_batches)
    plan = [("default", large), ("reduce-overhead", small), ("default", small),
            ("reduce-overhead", large)]
    if device.type != "cuda":
        plan = [(mode, batch) for mode, batch in plan if mode == "default"]
        skipped.append({"what": "inference with CUDA graphs (mode='reduce-overhead')",
                        "why": "CUDA graphs need a CUDA device (--cpu)"})
    estimate = 60.0
    for mode, batch in dict.fromkeys(plan):
        label = f"mode={mode}, batch {batch}"
        if not budget.allows(estimate):
            skipped.append({"what": f"inference {label}",
                            "why": f"time budget: {budget.elapsed():.0f} s of {budget.seconds:.0f}"
                                   f" s used (`--sections inference` runs it alone)"})
            continue
        started = time.perf_counter()
        x = torch.randint(0, sizes.vocab, (batch, sizes.context), device=device)
        # the Amdahl ceiling needs the rest of the model's time: measured without CUDA graphs
        names = ["dense", "frozen"] + (["rest"] if mode == "default" else [])
        flops = {n: _flops(models[n], x) for n in names}
        latency = {}
        for name in names:
            torch._dynamo.reset()  # every model's forward is GPT.forward: separate caches
            options = {"backend": backend} if backend else {"mode": mode}
            compiled = torch.compile(models[name], **options)
            with torch.no_grad():
                for _ in range(3):  # compile, warm up (CUDA graphs record on a later call)
                    compiled(x)
                times = []
                for _ in range(sizes.inference_calls):
                    _sync(device)
                    start = time.perf_counter()
                    compiled(x)
                    _sync(device)
                    times.append(time.perf_counter() - start)
            latency[name] = statistics.median(times)
        run = {"mode": mode, "batch": batch, "latency_s": latency,
               "speedup": latency["dense"] / latency["frozen"],
               "flop_ideal": flops["dense"] / flops["frozen"]}
        if "rest" in latency:
            layers_dense = flops["dense"] - flops["rest"]
            layers_factored = flops["frozen"] - flops["rest"]
            share = max(0.0, 1.0 - latency["rest"] / latency["dense"])  # time in those layers
            run.update({
                "time_share_of_factored_layers": share,
                "amdahl_ceiling": 1.0 / ((1.0 - share) + share * layers_factored
                                         / max(layers_dense, 1)),
                "free_layers_ceiling": latency["dense"] / latency["rest"],
            })
        run["seconds"] = time.perf_counter() - started
        estimate = run["seconds"]
        result["runs"].append(run)
    return result


# -- the run ---------------------------------------------------------------------------------


# -- width ----------------------------------------------------------------------------------

def run_width_trend(device, sizes: Sizes, budget: Budget) -> dict:
    """Does InRank's gap to the narrower dense model shrink as the model widens? The protocol
    of bench_convergence (steps, batch and context held) at the widths of `sizes`, every arm at
    the rate chosen at width 128 (docs/convergence.json) moved to its width; runs in order of
    what matters (the defaults and dense of the full width first), each only if the budget
    allows it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convergence import ARMS, QUICK, Protocol, run
    from bench_regimes import at_width, dense_at, gap_to, shipped

    from inrank_fx.demo.corpus import split, stdlib_corpus

    protocol = QUICK if sizes.trend_quick else Protocol()
    chosen = json.loads((Path(__file__).resolve().parents[1] / "docs" / "convergence.json")
                        .read_text())["chosen"]
    reference = 128  # the width docs/convergence.json's rates were chosen at
    data = split(stdlib_corpus(protocol.corpus_bytes))
    result: dict = {"protocol": f"bench_convergence {'quick' if sizes.trend_quick else 'default'}"
                    f" ({protocol.steps} steps, batch {protocol.batch}, context "
                    f"{protocol.gpt.block_size}, {protocol.gpt.n_layer} layers)",
                    "runs": [], "gaps": [], "skipped": []}
    estimate = 30.0
    for seed in (0, 1):
        for width in sizes.trend_widths:
            arms = [dense_at(width, reference, (chosen["dense"],)),
                    at_width(replace(ARMS["defaults"], lrs=(chosen["defaults"],)), width,
                             reference),
                    *[dense_at(w, reference, (chosen["dense"],))
                      for w in (width // 2, 3 * width // 4)]]
            group = []
            for arm in arms:
                if not budget.allows(estimate * 1.2):
                    result["skipped"].append(f"{arm.name} seed {seed}: time budget")
                    continue
                started = time.perf_counter()
                r = run(arm, arm.lrs[0], seed, protocol, data, device=device)
                estimate = time.perf_counter() - started
                r = {k: v for k, v in r.items() if k not in ("curve", "train_curve", "ranks",
                                                               "trajectory")}
                group.append(r | {"width": arm.width or width, "wall_s": estimate})
            result["runs"] += group
            dense = [r for r in group if r["arm"].startswith("dense")]
            for r in group:
                if not r["arm"].startswith("dense"):
                    result["gaps"].append({"width": width, "seed": seed, "arm": r["arm"],
                                           "vs_narrower_dense": gap_to(dense, shipped(r))})
    return result


def device_section(device) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "type": device.type, "cuda": torch.version.cuda}
    for module in ("onnx", "onnxscript", "onnxruntime", "transformers", "torch_tensorrt"):
        spec = importlib.util.find_spec(module)
        if spec is not None:
            try:
                info[module] = getattr(__import__(module), "__version__", "present")
            except Exception as error:  # installed but broken: say so
                info[module] = f"fails to import: {type(error).__name__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"name": torch.cuda.get_device_name(device),
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}",
                     "bf16": torch.cuda.is_bf16_supported()})
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def backend_skips(device) -> list[dict]:
    """Backends this check does not time, and why."""
    skipped = []
    if importlib.util.find_spec("torch_tensorrt") is None:
        skipped.append({"what": "TensorRT", "why": "torch_tensorrt is not installed (the GPU "
                        "image has none; pip install 'inrank-fx[gpu]' where it can be)"})
    elif device.type != "cuda":
        skipped.append({"what": "TensorRT", "why": "needs a CUDA device"})
    else:
        skipped.append({"what": "TensorRT", "why": "installed; its engine builds do not fit this "
                        "check's budget: `inrank-fx bench --backends tensorrt` times it"})
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = None
    if providers is None:
        skipped.append({"what": "onnxruntime-gpu", "why": "onnxruntime is not installed"})
    elif "CUDAExecutionProvider" not in providers:
        skipped.append({"what": "onnxruntime-gpu", "why": "onnxruntime has no "
                        f"CUDAExecutionProvider (providers: {', '.join(providers)}; the CPU "
                        "build)"})
    else:
        skipped.append({"what": "onnxruntime-gpu", "why": "CUDAExecutionProvider present; "
                        "`inrank-fx bench --backends onnxruntime` times it"})
    return skipped


def table(report: dict) -> str:
    """The short markdown table written beside the JSON."""
    lines = [f"# gpu_check on {report['device'].get('name')} (torch {report['device']['torch']})",
             "", f"mode: {report['mode']}; {report['seconds']:.0f} s", "",
             "| correctness | passed | detail |", "|---|---|---|"]
    checks = report["correctness"]
    if isinstance(checks, dict):  # the section itself failed
        lines.append(f"| (section) | NO | {checks.get('error')} |")
        checks = []
    for c in checks:
        detail = {k: v for k, v in c.items() if k not in ("name", "passed", "traceback")}
        lines.append(f"| {c['name']} | {'yes' if c['passed'] else 'NO'} | "
                     f"{json.dumps(detail, default=str)[:160]} |")
    training = report.get("training", {})
    if "ratios" in training:
        r, t = training["ratios"], training
        lines += ["", f"training: {t['model']}, {t['compile_backend']}", "",
                  "| arm | tokens/s | vs dense |", "|---|---|---|",
                  f"| dense | {t['dense']['tokens_per_s']:.0f} | 1.00 |",
                  f"| InRank adapting | {t['inrank']['adapting']['tokens_per_s'] or 0:.0f} | "
                  f"{r['adapting_tokens_per_s_vs_dense']:.2f} |",
                  f"| InRank after the stop | {t['inrank']['after_stop']['tokens_per_s']:.0f} | "
                  f"{r['after_stop_tokens_per_s_vs_dense']:.2f} |",
                  "", f"recompiles per rank event: "
                  f"{[e['recompiles_next_step'] for e in t['inrank']['rank_events']]}; "
                  f"params {r['params_vs_dense']:.2f}x dense"]
    runs = report.get("inference", {}).get("runs", [])
    if runs:
        lines += ["", "| inference | dense ms | frozen ms | speedup | FLOP-ideal | Amdahl ceiling |",
                  "|---|---|---|---|---|---|"]
        for run in runs:
            lat = run["latency_s"]
            ceiling = f"{run['amdahl_ceiling']:.2f}x" if "amdahl_ceiling" in run else "-"
            lines.append(f"| {run['mode']}, batch {run['batch']} | {lat['dense'] * 1e3:.2f} | "
                         f"{lat['frozen'] * 1e3:.2f} | {run['speedup']:.2f}x | "
                         f"{run['flop_ideal']:.2f}x | {ceiling} |")
    width = report.get("width", {})
    if width.get("runs"):
        lines += ["", f"width: {width['protocol']}", "",
                  "| arm | width | seed | lr | val | params | shipped params |",
                  "|---|---|---|---|---|---|---|"]
        for r in width["runs"]:
            lines.append(f"| {r['arm']} | {r['width']} | {r['seed']} | {r['lr']:.2g} | "
                         f"{r.get('val_frozen', r['val']):.4f} | {r['params']:,} | "
                         f"{r['params_frozen']:,} |")
        lines += [f"- {g['arm']} seed {g['seed']}: {g['vs_narrower_dense']:+.4f} against the "
                  "narrower dense model" if g["vs_narrower_dense"] is not None else
                  f"- {g['arm']} seed {g['seed']}: outside the dense widths measured"
                  for g in width["gaps"]]
    if report["skipped"]:
        lines += ["", "skipped:"] + [f"- {s['what']}: {s['why']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


SECTIONS = ("correctness", "training", "inference", "width")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: CI)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False). Run it on a GPU machine, or pass "
              f"--cpu --tiny for the CPU smoke run.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the tree
    from inrank_fx._io import atomic_destination

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = TINY if args.tiny else FULL
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's training would run
        torch.backends.cudnn.allow_tf32 = True
    report: dict = {"mode": f"{'cpu' if args.cpu else 'cuda'}{', tiny' if args.tiny else ''}",
                    "device": device_section(device), "sizes": sizes.__dict__,
                    "correctness": [], "training": {}, "inference": {}, "width": {},
                    "skipped": backend_skips(device)}

    def section(name: str, run, estimate: float):
        if name not in args.sections:
            report["skipped"].append({"what": name, "why": "not asked for (--sections)"})
            return
        if not budget.allows(estimate):
            report["skipped"].append({"what": name, "why": f"time budget: {budget.elapsed():.0f}"
                                      f" s of {budget.seconds:.0f} s used"})
            return
        try:
            report[name] = run()
        except Exception as error:  # recorded with its traceback; the JSON is still written
            report[name] = {"error": f"{type(error).__name__}: {error}"[:500],
                            "traceback": traceback.format_exc()[-3000:]}
        report.setdefault("section_seconds", {})[name] = budget.elapsed()
        print(f"gpu_check: {name} done at {budget.elapsed():.0f} s", file=sys.stderr, flush=True)

    section("correctness", lambda: run_correctness(device.type, backend), 10)
    section("training", lambda: run_training(device, sizes, backend, budget), 120)
    section("inference", lambda: run_inference(device, sizes, None if device.type == "cuda"
                                               else backend, budget, report["skipped"]), 45)
    section("width", lambda: run_width_trend(device, sizes, budget), 30)
    report["seconds"] = budget.elapsed()
    with atomic_destination(out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str))
    with atomic_destination(out / "gpu_check.md") as tmp:
        tmp.write_text(table(report))
    print(table(report))
    checks = report["correctness"]
    failed = ([c["name"] for c in checks if not c.get("passed")] if isinstance(checks, list)
              else ["(the section: " + str(checks.get("error")) + ")"])
    if failed:
        print(f"gpu_check: correctness checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
