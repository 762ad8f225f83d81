"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with an OBS weight update per column.

The algorithm follows the published ``fasterprune`` loop:

1. ``W`` and ``H`` in fp32; dead inputs (``H_ii == 0``) get ``H_ii = 1`` and ``W[:, i] = 0``;
2. ``damp = percdamp * mean(diag H)`` is added to the diagonal;
3. ``Hinv`` = upper Cholesky factor of ``H^-1`` (cholesky -> cholesky_inverse -> cholesky upper);
4. columns are processed in blocks of ``blocksize``; inside a block each column is pruned and its
   error ``(w - q) / Hinv_ii`` is spread over the block's later columns (OBS update), and after the
   block the accumulated errors update all later columns at once (lazy batch update).

Mask selection uses the saliency ``w^2 / Hinv_ii^2`` (``Hinv`` the Cholesky factor above):

* unstructured: once per column block, over all rows and the block's columns, from the weights as
  they stand when the block starts;
* N:M: at every M-th column, per row over the next M columns, from the weights as already updated.

Difference from the reference code (on purpose): the reference picks the unstructured mask with
``thresh = sort(tmp.flatten())[int(tmp.numel() * sparsity)]; mask = tmp <= thresh``, which prunes
``int(numel * sparsity) + 1`` weights per block (the threshold element itself is included) and more
when scores tie. Here exactly ``int(numel * sparsity)`` weights of each column block are pruned, the
lowest by a stable sort (ties break by flattened row-major index). N:M uses a stable sort too.

Dead inputs have zero weights afterwards whatever ``keep`` says: ``keep`` is the selected mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_gblm.errors import UsageError
from lowmem_gblm.mask import Pattern
from lowmem_gblm.methods import LinearJob, Method, register

HESSIAN_DTYPE = torch.float32  # H, its inverse and its Cholesky factor: fp32 as in the reference
WEIGHT_DTYPE = torch.float32  # weights are updated in fp32 whatever the compute dtype


def _prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy W and H to fp32, handle dead inputs and add the damping. -> (W [out, in], H [in, in])."""
    h, dead = _damped_hessian(hessian, weight.device, percdamp)
    return _prepare_weight(weight, dead), h


def _damped_hessian(hessian: torch.Tensor, device: torch.device, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 copy of H with dead inputs (H_ii == 0) set to H_ii = 1 and the damping added. -> (H [in, in],
    dead [in] bool)."""
    h = hessian.to(device=device, dtype=HESSIAN_DTYPE, copy=True)  # [in, in]
    diag = h.diagonal()  # view: writes go into h
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * torch.mean(diag)
    return h, dead


def _prepare_weight(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of W [out, in] with the dead inputs' columns zeroed."""
    w = weight.to(dtype=WEIGHT_DTYPE, copy=True)  # [out, in]
    w[:, dead] = 0.0
    return w


@dataclass(frozen=True)
class HessianFactor:
    """What SparseGPT needs of a Hessian, shared by the linears that read the same input: the upper Cholesky factor
    of the damped H^-1 [in, in] fp32 and the dead inputs [in] bool."""

    upper: torch.Tensor
    dead: torch.Tensor


def hessian_factor(hessian: torch.Tensor, device: torch.device, percdamp: float) -> HessianFactor:
    """Damp ``hessian`` [in, in] on ``device`` (dead inputs, percdamp) and factor its inverse: a HessianFactor.
    Raises UsageError naming ``--percdamp`` when the damped H is not positive definite."""
    h, dead = _damped_hessian(hessian, device, percdamp)
    upper = inverse_hessian_cholesky(h, percdamp)
    return HessianFactor(upper, dead)


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U). h: [in, in] damped fp32 -> U [in, in].

    Raises UsageError naming ``--percdamp`` when H (as damped) is not positive definite.
    """

    def fail(where: str) -> UsageError:
        return UsageError(
            f"SparseGPT: the damped Hessian is not positive definite ({where}); "
            f"increase --percdamp (now {percdamp:g}, e.g. 0.1)"
        )

    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(low).all()):
        raise fail("Cholesky of H failed")
    hinv = torch.cholesky_inverse(low)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        raise fail("Cholesky of H^-1 failed")
    return upper


def _select_unstructured(w1: torch.Tensor, d1: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned-mask of one column block. w1: [out, count], d1: [count] -> prune [out, count] bool.

    Exactly ``int(numel * sparsity)`` lowest saliencies ``w^2 / d^2`` are pruned (stable sort).
    """
    saliency = w1.pow(2) / d1.reshape(1, -1).pow(2)  # [out, count]
    k = int(saliency.numel() * sparsity)
    prune = torch.zeros_like(w1, dtype=torch.bool)
    drop = torch.sort(saliency.reshape(-1), stable=True).indices[:k]
    prune.view(-1)[drop] = True
    return prune


def _select_nm(w_group: torch.Tensor, d_group: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Per row, the (m - n) lowest saliencies of one N:M group.

    w_group: [out, m], d_group: [m] -> column indices inside the group [out, m - n].
    """
    saliency = w_group.pow(2) / d_group.reshape(1, -1).pow(2)  # [out, m]
    m = w_group.shape[1]
    return torch.sort(saliency, dim=1, stable=True).indices[:, : m - n_keep]


def _effective_blocksize(pattern: Pattern, blocksize: int) -> int:
    """N:M groups must not straddle a block: round the block size down to a multiple of M (>= M).

    For N:M the result does not depend on the block size (the lazy update is exact), so this only
    changes the order of floating-point operations.
    """
    if pattern.kind != "nm":
        return blocksize
    return max(pattern.m, blocksize - blocksize % pattern.m)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep: torch.Tensor | None = None,
    *,
    factor: HessianFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear. weight: [out, in] any float dtype; hessian: [in, in] (2/N sum X^T X).

    ``factor``: ``hessian_factor(hessian, weight.device, percdamp)`` computed beforehand (shared by the linears that
    read the same input; the same arithmetic, so the same result); ``hessian`` is then not read (may be None).

    ``keep`` [out, in] bool: a mask chosen beforehand (``--update obs``): the same OBS sweep prunes exactly
    those weights and updates the rest, instead of choosing the mask inside the sweep.

    Returns (new_weight [out, in] fp32, keep [out, in] bool); new_weight is exactly 0 where keep is
    False. The inputs are not modified. Everything runs on ``weight.device``.
    """
    out_f, in_f = weight.shape
    given = hessian if factor is None else factor.upper
    if given.shape != (in_f, in_f):
        raise ValueError(
            f"hessian must be [{in_f}, {in_f}] for weight {list(weight.shape)}, got {list(given.shape)}"
        )
    if blocksize < 1:
        raise UsageError(f"--blocksize must be >= 1, got {blocksize}")
    if keep is not None and keep.shape != weight.shape:
        raise ValueError(f"keep must be {list(weight.shape)}, got {list(keep.shape)}")
    if pattern.kind == "nm" and keep is None:
        pattern.check_columns(in_f, "weight")

    if factor is None:
        factor = hessian_factor(hessian, weight.device, percdamp)
    w = _prepare_weight(weight, factor.dead)  # [out, in]
    hinv = factor.upper  # [in, in] upper; read only
    prune = torch.zeros_like(w, dtype=torch.bool)  # [out, in], True = pruned
    bs = _effective_blocksize(pattern, blocksize)

    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # [out, count]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]  # [count, count]
        d1 = torch.diagonal(hinv1)  # [count]
        if keep is not None:
            prune1 = ~keep[:, i1:i2]  # the given mask: nothing is selected here
        elif pattern.kind == "nm":
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            prune1 = _select_unstructured(w1, d1, pattern.sparsity)

        for i in range(count):
            if keep is None and pattern.kind == "nm" and i % pattern.m == 0:
                drop = _select_nm(w1[:, i : i + pattern.m], d1[i : i + pattern.m], pattern.n)
                prune1.scatter_(1, i + drop, True)
            col = w1[:, i]  # [out]
            d = d1[i]
            q = col.masked_fill(prune1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d  # [out]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        prune[:, i1:i2] = prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the later columns

    w.masked_fill_(prune, 0.0)  # already 0 (q = 0 there); kept explicit for the contract
    return w, ~prune


def _sparsegpt(job: LinearJob) -> torch.Tensor:
    job.pattern.check_columns(job.weight.shape[1], job.name)
    hessian, percdamp = job.stats["hessian"], job.options.percdamp

    def build() -> HessianFactor:
        return hessian_factor(hessian, job.weight.device, percdamp)

    try:  # the linears reading the same input (same Hessian tensor) factor it once: the block's job.factors
        factor = build() if job.factors is None else job.factors.get(
            hessian, ("sparsegpt", percdamp, str(job.weight.device)), build)
        new, keep = sparsegpt_prune(job.weight, hessian, job.pattern, job.options.blocksize, percdamp, factor=factor)
    except UsageError as exc:
        raise UsageError(f"{job.name}: {exc}") from exc
    job.weight.copy_(new.to(job.weight.dtype))
    return keep


register(Method("sparsegpt", frozenset({"hessian"}), _sparsegpt,
                "OBS-updated pruning with the inverse Hessian of the layer inputs (Frantar & Alistarh)",
                updates_weights=True, solve="obs"))
