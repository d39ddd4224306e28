
import pytest
import torch

# The examples (the nanoGPT-style model) are scripts, not part of the installed package.

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
