"""Slim models against the narrower dense model: compress a trained GPT to a budget, fine-tune it,
and compare with dense GPTs of every width trained from scratch.

    python benchmarks/bench_slim.py [--budget 0.4] [--seeds 0 1] [--json FILE] [--plot FILE.png]
                                    [--quick]

The protocol (bench_convergence's: the demo GPT, 4 layers, n_embd 128, context 64, batch 16,
AdamW, warm-up + cosine, clipping, the stdlib corpus):
- the teacher: dense width 128 trained for `steps` (2000) at the peak learning rate its own
  sweep chose on the first seed;
- the dense-width frontier: dense GPTs of widths 64..128 trained from scratch for as many
  steps as the teacher plus its fine-tune (2300), each width at the learning rate its own sweep
  chose; loss against shipped parameters and against training FLOPs;
- slim models: the teacher compressed to `budget` of its factored layers' parameters by each
  method below, then fine-tuned for `finetune_steps` (300, 15% of training; warm-up + cosine, each
  method at the learning rate its own sweep chose), ranks fixed:
    uniform-svd   one rank fraction for every layer, plain SVD (AIMET-style)
    uniform-act   the same ranks, each layer truncated on its calibration inputs (whitened)
    global-svd    ranks allocated from the spectra (`compress`, no calibration)
    global-act    `compress(model, budget, calibration)`: allocated from the weights' spectra,
                  each layer truncated on its calibration inputs (whitened)
    global-act-outputs  the same, allocated from the whitened spectra (the outputs')
    global-act-adapt    global-act with a 10% silent buffer, ranks adapting by the library's
                  default rule while fine-tuning (the shipped size follows the ranks; its FLOPs
                  are counted at the starting ranks)
    slice         SliceGPT-style (ICLR 2024's answer to the same question): LayerNorms folded
                  into the layers that read the stream, writes centred, the residual stream
                  rotated by the PCA of its (normalised) activations on the calibration batches,
                  one rotation for every layer, and cut to as many directions as the budget's
                  parameters allow (the head untied: a LayerNorm folds into it)
    prune-width   structured width pruning, what users pick instead (Torch-Pruning's magnitude
                  criterion): in every block keep the heads and MLP hidden units whose weights
                  (q, k, v rows and output columns; input row and output column) have the
                  largest L2 norm; a narrower dense model cut from the trained one
  Every method gets uniform's parameter count (the budget that uniform's one fraction reaches),
  so that they are compared at equal shipped parameters; calibration is 16 training batches.
- factor during training (Cuttlefish's question, with a budget): dense from scratch on the
  schedule of teacher + fine-tune (2300 steps), compressed as global-act at step 500 or 1000, the
  rest of the schedule at fixed ranks (fresh optimizer state), each at its own swept rate.
Prints the sweeps and the table: validation loss before and after the fine-tune per seed, shipped
parameters (the whole model as `freeze` gives it), training FLOPs (teacher + fine-tune), and the
distance to the dense-width frontier at the same shipped parameters. `--json` keeps every run and
is read back, so an interrupted run resumes; `--plot` draws loss against shipped parameters and
against training FLOPs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import inrank_fx
from inrank_fx.demo.corpus import batches, split, stdlib_corpus
from inrank_fx.demo.gpt import GPT
from inrank_fx.demo.training import evaluate, recipe_optimizer, train_steps, warmup_cosine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import QUICK as QUICK_PROTOCOL  # noqa: E402
from bench_convergence import Protocol, gap_to, step_flops, tune  # noqa: E402


@dataclass(frozen=True)
class Slim:
    protocol: Protocol = field(default_factory=Protocol)
    finetune_steps: int = 300
    budget: float = 0.4
    widths: tuple = (64, 80, 96, 112, 128)  # the frontier; n_head 4 divides each
    factor_at: tuple = (500, 1000)  # factor during training: dense until this step
    dense_lrs: tuple = (2e-3, 4e-3, 8e-3)
    finetune_lrs: tuple = (3e-4, 1e-3, 3e-3)
    calibration_batches: int = 16


QUICK = Slim(protocol=QUICK_PROTOCOL, finetune_steps=10, widths=(32, 48), factor_at=(30,),
             dense_lrs=(4e-3,), finetune_lrs=(1e-3,), calibration_batches=2)

@dataclass(frozen=True)
class Method:
    """How the teacher becomes a slim model: `compress(allocation, allocate_on)` with
    calibration or without; `adapt`: with a 10% buffer, ranks adapting by the library's default
    rule while fine-tuning (else fixed); `prune`: width pruning instead of factoring."""

    allocation: str | None
    calibrated: bool
    allocate_on: str = "weights"
    adapt: bool = False
    prune: bool = False
    slice: bool = False


METHODS = {
    "uniform-svd": Method("uniform", False),
    "uniform-act": Method("uniform", True),
    "global-svd": Method("global", False),
    "global-act": Method("global", True),
    "global-act-outputs": Method("global", True, "outputs"),
    "global-act-adapt": Method("global", True, adapt=True),
    "prune-width": Method(None, False, prune=True),
    "slice": Method(None, True, slice=True),
}


# -- SliceGPT-style slicing (Ashkboos et al., ICLR 2024): a narrower residual stream -----------

class StreamNorm(nn.Module):
    """LayerNorm without its affine part, on a stream that is already mean-zero: x·√d / ‖x‖
    with the norm over the dimensions kept (d: the width before slicing)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.width + self.eps)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def stream_rotation(teacher, calibration) -> torch.Tensor:
    """The principal directions (d × d, leading first) of the residual stream where it is read
    (the inputs of every LayerNorm), each position centred and normalised as LayerNorm does."""
    d = teacher.config.n_embd
    gram = torch.zeros(d, d, dtype=torch.float64)

    def record(module, args):
        nonlocal gram
        x = args[0].reshape(-1, d).to(torch.float64)
        x = x - x.mean(-1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gram += x.T @ x

    norms = [m for m in teacher.modules() if isinstance(m, nn.LayerNorm)]
    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        for x in calibration:
            teacher(x)
    finally:
        for h in handles:
            h.remove()
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, values.argsort(descending=True)]


@torch.no_grad()
def slice_gpt(teacher, rotation: torch.Tensor, keep: int):
    """A copy of the GPT whose residual stream is `keep` wide: every LayerNorm's scale and shift
    folded into the layers that read it, every write to the stream centred (so LayerNorm is a
    plain normalisation), the stream rotated by `rotation` (one for every layer) and cut to its
    `keep` leading directions. The head is untied from the embedding (a LayerNorm folds into
    it). With keep = n_embd it computes the teacher's function."""
    import copy

    model = copy.deepcopy(teacher)
    d = teacher.config.n_embd
    q = rotation[:, :keep].to(torch.float64)
    center = torch.eye(d, dtype=torch.float64) - 1.0 / d

    def reader(linear: nn.Linear, norm: nn.LayerNorm) -> nn.Linear:
        w = linear.weight.double() * norm.weight.double()
        b = (linear.bias.double() if linear.bias is not None else 0) + linear.weight.double() @ (
            norm.bias.double() if norm.bias is not None else torch.zeros(d, dtype=torch.float64))
        return _linear((w @ q).float(), b.float())

    def writer(linear: nn.Linear) -> nn.Linear:
        w, b = center @ linear.weight.double(), center @ linear.bias.double()
        return _linear((q.T @ w).float(), (q.T @ b).float())

    h = model.transformer
    eps = h.ln_f.eps
    for emb in ("wte", "wpe"):
        table = getattr(h, emb).weight.double() @ center @ q
        setattr(h, emb, nn.Embedding.from_pretrained(table.float(), freeze=False))
    model.lm_head = reader(teacher.lm_head, teacher.transformer.ln_f)
    for block, original in zip(h.h, teacher.transformer.h):
        attn = original.attn
        block.attn = PrunedAttention(reader(attn.c_attn, original.ln_1), writer(attn.c_proj),
                                     attn.n_head, attn.n_embd // attn.n_head)
        block.mlp.c_fc = reader(original.mlp.c_fc, original.ln_2)
        block.mlp.c_proj = writer(original.mlp.c_proj)
        block.ln_1, block.ln_2 = StreamNorm(d, eps), StreamNorm(d, eps)
    h.ln_f = StreamNorm(d, eps)
    return model


def slice_to(teacher, calibration, params_at_most: int):
    """The widest slicing of the teacher whose parameters are at most `params_at_most`."""
    rotation = stream_rotation(teacher, calibration)
    for keep in range(teacher.config.n_embd, 0, -1):
        model = slice_gpt(teacher, rotation, keep)
        if sum(p.numel() for p in model.parameters()) <= params_at_most:
            return model
    raise ValueError(f"no slicing holds at most {params_at_most} parameters")


# -- structured width pruning (the peer): heads and MLP hidden units by L2 norm ----------------

class PrunedAttention(nn.Module):
    """Causal self-attention over the heads that were kept (head size unchanged)."""

    def __init__(self, c_attn: nn.Linear, c_proj: nn.Linear, n_head: int, head_dim: int):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head, self.head_dim = c_attn, c_proj, n_head, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_head * self.head_dim, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


def _kept_linear(layer: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w, b = layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w, b = w[rows], b[rows] if b is not None else None
    return _linear(w if cols is None else w[:, cols], b)


def prune_width(teacher, fraction: float):
    """A copy of the GPT whose blocks keep round(fraction × heads) heads and as many MLP hidden
    units as brings the blocks' linear layers to `fraction` of their parameters, each chosen by
    the L2 norm of the weights it owns."""
    import copy

    model = copy.deepcopy(teacher)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        c = attn.n_embd
        dim = c // attn.n_head
        dense = sum(p.numel() for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
                    for p in m.parameters())
        heads = max(1, round(fraction * attn.n_head))
        w = attn.c_attn.weight.detach().view(3, attn.n_head, dim, c)
        score = w.pow(2).sum((0, 2, 3)) + attn.c_proj.weight.detach().view(
            c, attn.n_head, dim).pow(2).sum((0, 2))
        keep = score.topk(heads).indices.sort().values
        rows = torch.cat([(part * attn.n_head + h) * dim + torch.arange(dim)
                          for part in range(3) for h in keep])
        cols = torch.cat([h * dim + torch.arange(dim) for h in keep])
        block.attn = PrunedAttention(_kept_linear(attn.c_attn, rows=rows),
                                     _kept_linear(attn.c_proj, cols=cols), heads, dim)
        attn_params = sum(p.numel() for p in block.attn.parameters())
        per_unit = 2 * c + 1  # a c_fc row and its bias, a c_proj column
        units = max(1, int((fraction * dense - attn_params - c) // per_unit))
        score = mlp.c_fc.weight.detach().pow(2).sum(1) + mlp.c_fc.bias.detach().pow(2) \
            + mlp.c_proj.weight.detach().pow(2).sum(0)
        keep = score.topk(units).indices.sort().values
        mlp.c_fc = _kept_linear(mlp.c_fc, rows=keep)
        mlp.c_proj = _kept_linear(mlp.c_proj, cols=keep)
    return model


# -- training -----------------------------------------------------------------------------------

def train(model, lr: float, steps: int, seed: int, protocol: Protocol, train_ids, *,
          start: int = 0, stop: int | None = None, stream=None, adapt: bool = False):
    """The recipe over `steps` steps (warm-up over 5% of them, cosine to 10% of the peak), run
    from step `start` to `stop` (the rest of a schedule another model began: its learning
    rates, the batches that follow in `stream`). `adapt`: ranks move by the InRank rule."""
    opt = recipe_optimizer(model.parameters(), lr, protocol.weight_decay)
    if adapt:
        inrank_fx.attach(model, opt, seed=seed)
    sched = warmup_cosine(opt, steps, max(1, int(protocol.warmup_fraction * steps)),
                          protocol.floor)
    if start:
        with warnings.catch_warnings():  # a step of the schedule before any optimizer step
            warnings.simplefilter("ignore")
            sched.last_epoch = start - 1
            sched.step()
    stream = stream or batches(train_ids, protocol.gpt.block_size, protocol.batch,
                               torch.Generator().manual_seed(seed))
    train_steps(model, opt, stream, (stop or steps) - start, scheduler=sched,
                clip_norm=protocol.clip_norm)
    return stream


def val_loss(model, seed: int, protocol: Protocol, val_ids) -> float:
    loss = evaluate(model, val_ids, protocol.gpt.block_size, 10_000 + seed, protocol.eval_batches)
    return loss if math.isfinite(loss) else math.inf


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Bench:
    """Every run, keyed by a string, kept in `path` (JSON) after each run and read back from it;
    the teachers' weights beside it, so that an interrupted benchmark resumes."""

    def __init__(self, slim: Slim, data, path: str | None, log=print) -> None:
        self.slim, self.data, self.path, self.log = slim, data, path, log
        self.runs: dict[str, dict] = {}
        self.teachers: dict[tuple, dict] = {}
        if path and os.path.exists(path):
            saved = json.loads(Path(path).read_text())
            if saved.get("slim") == _jsonable(asdict(slim)):
                self.runs = saved["runs"]
                log(f"resuming: {len(self.runs)} runs read from {path}")

    def save(self, extra: dict | None = None) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        Path(tmp).write_text(json.dumps({"slim": _jsonable(asdict(self.slim)), "runs": self.runs,
                                         **(extra or {})}, indent=1))
        os.replace(tmp, self.path)  # never a half-written file

    def _cached(self, key: str, compute) -> dict:
        if key not in self.runs:
            self.runs[key] = compute()
            self.log(f"  {key:<44} val {self.runs[key]['val']:.4f}")
            self.save()
        return self.runs[key]

    # -- dense models from scratch ------------------------------------------------------------

    def dense(self, width: int, lr: float, seed: int, steps: int) -> dict:
        def compute():
            model = self._trained_dense(width, lr, seed, steps)
            return {"val": val_loss(model, seed, self.slim.protocol, self.data[1]),
                    "params": params(model), "flops": steps * _step_flops(model, self.slim)}
        return self._cached(f"dense w{width} lr{lr:g} s{seed} n{steps}", compute)

    def _trained_dense(self, width: int, lr: float, seed: int, steps: int):
        protocol = self.slim.protocol
        torch.manual_seed(seed)
        model = GPT(replace(protocol.gpt, n_embd=width))
        train(model, lr, steps, seed, protocol, self.data[0])
        return model

    def teacher(self, lr: float, seed: int):
        """The trained dense model of the teacher's width, its weights kept beside the JSON."""
        protocol = self.slim.protocol
        width, steps = protocol.gpt.n_embd, protocol.steps
        path = self.path and Path(f"{self.path}.teacher-lr{lr:g}-s{seed}.pt")
        if (width, lr, seed) not in self.teachers:
            if path and path.exists():
                state = torch.load(path)
            else:
                state = self._trained_dense(width, lr, seed, steps).state_dict()
                if path:
                    torch.save(state, f"{path}.tmp")
                    os.replace(f"{path}.tmp", path)
            self.teachers[(width, lr, seed)] = state
        torch.manual_seed(seed)
        model = GPT(protocol.gpt)
        model.load_state_dict(self.teachers[(width, lr, seed)])
        key = f"dense w{width} lr{lr:g} s{seed} n{steps}"
        if key not in self.runs:
            self.runs[key] = {"val": val_loss(model, seed, protocol, self.data[1]),
                              "params": params(model),
                              "flops": steps * _step_flops(model, self.slim)}
            self.log(f"  {key:<44} val {self.runs[key]['val']:.4f}")
            self.save()
        return model

    # -- slim models --------------------------------------------------------------------------

    def slim_model(self, method: str, teacher_lr: float, seed: int, budget: float):
        return self.compressed(METHODS[method], self.teacher(teacher_lr, seed), seed, budget)

    def compressed(self, method: Method, model, seed: int, budget: float):
        if method.prune:
            return prune_width(model, budget)
        protocol = self.slim.protocol
        calibration = None
        if method.calibrated:
            stream = batches(self.data[0], protocol.gpt.block_size, protocol.batch,
                             torch.Generator().manual_seed(20_000 + seed))
            calibration = [next(stream)[0] for _ in range(self.slim.calibration_batches)]
        if method.slice:  # as many parameters as the factored models ship, at most
            shipped = params(inrank_fx.freeze(inrank_fx.compress(model, budget)))
            return slice_to(model, calibration, shipped)
        config = inrank_fx.InRankConfig(buffer=0.1 if method.adapt else 0)
        return inrank_fx.compress(model, budget, calibration, allocation=method.allocation,
                                  allocate_on=method.allocate_on, config=config)

    def finetuned(self, method: str, teacher_lr: float, lr: float, seed: int,
                  budget: float) -> dict:
        def compute():
            protocol = self.slim.protocol
            model = self.slim_model(method, teacher_lr, seed, budget)
            before = val_loss(model, seed, protocol, self.data[1])
            teacher_flops = self.runs[f"dense w{protocol.gpt.n_embd} lr{teacher_lr:g} s{seed} "
                                      f"n{protocol.steps}"]["flops"]
            flops = teacher_flops + self.slim.finetune_steps * _step_flops(model, self.slim)
            train(model, lr, self.slim.finetune_steps, 30_000 + seed, protocol, self.data[0],
                  adapt=METHODS[method].adapt)
            return self._shipped(model, seed) | {"before": before, "flops": flops}
        return self._cached(f"{method} b{budget:.4f} lr{lr:g} s{seed}", compute)

    def _shipped(self, model, seed: int) -> dict:
        factored = hasattr(model, "_inrank_report")
        shipped = inrank_fx.freeze(model) if factored else model
        return {"val": val_loss(shipped, seed, self.slim.protocol, self.data[1]),
                "params": params(shipped),
                "fraction": model._inrank_report.compression.fraction if factored else None,
                "ranks": inrank_fx.ranks(model)}

    def factored_during(self, at: int, lr: float, seed: int, budget: float) -> dict:
        """Dense from scratch on the schedule of teacher + fine-tune; at step `at` compressed
        (global-act) to the budget, the rest of the schedule at fixed ranks."""
        def compute():
            protocol = self.slim.protocol
            total = protocol.steps + self.slim.finetune_steps
            torch.manual_seed(seed)
            model = GPT(protocol.gpt)
            flops = at * _step_flops(model, self.slim)
            stream = train(model, lr, total, seed, protocol, self.data[0], stop=at)
            model = self.compressed(METHODS["global-act"], model, seed, budget)
            before = val_loss(model, seed, protocol, self.data[1])
            flops += (total - at) * _step_flops(model, self.slim)
            train(model, lr, total, seed, protocol, self.data[0], start=at, stream=stream)
            return self._shipped(model, seed) | {"before": before, "flops": flops}
        return self._cached(f"factor-at-{at} b{budget:.4f} lr{lr:g} s{seed}", compute)


def _step_flops(model, slim: Slim) -> int:
    return step_flops(model, slim.protocol)[0]


def _jsonable(value):
    return json.loads(json.dumps(value))


# -- the protocol -------------------------------------------------------------------------------

def run(slim: Slim, seeds: list[int], bench: Bench, methods=tuple(METHODS)) -> dict:
    protocol = slim.protocol
    total = protocol.steps + slim.finetune_steps
    width = protocol.gpt.n_embd
    first = seeds[0]

    def tuned(name, lrs, loss_of):
        return tune(SimpleNamespace(name=name, lrs=lrs), loss_of)

    teacher_lr, teacher_sweep = tuned(
        "teacher", slim.dense_lrs, lambda lr: bench.dense(width, lr, first, protocol.steps)["val"])
    for seed in seeds:
        bench.teacher(teacher_lr, seed)
    result = {"teacher_lr": teacher_lr, "sweeps": {"teacher": teacher_sweep}, "chosen": {},
              "frontier": [], "slim": [], "teachers": []}
    result["teachers"] = [bench.dense(width, teacher_lr, s, protocol.steps) | {"seed": s}
                          for s in seeds]
    for w in slim.widths:
        lr, sweep = tuned(f"dense-{w}", slim.dense_lrs,
                          lambda lr, w=w: bench.dense(w, lr, first, total)["val"])
        result["sweeps"][f"dense-{w}"], result["chosen"][f"dense-{w}"] = sweep, lr
        result["frontier"] += [bench.dense(w, lr, s, total) | {"seed": s, "width": w}
                               for s in seeds]
    # every method at the parameter count that uniform's one rank fraction reaches
    probe = bench.slim_model("uniform-svd", teacher_lr, first, slim.budget)
    budget = probe._inrank_report.compression.fraction
    result["budget"] = budget
    for method in methods:
        lr, sweep = tuned(method, slim.finetune_lrs,
                          lambda lr, m=method: bench.finetuned(m, teacher_lr, lr, first,
                                                               budget)["val"])
        result["sweeps"][method], result["chosen"][method] = sweep, lr
        result["slim"] += [bench.finetuned(method, teacher_lr, lr, s, budget)
                           | {"seed": s, "method": method} for s in seeds]
    for at in slim.factor_at:
        name = f"factor-at-{at}"
        lr, sweep = tuned(name, slim.dense_lrs,
                          lambda lr, at=at: bench.factored_during(at, lr, first, budget)["val"])
        result["sweeps"][name], result["chosen"][name] = sweep, lr
        result["slim"] += [bench.factored_during(at, lr, s, budget) | {"seed": s, "method": name}
                           for s in seeds]
    return result


def report(result: dict) -> str:
    teachers = {r["seed"]: r for r in result["teachers"]}
    seeds = sorted(teachers)
    lines = ["learning-rate sweeps (validation loss, first seed; * = chosen)"]
    chosen = {"teacher": result["teacher_lr"], **result["chosen"]}
    for name, sweep in result["sweeps"].items():
        cells = "  ".join(f"{float(lr):.2g}: {v:.4f}{'*' if float(lr) == chosen[name] else ' '}"
                          for lr, v in sweep.items())
        lines.append(f"  {name:<12} {cells}")
    base = statistics.mean(r["params"] for r in teachers.values())
    base_flops = statistics.mean(r["flops"] for r in teachers.values())
    header = (f"{'model':<30} {'params':>6} {'FLOPs':>6} {'before':>7} "
              + " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
              + f" {'mean':>7} {'vs narrower dense':>18}")
    lines += ["", header, "-" * len(header)]

    def row(name, rs, gaps=None, before=None):
        vals = [r["val"] for r in rs]
        gap = "" if gaps is None else " ".join("out" if g is None else f"{g:+.3f}" for g in gaps)
        lines.append(f"{name:<30} {statistics.mean(r['params'] for r in rs) / base:>6.3f} "
                     f"{statistics.mean(r['flops'] for r in rs) / base_flops:>6.3f} "
                     f"{before if before is not None else '':>7} "
                     + " ".join(f"{v:>7.4f}" for v in vals)
                     + f" {statistics.mean(vals):>7.4f} {gap:>18}")

    row("dense 128 (teacher)", [teachers[s] for s in seeds])
    for w in sorted({r["width"] for r in result["frontier"]}, reverse=True):
        row(f"dense {w} from scratch", sorted((r for r in result["frontier"] if r["width"] == w),
                                              key=lambda r: r["seed"]))
    for method in result["chosen"]:
        if method.startswith("dense-"):
            continue
        rs = sorted((r for r in result["slim"] if r["method"] == method), key=lambda r: r["seed"])
        gaps = [gap_to(result["frontier"], r) for r in rs]
        before = f"{statistics.mean(r['before'] for r in rs):.4f}"
        row(f"{method} + fine-tune" if method in METHODS else method, rs, gaps, before)
    lines += ["", f"params: the whole model as shipped (frozen), relative to the teacher; FLOPs: "
              f"training (teacher + fine-tune, or from scratch), relative to the teacher's; "
              f"before: validation loss right after compression; vs narrower dense: loss minus "
              f"the dense-width frontier's (trained from scratch as long as teacher + fine-tune) "
              f"at the same shipped parameters, per seed. Factored layers at "
              f"{result['budget']:.3f} of their dense parameters."]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    fig = Figure(figsize=(11, 4))
    for ax, key, label in zip(fig.subplots(1, 2), ("params", "flops"),
                              ("shipped parameters", "training FLOPs")):
        widths = sorted({r["width"] for r in result["frontier"]})
        means = [(statistics.mean(r[key] for r in result["frontier"] if r["width"] == w),
                  statistics.mean(r["val"] for r in result["frontier"] if r["width"] == w))
                 for w in widths]
        ax.plot(*zip(*means), "s-", color="#555555", label="dense from scratch (frontier)")
        teacher = [(r[key], r["val"]) for r in result["teachers"]]
        ax.plot([statistics.mean(p for p, _ in teacher)], [statistics.mean(v for _, v in teacher)],
                "D", color="black", label="dense 128 (teacher)")
        for method in dict.fromkeys(r["method"] for r in result["slim"]):
            rs = [r for r in result["slim"] if r["method"] == method]
            marker = {"prune-width": "P"}.get(method, "*" if method in METHODS else "^")
            ax.plot([statistics.mean(r[key] for r in rs)], [statistics.mean(r["val"] for r in rs)],
                    marker, ms=11, label=f"{method} + fine-tune" if method in METHODS else method)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log)")
        ax.set_ylabel("validation loss (mean over seeds)")
    fig.axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, help="factored layers' share of their dense "
                                                     "parameters (default 0.4)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 (quick: 0)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 60 steps, one seed")
    parser.add_argument("--json", help="keep every run in this file (read back to resume)")
    parser.add_argument("--plot", help="write the figure to this PNG")
    args = parser.parse_args(argv)
    slim = QUICK if args.quick else Slim()
    if args.budget is not None:
        slim = replace(slim, budget=args.budget)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    data = split(stdlib_corpus(slim.protocol.corpus_bytes))
    bench = Bench(slim, data, args.json)
    result = run(slim, seeds, bench, tuple(args.methods))
    bench.save({"result": result})
    print(report(result))
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return result


if __name__ == "__main__":
    main()
