"""Decision thresholds for the class that matters (chosen on held-out train, never on val), the PR and ROC curves,
and imbalanced classes said out loud (issue 18 items 2 and 3)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.errors import PipelineError
from pipeline.stage2 import thresholds
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.train import compare, fit_and_evaluate, train_head
from pipeline.store import FeatureWriter, SplitFeatures, read_features
from tests.conftest import assert_one_line_error, run


def overlapping_file(path: Path, *, counts: tuple[int, ...], n_val: int, dim: int = 8, seed: int = 0) -> Path:
    """Classes ``class_i`` with ``counts[i]`` train rows (val in the same proportions), overlapping Gaussian blobs:
    no head separates them, so a threshold trades recall against precision."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.0, (len(counts), dim))

    def split(n_per: list[int]) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(len(counts)), n_per)
        rng.shuffle(y)
        return (means[y] + rng.normal(0, 3.0, (len(y), dim))).astype(np.float32), y.astype(np.int64)

    Xtr, ytr = split(list(counts))
    Xva, yva = split([round(n_val * c / sum(counts)) for c in counts])
    names = [f"class_{i}" for i in range(len(counts))]
    meta = {"fingerprint": f"overlap-{seed}", "backbone": "synthetic", "weights": "none", "feature_dim": dim,
            "num_classes": len(counts), "dataset": "synthetic", "preprocessing": {},
            "dataset_identity": {}}  # fmt: skip
    w = FeatureWriter(path, meta=meta, classes=names, sizes={"train": len(ytr), "val": len(yva)}, feature_dim=dim)
    w.append("train", Xtr, ytr, [str(i) for i in range(len(ytr))], seen=len(ytr))
    w.append("val", Xva, yva, [str(i) for i in range(len(yva))], seen=len(yva))
    w.finish()
    return path


@pytest.fixture
def binary_file(tmp_path: Path) -> Path:
    return overlapping_file(tmp_path / "b.h5", counts=(1500, 1500), n_val=3000)


# ------------------------------------------------------------------------------------------ the threshold


def test_a_threshold_for_recall_reaches_it_on_held_out_data(binary_file: Path) -> None:
    fs = read_features(binary_file)
    cfg = HeadConfig(head="logreg", positive="class_1", target_recall=0.9)
    _, metrics, _ = fit_and_evaluate(fs, cfg)
    record = metrics["threshold"]
    assert record["reached"] and record["held_out_recall"] >= 0.9
    assert record["n_held_out"] == 600  # a stratified 20% of 3,000 train rows
    val_recall = record["at_threshold"]["recall"]
    assert abs(val_recall - 0.9) < 0.04, val_recall  # measured on val, which never chose it
    # argmax recalls less and is more precise: the threshold moved the decision where it was asked to
    assert record["at_argmax"]["recall"] < val_recall - 0.05
    assert record["at_argmax"]["precision"] > record["at_threshold"]["precision"]
    cm = np.array(record["confusion_matrix"])
    assert cm.sum() == len(fs.val) and cm[1, 1] / cm[1].sum() == pytest.approx(val_recall)


def test_a_threshold_for_precision_reaches_it(binary_file: Path) -> None:
    fs = read_features(binary_file)
    _, metrics, _ = fit_and_evaluate(fs, HeadConfig(head="logreg", positive="class_0", target_precision=0.95))
    record = metrics["threshold"]
    assert record["reached"] and record["at_threshold"]["precision"] > 0.92
    assert record["at_threshold"]["recall"] < record["at_argmax"]["recall"]


def test_val_never_moves_the_threshold(binary_file: Path) -> None:
    fs = read_features(binary_file)
    cfg = HeadConfig(head="logreg", positive="class_1", target_recall=0.9)
    _, before, _ = fit_and_evaluate(fs, cfg)
    rng = np.random.default_rng(1)
    val = fs.val
    scrambled = SplitFeatures(
        features=rng.normal(size=val.features.shape).astype(np.float32), labels=rng.permutation(val.labels),
        ids=val.ids,
    )  # fmt: skip
    _, after, _ = fit_and_evaluate(replace(fs, splits={**fs.splits, "val": scrambled}), cfg)
    assert after["threshold"]["threshold"] == before["threshold"]["threshold"]
    assert after["threshold"]["at_threshold"] != before["threshold"]["at_threshold"]  # val was really changed


def test_thresholded_predictions_pick_the_positive_class_at_the_threshold() -> None:
    proba = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.1, 0.7]])
    pred = thresholds.thresholded_predictions(proba, positive=1, threshold=0.25)
    assert pred.tolist() == [1, 0, 2]  # 0.3 >= 0.25 -> class 1; elsewhere the best other class


# ------------------------------------------------------------------------------------------ curves


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_curves_ap_and_auc_are_sklearns(n_classes: int, ties: bool) -> None:
    """AP and AUC, taken from the curves computed once per class, are scikit-learn's to the bit (with tied scores
    too, where the curves' steps merge)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, n_classes, 500)
    proba = rng.dirichlet(np.ones(n_classes), 500)
    proba[np.arange(500), y] += 0.3  # better than chance
    proba /= proba.sum(1, keepdims=True)
    if ties:
        proba = proba.round(2)
    classes = [f"c{i}" for i in range(n_classes)]
    result = thresholds.curves(y, proba, classes)
    which = [1] if n_classes == 2 else range(n_classes)
    assert list(result.per_class) == [classes[c] for c in which]
    for c in which:
        got = result.per_class[classes[c]]
        assert got["average_precision"] == average_precision_score(y == c, proba[:, c])
        assert got["roc_auc"] == roc_auc_score(y == c, proba[:, c])
        assert len(got["pr"]["recall"]) <= thresholds.CURVE_POINTS
    if n_classes > 2 and not ties:  # sklearn's multi-class AUC wants rows summing to 1: rounded ones do not
        assert result.macro_roc_auc == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))


def test_train_head_writes_the_curves_and_the_threshold(binary_file: Path, tmp_path: Path) -> None:
    cfg = HeadConfig(head="logreg", positive="class_1", target_recall=0.8)
    metrics = train_head(binary_file, cfg, out=tmp_path / "h")
    written = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert written["threshold"]["threshold"] == metrics["threshold"]["threshold"]
    assert set(written["curves"]["per_class"]) == {"class_1"}
    assert (tmp_path / "h" / "pr_roc.png").stat().st_size > 1000
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["settings"]["target_recall"] == 0.8 and config["settings"]["positive"] == "class_1"


# ------------------------------------------------------------------------------------------ imbalance


@pytest.mark.parametrize(("counts", "said"), [((400, 100), True), ((200, 100), False)])
def test_imbalance_is_said_at_4_to_1_not_2_to_1(
    counts: tuple[int, int], said: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    feats = overlapping_file(tmp_path / "f.h5", counts=counts, n_val=200)
    code, out, _ = run(["train-head", "--features", str(feats), "--head", "centroid", "--out", str(tmp_path / "h")],
                       capsys)  # fmt: skip
    assert code == 0
    report = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("imbalanced classes") for line in report) is said
    first_figure = next(line for line in report[1:] if line and not line.startswith("imbalanced"))
    assert first_figure.startswith("balanced accuracy" if said else "train accuracy")
    code, out, _ = run(["compare", "--features", str(feats), "--heads", "centroid,knn", "--out", str(tmp_path / "c")],
                       capsys)  # fmt: skip
    assert code == 0 and ("imbalanced classes: train's largest class 'class_0'" in out) is said
    header = next(line for line in out.splitlines() if line.startswith("| head"))
    assert header.startswith("| head | balanced acc | worst recall" if said else "| head | train acc")


def test_imbalance_record() -> None:
    assert thresholds.imbalance(np.array([0] * 31 + [1] * 10), ["a", "b"]) is not None  # 3.1 : 1
    assert thresholds.imbalance(np.array([0] * 30 + [1] * 10), ["a", "b"]) is None  # 3 : 1 is not more than 3
    assert thresholds.imbalance(np.array([0, 0, 0]), ["a", "b"])["smallest_count"] == 0


def test_compare_ranks_imbalanced_heads_by_balanced_accuracy(tmp_path: Path) -> None:
    feats = overlapping_file(tmp_path / "f.h5", counts=(800, 100), n_val=450)
    result = compare(feats, heads=["centroid", "logreg"], base=HeadConfig(), out=tmp_path / "c")
    assert result["best_by"] == "balanced_accuracy"
    assert result["best"] == max(result["rows"], key=lambda r: r["balanced_accuracy"])["head"]


# ------------------------------------------------------------------------------------------ the options


def test_the_options_exist_and_thread_through_compare(binary_file: Path, tmp_path: Path, capsys) -> None:
    args = ["--features", str(binary_file), "--positive", "class_1", "--target-recall", "0.9"]
    code, out, _ = run(["compare", *args, "--heads", "logreg", "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "logreg: threshold " in out and "chosen for recall 0.9" in out
    row = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"][0]
    assert row["threshold"]["positive"] == "class_1"
    code, out, _ = run(["train-head", *args, "--head", "logreg", "--out", str(tmp_path / "h")], capsys)
    assert code == 0 and "threshold " in out and "'class_1' vs rest: average precision" in out


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--positive", "nope", "--target-recall", "0.9"], "'nope' is not a class"),
        (["--positive", "class_1", "--target-recall", "0"], "--target-recall must be in (0, 1]"),
        (["--positive", "class_1", "--target-recall", "1.5"], "--target-recall must be in (0, 1]"),
        (["--positive", "class_1", "--target-precision", "-1"], "--target-precision must be in (0, 1]"),
        (["--positive", "class_1", "--target-recall", "0.9", "--target-precision", "0.9"], "not both"),
        (["--target-recall", "0.9"], "needs --positive"),
    ],
)
def test_bad_threshold_options_are_one_line_usage_errors(
    extra: list[str], fragment: str, binary_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for command in (["train-head", "--head", "centroid"], ["compare", "--heads", "centroid"]):
        code, _, err = run([*command, "--features", str(binary_file), "--out", str(tmp_path / "o"), *extra], capsys)
        assert_one_line_error(code, err, fragment)
        assert code == 2


def test_a_target_of_exactly_one_is_allowed() -> None:
    assert HeadConfig(positive="a", target_recall=1.0).threshold_target == {"target_recall": 1.0}
    with pytest.raises(PipelineError):
        HeadConfig(positive="a", target_recall=float("nan"))


# ------------------------------------------------------------------------------------------ export and predict


def test_export_records_the_threshold_and_predict_applies_it(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import csv

    from pipeline.deploy.export import export_model
    from pipeline.stage1.extract import ExtractConfig, extract
    from tests.conftest import TINY_EXTRACT

    feats = tmp_path / "f.h5"
    extract(ExtractConfig(dataset=str(image_folder), out=str(feats), **TINY_EXTRACT))
    cfg = HeadConfig(head="logreg", positive="cat", target_recall=0.9)
    metrics = train_head(feats, cfg, out=tmp_path / "h")
    model = tmp_path / "m.pt2"
    export_model(tmp_path / "h", model)
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["decision"] == {"positive": "cat", "threshold": metrics["threshold"]["threshold"]}

    def predicted(threshold: float) -> list[dict[str, str]]:
        meta["decision"]["threshold"] = threshold  # like class names, the decision may be edited by hand
        model.with_suffix(".json").write_text(json.dumps(meta))
        code, _, _ = run(["predict", "--model", str(model), str(image_folder), "--out", str(tmp_path / "p.csv")],
                         capsys)  # fmt: skip
        assert code == 0
        return list(csv.DictReader((tmp_path / "p.csv").open()))

    rows = predicted(0.0)  # every probability reaches 0: the threshold picks cat for every image
    assert list(rows[0])[-3:] == ["decided_class", "decided_by", "error"]
    assert {(r["decided_class"], r["decided_by"]) for r in rows} == {("cat", "threshold")}
    rows = predicted(1.0)  # no softmax probability of these images reaches 1: cat is never picked
    assert all(r["decided_class"] != "cat" and r["decided_by"] == "below threshold" for r in rows)
    assert sum(r["class"] == "cat" for r in rows) > 0  # argmax said cat for some: the threshold overruled it
    meta["decision"] = None
    model.with_suffix(".json").write_text(json.dumps(meta))
    code, _, _ = run(["predict", "--model", str(model), str(image_folder), "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 0 and "decided_class" not in (tmp_path / "p.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_curves_equal_scikit_learns(seed: int) -> None:
    """precision_recall_curve, roc_curve (points on straight stretches dropped) and auc, on scores with ties."""
    from sklearn import metrics

    from pipeline.stage2 import thresholds

    rng = np.random.default_rng(seed)
    truth = rng.random(300) < 0.3
    score = np.round(rng.random(300) * 20).astype(np.float32) / 20 + truth * 0.1  # many ties
    for ours, theirs in ((thresholds.precision_recall_curve, metrics.precision_recall_curve),
                         (thresholds.roc_curve, metrics.roc_curve)):  # fmt: skip
        for g, w in zip(ours(truth, score), theirs(truth, score)):
            np.testing.assert_array_equal(g, w)
    fpr, tpr, _ = thresholds.roc_curve(truth, score)
    assert thresholds.auc(fpr, tpr) == metrics.auc(fpr, tpr) == metrics.roc_auc_score(truth, score)
    recall, precision = thresholds.precision_recall_curve(truth, score)[1::-1]
    assert thresholds.auc(recall, precision) == metrics.auc(recall, precision)
