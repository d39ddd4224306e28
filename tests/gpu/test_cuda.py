"""The CUDA checks of benchmarks/gpu_check.py, as tests: they run where CUDA is (on a lent GPU:
`python -m pytest -m gpu`) and skip cleanly where it is not (CI)."""
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_check(load_example):
    return load_example("gpu_check", "benchmarks")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_factored_layer_parity(gpu_check, dtype):
    result = gpu_check.check_layer_parity("cuda", dtype)
    assert result["passed"], result


def test_rank_changes_under_inductor(gpu_check):
    result = gpu_check.check_rank_changes_under_compile("cuda", "inductor")
    assert result["passed"], result


def test_freeze_parity(gpu_check):
    result = gpu_check.check_freeze_parity("cuda")
    assert result["passed"], result


def test_optimizer_state_across_a_resize(gpu_check):
    result = gpu_check.check_optimizer_state_across_resize("cuda")
    assert result["passed"], result
