"""What InRank costs before the first step, at scale: build, transform, materialize, train.

    python benchmarks/bench_scale.py [--shapes 85M 300M 1B] [--phases ...] [--repeat N]
                                     [--steps 3] [--json FILE] [--quick]

For demo-GPT shapes (vocab 256, block 256) of about 85 M (12x768), 300 M (24x1024) and 1 B
(36x1536) parameters, each measurement runs in a fresh process (so that its peak host memory,
ru_maxrss, is its own) and reports seconds and peak RSS:

  build              GPT(config) on the CPU, with its own init
  transform copy     inrank_fx.transform(model): a copy is factored (the default)
  transform inplace  inrank_fx.transform(model, inplace=True)
  meta               build under torch.device("meta"), transform (copy, then in place), and
                     inrank_fx.materialize(model, "cpu", init_fn=model._init_weights)
  train dense / inrank   the first --steps AdamW steps (batch 4 x 256; the median step after the
                     first), InRank attached with the defaults

With --repeat N every measurement runs N times (fresh processes) and the table shows medians
(peaks: the largest). Ratios are against building the dense model in the same run: transform / build is the
acceptance figure of issue 18 (at most 3x for 24x1024 with the defaults, on 2 cores). Training
rows are skipped for shapes whose dense AdamW state would not fit (--max-train-params).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # name: (n_layer, n_embd, n_head)
    "85M": (12, 768, 12),
    "300M": (24, 1024, 16),
    "1B": (36, 1536, 16),
    "tiny": (2, 256, 4),  # --quick
}
PHASES = ("build", "transform copy", "transform inplace", "meta", "train dense", "train inrank")


def gpt_config(shape: str):
    from inrank_fx.demo.gpt import GPTConfig

    n_layer, n_embd, n_head = SHAPES[shape]
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=256,
                     block_size=256)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(shape: str, phase: str, steps: int) -> dict:
    """One phase in this process; a dict of seconds and the peak RSS."""
    import torch

    import inrank_fx
    from inrank_fx.demo.gpt import GPT

    # Resolved before any timing: the first use of inrank_fx's names imports the pass (fx,
    # networkx), a once-per-process cost that is not the transform's.
    transform, materialize = inrank_fx.transform, inrank_fx.materialize
    torch.manual_seed(0)
    config = gpt_config(shape)
    result = {"shape": shape, "phase": phase, "threads": torch.get_num_threads(),
              "baseline_mb": peak_mb()}
    if phase == "meta":
        with torch.device("meta"):
            model, result["build_s"] = timed(lambda: GPT(config))
        _, result["transform_copy_s"] = timed(lambda: transform(model))
        model, result["transform_inplace_s"] = timed(lambda: transform(model, inplace=True))
        _, result["materialize_s"] = timed(
            lambda: materialize(model, "cpu", init_fn=model._init_weights))
    else:
        model, result["build_s"] = timed(lambda: GPT(config))
        result["params"] = sum(p.numel() for p in model.parameters())
        if phase in ("transform copy", "train inrank"):
            model, result["transform_s"] = timed(lambda: transform(model))
        elif phase == "transform inplace":
            model, result["transform_s"] = timed(lambda: transform(model, inplace=True))
        if phase.startswith("train"):
            result["step_s"] = train_steps(model, steps, phase == "train inrank")
    result["peak_mb"] = peak_mb()
    return result


def train_steps(model, steps: int, inrank: bool) -> float:
    import torch

    import inrank_fx
    from inrank_fx.demo.gpt import lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    if inrank:
        inrank_fx.attach(model, opt)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        data = torch.randint(0, 256, (4, 257), generator=gen)
        start = time.perf_counter()
        loss = lm_loss(model(data[:, :-1]), data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)


def run_isolated(shape: str, phase: str, steps: int, timeout_s: float) -> dict:
    """`measure` in a fresh interpreter (its own peak memory); a failure is reported, not raised."""
    cmd = [sys.executable, __file__, "--_one", shape, phase, "--steps", str(steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "phase": phase, "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"shape": shape, "phase": phase, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    """One record from repeated runs: the median of every time, the largest peak."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    merged = dict(runs[0], runs=len(runs))
    for key, value in runs[0].items():
        if key.endswith("_s"):
            merged[key] = statistics.median(r[key] for r in runs)
            merged[key + "_all"] = [r[key] for r in runs]
        elif key.endswith("_mb"):
            merged[key] = max(r[key] for r in runs)
    return merged


def report(results: list[dict]) -> str:
    from inrank_fx._table import format_table

    rows = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        by = {r["phase"]: r for r in results if r["shape"] == shape}
        build = by.get("build", {})
        base_s, base_mb = build.get("build_s"), build.get("peak_mb")

        def cell(phase, key, ratio_to=None):
            r = by.get(phase, {})
            if "error" in r:
                return "failed"
            value = r.get(key)
            if value is None:
                return "-"
            if ratio_to:
                return f"{value:.2f} s ({value / ratio_to:.1f}x)"
            return f"{value:.2f} s"

        def memory(phase):
            r = by.get(phase, {})
            if "peak_mb" not in r or not base_mb:
                return "-"
            return f"{r['peak_mb'] / 1024:.1f} GiB ({r['peak_mb'] / base_mb:.2f}x)"

        params = build.get("params")
        dense_step = by.get("train dense", {}).get("step_s")
        inrank_step = by.get("train inrank", {}).get("step_s")
        rows.append([
            f"{shape} ({params / 1e6:.0f} M)" if params else shape,
            cell("build", "build_s"),
            cell("transform copy", "transform_s", base_s),
            memory("transform copy"),
            cell("transform inplace", "transform_s", base_s),
            memory("transform inplace"),
            cell("meta", "transform_inplace_s"),
            cell("meta", "materialize_s", base_s),
            memory("meta"),
            (f"{dense_step:.2f} / {inrank_step:.2f} s ({inrank_step / dense_step:.2f}x)"
             if dense_step and inrank_step else "-"),
        ])
    header = ["model", "build", "transform (copy)", "peak", "transform (in place)", "peak",
              "meta transform", "materialize", "peak", "step dense / InRank"]
    errors = [f"  {r['shape']} {r['phase']}: {r['error']}" for r in results if "error" in r]
    return "\n".join([format_table(header, rows, left=1), *errors])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["85M", "300M", "1B"], choices=SHAPES)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-train-params", type=float, default=4e8,
                        help="skip the training rows above this many parameters (AdamW holds 4x)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--quick", action="store_true", help="the tiny shape only (a smoke test)")
    parser.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(measure(*args._one, args.steps)))
        return 0
    shapes = ["tiny"] if args.quick else args.shapes
    results = []
    for shape in shapes:
        n_layer, n_embd, _ = SHAPES[shape]
        params = 12 * n_layer * n_embd ** 2
        for phase in args.phases:
            if phase.startswith("train") and params > args.max_train_params:
                continue
            runs = [run_isolated(shape, phase, args.steps, args.timeout)
                    for _ in range(args.repeat)]
            results.append(median_of(runs))
            print(f"{shape} {phase}: {results[-1]}", file=sys.stderr, flush=True)
    print(f"demo GPT, vocab 256, block 256; torch threads {results[0].get('threads')}, "
          f"{os.cpu_count()} CPUs; median of {args.repeat} run(s); peak = max RSS of the "
          "process (ratio: to building dense)")
    print(report(results))
    if args.json:
        from inrank_fx._io import atomic_destination

        with atomic_destination(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
