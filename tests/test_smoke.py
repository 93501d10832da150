from pathlib import Path

from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.train import train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT


def test_extract_then_train_on_a_folder(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    result = extract(ExtractConfig(dataset=str(image_folder), out=str(out), **TINY_EXTRACT))
    assert not result.reused and out.exists()
    fs = read_features(out)
    assert fs.classes == ["bird", "cat", "dog"]
    assert len(fs.train) + len(fs.val) == 18 and fs.train.features.shape[1] == 512
    metrics = train_head(out, HeadConfig(head="logreg"), out=tmp_path / "head")
    assert metrics["val_accuracy"] > 0.6
    assert (tmp_path / "head" / "metrics.json").exists()
