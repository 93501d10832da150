"""``--exclude``: images left out of a run, read from an audit's ``audit.json`` or a plain list of ids. One parser
for both stages: ``extract`` leaves them out before any image is read (recorded in the fingerprint), ``train-head`` and
``compare`` drop their rows when the features are read (recorded in the head's settings). See docs/audit.md.

From ``audit.json`` the default selection is what a user cleaning the data expects to go: the val image of every
leak (its train twin stays: the val score then counts only new images), the second image of every duplicate pair
within a split (the first stays, as ``drop_duplicates`` keeps the first), and every listed label issue.
``audit.json:leaks,duplicates`` picks kinds (``leaks``, ``duplicates``, ``label_issues``, ``outliers``).

A plain text file holds one id per line (``#`` comments and blank lines ignored); ``val:ID`` or ``train:ID`` names
one split's image (torchvision ids are indices, the same in both splits), a bare id that split's image in each
split that has it. An id in no split is an error (one line naming the first few): a list for other data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.options import option

KINDS = ("leaks", "duplicates", "label_issues", "outliers")
DEFAULT_KINDS = ("leaks", "duplicates", "label_issues")
SPLITS = ("train", "val")
ANY = "*"  # the split of a bare id from a plain list


def exclude_option() -> Any:
    """The ``--exclude`` field of ``ExtractConfig`` and of ``HeadConfig``: one help, one type."""
    return option(
        None,
        "Leave these images out: an audit.json (the val image of each leak, the second of each duplicate pair and "
        "every label issue; pick with audit.json:leaks,duplicates,label_issues,outliers) or a text file of ids, one "
        "per line (val:ID for one split).",
    )


@dataclass(frozen=True)
class Exclusion:
    """The images ``--exclude`` names: (split, id) pairs (split ``*``: every split), and how many of each kind."""

    source: str  # the option as given
    pairs: frozenset[tuple[str, str]]
    kinds: tuple[tuple[str, int], ...]  # (kind, images) in the order said, e.g. (("leaks", 20), ("label issues", 3))

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def digest(self) -> str:
        """sha256 of the sorted ``split<TAB>id`` lines: equal sets of images, equal digests, wherever the file is."""
        text = "\n".join(f"{s}\t{i}" for s, i in sorted(self.pairs))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def record(self) -> dict[str, Any]:
        """What a run records about it (the fingerprint's identity, a head's settings): count and digest, not the
        file's name, so a copied or moved list is the same exclusion."""
        return {"count": len(self), "sha256": self.digest}

    def line(self) -> str:
        """``excluding 23 images (20 leaks, 3 label issues) from audit.json``."""
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.kinds)
        return f"excluding {len(self)} images ({kinds}) from {self.source}"

    def keep(self, split: str, ids: Sequence[str]) -> np.ndarray:
        """A boolean mask of the rows of ``split`` (by their ids) that stay."""
        out = {i for s, i in self.pairs if s in (split, ANY)}
        return np.fromiter((str(i) not in out for i in ids), dtype=bool, count=len(ids))

    def check_known(self, ids: dict[str, Sequence[str]]) -> None:
        """Refuse, in one line naming the first few, ids that no split of the data holds."""
        held = {s: set(map(str, v)) for s, v in ids.items()}
        unknown = sorted(
            f"{s}:{i}" if s != ANY else i
            for s, i in self.pairs
            if not (any(i in h for h in held.values()) if s == ANY else i in held.get(s, ()))
        )
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise PipelineError(
                f"--exclude {self.source}: {len(unknown)} of its {len(self)} images are not in this data ({shown}); "
                "was it made for other images?"
            )


def read_exclusion(spec: str) -> Exclusion:
    """Parse ``--exclude``: ``PATH`` or ``PATH:KIND,KIND`` (an audit.json), or a text file of ids."""
    path, kinds = Path(spec), None
    if not path.is_file() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        path, kinds = Path(head), [k.strip() for k in tail.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise PipelineError(f"--exclude {spec}: unknown kind {(bad or [''])[0]!r}; choose from {', '.join(KINDS)}")
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise PipelineError(f"--exclude {spec}: cannot read {path}: {e.strerror or e}") from None
    if text.lstrip().startswith("{"):
        return _from_audit(spec, text, kinds=tuple(kinds or DEFAULT_KINDS))
    if kinds:
        raise PipelineError(f"--exclude {spec}: kinds are for an audit.json; {path} is a list of ids")
    return _from_list(spec, text)


def _from_audit(spec: str, text: str, *, kinds: tuple[str, ...]) -> Exclusion:
    try:
        report = json.loads(text)
        chosen: dict[str, set[tuple[str, str]]] = {}
        for kind in kinds:
            # leaks list the val image first (id), duplicates the earlier row first: the other one goes
            side = "other_" if kind == "duplicates" else ""
            chosen[kind] = {(str(r[f"{side}split"]), str(r[f"{side}id"])) for r in report[kind]}
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(
            f"--exclude {spec}: not an audit.json that `audit` wrote ({type(e).__name__}: {e})"
        ) from None
    pairs: set[tuple[str, str]] = set()
    counts = []
    for kind in kinds:  # an image in two kinds is counted once, in the first
        new = chosen[kind] - pairs
        pairs |= new
        counts.append((kind, len(new)))
    return Exclusion(spec, frozenset(pairs), tuple(counts))


def _from_list(spec: str, text: str) -> Exclusion:
    pairs = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        split, sep, rest = line.partition(":")
        pairs.add((split, rest) if sep and split in SPLITS else (ANY, line))
    return Exclusion(spec, frozenset(pairs), (("listed", len(pairs)),))


def drop_excluded(fs: Any, exclusion: Exclusion) -> Any:
    """A :class:`~pipeline.store.FeatureSet` without the rows ``exclusion`` names (every per-row column narrowed);
    ids no split holds are refused in one line. Stage two's one use of it: ``runs.read_run_features``."""
    from dataclasses import fields, replace

    if fs.meta.activations:
        raise PipelineError(
            f"--exclude is not yet supported on a file with --cache-at activations ({fs.path}): extract it with "
            "--exclude instead"
        )
    exclusion.check_known({name: split.ids for name, split in fs.splits.items()})
    splits = {}
    for name, split in fs.splits.items():
        keep = exclusion.keep(name, split.ids)
        rows = {f.name: getattr(split, f.name) for f in fields(split)}
        splits[name] = replace(split, **{k: v[keep] for k, v in rows.items() if v is not None and len(v) == len(keep)})
    return replace(fs, splits=splits)
