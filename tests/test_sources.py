"""Labels tables, Hugging Face imagefolders and WebDataset shards: the same real images (data/digits) read from
each give the same features as a class folder, and every downstream option works on them unchanged."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.stage1.extract as ex
from pipeline.bench.sources import digits, write_layouts, write_shards
from pipeline.errors import PipelineError
from pipeline.stage1.batches import GpuDecodeSource, LoaderSource, choose_source
from pipeline.stage1.datasets import rank_rows
from pipeline.stage1.extract import ExtractConfig, ExtractInterrupted, extract
from pipeline.stage1.shards import ShardReader, expand_braces, shard_names
from pipeline.stage1.sources import load_dataset
from pipeline.store import read_features, read_meta
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """4 digits x 6 real images (1 of each for val) in every layout; 5 train shards of 4 samples."""
    return write_layouts(tmp_path_factory.mktemp("digits"), digits(per_class=6, classes=4), per_shard=4)


def _extract(tmp: Path, name: str, dataset: str, **kw: object) -> Path:
    out = tmp / f"{name}.h5"
    extract(ExtractConfig(dataset=dataset, out=str(out), **{**TINY_EXTRACT, **kw}))
    return out


def _assert_identical(a: Path, b: Path) -> None:
    """Bit-identical features, the same labels and classes (ids are each source's own names)."""
    fa, fb = read_features(a), read_features(b)
    assert fa.classes == fb.classes
    for name in ("train", "val"):
        assert len(fa.splits[name].labels) > 0
        np.testing.assert_array_equal(fa.splits[name].labels, fb.splits[name].labels)
        np.testing.assert_array_equal(fa.splits[name].features, fb.splits[name].features)


@pytest.fixture(scope="module")
def folder_files(layouts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ref")
    return {"split": _extract(tmp, "folder", layouts["folder"]), "flat": _extract(tmp, "flat", layouts["flat"])}


def test_a_csv_with_a_split_column_equals_the_split_folders(layouts, folder_files, tmp_path: Path) -> None:
    out = _extract(tmp_path, "csv", layouts["csv_split"])
    _assert_identical(folder_files["split"], out)
    f = read_features(out)
    rows = csv.DictReader(Path(layouts["csv_split"]).read_text().splitlines())
    val_rows = [r["path"] for r in rows if r["split"] == "val"]
    assert list(f.splits["val"].ids) == val_rows  # ids: the paths as the table names them, relative to --images
    assert f.meta.dataset_identity["kind"] == "table" and f.meta.dataset_identity["split"] == "split column"


def test_a_csv_of_bare_ids_without_split_equals_the_class_folder(layouts, folder_files, tmp_path: Path) -> None:
    out = _extract(tmp_path, "bare", layouts["csv_bare"])
    _assert_identical(folder_files["flat"], out)


def test_a_hugging_face_imagefolder_equals_the_split_folders(layouts, folder_files, tmp_path: Path) -> None:
    out = _extract(tmp_path, "hf", layouts["hf"])
    _assert_identical(folder_files["split"], out)
    assert all(i.startswith("train/0_") for i in read_features(out).splits["train"].ids[:5])


def test_webdataset_shards_equal_the_split_folders(layouts, folder_files, tmp_path: Path) -> None:
    out = _extract(tmp_path, "wds", layouts["shards"], val_dataset=layouts["val_shards"])
    _assert_identical(folder_files["split"], out)
    ident = read_features(out).meta.dataset_identity
    assert ident["kind"] == "webdataset" and len(ident["shards"]) == 6


def test_shards_through_gpu_decode_bytes_equal_the_folders(layouts, tmp_path: Path) -> None:
    """gpu-decode reads a shard member's bytes (``split.read_bytes``), as it reads a folder's files; on the CPU its
    PIL fallback (these are PNGs) gives the folder run's features."""
    folder = _extract(tmp_path, "f", layouts["folder"], preprocess="gpu-decode")
    shards = _extract(tmp_path, "s", layouts["shards"], val_dataset=layouts["val_shards"], preprocess="gpu-decode")
    _assert_identical(folder, shards)
    split = load_dataset(layouts["shards"], val_dataset=layouts["val_shards"]).splits["train"]
    first = sorted((Path(layouts["folder"]) / "train" / "0").iterdir())[0]
    assert split.read_bytes(0) == first.read_bytes()
    assert choose_source("gpu-decode", split, torch.device("cpu")) == "gpu-decode"
    assert GpuDecodeSource.auto_for(split, torch.device("cuda")) and not LoaderSource.supports(split)


def test_jpeg_shards_reach_the_batched_decoder_as_a_folder_does(tmp_path: Path, monkeypatch) -> None:
    """JPEG members go to ``decode_jpeg`` in batches (nvJPEG on CUDA; libjpeg-turbo here), as a folder's JPEGs do."""
    from PIL import Image

    import pipeline.stage1.batches as batches

    jpegs = []
    for im in digits(per_class=4, classes=3):
        path = tmp_path / "jpg" / im.label / f"{im.src.stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(im.src).convert("RGB").resize((64, 64)).save(path, quality=90)
        jpegs.append(type(im)(im.label, path, im.split))
    layouts = write_layouts(tmp_path / "l", jpegs, per_shard=3)
    decoded, real = [], batches.decode_jpegs

    def counting(data: list, *, device: object) -> list:
        decoded.append(len(data))
        return real(data, device=device)

    monkeypatch.setattr(batches, "decode_jpegs", counting)
    folder = _extract(tmp_path, "f", layouts["folder"], preprocess="gpu-decode")
    from_folder, decoded[:] = list(decoded), []
    shards = _extract(tmp_path, "s", layouts["shards"], val_dataset=layouts["val_shards"], preprocess="gpu-decode")
    assert sum(decoded) == sum(from_folder) == 12  # every image through the batched decoder, both ways
    _assert_identical(folder, shards)
    assert read_features(shards).meta.fingerprint != read_features(folder).meta.fingerprint


def test_limit_and_skip_bad_work_on_a_table(layouts, tmp_path: Path) -> None:
    root = Path(layouts["flat"])
    (root / "broken.png").write_bytes(b"not a png")
    table = tmp_path / "t.csv"
    text = Path(layouts["csv_split"]).read_text()
    table.write_text(text + f"{root / 'broken.png'},1,train\n")  # an absolute path is taken as it is
    with pytest.raises(PipelineError, match="cannot read image .*broken.png.*--skip-bad"):
        _extract(tmp_path, "bad", str(table), images=str(root))
    f = read_features(_extract(tmp_path, "skip", str(table), images=str(root), skip_bad=True))
    assert len(f.splits["train"].labels) == 20 and f.meta.dataset_identity["num_files"] == 25
    limited = read_features(_extract(tmp_path, "lim", str(table), images=str(root), limit=5, skip_bad=True))
    assert len(limited.splits["train"].ids) <= 5 and len(limited.splits["val"].ids) == 4


def test_the_identity_covers_the_table_bytes_and_the_images(layouts, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_bytes(Path(layouts["csv_split"]).read_bytes())
    first = load_dataset(str(table), images=layouts["flat"]).identity
    table.write_bytes(table.read_bytes().replace(b",0,train", b",1,train", 1))
    second = load_dataset(str(table), images=layouts["flat"]).identity
    assert first["tables"] != second["tables"]
    img = sorted((Path(layouts["flat"]) / "0").iterdir())[0]
    stat_before = load_dataset(str(table), images=layouts["flat"], verify="content").identity
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert load_dataset(str(table), images=layouts["flat"]).identity["files_sha256"] != second["files_sha256"]
    assert load_dataset(str(table), images=layouts["flat"], verify="content").identity == stat_before


def test_torchrun_two_ranks_over_shards_equal_one_process(layouts, tmp_path: Path) -> None:
    single, merged = tmp_path / "single.h5", tmp_path / "merged.h5"
    extract(ExtractConfig(dataset=layouts["shards"], val_dataset=layouts["val_shards"], out=str(single),
                          **TINY_EXTRACT))  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "-m", "pipeline",
           "extract", "--dataset", layouts["shards"], "--val-dataset", layouts["val_shards"], *TINY_ARGS,
           "--out", str(merged)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = read_features(single), read_features(merged)
    assert a.meta.fingerprint == b.meta.fingerprint and read_meta(merged).merge["shards"] == 2
    for name in ("train", "val"):
        assert list(a.splits[name].ids) == list(b.splits[name].ids)  # row for row, in one process's order
        np.testing.assert_array_equal(a.splits[name].labels, b.splits[name].labels)
        # the audit columns travel with their rows through each rank's shard file and the merge
        assert list(a.splits[name].digests) == list(b.splits[name].digests) and len(set(b.splits[name].digests)) > 1
        np.testing.assert_array_equal(a.splits[name].phash, b.splits[name].phash)
        # ranks batch differently (shard-aligned cuts): oneDNN's kernels differ in the last bits by batch shape
        np.testing.assert_allclose(a.splits[name].features, b.splits[name].features, rtol=0, atol=1e-5)


def test_ranks_take_whole_shards(layouts) -> None:
    train = load_dataset(layouts["shards"], val_dataset=layouts["val_shards"]).splits["train"]
    assert len(train) == 20 and train.units.tolist() == [k // 4 for k in range(20)]
    for world in (2, 3):
        bounds = [rank_rows(train, r, world) for r in range(world)]
        assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(20))
        for lo, hi in bounds:  # no shard is read by two ranks
            assert lo % 4 == 0 and hi % 4 == 0
    assert rank_rows(train, 0, 2) == (0, 8) and rank_rows(train, 1, 2) == (8, 20)


def test_an_interrupted_shard_run_resumes_without_rereading_committed_shards(layouts, tmp_path, monkeypatch) -> None:
    kw = {"val_dataset": layouts["val_shards"], "batch_size": 4}
    whole = _extract(tmp_path, "whole", layouts["shards"], **kw)
    real, calls = ex.embed_batch, [0]

    def stop_at_3(*a: object, **k: object) -> object:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "embed_batch", stop_at_3)
    with pytest.raises(ExtractInterrupted):
        _extract(tmp_path, "out", layouts["shards"], **kw)
    monkeypatch.undo()
    read, real_read = [], ShardReader.__call__

    def counting(self: ShardReader, i: int) -> bytes:
        read.append(int(self.shard[i]))
        return real_read(self, i)

    monkeypatch.setattr(ShardReader, "__call__", counting)
    out = tmp_path / "out.h5"
    result = extract(ExtractConfig(dataset=layouts["shards"], out=str(out), **{**TINY_EXTRACT, **kw}))
    assert result.resumed_from == {"train": 8, "val": 0}
    assert read and min(read) == 2  # shards 0 and 1 (train rows 0-7) are committed: no byte of them read again
    a, b = read_features(whole), read_features(out)
    for name in ("train", "val"):
        assert list(a.splits[name].ids) == list(b.splits[name].ids)
        np.testing.assert_array_equal(a.splits[name].features, b.splits[name].features)


def test_shards_by_key_val_fraction_and_a_list_file(layouts, tmp_path: Path) -> None:
    names = shard_names(layouts["shards"])
    listing = tmp_path / "shards.txt"
    listing.write_text("# train shards\n" + "\n".join(names) + "\n")
    a = load_dataset(str(listing), val_fraction=0.25)
    b = load_dataset(str(Path(layouts["shards"]).parent / "train-*.tar"), val_fraction=0.25)
    assert a.splits["val"].ids == b.splits["val"].ids and 0 < len(a.splits["val"]) < 20
    assert len(a.splits["train"]) + len(a.splits["val"]) == 20
    url = load_dataset("file://" + layouts["shards"], val_dataset=layouts["val_shards"]).splits["train"]
    assert np.asarray(url.load(3)).shape == np.asarray(a.splits["train"].load(0)).shape  # fsspec reads too


def test_brace_expansion() -> None:
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]


def test_json_labels_with_label_key(tmp_path: Path) -> None:
    images = digits(per_class=3, classes=2)
    path = tmp_path / "s-0.tar"
    with tarfile.open(path, "w") as tf:
        for k, im in enumerate(images):
            tf.add(im.src, arcname=f"k{k}.png")
            meta = json.dumps({"digit": f"d{im.label}"}).encode()
            info = tarfile.TarInfo(f"k{k}.json")
            info.size = len(meta)
            tf.addfile(info, io.BytesIO(meta))
    source = load_dataset(str(path), label_key="digit", val_fraction=0.5)
    assert source.classes == ["d0", "d1"]
    with pytest.raises(PipelineError, match=r"6 samples have no label \(.json field 'label'\)"):
        load_dataset(str(path), label_key="label")


# ------------------------------------------------------------------------------------------ one-line errors


def _table(tmp_path: Path, text: str, name: str = "t.csv") -> str:
    root = tmp_path / "imgs"
    for k, im in enumerate(digits(per_class=2, classes=2)):
        (root / im.label).mkdir(parents=True, exist_ok=True)
        (root / im.label / f"{k}.png").write_bytes(im.src.read_bytes())
    for ext in ("jpg", "png"):  # two image files of stem 1/0
        (root / "1" / f"0.{ext}").write_bytes((root / "0" / "0.png").read_bytes())
    (root / name).write_text(text)
    return str(root / name)


@pytest.mark.parametrize(
    ("text", "extra", "fragments"),
    [
        (
            "path,label\n0/0.png,0\n0/nope.png,1\n1/gone.png,1\n",
            [],
            ["2 rows name images that are not under", "t.csv line 3 ('0/nope.png')", "--images"],
        ),
        ("name,label\n0/0.png,0\n", [], ["t.csv has no image column", "path, file_name", "--image-column"]),
        ("path,label\n0/0.png,0\n", ["--label-column", "kind"], ["t.csv has no column 'kind'", "path, label"]),
        ("path,label\n0/0.png,0\n0/1.png,\n1/2.png,1\n", [], ["1 rows have no label", "t.csv line 3", "predict"]),
        ("path,label\n0/0.png,0\n0/0.png,1\n1/2.png,1\n", [], ["rows name an image an earlier row", "line 3"]),
        ("path,label\n0/0.png,0\n0/1.png,cat\n1/2.png,1\n", [], ["numbers in 2 rows", "text in 1", "'cat'"]),
        ("id,label\n1/0,0\n1/2,1\n", [], ["id '1/0' matches 2 image files (0.jpg, 0.png)"]),
        ("path,label,split\n0/0.png,0,train\n1/2.png,1,holdout\n", [], ["split that is not train, val or test"]),
    ],
)
def test_table_errors_are_one_line(tmp_path, capsys, text: str, extra: list[str], fragments: list[str]) -> None:
    table = _table(tmp_path, text)
    code, _, err = run(["extract", "--dataset", table, *TINY_ARGS, "--out", str(tmp_path / "o.h5"), *extra], capsys)
    assert_one_line_error(code, err, *fragments)


def test_shard_errors_are_one_line(tmp_path: Path, capsys) -> None:
    images = digits(per_class=2, classes=2)
    write_shards(images, str(tmp_path / "ok-{}.tar"), per_shard=4)
    bad = tmp_path / "nolabel.tar"
    with tarfile.open(bad, "w") as tf:
        tf.add(images[0].src, arcname="a.png")
    (tmp_path / "gz.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    cases = [
        (["--dataset", str(bad)], ["1 samples have no label", "a"]),
        (["--dataset", str(tmp_path / "gz.tar.gz")], ["not an uncompressed tar"]),
        (["--dataset", str(tmp_path / "missing-{0..1}.tar")], ["shard not found"]),
        (["--dataset", str(tmp_path / "ok-0.tar"), "--val-dataset", str(tmp_path / "ok-0.tar")], ["both a train"]),
        (["--dataset", str(tmp_path / "ok-{0..1}.tar"), "--images", str(tmp_path)], ["--images is for a labels"]),
    ]
    for args, fragments in cases:
        code, _, err = run(["extract", *args, *TINY_ARGS, "--out", str(tmp_path / "o.h5")], capsys)
        assert_one_line_error(code, err, *fragments)


def test_tsv_jsonl_and_parquet_tables_read_as_the_csv(layouts, tmp_path: Path) -> None:
    rows = list(csv.DictReader(Path(layouts["csv_split"]).read_text().splitlines()))
    (tmp_path / "t.tsv").write_text("path\tlabel\tsplit\n" + "".join(f"{r['path']}\t{r['label']}\t{r['split']}\n"
                                                                      for r in rows))  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({**r, "label": int(r["label"])}) + "\n" for r in rows))
    tables = [tmp_path / "t.tsv", tmp_path / "t.jsonl"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
        tables.append(tmp_path / "t.parquet")
    except ImportError:  # an optional extra: without it, the one-line error that names it
        with pytest.raises(PipelineError, match=r"needs pyarrow: pip install -e '.\[parquet\]'"):
            (tmp_path / "t.parquet").write_bytes(b"PAR1")
            load_dataset(str(tmp_path / "t.parquet"), images=layouts["flat"])
    ref = load_dataset(layouts["csv_split"])
    for table in tables:
        got = load_dataset(str(table), images=layouts["flat"])
        assert got.classes == ref.classes, table
        for name in ("train", "val"):
            assert got.splits[name].ids == ref.splits[name].ids, table
            np.testing.assert_array_equal(got.splits[name].labels, ref.splits[name].labels)
        assert got.identity["files_sha256"] == ref.identity["files_sha256"]


def test_the_readme_commands_for_tables_and_shards_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """The "Using your own images" commands, as written, on the committed digits and the real MobileNetV2."""
    section = (REPO / "README.md").read_text().split("## Using your own images")[1].split("\n## ")[0]
    extracts = [ln for ln in section.splitlines() if ln.startswith("python -m pipeline extract")]
    lines = [ln for ln in extracts if "my_images/labels.csv" in ln or "my_shards/" in ln]
    assert len(lines) == 2, lines
    images = digits(per_class=6, classes=4)
    made = write_layouts(tmp_path / "made", images, per_shard=4)
    (tmp_path / "my_images").symlink_to(Path(made["flat"]))
    (tmp_path / "my_shards").symlink_to(Path(made["shards"]).parent)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "weights").symlink_to(REPO / "artifacts" / "weights")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        code, out, err = run([*shlex.split(line)[3:], "--no-progress", "--device", "cpu"], capsys)
        assert code == 0, err
        assert "train 20, val 4" in out, out  # bare ids split 1 in 5 per class; the shards: 5 train, 1 val
    written = sorted((tmp_path / "artifacts" / "features").glob("*.h5"))
    assert len(written) == 2
    for path in written:
        assert read_features(path).meta.backbone == "mobilenet_v2"


# ------------------------------------------------------------------------------------------ several labels per image


def _multi_table(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    """Real digit images, each labelled with 1-3 of the digits 0-3 (the last row with none)."""
    root = tmp_path / "multi"
    root.mkdir()
    wanted = [["0"], ["1", "3"], ["2"], ["0", "1", "2"], ["3"], ["1"], ["2", "3"], ["0"], ["1"], []]
    for k, im in enumerate(digits(per_class=10, classes=1)):
        (root / f"{k}.png").write_bytes(im.src.read_bytes())
    return root, wanted


def test_a_delimited_label_column_reads_as_a_multi_hot_matrix(tmp_path: Path) -> None:
    root, wanted = _multi_table(tmp_path)
    (root / "t.csv").write_text("path,labels\n" + "".join(f"{k}.png,{';'.join(ls)}\n" for k, ls in enumerate(wanted)))
    source = load_dataset(str(root / "t.csv"), val_fraction=0.3)
    assert source.classes == ["0", "1", "2", "3"] and source.identity["multi_label"] == "delimiter:;"
    expected = np.array([[str(c) in ls for c in range(4)] for ls in wanted], dtype=np.uint8)
    seen = {}
    for split in source.splits.values():
        assert (split.labels == -1).all() and split.multi_hot.dtype == np.uint8
        for i, row in zip(split.ids, split.multi_hot):
            seen[int(Path(i).stem)] = row
    assert len(seen) == 10
    np.testing.assert_array_equal(np.stack([seen[k] for k in range(10)]), expected)
    (root / "p.csv").write_text("path,labels\n" + "".join(f"{k}.png,{'|'.join(ls)}\n" for k, ls in enumerate(wanted)))
    piped = load_dataset(str(root / "p.csv"), label_delimiter="|", val_fraction=0.3, limit=4)
    for split in piped.splits.values():  # --limit narrows the matrix with the rows
        assert len(split.multi_hot) == len(split.ids) <= 4
        for i, row in zip(split.ids, split.multi_hot):
            np.testing.assert_array_equal(row, expected[int(Path(i).stem)])


def test_label_columns_and_shard_json_lists_read_as_multi_hot(tmp_path: Path) -> None:
    root, wanted = _multi_table(tmp_path)
    lines = [f"{k}.png," + ",".join("1" if str(c) in ls else "0" for c in range(4)) for k, ls in enumerate(wanted)]
    (root / "c.csv").write_text("file,zero,one,two,three\n" + "\n".join(lines) + "\n")
    by_columns = load_dataset(str(root / "c.csv"), label_columns="three,zero,one,two", val_fraction=0.3)
    assert by_columns.classes == ["three", "zero", "one", "two"]  # the order given
    shard = tmp_path / "m-0.tar"
    with tarfile.open(shard, "w") as tf:
        for k, ls in enumerate(wanted):
            tf.add(root / f"{k}.png", arcname=f"{k}.png")
            meta = json.dumps({"label": [int(x) for x in ls]}).encode()
            info = tarfile.TarInfo(f"{k}.json")
            info.size = len(meta)
            tf.addfile(info, io.BytesIO(meta))
    shards = load_dataset(str(shard), val_fraction=0.3)
    assert shards.classes == ["0", "1", "2", "3"] and shards.identity["multi_label"] == "json list"
    for source, order in ((by_columns, [3, 0, 1, 2]), (shards, [0, 1, 2, 3])):
        for split in source.splits.values():
            for i, row in zip(split.ids, split.multi_hot):
                ls = wanted[int(Path(i).stem)]
                assert [str(c) for c, on in zip(order, row) if on] == [str(c) for c in order if str(c) in ls]
    with pytest.raises(PipelineError, match=r"1 rows have a --label-columns value that is not 0 or 1"):
        (root / "bad.csv").write_text("file,a,b\n0.png,1,0\n1.png,2,1\n")
        load_dataset(str(root / "bad.csv"), label_columns="a,b")
