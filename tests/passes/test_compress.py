"""inrank_fx.compress: a trained model to a parameter budget, ranks allocated from measured
spectra, truncation that accounts for each layer's inputs."""
import pytest
import torch
from torch import nn

import inrank_fx
from inrank_fx import InRankConfig, compress, ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig


class TwoHeads(nn.Module):
    """Two layers side by side whose outputs are both returned: the allocation's choices show in
    each output's error."""

    def __init__(self, low: nn.Linear, flat: nn.Linear):
        super().__init__()
        self.low, self.flat = low, flat

    def forward(self, x):
        return self.low(x), self.flat(x)


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _spectrum_weight(singular_values: torch.Tensor, n: int = 64) -> torch.Tensor:
    q1 = torch.linalg.qr(torch.randn(n, n)).Q
    q2 = torch.linalg.qr(torch.randn(n, n)).Q
    return q1 @ torch.diag(singular_values) @ q2.T


def _relative(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _frozen_params(model, names) -> int:
    frozen = inrank_fx.freeze(model)
    return sum(p.numel() for n in names for p in frozen.get_submodule(n).parameters())


def test_the_allocation_follows_the_spectra_and_beats_uniform():
    torch.manual_seed(0)
    low = _spectrum_weight(torch.cat([torch.tensor([8.0, 6.0, 4.0, 3.0]), torch.zeros(60)]))
    flat = _spectrum_weight(torch.linspace(2.0, 1.0, 64))
    model, x = TwoHeads(_linear(low), _linear(flat)), torch.randn(256, 64)
    spent = compress(model, 0.4)
    uniform = compress(model, 0.4, allocation="uniform")
    # a layer of rank 4 gets rank 4, measured; the rest of the budget goes to the flat layer
    assert ranks(spent)["low"] == 4 and ranks(spent)["flat"] > ranks(uniform)["flat"]
    assert ranks(uniform)["low"] == ranks(uniform)["flat"] > 4

    def error(m):
        return sum(_relative(a, b) ** 2 for a, b in zip(m(x), model(x)))

    assert error(spent) < 0.8 * error(uniform)
    assert _relative(spent(x)[0], model(x)[0]) < 1e-5  # nothing of the rank-4 layer was lost
    # both kept within the budget
    for m in (spent, uniform):
        assert m._inrank_report.compression.fraction <= 0.4
    assert spent._inrank_report.compression.fraction > 0.38


def test_calibration_truncates_where_the_inputs_are_and_lowers_the_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48))
    scales = torch.logspace(1, -2, 48)  # anisotropic inputs: a few directions carry them
    rotation = torch.linalg.qr(torch.randn(48, 48)).Q

    def inputs(n):
        return (torch.randn(n, 48) * scales) @ rotation.T

    calibration = [inputs(128) for _ in range(4)]
    held_out = inputs(512)
    plain = compress(model, 0.3)
    aware = compress(model, 0.3, calibration)
    assert ranks(plain) == ranks(aware)  # one layer: the budget fixes its rank
    assert not torch.allclose(plain[0].V, aware[0].V, atol=1e-3)  # another truncation
    reference = model(held_out)
    assert _relative(aware(held_out), reference) < 0.6 * _relative(plain(held_out), reference)
    compression = aware._inrank_report.compression
    assert compression.layers[0].calibrated and not plain._inrank_report.compression.layers[0].calibrated
    # the error it reports is the error it makes on inputs like its calibration
    assert compression.layers[0].error == pytest.approx(
        _relative(aware(held_out), reference) ** 2, rel=0.5)


@pytest.fixture(scope="module")
def trained_gpt():
    """A small GPT trained briefly on the stdlib corpus, with calibration batches."""
    from inrank_fx.demo.corpus import batches, split, stdlib_corpus
    from inrank_fx.demo.training import recipe_optimizer, train_steps

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    train_ids, _ = split(stdlib_corpus(200_000))
    stream = batches(train_ids, 32, 16, torch.Generator().manual_seed(0))
    train_steps(model, recipe_optimizer(model.parameters(), 3e-3), stream, 80)
    calibration = [next(stream)[0] for _ in range(4)]
    return model, calibration, next(stream)


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_the_budget_holds_as_frozen(trained_gpt, budget):
    model, calibration, _ = trained_gpt
    slim = compress(model, budget, calibration)
    names = list(ranks(slim))
    dense = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    frozen = _frozen_params(slim, names)
    assert budget - 0.02 <= frozen / dense <= budget
    assert slim._inrank_report.compression.params == frozen
    assert len(set(ranks(slim).values())) > 1  # measured, not one rank for all


def test_a_compressed_model_fine_tunes_grows_back_and_freezes(trained_gpt):
    model, calibration, (x, y) = trained_gpt
    slim = compress(model, 0.3, calibration, config=InRankConfig(
        buffer=4, warmup_steps=1, check_every=1, stop_after=None, threshold=1 - 1e-9))
    layers = inrank_fx.nn.modules.factored_layers(slim)
    assert all(m.width == min(m.rank + 4, m.full_rank) for m in layers.values())
    # the silent buffer leaves the compressed function as it was
    plain = compress(model, 0.3, calibration)
    assert _relative(slim(x), plain(x)) < 1e-5
    before = dict(ranks(slim))
    opt = torch.optim.AdamW(slim.parameters(), lr=1e-3)
    inrank_fx.attach(slim, opt)
    losses = []
    for _ in range(4):
        loss = slim.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(ranks(slim)[n] > r for n, r in before.items())  # the update asked for rank
    frozen = inrank_fx.freeze(slim)
    assert _relative(frozen(x), slim(x)) < 1e-4


def test_compress_is_better_than_plain_svd_on_a_trained_model(trained_gpt):
    model, calibration, (x, y) = trained_gpt
    with torch.no_grad():
        dense = model.loss(x, y).item()
        uniform = compress(model, 0.3, allocation="uniform").loss(x, y).item()
        aware = compress(model, 0.3, calibration).loss(x, y).item()
    assert dense < aware < uniform
    # the allocation reads the weights' spectra by default, the outputs' when asked
    on_outputs = compress(model, 0.3, calibration, allocate_on="outputs")
    assert ranks(on_outputs) != ranks(compress(model, 0.3, calibration))
    assert "on the outputs' spectra" in str(on_outputs._inrank_report.compression)


def test_stacks_and_convolutions_are_compressed_too():
    from test_transform import TinyMoE

    torch.manual_seed(0)
    moe = TinyMoE()
    x = torch.randn(16, 32)
    slim = compress(moe, 0.5, [x], config=InRankConfig(buffer=0, min_features=1))
    compression = slim._inrank_report.compression
    assert {"experts.w_in", "experts.w_out"} <= {c.name for c in compression.layers}
    assert any("expert stack" in note for note in compression.notes)  # said, not silent
    assert compression.fraction <= 0.5
    assert torch.isfinite(slim(x)).all()

    convs = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    images = [torch.randn(2, 16, 8, 8)]
    slim = compress(convs, 0.5, images, config=InRankConfig(buffer=0, convs="all"))
    compression = slim._inrank_report.compression
    assert [c.calibrated for c in compression.layers] == [True, True]
    assert compression.fraction <= 0.5
    assert _relative(inrank_fx.freeze(slim)(images[0]), slim(images[0])) < 1e-5


@pytest.mark.parametrize("call, message", [
    (dict(budget=0.0), "budget .* must be in \\(0, 1\\], got 0.0"),
    (dict(budget=1.5), "must be in \\(0, 1\\], got 1.5"),
    (dict(budget="0.4"), "budget must be a fraction"),
    (dict(budget=0.001), "budget 0.001 is below what rank 1 in every factored layer holds"),
    (dict(budget=0.4, allocation="even"), "allocation must be one of"),
    (dict(budget=0.4, allocate_on="inputs"), "allocate_on must be one of"),
    (dict(budget=0.4, calibration=[]), "calibration holds no inputs"),
    (dict(budget=0.4, calibration=[[1, 2]]), "calibration input 0 is a list"),
    (dict(budget=0.4, config=InRankConfig(activation="silu")), "activation must be None"),
])
def test_bad_input_is_named(call, message):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises((ValueError, TypeError), match=message) as info:
        compress(model, **call)
    assert isinstance(info.value, inrank_fx.InRankError)


def test_auto_rank_factors_a_trained_layer_and_says_what_to_do_with_a_flat_one():
    torch.manual_seed(0)
    teacher = torch.randn(64, 3) @ torch.randn(3, 64) / 4  # what the layer learns: rank 3
    layer = nn.Linear(64, 64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)  # trained until little of its init is left
    for _ in range(300):
        x = torch.randn(128, 64)
        loss = (layer(x) - x @ teacher.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 64))  # the second: still at init
    with pytest.warns(UserWarning) as warned:
        out = transform(trained, InRankConfig(init_rank="auto", buffer=0))
    assert list(ranks(out)) == ["0"] and ranks(out)["0"] < 32  # the trained layer, factored
    note = str(warned[0].message)
    assert "kept 1 of 2 layers dense" in note and "untrained" not in note
    assert "inrank_fx.compress(model, budget)" in note
    below = float(note.split("a threshold below ")[1].split(" ")[0])
    # and the threshold it names does factor it
    lower = transform(trained, InRankConfig(init_rank="auto", buffer=0, threshold=below * 0.999))
    assert set(ranks(lower)) == {"0", "2"}
