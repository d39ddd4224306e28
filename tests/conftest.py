"""Fixtures for every test: a fixed seed, and the matcher registries restored after each test.
Plain helpers (rel_err, load_example) are in helpers.py and the test models in models.py; both
are importable from every folder (pyproject's pytest `pythonpath`)."""
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
