"""Nearest neighbours by cosine similarity on L2-normalised features: blocked, bounded memory, on one device.

One pass finds every row's ``k`` nearest rows among all rows of the file (train and val together): leaks, near
duplicates within a split and outliers are all read from that one table. The all-pairs product is the cost
(100,000 rows: 5e9 pairs), so the search runs on a projection of the features (PCA to ``search_dim`` columns,
re-normalised) and the candidates it returns are re-scored exactly on the full features. On the planted digits
(tests/test_audit.py) 64 and 128 directions found the same copies; without the exact re-scoring the margins are
noisier and one near copy fewer was found. Each block of rows is multiplied with every row and only its rows'
top-k are taken, by the maxima of groups of columns (:func:`_row_topk`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.stage2.heads.knn import group_max, group_members, unit_rows_

log = logging.getLogger(__name__)

PCA_ROWS = 16384  # rows the projection is fitted on
BLOCK_BYTES = 256 << 20  # the similarity block held at once (rows x columns x 4 bytes)
GROUP = 32  # columns per group in a row's top-k (:func:`_row_topk`)
RESCORE_BYTES = 64 << 20  # candidate rows gathered at once for the exact re-scoring


@dataclass
class Neighbours:
    """Row i's ``k`` nearest other rows, most similar first: ``index`` (N, k) int64 and cosine ``sim`` (N, k)."""

    index: np.ndarray
    sim: np.ndarray


def normalise(X: torch.Tensor) -> torch.Tensor:
    """A copy of ``X`` with its rows scaled to unit length, whatever their scale (k-NN's :func:`unit_rows_`)."""
    return unit_rows_(X.clone())


def principal_basis(
    X: torch.Tensor, *, dim: int, seed: int = 0, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, V)``: the mean row and the first ``dim`` principal directions (D, dim) of ``X`` (of ``prepare(X)``,
    applied to the sampled rows only), by randomised PCA on up to :data:`PCA_ROWS` seeded rows (fitting on all
    100,000 rows cost 4x more for the same subspace)."""
    with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):  # seeded, the caller's RNG kept
        torch.manual_seed(seed)
        sample = X[torch.randperm(len(X), device=X.device)[:PCA_ROWS]]
        sample = prepare(sample) if prepare is not None else sample
        mean = sample.mean(0, keepdim=True)
        _, _, V = torch.pca_lowrank(sample - mean, q=min(dim, *sample.shape), center=False, niter=2)
    return mean, V


def project(X: torch.Tensor, *, dim: int, seed: int = 0) -> torch.Tensor:
    """``X`` (unit rows) on its first ``dim`` principal directions, rows re-normalised; ``X`` itself when it has no
    more than ``dim`` columns. Near-parallel rows stay near-parallel: they differ little in every direction."""
    if dim <= 0 or min(X.shape) <= dim:
        return X
    mean, V = principal_basis(X, dim=dim, seed=seed)
    return normalise((X - mean) @ V)


def _row_topk(S: torch.Tensor, k: int, *, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest entries of ``S`` (values, columns). The columns are cut into groups of ``group``
    (k-NN's :func:`~pipeline.stage2.heads.knn.group_max`); a row's k largest lie in its k groups of largest maximum
    (each of them has a maximum at least as large as the k-th largest, and at most k groups can), so only those
    k x ``group`` entries are ranked: the maxima are one pass over ``S`` that vectorises, where a top-k over every
    full row cost 3 ns an entry."""
    b, m = S.shape
    if m // group * group < 4 * k * group:
        return S.topk(min(k, m), dim=1)
    _, runs = group_max(S, group).topk(k, dim=1)
    cols, member = group_members(runs, m, group)
    cols, member = cols.reshape(b, -1), member.reshape(b, -1)
    s, pos = S.gather(1, cols).masked_fill_(~member, -math.inf).topk(k, dim=1)
    return s, cols.gather(1, pos)


def candidates(Z: torch.Tensor, *, k: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most similar other rows of ``Z`` (unit rows): (sim, index), both (N, k), unsorted ties.
    A block of rows at a time against every row (:data:`BLOCK_BYTES` of similarities held at once). Computing only
    the upper triangle and updating both sides halves the products but needs a top-k down the columns too (a
    transposed copy of the block): on 100,000 x 64 that took 51 s, this 23 s, both exact."""
    n = len(Z)
    k = min(k, n - 1)
    block = block or max(64, min(4096, BLOCK_BYTES // (4 * max(n, 1))))
    best_s = torch.empty((n, k), dtype=Z.dtype, device=Z.device)
    best_i = torch.empty((n, k), dtype=torch.int64, device=Z.device)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        S = Z[lo:hi] @ Z.T
        S[:, lo:hi].fill_diagonal_(-2.0)  # a row is not its own neighbour
        best_s[lo:hi], best_i[lo:hi] = _row_topk(S, k)
    return best_s, best_i


def rescore(X: torch.Tensor, index: torch.Tensor, *, rows: int | None = None) -> torch.Tensor:
    """Exact cosine of each row of ``X`` (unit rows) with its candidate rows ``index`` (N, k), a chunk of rows at a
    time (the gathered candidates of a chunk held at once: at most :data:`RESCORE_BYTES`)."""
    rows = rows or max(1, RESCORE_BYTES // (index.shape[1] * X.shape[1] * X.element_size()))
    out = torch.empty(index.shape, dtype=X.dtype, device=X.device)
    for lo in range(0, len(X), rows):
        hi = min(len(X), lo + rows)
        out[lo:hi] = torch.bmm(X[index[lo:hi]], X[lo:hi, :, None])[:, :, 0]
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
