"""The pass on real model zoos (random weights, no downloads, small inputs): parity at full rank,
a training step that changes ranks, and freeze + ONNX verified in ONNX Runtime wherever
torch.onnx can export the dense model."""
import warnings

import pytest
import torch

from inrank_fx import (
    FactoredLayer,
    InRankConfig,
    InRankLinear,
    attach,
    freeze,
    ranks,
    set_ranks,
    summary,
    transform,
)
from inrank_fx.export import to_onnx

pytestmark = pytest.mark.slow


def _torchvision(name, size):
    tv = pytest.importorskip("torchvision")
    model = getattr(tv.models, name)()
    if name == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    return model, (torch.randn(1, 3, size, size),)


def _timm(name, size):
    timm = pytest.importorskip("timm")
    return timm.create_model(name), (torch.randn(1, 3, size, size),)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(config), (torch.randint(0, 512, (1, 16)),)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=512, max_position_embeddings=64)
    return transformers.BertModel(config), (torch.randint(0, 512, (1, 16)),)


# name: (factory, factored layers expected at full rank, weight-matmul FLOP share goal or None)
ZOO = {
    "resnet18": (lambda: _torchvision("resnet18", 64), 4, None),  # 3x3 convs: opt-in (convs="all")
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small", 64), 42, None),
    "vit_b_16": (lambda: _torchvision("vit_b_16", 224), 49, 0.9),
    # swin hands qkv / proj weights to shifted_window_attention, a torch.fx.wrap'd function:
    # factored through torch.export at the example (CAPTURE)
    "swin_t": (lambda: _torchvision("swin_t", 64), 52, 0.9),
    "vit_tiny_patch16_224": (lambda: _timm("vit_tiny_patch16_224", 224), 49, 0.9),
    "convnext_atto": (lambda: _timm("convnext_atto", 64), 25, None),
    "gpt2": (_gpt2, 8, 0.9),
    "bert": (_bert, 13, 0.9),
}


CAPTURE = {"swin_t"}  # transformed with example_inputs


def _transform(name, model, config, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(model, config, example_inputs=inputs if name in CAPTURE else None)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if hasattr(output, key):
            return getattr(output, key)
    return output[0]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_parity_and_flop_share(rel_err, name):
    build, expected, goal = ZOO[name]
    model, inputs = build()
    model.eval()
    out = _transform(name, model, InRankConfig(init="svd", init_rank=1.0, min_features=1),
                     inputs).eval()
    assert len(ranks(out)) == expected
    with torch.no_grad():
        reference = _first_tensor(model(*inputs))
        assert rel_err(_first_tensor(out(*inputs)), reference) < 1e-5
    if goal is not None:
        share = summary(out, inputs).flops.share
        assert share >= goal, f"{name}: {share:.1%} of weight-matmul FLOPs factored"


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_training_step_changes_ranks(name):
    build, _, _ = ZOO[name]
    model, inputs = build()
    # One Adam step moves every component by about the learning rate, so the spectrum of that
    # update is nearly flat: at α 0.999 it asks for the whole width (growth at the first check).
    config = InRankConfig(init="svd", init_rank=2, buffer=4, warmup_steps=0, check_every=1,
                          measure="update", threshold=0.999)
    out = _transform(name, model, config, inputs)
    before = ranks(out)
    opt = torch.optim.AdamW(out.parameters(), lr=1e-4)
    ctrl = attach(out, opt)
    _first_tensor(out(*inputs)).float().pow(2).mean().backward()
    opt.step()
    assert ctrl.step == 1 and ctrl.rank_events == 1
    after = ranks(out)
    assert all(after[n] >= before[n] for n in before) and after != before
    _first_tensor(out(*inputs))  # and it still runs


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_freezes_below_full_rank_and_runs(rel_err, name):
    # frozen layers below full rank stay factored (FactoredLinear / FactoredConv2d): the model
    # must still run, as code written for nn.Linear reads them (T5 reads .weight.dtype)
    build, _, _ = ZOO[name]
    model, inputs = build()
    out = _transform(name, model.eval(), InRankConfig(init="svd", init_rank=0.25, buffer=0),
                     inputs).eval()
    frozen = freeze(out)
    assert not any(isinstance(m, FactoredLayer) for m in frozen.modules())
    with torch.no_grad():
        assert rel_err(_first_tensor(frozen(*inputs)), _first_tensor(out(*inputs))) < 1e-4


@pytest.mark.parametrize("name", [n for n in ZOO if n != "vit_b_16"])  # vit_b_16: tests/export/test_export.py
def test_zoo_freeze_and_onnx(name, tmp_path):
    build, _, _ = ZOO[name]
    model, inputs = build()
    model.eval()
    out = _transform(name, model, InRankConfig(init="svd", init_rank=0.25, buffer=0), inputs)
    try:
        report = to_onnx(out, inputs, tmp_path / f"{name}.onnx")
    except Exception as factored_error:
        try:
            to_onnx(model, inputs, tmp_path / "dense.onnx", verify=False)
        except Exception as dense_error:
            pytest.skip(f"torch.onnx cannot export the dense {name} either: {dense_error}")
        raise factored_error
    assert report.max_rel_error <= 1e-4 and report.batch_sizes == [1, 3]
    assert report.ranks


@pytest.mark.parametrize("name", sorted(CAPTURE))
def test_captured_zoo_trains_after_halving_ranks(name):
    build, _, _ = ZOO[name]
    model, inputs = build()
    out = _transform(name, model, InRankConfig(init="svd", init_rank=0.25, buffer=0), inputs)
    halved = {n: max(1, r // 2) for n, r in ranks(out).items()}
    set_ranks(out, halved)
    opt = torch.optim.AdamW(out.parameters(), lr=1e-4)
    # a check at the first step, with a buffer to grow into: every layer is resized, and the
    # captured forwards keep training through it
    ctrl = attach(out, opt, InRankConfig(buffer=2, warmup_steps=1, check_every=1, stop_after=None))
    batch = tuple(torch.cat([x, x]) for x in inputs)  # another batch size than the capture's
    for _ in range(2):
        loss = _first_tensor(out(*batch)).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and ctrl.rank_events >= 1
    layers = {n: m for n, m in out.named_modules() if isinstance(m, InRankLinear)}
    assert {h["layer"] for h in ctrl.history if h["event"] == "check"} == set(layers)
    assert all(m.width >= min(m.rank + 2, m.full_rank) for m in layers.values())
    assert any(m.width > halved[n] for n, m in layers.items())
