"""SparseGPT: agreement with an independent explicit-inverse reference, mask structure, quality, goldens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import LinearJob, get_method
from lowmem_gblm.methods.sparsegpt import sparsegpt_prune
from lowmem_gblm.stream.stats import Hessian

UNSTRUCTURED = Pattern("unstructured", 0.5)
TWO_FOUR = Pattern("nm", 0.5, 2, 4)
FOUR_EIGHT = Pattern("nm", 0.5, 4, 8)


def correlated_inputs(tokens: int, in_f: int, seed: int, rank: int = 16) -> torch.Tensor:
    """X: [tokens, in], low-rank plus noise with unequal column scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / rank**0.5
    x = low + 0.3 * torch.randn(tokens, in_f, generator=g)
    return x * torch.exp(0.5 * torch.randn(in_f, generator=g))


def hessian_of(x: torch.Tensor, nsamples: int = 4) -> torch.Tensor:
    """H through the pipeline's own accumulator: (2/N) sum_n X_n^T X_n."""
    acc = Hessian(x.shape[1], x.device)
    for chunk in x.chunk(nsamples):
        acc.add(chunk)
    return acc.result(nsamples)


def layer(out_f: int, in_f: int, seed: int, tokens: int = 512):
    g = torch.Generator().manual_seed(seed + 1000)
    weight = torch.randn(out_f, in_f, generator=g)
    x = correlated_inputs(tokens, in_f, seed)
    return weight, x, hessian_of(x)


def reference_sparsegpt(weight, hessian, pattern, blocksize, percdamp):
    """Slow, independent SparseGPT in float64: no Cholesky, one explicit inverse per column.

    OBS after the columns before j are fixed: F = inv(H[j:, j:]); saliency w_j^2 / F_00; pruning
    column j moves the later weights by -(w_j - q_j) / F_00 * F[0, :]. Unstructured masks are chosen
    per column block from the weights at the block start (exact count, stable sort); N:M masks per row
    at every M-th column from the weights as updated so far.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    in_f = w.shape[1]
    dead = torch.diag(h) == 0
    for i in torch.nonzero(dead).flatten().tolist():
        h[i, i] = 1.0
        w[:, i] = 0.0
    h += percdamp * torch.diag(h).mean() * torch.eye(in_f, dtype=h.dtype)
    obs_diag = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(in_f)])  # [in]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        if pattern.kind == "unstructured":
            sal = w[:, i1:i2] ** 2 / obs_diag[i1:i2]
            k = int(sal.numel() * pattern.sparsity)
            order = torch.sort(sal.flatten(), stable=True).indices[:k]
            block = torch.zeros(sal.numel(), dtype=torch.bool)
            block[order] = True
            pruned[:, i1:i2] = block.reshape(sal.shape)
        for j in range(i1, i2):
            if pattern.kind == "nm" and (j - i1) % pattern.m == 0:
                sal = w[:, j : j + pattern.m] ** 2 / obs_diag[j : j + pattern.m]
                for r in range(w.shape[0]):
                    for c in torch.sort(sal[r], stable=True).indices[: pattern.m - pattern.n].tolist():
                        pruned[r, j + c] = True
            f = torch.linalg.inv(h[j:, j:])
            q = torch.where(pruned[:, j], torch.zeros_like(w[:, j]), w[:, j])
            w[:, j:] -= torch.outer((w[:, j] - q) / f[0, 0], f[0, :])
            w[:, j] = q
    return w, ~pruned


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# (1) agreement with the independent reference -------------------------------------------------


@pytest.mark.parametrize(
    "pattern,blocksize",
    [(UNSTRUCTURED, 16), (UNSTRUCTURED, 24), (UNSTRUCTURED, 64),
     (TWO_FOUR, 16), (TWO_FOUR, 64), (FOUR_EIGHT, 24)],
)
def test_matches_explicit_inverse_reference(pattern, blocksize):
    weight, _, h = layer(24, 64, seed=1)
    w_copy, h_copy = weight.clone(), h.clone()
    new, keep = sparsegpt_prune(weight, h, pattern, blocksize=blocksize, percdamp=0.01)
    ref_w, ref_keep = reference_sparsegpt(weight, h, pattern, blocksize, 0.01)
    assert new.dtype == torch.float32 and keep.dtype == torch.bool
    assert torch.equal(keep, ref_keep)
    assert rel_err(new, ref_w) < 1e-5
    assert torch.equal(weight, w_copy) and torch.equal(h, h_copy)  # pure: inputs untouched


# (2) exact counts / structure -----------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_unstructured_exact_count_per_column_block(sparsity):
    out_f, in_f, bs = 9, 40, 16  # blocks of 16, 16 and 8 columns
    weight, _, h = layer(out_f, in_f, seed=2)
    new, keep = sparsegpt_prune(weight, h, Pattern("unstructured", sparsity), blocksize=bs)
    for i1 in range(0, in_f, bs):
        block = keep[:, i1 : i1 + bs]
        assert int((~block).sum()) == int(block.numel() * sparsity)
    assert torch.all(new[~keep] == 0)
    assert torch.all(new[keep] != 0)  # random weights: nothing kept is accidentally zero


@pytest.mark.parametrize("pattern", [TWO_FOUR, FOUR_EIGHT])
@pytest.mark.parametrize("blocksize", [128, 16, 6])  # 6 is not a multiple of M: rounded internally
def test_nm_exact_structure(pattern, blocksize):
    weight, _, h = layer(12, 48, seed=3)
    new, keep = sparsegpt_prune(weight, h, pattern, blocksize=blocksize)
    groups = keep.reshape(12, 48 // pattern.m, pattern.m)
    assert torch.all(groups.sum(-1) == pattern.n)
    assert torch.all(new[~keep] == 0)


def test_nm_result_independent_of_blocksize():
    weight, _, h = layer(12, 48, seed=4)
    a, ka = sparsegpt_prune(weight, h, TWO_FOUR, blocksize=48)
    b, kb = sparsegpt_prune(weight, h, TWO_FOUR, blocksize=8)
    assert torch.equal(ka, kb)
    assert rel_err(b, a) < 1e-5


# (3) quality: lower layer-wise reconstruction error than Wanda --------------------------------


def wanda_prune(weight, x, pattern):
    """|W| * sqrt(sum x^2), per-row (or per N:M group) lowest dropped, no weight update."""
    score = weight.abs() * x.pow(2).sum(0).sqrt()
    out_f, in_f = weight.shape
    if pattern.kind == "nm":
        groups = score.reshape(out_f, -1, pattern.m)
        drop = torch.sort(groups, dim=-1).indices[..., : pattern.m - pattern.n]
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(out_f, in_f)
    else:
        drop = torch.sort(score, dim=1).indices[:, : int(in_f * pattern.sparsity)]
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    return weight * keep


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_reconstruction_error_below_wanda(pattern):
    weight, x, h = layer(32, 64, seed=5, tokens=1024)
    new, _ = sparsegpt_prune(weight, h, pattern, blocksize=32)
    dense = x @ weight.T
    err_sgpt = torch.linalg.norm(dense - x @ new.T)
    err_wanda = torch.linalg.norm(dense - x @ wanda_prune(weight, x, pattern).T)
    assert err_sgpt < 0.8 * err_wanda, (float(err_sgpt), float(err_wanda))


# (4) dead inputs / (5) non-PD Hessian ----------------------------------------------------------


def test_dead_input_columns_are_zeroed():
    weight, x, _ = layer(8, 32, seed=6)
    x = 0.01 * x  # small live H_ii, so a dead column's H_ii = 1 alone would not get it pruned
    x[:, [3, 17]] = 0.0
    h = hessian_of(x)
    assert h[3, 3] == 0 and h[17, 17] == 0
    new, keep = sparsegpt_prune(weight, h, UNSTRUCTURED, blocksize=16)
    assert torch.isfinite(new).all()
    assert torch.all(new[:, [3, 17]] == 0)
    assert not keep[:, [3, 17]].any()  # zeroed weights have saliency 0: pruned first
    # H_ii := 1 makes the dead rows/columns positive definite even without damping
    new0, _ = sparsegpt_prune(weight, h, UNSTRUCTURED, blocksize=16, percdamp=0.0)
    assert torch.isfinite(new0).all() and torch.all(new0[:, [3, 17]] == 0)
    assert int((~keep).sum()) == 8 * 32 // 2


def test_non_positive_definite_hessian_names_percdamp():
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(UsageError, match="--percdamp"):
        sparsegpt_prune(torch.ones(3, 2), h, UNSTRUCTURED, percdamp=0.0)


# (6) hand-computed goldens ---------------------------------------------------------------------


def test_golden_diagonal_hessian_is_magnitude_by_h():
    # Diagonal H, percdamp 0: H^-1 = diag(1/h), its upper Cholesky factor is diag(1/sqrt(h)), so the
    # saliency is w^2 * h and the off-diagonal update row Hinv[i, i+1:] is 0 (no weight moves).
    # w = [4, -3, 2, 1], h = [0.25, 1, 4, 36] -> saliency [4, 9, 16, 36]; 50% of 4 -> prune 2 lowest:
    # columns 0 and 1 (the two largest magnitudes!) -> keep [F, F, T, T], weights [0, 0, 2, 1].
    weight = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    h = torch.diag(torch.tensor([0.25, 1.0, 4.0, 36.0]))
    new, keep = sparsegpt_prune(weight, h, UNSTRUCTURED, blocksize=4, percdamp=0.0)
    assert keep.tolist() == [[False, False, True, True]]
    assert new.tolist() == [[0.0, 0.0, 2.0, 1.0]]
    # 2:4 on two rows: row 0 as above; row 1 = [1, 1, 1, 1] -> saliency = h -> prune columns 0, 1.
    weight2 = torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    new2, keep2 = sparsegpt_prune(weight2, h, TWO_FOUR, blocksize=4, percdamp=0.0)
    assert keep2.tolist() == [[False, False, True, True]] * 2
    assert new2.tolist() == [[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]]


def test_golden_two_columns_with_update():
    # H = [[2, 1], [1, 2]], percdamp 0, w = [1, 1], 50% -> one weight pruned.
    # H^-1 = (1/3) [[2, -1], [-1, 2]]; upper Cholesky U of H^-1: U00 = sqrt(2/3),
    # U01 = (-1/3) / sqrt(2/3), U11 = sqrt(2/3 - U01^2) = sqrt(2/3 - 1/6) = sqrt(1/2).
    # saliency: col 0: 1 / (2/3) = 1.5, col 1: 1 / (1/2) = 2 -> prune col 0.
    # err = (1 - 0) / U00; w1 -= err * U01 = 1 - (-1/3) / (2/3) = 1.5  -> weights [0, 1.5].
    # (The OBS check: delta = -w0 / Hinv00 * Hinv[0, :] = -1.5 * [2/3, -1/3] = [-1, 0.5].)
    weight = torch.tensor([[1.0, 1.0]])
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    new, keep = sparsegpt_prune(weight, h, UNSTRUCTURED, blocksize=2, percdamp=0.0)
    assert keep.tolist() == [[False, True]]
    assert new[0, 0] == 0.0
    assert new[0, 1].item() == pytest.approx(1.5, rel=1e-6)


# registry / in-place contract -------------------------------------------------------------------


def test_registered_method_updates_weight_in_place():
    method = get_method("sparsegpt")
    assert method.needs == frozenset({"hessian"})
    weight, _, h = layer(8, 32, seed=7)
    w_bf16 = weight.to(torch.bfloat16)
    expected, expected_keep = sparsegpt_prune(w_bf16, h, TWO_FOUR, blocksize=16, percdamp=0.01)
    job = LinearJob(
        name="model.layers.0.mlp.down_proj.weight",
        weight=w_bf16,
        stats={"hessian": h},
        pattern=TWO_FOUR,
        options=SimpleNamespace(blocksize=16, percdamp=0.01),
    )
    keep = method.prune(job)
    assert job.weight is w_bf16 and job.weight.dtype == torch.bfloat16
    assert torch.equal(keep, expected_keep)
    assert torch.equal(job.weight, expected.to(torch.bfloat16))
    assert torch.all(job.weight[~keep] == 0)


def test_registered_method_error_names_layer_and_percdamp():
    job = LinearJob(
        name="model.layers.2.self_attn.q_proj.weight",
        weight=torch.ones(2, 2),
        stats={"hessian": torch.tensor([[1.0, 2.0], [2.0, 1.0]])},
        pattern=UNSTRUCTURED,
        options=SimpleNamespace(blocksize=128, percdamp=0.0),
    )
    with pytest.raises(UsageError, match=r"q_proj.*--percdamp"):
        get_method("sparsegpt").prune(job)
