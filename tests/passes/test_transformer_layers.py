"""nn.TransformerEncoder / nn.TransformerDecoder / nn.Transformer, factored with their semantics:
masks, norm_first, batch_first, activations, dropout; parity at full rank in train and eval mode."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import Seq2Seq, Tagger
from torch import nn

from inrank_fx import InRankConfig, InRankLinear, attach, ranks, set_ranks, transform
from inrank_fx.export import to_onnx
from inrank_fx.nn import InRankMultiheadAttention

FULL = InRankConfig(init="svd", init_rank=1.0, min_features=1)


def full_rank(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left dense, silently or not
        return transform(model, FULL)


def padding(batch: int, length: int) -> torch.Tensor:
    """A key padding mask (True = padding) with a different length per sequence."""
    lengths = torch.arange(batch) % (length - 2) + 3
    return torch.arange(length)[None, :] >= lengths[:, None]


@pytest.fixture
def compare(rel_err):
    def check(original, factored, run, valid=None, tol=1e-5):
        """Outputs of `run(model)` in train mode, eval mode with grad and eval mode without grad
        (where PyTorch takes its inference fast path; there only `valid` positions are
        compared)."""
        for mode in ("train", "eval", "eval-no-grad"):
            original.train(mode == "train")
            factored.train(mode == "train")
            with torch.set_grad_enabled(mode != "eval-no-grad"):
                expected, got = run(original), run(factored)
            if mode == "eval-no-grad" and valid is not None:
                expected, got = expected[valid], got[valid]
            assert rel_err(got.detach(), expected.detach()) < tol, mode
    return check


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", F.silu, nn.GELU()])
def test_encoder_parity(compare, batch_first, norm_first, activation):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32))
    factored = full_rank(encoder)
    assert len(ranks(factored)) == 8  # in_proj, out_proj, linear1, linear2 per layer
    assert isinstance(factored.layers[0], nn.TransformerEncoderLayer)  # isinstance still holds
    assert isinstance(factored.layers[0].self_attn, InRankMultiheadAttention)
    N, L = 3, 7
    x = torch.randn(N, L, 32) if batch_first else torch.randn(L, N, 32)
    pad = padding(N, L)
    valid = ~pad if batch_first else ~pad.T
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    compare(encoder, factored, lambda m: m(x, src_key_padding_mask=pad), valid)
    compare(encoder, factored, lambda m: m(x, mask=causal, is_causal=True))
    compare(encoder, factored, lambda m: m(x, mask=causal.isinf()))  # a bool mask
    compare(encoder, factored, lambda m: m(x, mask=causal, src_key_padding_mask=pad), valid)


def test_decoder_and_transformer_parity(compare):
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
    factored = full_rank(model)
    assert len(ranks(factored)) == 8 + 12  # the decoder's cross-attention too
    src, tgt = torch.randn(3, 9, 32), torch.randn(3, 6, 32)
    src_pad, tgt_pad = padding(3, 9), padding(3, 6)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    compare(model, factored, lambda m: m(src, tgt, tgt_mask=causal, tgt_is_causal=True))
    compare(model, factored, lambda m: m(src, tgt, tgt_mask=causal.isinf(),
                                         src_key_padding_mask=src_pad,
                                         memory_key_padding_mask=src_pad,
                                         tgt_key_padding_mask=tgt_pad))
    decoder = full_rank(model.decoder)
    memory = torch.randn(3, 9, 32)
    compare(model.decoder, decoder, lambda m: m(tgt, memory, tgt_mask=causal))


def test_dropout_is_active_in_training_only():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.5, batch_first=True)
    factored = full_rank(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    x = torch.randn(2, 5, 32)
    assert not torch.equal(factored(x), factored(x))
    factored.eval()
    assert torch.equal(factored(x), factored(x))


def test_is_causal_needs_its_mask_as_in_multihead_attention(rel_err):
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    layer = InRankMultiheadAttention.from_mha(mha, 16)
    x = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        layer(x, x, x, is_causal=True)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    expected = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    got = layer(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    assert rel_err(got, expected) < 1e-5


def test_nothing_factored_leaves_the_classes_alone():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = transform(encoder, InRankConfig(exclude=".*"))
    assert type(out) is nn.TransformerEncoder and out.use_nested_tensor == encoder.use_nested_tensor
    assert type(out.layers[0]) is nn.TransformerEncoderLayer


def test_state_dict_keys_are_the_dense_models_except_the_factored_weights():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1)
    out = transform(encoder, InRankConfig(init_rank=4))
    before, after = set(encoder.state_dict()), set(out.state_dict())
    assert before - after == {
        "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias",
        "layers.0.self_attn.out_proj.weight", "layers.0.linear1.weight", "layers.0.linear2.weight"}
    factor_keys = {k.rpartition(".")[2] for k in after - before}
    assert factor_keys <= {"U", "V", "U0", "V0", "bias", "_extra_state"}


def test_halved_ranks_train():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 1, 1, 64, dropout=0.1, batch_first=True)
    out = transform(model, InRankConfig(init_rank=8, buffer=0))
    set_ranks(out, {n: r // 2 for n, r in ranks(out).items()})
    opt = torch.optim.AdamW(out.parameters(), lr=1e-3)
    ctrl = attach(out, opt, CHECK_EVERY_STEP)
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for _ in range(2):  # a rank check after the first step resizes every layer; train on
        loss = out(src, tgt, tgt_mask=causal).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert_checked_and_resized(out, ctrl)
    assert torch.isfinite(out(src, tgt, tgt_mask=causal)).all()


# A controller that checks at every step, with a buffer to grow into: one step resizes every layer.
CHECK_EVERY_STEP = InRankConfig(buffer=4, warmup_steps=1, check_every=1, stop_after=None)


def assert_checked_and_resized(model, ctrl):
    checked = {h["layer"] for h in ctrl.history if h["event"] == "check"}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InRankLinear)}
    assert checked == set(layers) and ctrl.rank_events >= 1
    # each layer computes at its measured rank plus the buffer: the halved width (4) grew
    assert all(m.width >= min(m.rank + 4, m.full_rank) > 4 for m in layers.values())


def linear_like_weights(model: nn.Module) -> int:
    """Weights that multiply activations: nn.Linear's (MHA's out_proj included) and MHA's
    packed in-projections."""
    return sum(isinstance(m, (nn.Linear, nn.MultiheadAttention)) for m in model.modules())


@pytest.mark.parametrize("build", [Tagger, Seq2Seq], ids=["TransformerEncoder", "Transformer"])
def test_tutorial_transformers_factor_train_and_export(compare, build, tmp_path):
    model = build()
    inputs = build.example()
    factored = full_rank(model)
    assert len(ranks(factored)) / linear_like_weights(model) >= 0.9
    if build is Tagger:  # padding positions differ only on the nested-tensor inference path
        valid = ~inputs[1]
        compare(model, factored, lambda m: m(*inputs), valid)
    else:
        compare(model, factored, lambda m: m(*inputs))

    trained = transform(model, InRankConfig(init_rank=8, buffer=0))
    set_ranks(trained, {n: r // 2 for n, r in ranks(trained).items()})
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    ctrl = attach(trained, opt, CHECK_EVERY_STEP)
    for _ in range(2):
        trained(*inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert_checked_and_resized(trained, ctrl)

    report = to_onnx(trained.eval(), inputs, tmp_path / "model.onnx")
    assert report.max_rel_error <= 1e-4 and len(report.ranks) == len(ranks(trained))
