"""One base for every error inrank_fx raises on purpose, each keeping its builtin base."""
import pytest
from torch import nn

import inrank_fx
from inrank_fx import InRankConfig, InRankError, set_ranks, transform
from inrank_fx.export import ExportError, ExportParityError, MissingDependencyError
from inrank_fx.passes import NotFactorable


@pytest.mark.parametrize("error, builtin", [
    (inrank_fx.OptimizerStateError, TypeError),
    (inrank_fx.InRankDistributedError, RuntimeError),
    (ExportError, RuntimeError),
    (ExportParityError, AssertionError),
    (MissingDependencyError, ImportError),
    (MissingDependencyError, RuntimeError),
    (NotFactorable, Exception),
])
def test_every_error_is_an_inrank_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, InRankError) and issubclass(error, builtin)


def test_refusals_are_caught_as_inrank_errors():
    with pytest.raises(InRankError, match="threshold must be in"):
        InRankConfig(threshold=2.0)
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    with pytest.raises(InRankError, match="rank of '0' must be an int in \\[1, 32\\], got 40"):
        set_ranks(model, {"0": 40})
    with pytest.raises(InRankError, match="must be an int or a"):
        set_ranks(model, "4")
