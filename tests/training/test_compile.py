import logging

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from inrank_fx import InRankConfig, set_ranks, transform


def _model():
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 16))
    return transform(net, InRankConfig(init="random", init_rank=2, buffer=0))


def _run_events(backend: str, events: int, caplog, recompile: str) -> CompileCounterWithBackend:
    """`events` successive rank changes, each followed by a compiled training step."""
    torch.manual_seed(0)
    model = _model()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 32)
    generator = torch.Generator().manual_seed(0)
    schedule = [2, 5, 3, 9, 14, 4, 12, 7, 1, 13]  # growth and truncation, repeated
    patch = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True,  # hitting it raises
                                       force_parameter_static_shapes=True)  # torch's default
    with patch, caplog.at_level(logging.INFO, "inrank_fx"):
        compiled(x)
        for event in range(events):
            rank = schedule[event % len(schedule)]
            width = rank + 1 + event // len(schedule)
            changes = set_ranks(model, rank, opt, widths=width, generator=generator,
                                recompile=recompile)
            assert changes, "every event must change a shape"
            frames = counter.frame_count
            out = compiled(x)
            assert counter.frame_count - frames <= 1  # at most one recompile per event
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # eager, same weights
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return counter


def test_thirty_rank_changes_under_compile(caplog):
    # aot_eager runs dynamo and AOTAutograd (the parts that guard, trace and recompile)
    # without inductor's code generation, which would dominate the time of 30 recompiles.
    counter = _run_events("aot_eager", 30, caplog, "dynamic")
    # widths become symbolic after their first change: far fewer recompiles than events
    assert counter.frame_count <= 6


def test_reset_policy_recompiles_once_per_event(caplog):
    counter = _run_events("aot_eager", 12, caplog, "reset")
    assert counter.frame_count == 1 + 12
    assert sum("caches cleared" in r.getMessage() for r in caplog.records) == 12


@pytest.mark.slow
def test_rank_changes_under_inductor(caplog):
    counter = _run_events("inductor", 6, caplog, "dynamic")
    assert counter.frame_count <= 4


def test_without_a_policy_dynamo_would_give_up(caplog):
    # What the policies prevent: with static parameter shapes every new shape is one more
    # cached graph, until the recompile limit, then eager.
    with pytest.raises(Exception, match="recompile_limit|cache_size_limit"):
        _run_events("aot_eager", 12, caplog, "none")


def _cache_entries(fn) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_attach_and_detach_restore_dynamos_setting():
    import gc

    from inrank_fx import attach

    gc.collect()  # controllers of earlier tests, attached to optimizers that are gone
    before = torch._dynamo.config.force_parameter_static_shapes
    with torch._dynamo.config.patch(force_parameter_static_shapes=True):
        model = _model()
        opt = torch.optim.AdamW(model.parameters())
        first, second = attach(model, opt), attach(model, opt)
        assert torch._dynamo.config.force_parameter_static_shapes is False  # held while attached
        first.detach()
        assert torch._dynamo.config.force_parameter_static_shapes is False  # still held
        second.detach()
        assert torch._dynamo.config.force_parameter_static_shapes is True  # as it was
        attach(model, opt, recompile="none").detach()
        assert torch._dynamo.config.force_parameter_static_shapes is True  # never touched
    assert torch._dynamo.config.force_parameter_static_shapes == before


def unrelated(x):
    return x.sin() * 2


class Net(nn.Module):
    """User code: torch.compile(Net()) compiles Net.forward, which InRank knows is the model's.
    (A bare torch.nn container is compiled through a wrapper that dynamo shares between all of
    them, which InRank therefore never clears.)"""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))

    def forward(self, x):
        return self.body(x)


def test_a_resize_clears_only_the_models_compiled_code(caplog):
    torch._dynamo.reset()
    other = CompileCounterWithBackend("eager")
    unrelated_fn = torch.compile(unrelated, backend=other)
    unrelated_fn(torch.randn(3))
    model = transform(Net(), InRankConfig(init_rank=2, buffer=0))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 32)
    compiled(x)
    forward = Net.forward
    assert _cache_entries(unrelated) == 1 and _cache_entries(forward) == 1
    # A limit low enough that both caches count as near it: the model's is cleared, the
    # unrelated function's is not, and the warning names it.
    with torch._dynamo.config.patch(recompile_limit=4), \
            caplog.at_level(logging.INFO, "inrank_fx"):
        set_ranks(model, 3, widths=5)
    assert _cache_entries(forward) == 0
    assert _cache_entries(unrelated) == 1
    assert any("'unrelated'" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    frames = other.frame_count
    unrelated_fn(torch.randn(3))
    assert other.frame_count == frames  # still compiled, no recompile
    torch.testing.assert_close(compiled(x), model(x))


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from inrank_fx.tools import bench

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the user chose (not the Agg the library used to force)
    try:
        dense = nn.Linear(64, 64)
        result = bench.compare(dense, transform(dense, InRankConfig(init_rank=8)),
                               (torch.randn(4, 64),), backends=("eager",), iters=2, warmup=1)
        result.plot(tmp_path / "bench.png")
        assert (tmp_path / "bench.png").stat().st_size > 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(original)
