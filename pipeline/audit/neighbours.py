"""Nearest neighbours by cosine similarity on L2-normalised features: blocked, bounded memory, on one device.

One pass finds every row's ``k`` nearest rows among all rows of the file (train and val together): leaks, near
duplicates within a split and outliers are all read from that one table. The all-pairs product is the cost
(100,000 rows: 5e9 pairs), so the search runs on a projection of the features (PCA to ``search_dim`` columns,
re-normalised) and the candidates it returns are re-scored exactly on the full features. On the planted digits
(tests/test_audit.py) 64 and 128 directions found the same copies; without the exact re-scoring the margins are
noisier and one near copy fewer was found. Only the upper triangle of
blocks is multiplied; each block updates the rows of both sides (the similarity is symmetric).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK_BYTES = 256 << 20  # the similarity block held at once (rows x columns x 4 bytes)
PCA_ROWS = 16384  # rows the projection is fitted on


@dataclass
class Neighbours:
    """Row i's ``k`` nearest other rows, most similar first: ``index`` (N, k) int64 and cosine ``sim`` (N, k)."""

    index: np.ndarray
    sim: np.ndarray


def normalise(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def project(X: torch.Tensor, *, dim: int, seed: int = 0) -> torch.Tensor:
    """``X`` (unit rows) on its first ``dim`` principal directions, rows re-normalised; ``X`` itself when it has no
    more than ``dim`` columns. Near-parallel rows stay near-parallel: they differ little in every direction."""
    if dim <= 0 or min(X.shape) <= dim:
        return X
    with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):  # seeded, the caller's RNG kept
        torch.manual_seed(seed)
        # The directions from a sample of rows: fitting on all 100,000 rows cost 4x more for the same subspace.
        sample = X[torch.randperm(len(X), device=X.device)[:PCA_ROWS]]
        mean = sample.mean(0, keepdim=True)
        _, _, V = torch.pca_lowrank(sample - mean, q=dim, center=False, niter=2)
    return normalise((X - mean) @ V)


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int) -> None:
    """Keep the ``k`` largest of (best, new) per row, in place."""
    cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    top_s, pos = cat_s.topk(k, dim=1)
    best_s.copy_(top_s)
    best_i.copy_(cat_i.gather(1, pos))


def candidates(Z: torch.Tensor, *, k: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most similar other rows of ``Z`` (unit rows): (sim, index), both (N, k), unsorted ties."""
    n = len(Z)
    k = min(k, n - 1)
    block = block or max(64, min(4096, BLOCK_BYTES // (4 * max(n, 1))))
    best_s = torch.full((n, k), -2.0, device=Z.device)
    best_i = torch.zeros((n, k), dtype=torch.int64, device=Z.device)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        S = Z[lo:hi] @ Z[lo:].T  # this block of rows against itself and every later row
        S[:, : hi - lo].fill_diagonal_(-2.0)  # a row is not its own neighbour
        kk = min(k, S.shape[1])
        s, j = S.topk(kk, dim=1)
        _merge(best_s[lo:hi], best_i[lo:hi], s, j + lo, k)
        if hi < n:  # the later rows see this block's rows as neighbours too
            kr = min(k, hi - lo)
            s, j = S[:, hi - lo :].T.contiguous().topk(kr, dim=1)  # a copy first: topk along dim 0 is 4x slower
            _merge(best_s[hi:], best_i[hi:], s, j + lo, k)
    return best_s, best_i


def rescore(X: torch.Tensor, index: torch.Tensor, *, rows: int = 4096) -> torch.Tensor:
    """Exact cosine of each row of ``X`` (unit rows) with its candidate rows ``index`` (N, k)."""
    out = torch.empty(index.shape, dtype=X.dtype, device=X.device)
    for lo in range(0, len(X), rows):
        hi = min(len(X), lo + rows)
        out[lo:hi] = torch.einsum("nd,nkd->nk", X[lo:hi], X[index[lo:hi]])
    return out


@torch.inference_mode()
def nearest(
    features: np.ndarray, *, k: int, device: torch.device, search_dim: int = 64, oversample: int = 2, seed: int = 0
) -> Neighbours:
    """Every row's ``k`` nearest other rows by exact cosine similarity (searched on a ``search_dim`` projection among
    ``oversample * k`` candidates, then re-scored on all columns)."""
    X = normalise(torch.as_tensor(np.asarray(features), device=device).float())
    Z = project(X, dim=search_dim, seed=seed)
    wide = k * oversample if Z is not X else k
    _, idx = candidates(Z, k=wide)
    sim = rescore(X, idx)
    order = sim.argsort(dim=1, descending=True)[:, :k]
    return Neighbours(index=idx.gather(1, order).cpu().numpy(), sim=sim.gather(1, order).cpu().numpy())
