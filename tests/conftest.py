import importlib.util
from pathlib import Path

import pytest
import torch

# The examples (the nanoGPT-style model) are scripts, not part of the installed package.

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registries():
    """A handler a test registers is gone for the next test."""
    from inrank_fx import handlers_restored

    with handlers_restored():
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_example(name: str):
    """Import examples/<name>.py (scripts, not part of the package) as a module."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
