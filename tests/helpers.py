"""Helpers the tests import: plain functions, not fixtures (nothing to set up or tear down)."""
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_example(name: str, folder: str = "examples"):
    """Import <folder>/<name>.py (examples/ or benchmarks/: scripts, not part of the package)
    as a module."""
    path = ROOT / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
