"""Batch sources: JPEGs decoded by ``decode_jpeg`` (on the CPU here) against PIL, the fallbacks, and the defaults.

Measured here (torchvision 0.29 CPU decoder against PIL, 48-64 px photo-like JPEGs resized to 37 px and cropped to
32 px, ResNet18 random weights): identical pixels after decoding (both are libjpeg-turbo; the CMYK file too) and max abs
difference 1.0 grey level (mean 0.27) after the resize (the device resize works in float, PIL rounds to uint8),
features with minimum cosine 0.999995. nvJPEG on a GPU has its own IDCT and chroma upsampling: not measured here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.stage1.backbones import Preprocessing
from pipeline.stage1.batches import (
    BATCH_SOURCES,
    GpuDecodeSource,
    HostToDevice,
    LoaderSource,
    SourceSettings,
    choose_source,
    decode_jpegs,
    default_batch_size,
    default_workers,
)
from pipeline.stage1.datasets import array_split, load_folder
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT

CPU = torch.device("cpu")
PIXEL_TOL = 1.5  # max abs difference in grey levels, device resize of decoded JPEGs against PIL's uint8 resize
MIN_COSINE = 0.999


def _photo(rng: np.random.Generator, h: int, w: int, colour: tuple[int, int, int]) -> Image.Image:
    """Smooth gradients + texture noise: JPEG-compressible like a photo, not a flat colour."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.array(colour)[None, None, :] * (0.6 + 0.4 * np.sin(xx / 7.0 + yy / 11.0))[..., None]
    return Image.fromarray((base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8))


def write_jpeg_folder(root: Path, *, per_class: int = 6, odd: bool = True) -> Path:
    """Two classes of JPEGs in two sizes; with ``odd``, also a greyscale, a progressive and a CMYK JPEG, a PNG, a
    corrupt file with a JPEG header and a truncated JPEG."""
    rng = np.random.default_rng(0)
    for c, colour in (("red", (200, 70, 60)), ("blue", (60, 80, 210))):
        folder = root / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            _photo(rng, 48 if i % 2 else 64, 64 if i % 2 else 56, colour).save(folder / f"{i:03d}.jpg", quality=90)
    if odd:
        img = _photo(rng, 50, 60, (200, 70, 60))
        img.convert("L").save(root / "red" / "grey.jpg")
        img.save(root / "red" / "progressive.jpg", progressive=True)
        img.convert("CMYK").save(root / "red" / "cmyk.jpg")
        img.save(root / "blue" / "other.png")
        data = io.BytesIO()
        img.save(data, "JPEG")
        (root / "blue" / "corrupt.jpg").write_bytes(data.getvalue()[:40] + b"\0" * 300)
        (root / "blue" / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return root


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    return write_jpeg_folder(tmp_path / "jpegs")


BAD = {"blue/corrupt.jpg", "blue/truncated.jpg"}


def _settings(pre: Preprocessing, batch_size: int = 5, workers: int = 2) -> SourceSettings:
    return SourceSettings(pre=pre, device=CPU, batch_size=batch_size, workers=workers)


def _all(source_cls: type, split, settings: SourceSettings, start: int = 0):
    images, indices, bad = [], [], []
    for b in source_cls(split, settings).batches(start):
        if b.images is not None:
            images.append(b.images.float())
        indices += b.indices
        bad += b.bad
    return torch.cat(images), indices, bad


def test_gpu_decode_gives_the_loader_pixels_and_the_same_bad_files(jpeg_folder: Path) -> None:
    split = load_folder(jpeg_folder, val_fraction=0.2).splits["train"]
    pre = Preprocessing().with_crop(32)
    dec, dec_idx, dec_bad = _all(GpuDecodeSource, split, _settings(pre))
    pil, pil_idx, pil_bad = _all(LoaderSource, split, _settings(pre, workers=0))
    assert dec_idx == pil_idx and [i for i, _ in dec_bad] == [i for i, _ in pil_bad]
    assert {split.ids[i] for i, _ in dec_bad} == BAD & set(split.ids)
    assert dict(dec_bad) == dict(pil_bad)  # the same one-line reasons: PIL decides for files the decoder refuses
    assert dec.shape == pil.shape == (len(dec_idx), 3, 32, 32)
    diff = (dec - pil).abs()
    print(f"max abs pixel diff {diff.max():.2f}, mean {diff.mean():.3f}")
    assert diff.max() <= PIXEL_TOL


def test_gpu_decode_resumes_mid_split_in_order(jpeg_folder: Path) -> None:
    split = load_folder(jpeg_folder, val_fraction=0.2).splits["train"]
    pre = Preprocessing().with_crop(32)
    whole, idx, _ = _all(GpuDecodeSource, split, _settings(pre, batch_size=3))
    tail, tail_idx, _ = _all(GpuDecodeSource, split, _settings(pre, batch_size=3), start=4)
    assert tail_idx == [i for i in idx if i >= 4]
    assert torch.equal(tail, whole[len(idx) - len(tail_idx) :])


def test_decoder_refusals_are_per_file() -> None:
    """One bad file in a batch does not fail the others: the batch is retried file by file."""
    img = _photo(np.random.default_rng(1), 20, 30, (100, 150, 200))
    data = io.BytesIO()
    img.save(data, "JPEG")
    good = torch.frombuffer(bytearray(data.getvalue()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(data.getvalue()[:60]), dtype=torch.uint8)
    out = decode_jpegs([good, bad, good], device=CPU)
    assert out[1] is None and out[0].shape == out[2].shape == (3, 20, 30)
    assert torch.equal(out[0], torch.from_numpy(np.array(Image.open(data).convert("RGB"))).permute(2, 0, 1))


def test_gpu_decode_features_agree_with_the_loader(jpeg_folder: Path, tmp_path: Path) -> None:
    results = {}
    for mode in ("gpu-decode", "loader"):
        cfg = ExtractConfig(dataset=str(jpeg_folder), out=str(tmp_path / f"{mode}.h5"), preprocess=mode,
                            skip_bad=True, **{**TINY_EXTRACT, "batch_size": 4, "workers": 2})  # fmt: skip
        res = extract(cfg)
        results[mode] = (res, read_features(res.path))
    (r_dec, f_dec), (r_pil, f_pil) = results["gpu-decode"], results["loader"]
    assert r_dec.skipped == r_pil.skipped and set().union(*r_dec.skipped.values()) == BAD
    assert r_dec.fingerprint != r_pil.fingerprint  # the source is part of what made the features
    identity = f_dec.meta.identity  # a JSON string, or a dict once every attribute decodes to its written type
    assert (json.loads(identity) if isinstance(identity, str) else identity)["preprocess_on"] == "gpu-decode"
    for a, b in ((f_dec.train, f_pil.train), (f_dec.val, f_pil.val)):
        assert list(a.ids) == list(b.ids)
        x, y = a.features, b.features
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        print(f"feature cosine min {cos.min():.6f}")
        assert cos.min() > MIN_COSINE


def test_gpu_decode_stops_on_a_bad_file_without_skip_bad(jpeg_folder: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(dataset=str(jpeg_folder), out=str(tmp_path / "f.h5"), preprocess="gpu-decode",
                        **{**TINY_EXTRACT, "workers": 1})  # fmt: skip
    with pytest.raises(PipelineError, match=r"cannot read image blue/(corrupt|truncated)\.jpg: \w+Error: .*--skip-bad"):
        extract(cfg)


def test_auto_picks_a_source_by_device_and_data(jpeg_folder: Path) -> None:
    cuda = torch.device("cuda")
    files = load_folder(jpeg_folder, val_fraction=0.2).splits["train"]
    arrays = array_split(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    assert choose_source("auto", files, cuda) == "gpu-decode"
    assert choose_source("auto", arrays, cuda) == "device"
    assert choose_source("auto", files, CPU) == choose_source("auto", arrays, CPU) == "loader"
    assert choose_source("gpu-decode", files, CPU) == "gpu-decode"  # runs on the CPU too (tested above)
    with pytest.raises(PipelineError, match="gpu-decode needs a folder of image files"):
        choose_source("gpu-decode", arrays, cuda)
    assert set(BATCH_SOURCES) == {"loader", "device", "gpu-decode"}


def test_host_to_device_on_cpu_is_the_array() -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert torch.equal(HostToDevice(CPU)(a), torch.from_numpy(a))


class _Props:
    def __init__(self, gib: float):
        self.total_memory = int(gib * 2**30)


@pytest.mark.parametrize(
    ("gib", "crop", "expected"),
    [(141, 224, 512), (141, 96, 2048), (141, 32, 2048), (141, 384, 128), (24, 224, 256), (8, 224, 128)],
)
def test_default_batch_size_by_device(monkeypatch: pytest.MonkeyPatch, gib: float, crop: int, expected: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props(gib))
    assert default_batch_size(torch.device("cuda"), crop_size=crop) == expected
    assert default_batch_size(CPU, crop_size=crop) == 64


def test_default_workers_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(torch.device("cuda")) == 15 and default_workers(CPU) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert default_workers(torch.device("cuda")) == 16
