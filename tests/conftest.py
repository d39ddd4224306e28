"""Fixtures for every test: a fixed seed, the matcher registries restored after each test, and
the helpers `rel_err` and `load_example` (their code is in helpers.py, which the torchrun worker,
a script and not a test, imports directly). The test models are in models.py, importable from
every folder (pyproject's pytest `pythonpath`)."""
import helpers
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registries():
    """A handler a test registers is gone for the next test."""
    from inrank_fx import handlers_restored

    with handlers_restored():
        yield


@pytest.fixture(scope="session")
def rel_err():
    """‖a − b‖ / ‖b‖."""
    return helpers.rel_err


@pytest.fixture(scope="session")
def load_example():
    """load_example(name, folder="examples"): a script of examples/ or benchmarks/ as a module."""
    return helpers.load_example
