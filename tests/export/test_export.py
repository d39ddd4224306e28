import json
import warnings

import pytest
import torch
from torch import nn

from inrank_fx import FactoredLayer, InRankConfig, freeze, ranks, set_ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.export import (
    RANKS_METADATA_KEY,
    ExportError,
    ExportParityError,
    FactoredLinear,
    MissingDependencyError,
    tensorrt_missing,
    to_onnx,
    to_tensorrt,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def matmul_weight_shapes(path) -> list[tuple[int, ...]]:
    """Shapes of the constant operands of every MatMul / Gemm in an ONNX file."""
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [inits[x] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
            for x in n.input if x in inits]


def assert_two_matmuls_per_layer(path, frozen_model) -> None:
    shapes = matmul_weight_shapes(path)
    layers = [m for m in frozen_model.modules() if isinstance(m, FactoredLinear)]
    assert layers
    for layer in layers:
        r, n_in, n_out = layer.rank, layer.in_features, layer.out_features
        assert (n_in, r) in shapes or (r, n_in) in shapes, (layer, shapes)
        assert (r, n_out) in shapes or (n_out, r) in shapes, (layer, shapes)
    inner = [s for s in shapes if any(l.rank in s for l in layers)]
    assert len(inner) >= 2 * len(layers)


def small_gpt(n_embd=64, n_layer=2):
    return GPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=32)).eval()


def test_freeze_merge_rule(rel_err):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    out = transform(model, InRankConfig(init="svd", init_rank=8, buffer=0))
    set_ranks(out, {"2": 40})  # 40·(64+64) ≥ 64·64: above break-even
    frozen = freeze(out)
    assert isinstance(frozen[0], FactoredLinear) and frozen[0].rank == 8
    assert type(frozen[2]) is nn.Linear
    assert not any(isinstance(m, FactoredLayer) for m in frozen.modules())
    x = torch.randn(5, 64)
    assert rel_err(frozen(x), out(x)) < 1e-5
    assert all(isinstance(m, FactoredLinear) for m in (freeze(out, merge=False)[0], freeze(out, merge=False)[2]))
    assert all(type(m) is nn.Linear for m in (freeze(out, merge=True)[0], freeze(out, merge=True)[2]))
    with pytest.raises(ValueError, match="merge must be"):
        freeze(out, merge="never")


def test_freeze_convolutions(rel_err):
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 1))
    out = transform(model, InRankConfig(init="svd", init_rank=6, buffer=2, convs="all"))
    frozen = freeze(out)
    assert [type(m).__name__ for m in frozen] == ["FactoredConv2d", "ReLU", "FactoredConv2d"]
    assert frozen[0][0].weight.shape == (6, 16, 3, 3) and frozen[0][1].weight.shape == (32, 6, 1, 1)
    set_ranks(out, 6)
    x = torch.randn(2, 16, 8, 8)
    assert rel_err(frozen(x), out(x)) < 1e-5
    merged = freeze(out, merge=True)
    assert type(merged[0]) is nn.Conv2d and rel_err(merged(x), out(x)) < 1e-5


def test_freeze_truncates_the_buffer(rel_err):
    out = transform(nn.Sequential(nn.Linear(64, 64)), InRankConfig(init="svd", init_rank=6, buffer=10))
    frozen = freeze(out)
    assert frozen[0].rank == 6 and frozen[0].down.weight.shape == (6, 64)
    set_ranks(out, 6)  # the same SVD truncation, applied to the training model
    x = torch.randn(5, 64)
    assert rel_err(frozen(x), out(x)) < 1e-5


def test_frozen_model_exports_and_compiles(rel_err):
    out = transform(small_gpt(), InRankConfig(init="svd", init_rank=0.25, buffer=0))
    frozen = freeze(out)
    idx = torch.randint(0, 256, (2, 32))
    program = torch.export.export(frozen, (idx,))
    assert rel_err(program.module()(idx), frozen(idx)) < 1e-6
    compiled = torch.compile(frozen, backend="aot_eager")
    assert rel_err(compiled(idx), out(idx)) < 1e-5


def test_gpt_to_onnx(tmp_path):
    out = transform(small_gpt(), InRankConfig(init="svd", init_rank=0.25, buffer=0))
    idx = torch.randint(0, 256, (1, 32))
    report = to_onnx(out, (idx,), tmp_path / "gpt.onnx")
    assert report.batch_sizes == [1, 3] and "CPUExecutionProvider" in report.providers
    assert report.max_rel_error <= 1e-4
    assert report.ranks == ranks(out) and len(report.ranks) == 8
    assert report.file_bytes == (tmp_path / "gpt.onnx").stat().st_size
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "gpt.onnx")).metadata_props}
    assert json.loads(stored[RANKS_METADATA_KEY]) == report.ranks
    assert_two_matmuls_per_layer(tmp_path / "gpt.onnx", freeze(out))
    assert [p.name for p in tmp_path.iterdir()] == ["gpt.onnx"]  # no temp files left


def test_onnx_file_shrinks_with_the_parameters(tmp_path):
    dense = small_gpt(n_embd=128, n_layer=4)
    factored = transform(dense, InRankConfig(init="svd", init_rank=16, buffer=0))
    idx = torch.randint(0, 256, (2, 32))
    d = to_onnx(dense, (idx,), tmp_path / "dense.onnx")
    f = to_onnx(factored, (idx,), tmp_path / "factored.onnx")
    param_ratio = f.parameters / d.parameters
    file_ratio = f.file_bytes / d.file_bytes
    assert param_ratio < 0.5
    assert file_ratio == pytest.approx(param_ratio, rel=0.1)


def test_resnet18_to_onnx(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    out = transform(model, InRankConfig(init="svd", init_rank=0.125, buffer=0))
    report = to_onnx(out, (torch.randn(1, 3, 64, 64),), tmp_path / "resnet18.onnx")
    assert report.ranks == {"fc": 64, "layer2.0.downsample.0": 8, "layer3.0.downsample.0": 16,
                            "layer4.0.downsample.0": 32}
    assert report.batch_sizes == [1, 3] and report.max_rel_error <= 1e-4
    assert_two_matmuls_per_layer(tmp_path / "resnet18.onnx", freeze(out))
    convs = [n for n in onnx.load(str(tmp_path / "resnet18.onnx")).graph.node if n.op_type == "Conv"]
    assert len(convs) == 20 + 3  # each factored 1x1 convolution became two


@pytest.mark.slow
def test_vit_b_16_to_onnx(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16().eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    out = transform(model, InRankConfig(init="svd", init_rank=0.25, buffer=0))
    report = to_onnx(out, (torch.randn(1, 3, 224, 224),), tmp_path / "vit.onnx")
    assert len(report.ranks) == 49 and report.batch_sizes == [1, 3]
    assert report.max_rel_error <= 1e-4
    assert_two_matmuls_per_layer(tmp_path / "vit.onnx", freeze(out))


def test_bad_destinations_leave_nothing(tmp_path, monkeypatch):
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4))
    x = torch.randn(2, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, (x,), tmp_path / "missing" / "m.onnx")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileNotFoundError, match="afile does not exist"):
        to_onnx(model, (x,), tmp_path / "afile" / "m.onnx")
    with pytest.raises(TypeError, match="example_inputs"):
        to_onnx(model, ("not a tensor",), tmp_path / "m.onnx")
    # a file whose outputs differ (ONNX Runtime may match torch bit for bit, so say they differ)
    import onnxruntime

    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: [out + 1.0 for out in run(self, *a, **k)])
    with pytest.raises(ExportParityError, match="max relative error .* exceeds rtol=0.0001"):
        to_onnx(model, (x,), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_untraceable_model_names_the_module(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    model = nn.Sequential(nn.Linear(32, 32), Branchy())
    with pytest.raises(ExportError, match=r"module '1' \(Branchy\) at test_export.py:\d+"):
        to_onnx(model, (torch.randn(2, 32),), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_to_tensorrt_without_cuda_says_what_is_missing(tmp_path):
    if not tensorrt_missing():
        pytest.skip("CUDA and torch-tensorrt are present")
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(MissingDependencyError, match="to_tensorrt needs .*(CUDA|torch-tensorrt)"):
        to_tensorrt(model, (torch.randn(2, 32),), tmp_path / "m.ep")
    assert not list(tmp_path.iterdir())


def test_a_missing_exporter_dependency_is_one_error_that_says_how_to_install_it(tmp_path, monkeypatch):
    """onnx missing and TensorRT missing raise the same error (an ImportError and, as before,
    a RuntimeError for TensorRT), naming the package and the pip extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(MissingDependencyError,
                       match=r"to_onnx needs onnxscript \(pip install 'inrank-fx\[onnx\]'\)") as caught:
        to_onnx(nn.Sequential(nn.Linear(32, 32)), (torch.randn(2, 32),), tmp_path / "m.onnx")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, RuntimeError)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(bool(tensorrt_missing()), reason="needs a CUDA GPU and torch-tensorrt")
def test_to_tensorrt_on_gpu(tmp_path):
    out = transform(small_gpt(), InRankConfig(init="svd", init_rank=0.25, buffer=0))
    report = to_tensorrt(out, (torch.randint(0, 256, (2, 32)),), tmp_path / "gpt.ep")
    assert report.file_bytes > 0 and report.max_rel_error <= 2e-2
    assert (tmp_path / "gpt.ep").exists()


def test_exporting_leaves_the_callers_model_as_it_was(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1)).train()
    to_onnx(model, (torch.randn(2, 32),), tmp_path / "m.onnx")
    assert model.training and type(model[0]) is nn.Linear


def test_frozen_linear_keeps_the_attributes_code_reads(rel_err):
    torch.manual_seed(0)
    model = transform(nn.Sequential(nn.Linear(32, 48)), InRankConfig(init_rank=8, buffer=0))
    frozen = freeze(model)
    layer = frozen[0]
    assert isinstance(layer, FactoredLinear) and layer.rank == 8  # below full rank: not merged
    assert layer.weight.shape == (48, 32) and layer.weight.dtype == torch.float32
    assert rel_err(layer.weight, model[0].weight) < 1e-6
    assert layer.bias is layer.up.bias
    assert (layer.in_features, layer.out_features) == (32, 48)


class Seq2SeqLogits(nn.Module):
    """T5 called with positional tensors, as exporters take them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, decoder_ids):
        return self.model(input_ids=ids, decoder_input_ids=decoder_ids).logits


def test_t5_below_full_rank_freezes_runs_and_exports(tmp_path, rel_err):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0)
    dense = transformers.T5ForConditionalGeneration(config).eval()
    model = transform(dense, InRankConfig(init_rank=0.25, buffer=0, min_features=8))
    assert len(ranks(model)) == 16
    frozen = freeze(model)  # T5's feed-forward reads self.wo.weight.dtype in its forward
    assert isinstance(frozen.encoder.block[0].layer[1].DenseReluDense.wo, FactoredLinear)
    ids, decoder_ids = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        assert rel_err(frozen(input_ids=ids, decoder_input_ids=decoder_ids).logits, expected) < 1e-5
    # torch.onnx's dynamo exporter fails on T5's scaled_dot_product_attention on some torch
    # releases (dense too: pytorch/pytorch#141107); "auto" then exports with the TorchScript one.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_onnx(Seq2SeqLogits(model), (ids, decoder_ids), tmp_path / "t5.onnx")
    fell_back = [w for w in caught if "TorchScript exporter instead" in str(w.message)]
    assert report.exporter == ("torchscript" if fell_back else "dynamo")
    assert report.max_rel_error <= 1e-4 and report.batch_sizes == [2, 3]
    assert len(report.ranks) == 16
    if fell_back:
        assert "could not translate Seq2SeqLogits" in report.notes[0]
        with pytest.raises(ExportError, match='exporter="torchscript" may export it'):
            to_onnx(Seq2SeqLogits(model), (ids, decoder_ids), tmp_path / "d.onnx",
                    exporter="dynamo")
        assert not (tmp_path / "d.onnx").exists()


def test_torchscript_exporter_writes_ranks_and_checks_parity(tmp_path):
    torch.manual_seed(0)
    model = transform(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)),
                      InRankConfig(init_rank=8, buffer=0, min_features=8))
    report = to_onnx(model, (torch.randn(4, 32),), tmp_path / "m.onnx", exporter="torchscript")
    assert report.exporter == "torchscript" and report.batch_sizes == [4, 3]
    assert report.max_rel_error < 1e-5 and report.opset is not None
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(stored[RANKS_METADATA_KEY]) == report.ranks == {"0": 8, "2": 8}
    assert "torchscript exporter" in str(report)
    with pytest.raises(ValueError, match="exporter='onnx'"):
        to_onnx(model, (torch.randn(4, 32),), tmp_path / "m.onnx", exporter="onnx")


def test_the_exporters_torchvision_notes_are_dropped_and_nothing_else(caplog):
    """torch.onnx logs one warning per torchvision op it skips where torchvision is missing, at
    every export; to_onnx drops those lines (and only those) while it exports."""
    import logging

    from inrank_fx.export import onnx as onnx_export

    logger = logging.getLogger(onnx_export._REGISTRY_LOGGER)
    with caplog.at_level(logging.WARNING, logger=onnx_export._REGISTRY_LOGGER):
        with onnx_export._without_torchvision_notes():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("something else")
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")
    assert [r.getMessage() for r in caplog.records] == [
        "something else", "torchvision is not installed. Skipping torchvision::roi_align"]
