"""examples/theory_linear.py: the cumulative update's rank grows incrementally."""
import pytest

from inrank_fx import InRankConfig
from inrank_fx.demo.gpt import GPTConfig


@pytest.fixture(scope="module")
def script(load_example):
    return load_example("theory_linear")


@pytest.fixture(scope="module")
def linear(script):
    return script.linear_staircase()


def test_modes_saturate_in_order(script, linear):
    for layer in range(3):
        steps = script.saturation_steps(linear, layer)
        assert all(a < b for a, b in zip(steps, steps[1:])), (layer, steps)
    assert linear["loss"][-1] < 1e-6 * linear["loss"][0]  # and the teacher is learned


def test_effective_rank_of_the_update_never_drops(script, linear):
    for layer in range(3):
        ranks = script.effective_ranks(linear, layer)
        assert ranks[0] == 0 and ranks[-1] == len(linear["modes"])
        assert all(a <= b for a, b in zip(ranks, ranks[1:])), (layer, ranks)
        assert len(set(ranks)) == len(linear["modes"]) + 1  # one step up per mode: a staircase


def test_gpt_update_ranks_are_recorded_per_layer(script, monkeypatch):
    spectra = []
    rule = script.select_rank

    def reading(s, *args, **kwargs):  # what the rule is given, and what it answers
        spectra.append(s.clone())
        return rule(s, *args, **kwargs)

    monkeypatch.setattr(script, "select_rank", reading)
    gpt = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
    record = script.gpt_update_ranks(6, gpt, record_every=3, progress=False)
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert record["steps"] == [3, 6] and list(record["ranks"]) == layers
    assert len(spectra) == 2 * len(layers)
    for i, name in enumerate(layers):
        at_3, at_6 = spectra[i], spectra[len(layers) + i]
        alpha = InRankConfig().threshold  # the rule as the library's defaults read it
        assert record["ranks"][name] == [rule(at_3, alpha, "variance", full_rank=at_3.numel()),
                                         rule(at_6, alpha, "variance", full_rank=at_6.numel())]
        # the spectrum read is the cumulative update's, which grows with the steps taken
        # (Adam's steps are about lr per entry); a weight's own norm would barely move
        assert at_6.norm() > 1.4 * at_3.norm()
