"""The audit (python -m pipeline audit) on real images with planted faults, and its parts on tiny data.

The planted set: the committed digits (data/digits) as train/ and val/ folders, with 20 train images copied byte
for byte into val, 20 resized, shifted by one pixel and re-encoded as JPEG into val, 5 copied inside train and 20
moved into a wrong class folder; features from the real ImageNet MobileNetV2 at 64 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.audit.config import AuditConfig
from pipeline.audit.duplicates import Rows, exact_pairs, hamming, phash_pairs
from pipeline.audit.labels import choose_folds, confident_issues, fold_of
from pipeline.audit.neighbours import candidates, nearest, normalise
from pipeline.audit.plant import plant_faults
from pipeline.audit.run import audit
from pipeline.bench.fidelity import DEMO_WEIGHTS
from pipeline.cli import main
from pipeline.errors import PipelineError

from .browser import render_in_chromium
from .conftest import write_feature_file

DIGITS = Path("data/digits")


def _extract(dataset: Path, out: Path, *, backbone: str = "mobilenet_v2", weights: str = str(DEMO_WEIGHTS),
             size: int = 64) -> Path:  # fmt: skip
    from pipeline.stage1.config import ExtractConfig
    from pipeline.stage1.extract import extract

    extract(ExtractConfig(dataset=str(dataset), backbone=backbone, weights=weights, image_size=size, out=str(out),
                          progress=False))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    if not DEMO_WEIGHTS.is_file():
        pytest.skip(f"{DEMO_WEIGHTS} is built by `make demo`")
    root = tmp_path_factory.mktemp("planted")
    truth = plant_faults(DIGITS, root / "digits", near_size=64)
    features = _extract(root / "digits", root / "planted.h5")
    report = audit(features, AuditConfig(device="cpu"), out=root / "audit")
    return root, truth, report


def _pairs(report: dict) -> set[tuple[str, str]]:
    found = {(p["id"], p["other_id"]) for p in report["leaks"] + report["duplicates"]}
    return found | {(b, a) for a, b in found}


def test_every_planted_copy_found_and_near_copies_measured(planted: tuple) -> None:
    _, truth, report = planted
    found = _pairs(report)
    assert all(tuple(p) in found for p in truth.exact), "an exact copy across splits was missed"
    assert all(tuple(p) in found for p in truth.within), "an exact copy within train was missed"
    leaks = {(p["id"], p["other_id"]) for p in report["leaks"]}
    assert all(tuple(p) in leaks for p in truth.exact), "copies in val must be listed as leaks, val image first"
    planted_pairs = {tuple(p) for p in truth.exact + truth.near + truth.within}
    planted_pairs |= {(b, a) for a, b in planted_pairs}
    false = [p for p in report["leaks"] + report["duplicates"] if (p["id"], p["other_id"]) not in planted_pairs]
    near = sum(tuple(p) in found for p in truth.near)
    print(f"\nnear copies found: {near}/{len(truth.near)}, false flags: {len(false)} "
          f"(threshold {report['near_duplicates']['threshold']:.4f})")  # fmt: skip
    assert near >= 1, "no shifted, re-encoded copy found"
    assert len(false) <= len(truth.exact) // 4, f"too many false flags: {false[:3]}"


def test_near_copies_are_their_sources_nearest(planted: tuple) -> None:
    """The evidence the threshold works on: a shifted re-encoded copy's nearest train image is its source."""
    root, truth, _ = planted
    from pipeline.audit.run import file_rows
    from pipeline.store import read_features

    fs = read_features(root / "planted.h5")
    rows = file_rows(fs)
    X = np.concatenate([fs.train.features, fs.val.features])
    nb = nearest(X, k=10, device=torch.device("cpu"))
    pos = {s: i for i, s in enumerate(rows.ids)}
    hits = 0
    for copy, source in truth.near:
        train_nb = [j for j in nb.index[pos[copy]] if rows.split[j] == "train"]
        hits += bool(train_nb) and rows.ids[train_nb[0]] == source
    print(f"\nnear copies whose nearest train image is the source: {hits}/{len(truth.near)}")
    assert hits >= 0.9 * len(truth.near)


def test_moved_labels_rank_near_the_top(planted: tuple) -> None:
    _, truth, report = planted
    top50 = [it["id"] for it in report["label_issues"][:50]]
    recall = sum(m in top50 for m in truth.moved) / len(truth.moved)
    print(f"\nrecall at 50 of the {len(truth.moved)} moved labels: {recall:.2f}")
    assert recall >= 0.7
    first = next(it for it in report["label_issues"] if it["id"] in truth.moved)
    assert first["suggested"] != first["given"] and first["given"] == first["id"].split("/")[1]


def test_score_without_leaks_is_lower(planted: tuple) -> None:
    _, truth, report = planted
    s = report["score"]
    assert s["head"] == "pca-logreg" and "principal directions" in s["head_is"] and s["fit"]["n_iter"] > 0
    assert "principal directions" in report["summary"]["scored head"]
    assert s["n_leaked_val"] >= len(truth.exact)
    assert s["leaked_val_right"] == s["n_leaked_val"], "a copy of a train image should be classified right"
    assert s["val_accuracy_without_leaks"] < s["val_accuracy"]


def test_files_and_json_schema(planted: tuple) -> None:
    root, _, report = planted
    out = root / "audit"
    data = json.loads((out / "audit.json").read_text())
    for key in ("leaks", "duplicates"):
        assert data[key] and all({"id", "split", "other_id", "other_split", "similarity", "exact"} <= set(p)
                                 for p in data[key])  # fmt: skip
    assert all({"id", "split", "given", "suggested", "score"} <= set(it) for it in data["label_issues"])
    scores = [it["score"] for it in data["label_issues"]]
    assert scores == sorted(scores, reverse=True)
    assert all({"id", "split", "score"} <= set(it) for it in data["outliers"])
    proba = np.load(out / "oof_probabilities.npy")
    ids = json.loads((out / "oof_ids.json").read_text())
    assert proba.shape == (len(ids["ids"]), len(ids["classes"])) and np.allclose(proba.sum(1), 1, atol=1e-4)
    page = (out / "report.html").read_text()
    for section in ('id="leaks"', 'id="duplicates"', 'id="labels"', 'id="outliers"'):
        assert section in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= len(data["leaks"]) * 2
    assert "# Audit of" in (out / "audit.md").read_text()


# ------------------------------------------------------------------------------------------ the browser


def test_report_renders_in_chromium_with_every_image(planted: tuple, tmp_path: Path) -> None:
    root, _, _ = planted
    shot = tmp_path / "report.png"
    seen = render_in_chromium(root / "audit" / "report.html", tmp=tmp_path, screenshot=shot)
    assert seen["images"] > 0 and seen["broken"] == 0 and seen["errors"] == 0 and seen["console"] == []
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_moved_image_named_and_left_blank(tmp_path: Path) -> None:
    from .conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", per_class=6)
    features = _extract(folder, tmp_path / "f.h5", backbone="resnet18", weights="none", size=32)
    cfg = AuditConfig(device="cpu", top=50)
    first = audit(features, cfg, out=tmp_path / "a1")
    gone = first["outliers"][0]["id"]
    (folder / gone).unlink()
    report = audit(features, cfg, out=tmp_path / "a2")
    assert report["missing_images"] == [gone]
    page = (tmp_path / "a2" / "report.html").read_text()
    assert f"1 image(s) not found (moved since extraction?): {gone}" in page and 'class="blank"' in page
    assert report["folds"] < 5 and "folds instead of 5" in report["folds_note"]  # 1 val image per class


# ------------------------------------------------------------------------------------------ the parts


def test_blocked_search_matches_brute_force() -> None:
    X = normalise(torch.as_tensor(np.random.default_rng(0).normal(size=(700, 24)), dtype=torch.float32))
    S = X @ X.T
    S.fill_diagonal_(-2)
    want = S.topk(6, dim=1).values
    got, _ = candidates(X, k=6, block=64)  # many blocks: both sides of each block update
    assert torch.allclose(got.sort(1, descending=True).values, want, atol=1e-6)


def test_projected_search_rescored_exactly() -> None:
    X = np.random.default_rng(1).normal(size=(500, 300)).astype(np.float32)
    X[1] = X[0] * 3  # parallel: cosine 1 whatever the scale
    nb = nearest(X, k=3, device=torch.device("cpu"), search_dim=16)
    assert nb.index[0, 0] == 1 and nb.index[1, 0] == 0 and nb.sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    Z = normalise(torch.as_tensor(X)).numpy()
    assert np.allclose(nb.sim, np.einsum("nd,nkd->nk", Z, Z[nb.index]), atol=1e-5)


def test_confident_learning_flags_the_confidently_other() -> None:
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9], [0.2, 0.8], [0.85, 0.15]])
    labels = np.array([0, 0, 0, 1, 1, 1])  # the last is labelled 1 but looks like a 0
    rows, suggested, score = confident_issues(proba, labels)
    assert rows.tolist() == [5] and suggested.tolist() == [0] and score[0] == pytest.approx(0.85)


def test_folds_stratified_and_reduced_with_a_note() -> None:
    y = np.repeat([0, 1, 2], [10, 10, 3])
    assert choose_folds([y], folds=5) == (3, "3 folds instead of 5: a class has only 3 image(s) in a split")
    f = fold_of(y, folds=3, seed=0)
    assert all(set(f[y == c]) == {0, 1, 2} for c in range(3))


def test_exact_and_phash_pairs() -> None:
    hashes = np.array([0, 0xFFFF_0000_FFFF, 0b111 << 20, 2**63 - 1], np.uint64)
    split = np.array(["train"] * 2 + ["val"] * 2)
    rows = Rows(ids=np.array(list("abcd")), split=split, digests=np.array(["x", "y", "x", ""]), phash=hashes)
    assert exact_pairs(rows) == [(0, 2)]
    assert hamming(np.array([0b1011], np.uint64), np.array([0], np.uint64)).tolist() == [3]
    assert phash_pairs(rows, bits=3) == [(0, 2)]


def test_cli_writes_the_folder_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    features = write_feature_file(tmp_path / "f.h5", n_train=120, n_val=40)
    with pytest.raises(SystemExit) as e:
        main(["audit", "--features", str(features), "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert e.value.code == 0
    assert {"audit.json", "audit.md", "report.html", "oof_probabilities.npy", "oof_ids.json"} <= {
        p.name for p in (tmp_path / "a").iterdir()
    }
    assert "near-duplicate threshold" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["audit", "--features", str(tmp_path / "missing.h5")])
    assert e.value.code == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(PipelineError, match="--folds"):
        AuditConfig(folds=1)


def test_phash_is_evidence_on_a_flagged_pair_never_a_flag_alone() -> None:
    """Two images with the same hash are not a pair by that alone, even among each other's nearest neighbours (tiny
    images' hashes collide); on a pair the features flag, the hash is listed as evidence."""
    from pipeline.audit.duplicates import find_pairs

    rng = np.random.default_rng(0)
    X = normalise(torch.as_tensor(rng.normal(size=(40, 16)), dtype=torch.float32)).numpy()
    hashes = rng.integers(0, 2**63, 40).astype(np.uint64)
    hashes[1] = hashes[0]  # same hash, unrelated features
    rows = Rows(ids=np.array([str(i) for i in range(40)]), split=np.array(["train"] * 30 + ["val"] * 10), phash=hashes)
    nb = nearest(X, k=3, device=torch.device("cpu"), search_dim=0)
    nb.index[0, 0] = 1  # neighbours, but the features alone flag nothing at this threshold
    leaks, dups, _ = find_pairs(nb, rows, unit=X, threshold=10.0)
    assert not any(set(p["rows"]) == {0, 1} for p in dups + leaks)
    X[1] = X[0]  # now the features are the same: flagged, with the hash as evidence
    nb = nearest(X, k=3, device=torch.device("cpu"), search_dim=0)
    leaks, dups, _ = find_pairs(nb, rows, unit=X, threshold=10.0)
    assert any(set(p["rows"]) == {0, 1} and {"features", "phash"} <= set(p["evidence"]) for p in dups)


def test_best_head_read_from_a_given_compare_folder(tmp_path: Path) -> None:
    """--head best reads compare.json from --compare (a sweep's compare may live elsewhere), else the default folder."""
    from pipeline.audit.score import best_compared_head

    features = tmp_path / "f.h5"
    assert best_compared_head(features, tmp_path / "nowhere") is None
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "compare.json").write_text(json.dumps({"best": "mlp"}))
    assert best_compared_head(features, tmp_path / "sweep") == "mlp"
    assert AuditConfig(compare=str(tmp_path / "sweep")).compare == str(tmp_path / "sweep")


def _mutual_file(n: int = 240, seed: int = 0) -> tuple[np.ndarray, Rows]:
    """Random unit features of ``n`` rows (train then val) with random hashes; rows 1 and 3 are near copies of rows
    0 and 2 (cosine about 0.99: below the identical-features cut), with hashes 1 bit from their source's."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 24))
    X[1] = X[0] + 0.1 * rng.normal(size=24)
    X[3] = X[2] + 0.1 * rng.normal(size=24)
    X = normalise(torch.as_tensor(X, dtype=torch.float32)).numpy()
    hashes = rng.integers(0, 2**63, n).astype(np.uint64)
    hashes[1], hashes[3] = hashes[0] ^ np.uint64(1), hashes[2] ^ np.uint64(4)
    split = np.array(["train"] * (n * 3 // 4) + ["val"] * (n - n * 3 // 4))
    return X, Rows(ids=np.array([str(i) for i in range(n)]), split=split, phash=hashes)


def test_rank_rule_flags_near_copies_with_the_hash_as_evidence() -> None:
    """With hashes in the file and ``--near-rule ranks``: the near copies (top similarity, margin and hash ranks) are
    flagged at the threshold the file gives, with the hash listed as evidence. Like the evidence score's,
    its threshold flags a share of the pairs of random features (the file-relative cut has no null of its own:
    docs/audit.md), fewer than the score's."""
    from pipeline.audit.duplicates import find_pairs

    X, rows = _mutual_file(n=2000)
    nb = nearest(X, k=5, device=torch.device("cpu"), search_dim=0)
    leaks, dups, info = find_pairs(nb, rows, unit=X, rule="ranks")
    assert info["rule"] == "ranks" and not info["threshold_given"]
    found = {tuple(p["rows"]): p["evidence"] for p in leaks + dups}
    assert found[(0, 1)] == found[(2, 3)] == ["features", "phash"]
    leaks, dups, info = find_pairs(nb, rows, unit=X)  # the default: the evidence score and its own threshold
    assert info["rule"] == "score"
    rows.phash = None  # ranks need hashes: without them, the evidence score
    leaks, dups, info = find_pairs(nb, rows, unit=X, rule="ranks")
    assert info["rule"] == "score" and {(0, 1), (2, 3)} <= {tuple(p["rows"]) for p in leaks + dups}
    assert len(found) < len(leaks + dups), "the rank rule should flag fewer random pairs than the score"


def test_rank_rule_never_flags_on_the_hash_alone() -> None:
    """Even where the rank cut lets every mutual pair through (--threshold 0), a pair whose features' own ranks are
    below their median is not flagged, however close its hashes."""
    from pipeline.audit.duplicates import evidence, find_pairs, mutual_pairs, rank_evidence

    X, rows = _mutual_file(seed=1)
    nb = nearest(X, k=5, device=torch.device("cpu"), search_dim=0)
    same, other = evidence(nb, rows.split, same=True), evidence(nb, rows.split, same=False)
    a, b, sim, margin = mutual_pairs(same, other)
    features, _ = rank_evidence(sim, margin)
    weak = int(np.argmin(features))
    rows.phash[b[weak]] = rows.phash[a[weak]]  # the same hash on the pair the features say least about
    leaks, dups, _ = find_pairs(nb, rows, unit=X, threshold=0.0, rule="ranks")
    flagged = {tuple(sorted(p["rows"])) for p in leaks + dups}
    assert (int(a[weak]), int(b[weak])) not in flagged
    assert flagged == {(int(i), int(j)) for i, j, f in zip(a, b, features) if f >= np.median(features)}


def test_rank_evidence_orders_by_every_component() -> None:
    from pipeline.audit.duplicates import rank_evidence

    sim, margin, bits = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.1, 0.2, 0.05, 0.01]), np.array([2, 30, 30, 40])
    ranks, features = rank_evidence(sim, margin, bits)
    assert np.allclose(features, rank_evidence(sim, margin)[0])
    assert np.argmax(ranks) == 0 and np.argmin(ranks) == 3  # first by similarity and hash, last by all three
    assert np.all(ranks >= features) and ranks[1] > ranks[2]  # a larger margin ranks higher at equal bits


def test_scored_head_loaded_from_compare_not_refitted(tmp_path: Path) -> None:
    """--head names a head compare saved for this very file: the audit scores that head, loaded, and says so."""
    features = write_feature_file(tmp_path / "f.h5", n_train=120, n_val=40)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--features", str(features), "--heads", "centroid", "--out", str(tmp_path / "cmp")])
    assert e.value.code == 0
    cfg = AuditConfig(device="cpu", compare=str(tmp_path / "cmp"), thumbnails=False)
    assert cfg.head == "best"  # the default: the score compare showed, with and without the leaks
    report = audit(features, cfg, out=tmp_path / "a")
    assert (
        report["score"]["head"] == "centroid"
        and f"saved in {tmp_path / 'cmp' / 'centroid'}" in report["score"]["head_is"]
    )
    other = write_feature_file(tmp_path / "g.h5", n_train=100, n_val=40)  # another file: that head is not its
    fitted = audit(other, cfg, out=tmp_path / "b")
    assert "fitted on train" in fitted["score"]["head_is"]
    with pytest.raises(PipelineError, match="--head must be one of"):
        AuditConfig(head="tail")


def test_thumbnails_come_from_labels_tables_and_imagefolders_too(tmp_path: Path) -> None:
    """The audit reads thumbnails through the reader errors.png uses: a labels table's or a Hugging Face
    imagefolder's ids are files under its root as a folder's are (they were blank before); a moved file is None."""
    from types import SimpleNamespace

    from PIL import Image

    from pipeline.audit.report import thumbnail_reader

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8), 200).save(tmp_path / "imgs" / "a.png")
    for kind in ("folder", "table", "imagefolder"):
        read = thumbnail_reader(SimpleNamespace(dataset_identity={"kind": kind, "root": str(tmp_path)}))
        img = read("train", "imgs/a.png")
        assert img is not None and img.mode == "RGB" and img.size == (8, 8) and img.getpixel((0, 0)) == (200,) * 3
        assert read("train", "imgs/moved.png") is None
    assert thumbnail_reader(SimpleNamespace(dataset_identity={"kind": "shards"}))("train", "k") is None


def test_audit_unit_rows_of_huge_and_tiny_features_and_the_input_kept() -> None:
    """The audit's cosine similarities take k-NN's normalisation: rows of 1e30 (whose squares overflow float32) and
    of 1e-30 are unit rows, not zeros, and the caller's tensor is not changed."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 16, generator=g)
    unit = X / X.norm(dim=1, keepdim=True)
    scaled = X * torch.tensor([1e-30, 1.0, 1e30, 1.0, 1e-20, 1e17])[:, None]
    before = scaled.clone()
    torch.testing.assert_close(normalise(scaled), unit, rtol=1e-5, atol=1e-6)
    assert torch.equal(scaled, before)
