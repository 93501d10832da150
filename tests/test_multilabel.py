"""Several labels per image (issue 26 item 4): the metrics against scikit-learn, the multi-hot matrix in the feature
file, and end to end on real images: 2x2 mosaics of the committed digits, each labelled with the digits it shows,
through the real ImageNet MobileNetV2 -> every multi-label head -> export -> predict, whose decisions equal the
trained head's on the same images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

from pipeline.bench.mosaics import write_mosaics
from pipeline.errors import PipelineError
from pipeline.stage2.multilabel import (
    choose_thresholds,
    decide,
    mean_average_precision,
    multilabel_metrics,
)
from pipeline.stage2.stats import LabelRanking
from tests.conftest import assert_one_line_error, run

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "artifacts/weights/mobilenet_v2_imagenet.pt"


# ------------------------------------------------------------------------------------------ metrics (no torch)


def test_metrics_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.7, 0.05, 0.4]).astype(np.uint8)
    proba = np.clip(0.35 * y + rng.random(y.shape) * 0.7, 0, 1)
    proba[:40, 1] = 0.5  # ties: one threshold for the tied rows, as scikit-learn counts them
    proba = np.round(proba, 2)  # more ties
    aps = LabelRanking(y, proba).aps()
    for j in range(y.shape[1]):
        assert aps[j] == pytest.approx(average_precision_score(y[:, j], proba[:, j]))
    assert mean_average_precision(y, proba) == pytest.approx(average_precision_score(y, proba, average="macro"))
    thresholds = [0.5, 0.4, 0.6, 0.5, 0.3, 0.55]
    m = multilabel_metrics(y, proba, list("abcdef"), thresholds=thresholds)
    pred = decide(proba, thresholds)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    per = f1_score(y, pred, average=None, zero_division=0)
    assert [p["f1"] for p in m["per_label"]] == pytest.approx(per)
    assert [p["support"] for p in m["per_label"]] == y.sum(0).tolist()


def test_a_label_without_positives_is_left_out_of_map() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0]])
    proba = np.array([[0.9, 0.2], [0.1, 0.8], [0.8, 0.1]])
    assert np.isnan(LabelRanking(y, proba).aps()[1])  # scikit-learn's AP of a label with no positive: undefined
    assert mean_average_precision(y, proba) == pytest.approx(1.0)


def test_thresholds_maximise_each_labels_f1() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.3).astype(np.uint8)
    proba = np.round(np.clip(0.3 * y + rng.random(y.shape) * 0.8, 0, 1), 3)
    chosen = choose_thresholds(y, proba)
    for j in range(3):
        best = max(f1_score(y[:, j], proba[:, j] >= t, zero_division=0) for t in np.unique(proba[:, j]))
        got = f1_score(y[:, j], proba[:, j] >= chosen[j], zero_division=0)
        assert got == pytest.approx(best) and got > f1_score(y[:, j], proba[:, j] >= 0.99, zero_division=0)


def _two_heads(n: int = 300, labels: int = 5, *, seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth and two heads' probabilities, rounded so that scores tie (knn's vote shares do)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.3).astype(np.uint8)
    a = np.round(np.clip(0.4 * y + rng.random(y.shape) * 0.7, 0, 1), 2)
    b = np.round(np.clip(0.4 * y + rng.random(y.shape) * 0.7, 0, 1), 2)
    return y, a, b


def test_weighted_ap_is_the_ap_of_the_resampled_images() -> None:
    """The bootstrap's mAP of a resample (counts per image as weights, one sort) is the mAP of the resampled rows,
    so the intervals and the tie test are stats.bootstrap_interval's and stats.paired_bootstrap's, only faster."""
    from pipeline.stage2 import stats
    from pipeline.stage2.multilabel import map_p_value, multilabel_intervals

    y, a, b = _two_heads()
    ranking = LabelRanking(y, a)
    rng = np.random.default_rng(7)
    for _ in range(5):
        rows = rng.integers(0, len(y), len(y))
        counts = np.bincount(rows, minlength=len(y)).astype(float)
        assert ranking.map(counts) == pytest.approx(mean_average_precision(y[rows], a[rows]), abs=1e-12)
        assert ranking.map(counts) == pytest.approx(average_precision_score(y[rows], a[rows], average="macro"))
    plain = stats.paired_bootstrap(y, a, b, metric=mean_average_precision, resamples=stats.BOOTSTRAP_MAP, seed=3)
    assert map_p_value(y, a, b, seed=3) == pytest.approx(plain)
    interval = stats.bootstrap_interval(lambda r: mean_average_precision(y[r], a[r]), len(y),
                                        resamples=stats.BOOTSTRAP_MAP, seed=3)  # fmt: skip
    assert multilabel_intervals(y, a, [0.5] * 5, seed=3)["val_map_interval"] == pytest.approx(list(interval))


def test_intervals_hold_the_val_scores_and_a_better_head_is_not_tied() -> None:
    from pipeline.stage2.multilabel import map_p_value, multilabel_intervals

    y, a, b = _two_heads(n=400)
    thresholds = [0.5, 0.45, 0.55, 0.5, 0.6]
    m = multilabel_metrics(y, a, list("abcde"), thresholds=thresholds)
    got = multilabel_intervals(y, a, thresholds)
    for key in ("map", "micro_f1", "macro_f1"):
        lo, hi = got[f"val_{key}_interval"]
        assert lo < m[key] < hi and hi - lo < 0.15, (key, lo, m[key], hi)
    rng = np.random.default_rng(9)
    worse = np.round(np.clip(0.15 * y + rng.random(y.shape) * 0.7, 0, 1), 2)  # a weaker signal: a lower mAP
    assert mean_average_precision(y, worse) < mean_average_precision(y, a) - 0.1
    assert map_p_value(y, a, worse) < 0.05  # a real difference
    assert map_p_value(y, a, b) >= 0.05  # the same kind of head with other noise: tied
    assert map_p_value(y, a, a) == 1.0


def test_predictions_rows_hold_label_sets_probabilities_and_the_summed_cross_entropy(tmp_path: Path) -> None:
    from sklearn.metrics import log_loss

    from pipeline.stage2 import answers

    y, a, _ = _two_heads(n=6, labels=3)
    y[0] = 0  # an image with no label: an empty cell
    thresholds = [0.5, 0.3, 0.7]
    rows = answers.multilabel_rows([f"x{i}.png" for i in range(6)], y, a, ["cat", "id", "loss"],
                                   thresholds=thresholds)  # fmt: skip
    assert list(rows[0]) == ["id", "true", "predicted", "loss", "p_cat", "p_id", "p_loss"]  # no label overwrites
    for r, truth, p, on in zip(rows, y, a, decide(a, thresholds)):
        assert r["true"] == ";".join(n for n, t in zip(["cat", "id", "loss"], truth) if t)
        assert r["predicted"] == ";".join(n for n, t in zip(["cat", "id", "loss"], on) if t)
        assert [r["p_cat"], r["p_id"], r["p_loss"]] == pytest.approx(p.tolist())
        bce = sum(log_loss([t], [q], labels=[0, 1]) for t, q in zip(truth, p))
        assert r["loss"] == pytest.approx(bce, rel=1e-6)
    answers.write_predictions(tmp_path / "p.csv", rows)
    labels, proba, truth = answers.label_sets(answers.read_predictions(tmp_path / "p.csv"))
    assert labels == ["cat", "id", "loss"] and (truth == y.astype(bool)).all() and proba == pytest.approx(a)


# ------------------------------------------------------------------------------------------ the feature file


def _write_multi(path: Path, *, order: list[int]) -> None:
    from pipeline.store import FeatureWriter, MultiHot

    ids = [f"i{k}" for k in range(6)]
    matrix = np.eye(6, 3, dtype=np.uint8) | np.eye(6, 3, k=-3, dtype=np.uint8)
    matrix[0, 2] = 1
    w = FeatureWriter(path, meta={"fingerprint": "x", "feature_dim": 2, "num_classes": 3, "label_kind": "multi"},
                      classes=["a", "b", "c"], sizes={"train": 6, "val": 6}, feature_dim=2)  # fmt: skip
    for split in ("train", "val"):
        rows = [k for k in order]  # written in another order than the source's: stored by id
        w.append(split, np.array([[k, -k] for k in rows], np.float32), np.full(len(rows), -1), [ids[k] for k in rows],
                 seen=6, skipped=[ids[k] for k in range(6) if k not in rows])  # fmt: skip
    w.finish(multi_hot=MultiHot({s: (ids, matrix) for s in ("train", "val")}))
    return matrix


def test_the_multi_hot_matrix_is_stored_by_id_and_read_back(tmp_path: Path) -> None:
    from pipeline.store import read_features

    order = [4, 0, 5, 2]  # 1 and 3 skipped
    matrix = _write_multi(tmp_path / "m.h5", order=order)
    fs = read_features(tmp_path / "m.h5")
    assert fs.meta.label_kind == "multi" and fs.meta.schema_version == 3
    for split in (fs.train, fs.val):
        assert split.multi_hot.dtype == np.uint8
        assert split.multi_hot.tolist() == matrix[order].tolist()
        assert split.features[:, 0].tolist() == order


def test_the_matrix_follows_the_rows_of_a_resumed_file(tmp_path: Path) -> None:
    """Rows committed by a run that stopped, then the rest by the rerun that resumed it: the matrix written at
    finish is aligned with every stored row."""
    from pipeline.store import FeatureWriter, MultiHot, read_features

    ids = [f"i{k}" for k in range(8)]
    matrix = (np.arange(8)[:, None] >> np.arange(3)[None] & 1).astype(np.uint8)  # row k: the bits of k
    kw = dict(meta={"fingerprint": "x", "feature_dim": 1, "num_classes": 3, "label_kind": "multi"},
              classes=["a", "b", "c"], sizes={"train": 8, "val": 2}, feature_dim=1)  # fmt: skip

    def rows(split: str, a: int, b: int, w: FeatureWriter) -> None:
        w.append(split, np.arange(a, b, dtype=np.float32)[:, None], np.full(b - a, -1), ids[a:b], seen=b - a)

    first = FeatureWriter(tmp_path / "r.h5", **kw)
    rows("train", 0, 5, first)
    first.close()  # stopped: committed rows stay in the .tmp
    again = FeatureWriter(tmp_path / "r.h5", **kw)
    assert again.start["train"] == 5
    rows("train", 5, 8, again)
    rows("val", 0, 2, again)
    again.finish(multi_hot=MultiHot({"train": (ids, matrix), "val": (ids[:2], matrix[:2])}))
    fs = read_features(tmp_path / "r.h5")
    assert fs.train.features[:, 0].tolist() == list(range(8))
    assert fs.train.multi_hot.tolist() == matrix.tolist() and fs.val.multi_hot.tolist() == matrix[:2].tolist()


def test_a_multi_label_file_without_its_matrix_is_refused_in_one_line(tmp_path: Path) -> None:
    from pipeline.store import read_features

    _write_multi(tmp_path / "m.h5", order=[0, 1, 2])
    with h5py.File(tmp_path / "m.h5", "a") as f:
        del f["val/multi_hot"]
    with pytest.raises(PipelineError, match=r"/val/multi_hot is missing") as e:
        read_features(tmp_path / "m.h5")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ end to end, real images


@pytest.fixture(scope="module")
def mosaic_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, set[str]]]:
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} absent (created by the install)")
    from pipeline.stage1.extract import ExtractConfig, extract

    tmp = tmp_path_factory.mktemp("mosaics")
    truth = write_mosaics(tmp / "mos", n=400)
    cfg = ExtractConfig(dataset=str(tmp / "mos/labels.csv"), backbone="mobilenet_v2", weights=str(WEIGHTS),
                        image_size=64, out=str(tmp / "mos.h5"), progress=False)  # fmt: skip
    extract(cfg)
    return tmp, tmp / "mos.h5", truth


def test_mosaics_extract_as_a_multi_label_file(mosaic_features) -> None:
    from pipeline.store import read_features

    _, path, truth = mosaic_features
    fs = read_features(path)
    assert fs.meta.label_kind == "multi" and fs.classes == [str(d) for d in range(10)]
    for split in (fs.train, fs.val):
        assert (split.labels == -1).all()
        for i, row in zip(split.ids, split.multi_hot):
            assert {fs.classes[j] for j in np.flatnonzero(row)} == truth[Path(i).name]


def test_inspect_counts_images_per_label(mosaic_features, capsys) -> None:
    from pipeline.inspection import summarize
    from pipeline.store import read_features

    _, path, _ = mosaic_features
    fs = read_features(path)
    counts = summarize(path)["counts"]
    assert list(counts["train"].values()) == fs.train.multi_hot.sum(0).tolist()
    code, _, err = run(["inspect", str(path)], capsys)
    assert code == 0, err


def test_every_multi_label_head_trains_exports_and_predicts_its_decisions(mosaic_features, capsys) -> None:
    from pipeline.stage2.heads import HEADS, load_head
    from pipeline.stage2.multilabel import sigmoid
    from pipeline.store import read_features

    tmp, path, truth = mosaic_features
    fs = read_features(path)
    heads = [name for name, spec in HEADS.items() if "multilabel" in spec.tasks]
    assert {"linear", "mlp", "knn", "logreg", "centroid"} <= set(heads)
    val_paths = [str(tmp / "mos" / Path(i).name) for i in fs.val.ids]
    for head in heads:
        out = tmp / "heads" / head
        code, said, err = run(["train-head", "--features", str(path), "--head", head, "--out", str(out)], capsys)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        lo, hi = metrics["val_map_interval"]
        assert f"val 95% intervals (bootstrap over images): mAP [{lo:.4f}, {hi:.4f}]" in said
        chance = float(np.mean(fs.val.multi_hot.mean(0)))  # a constant score's AP is the label's frequency
        assert metrics["task"] == "multilabel" and metrics["val_map"] > chance + 0.15, (head, metrics["val_map"])
        # the report's decisions: the saved head on the cached val features at its recorded thresholds
        loaded, config = load_head(out)
        thresholds = np.array(config["thresholds"])
        assert thresholds.shape == (10,) and metrics["thresholds"] == pytest.approx(thresholds.tolist())
        proba = sigmoid(loaded.logits(fs.val.features))
        decided = decide(proba, thresholds)
        again = multilabel_metrics(fs.val.multi_hot, proba, fs.classes, thresholds=thresholds)
        assert again["micro_f1"] == pytest.approx(metrics["val_micro_f1"])
        assert again["map"] == pytest.approx(metrics["val_map"])

        model = tmp / "models" / f"{head}.pt2"
        code, _, err = run(["export", "--head", str(out), "--out", str(model)], capsys)
        if head == "knn":  # not a layer of a model: its report is checked above, export refuses it in one line
            assert_one_line_error(code, err, "cannot become a layer")
            continue
        assert code == 0, err
        record = json.loads(model.with_suffix(".json").read_text())
        assert record["task"] == "multilabel" and record["labels"] == fs.classes
        assert record["thresholds"] == pytest.approx(thresholds.tolist())
        csv_out = tmp / f"{head}.csv"
        code, _, err = run(["predict", "--model", str(model), *val_paths, "--out", str(csv_out)], capsys)
        assert code == 0, err
        with open(csv_out, newline="") as fh:
            rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
        assert len(rows) == len(val_paths)
        for i, p, d in zip(fs.val.ids, proba, decided):
            row = rows[Path(i).name]
            predicted = np.array([float(row[c]) for c in fs.classes])
            assert predicted == pytest.approx(p, abs=2e-3)  # the same images through the exported model
            near = np.abs(p - thresholds) < 2e-3  # a probability this close to its threshold may fall either side
            said = {c for c in row["labels"].split(";") if c}
            assert {fs.classes[j] for j in np.flatnonzero(d & ~near)} <= said
            assert said <= {fs.classes[j] for j in np.flatnonzero(d | near)}
        assert_predictions_csv_says_what_predict_says(out, rows, truth=truth, thresholds=thresholds)


def assert_predictions_csv_says_what_predict_says(
    head_dir: Path, live: dict[str, dict[str, str]], *, truth: dict[str, set[str]], thresholds: np.ndarray
) -> None:
    """train-head's predictions.csv (from the cached val features, no backbone run) says what ``predict`` says
    (``live``, its CSV's rows by file name) for the same images through the exported model: the same label sets
    (but for a probability within float32 rounding of its threshold) and the same probabilities."""
    from pipeline.stage2.answers import label_sets, read_predictions

    cached = read_predictions(head_dir / "predictions.csv")
    labels, proba, _ = label_sets(cached)
    assert len(cached) == len(live) and list(cached[0])[:4] == ["id", "true", "predicted", "loss"]
    for row, p in zip(cached, proba):
        name = Path(row["id"]).name
        said = live[name]
        assert set(row["true"].split(";")) == truth[name]
        assert p == pytest.approx([float(said[c]) for c in labels], abs=2e-3)
        near = {c for c, q, t in zip(labels, p, thresholds) if abs(q - t) < 2e-3}
        assert set(row["predicted"].split(";")) - {""} - near == set(said["labels"].split(";")) - {""} - near
    assert (head_dir / "errors.png").is_file()


def test_compare_ranks_multi_label_heads_by_val_map(mosaic_features, capsys) -> None:
    tmp, path, _ = mosaic_features
    code, out, err = run(["compare", "--features", str(path), "--out", str(tmp / "cmp")], capsys)
    assert code == 0, err
    rows = json.loads((tmp / "cmp/compare.json").read_text())["rows"]
    maps = [r["val_map"] for r in rows]
    assert maps == sorted(maps, reverse=True)
    assert {r["head"] for r in rows} >= {"linear", "mlp", "knn", "logreg", "centroid"}
    assert "val mAP" in out


def test_compare_gives_intervals_ties_times_and_each_heads_answers(mosaic_features, capsys) -> None:
    """Issue 25 for several labels per image: each val score's 95% interval, the heads tied with the best by a
    paired bootstrap of val mAP, the time columns, and per head predictions.csv and errors.png on report.html."""
    from pipeline.stage2.answers import label_sets, read_predictions
    from pipeline.stage2.multilabel import map_p_value
    from pipeline.stage2.report import best_line

    tmp, path, _ = mosaic_features
    root = tmp / "cmp-answers"
    code, out, err = run(["compare", "--features", str(path), "--heads", "linear,logreg,centroid,knn", "--out",
                          str(root)], capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads((root / "compare.json").read_text())
    rows, best = result["rows"], result["best"]
    for row in rows:
        metrics = json.loads((root / row["head"] / "metrics.json").read_text())
        for key in ("val_map", "val_micro_f1", "val_macro_f1"):
            lo, hi = metrics[f"{key}_interval"]
            assert lo <= metrics[key] <= hi and hi - lo > 0, (row["head"], key)
        assert row["val_map_interval"] == metrics["val_map_interval"]
        assert row["eval_seconds"] > 0 and row["head_seconds"] >= row["fit_seconds"] + row["eval_seconds"]
    _, best_proba, truth = label_sets(read_predictions(root / best / "predictions.csv"))
    for row in rows:  # the marks are the paired test of the heads' predictions.csv
        if row["head"] == best:
            continue
        _, proba, _ = label_sets(read_predictions(root / row["head"] / "predictions.csv"))
        p = map_p_value(truth, best_proba, proba)
        assert row["tied_p_value"] == pytest.approx(p)
        assert (row.get("tied_with_best") is not None) == (p >= 0.05) == (row["head"] in result["best_tied_with"])
    assert rows[-1]["tied_p_value"] < 0.05  # the last head's mAP is not the best's
    assert best_line(result) in out
    for header in ("95% interval", "tied", "micro F1 95%", "eval s", "head s"):
        assert f" {header} |" in out
    html = (root / "report.html").read_text()
    for row in rows:
        head = row["head"]
        section = html.split(f'id="head-{head}"')[1].split("<h2")[0]
        assert f'href="{head}/predictions.csv"' in section and "errors.png" in section.split("<img")[1]
        assert "true and predicted label sets" in section and "true -&gt; predicted" not in section  # its caption


def test_multi_label_refusals_are_one_line(mosaic_features, capsys) -> None:
    tmp, path, _ = mosaic_features
    csv_path = tmp / "mos/labels.csv"
    code, _, err = run(["baseline", "--dataset", str(csv_path), "--out", str(tmp / "b")], capsys)
    assert_one_line_error(code, err, "several labels per image", "baseline")
    code, _, err = run(["train-head", "--features", str(path), "--head", "ridge", "--out", str(tmp / "c")], capsys)
    assert_one_line_error(code, err, "does not learn several labels per image", "linear", "logreg", "centroid")
    code, _, err = run(["train-head", "--features", str(path), "--head", "logreg", "--class-weight", "balanced",
                        "--out", str(tmp / "w")], capsys)  # fmt: skip
    assert_one_line_error(code, err, "--class-weight balanced", "several labels per image")
    code, _, err = run(["train-head", "--features", str(path), "--task", "classify", "--out", str(tmp / "x")], capsys)
    assert_one_line_error(code, err, "several labels per image", "--task multilabel")


def test_multi_label_compare_page_renders_in_chromium(mosaic_features) -> None:
    """report.html of a multi-label compare on real images: every figure (each head's errors.png first) decoded."""
    from pipeline.stage2.comparing import compare
    from pipeline.stage2.heads import HeadConfig
    from tests.browser import render_in_chromium

    tmp, path, _ = mosaic_features
    root = tmp / "cmp-page"
    compare(path, heads=["logreg", "centroid"], base=HeadConfig(head="logreg", device="cpu"), out=root)
    pngs = sorted(root.rglob("*.png"))
    assert {p.relative_to(root).as_posix() for p in pngs} >= {"logreg/errors.png", "centroid/errors.png"}
    seen = render_in_chromium(root / "report.html", tmp=tmp)
    assert seen["images"] == len(pngs) and seen["broken"] == 0 and seen["errors"] == 0 and seen["console"] == []
