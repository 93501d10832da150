"""The feature file on its own: round trips (property-based), resume after a crash, refusal of damaged or foreign
files with a message that says which problem, many readers at once, and the writer's lock."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import store
from pipeline.errors import PipelineError
from pipeline.store import FeatureWriter, FileLock, read_features, read_meta, tmp_path_for
from tests.conftest import write_feature_file
from tests.test_reliability import one_thread  # noqa: F401 - autouse: one torch thread in this module

ROOT = Path(__file__).resolve().parents[1]

# Names a folder or a dataset could give a class or an image: any unicode but NUL (no file name holds one) and
# lone surrogates (not encodable as UTF-8, so no path holds one either).
NAMES = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=12)


@st.composite
def feature_sets(draw: st.DrawFn) -> dict:
    dtype = draw(st.sampled_from(["float32", "float16"]))
    dim = draw(st.integers(1, 48))
    classes = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    finite = st.floats(width=16 if dtype == "float16" else 32, allow_nan=False, allow_infinity=False)
    splits = {}
    for name, lo in (("train", len(classes)), ("val", 0)):  # every class has training rows (else refused)
        n = draw(st.integers(lo, 40))
        given = list(range(len(classes))) if name == "train" else []
        rest = draw(st.lists(st.integers(0, len(classes) - 1), min_size=n - len(given), max_size=n - len(given)))
        splits[name] = {
            "features": draw(hnp.arrays(dtype, (n, dim), elements=finite)),
            "labels": np.array(given + rest, np.int64),
            "ids": draw(st.lists(NAMES, min_size=n, max_size=n)),
            # where the extraction hands rows over: any chunking must give the same file
            "cuts": sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=4)) if n > 1 else []),
        }
    return {"dtype": dtype, "dim": dim, "classes": classes, "splits": splits, "flush_every": draw(st.integers(1, 4))}


def _writer(path: Path, data: dict) -> FeatureWriter:
    meta = {
        "fingerprint": "property-test",
        "backbone": "synthetic",
        "weights": "none",
        "feature_dim": data["dim"],
        "num_classes": len(data["classes"]),
        "preprocessing": {"crop_size": 1},
        "dataset_identity": {"kind": "synthetic"},
    }
    sizes = {s: len(v["labels"]) for s, v in data["splits"].items()}
    return FeatureWriter(
        path,
        meta=meta,
        classes=data["classes"],
        sizes=sizes,
        feature_dim=data["dim"],
        dtype=data["dtype"],
        flush_every=data["flush_every"],
    )


def _append_from(w: FeatureWriter, name: str, split: dict, start: int) -> None:
    bounds = [start, *(c for c in split["cuts"] if c > start), len(split["labels"])]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            w.append(name, split["features"][lo:hi], split["labels"][lo:hi], split["ids"][lo:hi], seen=hi - lo)


def _assert_holds(path: Path, data: dict) -> None:
    fs = read_features(path)
    assert fs.classes == data["classes"]
    assert fs.feature_dim == data["dim"]
    for name, split in data["splits"].items():
        got = fs.splits[name]
        assert got.features.dtype == np.dtype(data["dtype"])
        np.testing.assert_array_equal(got.features, split["features"])
        np.testing.assert_array_equal(got.labels, split["labels"])
        assert list(got.ids) == split["ids"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=feature_sets())
def test_round_trip_is_unchanged(data: dict) -> None:
    """Random shapes, dtypes, unicode class names and ids, split sizes (val may be empty) and chunkings."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.h5"
        w = _writer(path, data)
        for name, split in data["splits"].items():
            _append_from(w, name, split, 0)
        w.finish()
        assert not tmp_path_for(path).exists()
        _assert_holds(path, data)


def test_append_copies_the_rows_it_holds(tmp_path: Path) -> None:
    """Rows wait in memory until the next commit, and the extraction appends from a ring of reused pinned buffers:
    the writer must keep the values at the time of ``append``, not a view that the next batch overwrites."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 4)).astype(np.float32)
    data = {"classes": ["a", "b"], "dim": 4, "dtype": "float32", "flush_every": 100}
    data["splits"] = {"train": {"labels": np.arange(12) % 2}, "val": {"labels": np.zeros(0, np.int64)}}
    w = _writer(tmp_path / "f.h5", data)
    buf = np.empty((3, 4), np.float32)  # one buffer reused for every batch, as the extraction's ring does
    labels = np.empty(3, np.int64)
    for lo in range(0, 12, 3):
        buf[:], labels[:] = feats[lo : lo + 3], np.arange(lo, lo + 3) % 2
        w.append("train", buf, labels, [str(i) for i in range(lo, lo + 3)], seen=3)
    w.finish()
    got = read_features(tmp_path / "f.h5").train
    np.testing.assert_array_equal(got.features, feats)
    np.testing.assert_array_equal(got.labels, np.arange(12) % 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=feature_sets(), stop_after=st.integers(0, 8))
def test_crash_then_resume_gives_the_same_file(data: dict, stop_after: int) -> None:
    """A writer that dies after ``stop_after`` appends (rows after its last commit on disk but not committed) is
    reopened, its committed rows carried over, continued from there, and ends with the uninterrupted file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.h5"
        w = _writer(path, data)
        appended = 0
        for name, split in data["splits"].items():
            bounds = [0, *split["cuts"], len(split["labels"])]
            for lo, hi in zip(bounds, bounds[1:]):
                if appended == stop_after:
                    break
                w.append(name, split["features"][lo:hi], split["labels"][lo:hi], split["ids"][lo:hi], seen=hi - lo)
                appended += 1
        committed = (appended // data["flush_every"]) * data["flush_every"]
        w.f.close()  # the crash: no commit, so the counters on disk are those of the last one
        assert not path.exists()

        again = _writer(path, data)
        done = 0
        for name, split in data["splits"].items():
            bounds = [0, *split["cuts"], len(split["labels"])]
            take = min(len(bounds) - 1, max(0, committed - done))  # chunks of this split that were committed
            assert again.seen(name) == again.start[name] == bounds[take], (name, committed, done)
            done += len(bounds) - 1
            _append_from(again, name, split, again.seen(name))
        again.finish()
        _assert_holds(path, data)


def test_partial_file_with_other_settings_is_kept(tmp_path: Path) -> None:
    """Only --force (the caller unlinking it) discards a partial file; a mismatch is an error, not a deletion."""
    data = {"dtype": "float32", "dim": 4, "classes": ["a", "b"], "flush_every": 1, "splits": {}}
    data["splits"] = {
        "train": {"features": np.ones((3, 4), np.float32), "labels": np.array([0, 1, 0]), "ids": list("xyz")},
        "val": {"features": np.ones((1, 4), np.float32), "labels": np.array([1]), "ids": ["w"]},
    }
    path = tmp_path / "f.h5"
    w = _writer(path, data)
    w.append("train", data["splits"]["train"]["features"][:2], np.array([0, 1]), ["x", "y"], seen=2)
    w.close()
    before = tmp_path_for(path).read_bytes()
    other = {**data, "dim": 5}
    with pytest.raises(PipelineError, match="partial extraction with other settings.*--force"):
        FeatureWriter(
            path,
            meta={"fingerprint": "another"},
            classes=["a", "b"],
            sizes={"train": 3, "val": 1},
            feature_dim=other["dim"],
        )
    assert tmp_path_for(path).read_bytes() == before

    def disk_full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:  # copying the committed rows fails: the partial file stays, said so
        mp.setattr(store.write, "row_blocks", disk_full)
        with pytest.raises(PipelineError, match=r"^disk full: 2 rows kept in .*f\.h5\.tmp; free space and rerun$"):
            _writer(path, data)
    assert tmp_path_for(path).read_bytes() == before
    assert not tmp_path_for(path).with_name(tmp_path_for(path).name + ".resume").exists()
    tmp_path_for(path).write_text("my notes, not HDF5")
    with pytest.raises(PipelineError, match="not a partial feature file.*--force"):
        _writer(path, data)
    assert tmp_path_for(path).read_text() == "my notes, not HDF5"


# ------------------------------------------------------------------------------------------ refusals


def _damage(path: Path, how: str) -> None:
    with h5py.File(path, "a") as f:
        if how == "schema":
            f.attrs["schema_version"] = 99
        elif how == "dim":
            del f["val/features"]
            f["val/features"] = np.zeros((len(f["val/labels"]), 16), np.float32)
        elif how == "labels":
            f["train/labels"][3] = 7
        elif how == "negative":
            f["val/labels"][0] = -1
        elif how == "nan":
            f["train/features"][5, 2] = np.nan
        elif how == "inf":
            f["val/features"][1, 0] = np.inf
        elif how == "incomplete":
            f.attrs["complete"] = False
        elif how == "no-split":
            del f["val"]
        elif how == "label-type":
            del f["train/labels"]
            f["train/labels"] = np.zeros(len(f["train/ids"]), np.float64)
        elif how == "bad-json":
            f.attrs["preprocessing"] = "{not json"


@pytest.mark.parametrize(
    ("how", "fragments"),
    [
        ("schema", ["schema version 99", "reads 1"]),
        ("dim", ["splits disagree in feature dimension", "train 32", "val 16"]),
        ("labels", ["/train/labels fall outside the 4 classes", "0..7"]),
        ("negative", ["/val/labels fall outside"]),
        ("nan", ["/train/features holds NaN or Inf in 1 rows"]),
        ("inf", ["/val/features holds NaN or Inf in 1 rows"]),
        ("incomplete", ["incomplete", "rerun extract to resume"]),
        ("no-split", ["no complete '/val' group"]),
        ("label-type", ["wrong types", "labels float64"]),
        ("bad-json", ["'preprocessing' attribute is not valid JSON"]),
    ],
)
def test_damaged_file_is_refused_saying_which(how: str, fragments: list[str], make_feature_file, capsys) -> None:
    from tests.conftest import assert_one_line_error, run

    path = make_feature_file(n_train=40, n_val=20)
    _damage(path, how)
    with pytest.raises(PipelineError) as e:
        read_features(path)
    for fragment in fragments:
        assert fragment in str(e.value)
    code, _, err = run(["train-head", "--features", str(path), "--out", str(path.parent / "h")], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (path.parent / "h").exists()


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_truncated_file_is_refused(keep: float, make_feature_file, capsys) -> None:
    from tests.conftest import assert_one_line_error, run

    path = make_feature_file(n_train=300, n_val=100)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    with pytest.raises(PipelineError, match="truncated|damaged|not an HDF5"):
        read_features(path)
    code, _, err = run(["train-head", "--features", str(path)], capsys)
    assert_one_line_error(code, err, str(path))


def test_foreign_hdf5_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "keras.h5"
    with h5py.File(other, "w") as f:
        f["model_weights/dense/kernel"] = np.zeros((3, 3))
        f.attrs["keras_version"] = "2.15"
    with pytest.raises(PipelineError, match="not written by `pipeline extract`"):
        read_features(other)
    with pytest.raises(PipelineError, match="is a folder"):
        read_features(tmp_path)
    mimic = tmp_path / "mimic.h5"  # claims our format, holds something else
    with h5py.File(mimic, "w") as f:
        f.attrs.update(format="pipeline.cached-embeddings", schema_version=1, complete=True, feature_dim=2)
        f["classes"] = np.array([b"a", b"b"])
        for s in ("train", "val"):
            f[f"{s}/features"] = np.array([["x", "y"]], dtype=h5py.string_dtype())
            f[f"{s}/labels"] = np.array([0])
            f[f"{s}/ids"] = np.array([b"0"])
    with pytest.raises(PipelineError, match="wrong types"):
        read_features(mimic)


# ------------------------------------------------------------------------------------------ concurrency

_READER = """
import sys
from pipeline.store import read_features
fs = read_features(sys.argv[1])            # holds nothing open afterwards; then hold the file open while others read
import h5py
with h5py.File(sys.argv[1], "r") as f:
    print(len(fs.train), flush=True)
    sys.stdin.readline()                   # held open until the test says so (no sleep: no race with a slow machine)
    assert f["train/features"].shape[0] == len(fs.train)
"""


def test_many_readers_at_once(make_feature_file, tmp_path: Path, capsys) -> None:
    """Several processes hold one feature file open while train-head reads it: all succeed."""
    from tests.conftest import run

    path = make_feature_file(n_train=200, n_val=80)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _READER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    try:
        for p in procs:  # every reader has the file open before the next read starts
            assert p.stdout.readline().strip() == b"200"
        code, out, _ = run(
            ["train-head", "--features", str(path), "--head", "linear", "--epochs", "2", "--out", str(tmp_path / "h")],
            capsys,
        )
        assert code == 0 and (tmp_path / "h" / "metrics.json").exists()
        assert all(p.poll() is None for p in procs), "readers should still hold the file"
        assert read_features(path).train.features.shape == (200, 32)
    finally:
        for p in procs:
            _, err = p.communicate(b"\n", timeout=60)
            assert p.returncode == 0, err.decode()


def test_a_file_being_written_is_never_read(tmp_path: Path) -> None:
    """While a writer holds ``<out>.tmp`` there is nothing under ``<out>``, and the .tmp itself is refused."""
    data_path = tmp_path / "f.h5"
    w = FeatureWriter(
        data_path, meta={"fingerprint": "x", "feature_dim": 2}, classes=["a", "b"], sizes={"train": 4}, feature_dim=2
    )
    w.append("train", np.zeros((2, 2), np.float32), np.array([0, 1]), ["p", "q"], seen=2)
    w.commit()
    code = (
        "import sys\nfrom pipeline.store import read_features\nfrom pipeline.errors import PipelineError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        read_features(p)\n    except PipelineError as e:\n        print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data_path), str(w.tmp)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    lines = proc.stdout.strip().splitlines()
    assert "feature file not found" in lines[0]
    assert "being written by another process" in lines[1]
    w.close()
    with pytest.raises(PipelineError, match="incomplete.*resume"):  # writer gone: the .tmp is a partial file
        read_features(w.tmp)


_LOCKER = r"""
import os, sys, time
from pathlib import Path
from pipeline.store import FileLock
lock = FileLock(Path(sys.argv[1]))
lock.acquire()
if os.fork() == 0:      # a child (like a DataLoader worker) that outlives its parent
    os.write(1, b"child\n")  # after its fork hook ran (the hook runs before fork() returns in the child)
    time.sleep(30)
    os._exit(0)
os.write(1, b"locked\n")  # one write per line: print() writes text and newline apart, which interleave
time.sleep(30)
"""


def test_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    with FileLock(out), pytest.raises(PipelineError, match="another extract is already writing .*f.h5"):
        FileLock(out).acquire()
    with FileLock(out):  # released on leaving the block, and its file deleted
        assert out.with_name("f.h5.lock").exists()
    assert not out.with_name("f.h5.lock").exists()

    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        # Both lines, in either order: the child may not have run (and dropped its copy of the lock) yet when the
        # parent says "locked", and the test then failed under load.
        lines = sorted(proc.stdout.readline().strip() for _ in range(2))
        assert lines == [b"child", b"locked"], lines
        with pytest.raises(PipelineError, match="another extract"):
            FileLock(out).acquire()
        os.kill(proc.pid, signal.SIGKILL)  # its forked child lives on, holding a copy of the descriptor
        proc.wait(timeout=30)
        t0 = time.monotonic()
        lock = FileLock(out)
        lock.acquire()  # free at once: the child's copy was pointed away from the lock file when it forked
        lock.release()
        assert time.monotonic() - t0 < 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned child, same session as the process started here


def test_one_lock_for_every_user_each_naming_its_refusal(tmp_path: Path) -> None:
    """pipeline.locks.FileLock is the one lock: the feature file's (store.FileLock) and a head folder's
    (stage two) are it with their own one-line refusal."""
    from pipeline import locks
    from pipeline.stage2 import runs

    folder = tmp_path / "head"
    assert issubclass(store.FileLock, locks.FileLock) and issubclass(runs.FolderLock, locks.FileLock)
    with locks.FileLock(folder):
        with pytest.raises(PipelineError, match=r"^another process is writing .*head; wait for it"):
            locks.FileLock(folder).acquire()
        with pytest.raises(PipelineError, match="another extract is already writing"):
            store.FileLock(folder).acquire()
        with pytest.raises(PipelineError, match="another train-head or compare is writing"):
            runs.FolderLock(folder).acquire()
    assert not folder.with_name("head.lock").exists()


_CONTENDER = """
import os, sys, time
from pathlib import Path
from pipeline.errors import PipelineError
from pipeline.store import FileLock
out, marker, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
done = 0
while done < rounds:
    lock = FileLock(out)
    try:
        lock.acquire()
    except PipelineError:
        continue
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: two holders at once
    os.close(fd)
    os.unlink(marker)
    lock.release()
    done += 1
print(done)
"""


def test_lock_deleted_on_release_still_admits_one_holder_at_a_time(tmp_path: Path) -> None:
    """Four processes take and release the lock 300 times each, as fast as they can. Each, while it holds the
    lock, creates a marker with O_EXCL: a second holder at the same moment (a process that locked a lock file
    its holder had just deleted) would fail there."""
    out, marker = tmp_path / "f.h5", tmp_path / "held"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(out), str(marker), "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()[-800:]
        assert stdout.strip() == b"300"
    assert not out.with_name("f.h5.lock").exists()


def test_read_meta_of_a_written_file(feature_file: Path) -> None:
    meta = read_meta(feature_file)
    assert meta.complete and meta.feature_dim == 32 and meta.schema_version == store.SCHEMA_VERSION
    assert json.loads(json.dumps(meta.dataset_identity)) == {}


def test_default_fixture_still_writes_valid_files(tmp_path: Path) -> None:
    path = write_feature_file(tmp_path / "x.h5", n_train=10, n_val=0)
    assert len(read_features(path).val) == 0


# ------------------------------------------------------------------------------------------ the record


def _full_meta() -> store.FeatureMeta:
    return store.FeatureMeta(
        fingerprint="f" * 64,
        backbone="resnet18",
        weights="none(seed=0)",
        feature_dim=4,
        num_classes=2,
        preprocessing={"crop_size": 32, "mean": [0.5, 0.5, 0.5]},
        dataset="imgs",
        dataset_identity={"kind": "folder", "num_files": 3},
        identity={"backbone": "resnet18", "dataset": {"kind": "folder"}},
        config={"batch_size": 8, "limit": None},
        classifier_path="fc",
        versions={"h5py": "3"},
        device="cpu",
        precision="fp32",
        scan_skipped=["cat/loop (symlink loop)"],
    )


def _tiny_file(path: Path, meta: store.FeatureMeta | dict, **finish: object) -> Path:
    w = FeatureWriter(path, meta=meta, classes=["a", "b"], sizes={"train": 2, "val": 1}, feature_dim=4)
    w.append("train", np.ones((2, 4), np.float32), np.array([0, 1]), ["x", "y"], seen=2)
    w.append("val", np.ones((1, 4), np.float32), np.array([1]), ["z"], seen=1)
    w.finish(finish)
    return path


def test_every_attribute_reads_back_as_the_type_it_was_written_as(tmp_path: Path) -> None:
    meta = _full_meta()
    path = _tiny_file(tmp_path / "f.h5", meta, extract_seconds=1.5, resumed_from={"train": 2, "val": 0})
    got = read_meta(path)
    for name in (f.name for f in dataclasses.fields(store.FeatureMeta)):
        if name in ("created", "complete", "extract_seconds", "resumed_from"):
            continue
        want = getattr(meta.completed(), name)  # written complete: the keys of store.DEFAULTS filled in
        assert getattr(got, name) == want, name
        assert type(getattr(got, name)) is type(want), name
    assert got.preprocessing == {**meta.preprocessing, "resize": "crop"}  # completed
    assert got.complete is True and got.extract_seconds == 1.5 and got.resumed_from == {"train": 2, "val": 0}
    assert got.identity == meta.completed().identity and isinstance(got.resumed_from, dict)  # were JSON text
    assert read_features(path).meta.preprocessing["crop_size"] == 32
    with pytest.raises(TypeError):  # a typed record, read one way: by attribute
        got["identity"]  # noqa: B018
    assert not hasattr(got, "get")
    with h5py.File(path) as f:  # every attribute the file holds is a field of the record
        assert set(f.attrs) <= {f.name for f in dataclasses.fields(store.FeatureMeta)}


def test_a_version_1_file_of_the_previous_writer_is_read(tmp_path: Path) -> None:
    """Attributes exactly as version 1 wrote them before the record existed: every dict as JSON text."""
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            fingerprint="abc",
            backbone="resnet18",
            weights="none(seed=0)",
            feature_dim=np.int64(4),
            num_classes=2,
            preprocessing=json.dumps({"crop_size": 32}),
            dataset="imgs",
            dataset_identity=json.dumps({"kind": "folder"}),
            identity=json.dumps({"backbone": "resnet18"}),
            config=json.dumps({"batch_size": 8}),
            classifier_path="fc",
            versions=json.dumps({"h5py": "3"}),
            device="cpu",
            precision="fp32",
            format="pipeline.cached-embeddings",
            schema_version=1,
            complete=np.True_,
            created="2026-01-01T00:00:00+00:00",
            extract_seconds=2.5,
            resumed_from=json.dumps({"train": 0, "val": 0}),
            merge=json.dumps({"shards": 2, "seconds": 0.1}),
        )
        f["classes"] = np.array(["a", "b"], dtype=object)
        for s, n in (("train", 2), ("val", 1)):
            g = f.create_group(s)
            g["features"] = np.zeros((n, 4), np.float32)
            g["labels"] = np.arange(n, dtype=np.int64) % 2  # every class has training rows
            g["ids"] = np.array([str(i) for i in range(n)], dtype=object)
            g.attrs.update(n_total=n, n_seen=n, n_rows=n, skipped="[]")
    meta = read_features(path).meta
    assert meta.identity == {"backbone": "resnet18", "preprocess_on": "loader"}  # upgraded, as preprocessing
    assert meta.resumed_from == {"train": 0, "val": 0}
    assert meta.merge == {"shards": 2, "seconds": 0.1}
    assert meta.preprocessing == {"crop_size": 32, "resize": "crop"}  # upgraded: the default it left out
    assert meta.feature_dim == 4 and type(meta.feature_dim) is int and meta.complete is True


def test_a_partial_file_of_the_same_settings_but_another_shape_says_so(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, meta={"fingerprint": "same"}, classes=["a", "b"], sizes={"train": 3}, feature_dim=4)
    w.append("train", np.ones((2, 4), np.float32), np.array([0, 1]), ["x", "y"], seen=2)
    w.close()
    with pytest.raises(PipelineError) as e:
        FeatureWriter(path, meta={"fingerprint": "same"}, classes=["a", "b"], sizes={"train": 3}, feature_dim=5)
    assert "other settings" not in str(e.value) and "not their shape" in str(e.value) and "train 4" in str(e.value)


def test_describe_change_names_what_differs() -> None:
    old = {
        "backbone": "resnet18",
        "weights": "none(seed=0)",
        "preprocessing": {"crop_size": 32, "resize_size": 36},
        "dataset": {"kind": "folder", "files_sha256": "a", "num_files": 5, "limit": 4},
        "dtype": "float32",
    }
    new = {**old, "backbone": "resnet50", "preprocessing": {"crop_size": 48, "resize_size": 36}}
    new["dataset"] = {**old["dataset"], "files_sha256": "b", "num_files": 6, "limit": 5}
    files_old = {"cat/1.png": "1", "cat/2.png": "2", "dog/1.png": "3"}
    files_new = {"cat/1.png": "1", "cat/2.png": "X", "dog/2.png": "4", "dog/3.png": "5"}
    line = store.describe_change(old, new, old_files=files_old, new_files=files_new)
    assert line == (
        "backbone resnet18 -> resnet50; preprocessing (crop_size 32 -> 48); "
        "dataset (files: 2 added, 1 removed, 1 changed, limit 4 -> 5)"
    )
    assert store.describe_change(old, {**old, "precision": "bf16"}) == "precision absent -> bf16"


# ------------------------------------------------------------------------------------------ a full disk


def _commits(path: Path, n: int, **kw: object) -> FeatureWriter:
    w = FeatureWriter(
        path,
        meta={"fingerprint": "fp", "feature_dim": 4},
        classes=["a", "b"],
        sizes={"train": 10},
        feature_dim=4,
        flush_every=1,
        **kw,
    )
    for i in range(n):
        w.append("train", np.full((1, 4), i, np.float32), np.array([i % 2]), [f"r{i}"], seen=1)
    return w


def test_no_room_for_a_commit_keeps_the_last_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.h5"
    w = _commits(path, 3)
    monkeypatch.setattr(store.write, "room_for", lambda *a, **kw: False)
    with pytest.raises(store.DiskFull, match=r"^disk full: 3 rows kept in .*f\.h5\.tmp; free space and rerun$"):
        w.append("train", np.ones((1, 4), np.float32), np.array([0]), ["r3"], seen=1)
    w.close()  # after a failed commit: nothing more is written, no error
    before = tmp_path_for(path).read_bytes()
    with pytest.raises(store.DiskFull, match="disk full: 3 rows kept"):  # no room to resume either: kept as is
        _commits(path, 0)
    assert tmp_path_for(path).read_bytes() == before
    assert not tmp_path_for(path).with_name("f.h5.tmp.resume").exists()
    monkeypatch.undo()
    again = _commits(path, 0)
    assert again.seen("train") == 3 and again.rows("train") == 3


def test_a_failed_write_is_fatal_for_its_commit_and_the_counters_stay(tmp_path: Path, monkeypatch) -> None:
    """The error comes from inside HDF5's write: the counters on disk still describe the last good commit."""
    path = tmp_path / "f.h5"
    w = _commits(path, 2)
    real = FeatureWriter._write_rows

    def failing(g, at, blocks):
        real(g, at, blocks)  # the rows are half on their way when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureWriter, "_write_rows", staticmethod(failing))
    with pytest.raises(store.DiskFull, match="^disk full: 2 rows kept in"):
        w.append("train", np.ones((1, 4), np.float32), np.array([0]), ["r2"], seen=1)
    w.close()
    monkeypatch.undo()
    with h5py.File(tmp_path_for(path)) as f:
        assert f["train"].attrs["n_rows"] == 2 and f["train"].attrs["n_seen"] == 2
    again = _commits(path, 0)
    assert again.seen("train") == 2
    for i in range(2, 10):
        again.append("train", np.full((1, 4), i, np.float32), np.array([i % 2]), [f"r{i}"], seen=1)
    again.finish()
    got = read_features(path, splits=("train",)).train
    assert got.features[:, 0].tolist() == list(range(10)) and list(got.ids) == [f"r{i}" for i in range(10)]


_FSIZE = """
import resource, signal, sys
import numpy as np
from pathlib import Path
from pipeline.errors import PipelineError
from pipeline.store import FeatureWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead of killing us
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
meta = {"fingerprint": "fp", "feature_dim": 256}
w = FeatureWriter(Path(sys.argv[1]), meta=meta, classes=["a", "b"], sizes={"train": 4000}, feature_dim=256,
                  flush_every=1)
try:
    for i in range(40):
        w.append("train", np.full((100, 256), i, np.float32), np.arange(100) % 2, [str(i)] * 100, seen=100)
    w.finish()
except PipelineError as e:
    print(e)
    sys.exit(1)
"""


@pytest.mark.parametrize("limit", [200_000, 1_500_000])
def test_a_file_size_limit_is_a_full_disk_and_the_rows_before_it_resume(tmp_path: Path, limit: int) -> None:
    """``ulimit -f`` in a real process: HDF5's writes would fail with EFBIG (and h5py crashed at exit after one
    failed flush); the space check stops before that, says so in one line, and the rows kept resume."""
    path = tmp_path / "f.h5"
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE, str(path), str(limit)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("disk full: ") and line.endswith(f"rows kept in {path}.tmp; free space and rerun"), line
    kept = int(line.split()[2])
    assert kept % 100 == 0 and (kept > 0) == (limit > 1_000_000)
    again = FeatureWriter(
        path, meta={"fingerprint": "fp", "feature_dim": 256}, classes=["a", "b"], sizes={"train": 4000}, feature_dim=256
    )
    assert again.rows("train") == kept
    for i in range(kept // 100, 40):
        again.append("train", np.full((100, 256), i, np.float32), np.arange(100) % 2, [str(i)] * 100, seen=100)
    again.finish()
    got = read_features(path, splits=("train",)).train.features
    assert np.array_equal(got[::100, 0], np.arange(40, dtype=np.float32))


def test_an_output_name_too_long_for_its_companions_is_refused_up_front(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 248 + ".h5")
    with pytest.raises(PipelineError, match="too long.*shorter --out"):
        FeatureWriter(path, meta={"fingerprint": "fp"}, classes=["a", "b"], sizes={"train": 1}, feature_dim=2)
    assert list(tmp_path.iterdir()) == []
    ok = tmp_path / ("x" * 240 + ".h5")  # 240 + 3 + 11 (.tmp.resume) fits 255
    FeatureWriter(ok, meta={"fingerprint": "fp"}, classes=["a", "b"], sizes={"train": 1}, feature_dim=2).close()


def test_a_split_left_without_rows_is_refused_when_finishing(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    w = FeatureWriter(path, meta={"fingerprint": "fp"}, classes=["a", "b"], sizes={"train": 2, "val": 2}, feature_dim=2)
    w.append("train", np.ones((2, 2), np.float32), np.array([0, 1]), ["x", "y"], seen=2)
    w.append("val", np.zeros((0, 2), np.float32), np.zeros(0, np.int64), [], seen=2, skipped=["v1", "v2"])
    with pytest.raises(PipelineError, match="every one of the 2 val images was unreadable"):
        w.finish()
    assert not path.exists()


@pytest.mark.parametrize(
    ("text", "kind", "argument", "seed", "label"),
    [
        ("ResNet18_Weights.IMAGENET1K_V1", "torchvision", "IMAGENET1K_V1", 0, "ResNet18_Weights.IMAGENET1K_V1"),
        ("none(seed=7)", "none", "none", 7, "random init (seed=7)"),
        ("file:" + "ab" * 32, "file", None, 0, "w.pt (sha256 abababab)"),
    ],
)
def test_weights_identity_is_written_and_parsed_in_one_place(text, kind, argument, seed, label) -> None:
    identity = store.WeightsIdentity.parse(text)
    assert (identity.kind, identity.argument, identity.seed) == (kind, argument, seed)
    assert str(identity) == text and identity.label("some/dir/w.pt") == label


@pytest.mark.parametrize("text", ["", "none(seed=x)", "file:", "IMAGENET1K_V1"])
def test_an_unknown_weights_identity_is_one_line(text: str) -> None:
    with pytest.raises(PipelineError, match="cannot tell which backbone weights"):
        store.WeightsIdentity.parse(text)
