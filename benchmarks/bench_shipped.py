"""The shipped artifact: dense and slim GPTs as ONNX files, in float32 and with int8 weights
(ONNX Runtime dynamic quantization), measured side by side: file size, latency, validation loss.

    python benchmarks/bench_shipped.py [--teacher FILE.pt] [--budget 0.4] [--iters 200]
                                       [--json FILE] [--quick]

The dense model is the demo GPT trained with bench_slim's recipe (or a saved teacher, e.g. the
`dense.pt` that `inrank-fx demo` leaves); the slim model is `inrank_fx.compress(dense, budget,
calibration)` fine-tuned with the recipe docs/SLIM.md chose. Each is exported by
`inrank_fx.export.to_onnx` (verified in ONNX Runtime), then quantized with
`onnxruntime.quantization.quantize_dynamic` (int8 weights of MatMul / Gemm, activations quantized
on the fly). The four files are timed in turns in one loop (batch 1 and 8, one thread each way
as set by ONNX Runtime's defaults) and scored on the same validation batches through ONNX
Runtime. Prints sizes, median latencies with their 90% bootstrap intervals as ratios to dense
float32, and validation losses.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import inrank_fx
from inrank_fx._timing import median_ratio_interval
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT, load_checkpoint
from inrank_fx.demo.slim import FineTune, fine_tune, text_calibration
from inrank_fx.export import to_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import QUICK as QUICK_PROTOCOL  # noqa: E402
from bench_convergence import Protocol  # noqa: E402
from bench_slim import train  # noqa: E402

DENSE_LR = 4e-3  # bench_slim's sweep for the teacher (docs/SLIM.md)


def trained_dense(protocol: Protocol, train_ids, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(protocol.gpt)
    train(model, DENSE_LR, protocol.steps, seed, protocol, train_ids)
    return model


def quantized(path: Path) -> Path:
    """The int8-weight copy of an ONNX file, beside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return out


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def val_loss(sess, val_ids, block: int, batches_n: int, seed: int = 10_000) -> float:
    stream = batches(val_ids, block, 16, torch.Generator().manual_seed(seed))
    name = sess.get_inputs()[0].name
    losses = []
    for _ in range(batches_n):
        x, y = next(stream)
        logits = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
    return statistics.mean(losses)


def latencies(sessions: dict, x: np.ndarray, iters: int) -> dict[str, list[float]]:
    """Each session's call times, the sessions called in turns so that load falls on all."""
    times = {name: [] for name in sessions}
    for _ in range(3):  # warm-up
        for sess in sessions.values():
            sess.run(None, {sess.get_inputs()[0].name: x})
    for _ in range(iters):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: x})
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a dense GPT checkpoint (save_checkpoint / dense.pt)")
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, a few steps")
    args = parser.parse_args(argv)
    protocol = QUICK_PROTOCOL if args.quick else Protocol()
    recipe = FineTune(steps=10, batch=protocol.batch) if args.quick else FineTune()
    iters = 10 if args.quick else args.iters
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    train_ids, val_ids = split(stdlib_corpus(protocol.corpus_bytes))
    dense = load_checkpoint(args.teacher) if args.teacher else trained_dense(protocol, train_ids)
    block = dense.config.block_size
    slim = inrank_fx.compress(dense, args.budget, text_calibration(train_ids, block))
    fine_tune(slim, train_ids, recipe)
    example = (torch.randint(0, dense.config.vocab_size, (1, block)),)
    result = {"budget": args.budget, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, model in (("dense", dense), ("slim", slim)):
            path = Path(tmp) / f"{name}.onnx"
            to_onnx(model.eval(), example, path)
            files[name], files[f"{name} int8"] = path, quantized(path)
        sessions = {name: session(path) for name, path in files.items()}
        evals = 4 if args.quick else protocol.eval_batches
        for name, path in files.items():
            result["models"][name] = {"file_bytes": path.stat().st_size,
                                      "val_loss": val_loss(sessions[name], val_ids, block, evals)}
        for batch in (1, 8):
            x = torch.randint(0, dense.config.vocab_size, (batch, block)).numpy()
            times = latencies(sessions, x, iters)
            for name in files:
                low, high = median_ratio_interval(times[name], times["dense"])
                result["models"][name][f"batch {batch}"] = {
                    "median_ms": statistics.median(times[name]) * 1e3,
                    "ratio_to_dense": statistics.median(times[name])
                    / statistics.median(times["dense"]),
                    "interval": [low, high]}
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(result: dict) -> str:
    dense = result["models"]["dense"]
    lines = [f"{'file':<12} {'MB':>6} {'size':>6} {'val loss':>9} "
             f"{'batch 1 ms':>11} {'/ dense (90% CI)':>22} {'batch 8 ms':>11} "
             f"{'/ dense (90% CI)':>22}"]
    for name, m in result["models"].items():
        cells = []
        for batch in ("batch 1", "batch 8"):
            t = m[batch]
            cells.append(f"{t['median_ms']:>11.2f} {t['ratio_to_dense']:>8.3f} "
                         f"({t['interval'][0]:.3f}-{t['interval'][1]:.3f})")
        lines.append(f"{name:<12} {m['file_bytes'] / 1e6:>6.2f} "
                     f"{m['file_bytes'] / dense['file_bytes']:>6.3f} {m['val_loss']:>9.4f} "
                     + " ".join(cells))
    lines.append(f"slim: compress(dense, {result['budget']}, calibration) + fine-tune; int8: ONNX "
                 "Runtime dynamic quantization (int8 weights); latency ratios are of medians, "
                 "timed in turns, with 90% bootstrap intervals")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
