"""Bad input, tried for real: each case ends in one clear line, a non-zero exit and nothing lost. Unusual but valid
images (greyscale, alpha, palettes, 16 bit, CMYK, very large, unicode names) must extract like any other."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.deploy.export import EXPORT_FORMAT, EXPORT_VERSION
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import Preprocessing
from pipeline.stage1.datasets import load_image
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HeadConfig, LinearHead, load_head, save_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, assert_one_line_error, run, write_image_folder
from tests.test_cli import TINY
from tests.test_reliability import one_thread  # noqa: F401 - autouse: one torch thread in this module

# ------------------------------------------------------------------------------------------ unreadable images


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _text_as_png(path: Path) -> None:
    path.write_text("just some notes, saved with the wrong name\n")


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("cat/half.jpg", _truncated_jpeg),
        ("cat/notes.png", _text_as_png),
        ("dog/empty.jpg", _zero_bytes),
        ("bird/cut.png", _truncated_png),
    ],
)
def test_unreadable_image_stops_with_its_name_or_is_skipped(name: str, make, tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=4)
    make(folder / name)
    out = tmp_path / "f.h5"
    args = ["extract", "--dataset", str(folder), "--val-fraction", "0.5", "--out", str(out), *TINY]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, f"cannot read image {name}", "--skip-bad")
    assert not out.exists()
    assert (folder / name).exists()  # nothing of the user's is touched

    code, text, _ = run([*args, "--skip-bad"], capsys)
    assert code == 0 and name in text and "skipped 1 unreadable" in text  # in the summary
    fs = read_features(out)
    assert name not in set(fs.train.ids) | set(fs.val.ids)
    assert len(fs.train) + len(fs.val) == 12  # every other image is there
    with h5py.File(out, "r") as f:  # and in the metadata
        skipped = [s for split in ("train", "val") for s in json.loads(f[split].attrs["skipped"])]
    assert skipped == [name]


# ------------------------------------------------------------------------------------------ bad folders


def test_empty_class_folder(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=3)
    (folder / "zebra").mkdir()
    (folder / "zebra" / "readme.txt").write_text("no pictures yet")
    code, _, err = run(["extract", "--dataset", str(folder), "--out", str(tmp_path / "f.h5"), *TINY], capsys)
    assert_one_line_error(code, err, "zebra", "has no images")
    assert not (tmp_path / "f.h5").exists()


def test_folder_with_one_class(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=3, classes=("cat",))
    code, _, err = run(["extract", "--dataset", str(folder), "--out", str(tmp_path / "f.h5"), *TINY], capsys)
    assert_one_line_error(code, err, "only one class (cat)", "at least two")


def test_folder_with_no_images(tmp_path: Path, capsys) -> None:
    loose = tmp_path / "loose"  # images, but not in class folders
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    code, _, err = run(["extract", "--dataset", str(loose), *TINY], capsys)
    assert_one_line_error(code, err, "no class folders")
    bare = tmp_path / "bare"  # class folders without a single image
    for c in ("cat", "dog"):
        (bare / c).mkdir(parents=True)
        (bare / c / "list.csv").write_text("x\n")
    code, _, err = run(["extract", "--dataset", str(bare), *TINY], capsys)
    assert_one_line_error(code, err, "has no images", "2 empty class folders")


@contextlib.contextmanager
def _read_only(folder: Path):
    """A folder this process cannot write into, even as root (where permission bits do not stop it)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: no way to make a folder read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_read_only_output_folder(image_folder: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    with _read_only(locked):
        code, _, err = run(["extract", "--dataset", str(image_folder), "--out", str(locked / "f.h5"), *TINY], capsys)
        assert_one_line_error(code, err, f"cannot write to {locked}")
        code, _, err = run(
            ["extract", "--dataset", str(image_folder), "--out", str(locked / "sub" / "f.h5"), *TINY], capsys
        )
        assert_one_line_error(code, err, f"cannot create output folder {locked / 'sub'}")
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------------ unusual, valid images


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _odd_images(folder: Path) -> list[str]:
    """Every unusual-but-valid kind, spread over classes whose names hold spaces and non-ASCII letters."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    palette_t = rgb.convert("P")
    kinds = {
        "chat noir/gris été.png": lambda p: rgb.convert("L").save(p),
        "chat noir/alpha.png": lambda p: rgb.convert("RGBA").save(p),
        "chat noir/grey alpha.png": lambda p: rgb.convert("LA").save(p),
        "chat noir/1 bit.png": lambda p: rgb.convert("1").save(p),
        "猫 ü/palette.png": lambda p: rgb.convert("P").save(p),
        "猫 ü/palette transparent.png": lambda p: palette_t.save(p, transparency=0),
        "猫 ü/16 bit grey.png": lambda p: Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(p),
        "猫 ü/48 bit.png": lambda p: _png16_rgb(p, rng.integers(0, 65535, (20, 24, 3))),
        "Ωmega/cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "Ωmega/фото 24 MP.jpg": lambda p: (
            Image.linear_gradient("L").resize((6000, 4000)).convert("RGB").save(p, "JPEG", quality=50)
        ),
        "Ωmega/tiny.gif": lambda p: rgb.resize((3, 2)).convert("P").save(p),
        "Ωmega/rgb.webp": lambda p: rgb.save(p, "WEBP"),
    }
    for rel, make in kinds.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        make(folder / rel)
    return sorted(kinds)


def test_unusual_images_and_names_extract(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "odd images"
    names = _odd_images(folder)
    out = tmp_path / "out dir ü" / "f.h5"
    code, text, err = run(
        ["extract", "--dataset", str(folder), "--out", str(out), "--val-fraction", "0.3", *TINY], capsys
    )
    assert code == 0, err
    assert "skipped" not in text
    fs = read_features(out)
    assert fs.classes == ["chat noir", "Ωmega", "猫 ü"]
    assert sorted(list(fs.train.ids) + list(fs.val.ids)) == names  # unicode and spaces survive the round trip
    for split in (fs.train, fs.val):
        assert np.isfinite(split.features).all()
        assert all(fs.classes[y] == i.split("/")[0] for y, i in zip(split.labels, split.ids))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(256 * 4).reshape(4, 256) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = np.asarray(load_image(tmp_path / "g16.png"))
    assert got.shape == (4, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], (ramp.astype(np.int64) * 255 // 65535).astype(np.uint8))
    _png16_rgb(tmp_path / "rgb48.png", np.full((2, 2, 3), 40000))
    assert np.asarray(load_image(tmp_path / "rgb48.png")).max() == 40000 >> 8


def test_images_past_pils_warning_size_extract(tmp_path: Path, monkeypatch) -> None:
    """PIL warns above MAX_IMAGE_PIXELS (a 100 MP photo does) and refuses above twice that. The threshold is
    lowered here so that the test stays small; the same code path runs."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    folder = write_image_folder(tmp_path / "img", per_class=2, classes=("a", "b"))
    Image.linear_gradient("L").resize((400, 300)).save(folder / "a" / "large.png")  # 120 k: warned, accepted
    result = extract(ExtractConfig(dataset=str(folder), out=str(tmp_path / "f.h5"), val_fraction=0.4, **TINY_EXTRACT))
    assert sum(result.counts.values()) == 5
    Image.linear_gradient("L").resize((500, 500)).save(folder / "b" / "bomb.png")  # 250 k: > 2x, refused by name
    with pytest.raises(PipelineError, match=r"cannot read image b/bomb.png: DecompressionBombError"):
        extract(ExtractConfig(dataset=str(folder), out=str(tmp_path / "g.h5"), val_fraction=0.4, **TINY_EXTRACT))


# ------------------------------------------------------------------------------------------ artifacts


class _Exploit:
    """Unpickling this would create the marker file: proof that a loader executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _trained_head(tmp_path: Path, *, dim: int = 8) -> Path:
    head = LinearHead(HeadConfig(), num_classes=3, feature_dim=dim)
    out = tmp_path / "head"
    save_head(head, out, config={"head_config": {"head": "linear"}, "classes": ["a", "b", "c"], "feature_dim": dim})
    return out


def test_a_pickle_in_place_of_a_head_is_refused_not_run(tmp_path: Path, capsys) -> None:
    head_dir = _trained_head(tmp_path)
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))  # the payload works when unpickled ...
    assert (tmp_path / "control").exists()
    (head_dir / "head.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(PipelineError, match="cannot load head"):
        load_head(head_dir)
    code, _, err = run(["export", "--head", str(head_dir), "--out", str(tmp_path / "m.pt2")], capsys)
    assert_one_line_error(code, err, "cannot load head")
    assert not marker.exists()  # ... and was never unpickled here


def test_a_pickle_as_backbone_weights_is_refused_not_run(image_folder: Path, tmp_path: Path, capsys) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    torch.save({"fc.weight": _Exploit(marker)}, evil)  # a real torch checkpoint with a payload inside
    code, _, err = run(
        [
            "extract",
            "--dataset",
            str(image_folder),
            "--out",
            str(tmp_path / "f.h5"),
            *TINY[:2],
            "--weights",
            str(evil),
            *TINY[4:],
        ],
        capsys,
    )
    assert_one_line_error(code, err, "cannot load weights file")
    assert not marker.exists() and not (tmp_path / "f.h5").exists()


def test_a_head_from_another_feature_dimension(tmp_path: Path, capsys) -> None:
    head_dir = _trained_head(tmp_path, dim=8)
    other = _trained_head(tmp_path / "other", dim=16)
    (head_dir / "head.safetensors").write_bytes((other / "head.safetensors").read_bytes())
    with pytest.raises(PipelineError, match="holds a 16-d head for 3 classes; its config says 8-d"):
        load_head(head_dir)
    code, _, err = run(["export", "--head", str(head_dir), "--out", str(tmp_path / "m.pt2")], capsys)
    assert_one_line_error(code, err, "16-d head", "8-d")
    assert not (tmp_path / "m.pt2").exists()


def test_logreg_on_a_train_split_with_one_class(make_feature_file, tmp_path: Path, capsys) -> None:
    """`extract --limit 1` can leave train with one class: sklearn's own error was a traceback; the read now
    refuses the classes without training rows, naming one."""
    features = make_feature_file(n_train=1, n_val=4)
    code, _, err = run(
        ["train-head", "--features", str(features), "--head", "logreg", "--out", str(tmp_path / "h")], capsys
    )
    assert_one_line_error(code, err, "0 training rows")


def test_a_model_json_without_class_names(image_folder: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.pt2"
    model.write_bytes(b"never read")
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "preprocessing": Preprocessing().as_dict()}
    model.with_suffix(".json").write_text(json.dumps(meta))
    code, _, err = run(["predict", "--model", str(model), str(image_folder), "--out", str(tmp_path / "p.csv")], capsys)
    assert_one_line_error(code, err, "cannot load model", "no classes")


def test_a_failing_compile_is_one_line_and_resumable(image_folder: Path, tmp_path: Path) -> None:
    """--compile where the compiler cannot run (here: a C++ compiler that always fails): one line, exit 1, and the
    same command without --compile resumes."""
    out = tmp_path / "f.h5"
    args = [*TINY, "--dataset", str(image_folder), "--out", str(out)]
    env = {**os.environ, "CXX": "/bin/false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "extract", *args]
    proc = subprocess.run([*cmd, "--compile"], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --compile failed"), proc.stderr
    assert not out.exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stderr
