"""k nearest neighbours by cosine similarity (dinov2's k-NN evaluation)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.stage2.heads.base import FitResult, Head, balanced_weights, softmax
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.fitting import fitting_threads

log = logging.getLogger(__name__)


class KNNHead(Head):
    """k nearest neighbours by cosine similarity on L2-normalised features; votes weighted by exp(sim / 0.07)
    (dinov2's k-NN evaluation), and by inverse class frequency with ``--class-weight balanced``."""

    name = "knn"
    TEMPERATURE = 0.07
    # Similarity entries per block of queries (128 MB of bfloat16, 256 MB of float32 at most), whatever the size of
    # train: below ~1,000 queries a block, a bfloat16 matmul ran at half its speed on this project's CPU.
    CHUNK_ELEMENTS = 1 << 26
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
        votes = self._log_votes(np.asarray(X)[rows], exclude=rows)
        proba = 1 / (1 + np.exp(-votes)) if self.cfg.task == "multilabel" else softmax(votes)
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
        if self.cfg.class_weight == "balanced" and labels.ndim == 1:
            class_w = torch.as_tensor(balanced_weights(self.train_labels, self.num_classes), device=dev)
        k = min(self.cfg.k, len(labels) - (exclude is not None))
        search = Search(train, coarse=train.bfloat16() if _fast_bf16(dev) else None)
        chunk = max(1, self.CHUNK_ELEMENTS // max(1, len(labels)))  # bounds the similarity block's memory
        out = []
        for start in range(0, len(X), chunk):
            q = torch.as_tensor(_l2_normalise(X[start : start + chunk]), device=dev)
            ex = None if exclude is None else torch.as_tensor(exclude[start : start + chunk], device=dev)
            sim, idx = search.nearest(q, k=k, exclude=ex)
            if labels.ndim == 2:  # several labels per image: each label's share of the weighted votes, as a logit
                weights = (sim / self.TEMPERATURE).exp()
                share = (weights[:, :, None] * labels[idx].float()).sum(1) / weights.sum(1, keepdim=True)
                share = share.clamp(1e-6, 1 - 1e-6)
                out.append(torch.log(share) - torch.log1p(-share))
                continue
            nb = labels[idx]
            weights = (sim / self.TEMPERATURE).exp() * class_w[nb]
            votes = torch.zeros(len(q), self.num_classes, device=dev).scatter_add_(1, nb, weights)
            out.append(torch.log(votes / votes.sum(1, keepdim=True) + 1e-6))
        if search.fell_back:
            log.info("k-NN: features too alike for the bfloat16 pass (%s); exact float32 search", search.fell_back)
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
    """A CPU with bfloat16 matmul instructions (AMX tiles, or AVX-512 BF16), where a bfloat16 matmul is 2-5x a
    float32 one (1,240 against 230 GFLOP/s with AMX; 2.2x on this project's AMD EPYC with AVX-512 BF16). Elsewhere
    (CUDA, older CPUs) float32 is fast enough or bfloat16 is no faster."""
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and bool(check()) for check in checks)


def coarse_error(dim: int) -> float:
    """A bound on |bf16 similarity - float32 similarity| for vectors of norm at most 1 with ``dim`` entries:
    rounding each input to bfloat16 (relative 2^-8 per entry, twice, plus the cross term), the float32 sums over
    ``dim`` products (the exact and the coarse one), and rounding the result to bfloat16 (2^-9 of a value <= ~1)."""
    u = 2.0**-8
    return 2 * u + u * u + 2 * dim * 2.0**-24 * (1 + u) ** 2 + 2.0**-9 * (1 + 3 * u)


# A candidate rescored on its own costs about as much as this many rows of the float32 matmul (1.1 us against
# 6.4 ns a 512-d row on this CPU), and the bfloat16 pass about half the exact search: so the coarse path pays
# while it leaves fewer than ~len(train) / 300 rows per query (on real MobileNetV2 features ~4 per neighbour).
# On features that all point nearly the same way (a random-init backbone) every row is within the bound of the
# k-th: rescoring them one by one ran 124 s for 50,000 x 512, where the exact float32 search takes a few seconds.
RESCORE_COST = 300


class Search:
    """The k nearest train rows of blocks of queries: the bfloat16 pass while it pays, the exact float32 search
    from the first block where it would not (the rest of the blocks are of the same features). ``fell_back``
    says why, once it has."""

    def __init__(self, train: torch.Tensor, *, coarse: torch.Tensor | None):
        self.train, self.coarse, self.fell_back = train, coarse, ""

    def nearest(self, q: torch.Tensor, *, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        found = None
        if self.coarse is not None:
            found = nearest(q, self.train, k=k, exclude=exclude, coarse=self.coarse)
            if found is None:
                self.coarse = None
                self.fell_back = f"over {len(self.train) / RESCORE_COST:.0f} rows a query within the bound of its k-th"
        return found if found is not None else exact_topk(q, self.train, k=k, exclude=exclude)


def nearest(
    q: torch.Tensor,
    train: torch.Tensor,
    *,
    k: int,
    exclude: torch.Tensor | None = None,
    coarse: torch.Tensor | None = None,
    limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k`` largest float32 similarities ``q @ train.T`` of each query (rows of norm <= 1) and their train
    rows, skipping row ``exclude[i]`` for query i. With ``coarse`` (``train`` in bfloat16) the same neighbours for
    a fraction of the work: a bfloat16 pass finds each query's k-th coarse similarity t, and only the rows whose
    coarse similarity is at least ``t - 2 e`` (e = :func:`coarse_error`; every true k nearest row is among them,
    and on real features they are ~40 of 50,000) are rescored in float32. None when that would rescore more than
    ``limit`` rows per query on average (default ``len(train) / RESCORE_COST``): the exact search is cheaper."""
    if coarse is None or k >= len(train) - (exclude is not None):
        return exact_topk(q, train, k=k, exclude=exclude)
    approx = q.bfloat16() @ coarse.T
    if exclude is not None:
        approx[torch.arange(len(q), device=q.device), exclude] = -math.inf
    kth = approx.topk(k, dim=1).values[:, -1:].float()
    # Compared in bfloat16 (2.5x faster than mixed types), the threshold rounded down: 2^-8 covers the rounding.
    low = (kth - 2 * coarse_error(q.shape[1]) - 2.0**-8).bfloat16()
    within = approx >= low
    del approx
    if int(torch.count_nonzero(within)) > (len(train) / RESCORE_COST if limit is None else limit) * len(q):
        return None
    qi, ti = torch.nonzero(within, as_tuple=True)  # row-major: grouped by query
    return _rescore(q, train, qi, ti, k=k)


def _rescore(
    q: torch.Tensor, train: torch.Tensor, qi: torch.Tensor, ti: torch.Tensor, *, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 similarity of each (query qi, train row ti) candidate, and each query's k best of them."""
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


EXACT_BLOCK_ROWS = 16_384  # train rows per float32 block of the exact search (64 MB for 1,024 queries)


def exact_topk(
    q: torch.Tensor, train: torch.Tensor, *, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact float32 top-k of ``q @ train.T``, one block of train rows at a time (each block's own top-k, then
    the best k of those): the memory of a block, whatever the size of train."""
    best_sim, best_idx = [], []
    rows = torch.arange(len(q), device=q.device)
    for start in range(0, len(train), EXACT_BLOCK_ROWS):
        sim = q @ train[start : start + EXACT_BLOCK_ROWS].T
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + sim.shape[1])
            sim[rows[inside], exclude[inside] - start] = -math.inf
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim.append(s)
        best_idx.append(i + start)
    if len(best_sim) == 1:
        return best_sim[0], best_idx[0]
    sim, at = torch.cat(best_sim, 1).topk(k, dim=1)
    return sim, torch.cat(best_idx, 1).gather(1, at)
