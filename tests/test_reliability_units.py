"""Issue 24, items 3 to 7: one listing and one pixel policy for extract and predict; a head folder and an export
each one unit under a kill; tracebacks turned into one line; silent failures made loud."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.deploy.predict import Classifier, collect_images, predict
from pipeline.stage1 import datasets
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.datasets import list_images, load_folder
from tests.conftest import write_image_folder


@pytest.fixture(scope="module")
def clf() -> Classifier:
    bb = load_backbone("resnet18", weights="none", image_size=32, seed=0)
    torch.manual_seed(0)
    bb.model.fc = torch.nn.Linear(512, 3)
    return Classifier(bb.model.eval(), ["a", "b", "c"], bb.preprocess)


# ------------------------------------------------------------------------------------------ item 3: one listing


def test_predict_lists_a_folder_as_extract_does(tmp_path: Path) -> None:
    """Issue 24 item 3: "predict recurses into hidden folders that extract skips": one listing for both."""
    root = write_image_folder(tmp_path / "img", per_class=2)
    hidden = root / "cat" / ".thumbnails"
    hidden.mkdir()
    Image.new("RGB", (8, 8)).save(hidden / "t.png")
    Image.new("RGB", (8, 8)).save(root / "cat" / ".dot.png")
    os.mkfifo(root / "dog" / "pipe.png")
    listed = collect_images([root])
    assert all(".thumbnails" not in str(p) and ".dot" not in p.name and p.name != "pipe.png" for p in listed)
    problems: list[str] = []
    assert listed == list_images(root, problems) and problems == ["dog/pipe.png (not a regular file)"]
    extracted = load_folder(root)
    assert sorted(str(p.relative_to(root)) for p in listed) == sorted(extracted.files)


def _jpeg_declaring(w: int, h: int) -> bytes:
    """A valid small JPEG whose header (SOF0) is edited to declare w x h pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("preprocess", ["loader", "gpu-decode"])
def test_one_pixel_policy_for_every_reader(clf: Classifier, tmp_path: Path, monkeypatch, preprocess: str) -> None:
    """Issue 24 item 3: "uses Pillow's 179 MP limit where extract uses 120 MP: one policy for both". The JPEG
    decoder of gpu-decode (extract's and predict's source on a GPU) now refuses a header over the cap as PIL does."""
    monkeypatch.setattr(datasets, "MAX_PIXELS", 1_000)
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(_jpeg_declaring(40, 40))  # 1,600 pixels
    Image.new("RGB", (20, 20)).save(folder / "ok.jpg")  # 400 pixels
    out = tmp_path / "p.csv"
    result = predict(clf, [folder], out=out, progress=False, device="cpu", preprocess=preprocess, workers=0)
    assert list(result.failed) == [str(folder / "big.jpg")]
    assert "40x40 pixels is over the 0-megapixel limit" in result.failed[str(folder / "big.jpg")]
