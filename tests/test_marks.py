"""The audit columns extraction fills (content digest and perceptual hash of every image), on the committed digits
through every batch source and layout, across a resume and torchrun; and ``--exclude`` on extract and compare."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.stage1.extract as ex
from pipeline.audit.config import AuditConfig
from pipeline.audit.plant import plant_faults
from pipeline.audit.run import audit
from pipeline.bench.fidelity import DEMO_WEIGHTS
from pipeline.bench.sources import digits, write_layouts
from pipeline.exclude import read_exclusion
from pipeline.imagehash import hamming, perceptual_hash
from pipeline.stage1.datasets import Source, array_split
from pipeline.stage1.extract import ExtractConfig, ExtractInterrupted, extract, plan_extraction
from pipeline.store import read_features
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_layouts(tmp_path_factory.mktemp("digits"), digits(per_class=5, classes=4), per_shard=4)


def _extract(out: Path, dataset: str, **kw: object) -> Path:
    extract(ExtractConfig(dataset=dataset, out=str(out), **{**TINY_EXTRACT, **kw}))
    return out


def _marks(path: Path) -> dict[str, tuple[list[str], list[str], list[int]]]:
    fs = read_features(path)
    return {s: (list(v.ids), list(v.digests), [int(h) for h in v.phash]) for s, v in fs.splits.items()}


def test_digests_are_the_file_bytes_and_every_layout_agrees(layouts: dict[str, str], tmp_path: Path) -> None:
    """Folder (loader, in 2 worker processes), gpu-decode (its PIL path: PNGs), a labels table, a Hugging Face
    folder and WebDataset shards: the same digest and hash for each image, the digest that of its file."""
    folder = _marks(_extract(tmp_path / "folder.h5", layouts["folder"], workers=2))
    root = Path(layouts["folder"])
    for ids, dig, ph in folder.values():
        assert ids and all(len(d) == 64 for d in dig)
        for i, d, h in zip(ids, dig, ph):
            assert d == hashlib.sha256((root / i).read_bytes()).hexdigest()
            assert h == perceptual_hash(Image.open(root / i).convert("RGB"))
    others = {
        "gpu-decode": _extract(tmp_path / "gd.h5", layouts["folder"], preprocess="gpu-decode"),
        "table": _extract(tmp_path / "csv.h5", layouts["csv_split"]),
        "hf": _extract(tmp_path / "hf.h5", layouts["hf"]),
        "shards": _extract(tmp_path / "wds.h5", layouts["shards"], val_dataset=layouts["val_shards"]),
    }
    for name, path in others.items():
        for split, (_, dig, ph) in _marks(path).items():  # every layout keeps the folder's row order
            assert dig == folder[split][1] and ph == folder[split][2], name


def test_arrays_digest_their_pixel_bytes_on_both_sources(tmp_path: Path) -> None:
    files = sorted(DIGITS.glob("[0-3]/*.png"))[::7][:24]
    pixels = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])
    labels = np.array([int(p.parent.name) for p in files])
    source = Source("digit-arrays", ["0", "1", "2", "3"], {"train": array_split(pixels[:16], labels[:16]),
                                                          "val": array_split(pixels[16:], labels[16:])})  # fmt: skip
    got = {}
    for mode in ("device", "loader"):  # the device source hashes on the host before the copy; loader in workers
        cfg = ExtractConfig(dataset="unused", out=str(tmp_path / f"{mode}.h5"), preprocess=mode, **TINY_EXTRACT)
        got[mode] = _marks(extract(cfg, plan=plan_extraction(cfg, source=source)).path)
    assert got["device"] == got["loader"]
    assert got["device"]["train"][1] == [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels[:16]]
    assert got["device"]["val"][2] == [perceptual_hash(Image.open(p)) for p in files[16:]]


def test_a_jpeg_hashed_at_reduced_scale_in_gpu_decode_stays_near_the_full_decode(tmp_path: Path) -> None:
    """gpu-decode hashes a JPEG from a draft decode (1/2 to 1/8 scale), loader from the full one: the digests are
    equal (the same bytes) and the hashes a few bits apart at most, far inside the audit's 4-bit rule."""
    for k, p in enumerate([*sorted(DIGITS.glob("0/*.png"))[:6], *sorted(DIGITS.glob("1/*.png"))[:6]]):
        big = Image.open(p).convert("RGB").resize((320, 320), Image.Resampling.BICUBIC)
        (tmp_path / "jpegs" / p.parent.name).mkdir(parents=True, exist_ok=True)
        big.save(tmp_path / "jpegs" / p.parent.name / f"{k}.jpg", quality=90)
    a = _marks(_extract(tmp_path / "gd.h5", str(tmp_path / "jpegs"), preprocess="gpu-decode"))
    b = _marks(_extract(tmp_path / "pil.h5", str(tmp_path / "jpegs"), preprocess="loader"))
    for split in a:
        assert a[split][1] == b[split][1]
        bits = [hamming(x, y) for x, y in zip(a[split][2], b[split][2])]
        print(f"{split}: draft vs full decode, hash bits apart: {bits}")
        assert max(bits) <= 3


def _interrupted_then_resumed(folder: str, out: Path, monkeypatch: pytest.MonkeyPatch, *, old_code: bool = False,
                              **kw: object) -> Path:  # fmt: skip
    """Extract into ``out``, stopped by a Ctrl-C on the third batch's forward (by the code before the audit columns
    with ``old_code``), then rerun to resume; the finished file."""
    if old_code:
        _as_before_the_columns(monkeypatch)
    real, calls = ex.embed_batch, [0]

    def stop(*a: object, **k: object) -> object:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "embed_batch", stop)
    with pytest.raises(ExtractInterrupted):
        _extract(out, folder, **kw)
    monkeypatch.undo()
    result = extract(ExtractConfig(dataset=folder, out=str(out), **{**TINY_EXTRACT, **kw}))
    assert result.resumed_from["train"] > 0
    return result.path


def _as_before_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraction as the code before the audit columns ran it: no columns, no marks computed."""
    from dataclasses import replace

    settings = ex.source_settings
    monkeypatch.setattr(ex, "output_columns", lambda backbone: {})
    monkeypatch.setattr(ex, "source_settings", lambda *a, **k: replace(settings(*a, **k), marks=False))


def test_a_resumed_extraction_has_the_columns_of_an_uninterrupted_one(layouts, tmp_path: Path, monkeypatch) -> None:
    kw = {"batch_size": 4, "workers": 2}
    whole = _marks(_extract(tmp_path / "whole.h5", layouts["folder"], **kw))
    assert _marks(_interrupted_then_resumed(layouts["folder"], tmp_path / "out.h5", monkeypatch, **kw)) == whole


def test_a_file_without_the_columns_is_still_read_and_reused(layouts, tmp_path: Path, monkeypatch) -> None:
    """Files written before extraction filled the columns: read (digests None), and up to date (not re-extracted)."""
    _as_before_the_columns(monkeypatch)
    old = _extract(tmp_path / "old.h5", layouts["folder"])
    assert read_features(old).train.digests is None
    monkeypatch.undo()
    again = extract(ExtractConfig(dataset=layouts["folder"], out=str(old), **TINY_EXTRACT))
    assert again.reused


def test_a_partial_file_begun_without_the_columns_resumes_without_them(layouts, tmp_path: Path, monkeypatch) -> None:
    whole = read_features(_extract(tmp_path / "whole.h5", layouts["folder"], batch_size=4))
    out = _interrupted_then_resumed(layouts["folder"], tmp_path / "out.h5", monkeypatch, old_code=True, batch_size=4)
    resumed = read_features(out)
    assert resumed.train.digests is None and resumed.val.phash is None
    np.testing.assert_array_equal(resumed.train.features, whole.train.features)


# ------------------------------------------------------------------------------------------ --exclude


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    """The audit of the planted digits (exact copies into val and within train), extracted through the real demo
    MobileNetV2: the file now has digests, so every exact copy is found as exact."""
    if not DEMO_WEIGHTS.is_file():
        pytest.skip(f"{DEMO_WEIGHTS} is built by `make demo`")
    root = tmp_path_factory.mktemp("planted")
    truth = plant_faults(DIGITS, root / "digits", near_size=64)
    features = root / "planted.h5"
    extract(ExtractConfig(dataset=str(root / "digits"), backbone="mobilenet_v2", weights=str(DEMO_WEIGHTS),
                          image_size=64, out=str(features), progress=False))  # fmt: skip
    report = audit(features, AuditConfig(device="cpu", thumbnails=False), out=root / "audit")
    return root, truth, report


def test_the_audit_reports_planted_copies_as_exact(planted: tuple) -> None:
    _, truth, report = planted
    assert report["near_duplicates"]["digests"] and report["near_duplicates"]["phash"]
    exact = {(p["id"], p["other_id"]) for p in report["leaks"] + report["duplicates"] if p["exact"]}
    exact |= {(b, a) for a, b in exact}
    assert all(tuple(p) in exact for p in truth.exact + truth.within)


def test_extract_and_compare_exclude_what_the_audit_flags(planted: tuple, tmp_path: Path, capsys) -> None:
    root, truth, report = planted
    audit_json = root / "audit" / "audit.json"
    exclusion = read_exclusion(str(audit_json))
    leaked_val = {p["id"] for p in report["leaks"]}
    assert {("val", i) for i in leaked_val} <= exclusion.pairs and len(exclusion) > len(leaked_val)
    args = ["--dataset", str(root / "digits"), *TINY_ARGS, "--exclude", str(audit_json)]
    code, out, _ = run(["extract", *args, "--out", str(tmp_path / "clean.h5")], capsys)
    assert code == 0 and exclusion.line() in out
    assert exclusion.line().startswith(f"excluding {len(exclusion)} images ({len(leaked_val)} leaks, ")
    clean = read_features(tmp_path / "clean.h5")
    assert not leaked_val & set(clean.val.ids)
    assert clean.meta.identity["exclude"] == exclusion.record()
    # compare on the whole file, leaving the same images out when it reads them
    whole = root / "planted.h5"
    cmp = ["compare", "--features", str(whole), "--heads", "logreg", "--device", "cpu", "--out", str(tmp_path / "c")]
    code, out, _ = run([*cmp, "--exclude", str(audit_json)], capsys)
    assert code == 0 and exclusion.line() in out
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    full = read_features(whole)
    assert result["n_val"] == len(full.val) - len({i for s, i in exclusion.pairs if s == "val"})
    assert result["exclude"] == exclusion.record()
    config = json.loads((tmp_path / "c" / "logreg" / "config.json").read_text())
    assert config["settings"]["exclude"] == exclusion.record() and config["n_val"] == result["n_val"]
    code, _, err = run(cmp, capsys)  # the same folder without --exclude: other settings
    assert_one_line_error(code, err, "other settings", "exclude")


def test_only_leaks_can_be_picked_and_unknown_ids_are_one_line(planted: tuple, tmp_path: Path, capsys) -> None:
    root, _, report = planted
    leaks = read_exclusion(f"{root / 'audit' / 'audit.json'}:leaks")
    assert leaks.pairs == {("val", p["id"]) for p in report["leaks"]}
    ids = tmp_path / "ids.txt"
    ids.write_text("# two that are not there\nval:0/9999.png\nnot-an-image.png\n")
    for cmd in (["extract", "--dataset", str(root / "digits"), *TINY_ARGS, "--out", str(tmp_path / "x.h5")],
                ["compare", "--features", str(root / "planted.h5"), "--heads", "logreg", "--device", "cpu",
                 "--out", str(tmp_path / "c")]):  # fmt: skip
        code, _, err = run([*cmd, "--exclude", str(ids)], capsys)
        assert_one_line_error(code, err, "2 of its 2 images are not in this data", "val:0/9999.png")
    code, _, err = run(["compare", "--features", str(root / "planted.h5"), "--exclude", f"{ids}:leaks"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1


def test_the_option_is_defined_once() -> None:
    from dataclasses import fields

    from pipeline.stage2.heads import HeadConfig

    helps = {c.__name__: next(f.metadata["help"] for f in fields(c) if f.name == "exclude")
             for c in (ExtractConfig, HeadConfig)}  # fmt: skip
    assert len(set(helps.values())) == 1 and "audit.json" in helps["ExtractConfig"]


def test_a_plain_list_scopes_bare_ids_to_every_split(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("3\nval:5\n\n# a comment\n")
    ex_ = read_exclusion(str(ids))
    assert ex_.keep("train", ["3", "5"]).tolist() == [False, True]
    assert ex_.keep("val", ["3", "5", "6"]).tolist() == [False, False, True]
    assert ex_.line() == f"excluding 2 images (2 listed) from {ids}"
