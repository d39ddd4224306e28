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
