"""compare's and the leaderboard's report.html: one self-contained page showing the table in the task's columns,
the "best on val" line and every figure the folder holds (each head's worst-predicted images first), rendered in
headless Chromium with every image decoded and no console message; classification on real image files, regression
and multi-label on synthetic features; and the page blocks of pipeline.html the audit report shares."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.html import esc, figure, page, table
from pipeline.stage2.comparing import compare
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.leaderboard import COLUMNS, leaderboard
from pipeline.stage2.report import best_line, cells
from pipeline.stage2.tasks import task_of_rows
from tests.browser import render_in_chromium
from tests.conftest import TINY_EXTRACT, run, write_image_folder

FAST = HeadConfig(head="logreg", device="cpu", epochs=5)


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _inlined(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def _hrefs(html: str) -> list[str]:
    return [h for h in re.findall(r'href="([^"]+)"', html) if not h.startswith("#")]


def assert_self_contained(html: str, root: Path) -> None:
    """No script, nothing fetched; every figure under ``root`` inlined byte for byte; every link a file there."""
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "<img" in html and 'src="data:image/png;base64,' in html
    for png in _pngs(root):
        if png.parent == root or png.parent.parent == root:  # compare.png and the heads' figures
            assert _inlined(png) in html, f"{png.relative_to(root)} is not on the page"
    for href in _hrefs(html):
        assert (root / href).is_file(), f"link to {href}: no such file in {root}"


@pytest.fixture(scope="module")
def on_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Real image files (a 3-class folder) -> resnet18 features -> compare of three heads."""
    from pipeline.stage1.config import ExtractConfig
    from pipeline.stage1.extract import extract

    tmp = tmp_path_factory.mktemp("pages")
    folder = write_image_folder(tmp / "imgs", per_class=10)
    extract(ExtractConfig(dataset=str(folder), out=str(tmp / "f.h5"), **TINY_EXTRACT))
    result = compare(tmp / "f.h5", heads=["logreg", "centroid", "mlp"], base=FAST, out=tmp / "cmp")
    return tmp, tmp / "cmp", result


def test_compare_page_shows_the_tasks_table_the_best_line_and_every_figure(on_images: tuple) -> None:
    _, root, result = on_images
    html = (root / "report.html").read_text()
    rows = result["rows"]
    columns = task_of_rows(rows).table_columns(rows)
    for header, _, _ in columns:  # every column of the task, and every head's cells in them
        assert f"<th>{esc(header)}</th>" in html
    for row_cells in cells(columns, rows):
        assert "".join(f"<td>{esc(c)}</td>" for c in row_cells) in html
    assert {"val acc", "95% interval", "tied", "fit s", "eval s", "head s"} <= {h for h, _, _ in columns}
    assert esc(best_line(result)) in html and '<tr class="best">' in html
    tied = result["best_tied_with"]  # 3 val images per class: the heads tie, and the page says with which
    assert tied and f"(tied with {', '.join(tied)}: not significantly different on val" in html
    assert all("<td>yes (p=" in html.split(f"<td>{h}</td>")[1].split("</tr>")[0] for h in tied)
    assert_self_contained(html, root)
    for head in ("logreg", "centroid", "mlp"):  # each head: its worst-predicted images and predictions.csv linked
        assert (root / head / "errors.png").is_file() and f'href="{head}/predictions.csv"' in html
        section = html.split(f'id="head-{head}"')[1].split("<h2")[0]
        first = re.search(r'<img src="([^"]+)"', section)[1]
        assert first == _inlined(root / head / "errors.png")  # the misclassified grid leads the head's figures
    assert _inlined(root / "mlp" / "curves.png") in html  # a figure only one head draws
    assert html.count("<img") == len(_pngs(root))


def test_compare_page_renders_in_chromium(on_images: tuple) -> None:
    tmp, root, _ = on_images
    shot = tmp / "compare.png.shot.png"
    seen = render_in_chromium(root / "report.html", tmp=tmp, screenshot=shot)
    assert seen["images"] == len(_pngs(root)) and seen["broken"] == 0
    assert seen["errors"] == 0 and seen["console"] == []
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_cli_lists_report_html(on_images: tuple, capsys: pytest.CaptureFixture) -> None:
    tmp, _, _ = on_images
    args = ["compare", "--features", str(tmp / "f.h5"), "--heads", "centroid", "--out", str(tmp / "cli")]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "report.html" in out.splitlines()[-1] and (tmp / "cli" / "report.html").is_file()


# ------------------------------------------------------------------------------------------ other tasks


def test_regression_page_has_the_regression_columns_and_figures(tmp_path: Path) -> None:
    from tests.test_regression import write_regression_file

    path = write_regression_file(tmp_path / "r.h5", noise=5.0)
    base = HeadConfig(head="ridge", device="cpu", epochs=5, lr=1e-2)
    result = compare(path, heads=["ridge", "linear"], base=base, out=tmp_path / "cmp")
    html = (tmp_path / "cmp" / "report.html").read_text()
    columns = task_of_rows(result["rows"]).table_columns(result["rows"])
    assert all(f"<th>{esc(h)}</th>" in html for h, _, _ in columns) and "<th>val R^2</th>" in html
    assert "<th>val acc</th>" not in html
    assert all("".join(f"<td>{esc(c)}</td>" for c in r) in html for r in cells(columns, result["rows"]))
    assert _inlined(tmp_path / "cmp" / "ridge" / "regression.png") in html
    assert_self_contained(html, tmp_path / "cmp")
    seen = render_in_chromium(tmp_path / "cmp" / "report.html", tmp=tmp_path)
    assert seen["images"] == len(_pngs(tmp_path / "cmp")) and seen["broken"] == 0 and seen["console"] == []


def _multilabel_file(path: Path, *, n_train: int = 240, n_val: int = 120, labels: int = 3) -> Path:
    """Features whose first ``labels`` columns say which labels an image has (plus noise), through the one writer."""
    from pipeline.store import FeatureWriter, MultiHot

    rng = np.random.default_rng(0)
    dim, sizes, hot = 8, {"train": n_train, "val": n_val}, {}
    names = [f"l{j}" for j in range(labels)]
    meta = {"fingerprint": "synthetic-multi", "backbone": "synthetic", "weights": "none", "feature_dim": dim,
            "num_classes": labels, "dataset": "synthetic", "label_kind": "multi"}  # fmt: skip
    w = FeatureWriter(path, meta=meta, classes=names, sizes=sizes, feature_dim=dim)
    for split, n in sizes.items():
        m = (rng.random((n, labels)) < 0.4).astype(np.uint8)
        X = rng.normal(0, 0.3, (n, dim)).astype(np.float32)
        X[:, :labels] += 2 * m
        ids = [f"{split}{i}" for i in range(n)]
        w.append(split, X, np.full(n, -1), ids, seen=n)
        hot[split] = (ids, m)
    w.finish(multi_hot=MultiHot(hot))
    return path


def test_multi_label_page_has_the_multi_label_columns(tmp_path: Path) -> None:
    path = _multilabel_file(tmp_path / "m.h5")
    result = compare(path, heads=["knn", "linear"], base=replace(FAST, head="knn"), out=tmp_path / "cmp")
    html = (tmp_path / "cmp" / "report.html").read_text()
    columns = task_of_rows(result["rows"]).table_columns(result["rows"])
    assert "<th>val mAP</th>" in html and all(f"<th>{esc(h)}</th>" in html for h, _, _ in columns)
    assert {"95% interval", "tied", "eval s", "head s"} <= {h for h, _, _ in columns}
    for head in ("knn", "linear"):  # no image files behind these features: no errors.png, the answers linked
        assert f'href="{head}/predictions.csv"' in html
    assert all("".join(f"<td>{esc(c)}</td>" for c in r) in html for r in cells(columns, result["rows"]))
    assert esc(best_line(result)) in html
    assert_self_contained(html, tmp_path / "cmp")
    seen = render_in_chromium(tmp_path / "cmp" / "report.html", tmp=tmp_path)
    assert seen["images"] == len(_pngs(tmp_path / "cmp")) and seen["broken"] == 0 and seen["console"] == []


# ------------------------------------------------------------------------------------------ leaderboard


def test_leaderboard_page_shows_its_table_plot_and_each_runs_page(tmp_path: Path) -> None:
    from tests.test_leaderboard import _file

    same = {"kind": "folder", "root": "/a", "split": "stratified val_fraction=0.2 seed=0", "files_sha256": "x"}
    a, b = _file(tmp_path / "a.h5", identity=same), _file(tmp_path / "b.h5", identity=same, seed=1)
    result = leaderboard([a, b], heads=["logreg", "centroid"], base=FAST, out=tmp_path / "lb")
    root = tmp_path / "lb"
    html = (root / "report.html").read_text()
    assert all(f"<th>{esc(h)}</th>" in html for h, _, _ in COLUMNS)
    assert all("".join(f"<td>{esc(c)}</td>" for c in r) in html for r in cells(COLUMNS, result["rows"]))
    assert _inlined(root / "leaderboard.png") in html
    runs = sorted(root.glob("*/*/report.html"))
    assert len(runs) == 2 and all(f'href="{r.relative_to(root).as_posix()}"' in html for r in runs)
    for href in _hrefs(html):
        assert (root / href).is_file()
    seen = render_in_chromium(root / "report.html", tmp=tmp_path)
    assert seen["images"] == 1 and seen["broken"] == 0 and seen["console"] == []


# ------------------------------------------------------------------------------------------ the blocks


def test_blocks_escape_and_say_when_a_figure_is_missing(tmp_path: Path) -> None:
    doc = page("a <b> & c", table([["<x>", 1.5]], header=["k", "v"], row_headers=True, row_classes=["best"]))
    assert "<title>a &lt;b&gt; &amp; c</title>" in doc and "<script" not in doc
    assert '<tr class="best"><th>&lt;x&gt;</th><td>1.5</td></tr>' in doc and "<tr><th>k</th><th>v</th></tr>" in doc
    assert figure(tmp_path / "gone.png") == '<p class="note">gone.png: not found</p>'
