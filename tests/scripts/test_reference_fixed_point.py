"""examples/reference_fixed_point.py: the reference's rank rule applied to untrained factors."""
import pytest


@pytest.fixture(scope="module")
def script(load_example):
    return load_example("reference_fixed_point")


def test_ranks_rise_with_no_training_and_settle(script):
    ranks = script.fixed_point(96, 384, seed=0, buffer=12, max_checks=50)
    assert ranks[0] == 2
    assert all(b > a for a, b in zip(ranks, ranks[1:]))  # every check grew, on random init alone
    assert ranks[-1] > 2 + 2 * 12  # past two buffers: the init, not learning, sets the rank
    # a genuine fixed point of the rule: reached before the check budget and below the cap
    # (max_rank − buffer = 48 − 12) where the reference stops adapting
    assert len(ranks) < 51 and ranks[-1] < 48 - 12


def test_ranks_are_reproducible_from_a_seed(script):
    first = script.fixed_point(96, 384, seed=3, buffer=12)
    assert script.fixed_point(96, 384, seed=3, buffer=12) == first
    b0, a0 = script.reference_factors(96, 384, seed=3)
    b1, a1 = script.reference_factors(96, 384, seed=4)
    assert not (b0 == b1).all() and not (a0 == a1).all()  # the seed is what draws the factors
