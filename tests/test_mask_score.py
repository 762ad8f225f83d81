"""Hand-computed goldens for patterns, scores and keep-mask selection."""

import pytest
import torch

from lowmem_gblm.config import CalibConfig, PruneConfig
from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern, select_keep
from lowmem_gblm.methods import LinearJob, MethodOptions, get_method
from lowmem_gblm.score import gblm_score, magnitude_score, wanda_score


def test_two_four_keeps_largest_two_of_each_group():
    w = torch.arange(1.0, 9.0).reshape(1, 8)  # weights 1..8
    keep = select_keep(magnitude_score(w), Pattern.parse("2:4", None))
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]  # keep 3,4,7,8


def test_four_eight_and_one_four():
    w = torch.tensor([[8.0, 1, 7, 2, 6, 3, 5, 4]])
    t, f = True, False
    assert select_keep(w, Pattern.parse("4:8", None)).tolist() == [[t, f, t, f, t, f, t, f]]
    assert select_keep(w, Pattern.parse("1:4", None)).tolist() == [[t, f, f, f, t, f, f, f]]


def test_unstructured_per_row_drops_lowest():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 9.0, 8.0, 0.1]])
    keep = select_keep(score, Pattern.parse("unstructured", 0.5))
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]


def test_unstructured_rounds_down_like_int():
    score = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])  # int(5 * 0.5) = 2 dropped
    keep = select_keep(score, Pattern.parse("unstructured", 0.5))
    assert keep.tolist() == [[True, True, True, False, False]]


def test_ties_break_stably_by_column():
    score = torch.ones(1, 4)
    assert select_keep(score, Pattern.parse("unstructured", 0.5)).tolist() == [[False, False, True, True]]
    assert select_keep(torch.ones(1, 4), Pattern.parse("2:4", None)).tolist() == [[False, False, True, True]]


def test_matrix_scope_one_threshold_for_the_matrix():
    score = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 6.0]])  # int(6 * 0.5) = 3 lowest: 0.5, 1, 2
    keep = select_keep(score, Pattern.parse("unstructured", 0.5), scope="matrix")
    assert keep.tolist() == [[False, False], [True, True], [False, True]]


def test_wanda_and_gblm_scores_hand_computed():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    scaler = torch.tensor([4.0, 1.0])  # sqrt -> [2, 1]
    assert wanda_score(w, scaler).tolist() == [[2.0, 2.0], [6.0, 4.0]]
    g = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    # |W|*sqrt(s) + 100*|W|*G = [[2 + 50, 2 + 50], [6 + 300, 4 + 800]]
    assert gblm_score(w, scaler, g, 100.0).tolist() == [[52.0, 52.0], [306.0, 804.0]]


def test_gblm_alpha_zero_is_wanda_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w, s, grad = torch.randn(16, 32, generator=g), torch.rand(32, generator=g), torch.rand(16, 32, generator=g)
    assert torch.equal(gblm_score(w, s, grad, 0.0), wanda_score(w, s))


def test_bf16_weights_score_in_fp32():
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    assert wanda_score(w, torch.tensor([1.0, 1.0])).dtype == torch.float32


@pytest.mark.parametrize(
    "pattern,sparsity,message",
    [
        ("2-4", None, "N:M"),
        ("4:2", None, "0 < N < M"),
        ("0:4", None, "0 < N < M"),
        ("unstructured", 1.0, "(0, 1)"),
        ("unstructured", 0.0, "(0, 1)"),
        ("unstructured", None, "--sparsity is required"),
        ("2:4", 0.3, "contradicts"),
    ],
)
def test_bad_patterns(pattern, sparsity, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Pattern.parse(pattern, sparsity)


def test_nm_must_divide_columns():
    with pytest.raises(UsageError, match="not a multiple of M=3"):
        Pattern.parse("1:3", None).check_columns(64, "mlp.down_proj")


@pytest.mark.parametrize("spec", ["unstructured", "2:4", "4:8"])
def test_row_bands_give_the_whole_matrix_mask(monkeypatch, spec):
    """select_keep sorts a band of rows at a time; any band size gives the one-sort mask (ties included)."""
    from lowmem_gblm.mask import pattern as pattern_mod

    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 5, (37, 48), generator=g).float()  # many ties: stable order decides
    pat = Pattern.parse(spec, 0.5 if spec == "unstructured" else None)
    whole = select_keep(score, pat)
    for band in (48, 5 * 48, 7):  # one row, five rows, less than a row
        monkeypatch.setattr(pattern_mod, "SORT_BAND", band)
        assert torch.equal(select_keep(score, pat), whole), band
    # and the one-sort mask by hand for the first row: drop the lowest half, earliest first among ties
    order = sorted(range(48), key=lambda j: (float(score[0, j]), j)) if spec == "unstructured" else None
    if order is not None:
        assert set(torch.nonzero(~whole[0]).flatten().tolist()) == set(order[:24])


def test_gblm_score_is_the_formula_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    w, s, grad = torch.randn(6, 8, generator=g), torch.rand(8, generator=g), torch.rand(6, 8, generator=g)
    want = w.abs() * torch.sqrt(s).reshape(1, -1) + 100.0 * (w.abs() * grad)
    assert torch.equal(gblm_score(w, s, grad, 100.0), want)
    assert torch.equal(gblm_score(w.bfloat16(), s, grad, 3.0),
                       w.bfloat16().float().abs() * torch.sqrt(s) + 3.0 * (w.bfloat16().float().abs() * grad))


def test_scores_that_overflow_are_refused_naming_the_linear():
    """alpha * |W| * G past float32's range is inf: a mask chosen from it would be arbitrary (the first k columns)."""
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25]])
    stats = {"scaler_row": torch.ones(4), "gradient": torch.full((1, 4), 10.0)}
    job = LinearJob("model.layers.0.mlp.up_proj.weight", w, stats, Pattern.parse("unstructured", 0.5),
                    MethodOptions(alpha=3e38))
    with pytest.raises(UsageError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: 4 score\(s\) are NaN/Inf"):
        get_method("gblm").prune(job)
    assert torch.equal(w, torch.tensor([[0.5, -2.0, 1.0, 0.25]]))  # refused before anything was masked
    with pytest.raises(UsageError, match="--alpha"):
        PruneConfig(model_dir="m", out_dir="o", calib=CalibConfig(source="c.txt"), method="gblm", alpha=1e308)
