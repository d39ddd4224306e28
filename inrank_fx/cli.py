"""The `inrank-fx` command (also `python -m inrank_fx`): demo, bench, compress, summary.

Bad input is one line on stderr naming the value, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .errors import InRankError
from .vocabulary import ALLOCATIONS, BACKENDS, INITS

# Parsing and --help come before any import of torch (seconds): every import of torch or of the
# rest of inrank_fx is inside the command that needs it; the choices come from the torch-free
# vocabulary, as the library's do.


class UsageError(InRankError):
    """A bad command-line value; the message names it."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except UsageError as err:
        print(f"inrank-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"inrank-fx {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inrank-fx",
        description="InRank incremental low-rank training for PyTorch models, as a torch.fx pass.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (_add_demo, _add_bench, _add_compress, _add_summary):
        add(commands)
    return parser


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="train a GPT dense and with InRank, export and compare (the main job)",
        description="Train the demo GPT twice from the same seed (dense, and InRank with its "
                    "defaults: ranks adapt until they settle, then stay fixed), each at its own "
                    "tuned learning rate with warm-up and cosine decay, both "
                    "under torch.compile, compare them, export the InRank model to ONNX (verified "
                    "in ONNX Runtime), compare inference on every backend, and write a report "
                    "folder: results.json, ranks.csv, summary.txt, model.onnx and PNG plots.")
    demo.add_argument("--quick", action="store_true", help="a smaller model and run (about a minute on 2 CPU cores)")
    demo.add_argument("--steps", type=int, help="optimizer steps per model (default 2000, quick 200)")
    demo.add_argument("--data", type=Path, help="train on this text file instead of the Python stdlib sources")
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--out", type=Path, default=Path("inrank-demo"), help="report folder (replaced if it exists; default ./inrank-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-compile", action="store_true", help="train eagerly instead of under torch.compile")
    demo.set_defaults(run=run_demo_command)


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", help="throughput of dense vs factored on every backend",
        description="Measure dense against factored side by side on eager, torch.compile, ONNX "
                    "Runtime and TensorRT (where available): a single layer (--shape), the demo "
                    "GPT (--model gpt), or any importable model factory (--model pkg.mod:fn).")
    bench.add_argument("--shape", default=None, help="a layer IN x OUT, e.g. 1024x4096 (the default when --model is not given)")
    bench.add_argument("--rank", type=int, default=128, help="rank of the factored layer with --shape (default 128)")
    bench.add_argument("--rows", type=int, default=2048, help="input rows with --shape (default 2048)")
    bench.add_argument("--model", default=None, help="'gpt' or an importable factory 'package.module:function'")
    bench.add_argument("--input", default=None, help="input shape for --model, e.g. 1x3x224x224 (gpt: batch x tokens, default 8x128)")
    bench.add_argument("--init-rank", default="0.125", help="rank for --model: an int, a fraction of full rank, or 'auto' (default 0.125)")
    bench.add_argument("--backends", default=",".join(("eager", "compile", "onnxruntime", "tensorrt")),
                       help="comma-separated subset of eager,compile,onnxruntime,tensorrt")
    bench.add_argument("--train", action="store_true", help="time a full training step instead of inference")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--iters", type=int, default=20)
    bench.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.png")
    bench.add_argument("--no-malloc-tuning", action="store_true",
                       help="keep glibc's default of returning large freed blocks to the OS")
    bench.set_defaults(run=run_bench_command)


def _add_compress(commands) -> None:
    compress = commands.add_parser(
        "compress", help="make a trained model smaller to a parameter budget, fine-tune, export",
        description="Factor a trained model so that its factored layers hold at most --budget of "
                    "their dense parameters, each layer's rank allocated from its measured "
                    "spectrum and truncated where its outputs change least on calibration "
                    "inputs; fine-tune a GPT on text; freeze; export to ONNX (verified in ONNX "
                    "Runtime); write model.pt, model.onnx, compression.txt and results.json.")
    compress.add_argument("--model", required=True,
                          help="the demo's dense checkpoint (inrank-demo/dense.pt: calibration and "
                               "fine-tune on the demo corpus or --data) or an importable factory "
                               "'package.module:function' (with --input)")
    compress.add_argument("--budget", type=float, required=True,
                          help="the factored layers' share of their dense parameters, in (0, 1], "
                               "e.g. 0.4")
    compress.add_argument("--allocation", default="global", choices=ALLOCATIONS,
                          help="global: ranks where the spectra say rank is cheapest (default); "
                               "uniform: one rank fraction for every layer")
    compress.add_argument("--data", type=Path, help="text for a GPT's calibration and fine-tune "
                                                   "(default: the Python stdlib sources)")
    compress.add_argument("--input", default=None, help="a factory model's input shape, e.g. "
                                                        "1x3x224x224 (random calibration inputs)")
    compress.add_argument("--finetune-steps", type=int, default=None,
                          help="fine-tune steps for a GPT (default 300; 0 skips)")
    compress.add_argument("--lr", type=float, default=None, help="fine-tune peak learning rate")
    compress.add_argument("--out", type=Path, default=Path("inrank-slim"),
                          help="output folder (replaced if it exists; default ./inrank-slim)")
    compress.add_argument("--seed", type=int, default=0)
    compress.set_defaults(run=run_compress_command)


def _add_summary(commands) -> None:
    summary = commands.add_parser(
        "summary", help="what transform would factor in a model, and at what cost",
        description="Transform a model from a factory and print the summary table.")
    summary.add_argument("--model", required=True, help="'gpt' or an importable factory 'package.module:function'")
    summary.add_argument("--init", default="svd", choices=INITS)
    summary.add_argument("--init-rank", default="auto", help="an int, a fraction of full rank, or 'auto' (default)")
    summary.set_defaults(run=run_summary_command)


# -- demo ---------------------------------------------------------------------------------------

def run_demo_command(args) -> int:
    from .demo.job import run_demo, settings_for

    if args.data is not None:
        from .demo.corpus import file_corpus

        try:
            file_corpus(args.data)
        except (OSError, ValueError) as err:
            raise UsageError(f"--data {err}") from None
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist")
    _check_device(args.device)
    try:
        settings = settings_for(args.quick, args.steps)
    except ValueError as err:
        raise UsageError(str(err)) from None
    logging.getLogger("inrank_fx").setLevel(logging.WARNING)
    run_demo(args.out, data=args.data, device=args.device, settings=settings, seed=args.seed,
             compile=not args.no_compile)
    return 0


# -- bench --------------------------------------------------------------------------------------

def run_bench_command(args) -> int:
    import torch

    from . import InRankConfig, transform
    from .tools.bench import compare, tune_cpu_allocator

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"--backends {args.backends!r}: choose from {','.join(BACKENDS)}")
    device = _check_device(args.device)
    if args.model is not None and args.shape is not None:
        raise UsageError("give --shape or --model, not both")
    if args.model is None:
        n_in, n_out = _parse_dims("--shape", args.shape or "1024x4096", count=2)
        if not 1 <= args.rank <= min(n_in, n_out):
            raise UsageError(f"--rank {args.rank}: must be in [1, {min(n_in, n_out)}] for a {n_in}x{n_out} layer")
        dense = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
        config = InRankConfig(init="svd", init_rank=args.rank, buffer=0, min_features=1)
        inputs = (torch.randn(args.rows, n_in),)
    else:
        dense, inputs = _model_and_inputs(args.model, args.input)
        config = InRankConfig(init="svd", init_rank=_parse_rank(args.init_rank), buffer=0)
    if device.type == "cpu" and not args.no_malloc_tuning and tune_cpu_allocator():
        print("(glibc malloc keeps large freed blocks, as tcmalloc/jemalloc setups do; "
              "--no-malloc-tuning to measure without)")
    dense = dense.eval().to(device)
    inputs = tuple(x.to(device) for x in inputs)
    factored = transform(dense, config)
    result = compare(dense, factored, inputs, backends=backends, train=args.train, iters=args.iters)
    print(result.table())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result.to_json(args.out / "bench.json")
        result.plot(args.out / "bench.png")
        print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


# -- compress -------------------------------------------------------------------------------------

def run_compress_command(args) -> int:
    if not 0.0 < args.budget <= 1.0:
        raise UsageError(f"--budget {args.budget}: a fraction in (0, 1], e.g. 0.4")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise UsageError(f"--finetune-steps {args.finetune_steps}: must be >= 0")
    if args.lr is not None and args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    import dataclasses

    import torch

    from .demo.slim import FineTune, run_compress, text_calibration

    if args.model.endswith(".pt"):
        from .demo.corpus import split
        from .demo.gpt import load_checkpoint
        from .demo.job import load_text

        if not Path(args.model).is_file():
            raise UsageError(f"--model {args.model}: no such file")
        try:
            model = load_checkpoint(args.model)
            text, _ = load_text(args.data, 5_000_000)
        except (OSError, ValueError) as err:
            raise UsageError(f"--model/--data: {err}") from None
        train_ids, val_ids = split(text)
        block = model.config.block_size
        calibration = text_calibration(train_ids, block, seed=args.seed)
        example = (calibration[0][:1],)
        recipe = FineTune()
        if args.finetune_steps is not None:
            recipe = dataclasses.replace(recipe, steps=args.finetune_steps)
        if args.lr is not None:
            recipe = dataclasses.replace(recipe, lr=args.lr)
        text_ids = (train_ids, val_ids)
    else:
        if args.data is not None or args.finetune_steps or args.lr is not None:
            raise UsageError("--data, --finetune-steps and --lr need a GPT checkpoint as --model")
        model, example = _model_and_inputs(args.model, args.input)
        torch.manual_seed(args.seed)
        x = example[0]  # token ids (the 'gpt' factory) are their own calibration
        calibration = [torch.randn_like(x) for _ in range(8)] if x.is_floating_point() else [x]
        recipe, text_ids = None, None
    run_compress(args.out, model.eval(), args.budget, calibration, example,
                 allocation=args.allocation, text=text_ids, recipe=recipe, seed=args.seed)
    return 0


# -- summary ------------------------------------------------------------------------------------

def run_summary_command(args) -> int:
    import warnings

    from . import InRankConfig, summary, transform

    model, _ = _model_and_inputs(args.model, None, need_inputs=False)
    try:
        config = InRankConfig(init=args.init, init_rank=_parse_rank(args.init_rank))
    except ValueError as err:
        raise UsageError(str(err)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(summary(transform(model, config)))
    return 0


# -- parsing helpers ----------------------------------------------------------------------------

def _parse_dims(flag: str, text: str, count: int | None = None) -> tuple[int, ...]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims) or (count is not None and len(dims) != count):
        form = "INxOUT, e.g. 1024x4096" if count == 2 else "dimensions joined by x, e.g. 1x3x224x224"
        raise UsageError(f"{flag} {text!r}: expected {form}")
    return dims


def _parse_rank(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--init-rank {text!r}: expected an int, a fraction or 'auto'") from None


def _check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _model_and_inputs(spec: str, input_shape: str | None, need_inputs: bool = True):
    import torch

    if spec == "gpt":
        from .demo.gpt import GPT, GPTConfig

        config = GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=256)
        batch, tokens = _parse_dims("--input", input_shape or "8x128", count=2)
        if tokens > config.block_size:
            raise UsageError(f"--input {input_shape}: at most {config.block_size} tokens")
        return GPT(config), (torch.randint(0, config.vocab_size, (batch, tokens)),)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {spec!r}: expected 'gpt' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as err:
        raise UsageError(f"--model {spec!r}: calling {attr}() failed ({type(err).__name__}: {err})") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    if not need_inputs:
        return model, None
    if input_shape is None:
        raise UsageError(f"--model {spec!r} needs --input, e.g. --input 1x3x224x224")
    return model, (torch.randn(*_parse_dims("--input", input_shape)),)
