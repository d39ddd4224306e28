"""One base for every error inrank_fx raises on purpose, each keeping its builtin base."""
import re
from pathlib import Path

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
    (inrank_fx.InRankKeyError, KeyError),
    (inrank_fx.InRankRuntimeError, RuntimeError),
    (inrank_fx.InRankTypeError, TypeError),
    (inrank_fx.InRankValueError, ValueError),
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


def test_no_builtin_error_is_raised_directly():
    """Every deliberate raise is an InRankError subclass (which keeps the builtin base)."""
    package = Path(inrank_fx.__file__).parent
    raw = re.compile(r"raise (ValueError|TypeError|KeyError|RuntimeError)\(")
    found = [f"{path.relative_to(package)}:{number}"
             for path in sorted(package.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if raw.search(line)]
    assert not found, f"builtin errors raised directly: {found}"


def test_unknown_names_are_key_errors_that_read_as_written():
    model = transform(nn.Sequential(nn.Linear(32, 32)), InRankConfig(init_rank=4, buffer=0))
    with pytest.raises(KeyError) as caught:
        set_ranks(model, {"nope": 4})
    assert isinstance(caught.value, InRankError)
    assert str(caught.value).startswith("ranks: no factored layer named 'nope'")
    with pytest.raises(inrank_fx.InRankKeyError, match="no module handler is registered"):
        inrank_fx.unregister_module_handler(nn.Bilinear)
