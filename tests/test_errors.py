"""One base for every error inrank_fx raises on purpose, each keeping its builtin base."""
import pytest
import torch
from torch import nn

import inrank_fx
from inrank_fx import InRankConfig, InRankError, set_ranks, transform
from inrank_fx.export import ExportError, ExportParityError
from inrank_fx.passes import NotFactorable


@pytest.mark.parametrize("error, builtin", [
    (inrank_fx.OptimizerStateError, TypeError),
    (inrank_fx.InRankDistributedError, RuntimeError),
    (ExportError, RuntimeError),
    (ExportParityError, AssertionError),
    (NotFactorable, Exception),
])
def test_every_error_is_an_inrank_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, InRankError) and issubclass(error, builtin)


def test_a_refusal_is_caught_as_an_inrank_error():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))

    class RowStats(torch.optim.Optimizer):  # keeps a row statistic, like Adafactor
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["row"] = p.detach().sum(-1)

    opt = RowStats(model.parameters())
    opt.step()
    with pytest.raises(InRankError, match="RowStats keeps state 'row'"):
        set_ranks(model, 8, opt)
