import pytest
import torch

from inrank_fx.nn.spectrum import explained_ratios, factor_singular_values, select_rank


@pytest.mark.parametrize("out_f, in_f, k", [(64, 48, 8), (30, 200, 30), (128, 16, 16), (10, 10, 1)])
def test_factor_singular_values_match_dense(out_f, in_f, k):
    U, V = torch.randn(out_f, k), torch.randn(in_f, k)
    expected = torch.linalg.svdvals(U @ V.T)[:k]
    got = factor_singular_values(U, V)
    assert got.shape == (k,)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected[0].item())


def test_variance_criterion_is_the_papers_formula():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    ratios = explained_ratios(s, "variance")
    for k in range(len(s) + 1):
        tail = s.clone()
        tail[:k] = 0  # s - s_k, where s_k keeps the first k values
        expected = 1 - tail.var() / s.var()
        assert ratios[k].item() == pytest.approx(expected.item(), abs=1e-6)


def test_padded_variance_is_the_reference_formula_on_the_full_spectrum():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    padded = torch.cat([s, torch.zeros(11)])  # the reference's SVD of a 16-wide dense weight
    ratios = explained_ratios(s, "variance_padded", full_rank=16)
    for k in range(len(s)):
        tail = padded.clone()
        tail[:k] = 0
        assert ratios[k].item() == pytest.approx((1 - tail.var() / padded.var()).item(), abs=1e-6)
    # padding changes the answer: the same spectrum explains more once zeros are counted
    assert select_rank(s, 0.99, "variance_padded", full_rank=64) == 3
    assert select_rank(s, 0.99, "variance") == 4
    with pytest.raises(ValueError, match="variance_padded needs full_rank >= 5"):
        explained_ratios(s, "variance_padded")


def test_energy_criterion():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert explained_ratios(s, "energy").tolist() == pytest.approx([0, 9 / 14, 13 / 14, 1])


def test_select_rank_finds_the_low_rank_of_a_matrix():
    torch.manual_seed(0)
    W = torch.randn(100, 12) @ torch.randn(12, 80) + 1e-3 * torch.randn(100, 80)
    s = torch.linalg.svdvals(W)
    assert 9 <= select_rank(s, 0.99, "energy") <= 12
    assert 8 <= select_rank(s, 0.9, "variance") <= 12
    # never below the current rank
    assert select_rank(s, 0.9, "variance", min_rank=20) == 20


def test_select_rank_degenerate_spectra():
    assert select_rank(torch.zeros(5), 0.9, min_rank=2) == 2  # a zero layer asks for nothing
    assert select_rank(torch.ones(6), 0.9) == 6  # equal values: nothing can be dropped
