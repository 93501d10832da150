"""k nearest neighbours by cosine similarity (dinov2's k-NN evaluation)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import pages
from pipeline.devices import resolve_device
from pipeline.stage2.heads.base import FitResult, Head, balanced_weights, softmax
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.fitting import fitting_threads, in_pieces

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
        search = Search(train, coarse=self._coarse(train))
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
            log.info("k-NN: features too alike for the coarse pass (%s); exact float32 search", search.fell_back)
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def _coarse(self, train: torch.Tensor) -> Coarse | Projected | None:
        """Train's coarse pass, made once for the val and the train-metric queries: :class:`Coarse` (bfloat16) on a
        CPU with fast bfloat16, :class:`Projected` (float32 on fewer dimensions) on another CPU, none on a GPU."""
        made = getattr(self, "_coarse_of", None)
        if made is None or made[0] is not self.train_features or made[2] != train.device:
            coarse = Coarse.of(train) if _fast_bf16(train.device) else Projected.of(train)
            made = self._coarse_of = (self.train_features, coarse, train.device)
        return made[1]

    def state(self) -> dict[str, np.ndarray]:
        return {"train_features": self.train_features, "train_labels": self.train_labels}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.train_features, self.train_labels = state["train_features"], state["train_labels"]


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    """Unit rows, float32, in one new array (divided in place: each new 307 MB array of 60,000 x 1,280 cost 75,000
    page faults), its memory mapped up front (:mod:`pipeline.pages`)."""
    out = pages.empty(np.shape(X), np.float32)  # a copy: the caller's rows stay as they are
    np.copyto(out, X, casting="unsafe")
    return unit_rows_(torch.from_numpy(out)).numpy()


def unit_rows_(X: torch.Tensor) -> torch.Tensor:
    """``X``'s rows scaled to unit length, in place (a zero row stays zero), whatever their scale: k-NN's and the
    audit's cosine similarities."""
    norm = torch.linalg.vector_norm(X, dim=1, keepdim=True)  # 5x np.linalg.norm
    # Rows whose squares over- or underflow float32 (features above ~1e19 left k-NN at chance; below ~1e-19 they
    # lose their digits) are divided by their largest entry first: the direction, all that cosine similarity
    # uses, is the same. Only those rows: a max pass over all of them (abs, a 307 MB temporary) cost 75,000 page
    # faults and 0.16 s on 60,000 x 1,280.
    odd = ~((norm > UNIT_SAFE[0]) & (norm < UNIT_SAFE[1])).squeeze(1)
    if odd.any():
        rows = X[odd]
        rows.div_(rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30))
        X[odd] = rows
        norm[odd] = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return X.div_(norm.clamp_min_(1e-12))


UNIT_SAFE = (1e-15, 1e15)  # row norms whose sum of squares float32 holds: no overflow, no digits lost to underflow


RESCORE_ROWS = 256  # candidates scored per step: their rows and their queries' (2 x 1.3 MB at 1,280-d float32)


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


def split_error(dim: int) -> float:
    """A bound on the float32 rounding of :class:`Coarse`'s split for vectors of norm at most 1, beside the
    bfloat16 part's: the exact similarity's own sum over ``dim`` products, the residuals ``x - (x.m) m`` (2 roundings
    an entry, on each side), the product along ``m`` and the final sum; doubled for margin."""
    return 2 * (dim + 16) * 2.0**-24


# A candidate rescored on its own costs about as much as this many rows of the float32 matmul (0.8-1.1 us against
# 6.4 ns a 512-d row on this CPU), and the coarse pass about half the exact search: so the coarse path pays while it
# leaves fewer than ~len(train) / 300 rows per query (on real features ~2 per neighbour, on features that all point
# nearly the same way, thanks to the split along the mean direction, ~3).
RESCORE_COST = 300
# The coarse scores are screened a group of train rows at a time. Group g is rows g, g + G, g + 2G, ... (G = N //
# GROUP; the last N - GROUP * G rows are a group each), so each group's largest score is one vectorised pass over
# the scores: 24 ms for 1,342 queries x 50,000 rows on one core, where each query's top 64 took 146 ms and the
# queries whose 64th was still within the bound another 98 ms. A group whose largest score is below a query's
# threshold holds none of its candidates; one at or above it holds at least one, its largest.
GROUP = 16
SEED_GROUPS = 16  # a query's best groups, whose rows set its threshold (the k-th best lower bound among them)


# Below this largest |r_t| the split along the mean direction pays for its float32 block of similarities (the
# bound shrinks with |r|); above it (real features: ~1) the coarse similarities stay bfloat16, as one matmul.
SPLIT_BELOW = 0.8


@dataclass
class Coarse:
    """Train for the coarse pass, split along its unit mean direction ``m`` where that tightens the bound:
    ``t = (t.m) m + r_t``. A query's similarity to a train row is then ``(q.m)(t.m)`` in float32 (an outer product)
    plus ``r_q.r_t`` in bfloat16, whose error is at most :func:`coarse_error` times ``|r_q| |r_t|`` (:meth:`bound`).
    On features that all point nearly the same way (a random-init backbone: median cosine 0.95) ``|r|`` is ~0.2
    and the bound ~10x tighter: the whole similarity in bfloat16 left every train row within the bound of the
    k-th. On real features (``|r|`` ~1) there is no split: ``m`` is 0 and the similarities stay bfloat16."""

    direction: torch.Tensor  # (D,) float32: m, or zeros
    along: torch.Tensor  # (N,) float32: t.m
    resid: torch.Tensor  # (N, D) bfloat16: r_t
    resid_norm: float  # the largest |r_t| (of the float32 residuals)
    scratch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, train: torch.Tensor) -> Coarse:
        mean = train.mean(0)
        m = mean / mean.norm().clamp_min(1e-30)
        along = train @ m
        resid = train - along[:, None] * m
        resid_norm = float(torch.linalg.vector_norm(resid, dim=1).max()) if len(train) else 0.0
        if resid_norm >= SPLIT_BELOW:
            m, along, resid = torch.zeros_like(m), torch.zeros_like(along), train
            resid_norm = float(torch.linalg.vector_norm(train, dim=1).max()) if len(train) else 0.0
        return cls(m, along, resid.bfloat16(), resid_norm)

    @property
    def is_split(self) -> bool:
        return bool(self.direction.any())

    def split(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A query block's ``(q.m, r_q)``."""
        along = q @ self.direction
        return along, q - along[:, None] * self.direction

    def bound(self, q_resid: torch.Tensor) -> torch.Tensor:
        """Per query: a bound on |coarse similarity - float32 similarity| for every train row."""
        dim = q_resid.shape[1]
        norms = torch.linalg.vector_norm(q_resid, dim=1)
        return norms * (self.resid_norm * coarse_error(dim)) + split_error(dim)

    def similarities(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coarse similarities (len(q), N), float32 when split (else bfloat16), and each query's bound on their
        error. Written into buffers kept from the last block: valid until the next call. New (len(q), N) tensors
        a block cost more in page faults than the bfloat16 matmul (0.14 s against 0.03 s to fill a float32 one)."""
        along, resid = self.split(q)
        shape = (len(q), len(self.resid))
        approx = torch.mm(resid.bfloat16(), self.resid.T, out=self._buffer("bf16", shape, torch.bfloat16))
        if self.is_split:
            approx = self._buffer("f32", shape, torch.float32).copy_(approx).addr_(along, self.along)
        return approx, self.bound(resid)

    def _buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        return _kept(self.scratch, name, shape, dtype, self.resid.device)

    def screen(self, q: torch.Tensor) -> Screen:
        """The coarse similarities: each within ``error`` of the float32 one, so a row's coarse similarity less it
        is a lower bound, and the threshold is the k-th of those less ``error`` again."""
        approx, error = self.similarities(q)
        return Screen(approx, 2 * error)


def _kept(scratch: dict[str, torch.Tensor], name: str, shape: tuple[int, int], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:  # fmt: skip
    """A (shape) tensor in a buffer kept in ``scratch`` from the last block (valid until the next call): new
    (len(q), N) tensors a block cost more in page faults than filling them."""
    count = shape[0] * shape[1]
    have = scratch.get(name)
    if have is None or have.numel() < count:
        have = scratch[name] = pages.tensor(count, dtype, device=device)
    return have[:count].view(shape)


@dataclass
class Screen:
    """A coarse pass's answer for a block of queries: ``scores`` (len(q), N), from which :func:`within` takes each
    query's threshold. A row's score less ``2 q_rest[i] t_rest[row]`` (nothing when None) is at most its float32
    similarity to query i up to ``slack[i] / 2``; so the k-th best such lower bound among any k rows, less
    ``slack``, is at most any true neighbour's score, and that is query i's threshold."""

    scores: torch.Tensor
    slack: torch.Tensor | float
    q_rest: torch.Tensor | None = None
    t_rest: torch.Tensor | None = None

    def threshold(self, values: torch.Tensor, rows: torch.Tensor, *, k: int) -> torch.Tensor:
        """Each query's threshold from the scores ``values`` (float32) of its train ``rows`` (len(q), >= k)."""
        lower = values if self.q_rest is None else values - 2 * self.q_rest[:, None] * self.t_rest[rows]
        return lower.topk(k, dim=1).values[:, -1] - self.slack


def within(
    screen: Screen, *, k: int, exclude: torch.Tensor | None, limit: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every (query, train row) pair whose coarse score is at least the query's threshold, as ``(qi, ti)`` grouped
    by query: every true k nearest row is among them. Query i's row ``exclude[i]`` is set to -inf first
    (leave-one-out). None when there are more than ``limit`` a query on average (the exact search is cheaper)."""
    scores = screen.scores
    n_q, n = scores.shape
    if exclude is not None:
        scores[torch.arange(n_q, device=scores.device), exclude] = -math.inf
    best = group_max(scores, GROUP)
    seed = best.topk(min(best.shape[1], max(SEED_GROUPS, k + 1)), dim=1).indices  # its best groups: their rows
    rows, one = group_members(seed, n, GROUP)
    rows, one = rows.flatten(1), one.flatten(1)
    low = screen.threshold(scores.gather(1, rows).float().masked_fill_(~one, -math.inf), rows, k=k)
    qi, group = torch.nonzero(best.float() >= low[:, None], as_tuple=True)  # row-major: grouped by query
    if len(qi) > limit * n_q:  # each such group holds at least one row within the threshold
        return None
    rows, one = group_members(group, n, GROUP)
    keep = one & (scores[qi[:, None], rows].float() >= low[qi, None])
    if int(keep.sum()) > limit * n_q:
        return None
    return qi[:, None].expand_as(rows)[keep], rows[keep]


# Groups smaller than this are strided (columns g, g + G, g + 2G, ...), larger ones runs of consecutive columns:
# whichever's maxima vectorise better (1,024 x 100,000 on one core: groups of 16 strided 50 ms, consecutive 188 ms;
# of 32, 72 against 41 ms).
STRIDED_BELOW = 32


def group_max(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each row's largest score in each group of ``group`` columns among the first ``group`` * G (G = columns //
    ``group``; see STRIDED_BELOW for which columns), then each column after those as a group of its own: (rows,
    G + those). One vectorised pass (k-NN's screening, the audit's top-k)."""
    whole = scores.shape[1] // group * group
    head = scores[:, :whole]
    if group < STRIDED_BELOW:
        best = head.unflatten(1, (group, whole // group)).amax(1)
    else:
        best = head.unflatten(1, (whole // group, group)).amax(2)
    return torch.cat([best, scores[:, whole:]], 1) if whole < scores.shape[1] else best


def group_members(groups: torch.Tensor, n: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns (of ``n``) of each group in ``groups`` (shape S, numbered as :func:`group_max` numbers them):
    (S + (``group``,)) columns, and which of them are the group's (a group after ``group`` * G has one, repeated)."""
    size = n // group
    step = torch.arange(group, device=groups.device)
    g = groups[..., None]
    tail = g >= size
    columns = g + step * size if group < STRIDED_BELOW else g * group + step
    return torch.where(tail, g + (group - 1) * size, columns), ~tail | (step == 0)


# On a CPU without fast bfloat16 (AVX2 only: a bfloat16 matmul ran at 20 GFLOP/s there, float32 at 150), the coarse
# pass is a float32 one on fewer dimensions (:class:`Projected`): on the eigenvectors holding this share of train's
# energy, between a fifth and half of the dimensions. The time of a block of queries (the matmul, the screening and
# the rescoring) is flat near its least where 40-70 rows a query are left to rescore; measured on one core on real
# features (1,118 queries, k = 10; the matmul's width with the column of norms): MobileNetV2 60,000 x 1,280 at 224,
# 256, 288 and 320 wide, 98, 62, 43 and 32 rows a query, 582, 562, 602 and 617 ms (the fastest of 6); random-init
# ResNet18 50,000 x 512 at 96, 128, 160 and 192, 166, 67, 37 and 25 rows, 360, 301, 299 and 326 ms; MobileNetV2
# reduced to 512 by PCA at 192, 224, 256 and 288, 120, 71, 45 and 31 rows, 437, 457, 442 and 479 ms. Below these
# sizes the exact pass is cheap.
PROJECT_ENERGY = 0.99
PROJECT_MIN_DIM, PROJECT_MIN_ROWS = 64, 4096
PROJECT_FLOOR = 0.2  # of the dimensions, at least (MobileNetV2's 99% of the energy is in 255 of 1,280)
PROJECT_SAMPLE = 8192  # train rows the second moment is estimated on: the basis needs no precision, only the bound
PROJECT_BLOCK = 2048  # train rows projected at a time, in float64 (60,000 x 1,280 -> 320: 0.98 s; in 16,384s: 1.9 s)


@dataclass
class Projected:
    """Train for the coarse pass on a CPU without fast bfloat16. Each unit row is ``t = V b + r`` with ``V`` (D, d)
    train's top d eigenvectors made orthonormal in float64 (their second moment's, on a sample of rows), ``b = V^T
    t`` and ``r`` orthogonal to ``V``; so ``q.t = a.b + r_q.r_t`` and, by Cauchy-Schwarz, ``|q.t - a.b| <= |r_q|
    |r_t|``. One float32 matmul of d + 1 columns (d / D of the exact pass's work) gives every pair's upper bound
    ``a.b + |r_q| |r_t|``, the norms being the last column of both sides; the lower one is that less ``2 |r_q|
    |r_t|``. The projections and ``|r|^2 = |t|^2 - |b|^2`` are computed in float64 and the norms rounded up, so the
    only slack left is float32's rounding (``margin``, doubled). Exact however the features look: where the bound is
    loose (features whose energy is spread over every dimension), too many rows are within it and :class:`Search`
    takes the exact pass."""

    basis: torch.Tensor  # (D, d) float64
    rows: torch.Tensor  # (N, d + 1) float32: [b, |r_t| rounded up]
    margin: float
    scratch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def rest(self) -> torch.Tensor:
        """(N,) each train row's |r_t|, rounded up."""
        return self.rows[:, -1]

    @classmethod
    def of(cls, train: torch.Tensor) -> Projected | None:
        """None where the exact pass is as cheap (small train or few dimensions) or runs on a GPU."""
        n, dim = train.shape
        if train.device.type != "cpu" or dim < PROJECT_MIN_DIM or n < PROJECT_MIN_ROWS:
            return None
        sample = train[:: max(1, n // PROJECT_SAMPLE)]
        values, vectors = torch.linalg.eigh(sample.T @ sample)  # ascending; float32: 0.3 s less than float64 at 1,280
        values = values.double().flip(0).clamp_min(0)
        share = values.cumsum(0) / values.sum().clamp_min(1e-300)
        width = min(max(int((share < PROJECT_ENERGY).sum()) + 2, int(dim * PROJECT_FLOOR)), dim // 2)
        width = min(-(-width // 32) * 32, dim // 2)  # a multiple of 32: the matmul ran 15% faster at 320 than at 321
        basis = torch.linalg.qr(vectors.flip(1)[:, : width - 1].double()).Q  # orthonormal to float64's precision
        rows = pages.tensor((n, width), torch.float32)

        def project(part: slice) -> None:  # rows of train, a block at a time, through one float64 buffer
            buffer = torch.empty(min(PROJECT_BLOCK, part.stop - part.start), dim, dtype=torch.float64)
            for start in range(part.start, part.stop, PROJECT_BLOCK):
                block = slice(start, min(start + PROJECT_BLOCK, part.stop))
                rows[block, :-1], rows[block, -1] = _project(train[block], basis, buffer=buffer)

        in_pieces(project, n, big=True)  # one slice of rows per core: the same result to the bit
        return cls(basis, rows, 2 * (dim + 2 * width + 16) * 2.0**-24)

    def screen(self, q: torch.Tensor) -> Screen:
        """The upper bounds (len(q), N): a row's upper bound less ``2 |r_q| |r_t|`` is a lower bound on its float32
        similarity, both up to the margins."""
        a = torch.empty(len(q), self.rows.shape[1])
        a[:, :-1], a[:, -1] = _project(q, self.basis)
        upper = _kept(self.scratch, "upper", (len(q), len(self.rows)), torch.float32, q.device)
        # Slices of the output's rows, one per core in Python threads (fitting.in_pieces): OpenMP threads cannot run
        # in a forked compare worker (pipeline.workers); the same result to the bit.
        in_pieces(lambda part: torch.mm(a[part], self.rows.T, out=upper[part]), len(q), big=True)
        return Screen(upper, 2 * self.margin, a[:, -1], self.rest)


def _project(
    x: torch.Tensor, basis: torch.Tensor, *, buffer: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x V, |x - V V^T x|)`` of float32 rows, computed in float64 (in ``buffer``, of at least len(x) rows, when
    given: a new float64 block per step faulted its pages in anew); float32 out, the norm rounded up."""
    x64 = x.to(torch.float64, copy=True) if buffer is None else buffer[: len(x)].copy_(x)  # squared in place below
    b = x64 @ basis
    r = (x64.mul_(x64).sum(1) - (b * b).sum(1)).clamp_min(0).sqrt()
    r32 = r.float()
    r32 = torch.where(r32.double() < r, torch.nextafter(r32, torch.tensor(math.inf)), r32)
    return b.float(), r32


class Search:
    """The k nearest train rows of blocks of queries: the coarse pass while it pays, the exact float32 search
    from the first block where it would not (the rest of the blocks are of the same features). ``fell_back``
    says why, once it has."""

    def __init__(self, train: torch.Tensor, *, coarse: Coarse | Projected | None):
        self.train, self.coarse, self.fell_back = train, coarse, ""

    def nearest(self, q: torch.Tensor, *, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        found = None
        if self.coarse is not None:
            found = nearest(q, self.train, k=k, exclude=exclude, coarse=self.coarse)
            if found is None:
                kind = "bfloat16" if isinstance(self.coarse, Coarse) else "projected"
                self.coarse = None
                self.fell_back = (f"over {len(self.train) / RESCORE_COST:.0f} rows a query within the {kind} pass's "
                                  "bound of its k-th")  # fmt: skip
        return found if found is not None else exact_topk(q, self.train, k=k, exclude=exclude)


def nearest(
    q: torch.Tensor,
    train: torch.Tensor,
    *,
    k: int,
    exclude: torch.Tensor | None = None,
    coarse: Coarse | Projected | None = None,
    limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k`` largest float32 similarities ``q @ train.T`` of each query (rows of norm <= 1) and their train
    rows, skipping row ``exclude[i]`` for query i. With ``coarse`` (:class:`Coarse` or :class:`Projected` of
    ``train``) the same neighbours for a fraction of the work: the coarse pass scores every row and sets each
    query's threshold (:func:`within`: every true k nearest row scores at least that, and there are ~20-60 such
    rows of 50,000), and only those rows are rescored in float32. None when that would rescore more than ``limit``
    rows per query on average (default ``len(train) / RESCORE_COST``): the exact search is cheaper."""
    if coarse is None or k >= len(train) - (exclude is not None):
        return exact_topk(q, train, k=k, exclude=exclude)
    limit = len(train) / RESCORE_COST if limit is None else limit
    found = within(coarse.screen(q), k=k, exclude=exclude, limit=limit)
    return None if found is None else _rescore(q, train, *found, k=k)


def _rescore(
    q: torch.Tensor, train: torch.Tensor, qi: torch.Tensor, ti: torch.Tensor, *, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 similarity of each (query qi, train row ti) candidate, and each query's k best of them."""
    exact = torch.empty(len(ti), device=q.device)

    def score(part: slice) -> None:  # the candidates of ``part``, RESCORE_ROWS at a time, in two kept buffers
        size = (min(RESCORE_ROWS, part.stop - part.start), train.shape[1])
        rows_buf, queries_buf = torch.empty(size, device=q.device), torch.empty(size, device=q.device)
        for s in range(part.start, part.stop, RESCORE_ROWS):
            at = slice(s, min(s + RESCORE_ROWS, part.stop))
            rows = torch.index_select(train, 0, ti[at], out=rows_buf[: at.stop - at.start])
            queries = torch.index_select(q, 0, qi[at], out=queries_buf[: at.stop - at.start])
            torch.sum(rows.mul_(queries), 1, out=exact[at])

    with fitting_threads(q.device):  # small ops: two OpenMP threads on a shared CPU made this loop 10-40x slower
        # slices of the candidates, one per core free (Python threads, see in_pieces): the same sums to the bit
        in_pieces(score, len(ti), big=q.device.type == "cpu" and len(ti) >= 2 * RESCORE_ROWS)
        counts = torch.bincount(qi, minlength=len(q))
        pos = torch.arange(len(qi), device=q.device) - (counts.cumsum(0) - counts)[qi]  # place within its query
        width = max(k, int(counts.max()) if len(qi) else 0)  # a query with no candidate: -inf (see nearest)
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
