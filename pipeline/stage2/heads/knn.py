"""k nearest neighbours by cosine similarity (dinov2's k-NN evaluation)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.stage2.heads.base import FitResult, Head, balanced_weights, softmax
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.fitting import fitting_threads


class KNNHead(Head):
    """k nearest neighbours by cosine similarity on L2-normalised features; votes weighted by exp(sim / 0.07)
    (dinov2's k-NN evaluation), and by inverse class frequency with ``--class-weight balanced``."""

    name = "knn"
    TEMPERATURE = 0.07
    CHUNK_ELEMENTS = 1 << 24  # similarity entries per block (64 MB of float32), whatever the size of train
    TRAIN_METRIC_ROWS = 2000  # train rows scored (leave-one-out) for the train metrics: +-1% on accuracy

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        self.train_features = _l2_normalise(X)
        self.train_labels = np.asarray(y, np.int64)
        return FitResult(info={"k": min(self.cfg.k, len(y))})

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"k": k} for k in (1, 3, 5, 10, 20, 50)]

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self._log_votes(X)

    def train_predictions(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
        """Leave-one-out on a seeded sample of train rows: scoring every train row would cost an N x N similarity
        pass, and each row would count itself among its own neighbours (k=1 would always be right)."""
        n = len(self.train_labels)
        if n < 2:
            return y, self.predict_proba(X), None
        rows = np.sort(np.random.default_rng(self.cfg.seed).permutation(n)[: self.TRAIN_METRIC_ROWS])
        proba = softmax(self._log_votes(np.asarray(X)[rows], exclude=rows))
        note = f"leave-one-out on {len(rows)} of {n} train rows (seeded sample; a row is not its own neighbour)"
        return np.asarray(y)[rows], proba, note

    @torch.no_grad()
    def _log_votes(self, X: np.ndarray, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """Log of each class's share of the weighted votes; ``exclude[i]``: a train row query i may not vote for.
        On the head's device (a GPU when there is one), one block of queries at a time: never the N x N matrix."""
        dev = resolve_device(self.cfg.device)
        train = torch.as_tensor(self.train_features, device=dev)
        labels = torch.as_tensor(self.train_labels, device=dev)
        class_w = torch.ones(self.num_classes, device=dev)
        if self.cfg.class_weight == "balanced":
            class_w = torch.as_tensor(balanced_weights(self.train_labels, self.num_classes), device=dev)
        k = min(self.cfg.k, len(labels) - (exclude is not None))
        coarse = train.bfloat16() if _fast_bf16(dev) else None
        chunk = max(1, self.CHUNK_ELEMENTS // max(1, len(labels)))  # bounds the similarity block's memory
        out = []
        for start in range(0, len(X), chunk):
            q = torch.as_tensor(_l2_normalise(X[start : start + chunk]), device=dev)
            ex = None if exclude is None else torch.as_tensor(exclude[start : start + chunk], device=dev)
            sim, idx = nearest(q, train, k=k, exclude=ex, coarse=coarse)
            nb = labels[idx]
            weights = (sim / self.TEMPERATURE).exp() * class_w[nb]
            votes = torch.zeros(len(q), self.num_classes, device=dev).scatter_add_(1, nb, weights)
            out.append(torch.log(votes / votes.sum(1, keepdim=True) + 1e-6))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"train_features": self.train_features, "train_labels": self.train_labels}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.train_features, self.train_labels = state["train_features"], state["train_labels"]


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    X = torch.as_tensor(np.asarray(X, np.float32))
    # Each row divided by its largest entry first: the squares of features above ~1e19 overflow float32, which left
    # k-NN at chance on huge features; the direction, all that cosine similarity uses, is the same.
    X = X / X.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    return (X / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min_(1e-12)).numpy()  # 5x np.linalg.norm


RESCORE_ROWS = 512  # train rows gathered per rescoring step (2.6 MB of 1,280-d float32: stays in a core's L2)


def _fast_bf16(device: torch.device) -> bool:
    """A CPU with AMX tiles, where a bfloat16 matmul is ~5x a float32 one (1,240 against 230 GFLOP/s on this
    project's 2-core box). Elsewhere (CUDA, older CPUs) float32 is fast enough or bfloat16 is no faster."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and check is not None and bool(check())


def coarse_error(dim: int) -> float:
    """A bound on |bf16 similarity - float32 similarity| for vectors of norm at most 1 with ``dim`` entries:
    rounding each input to bfloat16 (relative 2^-8 per entry, twice, plus the cross term), the float32 sums over
    ``dim`` products (the exact and the coarse one), and rounding the result to bfloat16 (2^-9 of a value <= ~1)."""
    u = 2.0**-8
    return 2 * u + u * u + 2 * dim * 2.0**-24 * (1 + u) ** 2 + 2.0**-9 * (1 + 3 * u)


def nearest(
    q: torch.Tensor,
    train: torch.Tensor,
    *,
    k: int,
    exclude: torch.Tensor | None = None,
    coarse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest float32 similarities ``q @ train.T`` of each query (rows of norm <= 1) and their train
    rows, skipping row ``exclude[i]`` for query i. With ``coarse`` (``train`` in bfloat16) the same neighbours for
    a fifth of the work: a bfloat16 pass finds each query's k-th coarse similarity t, and only the rows whose coarse
    similarity is at least ``t - 2 e`` (e = :func:`coarse_error`; every true k nearest row is among them, and on
    real features they are ~40 of 50,000) are rescored in float32, one by one."""
    if coarse is None or k >= len(train) - (exclude is not None):
        return _exact_topk(q, train, k=k, exclude=exclude)
    approx = q.bfloat16() @ coarse.T
    if exclude is not None:
        approx[torch.arange(len(q), device=q.device), exclude] = -math.inf
    kth = approx.topk(k, dim=1).values[:, -1:].float()
    # Compared in bfloat16 (2.5x faster than mixed types), the threshold rounded down: 2^-8 covers the rounding.
    low = (kth - 2 * coarse_error(q.shape[1]) - 2.0**-8).bfloat16()
    qi, ti = torch.nonzero(approx >= low, as_tuple=True)  # row-major: grouped by query
    del approx
    with fitting_threads(q.device):  # small ops: two threads on a shared CPU made this loop 10-40x slower
        exact = torch.empty(len(ti), device=q.device)
        buf = torch.empty(min(RESCORE_ROWS, len(ti)), train.shape[1], device=q.device)
        for s in range(0, len(ti), RESCORE_ROWS):
            rows = torch.index_select(train, 0, ti[s : s + RESCORE_ROWS], out=buf[: len(ti[s : s + RESCORE_ROWS])])
            exact[s : s + RESCORE_ROWS] = rows.mul_(q[qi[s : s + RESCORE_ROWS]]).sum(1)
        counts = torch.bincount(qi, minlength=len(q))
        pos = torch.arange(len(qi), device=q.device) - (counts.cumsum(0) - counts)[qi]  # place within its query
        width = int(counts.max())
        sims = torch.full((len(q), width), -math.inf, device=q.device).index_put_((qi, pos), exact)
        rows = torch.zeros((len(q), width), dtype=torch.long, device=q.device).index_put_((qi, pos), ti)
        sim, at = sims.topk(k, dim=1)
        return sim, rows.gather(1, at)


def _exact_topk(
    q: torch.Tensor, train: torch.Tensor, *, k: int, exclude: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    sim = q @ train.T
    if exclude is not None:
        sim[torch.arange(len(q), device=q.device), exclude] = -math.inf
    return sim.topk(k, dim=1)
