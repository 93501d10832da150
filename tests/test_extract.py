"""Stage one on a tiny folder: the HDF5 schema, reuse on the same fingerprint, refusal on a different one."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store import SCHEMA_VERSION, read_features, read_meta
from tests.conftest import TINY_EXTRACT, write_image_folder


def _run(folder: Path, out: Path, **kw: object):
    return extract(ExtractConfig(dataset=str(folder), out=str(out), **{**TINY_EXTRACT, **kw}))


def test_schema_of_a_written_file(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    result = _run(image_folder, out)
    assert result.counts == {"train": 15, "val": 3}  # stratified 20% of 6 per class -> 1 per class
    with h5py.File(out, "r") as f:
        for split, n in result.counts.items():
            assert f[f"{split}/features"].shape == (n, 512)
            assert f[f"{split}/features"].dtype == np.float32
            assert f[f"{split}/labels"].dtype == np.int64
            assert f[f"{split}/features"].chunks[1] == 512  # whole rows per chunk
        assert [c.decode() for c in f["classes"][:]] == ["bird", "cat", "dog"]
        attrs = dict(f.attrs)
        for key in (
            "schema_version",
            "backbone",
            "weights",
            "feature_dim",
            "preprocessing",
            "dataset",
            "created",
            "versions",
            "fingerprint",
        ):
            assert key in attrs, key
        assert attrs["schema_version"] == SCHEMA_VERSION and attrs["feature_dim"] == 512
        assert json.loads(attrs["preprocessing"])["crop_size"] == 32
        assert "torch" in json.loads(attrs["versions"])
    fs = read_features(out)
    ids = list(fs.train.ids) + list(fs.val.ids)
    assert sorted(ids) == sorted(f"{c}/{i:03d}.png" for c in ("bird", "cat", "dog") for i in range(6))
    for split in (fs.train, fs.val):  # the label of each row matches the class folder of its id
        assert all(fs.classes[y] == i.split("/")[0] for y, i in zip(split.labels, split.ids))
    assert not (tmp_path / "f.h5.tmp").exists()


def test_features_are_those_of_the_backbone(image_folder: Path, tmp_path: Path) -> None:
    """Rows equal the frozen model applied to the same preprocessed image, one by one."""
    import torch

    from pipeline.stage1.backbones import load_backbone
    from pipeline.stage1.datasets import load_image

    out = tmp_path / "f.h5"
    _run(image_folder, out)
    fs = read_features(out)
    bb = load_backbone("resnet18", weights="none", image_size=32)
    img = bb.preprocess.geometry(load_image(image_folder / fs.val.ids[0])).unsqueeze(0)
    with torch.inference_mode():
        expected = bb.model(bb.preprocess.normalize(img)).numpy()[0]
    np.testing.assert_allclose(fs.val.features[0], expected, rtol=1e-4, atol=1e-5)


def test_train_val_folders_are_used_as_given(split_image_folder: Path, tmp_path: Path) -> None:
    result = _run(split_image_folder, tmp_path / "f.h5")
    assert result.counts == {"train": 15, "val": 6}


def test_same_settings_reuse_the_file(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    first = _run(image_folder, out)
    mtime = out.stat().st_mtime_ns
    again = _run(image_folder, out)
    assert again.reused and again.fingerprint == first.fingerprint
    assert out.stat().st_mtime_ns == mtime
    forced = _run(image_folder, out, force=True)
    assert not forced.reused and forced.fingerprint == first.fingerprint


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 48},
        {"seed": 1},
        {"backbone": "mobilenet_v2"},
        {"limit": 4},
        {"dtype": "float16"},
        {"val_fraction": 0.5},
    ],
)
def test_other_settings_are_refused_without_force(image_folder: Path, tmp_path: Path, change: dict) -> None:
    out = tmp_path / "f.h5"
    first = _run(image_folder, out)
    with pytest.raises(PipelineError, match="other settings.*--force"):
        _run(image_folder, out, **change)
    assert read_meta(out).fingerprint == first.fingerprint  # nothing lost
    redone = _run(image_folder, out, force=True, **change)
    assert redone.fingerprint != first.fingerprint


def test_changed_images_change_the_fingerprint(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "img")
    out = tmp_path / "f.h5"
    first = _run(folder, out)
    write_image_folder(tmp_path / "img", per_class=7)  # one more image per class
    with pytest.raises(PipelineError, match="other settings"):
        _run(folder, out)
    assert _run(folder, tmp_path / "g.h5").fingerprint != first.fingerprint


def test_limit_samples_each_split(image_folder: Path, tmp_path: Path) -> None:
    result = _run(image_folder, tmp_path / "f.h5", limit=2)
    assert result.counts == {"train": 2, "val": 2}


def test_float16_storage(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    _run(image_folder, out, dtype="float16")
    assert read_features(out).train.features.dtype == np.float16


def test_random_weights_are_reproducible(image_folder: Path, tmp_path: Path) -> None:
    a = read_features(_run(image_folder, tmp_path / "a.h5").path)
    b = read_features(_run(image_folder, tmp_path / "b.h5").path)
    np.testing.assert_array_equal(a.train.features, b.train.features)


# ------------------------------------------------------------------------------------------ the loop (issue 13)


def test_resolved_defaults_are_recorded(image_folder: Path, tmp_path: Path) -> None:
    """batch_size/workers/compile None mean "by device": the file records the values that ran, not None."""
    res = _run(image_folder, tmp_path / "f.h5", batch_size=None, workers=None, compile=None)
    config = read_features(res.path).meta.config
    config = json.loads(config) if isinstance(config, str) else config
    assert config["batch_size"] == 64 and config["workers"] == 2 and config["compile"] is False
    assert config["pin_memory"] is False and config["prefetch"] == 2 and config["pad_to"] == 0


def test_padded_last_batch_gives_the_same_features(image_folder: Path, tmp_path: Path) -> None:
    """Padding every batch to one shape (CUDA, --compile) drops the padded rows: same rows, same features."""
    from dataclasses import replace

    from pipeline.stage1.extract import plan_extraction

    cfg = ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "pad.h5"), **{**TINY_EXTRACT, "batch_size": 4})
    plan = plan_extraction(cfg)
    padded = extract(cfg, plan=replace(plan, pad_to=8))  # 15 train rows: batches of 4 + 3, each padded to 8
    plain = _run(image_folder, tmp_path / "plain.h5", batch_size=4)
    a, b = read_features(padded.path), read_features(plain.path)
    assert len(a.train) == 15 and list(a.train.ids) == list(b.train.ids)
    np.testing.assert_allclose(a.train.features, b.train.features, rtol=1e-4, atol=1e-5)


def test_compile_is_chosen_by_device_and_run_size() -> None:
    import torch

    from pipeline.stage1.extract import COMPILE_BREAK_EVEN_IMAGES, resolve_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile(None, device=cuda, images=COMPILE_BREAK_EVEN_IMAGES)
    assert not resolve_compile(None, device=cuda, images=COMPILE_BREAK_EVEN_IMAGES - 1)
    assert not resolve_compile(None, device=cpu, images=10 * COMPILE_BREAK_EVEN_IMAGES)
    assert resolve_compile(True, device=cpu, images=1) and not resolve_compile(False, device=cuda, images=10**9)


def test_a_writer_thread_failure_is_one_line_and_keeps_the_tmp(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from pipeline.store import FeatureWriter, tmp_path_for

    real_append, calls = FeatureWriter.append, {"n": 0}

    def append(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_append(self, *a, **kw)

    monkeypatch.setattr(FeatureWriter, "append", append)
    out = tmp_path / "f.h5"
    with pytest.raises(PipelineError, match=r"^writing .*f\.h5\.tmp failed \(OSError: .*No space left.*\); rerun"):
        _run(image_folder, out, batch_size=2)
    assert not any(t.name == "feature-writer" for t in threading.enumerate())  # joined on the error path
    assert tmp_path_for(out).exists() and not out.exists()
    monkeypatch.setattr(FeatureWriter, "append", real_append)
    res = _run(image_folder, out, batch_size=2)  # resumes from what was committed
    assert res.counts == {"train": 15, "val": 3}
