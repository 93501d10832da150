"""What stage two says and keeps: `compare` never replaces a head trained with other settings, says what
`train-head` says (sweep choices, overfitting, short classes under --shots), locks the folders it writes, names
the features by name; the files it writes have normal permissions; a reused feature file names its skipped images."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline.fileio import atomic_write
from pipeline.stage2.evaluate import HeadMetrics, overfitting_warning, summarize
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.train import compare, features_label, fit_and_evaluate, train_head, weights_label
from pipeline.store import FeatureMeta, FileLock, read_features
from tests.conftest import TINY_ARGS, assert_one_line_error, run, write_feature_file, write_image_folder


def _head_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------------------------------ nothing replaced


def test_compare_does_not_replace_a_head_train_head_made(
    feature_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The newcomer's case: `train-head --class-weight balanced`, then `compare --sweep` with default folders."""
    monkeypatch.chdir(tmp_path)
    args = ["--features", str(feature_file), "--epochs", "2"]
    code, _, err = run(["train-head", *args, "--head", "linear", "--class-weight", "balanced"], capsys)
    assert code == 0, err
    mine = tmp_path / "artifacts/heads/features/linear"
    before = (mine / "head.safetensors").read_bytes()

    code, out, err = run(["compare", *args, "--heads", "linear,knn", "--sweep"], capsys)
    assert code == 0, err
    assert _head_config(mine)["head_config"]["class_weight"] == "balanced"
    assert (mine / "head.safetensors").read_bytes() == before
    run_dir = tmp_path / "artifacts/heads/features/compare-sweep"
    assert _head_config(run_dir / "linear")["settings"]["sweep"] is True
    assert f"wrote {Path('artifacts/heads/features/compare-sweep')}/" in out


def test_compare_then_compare_sweep_keeps_both_without_force(
    feature_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Trying the sweep after a plain compare writes a folder of its own: no refusal, no --force, both kept; the
    table says what each time column counts."""
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--features", str(feature_file), "--epochs", "2", "--heads", "linear,knn"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "head s: what you wait per head" in out and "total s: the two-stage cost" in out
    code, out, err = run([*args, "--sweep"], capsys)
    assert code == 0, err
    heads = tmp_path / "artifacts/heads/features"
    assert json.loads((heads / "compare/compare.json").read_text())["rows"][0].get("sweep") is None
    assert all("sweep" in row for row in json.loads((heads / "compare-sweep/compare.json").read_text())["rows"])
    assert "compare took" in (heads / "compare-sweep/compare.md").read_text()


def test_a_head_of_other_settings_is_replaced_only_with_force(
    make_feature_file, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    feats = make_feature_file("f.h5")
    out = tmp_path / "cmp"
    base = ["compare", "--features", str(feats), "--heads", "linear,knn", "--epochs", "2", "--out", str(out)]
    assert run(base, capsys)[0] == 0
    assert run(base, capsys)[0] == 0  # the same settings again: nothing is lost, so no question asked

    code, _, err = run([*base, "--k", "3"], capsys)
    assert_one_line_error(code, err, f"{out / 'knn'}", "k 10 -> 3", "--force")
    assert _head_config(out / "knn")["head_config"]["k"] == 10  # refused before anything was trained or written

    code, _, err = run([*base, "--k", "3", "--force"], capsys)
    assert code == 0, err
    assert _head_config(out / "knn")["head_config"]["k"] == 3

    # Features extracted again (another fingerprint) under the same name: the old head is not theirs.
    refeats = write_feature_file(feats, seed=5)
    code, _, err = run(["train-head", "--features", str(refeats), "--head", "knn", "--k", "3", "--out",
                        str(out / "knn")], capsys)  # fmt: skip
    assert_one_line_error(code, err, "features re-extracted since", "--force")


def test_shots_json_of_other_settings_is_not_replaced(feature_file: Path, tmp_path: Path, capsys) -> None:
    base = ["compare", "--features", str(feature_file), "--heads", "centroid", "--out", str(tmp_path / "s")]
    assert run([*base, "--shots", "1,all"], capsys)[0] == 0
    code, _, err = run([*base, "--shots", "2,all"], capsys)
    assert_one_line_error(code, err, "few-shot comparison", "--force")
    assert run([*base, "--shots", "2,all", "--force"], capsys)[0] == 0


def test_a_second_writer_of_a_head_folder_is_refused(feature_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    with FileLock(out / "knn"):  # what a compare run holds while it writes knn/
        code, _, err = run(
            ["compare", "--features", str(feature_file), "--heads", "centroid,knn", "--out", str(out)], capsys
        )
        assert_one_line_error(code, err, "another train-head or compare is writing", str(out / "knn"))
        assert not (out / "centroid").exists()  # refused before the first head was written
    with FileLock(out):
        code, _, err = run(["train-head", "--features", str(feature_file), "--head", "knn", "--out", str(out)], capsys)
        assert_one_line_error(code, err, "another train-head or compare is writing")
    assert run(["train-head", "--features", str(feature_file), "--head", "knn", "--out", str(out)], capsys)[0] == 0
    assert not list(tmp_path.glob("**/*.lock"))  # released and removed


def test_a_missing_feature_file_makes_no_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["compare", "--features", "nope.h5"], capsys)
    assert_one_line_error(code, err, "feature file not found")
    assert not (tmp_path / "artifacts").exists()


# ------------------------------------------------------------------------------------------ compare says it


def test_compare_prints_overfitting_and_sweep_choices(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats = write_feature_file(tmp_path / "noisy.h5", n_train=40, n_val=200, spread=6.0)
    code, out, err = run(
        ["compare", "--features", str(feats), "--heads", "logreg,knn", "--sweep", "--out", str(tmp_path / "c")],
        capsys,
    )
    assert code == 0, err
    assert re.search(r"logreg: sweep: (chose|kept the defaults) C ", out)
    assert re.search(r"knn: sweep: (chose|kept the defaults) k ", out)
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: logreg"))
    assert "points" in warning and "%" not in warning and "epochs" not in warning
    assert "already chose C" in warning and "smaller --C" not in warning  # the sweep chose C: advice knows
    row = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"][0]
    assert row["overfitting"] and row["notes"][-1] == warning


def test_a_tie_in_the_sweep_is_said(feature_file: Path, tmp_path: Path) -> None:
    """Well-separated features: every k scores 1.0 on the held-out rows, so the tie goes to the defaults and that
    is said (not "the first in grid order")."""
    result = compare(feature_file, heads=["knn"], base=HeadConfig(head="knn", sweep=True), out=tmp_path / "c")
    (note,) = result["rows"][0]["notes"]
    assert "kept the defaults k 10" in note and "a tie of 6 grid points" in note and "the defaults are kept" in note
    assert "first in grid order" not in note


@pytest.mark.parametrize(
    ("head", "says", "not_says"),
    [("logreg", "--C", "--epochs"), ("linear", "--epochs", "--C"), ("mlp", "--dropout", "--k"), ("knn", "--k", "--C")],
)
def test_overfitting_advice_fits_the_head(head: str, says: str, not_says: str) -> None:
    def metrics(gap: float, **typed: object) -> HeadMetrics:
        train = {"accuracy": 0.5 + gap, "loss": 0.1}
        val = {"accuracy": 0.5, "loss": 0.2, "balanced_accuracy": 0.5, "macro_precision": 0.5, "macro_recall": 0.5,
               "macro_f1": 0.5, "per_class": [], "confusion_matrix": []}  # fmt: skip
        return summarize(train=train, val=val, fit_seconds=0.0, extra={"head": head, **typed})

    text = overfitting_warning(metrics(0.234))
    assert text is not None and "23.4 points" in text and says in text and not_says not in text
    assert "--sweep" in text  # and once swept, it is not advised again
    assert "--sweep" not in overfitting_warning(metrics(0.2, sweep={}))
    assert overfitting_warning(metrics(0.05)) is None


def test_shots_beyond_a_class_size_are_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats = write_feature_file(tmp_path / "small.h5", n_train=40, n_val=40)  # 10 train rows per class
    code, out, err = run(
        ["train-head", "--features", str(feats), "--head", "centroid", "--shots", "24", "--out", str(tmp_path / "h")],
        capsys,
    )
    assert code == 0, err
    assert "--shots 24: 4 classes had fewer training images and used all they had (class_0 10" in out
    code, out, err = run(
        ["compare", "--features", str(feats), "--heads", "centroid,knn", "--shots", "5,24", "--out",
         str(tmp_path / "s")], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.count("--shots 24: 4 classes had fewer") == 1 and "--shots 5:" not in out


# ------------------------------------------------------------------------------------------ names, settings, modes


def test_tables_name_the_dataset_and_the_weights_not_a_hash() -> None:
    sha = "ab" * 32
    meta = FeatureMeta(weights=f"file:{sha}", config={"weights": "artifacts/weights/mobilenet_v2_imagenet.pt"})
    label = weights_label(meta)
    assert label == "mobilenet_v2_imagenet.pt (sha256 abababab)" and sha not in label
    assert weights_label(FeatureMeta(weights="none(seed=3)")) == "random init (seed=3)"
    assert weights_label(FeatureMeta(weights="IMAGENET1K_V1")) == "IMAGENET1K_V1"


def test_compare_md_and_output_name_the_features(feature_file: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run(
        ["compare", "--features", str(feature_file), "--heads", "centroid", "--out", str(tmp_path / "c")], capsys
    )
    label = features_label(read_features(feature_file))
    assert code == 0 and label == "synthetic, synthetic, random init" and out.startswith(label)
    assert label in (tmp_path / "c" / "compare.md").read_text()


def test_config_json_lists_only_the_settings_the_head_uses(feature_file: Path, tmp_path: Path) -> None:
    train_head(feature_file, HeadConfig(head="logreg", C=0.5), out=tmp_path / "logreg")
    saved = _head_config(tmp_path / "logreg")["head_config"]
    assert saved["C"] == 0.5 and "epochs" not in saved and "lr" not in saved and "k" not in saved
    train_head(feature_file, HeadConfig(head="mlp", epochs=2, dropout=0.25), out=tmp_path / "mlp")
    saved = _head_config(tmp_path / "mlp")["head_config"]
    assert saved["dropout"] == 0.25 and "C" not in saved and "k" not in saved


def test_files_get_normal_permissions(feature_file: Path, tmp_path: Path) -> None:
    """safetensors creates its file 0600; atomic_write gives every file 0o666 & ~umask, as open() would."""
    before = os.umask(0o022)
    try:
        atomic_write(tmp_path / "t.safetensors", lambda p: save_file({"a": np.zeros(2, np.float32)}, str(p)))
        assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644
        train_head(feature_file, HeadConfig(head="centroid"), out=tmp_path / "c")
        for path in (tmp_path / "c").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    finally:
        os.umask(before)


def test_huge_features_warn_like_tiny_ones(feature_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = read_features(feature_file)
    huge = replace(fs, splits={k: replace(v, features=v.features * 1e30) for k, v in fs.splits.items()})
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the spread itself is measured without overflow
        from pipeline.stage2.heads import warn_if_tiny

        warn_if_tiny(huge.train.features, HeadConfig(head="linear"))
    assert "huge spread" in caplog.text and "--standardize" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and the flag it names works: as on the features at their own scale
        _, metrics, _ = fit_and_evaluate(huge, HeadConfig(head="linear", standardize=True))
    assert "spread" not in caplog.text and metrics["val_accuracy"] > 0.9


# ------------------------------------------------------------------------------------------ extract reuse


def test_a_reused_file_names_the_images_it_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=4)
    (folder / "cat" / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "f.h5"
    args = ["extract", "--dataset", str(folder), "--val-fraction", "0.5", "--out", str(out), *TINY_ARGS]
    assert run([*args, "--skip-bad"], capsys)[0] == 0
    code, text, err = run(args, capsys)  # without --skip-bad: the file is reused, and says what it lacks
    assert code == 0, err
    assert text.startswith(f"reused {out}") and "1 unreadable" in text and "cat/broken.png" in text


def test_metrics_are_typed_complete_and_written_as_they_are(feature_file: Path, tmp_path: Path) -> None:
    """Stage two's result is a HeadMetrics made once: nothing is added after metrics.json is written (the history
    is in it, the folder is not), and it cannot gain keys later."""
    import json

    from pipeline.stage2.evaluate import HeadMetrics
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    metrics = train_head(feature_file, HeadConfig(head="linear", epochs=2, device="cpu"), out=tmp_path / "h")
    assert isinstance(metrics, HeadMetrics) and metrics.out == str(tmp_path / "h")
    written = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics.to_json())) and "out" not in written
    assert len(written["history"]) == 2 and metrics["val_accuracy"] == written["val_accuracy"]
    with pytest.raises(TypeError):
        metrics["extra"] = 1  # a Mapping, not a dict
