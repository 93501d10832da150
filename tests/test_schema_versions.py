"""The feature file's schema versions: files written by earlier code (version 1) read as complete typed records
and stay up to date; the optional per-row audit columns (``digests``, ``phash``) of version 2 are written,
resumed, merged and read back; class names that are not UTF-8 are escaped, not fatal."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import store
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import Preprocessing
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store import AUDIT_COLUMNS, FeatureWriter, StoredFile, fingerprint, read_features, read_meta
from tests.conftest import TINY_EXTRACT, write_feature_file, write_image_folder

# The record of a file written by `python -m pipeline extract` of main at 9816617 (schema version 1; mobilenet_v2,
# random weights, 32 px, a folder of 8 digits from data/digits, float16): every attribute and dataset as that code
# stored them, kept as text (no feature file in git); :func:`main_v1_file` writes the file from it.
MAIN_V1 = Path(__file__).parent / "data" / "features_v1_main-9816617.json"


def _stored(value: dict) -> object:
    """An attribute's value in the type version 1 code stored it as."""
    ((kind, v),) = value.items()
    return {"str": str, "bool": np.bool_, "int64": np.int64, "float64": np.float64}[kind](v)


def main_v1_file(path: Path) -> Path:
    """The version 1 file of :data:`MAIN_V1` at ``path``: its attributes, groups and datasets (types, shapes,
    layouts, ids, labels, class names) as stored, the features seeded draws in their dtype."""
    record = json.loads(MAIN_V1.read_text())
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update({k: _stored(v) for k, v in record["attrs"].items()})
        for name, attrs in record["groups"].items():
            f.create_group(name).attrs.update({k: _stored(v) for k, v in attrs.items()})
        for name, d in record["datasets"].items():
            shape, maxshape = tuple(d["shape"]), tuple(d["maxshape"])
            if d["dtype"] == "str":
                dtype, data = h5py.string_dtype("utf-8"), np.array(d["values"], dtype=object)
            elif d["values"] == "seeded":
                dtype, data = np.dtype(d["dtype"]), rng.standard_normal(shape).astype(d["dtype"])
            else:
                dtype, data = np.dtype(d["dtype"]), np.array(d["values"], dtype=d["dtype"])
            layout = {"maxshape": maxshape, "chunks": tuple(d["chunks"])} if d["chunks"] else {}  # else contiguous
            f.create_dataset(name, data=data, dtype=dtype, **layout)
    return path


def _old_fingerprint(identity: dict) -> str:
    """How version 1 code hashed an identity (canonical JSON, sha256): nothing left out."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ version 1 files


def test_a_file_written_by_main_reads_as_a_complete_record(tmp_path: Path) -> None:
    path = main_v1_file(tmp_path / "v1.h5")
    with h5py.File(path) as f:  # the file as stored: version 1, the defaults left out
        assert f.attrs["schema_version"] == 1
        stored = json.loads(f.attrs["identity"])
        assert "resize" not in json.loads(f.attrs["preprocessing"]) and "preprocess_on" not in stored
    fs = read_features(path)
    meta = fs.meta
    assert meta.schema_version == 1 and meta.complete is True and meta.feature_dim == 1280
    assert meta.preprocessing["resize"] == "crop" and meta.identity["preprocessing"]["resize"] == "crop"
    assert meta.identity["preprocess_on"] == "loader"
    assert meta.identity["dataset"]["verify"] == "stat" and meta.dataset_identity["verify"] == "stat"
    assert Preprocessing.from_dict(meta.preprocessing) == Preprocessing.from_dict(stored["preprocessing"])
    # the complete identity hashes as the fingerprint the file was written with: it stays up to date
    assert fingerprint(meta.identity) == meta.fingerprint == _old_fingerprint(stored)
    assert len(fs.train) == 5 and len(fs.val) == 3 and fs.train.features.dtype == np.float16
    assert fs.train.digests is None and fs.train.phash is None  # older files: no audit columns


def test_fingerprint_leaves_out_only_defaults_held() -> None:
    v1 = {"schema_version": 1, "backbone": "resnet18", "preprocessing": {"crop_size": 32},
          "dataset": {"kind": "folder", "root": "/x"}}  # fmt: skip
    full = {**v1, "preprocessing": {"crop_size": 32, "resize": "crop"}, "preprocess_on": "loader",
            "dataset": {"kind": "folder", "root": "/x", "verify": "stat"}}  # fmt: skip
    assert fingerprint(full) == fingerprint(v1) == _old_fingerprint(v1)
    for changed in (
        {**full, "preprocessing": {"crop_size": 32, "resize": "full"}},
        {**full, "preprocess_on": "device"},
        {**full, "dataset": {**full["dataset"], "verify": "content"}},
    ):
        assert fingerprint(changed) != fingerprint(full)
    # "verify" is a folder's key: in a torchvision set's identity it is not a default to leave out
    tv = {"dataset": {"kind": "torchvision", "verify": "stat"}}
    assert fingerprint(tv) == _old_fingerprint(tv)
    assert store.describe_change(v1, full) == "same settings, other fingerprint"  # compared complete


def _as_version_1(path: Path) -> None:
    """Rewrite a file's record as version 1 code wrote it: the keys holding their defaults left out."""
    with h5py.File(path, "a") as f:
        for key in ("preprocessing", "identity", "dataset_identity"):
            value = json.loads(f.attrs[key])
            value.pop("resize", None)
            value.pop("preprocess_on", None)
            value.pop("verify", None)
            for inner in ("preprocessing", "dataset"):
                if isinstance(value.get(inner), dict):
                    value[inner].pop("resize", None)
                    value[inner].pop("verify", None)
            f.attrs[key] = json.dumps(value)
        f.attrs["schema_version"] = 1


def test_a_version_1_file_is_reused_not_re_extracted(image_folder: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "f.h5"), **TINY_EXTRACT)
    first = extract(cfg)
    meta = read_meta(first.path)
    assert meta.schema_version == store.SCHEMA_VERSION
    assert meta.preprocessing["resize"] == "crop" and meta.identity["preprocess_on"] == "loader"  # complete
    _as_version_1(first.path)
    with h5py.File(first.path) as f:
        assert "preprocess_on" not in json.loads(f.attrs["identity"])
    before = first.path.stat().st_mtime_ns
    again = extract(cfg)
    assert again.reused and first.path.stat().st_mtime_ns == before
    assert read_meta(first.path).identity == meta.identity  # upgraded on read to what version 2 writes


def test_a_newer_schema_version_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write_feature_file(tmp_path / "f.h5", n_train=8, n_val=4, dim=4, classes=2)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = store.SCHEMA_VERSION + 1
    with pytest.raises(PipelineError) as e:
        read_features(path)
    assert f"schema version {store.SCHEMA_VERSION + 1}" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ the audit columns


def _digest(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def _audit_rows(a: int, b: int) -> dict[str, object]:
    return {"digests": [_digest(i) for i in range(a, b)], "phash": np.array([2**64 - 1 - i for i in range(a, b)])}


def _audit_writer(path: Path, **kw: object) -> FeatureWriter:
    meta = {"fingerprint": "audit", "feature_dim": 3}
    sizes = {"train": 6, "val": 2}
    return FeatureWriter(path, meta=meta, classes=["a", "b"], sizes=sizes, feature_dim=3, columns=AUDIT_COLUMNS,
                         flush_every=1, **kw)  # fmt: skip


def _append(w: FeatureWriter, split: str, a: int, b: int) -> None:
    feats = np.arange(a, b, dtype=np.float32)[:, None].repeat(3, 1)
    w.append(split, feats, np.arange(a, b) % 2, [f"{split}{i}" for i in range(a, b)], seen=b - a,
             extra=_audit_rows(a, b))  # fmt: skip


def test_audit_columns_are_written_resumed_and_read(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    w = _audit_writer(path)
    _append(w, "train", 0, 4)
    w.close()  # as if killed after a commit
    w = _audit_writer(path)  # resumed: the committed rows, their columns with them
    assert w.rows("train") == 4
    _append(w, "train", 4, 6)
    _append(w, "val", 0, 2)
    w.finish()
    fs = read_features(path)
    assert list(fs.train.digests) == [_digest(i) for i in range(6)]
    assert fs.train.phash.dtype == np.uint64 and int(fs.train.phash[0]) == 2**64 - 1  # all 64 bits kept
    assert [int(h) for h in fs.val.phash] == [2**64 - 1, 2**64 - 2]
    layer = store.select_layer(fs, None)
    assert layer.train.digests is fs.train.digests


def test_audit_columns_are_merged_from_shards(tmp_path: Path) -> None:
    shards = []
    for k, (a, b) in enumerate(((0, 3), (3, 6))):
        w = FeatureWriter(tmp_path / f"s{k}.h5", meta={"fingerprint": "audit", "feature_dim": 3}, classes=["a", "b"],
                          sizes={"train": b - a}, feature_dim=3, columns=AUDIT_COLUMNS)  # fmt: skip
        _append(w, "train", a, b)
        shards.append(w.finish())
    out = FeatureWriter(tmp_path / "all.h5", meta={"fingerprint": "audit", "feature_dim": 3}, classes=["a", "b"],
                        sizes={"train": 6}, feature_dim=3, columns=AUDIT_COLUMNS)  # fmt: skip
    sources = [StoredFile(p, fingerprint="audit") for p in shards]
    out.extend_from(sources, "train")
    for s in sources:
        s.close()
    fs = read_features(out.finish(), splits=("train",))
    assert list(fs.train.digests) == [_digest(i) for i in range(6)]
    assert [int(h) for h in fs.train.phash] == [2**64 - 1 - i for i in range(6)]


def test_a_digest_that_is_not_64_hex_digits_is_a_caller_error(tmp_path: Path) -> None:
    w = _audit_writer(tmp_path / "f.h5")
    with pytest.raises(ValueError, match="64 hex digits"):
        w.append("train", np.zeros((1, 3), np.float32), np.array([0]), ["x"], seen=1,
                 extra={"digests": ["abc"], "phash": np.array([1], np.uint64)})  # fmt: skip
    w.close()


def test_a_damaged_audit_column_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    w = _audit_writer(path)
    _append(w, "train", 0, 6)
    _append(w, "val", 0, 2)
    w.finish()
    with h5py.File(path, "a") as f:
        del f["train/phash"]
        f["train/phash"] = np.zeros(5, np.uint64)  # a row short
    with pytest.raises(PipelineError) as e:
        read_features(path)
    assert "/train/phash" in str(e.value) and "expected 6 uint64 hashes" in str(e.value)
    assert "\n" not in str(e.value)


def test_rewriting_the_targets_keeps_the_audit_columns(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    w = _audit_writer(path)
    _append(w, "train", 0, 6)
    _append(w, "val", 0, 2)
    w.finish()

    class Targets:
        info = {"names": ["t"], "source": "t.csv", "sha256": "0" * 64}

        def lookup(self, split: str, ids: list[str]) -> np.ndarray:
            return np.ones((len(ids), 1), np.float32)

    store.rewrite_targets(path, Targets())
    fs = read_features(path)
    assert fs.train.targets.shape == (6, 1) and list(fs.train.digests) == [_digest(i) for i in range(6)]


# ------------------------------------------------------------------------------------------ class names


def test_a_class_folder_name_that_is_not_utf8_is_escaped(tmp_path: Path) -> None:
    """A folder named with the bytes b'caf\\xe9' (Latin-1): Python holds it as 'caf\\udce9', which UTF-8 cannot
    write. Stored escaped as the ids are ('caf\\\\xe9'); before, extract failed with "rerun to resume", and so did
    every rerun."""
    root = write_image_folder(tmp_path / "imgs", per_class=4, classes=("plain", "other"))
    name = os.fsdecode(b"caf\xe9")
    os.rename(root / "other", root / name)
    cfg = ExtractConfig(dataset=str(root), out=str(tmp_path / "f.h5"), val_fraction=0.5, **TINY_EXTRACT)
    fs = read_features(extract(cfg).path)
    assert fs.classes == ["caf\\xe9", "plain"]
    assert all(i.startswith("caf\\xe9/") for i, y in zip(fs.train.ids, fs.train.labels) if y == 0)
    assert extract(cfg).reused  # the rerun finds it up to date


def test_class_names_that_escape_alike_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as e:
        FeatureWriter(tmp_path / "f.h5", meta={"fingerprint": "x"}, classes=[os.fsdecode(b"a\xe9"), "a\\xe9"],
                      sizes={"train": 1}, feature_dim=2)  # fmt: skip
    assert "rename one" in str(e.value) and "resume" not in str(e.value)
    assert not (tmp_path / "f.h5.tmp").exists()


def test_writer_refuses_a_record_it_cannot_write_without_promising_a_resume(tmp_path: Path) -> None:
    meta = replace(store.FeatureMeta(fingerprint="x"), dataset="\ud800")  # a lone surrogate: no UTF-8 form
    with pytest.raises(PipelineError) as e:
        FeatureWriter(tmp_path / "f.h5", meta=meta, classes=["a"], sizes={"train": 1}, feature_dim=2)
    assert str(e.value).startswith("cannot create") and "resume" not in str(e.value)
    assert not (tmp_path / "f.h5.tmp").exists()  # nothing half made is left to "resume"


def test_storable_name_escapes_only_what_utf8_cannot_hold() -> None:
    for text in ("café", "a\\xe9", "猫/dog", "=SUM(A1)"):
        assert store.storable_name(text) == text  # valid text, backslashes included, is unchanged
    assert store.storable_name(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # a file name's undecodable byte
    assert store.storable_name("a\ud800") == "a\\ud800"  # a surrogate no file name decodes to
    for name in (os.fsdecode(b"caf\xe9"), "a\ud800"):
        store.storable_name(name).encode("utf-8")  # what HDF5 stores
