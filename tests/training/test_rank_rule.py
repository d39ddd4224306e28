"""The rank a layer ends at is a measurement of what it learned: teacher problems of known rank.

Every layer here is 64×64 (full rank 64). A rule that ignored the spectrum, or read the random
initialisation, or whose result were set by init_rank / buffer, would fail these: the teachers'
ranks differ by layer and none equals a starting rank or width.
"""
from functools import lru_cache

import pytest
import torch
from torch import nn

from inrank_fx import InRankConfig, attach, ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.teachers import TeacherHeads, TeacherStack, fit

HEAD_RANKS = (3, 10, 24)
STACK_RANKS = (4, 12, 20, 8)


@lru_cache(maxsize=None)
def trained_ranks(problem: str, init_rank: int, buffer: int, measure: str | None = None,
                  steps: int = 500) -> tuple[dict, dict]:
    # Long enough to go on past the stop: once the ranks settle (steps 140-380 here) the layers
    # are truncated, which restarts Adam's moments, and the loss needs a little while to return.
    torch.manual_seed(0)
    teacher = TeacherHeads(64, HEAD_RANKS) if problem == "heads" else TeacherStack(64, STACK_RANKS)
    extra = {} if measure is None else {"measure": measure}
    cfg = InRankConfig(init_rank=init_rank, buffer=buffer, warmup_steps=20, check_every=20, **extra)
    model = transform(teacher, cfg)
    start = ranks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctrl = attach(model, opt)
    losses = fit(model, teacher, steps, optimizer=opt)
    assert losses[-1] < 1e-2 * losses[0]  # it learned the teachers
    assert ctrl.rank_events > 0 and set(start.values()) == {init_rank}
    return ranks(model), teacher.true_ranks()


@pytest.mark.parametrize("problem", ["heads", "stack"])
@pytest.mark.parametrize("init_rank,buffer", [(1, 4), (2, 4), (2, 16)])
def test_final_ranks_follow_the_teachers(problem, init_rank, buffer):
    found, true = trained_ranks(problem, init_rank, buffer)
    for name, rank in true.items():
        assert 0.7 * rank <= found[name] <= 1.4 * rank, (name, found, true)
    # the layers are ordered by rank as their teachers are
    assert sorted(true, key=true.get) == sorted(found, key=lambda n: (found[n], true[n]))


@pytest.mark.parametrize("problem", ["heads", "stack"])
def test_ranks_do_not_depend_on_buffer_or_init_rank(problem):
    base, _ = trained_ranks(problem, 2, 4)
    for other in (trained_ranks(problem, 2, 16)[0], trained_ranks(problem, 1, 4)[0]):
        for name, rank in base.items():
            assert abs(other[name] - rank) <= 0.25 * rank, (base, other)


def test_ranks_never_drop_below_init_rank():
    found, true = trained_ranks("heads", 8, 16)
    assert found["heads.0"] == 8  # its teacher has rank 3: the floor is the starting rank
    assert 0.7 * true["heads.2"] <= found["heads.2"] <= 1.4 * true["heads.2"]


@pytest.mark.parametrize("measure", ["update", "weight"])
@pytest.mark.parametrize("init", ["svd", "random", "iid"])
def test_the_first_check_on_an_untrained_model_grows_nothing(measure, init):
    cfg = InRankConfig(init=init, init_rank=2, buffer=16, measure=measure)
    torch.manual_seed(0)
    model = transform(GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=16)), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctrl = attach(model, opt)
    widths = {n: m.width for n, m in model.named_modules() if hasattr(m, "U0")}
    ctrl.check()
    assert set(ranks(model).values()) == {2}
    assert {n: m.width for n, m in model.named_modules() if hasattr(m, "U0")} == widths
    assert all(h["rank"] == 2 for h in ctrl.history)


def test_a_random_buffer_is_read_as_rank_at_the_first_check():
    # The reference's buffer (random components from the start): with no training at all, the
    # first check already grows every layer by (nearly) its whole buffer.
    cfg = InRankConfig(init="iid", init_rank=2, buffer=16, silent_buffer=False)
    torch.manual_seed(0)
    model = transform(GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=16)), cfg)
    ctrl = attach(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ctrl.check()
    assert min(ranks(model).values()) >= 2 + 16 - 2


def test_the_buffer_starts_silent():
    lin = nn.Linear(48, 40)
    model = transform(nn.Sequential(lin), InRankConfig(init_rank=3, buffer=5))
    layer = model[0]
    assert layer.width == 8 and not layer.U[:, 3:].any() and layer.V[:, 3:].any()
    s = layer.singular_values()
    assert (s[:3] > 0).all() and not s[3:].any()
    # spectral initialisation: the best rank-3 approximation of the module's own weight
    u, sv, vh = torch.linalg.svd(lin.weight.detach().double())
    best = (u[:, :3] * sv[:3]) @ vh[:3]
    assert torch.allclose(layer.weight.detach().double(), best, atol=1e-5)


def test_random_init_keeps_the_modules_scale():
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)  # a GPT-2-style init, far below nn.Linear's default
    top = torch.linalg.svdvals(lin.weight.detach())[:4]
    for init, close in (("random", True), ("svd", True), ("iid", False)):
        layer = transform(nn.Sequential(lin), InRankConfig(init=init, init_rank=4, buffer=0))[0]
        s = layer.singular_values()
        assert torch.allclose(s, top, rtol=1e-4) == close, (init, s, top)


def test_update_spectrum_measures_the_change_since_the_start():
    layer = transform(nn.Sequential(nn.Linear(64, 64)), InRankConfig(init_rank=4, buffer=4))[0]
    assert not layer.update_singular_values().any()
    start = layer.weight.detach().clone()
    with torch.no_grad():  # a rank-2 change through the buffer and the active columns
        layer.U[:, 5] = torch.randn(64)
        layer.U[:, 0] += torch.randn(64)
    expected = torch.linalg.svdvals((layer.weight.detach() - start).double())
    s = layer.update_singular_values()
    assert torch.allclose(s[:4], expected[:4], atol=1e-5)
    assert (s[:2] > 1e-3).all() and s[2:].abs().max() < 1e-5


def _rising_teacher(stop_after):
    """Two heads learn rank-4 teachers; at step 300 head 1's teacher gains 12 components."""
    torch.manual_seed(0)
    teacher = TeacherHeads(64, (4, 4))
    cfg = InRankConfig(init_rank=2, buffer=4, warmup_steps=20, check_every=20,
                       stop_after=stop_after)
    model = transform(teacher, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctrl = attach(model, opt)
    seen = {}

    def on_step(step, loss):
        if step == 300:
            seen["before"] = ranks(model)
            teacher.raise_rank(1, 16)

    losses = fit(model, teacher, 800, optimizer=opt, on_step=on_step)
    return seen["before"], ranks(model), losses, ctrl


def test_a_rank_that_rises_midway_is_followed():
    # Adapting throughout (the default): a layer settled at rank 4 for 300 steps still grows to
    # its teacher's new rank, and the other layer stays where it was.
    before, after, losses, _ = _rising_teacher(stop_after=None)
    assert before == {"heads.0": 4, "heads.1": 4}
    assert after["heads.0"] == 4
    assert 0.85 * 16 <= after["heads.1"] <= 1.25 * 16, after
    assert losses[-1] < 1e-2 * losses[300]  # and it learned the new teacher


def test_a_rank_frozen_early_misses_the_rise():
    # The contrast: stopping adaptation at step 150 freezes head 1 below its new teacher.
    _, after, losses, ctrl = _rising_teacher(stop_after=150)
    assert ctrl.stopped and after["heads.1"] <= 6
    assert losses[-1] > 0.1 * losses[300]
