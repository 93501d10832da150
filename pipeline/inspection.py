"""What a feature file holds, for ``pipeline inspect``: counts per split and class, and how the features were made;
and (``inspect --nodes BACKBONE``) the nodes of a backbone that ``extract --layers`` and ``--cache-at`` accept.

Reads the file only through :func:`pipeline.store.read_meta` and :func:`pipeline.store.read_features`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store import FeatureMeta, WeightsIdentity, read_features, read_meta


def _skipped(meta: FeatureMeta) -> dict[str, list[str]] | None:
    """Unreadable images per split; None when the metadata does not say."""
    recorded = meta.extra.get("skipped")
    if isinstance(recorded, dict):
        return {str(k): list(v) for k, v in recorded.items()}
    config = meta.config or {}
    if isinstance(config, dict) and config.get("skip_bad") is False:
        return {}  # without --skip-bad, extract stops at the first unreadable image: none were skipped
    return None


def _weights_source(meta: FeatureMeta) -> str | None:
    """The --weights path a file's features came from (the fingerprint holds only its sha256)."""
    config = meta.config or {}
    try:
        is_file = WeightsIdentity.parse(str(meta.weights or "")).kind == "file"
    except PipelineError:
        return None
    return config.get("weights") if is_file and isinstance(config, dict) else None


def summarize(path: Path) -> dict[str, Any]:
    """A JSON-ready summary of one feature file (a ``.tmp`` of an unfinished extraction too, without counts)."""
    path = Path(path)
    meta = read_meta(path)
    complete = bool(meta.complete)
    summary: dict[str, Any] = {
        "path": str(path),
        "bytes": path.stat().st_size,
        "complete": complete,
        "dataset": meta.dataset,
        "dataset_identity": meta.dataset_identity,
        "backbone": meta.backbone,
        "weights": meta.weights,
        "weights_source": _weights_source(meta),
        "feature_dim": meta.feature_dim,
        "dtype": (meta.config or {}).get("dtype"),
        "preprocessing": meta.preprocessing,
        "precision": meta.precision,
        "device": meta.device,
        "fingerprint": meta.fingerprint,
        "created": meta.created,
        "extract_seconds": meta.extract_seconds,
        "skipped": _skipped(meta),
        "targets": meta.targets,  # regression targets (extract --targets): names, source, sha256
        "versions": meta.versions,
        "layers": meta.layers,
        "activations": meta.activations,
        "classes": None,
        "counts": None,
    }
    if complete:
        fs = read_features(path)
        summary["classes"] = list(fs.classes)
        summary["dtype"] = str(fs.train.features.dtype)
        summary["counts"] = {
            name: dict(zip(fs.classes, _per_class(split, len(fs.classes)))) for name, split in fs.splits.items()
        }
    return summary


def _per_class(split: Any, n: int) -> list[int]:
    """Images per class; with several labels per image, images per label (a row counts once for each label)."""
    if split.multi_hot is not None:
        return split.multi_hot.sum(0, dtype=np.int64).tolist()
    return np.bincount(split.labels, minlength=n).tolist()


def _preprocessing_line(pre: Any) -> str:
    if not isinstance(pre, dict) or not pre:
        return "not recorded"
    parts = [f"resize {pre.get('resize_size')}", f"crop {pre.get('crop_size')}", str(pre.get("interpolation"))]
    if pre.get("mean") is not None:
        parts.append(f"mean {tuple(round(m, 3) for m in pre['mean'])}")
    if pre.get("std") is not None:
        parts.append(f"std {tuple(round(s, 3) for s in pre['std'])}")
    return ", ".join(parts)


def _skipped_line(skipped: dict[str, list[str]] | None) -> str:
    if skipped is None:
        return "not recorded in the file's metadata (extracted with --skip-bad)"
    total = sum(len(v) for v in skipped.values())
    if not total:
        return "none"
    shown = ", ".join(f"{split} {len(ids)} ({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})"
                      for split, ids in skipped.items() if ids)  # fmt: skip
    return f"{total}: {shown}"


def _targets_line(t: dict[str, Any]) -> str:
    return f"{', '.join(t.get('names', []))} (from {t.get('source')}, sha256 {str(t.get('sha256'))[:8]})"


def _counts_table(classes: list[str], counts: dict[str, dict[str, int]]) -> str:
    splits = list(counts)
    width = max([len("class"), len("total"), *(len(c) for c in classes)])
    cols = [max(len(s), 6) for s in splits]
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>{w}}" for s, w in zip(splits, cols))]
    for c in classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{counts[s][c]:>{w}}" for s, w in zip(splits, cols)))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{sum(counts[s].values()):>{w}}" for s, w in zip(splits, cols)))
    return "\n".join(lines)


def _dataset_where(ident: dict[str, Any]) -> list[str]:
    """Where the images came from: the folder, the labels table(s) read, the shards, and how the split was made."""
    parts = [str(ident["root"])] if ident.get("root") else []
    tables = ident.get("tables")
    if isinstance(tables, dict) and tables:
        parts.append("table " + " ".join(str(t) for t in tables))
    shards = ident.get("shards")
    if isinstance(shards, list) and shards:
        parts.append(f"{len(shards)} shard{'s' if len(shards) > 1 else ''} from {shards[0]}")
    if ident.get("split"):
        parts.append(str(ident["split"]))
    return parts


def format_summary(s: dict[str, Any]) -> str:
    """The summary as the text ``pipeline inspect`` prints."""
    size = s["bytes"] / 2**20
    state = "complete" if s["complete"] else "INCOMPLETE: extraction did not finish; rerun extract to resume"
    ident = s["dataset_identity"] if isinstance(s["dataset_identity"], dict) else {}
    where = ", ".join(_dataset_where(ident))
    versions = s["versions"] if isinstance(s["versions"], dict) else {}
    seconds = f"; extraction {s['extract_seconds']:.1f} s" if s["extract_seconds"] is not None else ""
    rows = [
        ("dataset", f"{s['dataset']}" + (f" ({where})" if where else "")),
        ("backbone", f"{s['backbone']}, {s['feature_dim']}-d features" + (f", {s['dtype']}" if s["dtype"] else "")),
        ("weights", f"{s['weights']}" + (f" (from {s['weights_source']})" if s["weights_source"] else "")),
        ("preprocessing", _preprocessing_line(s["preprocessing"])),
        ("precision", f"{s['precision']}" + (f" on {s['device']}" if s["device"] else "")),
        ("fingerprint", s["fingerprint"]),
        ("created", f"{s['created']}{seconds}"),
        ("skipped", _skipped_line(s["skipped"])),
        *_outputs_rows(s),
        *([("targets", _targets_line(s["targets"]))] if s.get("targets") else []),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"),
    ]
    lines = [f"{s['path']} ({size:.1f} MiB, {state})", ""]
    lines += [f"{k:<14} {v}" for k, v in rows]
    if s["counts"]:
        lines += ["", _counts_table(s["classes"], s["counts"])]
    return "\n".join(lines)


def _outputs_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """--layers and --cache-at, when the file was made with them."""
    rows = []
    if s.get("layers"):
        rows.append(("layers", ", ".join(f"{layer['name']} ({layer['dim']})" for layer in s["layers"])))
    if s.get("activations"):
        a = s["activations"]
        rows.append(("activations", f"{a['node']}: {' x '.join(map(str, a['shape']))} per image, {a['dtype']}"))
    return rows


def list_nodes(backbone: str, *, image_size: int | None = None) -> dict[str, Any]:
    """The nodes of ``backbone`` that ``--layers`` / ``--cache-at`` name, each with its output shape per image at
    the crop size (``None``: not a tensor). Built with random weights: the shapes do not depend on them."""
    from pipeline.stage1.backbones import load_backbone, node_shapes

    bb = load_backbone(backbone, weights="none", image_size=image_size)
    shapes = node_shapes(bb)
    last: dict[str, list[str]] = {}  # node -> the modules it ends (their names mean it: layer3 = layer3.1.relu_1)
    names = [name for name, _ in shapes]
    for module, _ in bb.model.named_modules():
        inside = [n for n in names if n == module or n.startswith(module + ".")] if module else []
        if inside and inside[-1] != module:
            last.setdefault(inside[-1], []).append(module)
    nodes = [
        {"node": name, "shape": None if shape is None else list(shape), "modules": last.get(name, [])}
        for name, shape in shapes
    ]
    return {"backbone": backbone, "crop_size": bb.preprocess.crop_size, "nodes": nodes}


def format_nodes(listing: dict[str, Any]) -> str:
    """The node list as ``pipeline inspect --nodes`` prints it: one node a line, with its output shape."""
    rows = listing["nodes"]
    width = max(len("node"), *(len(n["node"]) for n in rows))
    lines = [
        f"{listing['backbone']} at {listing['crop_size']} px: the nodes extract --layers pools (C x H x W -> C, "
        "tokens N x C -> C) and --cache-at stores (C x H x W)",
        "",
        f"{'node':<{width}}  {'output per image':<16}  also named (the modules it ends)",
    ]
    for n in rows:
        shape = "not a tensor" if n["shape"] is None else " x ".join(map(str, n["shape"])) or "scalar"
        lines.append(f"{n['node']:<{width}}  {shape:<16}  {', '.join(n.get('modules', []))}".rstrip())
    return "\n".join(lines)


def to_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2, default=str)
