"""Regression targets (issue 18 item 1): extract --targets, the ridge head, linear/mlp with squared error,
regression metrics, plots and compare. Tiny data, no downloads."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import Source, array_split
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage1.targets import TargetTable, match_targets, read_targets_csv
from pipeline.stage2.evaluate import regression_metrics
from pipeline.stage2.heads import HEADS, HeadConfig, build_head, load_head
from pipeline.stage2.tasks import TASKS, with_task
from pipeline.stage2.train import compare, fit_and_evaluate, parse_heads, sweep, train_head
from pipeline.store import FeatureWriter, read_features, read_meta
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run

FAST = {"device": "cpu", "epochs": 60, "lr": 1e-2}


def linear_data(*, n: int = 600, dim: int = 16, targets: int = 2, noise: float = 0.01, seed: int = 0):
    """Features and targets ``y = X @ w + b + noise``, in units far from 0 and 1 (offset 100, scale ~50)."""
    rng = np.random.default_rng(seed)
    X = (rng.normal(0, 2, (n, dim)) + 3).astype(np.float32)
    w = rng.normal(0, 10, (dim, targets))
    Y = X @ w + 100 + noise * rng.normal(size=(n, targets))
    return X, Y.astype(np.float32), w


def write_regression_file(path: Path, *, n_train: int = 400, n_val: int = 200, noise: float = 0.01) -> Path:
    """A complete feature file with two regression targets, written through the one writer."""
    X, Y, _ = linear_data(n=n_train + n_val, noise=noise)
    sizes = {"train": n_train, "val": n_val}
    meta = {"fingerprint": "synthetic-regress", "backbone": "synthetic", "weights": "none", "feature_dim": X.shape[1],
            "num_classes": 2, "dataset": "synthetic"}  # fmt: skip
    writer = FeatureWriter(path, meta=meta, classes=["a", "b"], sizes=sizes, feature_dim=X.shape[1])
    values = {}
    for split, rows in (("train", slice(0, n_train)), ("val", slice(n_train, None))):
        ids = [str(i) for i in range(sizes[split])]
        writer.append(split, X[rows], np.arange(sizes[split]) % 2, ids, seen=sizes[split])
        values |= {f"{split}/{i}": y for i, y in zip(ids, Y[rows].astype(np.float64))}
    table = TargetTable(names=("height", "weight"), values=values, source="t.csv", sha256="0" * 64, by_split=True)
    writer.finish(targets=table)
    return path


# ------------------------------------------------------------------------------------------ heads


def test_ridge_recovers_linear_targets() -> None:
    X, Y, w = linear_data()
    head = build_head(HeadConfig(head="ridge", task="regress", alpha=1e-3, device="cpu"), num_classes=2,
                      feature_dim=16)  # fmt: skip
    head.fit(X[:400], Y[:400])
    pred = head.logits(X[400:])
    r2 = regression_metrics(Y[400:], pred, ["a", "b"])["r2"]
    assert r2 > 0.99
    np.testing.assert_allclose(head.weight.T, w, atol=0.01 * np.abs(w).max())


def test_ridge_sweep_chooses_alpha_on_held_out_train() -> None:
    X, Y, _ = linear_data(n=300)
    head = build_head(HeadConfig(head="ridge", task="regress", sweep=True, device="cpu"), num_classes=2, feature_dim=16)
    cfg, record = sweep(head, X, Y, task=TASKS["regress"])
    assert record["metric"] == "R^2" and len(record["held_out_r2"]) == len(record["grid"])
    assert record["n_held_out"] == 60 and record["n_fit"] == 240
    assert cfg.alpha == record["chosen"]["alpha"] <= 1.0  # almost no noise: little shrinkage wins
    assert record["chosen_score"] == max(record["held_out_r2"]) > 0.99


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_linear_and_mlp_regress_in_the_targets_units(name: str) -> None:
    X, Y, _ = linear_data()
    extra = {"dropout": 0.0, "hidden": 64, "lr": 3e-3} if name == "mlp" else {}
    extra["standardize"] = True  # both scalings (features in, targets out) folded into the saved layers
    head = build_head(HeadConfig(head=name, task="regress", **{**FAST, **extra}), num_classes=2, feature_dim=16)
    fit = head.fit(X[:400], Y[:400], val=(X[400:], Y[400:]))
    pred = head.logits(X[400:])
    assert regression_metrics(Y[400:], pred, ["a", "b"])["r2"] > 0.95
    assert abs(pred.mean() - Y[400:].mean()) < 0.1 * Y.std()  # outputs unscaled back to the targets' units
    assert {"train_loss", "train_r2", "val_loss", "val_r2"} <= set(fit.history[-1])
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]


@pytest.mark.parametrize("name", ["logreg", "knn", "centroid"])
def test_classifying_heads_refuse_regression_in_one_line(name: str, tmp_path: Path) -> None:
    meta = read_meta(write_regression_file(tmp_path / "r.h5"))
    with pytest.raises(PipelineError, match=f"the {name} head classifies labels only") as e:
        with_task(HeadConfig(head=name), meta)
    assert "\n" not in str(e.value)


def test_regression_metrics_by_hand() -> None:
    y = np.array([[0.0], [1.0], [2.0], [3.0]])
    m = regression_metrics(y, np.array([[0.0], [1.0], [2.0], [4.0]]), ["t"])
    assert m["mse"] == pytest.approx(0.25) and m["mae"] == pytest.approx(0.25) and m["rmse"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 1 / 5)  # SSE 1, SST 5
    assert m["per_target"][0]["target"] == "t"


def test_all_heads_by_task() -> None:
    assert "ridge" not in parse_heads("all")  # classification compares the heads it always did
    assert parse_heads("all", task="regress") == [n for n in HEADS if n in ("linear", "mlp", "ridge")]


# ------------------------------------------------------------------------------------------ stage two on a file


def test_read_features_fills_and_validates_targets(tmp_path: Path) -> None:
    path = write_regression_file(tmp_path / "r.h5")
    fs = read_features(path)
    assert fs.train.targets.shape == (400, 2) and fs.val.targets.dtype == np.float32
    assert fs.meta.targets["names"] == ["height", "weight"]
    with h5py.File(path, "a") as f:
        f["val"]["targets"][3, 1] = np.nan
    with pytest.raises(PipelineError, match="NaN or Inf in 1 rows"):
        read_features(path)


def test_train_head_ridge_sweep_writes_regression_outputs(tmp_path: Path) -> None:
    path = write_regression_file(tmp_path / "r.h5")
    metrics = train_head(path, HeadConfig(head="ridge", sweep=True, device="cpu"), out=tmp_path / "ridge")
    assert metrics["task"] == "regress" and metrics["val_r2"] > 0.99
    assert [p["target"] for p in metrics["per_target"]] == ["height", "weight"]
    saved = json.loads((tmp_path / "ridge" / "metrics.json").read_text())
    assert {"val_rmse", "val_mae", "train_r2", "train_val_gap"} <= set(saved) and "val_accuracy" not in saved
    assert (tmp_path / "ridge" / "regression.png").stat().st_size > 0
    assert not (tmp_path / "ridge" / "confusion.png").exists()
    head, config = load_head(tmp_path / "ridge")  # round trip: the saved head predicts what the trained one did
    fs = read_features(path)
    assert config["targets"] == ["height", "weight"]
    assert regression_metrics(fs.val.targets, head.logits(fs.val.features), config["targets"])["r2"] == pytest.approx(
        metrics["val_r2"], abs=1e-5
    )


def test_compare_on_a_regression_file_sorts_by_val_r2(tmp_path: Path) -> None:
    path = write_regression_file(tmp_path / "r.h5", noise=5.0)
    base = HeadConfig(head="ridge", **FAST)
    result = compare(path, heads=parse_heads("all", task="regress"), base=base, out=tmp_path / "cmp")
    r2 = [row["val_r2"] for row in result["rows"]]
    assert sorted(row["head"] for row in result["rows"]) == ["linear", "mlp", "ridge"]
    assert r2 == sorted(r2, reverse=True) and result["best"] == result["rows"][0]["head"]
    assert result["best_by"] == "val_r2"
    assert "| val R^2 | 95% interval | tied | val RMSE | val MAE |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert all(len(row["val_r2_interval"]) == 2 for row in result["rows"])  # the bootstrap interval of each
    with pytest.raises(PipelineError, match="knn head classifies"):
        compare(path, heads=["ridge", "knn"], base=base, out=tmp_path / "cmp2")
    assert not (tmp_path / "cmp2").exists()  # refused before anything was trained or written


def test_task_classify_ignores_the_targets(tmp_path: Path) -> None:
    fs = read_features(write_regression_file(tmp_path / "r.h5"))

    _, metrics, _ = fit_and_evaluate(fs, HeadConfig(head="centroid", task="classify"))
    assert "val_accuracy" in metrics and "val_r2" not in metrics
    _, metrics, _ = fit_and_evaluate(fs, replace(HeadConfig(head="ridge", device="cpu"), task="regress"))
    assert metrics["val_r2"] > 0.99


# ------------------------------------------------------------------------------------------ extract --targets


def image_ids(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "id,ink,size") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def targets_of(ids: list[str], offset: float = 0.0) -> dict[str, tuple[float, float]]:
    return {i: (k + offset, 2.0 * k) for k, i in enumerate(ids)}


def csv_for(path: Path, values: dict[str, tuple[float, float]]) -> Path:
    return write_csv(path, [(i, str(a), str(b)) for i, (a, b) in values.items()])


def test_extract_stores_targets_aligned_with_ids(image_folder: Path, tmp_path: Path) -> None:
    values = targets_of(image_ids(image_folder))
    csv = csv_for(tmp_path / "t.csv", values)
    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "f.h5"), targets=str(csv), **TINY_EXTRACT)
    extract(cfg)
    fs = read_features(tmp_path / "f.h5")
    assert fs.meta.targets["names"] == ["ink", "size"] and fs.meta.targets["source"] == "t.csv"
    for split in fs.splits.values():  # the stratified split reorders the images: each row keeps its own target
        np.testing.assert_array_equal(split.targets, np.array([values[i] for i in split.ids], np.float32))
    assert len(fs.train) + len(fs.val) == 18


def test_changed_csv_is_reattached_without_running_the_backbone(image_folder: Path, tmp_path: Path) -> None:
    ids = image_ids(image_folder)
    csv = csv_for(tmp_path / "t.csv", targets_of(ids))
    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "f.h5"), targets=str(csv), **TINY_EXTRACT)
    extract(cfg)
    before = read_features(tmp_path / "f.h5")
    fixed = targets_of(ids, offset=100.0)  # a typo fixed: other values, same images
    csv_for(csv, fixed)
    result = extract(cfg)
    assert result.reused and any("did not run again" in note for note in result.notes)
    after = read_features(tmp_path / "f.h5")
    np.testing.assert_array_equal(after.train.features, before.train.features)
    assert after.meta.fingerprint == before.meta.fingerprint
    assert after.meta.extract_seconds == before.meta.extract_seconds  # the same extraction
    np.testing.assert_array_equal(after.train.targets, np.array([fixed[i] for i in after.train.ids], np.float32))
    assert after.meta.targets["sha256"] != before.meta.targets["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "images", "t.csv"]  # no temporary left
    assert extract(cfg).notes == []  # now up to date: nothing to do
    extract(replace(cfg, targets=None))  # the same command without --targets: the file matches it again
    assert read_features(tmp_path / "f.h5").train.targets is None


def test_skip_missing_targets_leaves_images_out(image_folder: Path, tmp_path: Path, capsys) -> None:
    ids = image_ids(image_folder)
    values = targets_of(ids[3:])  # bird/000..002.png have no row
    csv = csv_for(tmp_path / "t.csv", values)
    out = tmp_path / "f.h5"
    code, stdout, _ = run(["extract", "--dataset", str(image_folder), "--out", str(out), "--targets", str(csv),
                           "--skip-missing-targets", *TINY_ARGS], capsys)  # fmt: skip
    assert code == 0 and "left out 3 images without a target in t.csv" in stdout
    fs = read_features(out)
    stored = [i for s in fs.splits.values() for i in s.ids]
    assert len(stored) == 15 and not set(stored) & set(ids[:3])
    np.testing.assert_array_equal(fs.val.targets, np.array([values[i] for i in fs.val.ids], np.float32))
    whole = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "g.h5"), **TINY_EXTRACT)
    assert read_meta(out).fingerprint != extract(whole).fingerprint  # which images it holds is in the fingerprint


@pytest.mark.parametrize(
    ("rows", "header", "fragment"),
    [
        ("unknown", "id,ink,size", "2 ids match no image (nope.png, cat/999.png)"),
        ("missing", "id,ink,size", "3 images have no target in t.csv"),
        ("text", "id,ink,size", "1 values are empty, not numbers or not finite (line 2 ink 'dark')"),
        ("empty", "id,ink,size", "values are empty, not numbers or not finite (line 3 size '')"),
        ("inf", "id,ink,size", "values are empty, not numbers or not finite (line 2 ink 'inf')"),
        ("duplicate", "id,ink,size", "1 ids appear more than once (cat/000.png)"),
        ("all", "name,ink", "the header must be id, then one name per target column"),
    ],
)
def test_bad_csv_is_one_line_before_any_extraction(
    rows: str, header: str, fragment: str, image_folder: Path, tmp_path: Path, capsys
) -> None:
    ids = image_ids(image_folder)
    body = [(i, str(k), "1.5") for k, i in enumerate(ids)]
    body = {
        "unknown": [*body, ("nope.png", "1", "2"), ("cat/999.png", "1", "2")],
        "missing": body[3:],
        "text": [(body[0][0], "dark", "1"), *body[1:]],
        "empty": [body[0], (body[1][0], "1", ""), *body[2:]],
        "inf": [(body[0][0], "inf", "1"), *body[1:]],
        "duplicate": [*body, ("cat/000.png", "1", "1")],
        "all": body,
    }[rows]
    csv = write_csv(tmp_path / "t.csv", body, header=header)
    out = tmp_path / "out" / "f.h5"
    code, _, err = run(["extract", "--dataset", str(image_folder), "--out", str(out), "--targets", str(csv),
                        *TINY_ARGS], capsys)  # fmt: skip
    assert code == 1
    assert_one_line_error(code, err, fragment)
    assert not out.parent.exists()  # nothing written: no .tmp, no lock, no folder


def test_csv_checks_run_before_the_backbone_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pipeline.stage1.extract as ex

    def no_backbone(*a: object, **k: object) -> None:
        raise AssertionError("the backbone was loaded before the CSV was checked")

    monkeypatch.setattr(ex, "load_backbone", no_backbone)
    csv = write_csv(tmp_path / "t.csv", [("a.png", "x", "1")])
    with pytest.raises(PipelineError, match="not numbers"):
        ex.plan_extraction(ExtractConfig(dataset="cifar10", targets=str(csv), download=False))


def test_skip_flag_without_targets_is_a_usage_error(image_folder: Path, capsys) -> None:
    code, _, err = run(["extract", "--dataset", str(image_folder), "--skip-missing-targets", *TINY_ARGS], capsys)
    assert code == 2 and "--skip-missing-targets needs --targets" in err


def test_ids_shared_by_splits_are_prefixed_by_their_split() -> None:
    """A torchvision dataset numbers both splits from 0: its CSV says train/0, val/0."""
    images = np.zeros((4, 8, 8), np.uint8)
    source = Source("arrays", ["a", "b"], {"train": array_split(images, [0, 1, 0, 1]),
                                           "val": array_split(images[:2], [0, 1])})  # fmt: skip
    rows = {f"train/{i}": np.array([float(i)]) for i in range(4)} | {f"val/{i}": np.array([10.0 + i]) for i in range(2)}
    table, _, skipped = match_targets(TargetTable(("t",), rows, "t.csv", ""), source, skip_missing=False)
    assert table.by_split and not skipped
    np.testing.assert_array_equal(table.lookup("val", ["1", "0"])[:, 0], [11.0, 10.0])
    bare = {str(i): np.array([1.0]) for i in range(4)}
    with pytest.raises(PipelineError, match=r"4 ids match no image \(0, 1, 2, 3\).*the split, then the dataset index"):
        match_targets(TargetTable(("t",), bare, "t.csv", ""), source, skip_missing=False)


def test_read_targets_csv_takes_a_spreadsheet_export(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffid,score\r\na.png,1.5\r\nb.png,-2e3\r\n\r\n".encode())
    table = read_targets_csv(path)
    assert table.names == ("score",) and table.values["b.png"][0] == -2000.0 and len(table.sha256) == 64


# ------------------------------------------------------------------------------------------ command line


def test_cli_regression_smoke(image_folder: Path, tmp_path: Path, capsys) -> None:
    csv = csv_for(tmp_path / "t.csv", targets_of(image_ids(image_folder)))
    out = tmp_path / "f.h5"
    code, _, _ = run(["extract", "--dataset", str(image_folder), "--out", str(out), "--targets", str(csv),
                      *TINY_ARGS], capsys)  # fmt: skip
    assert code == 0
    code, stdout, _ = run(["inspect", str(out)], capsys)
    assert code == 0 and "targets        ink, size (from t.csv, sha256 " in stdout
    code, stdout, _ = run(["train-head", "--features", str(out), "--head", "ridge", "--sweep", "--out",
                           str(tmp_path / "ridge")], capsys)  # fmt: skip
    assert code == 0 and "val   R^2" in stdout and "regression.png" in stdout
    assert re.search(r"sweep: (chose|kept the defaults) alpha", stdout)
    code, stdout, _ = run(["compare", "--features", str(out), "--epochs", "3", "--device", "cpu", "--out",
                           str(tmp_path / "cmp")], capsys)  # fmt: skip
    assert code == 0 and "| head | val R^2 |" in stdout and "logreg" not in stdout
    code, _, err = run(["train-head", "--features", str(out), "--head", "knn"], capsys)
    assert_one_line_error(code, err, "the knn head classifies labels only")
    code, stdout, _ = run(["export", "--head", str(tmp_path / "ridge"), "--out", str(tmp_path / "m.pt2")], capsys)
    assert code == 0 and "regression of ink, size" in stdout  # export and predict: tests/test_export_regress.py
    assert (tmp_path / "m.pt2").exists()


def test_shards_merged_keep_their_targets(image_folder: Path, tmp_path: Path) -> None:
    """torchrun: each rank's shard and the merged file get the targets, aligned with the merged rows."""
    from pipeline.stage1.distributed import extract_shard, merge_shards
    from pipeline.stage1.extract import plan_extraction

    values = targets_of(image_ids(image_folder))
    csv = csv_for(tmp_path / "t.csv", values)
    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "f.h5"), targets=str(csv), **TINY_EXTRACT)
    plan = plan_extraction(cfg)
    for rank in range(2):
        extract_shard(cfg, plan=plan, rank=rank, world=2)
    merge_shards(cfg, plan=plan, world=2)
    fs = read_features(tmp_path / "f.h5")
    for split in fs.splits.values():
        np.testing.assert_array_equal(split.targets, np.array([values[i] for i in split.ids], np.float32))


def test_a_limit_sample_ignores_the_rows_of_other_images(image_folder: Path, tmp_path: Path) -> None:
    values = targets_of(image_ids(image_folder))  # the whole dataset's CSV; --limit extracts a sample of it
    csv = csv_for(tmp_path / "t.csv", values)
    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "f.h5"), targets=str(csv), limit=4,
                        **TINY_EXTRACT)  # fmt: skip
    extract(cfg)
    fs = read_features(tmp_path / "f.h5")
    assert len(fs.train) == 4
    np.testing.assert_array_equal(fs.train.targets, np.array([values[i] for i in fs.train.ids], np.float32))


def test_task_regress_needs_targets(feature_file: Path, capsys) -> None:
    code, _, err = run(["train-head", "--features", str(feature_file), "--task", "regress"], capsys)
    assert_one_line_error(code, err, "--task regress: this feature file holds no targets")
