"""The from-scratch baseline: outputs, resume between epochs, refused checkpoints, the compare row."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import load_source
from pipeline.stage2 import baseline as bl
from pipeline.stage2.baseline import BaselineConfig, augment, train_baseline
from tests.conftest import write_image_folder


def _cfg(folder: Path, out: Path, **kw) -> BaselineConfig:
    base = dict(dataset=str(folder), backbone="resnet18", image_size=32, epochs=1, batch_size=4, device="cpu")
    return BaselineConfig(**{**base, "out": str(out), **kw})


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", per_class=4, size=(20, 24))


def test_training_writes_metrics_config_curves_and_checkpoint(tiny: Path, tmp_path: Path) -> None:
    result = train_baseline(_cfg(tiny, tmp_path / "bl", epochs=2))
    out = tmp_path / "bl"
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "config.json", "curves.png", "checkpoint.pt"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["train_seconds"] == pytest.approx(sum(metrics["epoch_seconds"]))
    assert metrics["train_val_gap"] == pytest.approx(metrics["train_accuracy"] - metrics["val_accuracy"])
    assert len(metrics["per_class"]) == 3 and result.resumed_from == 0
    # the same rows as extract: the val ids of load_source's split with the same options
    config = json.loads((out / "config.json").read_text())
    assert config["dataset_identity"] == load_source(str(tiny)).identity
    assert sum(pc["support"] for pc in metrics["per_class"]) == len(load_source(str(tiny)).splits["val"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def test_a_run_interrupted_between_epochs_resumes_where_it_stopped(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train_baseline(_cfg(tiny, tmp_path / "straight", epochs=3))
    saved = bl.save_checkpoint

    def stop_after_first(path: Path, state: dict) -> None:
        saved(path, state)
        raise KeyboardInterrupt  # a Ctrl-C between epoch 1 and 2, after its checkpoint

    monkeypatch.setattr(bl, "save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_baseline(_cfg(tiny, tmp_path / "cut", epochs=3))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(bl, "save_checkpoint", saved)
    resumed = train_baseline(_cfg(tiny, tmp_path / "cut", epochs=3))
    assert resumed.resumed_from == 1
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2, 3]
    # model, optimiser, schedule and RNG state restored: the same weights as the uninterrupted run
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_accuracy"] == straight.metrics["val_accuracy"]


def test_more_epochs_continue_the_checkpoint(tiny: Path, tmp_path: Path) -> None:
    # --epochs is not in the checkpoint key: --epochs 1 then --epochs 2 continues at epoch 1. From one epoch this
    # is exactly a 2-epoch run (epoch 1's rate is the base rate under any cosine length).
    train_baseline(_cfg(tiny, tmp_path / "two", epochs=2))
    train_baseline(_cfg(tiny, tmp_path / "more", epochs=1))
    first = _weights(tmp_path / "more")
    result = train_baseline(_cfg(tiny, tmp_path / "more", epochs=2))
    assert result.resumed_from == 1 and result.metrics["epochs"] == 2
    after = _weights(tmp_path / "more")
    assert not all(torch.equal(first[k], after[k]) for k in first)  # it trained on
    two = _weights(tmp_path / "two")
    assert all(torch.equal(two[k], after[k]) for k in two)


def test_a_checkpoint_of_other_settings_is_refused_unless_forced(tiny: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp_path / "bl")
    train_baseline(cfg)
    with pytest.raises(PipelineError, match="lr differ.*--force"):
        train_baseline(replace(cfg, lr=0.01))
    train_baseline(replace(cfg, epochs=2))
    with pytest.raises(PipelineError, match="already holds 2 epochs, more than --epochs 1"):
        train_baseline(cfg)
    forced = train_baseline(replace(cfg, lr=0.01, force=True))
    assert forced.resumed_from == 0
    config = json.loads((tmp_path / "bl" / "config.json").read_text())
    assert config["config"]["lr"] == 0.01


def test_other_images_are_refused(tiny: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp_path / "bl")
    train_baseline(cfg)
    write_image_folder(tiny, per_class=5, size=(20, 24))  # one more image per class
    with pytest.raises(PipelineError, match="dataset differ"):
        train_baseline(cfg)


def test_augment_keeps_shape_and_moves_pixels() -> None:
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    outs = [augment(x, generator=g) for _ in range(4)]
    assert all(o.shape == x.shape and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, x) for o in outs)


def test_compare_adds_the_baseline_row_with_times(tiny: Path, tmp_path: Path) -> None:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import compare, compare_table

    train_baseline(_cfg(tiny, tmp_path / "bl"))
    features = tmp_path / "f.h5"
    extract(ExtractConfig(dataset=str(tiny), backbone="resnet18", weights="none", image_size=32, device="cpu",
                          out=str(features), progress=False))  # fmt: skip
    result = compare(features, heads=["centroid"], base=HeadConfig(head="centroid"), out=tmp_path / "cmp",
                     baseline=tmp_path / "bl")  # fmt: skip
    head, scratch = result["rows"]
    assert scratch["head"] == "from scratch (resnet18)"
    metrics = json.loads((tmp_path / "bl" / "metrics.json").read_text())
    assert scratch["total_seconds"] == metrics["train_seconds"] > 0
    assert head["total_seconds"] == pytest.approx(result["extract_seconds"] + head["head_seconds"])
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["head"] for r in saved["rows"]] == ["centroid", "from scratch (resnet18)"]
    assert "from scratch (resnet18)" in compare_table(saved["rows"])
    assert "from scratch" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_refuses_a_baseline_of_other_images(tiny: Path, tmp_path: Path) -> None:
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import compare

    train_baseline(_cfg(tiny, tmp_path / "bl", limit=6))
    features = tmp_path / "f.h5"
    extract(ExtractConfig(dataset=str(tiny), backbone="resnet18", weights="none", image_size=32, device="cpu",
                          out=str(features), progress=False))  # fmt: skip
    with pytest.raises(PipelineError, match="other images"):
        compare(features, heads=["centroid"], base=HeadConfig(head="centroid"), out=tmp_path / "cmp",
                baseline=tmp_path / "bl")  # fmt: skip
    assert not (tmp_path / "cmp" / "centroid").exists()  # refused before any head was trained


def test_cli_baseline_and_compare(tiny: Path, tmp_path: Path) -> None:
    from pipeline.cli import main

    out = tmp_path / "bl"
    argv = ["baseline", "--dataset", str(tiny), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and (out / "metrics.json").is_file()
    with pytest.raises(SystemExit) as e:
        main([*argv[:-2], "--out", str(out), "--lr", "0.5"])
    assert e.value.code == 1  # a mismatched checkpoint: one line, exit 1


def test_array_splits_are_resized_per_batch_as_the_files_would_be() -> None:
    from pipeline.stage1.backbones import Preprocessing
    from pipeline.stage1.datasets import array_split

    arrays = np.random.default_rng(0).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    split = array_split(arrays, np.arange(5) % 2)
    pre = Preprocessing().with_crop(16)
    images = bl.split_images(split, pre)
    assert not images.resized and tuple(images.data.shape) == (5, 3, 20, 24)  # held as they are, not resized
    got = images.take(torch.tensor([3, 0]), torch.device("cpu"))
    assert torch.equal(got, torch.stack([pre.geometry(split.load(i)) for i in (3, 0)]))


def test_training_on_an_in_memory_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stage1.datasets import Source, array_split

    rng = np.random.default_rng(0)
    splits = {s: array_split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 2)
              for s, n in (("train", 9), ("val", 4))}  # fmt: skip
    source = Source(name="arrays", classes=["a", "b"], splits=splits, identity={"kind": "test"})
    monkeypatch.setattr(bl, "load_options", lambda opts: source)
    result = train_baseline(_cfg(Path("unused"), tmp_path / "bl", epochs=1))
    assert result.metrics["n_train"] == 9 and (tmp_path / "bl" / "metrics.json").is_file()


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code(tiny: Path, tmp_path: Path) -> None:
    """The checkpoint is read with weights_only=True: a pickle that would run code is refused in one line."""
    cfg = _cfg(tiny, tmp_path / "bl", epochs=1)
    marker = tmp_path / "marker"
    (tmp_path / "bl").mkdir()
    torch.save({"key_digest": "x", "key": {}, "evil": _Payload(marker)}, tmp_path / "bl" / "checkpoint.pt")
    with pytest.raises(PipelineError, match="cannot read .*checkpoint.pt"):
        train_baseline(cfg)
    assert not marker.exists()


def test_the_image_options_are_extracts_own() -> None:
    """baseline and extract share one definition of the options that pick the images, checks included."""
    from dataclasses import fields

    from pipeline.stage1.datasets import SourceOptions
    from pipeline.stage1.extract import ExtractConfig

    shared = {f.name: f for f in fields(SourceOptions)}
    for cls in (ExtractConfig, BaselineConfig):
        assert {f.name: f for f in fields(cls) if f.name in shared} == shared
        with pytest.raises(PipelineError, match="--split-seed must be between"):
            cls(split_seed=-1)
