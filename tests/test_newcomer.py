"""What a new user meets first (issue 16): --version, list, inspect, help texts, extract's next step, and the
Makefile's names and refusals."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import click
import numpy as np
import pytest

import pipeline
from pipeline import catalog
from pipeline.cli import cli
from pipeline.stage2.heads import HEADS
from pipeline.store import FeatureWriter, read_features
from tests.conftest import TINY_ARGS, assert_one_line_error, run, write_image_folder

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ --version, --help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"pipeline {pipeline.__version__}"


def test_group_help_shows_each_commands_whole_first_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    listing = " ".join(out.split("Commands:")[1].split())  # undo the wrapping
    for name, command in cli.commands.items():
        first = " ".join((command.help or "").split("\n\n")[0].split())
        first = first[: first.index(". ") + 1] if ". " in first else first
        assert f"{name} {first}" in listing, name
    assert "..." not in listing


def test_every_option_has_a_description() -> None:
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help"
                assert "\n" not in param.help.strip(), f"{name} {param.opts[0]}: more than one line"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "Usage:" in out


# ------------------------------------------------------------------------------------------ list


def test_list_choices_are_the_catalog() -> None:
    what = next(p for p in cli.commands["list"].params if p.name == "what")
    assert list(what.type.choices) == list(catalog.LISTS)


def test_list_heads_names_every_registered_head(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["list", "heads"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == list(HEADS)
    assert all(len(line.split()) > 1 for line in out.splitlines()[1:])  # each with a description


def test_list_backbones(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["list", "backbones"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"resnet18", "mobilenet_v2", "resnet50"} <= set(rows)
    assert "IMAGENET1K_V1" in rows["resnet18"]


def test_list_weights_for_a_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torchvision names, none, and only the local files that load into this backbone."""
    import torch
    import torchvision

    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mine.pt")
    (tmp_path / "broken.pt").write_bytes(b"x" * 2048)
    (tmp_path / "notes.txt").write_text("not weights")
    code, out, _ = run(["list", "weights", "--backbone", "mobilenet_v2", "--weights-dir", str(tmp_path)], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ["IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT", "none", str(tmp_path / "mine.pt")]
    assert "= IMAGENET1K_V2" in out  # what DEFAULT means today
    code, out, _ = run(["list", "weights", "--backbone", "resnet18", "--weights-dir", str(tmp_path)], capsys)
    assert code == 0 and "mine.pt" not in out  # a MobileNetV2 state_dict does not fit ResNet18


def test_list_weights_says_whether_a_checkpoint_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    code, out, _ = run(["list", "weights", "--backbone", "resnet18"], capsys)
    assert code == 0
    v1 = next(line for line in out.splitlines() if line.startswith("IMAGENET1K_V1"))
    assert "cached" in v1 and "224 px" in v1


def test_list_weights_unknown_backbone_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["list", "weights", "--backbone", "resnet19"], capsys)
    assert code == 1
    assert_one_line_error(code, err, "resnet19", "list backbones")


def test_list_datasets_finds_image_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image_folder(tmp_path / "pets", per_class=1)
    write_image_folder(tmp_path / "split" / "train", per_class=1)
    write_image_folder(tmp_path / "split" / "val", per_class=1)
    (tmp_path / "cifar-10-batches-py").mkdir()  # a torchvision download: not an image folder
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    code, out, _ = run(["list", "datasets", "--data-root", str(tmp_path)], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert {"cifar10", "mnist"} <= set(names)
    assert str(tmp_path / "pets") in names and str(tmp_path / "split") in names
    assert not any("cifar-10-batches-py" in n for n in names)
    assert all(kind in out.splitlines()[0] for kind in ("labels table", "imagefolder", "shards"))  # every other kind


def test_list_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["list", "models"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "models")


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_synthetic_file(feature_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(feature_file)], capsys)
    assert code == 0
    assert "complete" in out.splitlines()[0]
    assert "synthetic-0" in out  # fingerprint
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("class_", "total"))}
    assert rows["class_0"] == ["100", "50"]  # 400 train / 200 val rows over 4 classes
    assert rows["total"] == ["400", "200"]


def test_inspect_json_counts_match_the_labels(
    make_feature_file, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    path = make_feature_file(n_train=37, n_val=11, classes=3, dtype="float16")
    code, out, _ = run(["inspect", str(path), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    fs = read_features(path)
    for split in ("train", "val"):
        expected = np.bincount(fs.splits[split].labels, minlength=3).tolist()
        assert list(summary["counts"][split].values()) == expected
    assert summary["dtype"] == "float16"
    assert summary["classes"] == fs.classes and summary["complete"] is True


def test_inspect_real_extraction(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "f.h5"
    code, _, err = run(["extract", "--dataset", str(image_folder), *TINY_ARGS, "--out", str(out_path)], capsys)
    assert code == 0, err
    code, out, _ = run(["inspect", str(out_path)], capsys)
    assert code == 0
    text = " ".join(out.split())
    for fragment in ("backbone resnet18, 512-d features, float32", "weights none(seed=0)", "crop 32",
                     "precision fp32 on cpu", "skipped none", "torch ", "torchvision "):  # fmt: skip
        assert fragment in text, fragment
    summary = json.loads(run(["inspect", str(out_path), "--json"], capsys)[1])
    assert sum(summary["counts"]["train"].values()) + sum(summary["counts"]["val"].values()) == 18
    assert summary["created"] and summary["versions"]["pipeline"] == pipeline.__version__


def test_inspect_does_not_claim_none_skipped_after_skip_bad(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png")
    out_path = tmp_path / "f.h5"
    args = ["extract", "--dataset", str(image_folder), *TINY_ARGS, "--skip-bad", "--out", str(out_path)]
    code, out, err = run(args, capsys)
    assert code == 0 and "skipped 1" in out, err
    summary = json.loads(run(["inspect", str(out_path), "--json"], capsys)[1])
    assert summary["skipped"] != {}  # the list is not in read_meta's record yet: unknown, never "none"
    if summary["skipped"] is not None:
        assert sum(len(v) for v in summary["skipped"].values()) == 1


def test_inspect_unfinished_extraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = {"fingerprint": "fp", "backbone": "synthetic", "weights": "none", "feature_dim": 4, "num_classes": 2,
            "dataset": "synthetic", "preprocessing": {}, "dataset_identity": {}}  # fmt: skip
    w = FeatureWriter(tmp_path / "f.h5", meta=meta, classes=["a", "b"], sizes={"train": 4, "val": 2}, feature_dim=4)
    w.close()
    code, out, _ = run(["inspect", str(tmp_path / "f.h5.tmp")], capsys)
    assert code == 0
    assert "INCOMPLETE" in out and "rerun extract" in out


def test_inspect_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["inspect", str(tmp_path / "nope.h5")], capsys)
    assert code == 1
    assert_one_line_error(code, err, "nope.h5")


# ------------------------------------------------------------------------------------------ extract's next step


def test_extract_ends_with_the_next_command_and_it_runs(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "my features.h5"  # a space: the printed command must quote it
    args = ["extract", "--dataset", str(image_folder), *TINY_ARGS, "--out", str(out_path)]
    code, out, err = run(args, capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last == f"next: python -m pipeline compare --features {shlex.quote(str(out_path))}"
    # the printed command works as written (one fast head to keep the test short)
    argv = shlex.split(last.removeprefix("next: "))[3:]
    code, out, err = run([*argv, "--heads", "centroid", "--out", str(tmp_path / "heads")], capsys)
    assert code == 0, err
    assert "centroid" in out
    # and a rerun that reuses the file says the same
    code, out, _ = run(args, capsys)
    assert code == 0 and "reused" in out
    assert out.strip().splitlines()[-1] == last


# ------------------------------------------------------------------------------------------ Makefile


@pytest.fixture
def makefile_dir(tmp_path: Path) -> Path:
    """A copy of the Makefile beside an up-to-date fake .venv stamp, so no target rebuilds anything."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.write_text("")
    later = time.time() + 10
    os.utime(stamp, (later, later))
    return tmp_path


def make(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-n", "-C", str(where), *args], capture_output=True, text=True, timeout=60)


def _out_of(dry_run: str) -> str:
    return dry_run.split("--out ")[1].split()[0]


def test_make_features_name_default(makefile_dir: Path) -> None:
    r = make(makefile_dir, "extract")
    assert r.returncode == 0, r.stderr
    assert _out_of(r.stdout) == "artifacts/features/cifar10_resnet18_IMAGENET1K_V1_full.h5"


def test_make_features_name_folder_with_slash_and_weights_file(makefile_dir: Path) -> None:
    r = make(makefile_dir, "extract", "DATASET=my_images/", "BACKBONE=mobilenet_v2",
             "WEIGHTS=artifacts/weights/mobilenet_v2_imagenet.pt")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _out_of(r.stdout) == "artifacts/features/my_images_mobilenet_v2_mobilenet_v2_imagenet.h5"


def test_make_names_match_extracts_default_out(makefile_dir: Path, tmp_path: Path) -> None:
    """The Makefile's FEATURES is the file `extract` names by default (same folder name, same weights stem)."""
    from types import SimpleNamespace

    from pipeline.stage1.datasets import load_folder
    from pipeline.stage1.extract import ExtractConfig, default_out

    folder = write_image_folder(tmp_path / "my_images", per_class=2)
    weights = "artifacts/weights/mobilenet_v2_imagenet.pt"
    cfg = ExtractConfig(dataset=f"{folder}/", backbone="mobilenet_v2", weights=weights)
    expected = default_out(cfg, load_folder(Path(f"{folder}/")), SimpleNamespace(weights="file:0123"))
    r = make(makefile_dir, "extract", f"DATASET={folder}/", "BACKBONE=mobilenet_v2", f"WEIGHTS={weights}")
    assert _out_of(r.stdout) == str(expected)


def test_make_heads_of_two_datasets_do_not_collide(makefile_dir: Path) -> None:
    head = makefile_dir / "artifacts/heads/pets_resnet18_IMAGENET1K_V1/logreg/head.safetensors"
    head.parent.mkdir(parents=True)
    head.write_bytes(b"")
    r = make(makefile_dir, "export", "DATASET=pets/", "HEAD=logreg")
    assert r.returncode == 0, r.stderr
    assert "--head artifacts/heads/pets_resnet18_IMAGENET1K_V1/logreg " in r.stdout
    assert "artifacts/models/pets_resnet18_IMAGENET1K_V1_logreg.pt2" in r.stdout
    other = make(makefile_dir, "export", "DATASET=cars", "HEAD=logreg")  # cars has no trained head
    assert other.returncode != 0


def test_make_export_and_predict_without_a_head_say_what_to_run(makefile_dir: Path) -> None:
    for target in (["export"], ["predict", "IMAGES=photos/"]):
        r = make(makefile_dir, *target, "HEAD=mlp")
        assert r.returncode != 0
        features = "artifacts/features/cifar10_resnet18_IMAGENET1K_V1_full.h5"
        assert f"run make train-head FEATURES={features} HEAD=mlp first" in r.stderr
        assert "No rule to make target" not in r.stderr


def test_make_predict_without_images_asks_for_them(makefile_dir: Path) -> None:
    r = make(makefile_dir, "predict")
    assert r.returncode != 0
    assert "make predict needs IMAGES" in r.stderr


def test_make_install_torch_cpu_uses_the_cpu_index(makefile_dir: Path) -> None:
    (makefile_dir / ".venv" / ".installed").unlink()  # a fresh clone: install has work to do
    cpu = make(makefile_dir, "install", "TORCH=cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in cpu.stdout
    # the CPU torch goes in before the project, which then finds torchvision installed
    assert cpu.stdout.index("--index-url") < cpu.stdout.index("torch.version.cuda") < cpu.stdout.index("pip install -e")
    default = make(makefile_dir, "install")
    assert default.returncode == 0 and "--index-url" not in default.stdout
    bad = make(makefile_dir, "install", "TORCH=gpu")
    assert bad.returncode != 0 and "TORCH=cpu" in bad.stderr


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("my_images/labels.csv", "my_images-labels"),  # a table: its folder and stem, as tables.py names it
        ("kaggle/train.tsv", "kaggle-train"),
        ("my_shards/train-{0000..0004}.tar", "my_shards"),  # shards: their folder, as shards.py names it
    ],
)
def test_make_features_name_of_a_table_or_shards(makefile_dir: Path, dataset: str, name: str) -> None:
    """README: the Makefile names the files as `extract` does, for a labels table and shards too."""
    r = make(makefile_dir, "extract", f"DATASET={dataset}", "BACKBONE=mobilenet_v2",
             "WEIGHTS=artifacts/weights/mobilenet_v2_imagenet.pt")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _out_of(r.stdout) == f"artifacts/features/{name}_mobilenet_v2_mobilenet_v2_imagenet.h5"


@pytest.mark.parametrize(
    ("identity", "shown"),
    [
        ({"kind": "table", "root": "/d/train", "tables": {"../labels.csv": "ab"}, "split": "s"},
         "(/d/train, table ../labels.csv, s)"),
        ({"kind": "webdataset", "shards": ["/d/train-0.tar", "/d/val-0.tar"], "split": "val shards"},
         "(2 shards from /d/train-0.tar, val shards)"),
    ],
)  # fmt: skip
def test_inspect_names_the_table_or_shards(feature_file: Path, identity: dict, shown: str) -> None:
    """`inspect` of a file made from a labels table or WebDataset shards says which table or shards it read."""
    from pipeline.inspection import format_summary, summarize

    summary = {**summarize(feature_file), "dataset_identity": identity}
    line = next(x for x in format_summary(summary).splitlines() if x.startswith("dataset"))
    assert line.endswith(shown), line
