import csv

import pytest
import torch
from torch import nn

from inrank_fx import InRankConfig, OptimizerStateError, attach, ranks, set_ranks, transform
from inrank_fx.demo.gpt import GPT, GPTConfig
from inrank_fx.demo.teachers import low_rank_teacher


def teacher_student(model: nn.Module, teacher: torch.Tensor, steps: int, cfg=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctrl = attach(model, opt, cfg) if cfg is not None else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(256, teacher.shape[1], generator=g)
        loss = (model(x) - x @ teacher.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), ctrl


def test_teacher_student_rank_grows_to_the_teachers():
    d, r = 128, 12
    teacher = low_rank_teacher(d, d, r, 1.0, torch.Generator().manual_seed(0))
    cfg = InRankConfig(init_rank=2, buffer=32)  # the default rule; starting width 34
    student = transform(nn.Sequential(nn.Linear(d, d)), cfg)
    assert ranks(student) == {"0": 2}
    loss, ctrl = teacher_student(student, teacher, 500, cfg)
    dense_loss, _ = teacher_student(nn.Sequential(nn.Linear(d, d)), teacher, 500)
    assert 0.7 * r <= ranks(student)["0"] <= 1.4 * r
    assert loss <= 2 * dense_loss or (loss < 1e-4 and dense_loss < 1e-4)
    # evaluation forwards are not optimizer steps
    before, step = ranks(student), ctrl.step
    student.eval()
    with torch.no_grad():
        for _ in range(1000):
            student(torch.randn(4, d))
    assert ranks(student) == before and ctrl.step == step


def test_growth_keeps_adamw_moments_and_seeds_new_second_moments():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    layer = model[0]
    old = {k: v.clone() for k, v in opt.state[layer.U].items()}
    x = torch.randn(5, 32)
    y_before = model(x)
    changes = set_ranks(model, 6, opt, widths=9)
    assert [(c.old_rank, c.rank, c.old_width, c.width) for c in changes] == [(4, 6, 4, 9)]
    state = opt.state[layer.U]
    assert layer.U.shape == (32, 9) and layer.U is opt.param_groups[0]["params"][0]
    assert torch.equal(state["exp_avg"][:, :4], old["exp_avg"])
    assert torch.equal(state["exp_avg_sq"][:, :4], old["exp_avg_sq"])
    assert not state["exp_avg"][:, 4:].any()  # no direction yet for the new components
    # their gradient scale starts at the row's: Adam's first steps on them are not inflated
    row_mean = old["exp_avg_sq"].mean(dim=1, keepdim=True).expand(32, 5)
    assert torch.equal(state["exp_avg_sq"][:, 4:], row_mean) and row_mean.gt(0).all()
    assert state["step"] == old["step"]
    assert torch.allclose(model(x), y_before, atol=1e-6)  # zero-init growth keeps the function
    model(x).pow(2).mean().backward()
    opt.step()  # and the optimizer keeps working on the new tensors


@pytest.mark.parametrize("truncate_state", ["rotated", "reset"])
def test_truncation_keeps_the_best_approximation(truncate_state):
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=10, buffer=0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
    layer = model[0]
    dense = layer.weight.detach().clone()
    s = torch.linalg.svdvals(dense)
    set_ranks(model, {"0": 3}, opt, truncate_state=truncate_state)
    assert layer.width == 3 and layer.rank == 3
    assert torch.linalg.norm(layer.weight.detach() - dense).item() == pytest.approx(s[3:].norm().item(), rel=1e-4)
    momentum = opt.state[layer.U]["momentum_buffer"]
    assert momentum.shape == layer.U.shape
    assert bool(momentum.any()) == (truncate_state == "rotated")


def _gradients(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return model[0].U.grad.clone(), model[0].V.grad.clone()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_truncation_rotates_first_moments_into_the_new_basis(optimizer):
    """A gradient average is linear in the gradient, and the new factors' gradient is a linear
    map of the old ones': after a truncation that keeps the function (a buffer that learned a
    little, dropped by SVD at the width of the layer's numerical rank), the carried first moment
    is exactly the gradient in the new basis. Adam's step count is kept."""
    torch.manual_seed(0)
    model = transform(nn.Sequential(nn.Linear(24, 20)), InRankConfig(init_rank=5, buffer=4))
    layer, x = model[0], torch.randn(16, 24)
    with torch.no_grad():  # a buffer that has started to learn: rank 7 over width 9
        layer.U[:, 5:7] = 0.1 * torch.randn(20, 2)
    if optimizer == "sgd":
        opt, key, scale = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), "momentum_buffer", 1.0
    else:
        opt, key, scale = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0), "exp_avg", 0.1
    _gradients(model, x)
    opt.step()  # lr 0: the weights stay where the gradient was taken
    y = model(x).detach()
    set_ranks(model, 7, opt, truncate_state="rotated")
    assert layer.width == 7 and torch.allclose(model(x), y, atol=1e-5)
    grad_u, grad_v = _gradients(model, x)
    assert torch.allclose(opt.state[layer.U][key], scale * grad_u, atol=1e-6)
    assert torch.allclose(opt.state[layer.V][key], scale * grad_v, atol=1e-6)
    if optimizer == "adamw":
        second = opt.state[layer.U]["exp_avg_sq"]
        assert second.shape == layer.U.shape and second.ge(0).all() and second.gt(0).any()
        assert opt.state[layer.U]["step"] == 1


def test_set_ranks_errors():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    with pytest.raises(KeyError, match="no factored layer named 'nope'.*factored layers are: 0"):
        set_ranks(model, {"nope": 3})
    with pytest.raises(ValueError, match="width of '0' must be an int in \\[8, 32\\]"):
        set_ranks(model, {"0": 8}, widths={"0": 4})
    with pytest.raises(ValueError, match="no factored layers"):
        set_ranks(nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match="grow_state must be one of \\('seeded', 'unseeded'\\), got 'mean'"):
        set_ranks(model, 8, grow_state="mean")
    with pytest.raises(ValueError, match="truncate_state must be one of \\('rotated', 'reset'\\), got 'keep'"):
        set_ranks(model, 2, truncate_state="keep")

    class RowStats(torch.optim.Optimizer):  # keeps a factored (row) statistic, like Adafactor
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["row"] = p.detach().sum(-1)

    opt = RowStats(model.parameters())
    opt.step()
    with pytest.raises(OptimizerStateError, match="RowStats keeps state 'row' of shape \\(32,\\) for '0.U'"):
        set_ranks(model, 8, opt)
    assert model[0].width == 4  # nothing changed


@pytest.mark.parametrize("truncate_state", ["reset", "rotated"])
def test_inrank_efficient_truncates_and_freezes(truncate_state):
    cfg = InRankConfig(init="random", init_rank=2, buffer=6, warmup_steps=2, check_every=2, stop_after=6,
                       truncate_state=truncate_state)
    model = transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctrl = attach(model, opt)  # the config comes from transform
    assert ctrl.config is cfg
    for step in range(12):
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert ctrl.stopped
    for layer in (model[0], model[2]):
        assert layer.width == layer.rank and layer.buffer == 0
    events = [(h["step"], h["event"]) for h in ctrl.history]
    assert max(s for s, _ in events) == 6 and events[-1] == (6, "stop")
    assert {s for s, e in events if e == "check"} == {2, 4}
    # the optimizer state followed the config: restarted at the stop (6 steps before the
    # end), or carried on through it
    assert opt.state[model[0].U]["step"] == (6 if truncate_state == "reset" else 12)


def test_settled_stop_waits_for_the_ranks_to_stop_growing():
    d, r = 64, 12
    teacher = low_rank_teacher(d, d, r, 1.0, torch.Generator().manual_seed(0))
    cfg = InRankConfig(init_rank=2, buffer=3, warmup_steps=10, check_every=10,
                       stop_after="settled", settle_checks=3)
    student = transform(nn.Sequential(nn.Linear(d, d)), cfg)
    loss, ctrl = teacher_student(student, teacher, 400, cfg)
    assert ctrl.stopped and 0.7 * r <= ranks(student)["0"] <= 1.4 * r and loss < 1e-3
    checks = [(h["step"], h["rank"]) for h in ctrl.history if h["event"] == "check"]
    stop = next(h["step"] for h in ctrl.history if h["event"] == "stop")
    assert stop == checks[-1][0]  # it stopped at a check ...
    assert ctrl.stop_step == stop
    # ... only once the last three checks added no rank, after growing through several
    assert len({rank for _, rank in checks[-4:]}) == 1
    assert len({rank for _, rank in checks}) >= 4 and checks[0][1] < r // 2
    layer = student[0]
    assert layer.width == layer.rank


def test_history_csv(tmp_path):
    cfg = InRankConfig(init_rank=2, warmup_steps=0, check_every=1)
    model = transform(nn.Sequential(nn.Linear(32, 32)), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = attach(model, opt)
    for _ in range(3):
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
    path = ctrl.to_csv(tmp_path / "ranks.csv")
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"step", "layer", "event", "rank", "width", "explained"}
    assert not list(tmp_path.glob(".ranks.csv.*"))  # no temp file left behind


def _gpt_run(model, opt, ctrl, steps, start):
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 256, (4, 17), generator=g)
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bit_exact(tmp_path):
    cfg = InRankConfig(init="random", init_rank=2, buffer=2, warmup_steps=5, check_every=5,
                       stop_after=50, threshold=0.99)
    gpt_cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16)

    def fresh():
        torch.manual_seed(0)
        model = transform(GPT(gpt_cfg), cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return model, opt

    model, opt = fresh()
    ctrl = attach(model, opt)
    _gpt_run(model, opt, ctrl, 40, 0)
    assert ctrl.rank_events > 0  # ranks moved before the checkpoint
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()},
               tmp_path / "ckpt.pt")
    expected = _gpt_run(model, opt, ctrl, 20, 40)

    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    model2 = transform(GPT(gpt_cfg), cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    opt2.load_state_dict(ckpt["opt"])
    ctrl2 = attach(model2, opt2)
    ctrl2.load_state_dict(ckpt["ctrl"])
    resumed = _gpt_run(model2, opt2, ctrl2, 20, 40)

    assert resumed == expected
    assert ranks(model2) == ranks(model)
    old = dict(ckpt["ctrl"])
    old["frozen"] = old.pop("stopped")  # a state saved before the rename
    with pytest.raises(KeyError, match="lacks 'stopped' .*'frozen' was renamed 'stopped'"):
        ctrl2.load_state_dict(old)
    for p in model2.parameters():
        for value in opt2.state[p].values():
            if torch.is_tensor(value) and value.dim():
                assert value.shape == p.shape


def test_load_state_dict_takes_the_checkpoint_width():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    set_ranks(model, 7, widths=11)
    fresh = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    fresh.load_state_dict(model.state_dict())
    assert (fresh[0].rank, fresh[0].width) == (7, 11)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


def test_checkpoints_without_a_reference_still_load():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=2))
    set_ranks(model, 5, widths=8)
    with torch.no_grad():
        model[0].U.add_(0.1)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(("U0", "V0"))}
    fresh = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=2))
    fresh.load_state_dict(old)  # strict: a checkpoint saved before U0 / V0 existed
    assert (fresh[0].rank, fresh[0].width) == (5, 8)
    assert not fresh[0].update_singular_values().any()  # updates measured from the loaded weights
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_steps_are_optimizer_steps_and_widths_follow_rank_multiple():
    cfg = InRankConfig(init_rank=2, buffer=3, warmup_steps=0, check_every=2, rank_multiple=8,
                       criterion="energy", threshold=0.99)
    model = transform(nn.Sequential(nn.Linear(64, 64)), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = attach(model, opt)
    target = torch.randn(64, 64)
    for _ in range(6):
        for _ in range(4):  # gradient accumulation: 4 micro-batches per optimizer step
            x = torch.randn(32, 64)
            (model(x) - x @ target.T).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert ctrl.step == 6
    assert [h["step"] for h in ctrl.history] == [2, 4, 6]
    assert model[0].rank > 2 and model[0].width % 8 == 0


def test_controller_set_ranks_moves_the_optimizer_and_records_history():
    model = transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)),
                      InRankConfig(init_rank=2, buffer=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctrl = attach(model, opt)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    changes = ctrl.set_ranks({"0": 6}, widths={"0": 8})
    assert [str(c) for c in changes] == ["0 rank 2->6 (width 4->8)"]
    assert ranks(model) == {"0": 6, "2": 2}
    layer = model.get_submodule("0")
    assert any(p is layer.U for g in opt.param_groups for p in g["params"])
    assert opt.state[layer.U]["exp_avg"].shape == layer.U.shape
    assert [(r["layer"], r["event"], r["rank"], r["width"]) for r in ctrl.history] == [
        ("0", "manual", 6, 8)]
    model(torch.randn(4, 32)).sum().backward()
    opt.step()  # trains on at the new width
    with pytest.raises(ValueError, match="rank of '0'"):
        ctrl.set_ranks({"0": 40})


def test_checkpoints_in_safetensors_keep_ranks_and_widths(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                      InRankConfig(init_rank=4, buffer=0))
    set_ranks(model, {"0": 7, "2": 3}, widths={"0": 11, "2": 3})
    safetensors.save_file(model.state_dict(), tmp_path / "model.safetensors")  # tensors only
    fresh = transform(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                      InRankConfig(init_rank=4, buffer=0))
    fresh.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"))
    assert ranks(fresh) == {"0": 7, "2": 3} and fresh.get_submodule("0").width == 11
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), model(x))


def test_warmup_cosine_follows_the_recipe_through_a_resize():
    from inrank_fx.demo.training import warmup_cosine

    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, steps=110, warmup=10, floor=0.1)
    lrs = []
    for step in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        if step == 50:
            set_ranks(model, {"0": 8}, opt)  # the group's parameters are swapped
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4 + 0.99e-2 * 0.5)
    assert lrs[10] == pytest.approx(1e-2)  # the peak, then a cosine down to 10%
    assert lrs[60] == pytest.approx(1e-3 + 0.9e-2 * 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_train_steps_clips_the_gradient_norm():
    from inrank_fx.demo.training import train_steps

    def run(clip):
        torch.manual_seed(0)
        model = nn.Linear(8, 8)
        start = model.weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stream = iter(lambda: (torch.randn(4, 8), torch.randn(4, 8)), None)
        train_steps(model, opt, stream, 1, loss_of=lambda x, y: 1e3 * (model(x) - y).pow(2).sum(),
                    clip_norm=clip)
        return (model.weight.detach() - start).norm().item()

    assert run(0.5) <= 0.5 + 1e-6 < run(None)


def test_growth_init_has_the_configs_name_and_the_old_one_still_works():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    outputs = {}
    for kwargs in ({"grow_init": "zero"}, {"grow_init": "random"}):
        model = transform(nn.Sequential(nn.Linear(16, 16)), InRankConfig(init_rank=3, buffer=0))
        y = model(x)
        set_ranks(model, 5, **kwargs)
        outputs[kwargs["grow_init"]] = torch.allclose(model(x), y, atol=1e-6)
    assert outputs == {"zero": True, "random": False}  # silent components keep the function
