"""examples/theory_linear.py: the cumulative update's rank grows incrementally."""
import pytest
from conftest import load_example

from inrank_fx.demo.gpt import GPTConfig


@pytest.fixture(scope="module")
def script():
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


def test_gpt_update_ranks_are_recorded_per_layer(script):
    gpt = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
    record = script.gpt_update_ranks(6, gpt, record_every=3, progress=False)
    assert record["steps"] == [3, 6]
    assert set(record["ranks"]) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                    "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert all(1 <= r <= 32 for ranks in record["ranks"].values() for r in ranks)
