"""Duplicates and leaks: pairs of images that are the same picture, within a split and across train and val.

Evidence, strongest first:

- ``exact``: the same content digest (extraction records a sha256 of each image's bytes, or of an array's pixels);
- the same perceptual hash of the pixels, up to :data:`PHASH_BITS` differing bits (files written with one), for
  two images that are also among each other's nearest neighbours by their features;
- identical features (cosine >= :data:`SAME_FEATURES`);
- the features: each image's nearest neighbour, when the two are *mutual* nearest neighbours (in the same scope:
  own split, or the other split) and their evidence reaches the threshold. The evidence is the score
  ``sim + min(margin_a, margin_b)``; on request (``--near-rule ranks``, files with perceptual hashes) a rank
  statistic (:func:`rank_evidence`): Fisher's combination ``-sum(log p)`` of the pair's rank percentiles among all
  mutual pairs by similarity, by the smaller of the two images' margins over their second neighbour and by the
  hashes' distance. Ranks always put some pairs in the tail, copies or not: on the clean demo digits they flagged
  15 pairs of distinct images where the score flagged 1, so they are not the default.

A similarity alone is not enough: on small upscaled images a shifted, re-encoded copy can be less similar to its
source than ordinary images are to their nearest neighbour, yet it stays its source's nearest, by a margin. The
default threshold comes from the file itself: the median of the evidence of mutual nearest pairs plus
:data:`RANK_Z` (ranks) or :data:`THRESHOLD_Z` (score) robust standard deviations (1.4826 x MAD), so the copies in a
file do not move it much. A hash alone never flags a pair: the rank rule also asks the features' own ranks
(similarity and margin) to be above their median.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.audit.neighbours import Neighbours

log = logging.getLogger(__name__)

SAME_FEATURES = 0.9995
PHASH_BITS = 4  # of 64: a one-pixel shift and a JPEG re-encoding move a 64-bit DCT hash by a few bits
THRESHOLD_Z = 2.5  # measured on planted copies in the digits: see docs/audit.md
# The rank rule's z: on the digits planted with seed 1 (pipeline.audit.plant) the pair of largest z that was no
# planted copy had 3.24; chosen there, reported on seed 0's plant (docs/audit.md).
RANK_Z = 3.25


@dataclass
class Rows:
    """Every row of the file, train then val: ``ids``, ``split`` names, and the optional per-row columns."""

    ids: np.ndarray
    split: np.ndarray
    digests: np.ndarray | None = None  # sha256 hex per row, "" when unknown
    phash: np.ndarray | None = None  # uint64 per row


@dataclass
class Evidence:
    """Each row's nearest neighbour in one scope (``same`` split, or the ``other`` split): its row (-1 if none
    among the candidates), similarity, the second neighbour's similarity, and whether the two are mutual."""

    nearest: np.ndarray
    sim: np.ndarray
    second: np.ndarray
    mutual: np.ndarray

    @property
    def score(self) -> np.ndarray:
        """Each row's evidence with its nearest neighbour: the similarity plus the smaller of the two rows' margins
        over their second neighbours (a copy and its source are each other's clear nearest; two similar images in
        a dense class are not). Meaningful for mutual pairs, where the nearest's nearest is the row itself."""
        margin = self.sim - self.second
        other = margin[np.maximum(self.nearest, 0)]
        return self.sim + np.minimum(margin, other)


def evidence(nb: Neighbours, split: np.ndarray, *, same: bool) -> Evidence:
    """Each row's nearest and second-nearest neighbour among the rows of its own split (``same``) or of the others."""
    n, k = nb.index.shape
    ok = (split[nb.index] == split[:, None]) == same
    ok &= nb.sim > -1.5  # candidate slots never filled (tiny files)
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rank = np.cumsum(ok, 1)
    second_pos = np.where((rank >= 2).any(1), (rank >= 2).argmax(1), -1)
    rows = np.arange(n)
    nearest = np.where(first >= 0, nb.index[rows, np.maximum(first, 0)], -1)
    sim = np.where(first >= 0, nb.sim[rows, np.maximum(first, 0)], -1.0)
    # Without a second candidate in scope the k-th similarity bounds it from above: the margin is not overstated.
    second = np.where(second_pos >= 0, nb.sim[rows, np.maximum(second_pos, 0)], nb.sim[:, -1])
    back = np.where(nearest >= 0, nearest, 0)
    mutual = np.zeros(n, bool)
    has = nearest >= 0
    mutual[has] = nb_back(nb, split, back[has], same=same) == rows[has]
    return Evidence(nearest=nearest, sim=sim.astype(np.float32), second=second.astype(np.float32), mutual=mutual)


def nb_back(nb: Neighbours, split: np.ndarray, rows: np.ndarray, *, same: bool) -> np.ndarray:
    """The nearest in-scope neighbour of each of ``rows`` (-1 if none)."""
    ok = (split[nb.index[rows]] == split[rows][:, None]) == same
    first = ok.argmax(1)
    return np.where(ok.any(1), nb.index[rows, first], -1)


def robust_threshold(scores: np.ndarray, *, z: float) -> tuple[float, dict[str, float]]:
    """Median + ``z`` robust deviations (1.4826 x MAD) of ``scores``, with the distribution's summary."""
    if len(scores) == 0:
        return float(SAME_FEATURES), {"pairs": 0}
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * 1.4826
    stats = {"pairs": len(scores), "median": med, "robust_sd": mad, "p90": float(np.percentile(scores, 90)),
             "p99": float(np.percentile(scores, 99))}  # fmt: skip
    return med + z * mad, stats


def default_threshold(*scopes: Evidence) -> tuple[float, dict[str, float]]:
    """Median + THRESHOLD_Z robust deviations of the evidence score of mutual nearest pairs (all scopes)."""
    return robust_threshold(np.concatenate([e.score[e.mutual & (e.nearest >= 0)] for e in scopes]), z=THRESHOLD_Z)


def mutual_pairs(*scopes: Evidence) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every mutual nearest pair once, over the scopes: ``(a, b, similarity, the smaller of the two margins)``."""
    parts = []
    for e in scopes:
        margin = e.sim - e.second
        i = np.flatnonzero(e.mutual & (e.nearest >= 0))
        i = i[i < e.nearest[i]]
        j = e.nearest[i]
        parts.append((i, j, e.sim[i], np.minimum(margin[i], margin[j])))
    return tuple(np.concatenate(col) for col in zip(*parts))  # type: ignore[return-value]


def _rank_percentile(v: np.ndarray, *, larger: bool) -> np.ndarray:
    """Each value's share of the values at least as strong (larger, or smaller when ``larger`` is False): in (0, 1]."""
    key = -v if larger else v
    return np.searchsorted(np.sort(key), key, side="right") / len(v)


def rank_evidence(
    sim: np.ndarray, margin: np.ndarray, distance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fisher's combination of rank percentiles among the pairs, ``-sum(log p)`` (larger: stronger), with no weight
    to tune: ``(with the hashes' distance, the features' alone)``. The ranks put the similarity, the margin and
    the hashes' bits on one scale; on the planted digits it found more shifted copies than the evidence score at
    every count of false flags from 0 to 10, on two plants (docs/audit.md)."""
    features = -np.log(_rank_percentile(sim, larger=True)) - np.log(_rank_percentile(margin, larger=True))
    if distance is None:
        return features, features
    return features - np.log(_rank_percentile(distance.astype(np.float64), larger=False)), features


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of two uint64 arrays."""
    x = np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)


def exact_pairs(rows: Rows) -> list[tuple[int, int]]:
    """Pairs of rows with the same content digest (each group linked to its first row)."""
    if rows.digests is None:
        return []
    first: dict[str, int] = {}
    out = []
    for i, d in enumerate(rows.digests):
        if not d:
            continue
        if d in first:
            out.append((first[d], i))
        else:
            first[d] = i
    return out


def phash_pairs(rows: Rows, *, bits: int = PHASH_BITS) -> list[tuple[int, int]]:
    """Pairs of rows whose perceptual hashes differ in at most ``bits`` bits. Candidates come from exact buckets on
    ``bits + 1`` slices of the 64 bits (pigeonhole: two hashes within ``bits`` bits agree on at least one slice),
    then checked on all 64 bits: no all-pairs comparison."""
    if rows.phash is None:
        return []
    h = rows.phash.astype(np.uint64)
    width = -(-64 // (bits + 1))
    found: set[tuple[int, int]] = set()
    for lo in range(0, 64, width):
        key = (h >> np.uint64(lo)) & np.uint64((1 << min(width, 64 - lo)) - 1)
        order = np.argsort(key, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
            if len(group) < 2 or len(group) > 2048:  # a blank image's slice: too common to mean anything
                continue
            a, b = np.triu_indices(len(group), 1)
            close = hamming(h[group[a]], h[group[b]]) <= bits
            i, j = group[a][close], group[b][close]
            found.update(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist()))
    return sorted(found)


def find_pairs(
    nb: Neighbours, rows: Rows, *, unit: np.ndarray, threshold: float | None = None, rule: str = "score"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``(leaks, duplicates, info)``: pairs across train and val, and pairs within a split, strongest first.
    ``unit``: the L2-normalised features (the similarity of pairs found by digest or hash alone). ``rule``: "score"
    (the evidence score) or "ranks" (the rank statistic; the evidence score where the file has no hashes)."""
    same, other = evidence(nb, rows.split, same=True), evidence(nb, rows.split, same=False)
    pairs: dict[tuple[int, int], dict[str, Any]] = {}

    def add(i: int, j: int, how: str, sim: float | None = None) -> None:
        a, b = min(i, j), max(i, j)
        p = pairs.setdefault((a, b), {"rows": (a, b), "evidence": [], "sim": sim})
        if how not in p["evidence"]:
            p["evidence"].append(how)

    for e in (same, other):
        for i in np.flatnonzero((e.nearest >= 0) & (e.sim >= SAME_FEATURES)):
            add(int(i), int(e.nearest[i]), "features")
    rule = "ranks" if rule == "ranks" and rows.phash is not None else "score"
    if rule == "ranks":
        a, b, sim, margin = mutual_pairs(same, other)
        ranks, features = rank_evidence(sim, margin, hamming(rows.phash[a], rows.phash[b]))
        chosen, stats = robust_threshold(ranks, z=RANK_Z)
        used = chosen if threshold is None else threshold
        # The features' own evidence above their median: the hash sharpens it, never stands in for it.
        flagged = (ranks >= used) & (features >= np.median(features)) if len(a) else np.zeros(0, bool)
        for i, j in zip(a[flagged], b[flagged]):
            add(int(i), int(j), "features")
    else:
        chosen, stats = default_threshold(same, other)
        used = chosen if threshold is None else threshold
        for e in (same, other):
            for i in np.flatnonzero((e.nearest >= 0) & e.mutual & (e.score >= used)):
                add(int(i), int(e.nearest[i]), "features")
    for i, j in exact_pairs(rows):
        add(i, j, "digest")
    for i, j in phash_pairs(rows):
        # Evidence on a pair the features or digests flag, not a flag of its own: on the planted 8 px digits a hash
        # within 4 bits among the k nearest flagged 44 pairs of distinct images (mutual nearest only: 13) for 9 of
        # 20 shifted copies; tiny images' hashes are weak (docs/audit.md, "Not yet").
        if (min(i, j), max(i, j)) in pairs:
            add(i, j, "phash")
    leaks, dups = [], []
    for (a, b), p in pairs.items():
        rec = pair_record(rows, a, b, sim=float(unit[a] @ unit[b]), evidence=p["evidence"])
        (dups if rows.split[a] == rows.split[b] else leaks).append(rec)
    key = lambda r: (not r["exact"], -r["similarity"])  # noqa: E731
    info = {"rule": rule, "threshold": used, "threshold_chosen": chosen, "threshold_given": threshold is not None,
            "scores": stats, "digests": rows.digests is not None, "phash": rows.phash is not None}  # fmt: skip
    return sorted(leaks, key=key), sorted(dups, key=key), info


def pair_record(rows: Rows, a: int, b: int, *, sim: float, evidence: list[str]) -> dict[str, Any]:
    """One pair as audit.json lists it; a val image first in a leak (``id``/``split`` then ``other_*``)."""
    if rows.split[a] != "val" and rows.split[b] == "val":
        a, b = b, a
    exact = bool(rows.digests is not None and rows.digests[a] and rows.digests[a] == rows.digests[b])
    return {"id": str(rows.ids[a]), "split": str(rows.split[a]), "other_id": str(rows.ids[b]),
            "other_split": str(rows.split[b]), "similarity": round(sim, 4), "exact": exact,
            "evidence": evidence, "rows": [int(a), int(b)]}  # fmt: skip
