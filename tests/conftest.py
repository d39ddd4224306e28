import importlib.util
import sys
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


def load_example(name: str, folder: str = "examples"):
    """Import <folder>/<name>.py (examples/ or benchmarks/: scripts, not part of the package)
    as a module."""
    path = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
