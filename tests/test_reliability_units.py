"""Issue 24, items 3 to 7: one listing and one pixel policy for extract and predict; a head folder and an export
each one unit under a kill; tracebacks turned into one line; silent failures made loud."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.deploy.predict import Classifier, collect_images, predict
from pipeline.stage1 import datasets
from pipeline.stage1.backbones import load_backbone
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
    from pipeline.stage1.datasets import list_images, load_folder

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


# ------------------------------------------------------------------------------------------ item 4: one unit


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.stage1.extract import ExtractConfig, extract
    from tests.conftest import TINY_EXTRACT

    root = tmp_path_factory.mktemp("unit")
    out = root / "f.h5"
    extract(ExtractConfig(dataset=str(write_image_folder(root / "img", per_class=6)), out=str(out), **TINY_EXTRACT))
    return out


def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["timeout", "-s", "KILL", "120", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# Where a SIGKILL lands in `train-head --force`: after the weights, after metrics.json, after the plots (every file
# written), and just before the new folder takes the old one's place.
HEAD_KILLS = {
    "after head.safetensors": "import pipeline.stage2.training as t\nt.write_json = lambda *a, **k: os._exit(9)",
    "after metrics.json": "import pipeline.stage2.plots as p\np.confusion_png = lambda *a, **k: os._exit(9)",
    "before the swap": "import pipeline.fileio as f\nf._exchange = lambda *a, **k: os._exit(9)",
}


@pytest.mark.parametrize("where", list(HEAD_KILLS))
def test_a_killed_train_head_force_leaves_the_old_head_folder(features: Path, tmp_path: Path, where: str) -> None:
    """Issue 24 item 4: "A SIGKILL after any file of `train-head --force` must leave the old unit or the new one,
    never a mix that loads; a rerun after a kill resumes". It left new weights beside the old config.json."""
    from pipeline.stage2.heads import HeadConfig, load_head
    from pipeline.stage2.train import train_head

    head = tmp_path / "head"
    train_head(features, HeadConfig(head="linear", epochs=2, device="cpu"), out=head)
    before = _snapshot(head)
    code = (
        f"import os\n{HEAD_KILLS[where]}\n"
        "from pipeline.stage2.heads import HeadConfig\nfrom pipeline.stage2.train import train_head\n"
        f"train_head({str(features)!r}, HeadConfig(head='linear', epochs=5, lr=0.05, device='cpu'), "
        f"out={str(head)!r}, force=True)\n"
    )
    proc = _in_subprocess(code)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert _snapshot(head) == before  # the old unit, byte for byte
    load_head(head)
    again = train_head(features, HeadConfig(head="linear", epochs=5, lr=0.05, device="cpu"), out=head, force=True)
    assert again.out == str(head)
    _, config = load_head(head)
    assert config["head_config"]["epochs"] == 5 and config["head_config"]["lr"] == 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]  # no temporary folder left behind


def test_the_head_file_written_beside_the_plots_is_waited_for_and_its_error_raised(tmp_path: Path) -> None:
    """training.beside: the block's exit waits for the thread (an atomic folder's cleanup never races the write),
    the thread's error is raised after the block, and the block's own error goes first."""
    import threading
    import time

    from pipeline.errors import PipelineError
    from pipeline.stage2.training import beside

    done = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        done.set()

    with pytest.raises(KeyboardInterrupt), beside(slow):
        raise KeyboardInterrupt
    assert done.is_set()  # waited for, though the block was interrupted

    def full_disk() -> None:
        raise PipelineError("cannot write head.safetensors: no space left on device")

    with pytest.raises(PipelineError, match="no space left"), beside(full_disk):
        pass
    with pytest.raises(ValueError, match="the block's own"), beside(full_disk):
        raise ValueError("the block's own")


def test_a_head_folder_of_other_files_is_not_replaced(features: Path, tmp_path: Path) -> None:
    """The unit replaces a folder only if it is empty or holds a head: a user's folder is never swapped away."""
    from pipeline.errors import PipelineError
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="not a folder this command wrote"):
        train_head(features, HeadConfig(head="linear", epochs=1, device="cpu"), out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


EXPORT_KILLS = {
    "after the program": "import pipeline.deploy.export as e\ne._save_tensors = lambda *a, **k: os._exit(9)",
    "after the tensors": "import pipeline.deploy.export as e\ne.write_json = lambda *a, **k: os._exit(9)",
}


@pytest.mark.parametrize("where", list(EXPORT_KILLS))
def test_a_killed_export_never_loads_as_a_mix(features: Path, tmp_path: Path, where: str) -> None:
    """Issue 24 item 4: "`export` killed after `MODEL.safetensors` (or after `MODEL.pt2`) leaves a program, tensors
    and MODEL.json of two different heads, which `predict` loads". MODEL.json, written last, records the sha256 of
    the other two: predict loads the old model whole, or refuses in one line; rerunning export gives the new one."""
    from pipeline.deploy.export import export_model
    from pipeline.deploy.predict import load_classifier
    from pipeline.errors import PipelineError
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    a, b, model = tmp_path / "a", tmp_path / "b", tmp_path / "m.pt2"
    train_head(features, HeadConfig(head="linear", epochs=2, device="cpu"), out=a)
    train_head(features, HeadConfig(head="linear", epochs=6, lr=0.1, device="cpu"), out=b)
    export_model(a, model)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        old = load_classifier(model, device="cpu").module(x)
    code = f"import os\n{EXPORT_KILLS[where]}\nfrom pipeline.deploy.export import export_model\n"
    code += f"export_model({str(b)!r}, {str(model)!r})\n"
    proc = _in_subprocess(code)
    assert proc.returncode == 9, proc.stderr[-2000:]
    if where == "after the program":  # the old tensors and MODEL.json: the old model, whole
        with torch.inference_mode():
            assert torch.equal(load_classifier(model, device="cpu").module(x), old)
    else:
        with pytest.raises(PipelineError, match="m.safetensors is not the file written with m.json") as e:
            load_classifier(model, device="cpu")
        assert "export the model again" in str(e.value) and "\n" not in str(e.value)
    export_model(b, model)
    with torch.inference_mode():
        assert not torch.equal(load_classifier(model, device="cpu").module(x), old)


# ------------------------------------------------------------------------------------------ item 6: tracebacks


def test_export_into_a_read_only_filesystem_is_one_line(features: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 24 item 6: "export into a read-only filesystem (`torch.export.save` raises `RuntimeError`, which
    `atomic_path` lets through)" is one line naming the file, and leaves nothing behind."""
    from pipeline.deploy.export import export_model
    from pipeline.errors import PipelineError
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    head = tmp_path / "h"
    train_head(features, HeadConfig(head="linear", epochs=1, device="cpu"), out=head)

    def read_only(program, f, *a, **k):  # what torch.export.save does on a read-only filesystem
        raise RuntimeError(f"File {f} cannot be opened.\nException raised from ...")

    monkeypatch.setattr(torch.export, "save", read_only)
    with pytest.raises(PipelineError, match=r"cannot write .*m\.pt2: File .* cannot be opened\.$"):
        export_model(head, tmp_path / "out" / "m.pt2")
    assert not list((tmp_path / "out").iterdir())


def test_model_json_nested_200000_deep_is_one_line(features: Path, tmp_path: Path) -> None:
    """Issue 24 item 6: "a MODEL.json nested 200,000 levels deep (`RecursionError`)" is one line."""
    from pipeline.deploy.export import export_model
    from pipeline.deploy.predict import load_classifier
    from pipeline.errors import PipelineError
    from pipeline.stage2.heads import HeadConfig, load_head
    from pipeline.stage2.train import train_head

    head = tmp_path / "h"
    train_head(features, HeadConfig(head="linear", epochs=1, device="cpu"), out=head)
    model = tmp_path / "m.pt2"
    export_model(head, model)
    model.with_suffix(".json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(PipelineError, match="RecursionError"):
        load_classifier(model, device="cpu")
    (head / "config.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    with pytest.raises(PipelineError, match="cannot load head .*RecursionError"):
        load_head(head)


def _tamper_nan(s: dict) -> None:
    s["model"]["fc.bias"][0] = float("nan")


def _tamper_fc(s: dict) -> None:
    s["model"]["fc.weight"] = torch.zeros(7, 512)


def _tamper_missing(s: dict) -> None:
    del s["model"]["layer1.0.conv1.weight"]


def _tamper_rng(s: dict) -> None:
    s["rng"]["generator"] = torch.zeros(3, dtype=torch.uint8)


def _tamper_seconds(s: dict) -> None:
    del s["history"][0]["seconds"]


def _tamper_scheduler(s: dict) -> None:
    del s["scheduler"]


CHECKPOINT_TAMPERING = {
    "wrong fc shape": (_tamper_fc, "fc.weight has shape"),
    "missing keys": (_tamper_missing, "not this model's"),
    "bad RNG state": (_tamper_rng, "generator RNG state"),
    "a history without seconds": (_tamper_seconds, "lacks one of"),
    "no scheduler": (_tamper_scheduler, "no scheduler"),
    "NaN weights": (_tamper_nan, "fc.bias holds NaN"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_TAMPERING))
def test_a_tampered_baseline_checkpoint_with_its_key_kept_is_one_line(tmp_path: Path, capsys, case: str) -> None:
    """Issue 24 item 6: "a tampered baseline `checkpoint.pt` with its key kept (wrong fc shape, missing keys, bad RNG
    state, a history without `seconds`, no scheduler, NaN weights)" is one line each, not a traceback; --force
    starts afresh."""
    from tests.conftest import assert_one_line_error, run

    images = write_image_folder(tmp_path / "images", per_class=4, size=(20, 24))
    out = tmp_path / "bl"
    argv = ["baseline", "--dataset", str(images), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    tamper, said = CHECKPOINT_TAMPERING[case]
    tamper(state)
    torch.save(state, out / "checkpoint.pt")
    code, _, err = run([*argv[:-4], "--epochs", "2", "--device", "cpu", "--out", str(out)], capsys)
    assert_one_line_error(code, err, "checkpoint.pt is damaged", said, "--force")
    code, _, err = run([*argv[:-4], "--epochs", "2", "--device", "cpu", "--out", str(out), "--force"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------ item 7: silent failures


def test_weights_holding_nan_stop_at_the_first_batch(tmp_path: Path, capsys) -> None:
    """Issue 24 item 7: "weights holding NaN give an all-NaN feature file with rc 0": the first batch's features
    are checked, and the run stops in one line naming the weights."""
    import torchvision

    from tests.conftest import TINY_ARGS, assert_one_line_error, run

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan.pt"
    torch.save(state, weights)
    images = write_image_folder(tmp_path / "img", per_class=4)
    args = [a if a != "none" else str(weights) for a in TINY_ARGS]
    out = tmp_path / "f.h5"
    code, _, err = run(["extract", "--dataset", str(images), "--out", str(out), *args], capsys)
    assert_one_line_error(code, err, "NaN or infinite", str(weights))
    assert not out.exists()


def test_class_names_that_look_like_formulas_are_escaped_in_the_csv(tmp_path: Path) -> None:
    """Issue 24 item 7: "class names beginning with `=`, `+`, `-` or `@` go unescaped into predictions CSVs, which
    spreadsheets run as formulas (escape them, as OWASP advises)": a leading ' makes them text."""
    bb = load_backbone("resnet18", weights="none", image_size=32, seed=0)
    bb.model.fc = torch.nn.Linear(512, 4)
    names = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)"]
    model = Classifier(bb.model.eval(), names, bb.preprocess)
    folder = write_image_folder(tmp_path / "img", per_class=2)
    (folder / "cat" / "=cmd.png").write_bytes((folder / "cat" / "000.png").read_bytes())
    out = tmp_path / "p.csv"
    predict(model, [folder], out=out, progress=False, device="cpu", workers=0, top_k=4)
    rows = list(csv.reader(out.open(encoding="utf-8")))
    cells = [c for row in rows[1:] for c in row]
    assert not any(c.startswith(("=", "+", "@")) or (c.startswith("-") and not c[1:2].isdigit()) for c in cells)
    assert {c for row in rows[1:] for c in row[1:8:2]} == {"'" + n for n in names}
    assert any(row[0].endswith("=cmd.png") for row in rows[1:])  # a path starting with = would be escaped too
    assert all(float(p) >= 0 for row in rows[1:] for p in row[2:9:2])  # numbers stay numbers


def test_a_large_targets_csv_is_streamed(tmp_path: Path) -> None:
    """Issue 24 item 7: "a 47 MB targets CSV of unknown ids peaks at 2 GB of memory (stream it)". Read row by row
    into one packed array, the peak is a few times the file (all of it ids, which must be held to find repeats);
    the whole text, its lines, its cells and a small array per row came to over 10 times."""
    import tracemalloc

    from pipeline.stage1.targets import read_targets_csv

    path = tmp_path / "t.csv"
    with open(path, "w") as f:
        f.write("id,age\n")
        f.writelines(f"unknown/folder/image_{i:08d}.jpg,{i * 0.37:.6f}\n" for i in range(100_000))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        table = read_targets_csv(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(table.values) == 100_000 and table.values["unknown/folder/image_00000010.jpg"][0] == 10 * 0.37
    assert peak < 5 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
