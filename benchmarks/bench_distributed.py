"""InRank's distributed cost: 2 processes (DDP, gloo) against 1, on this machine's CPU cores.

    python benchmarks/bench_distributed.py [--steps 300] [--batch 16] [--json FILE]

Runs examples/ddp_train.py twice on the same job (the demo GPT, n_embd 128, InRank-Efficient
with checks every 25 steps and the stop at 150): once as one process using every core, once
under torchrun as 2 processes with one core each. Prints step time and throughput side by side,
their ratio, and where InRank's own time goes on 2 processes: the share of training time spent
in its collectives and the cost per collective of each kind (state check, rank decision, factor
broadcast). Both runs must end with the same ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ddp_train.py"


def run(processes: int, out: Path, args) -> list[dict]:
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // processes)))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    job = [str(EXAMPLE), "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *job]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(processes), *job]
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return [json.loads((out / f"process-{i}.json").read_text()) for i in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, Path(tmp) / "one", args)[0]
        two = run(2, Path(tmp) / "two", args)
    if any(p["ranks"] != one["ranks"] for p in two):
        raise SystemExit("1 and 2 processes ended with different ranks")

    step_one = one["median_step_ms"]
    step_two = max(p["median_step_ms"] for p in two)
    train_two = max(p["train_seconds"] for p in two)
    collective_two = max(p["collective_seconds"] for p in two)
    inrank_two = max(p["inrank_seconds"] for p in two)
    print(f"job: demo GPT n_embd 128, {args.steps} steps, global batch {args.batch}, "
          f"{os.cpu_count()} cores; ranks agree: {sorted(set(one['ranks'].values()))}")
    print(f"{'':24}{'1 process':>12}{'2 processes':>14}{'2 / 1':>9}")
    print(f"{'median step (ms)':24}{step_one:>12.1f}{step_two:>14.1f}{step_two / step_one:>9.3f}")
    rate_one, rate_two = args.batch / step_one * 1e3, args.batch / step_two * 1e3
    print(f"{'samples / s':24}{rate_one:>12.0f}{rate_two:>14.0f}{rate_two / rate_one:>9.3f}")
    print(f"{'training time (s)':24}{one['train_seconds']:>12.1f}{train_two:>14.1f}"
          f"{train_two / one['train_seconds']:>9.3f}")
    print(f"\nInRank on 2 processes: {inrank_two:.2f} s in the controller "
          f"({inrank_two / train_two:.2%} of training), of which {collective_two:.3f} s in its "
          f"collectives ({collective_two / train_two:.2%} of training), "
          f"{two[0]['rank_events']} rank events")
    for kind, (count, seconds) in two[0]["collective_stats"].items():
        slowest = max(p["collective_stats"][kind][1] for p in two)
        print(f"  {kind:18} {count:>4} calls, {1e3 * seconds / count:6.2f} ms each on process 0, "
              f"{1e3 * slowest / count:6.2f} ms on the slowest process (waiting included)")
    if args.json:
        args.json.write_text(json.dumps({"one": one, "two": two}, indent=1))


if __name__ == "__main__":
    main()
