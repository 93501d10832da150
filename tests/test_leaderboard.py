"""compare --features A --features B: one sorted table across files; files of other images refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.leaderboard import leaderboard
from pipeline.store import FeatureWriter
from tests.conftest import run, separable_features, write_feature_file


def _file(path: Path, *, identity: dict, seed: int = 0, scale: float = 1.0) -> Path:
    X, y = separable_features(n=300, dim=16, classes=3, seed=seed, spread=1.0)
    X = X * scale
    meta = {"fingerprint": f"f-{path.stem}", "backbone": "synthetic", "weights": "none", "feature_dim": 16,
            "num_classes": 3, "dataset": "shapes", "preprocessing": {"crop_size": 32, "resize": "full"},
            "dataset_identity": identity}  # fmt: skip
    w = FeatureWriter(path, meta=meta, classes=["a", "b", "c"], sizes={"train": 200, "val": 100}, feature_dim=16)
    w.append("train", X[:200], y[:200], [str(i) for i in range(200)], seen=200)
    w.append("val", X[200:], y[200:], [str(i) for i in range(100)], seen=100)
    w.finish()
    return path


def test_leaderboard_sorts_every_head_of_every_file(tmp_path: Path) -> None:
    same = {"kind": "folder", "root": "/a", "split": "stratified val_fraction=0.2 seed=0", "files_sha256": "x"}
    a = _file(tmp_path / "a.h5", identity=same)
    b = _file(tmp_path / "b.h5", identity={**same, "root": "/elsewhere"}, seed=1)  # moved, same images
    base = HeadConfig(head="logreg", device="cpu")
    result = leaderboard([a, b], heads=["logreg", "centroid"], base=base, out=tmp_path / "lb")
    vals = [r["val"] for r in result["rows"]]
    assert len(vals) == 4 and vals == sorted(vals, reverse=True)
    assert {r["features"] for r in result["rows"]} == {str(a), str(b)} and result["rows"][0]["image"] == "32 px full"
    assert all(len(r["interval"]) == 2 for r in result["rows"])
    assert (tmp_path / "lb" / "leaderboard.png").is_file() and (tmp_path / "lb" / "leaderboard.md").is_file()


def test_leaderboard_refuses_files_of_another_dataset_or_split(tmp_path: Path, capsys) -> None:
    one = {"kind": "folder", "root": "/a", "split": "stratified val_fraction=0.2 seed=0", "files_sha256": "x"}
    a = _file(tmp_path / "a.h5", identity=one)
    b = _file(tmp_path / "b.h5", identity={**one, "split": "stratified val_fraction=0.2 seed=1"})
    with pytest.raises(PipelineError, match="another dataset or split.*split differ"):
        leaderboard([a, b], heads=["centroid"], base=HeadConfig(head="centroid"), out=tmp_path / "lb")
    assert not (tmp_path / "lb").exists()  # refused before any training
    c = write_feature_file(tmp_path / "c.h5")
    code, _, err = run(["compare", "--features", str(a), "--features", str(c), "--heads", "centroid",
                        "--out", str(tmp_path / "cli")], capsys)  # fmt: skip
    assert code == 1 and "another dataset or split" in err and len(err.strip().splitlines()) == 1


def test_the_same_file_twice_is_refused(tmp_path: Path, capsys) -> None:
    one = {"kind": "folder", "root": "/a", "split": "stratified val_fraction=0.2 seed=0", "files_sha256": "x"}
    a = _file(tmp_path / "a.h5", identity=one)
    code, _, err = run(["compare", "--features", str(a), "--features", str(tmp_path / "." / "a.h5"),
                        "--heads", "centroid", "--out", str(tmp_path / "cli")], capsys)  # fmt: skip
    assert code == 1 and "given twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_layers_files_get_readable_default_names() -> None:
    from types import SimpleNamespace

    from pipeline.stage1.extract import _outputs_suffix, short_layer_name

    assert short_layer_name("features.14.conv.2") == "f14c2"
    five = [f"features.{i}" for i in (3, 7, 10, 14, 17)]
    (name,) = _outputs_suffix(SimpleNamespace(layer_list=five, cache_at=None))
    assert name.startswith("Lf3+f7+f10+f14+f17_")  # readable, plus a short hash of the full names
    many = [f"features.{i}.conv.1.0" for i in range(1, 18)]
    (name,) = _outputs_suffix(SimpleNamespace(layer_list=many, cache_at=None))
    assert name.startswith("Lf1c10..f17c10_17_") and len(name) < 40


def test_rows_name_the_layer_and_its_width_and_warn_of_unstandardised_features(tmp_path: Path, capsys) -> None:
    """A file without --layers is the backbone's 'final' features; the concatenation of a --layers file names its
    layers; each row has its feature width. compare's standardize warning reaches the leaderboard's output."""
    from pipeline.stage2.comparing import layer_shown

    assert layer_shown(None, []) == "final" and layer_shown("features.7", ["features.7", "f.9"]) == "features.7"
    assert layer_shown("all", ["features.7", "f.9"]) == "all (features.7+f.9)"
    assert layer_shown(None, [f"features.{i}" for i in range(10)]) == "all (10 layers)"
    same = {"kind": "folder", "root": "/a", "split": "stratified val_fraction=0.2 seed=0", "files_sha256": "x"}
    a = _file(tmp_path / "a.h5", identity=same)
    b = _file(tmp_path / "b.h5", identity=same, seed=1, scale=1e-4)  # a tiny raw scale: Adam's lr does not suit it
    code, out, _ = run(["compare", "--features", str(a), "--features", str(b), "--heads", "logreg,linear",
                        "--out", str(tmp_path / "lb")], capsys)  # fmt: skip
    assert code == 0
    result = __import__("json").loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert {r["layer"] for r in result["rows"]} == {"final"} and {r["feature_dim"] for r in result["rows"]} == {16}
    assert "| layer | dim |" in out
    assert len(result["notes"]) == 1 and "b.h5 final" in result["notes"][0] and "a.h5" not in result["notes"][0]
    assert "WARNING: linear or mlp trail logreg" in out and "--standardize" in out
