"""predict reads through extraction's batch sources: every source gives today's per-image PIL answers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.deploy.predict import Classifier, collect_images, predict
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.datasets import load_image

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"


@pytest.fixture(scope="module")
def clf() -> Classifier:
    """A random-weight ResNet18 with a 3-class head (weights=None: fast, no download)."""
    bb = load_backbone("resnet18", weights="none", image_size=64, seed=0)
    torch.manual_seed(0)
    bb.model.fc = torch.nn.Linear(512, 3)
    model = bb.model.eval().to(memory_format=torch.channels_last)
    return Classifier(model, ["a", "b", "c"], bb.preprocess)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few real digit images in two class folders, plus one truncated file."""
    root = tmp_path_factory.mktemp("imgs")
    for cls in sorted(p for p in DIGITS.iterdir() if p.is_dir())[:2]:
        (root / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:5]:
            shutil.copy(f, root / cls.name / f.name)
    good = next((root).rglob("*.*"))
    (root / "bad.png").write_bytes(good.read_bytes()[:60])  # truncated
    return root


def expected(clf: Classifier, paths: list[Path]) -> dict[str, torch.Tensor | None]:
    """Yesterday's path: PIL one image at a time in this process, then the model (None: unreadable)."""
    out: dict[str, torch.Tensor | None] = {}
    with torch.inference_mode():
        for p in paths:
            try:
                img = clf.preprocess.geometry(load_image(p))
            except Exception:  # noqa: BLE001 - the file that cannot be read
                out[str(p)] = None
                continue
            x = clf.preprocess.normalize(img[None])
            out[str(p)] = torch.softmax(clf.module(x).float(), dim=1)[0]
    return out


@pytest.mark.parametrize(("preprocess", "workers"), [("loader", 0), ("loader", 2), ("gpu-decode", 1), ("auto", None)])
def test_every_source_gives_todays_answers(
    clf: Classifier, folder: Path, tmp_path: Path, preprocess: str, workers: int | None
) -> None:
    want = expected(clf, collect_images([folder]))
    out = tmp_path / "p.csv"
    r = predict(clf, [folder], out=out, batch_size=4, top_k=3, progress=False, preprocess=preprocess, workers=workers)
    rows = {row["path"]: row for row in csv.DictReader(out.open(encoding="utf-8"))}
    assert set(rows) == set(want) and r.n_images == len(want)
    bad = [p for p, v in want.items() if v is None]
    assert bad == [str(folder / "bad.png")] and set(r.failed) == set(bad)
    for path, proba in want.items():
        row = rows[path]
        if proba is None:
            assert row["error"] and not row["class"]
            continue
        assert not row["error"]
        p, k = proba.topk(3)
        assert [row["class"], row["class_2"], row["class_3"]] == [clf.classes[i] for i in k.tolist()]
        got = torch.tensor([float(row[c]) for c in ("probability", "probability_2", "probability_3")])
        torch.testing.assert_close(got, p, atol=1e-5, rtol=0)
