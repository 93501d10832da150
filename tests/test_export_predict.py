"""Export and predict: the exported classifier's logits on images equal the head's logits on the cached
features of the same images; predict writes one CSV row per image and survives a corrupt one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.deploy.export import export_model
from pipeline.deploy.predict import Classifier, load_classifier, predict, predict_batch, read_image
from pipeline.errors import PipelineError
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HEAD_FILE, HeadConfig, load_head
from pipeline.stage2.train import train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, assert_one_line_error, run, write_image_folder


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny image folder, its features from two backbones (``fc`` and ``classifier.1`` classifiers), and
    two exported models: a logreg head (standardisation folded in) on resnet18, an mlp head on mobilenet_v2 whose
    features were made with ``--resize full`` (so the exported preprocessing must carry the resize mode)."""
    root = tmp_path_factory.mktemp("export")
    images = write_image_folder(root / "images", per_class=6)
    paths = {"root": root, "images": images}
    for backbone, head, resize in (("resnet18", "logreg", "crop"), ("mobilenet_v2", "mlp", "full")):
        feats = root / f"{backbone}.h5"
        settings = {**TINY_EXTRACT, "backbone": backbone, "resize": resize}
        extract(ExtractConfig(dataset=str(images), out=str(feats), **settings))
        head_dir = root / "heads" / f"{backbone}-{head}"
        train_head(feats, HeadConfig(head=head, epochs=3, hidden=16, device="cpu"), out=head_dir)
        paths |= {backbone: feats, f"{backbone}-head": head_dir, f"{backbone}-model": root / f"{backbone}-{head}.pt2"}
        result = export_model(head_dir, paths[f"{backbone}-model"])
        assert result.max_abs_diff < 1e-4  # the exported program against the eager model
        paths[f"{backbone}-clf"] = load_classifier(result.program, device="cpu")
    return paths


def _exported_vs_cached(clf: Classifier, head_dir: Path, features: Path, images: Path) -> tuple[np.ndarray, np.ndarray]:
    head, _ = load_head(head_dir)
    fs = read_features(features)
    batch = [read_image(images / rel, clf.preprocess) for rel in fs.train.ids]
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(torch.stack(batch))).numpy()
    return exported, head.logits(fs.train.features)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_exported_logits_equal_head_on_cached_features(extracted: dict[str, Any], backbone: str) -> None:
    program = extracted[f"{backbone}-model"]
    modes = {s: program.with_suffix(s).stat().st_mode & 0o777 for s in (".pt2", ".safetensors", ".json")}
    assert len(set(modes.values())) == 1, modes  # all by umask (safetensors' own writer makes 0600 files)
    assert not program.with_suffix(".pth").exists()  # safetensors replaced the pickled state_dict
    clf = extracted[f"{backbone}-clf"]
    exported, cached = _exported_vs_cached(clf, extracted[f"{backbone}-head"], extracted[backbone], extracted["images"])
    assert exported.shape == cached.shape == (15, 3)
    scale = np.abs(cached).max()
    np.testing.assert_allclose(exported, cached, rtol=1e-4, atol=1e-4 * scale)


def test_state_dict_loads_into_plain_torchvision_model(extracted: dict[str, Any]) -> None:
    program = extracted["resnet18-model"]
    plain = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    plain.load_state_dict(load_file(program.with_suffix(".safetensors")))  # strict: every key fits
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), extracted["resnet18-clf"].module(x), rtol=1e-4, atol=1e-4)
    meta = json.loads(program.with_suffix(".json").read_text())
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["preprocessing"]["crop_size"] == 32
    assert meta["head"] == "logreg" and "num_classes=3" in meta["state_dict_loads_into"]


def test_centroid_head_is_a_linear_layer(extracted: dict[str, Any], tmp_path: Path) -> None:
    train_head(extracted["resnet18"], HeadConfig(head="centroid"), out=tmp_path / "c")
    head, _ = load_head(tmp_path / "c")
    X = read_features(extracted["resnet18"]).val.features
    with torch.no_grad():
        module_logits = head.as_module()(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(module_logits, head.logits(X), rtol=1e-5, atol=1e-5 * np.abs(module_logits).max())


def test_knn_and_synthetic_heads_refuse_export(extracted: dict[str, Any], feature_file: Path, tmp_path: Path) -> None:
    train_head(extracted["resnet18"], HeadConfig(head="knn", k=3), out=tmp_path / "knn")
    with pytest.raises(PipelineError, match="knn head cannot"):
        export_model(tmp_path / "knn", tmp_path / "knn.pt2")
    train_head(feature_file, HeadConfig(head="centroid"), out=tmp_path / "synthetic")
    with pytest.raises(PipelineError, match="not trained on features from `pipeline extract`"):
        export_model(tmp_path / "synthetic", tmp_path / "s.pt2")
    with pytest.raises(PipelineError, match=r"must end in \.pt2"):
        export_model(tmp_path / "synthetic", tmp_path / "s.onnx")


def test_export_and_predict_commands(extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    head_dir = tmp_path / "head"
    train_head(extracted["resnet18"], HeadConfig(head="linear", epochs=30, lr=1e-2), out=head_dir)
    model = tmp_path / "model" / "clf.pt2"

    code, out, _ = run(["export", "--head", str(head_dir), "--out", str(model)], capsys)
    assert code == 0 and str(model) in out and model.with_suffix(".json").is_file()

    unseen = write_image_folder(tmp_path / "new", per_class=2, seed=7)
    (unseen / "cat" / "broken.png").write_bytes(b"not an image")
    preds = tmp_path / "preds.csv"
    code, out, err = run(["predict", "--model", str(model), str(unseen), "--out", str(preds), "--top-k", "2"], capsys)
    assert code == 0 and "1 could not be read" in out and "broken.png" in out
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 7
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(0 < float(r["probability"]) <= 1 for r in good)
    assert sum(r["class"] == Path(r["path"]).parent.name for r in good) >= 5  # colours separate the classes
    assert [r["path"] for r in rows if r["error"]] == [str(unseen / "cat" / "broken.png")]
    # every readable image sits in a folder named after a class: predict scores itself against the folders
    right = sum(r["class"] == Path(r["path"]).parent.name for r in good)
    assert f"accuracy {right / 6:.4f} on 6 images (true class = the image's folder)" in out

    loose = tmp_path / "loose"  # images outside class folders: no accuracy line
    loose.mkdir()
    for r in good[:2]:
        (loose / Path(r["path"]).name).write_bytes(Path(r["path"]).read_bytes())
    code, out, _ = run(["predict", "--model", str(model), str(loose), "--out", str(preds)], capsys)
    assert code == 0 and "accuracy" not in out

    code, _, err = run(["predict", "--model", str(tmp_path / "nope.pt2"), str(unseen), "--out", str(preds)], capsys)
    assert code == 1 and err.startswith("error: model not found") and len(err.strip().splitlines()) == 1

    junk = tmp_path / "junk.pt2"
    junk.with_suffix(".safetensors").write_bytes(b"not a safetensors file")
    junk.with_suffix(".json").write_text(model.with_suffix(".json").read_text())
    code, _, err = run(["predict", "--model", str(junk), str(unseen), "--out", str(preds)], capsys)
    assert_one_line_error(code, err, "cannot load model", "junk.safetensors is not a tensors file")


def test_predict_batches_agree_with_one_by_one(extracted: dict[str, Any], tmp_path: Path) -> None:
    clf = extracted["mobilenet_v2-clf"]
    images = sorted((extracted["images"] / "dog").glob("*.png"))
    result = predict(clf, [extracted["images"] / "dog"], out=tmp_path / "p.csv", batch_size=4, progress=False)
    assert result.n_images == 6 and not result.failed
    one = [predict_batch(clf, [read_image(p, clf.preprocess)])[0] for p in images[:2]]  # zip stops after 2
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    for row, p in zip(rows, one):
        assert row["class"] == clf.classes[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), rel=1e-4)


# ------------------------------------------------------------------------------------------ hostile and damaged files


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _copy_model(program: Path, folder: Path) -> Path:
    """The three files of an export, copied into ``folder``; returns the copied ``.pt2``."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".pt2", ".safetensors", ".json"):
        shutil.copy(program.with_suffix(suffix), folder / f"model{suffix}")
    return folder / "model.pt2"


def _add_payload(program: Path, payload: bytes, *, where: str) -> None:
    """Put ``payload`` into the archive as torch.export.save would store it. ``constant``: an opaque (pickled)
    constant, a file ``data/constants/<opaque prefix>0`` and an entry marked ``use_pickle`` in the constants
    config (torch unpickles it with ``pickle.loads``); ``sample_inputs``: in place of the pickled sample inputs."""
    constants = pytest.importorskip("torch.export.pt2_archive.constants")
    CONSTANTS_DIR = constants.CONSTANTS_DIR
    name = f"{getattr(constants, 'OPAQUE_OBJ_FILENAME_PREFIX', 'opaque_obj_')}0"
    original = program.read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as zin, zipfile.ZipFile(program, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info)
            if where == "sample_inputs" and info.filename.endswith("sample_inputs/model.pt"):
                data = payload
            is_config = info.filename.startswith(f"{root}/{CONSTANTS_DIR}") and info.filename.endswith("config.json")
            if where == "constant" and is_config:
                config = json.loads(data)
                entry = {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}
                config["config"]["injected"] = entry
                data = json.dumps(config).encode()
            zout.writestr(info, data)
        if where == "constant":
            zout.writestr(f"{root}/{CONSTANTS_DIR}{name}", payload)


def _predict_rows(model: Path, images: Path, out: Path, capsys: pytest.CaptureFixture) -> list[dict[str, str]]:
    code, _, err = run(["predict", "--model", str(model), str(images), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    return list(csv.DictReader(out.open(encoding="utf-8")))


@pytest.mark.parametrize("where", ["constant", "sample_inputs"])
def test_a_pickle_in_the_program_runs_no_code(
    extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    """The attack that ran code: a genuine export plus one pickled constant whose __reduce__ calls os.system
    (or the same in the sample inputs). torch.export.load runs it (checked here, so the payload is live);
    predict never opens the program, and unpickles nothing."""
    genuine = extracted["resnet18-model"]
    model, marker = _copy_model(genuine, tmp_path / "evil"), tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"inputs": _Exploit(marker)}, payload)
    _add_payload(model, pickle.dumps(_Exploit(marker)) if where == "constant" else payload.getvalue(), where=where)
    with contextlib.suppress(Exception):
        torch.export.load(model)
    if not marker.exists():  # torch 2.14-2.15 do run it
        pytest.skip(f"torch {torch.__version__} does not run a pickle {where} of a .pt2: no live payload to test")
    marker.unlink()

    images = extracted["images"] / "cat"
    rows = _predict_rows(model, images, tmp_path / "evil.csv", capsys)
    clean = _predict_rows(genuine, images, tmp_path / "clean.csv", capsys)
    assert not marker.exists()
    assert len(rows) == 6 and [(r["class"], r["probability"]) for r in rows] == [
        (r["class"], r["probability"]) for r in clean
    ]


def test_a_pickle_renamed_pt2_or_safetensors_runs_no_code(
    extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, marker = _copy_model(extracted["resnet18-model"], tmp_path / "m"), tmp_path / "pwned"
    torch.save({"weights": _Exploit(marker)}, model)  # a torch.save pickle as MODEL.pt2: never opened
    rows = _predict_rows(model, extracted["images"] / "dog", tmp_path / "p.csv", capsys)
    assert len(rows) == 6 and not marker.exists()

    torch.save({"weights": _Exploit(marker)}, model.with_suffix(".safetensors"))  # ... as the tensors: refused
    out = tmp_path / "q.csv"
    code, _, err = run(["predict", "--model", str(model), str(extracted["images"]), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "cannot load model", "model.safetensors is not a tensors file")
    assert not marker.exists() and not out.exists()


@torch.inference_mode()
def test_predict_equals_the_exported_program(extracted: dict[str, Any]) -> None:
    """The rebuilt model (MODEL.json + MODEL.safetensors) gives the .pt2 program's outputs on the same images."""
    for backbone in ("resnet18", "mobilenet_v2"):
        clf = extracted[f"{backbone}-clf"]
        program = torch.export.load(extracted[f"{backbone}-model"]).module()  # our own file, trusted here
        paths = sorted(extracted["images"].rglob("*.png"))
        x = clf.preprocess.normalize(torch.stack([read_image(p, clf.preprocess) for p in paths]))
        rebuilt, exported = clf.module(x), program(x)
        scale = float(exported.abs().max())
        torch.testing.assert_close(rebuilt, exported, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(predict_batch(clf, [read_image(p, clf.preprocess) for p in paths]),
                                   torch.softmax(exported, 1), rtol=0, atol=1e-5)  # fmt: skip


def _edit_json(model: Path, edit: Any) -> None:
    meta = json.loads(model.with_suffix(".json").read_text())
    edit(meta)
    model.with_suffix(".json").write_text(json.dumps(meta))


def _edit_tensors(model: Path, edit: Any) -> None:
    path = model.with_suffix(".safetensors")
    with safe_open(path, framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(state)
    save_file(state, str(path), metadata=metadata)


def _set(key: str, value: Any) -> Any:
    def edit(meta: dict[str, Any]) -> None:
        target, *path = key.split(".")
        d = meta
        for part in [target, *path][:-1]:
            d = d[part]
        d[[target, *path][-1]] = value

    return edit


DAMAGE = {
    "no class names": (lambda m: _edit_json(m, _set("classes", [])), "classes must be a non-empty list"),
    "one class name too many": (lambda m: _edit_json(m, _set("classes", ["a", "b", "c", "d"])), "4 class names"),
    "a std of 0": (lambda m: _edit_json(m, _set("preprocessing.std", [0.2, 0, 0.2])), "std must be 3 positive"),
    "a NaN std": (lambda m: _edit_json(m, _set("preprocessing.std", [float("nan")] * 3)), "std must be 3 positive"),
    "a mean of 2 values": (lambda m: _edit_json(m, _set("preprocessing.mean", [0.5, 0.5])), "mean must be 3"),
    "another crop size": (
        lambda m: _edit_json(m, _set("preprocessing.crop_size", 24)),
        "crop_size 24, but model.safetensors was exported with 32",
    ),
    "a text crop size": (lambda m: _edit_json(m, _set("preprocessing.crop_size", "32")), "crop_size must be"),
    "no classifier path": (lambda m: _edit_json(m, lambda d: d.pop("classifier_path")), "no classifier_path"),
    "another backbone": (lambda m: _edit_json(m, _set("backbone", "resnet34")), "exported with"),
    "an older export": (lambda m: _edit_json(m, lambda d: d.pop("format_version")), "export the head again"),
    "not JSON": (lambda m: m.with_suffix(".json").write_text("{"), "JSONDecodeError"),
    "a NaN in the head": (lambda m: _edit_tensors(m, lambda s: s["fc.bias"].__setitem__(0, float("nan"))), "fc.bias"),
    "an inf in the backbone": (
        lambda m: _edit_tensors(m, lambda s: s["conv1.weight"].__setitem__(0, float("inf"))),
        "conv1.weight holds NaN",
    ),
    "a missing tensor": (lambda m: _edit_tensors(m, lambda s: s.pop("layer1.0.bn1.bias")), "1 missing"),
    "an extra tensor": (lambda m: _edit_tensors(m, lambda s: s.__setitem__("x", torch.ones(1))), "1 unexpected"),
    "a head of another size": (lambda m: _edit_tensors(m, lambda s: s.__setitem__("fc.bias", torch.ones(4))), "fit"),
    "a tensor of another shape": (
        lambda m: _edit_tensors(m, lambda s: s.__setitem__("conv1.weight", torch.ones(64, 3, 5, 5))),
        "conv1.weight is (64, 3, 5, 5)",
    ),
    "an integer tensor": (
        lambda m: _edit_tensors(m, lambda s: s.__setitem__("bn1.bias", s["bn1.bias"].long())),
        "bn1.bias is (64,) int64",
    ),
    "no tensors file": (lambda m: m.with_suffix(".safetensors").unlink(), "model.safetensors (the weights) is missing"),
    "a truncated tensors file": (
        lambda m: m.with_suffix(".safetensors").write_bytes(m.with_suffix(".safetensors").read_bytes()[:5000]),
        "not a tensors file",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_export_is_one_line(
    extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """Each of these gave wrong answers (exit 0, NaN probabilities, no predictions) or a traceback."""
    model = _copy_model(extracted["resnet18-model"], tmp_path / "m")
    edit, fragment = DAMAGE[damage]
    edit(model)
    out = tmp_path / "p.csv"
    code, _, err = run(["predict", "--model", str(model), str(extracted["images"]), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "cannot load model", fragment)
    assert code == 1 and not out.exists() and not list(tmp_path.glob("p.tmp*"))


def test_export_refuses_a_head_with_nan(extracted: dict[str, Any], tmp_path: Path, capsys) -> None:
    from safetensors.numpy import load_file as load_arrays
    from safetensors.numpy import save_file as save_arrays

    head_dir = tmp_path / "head"
    train_head(extracted["resnet18"], HeadConfig(head="linear", epochs=2), out=head_dir)
    state = load_arrays(str(head_dir / HEAD_FILE))
    state["bias"][1] = np.nan
    save_arrays(state, str(head_dir / HEAD_FILE))
    out = tmp_path / "m.pt2"
    code, _, err = run(["export", "--head", str(head_dir), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "NaN or infinite values (in bias)")
    assert not list(tmp_path.glob("m.*"))


def test_predict_with_a_file_name_that_is_not_utf8(extracted: dict[str, Any], tmp_path: Path, capsys) -> None:
    """A name with a byte that is not UTF-8 was a UnicodeEncodeError traceback: now written escaped (\\xff)."""
    folder = tmp_path / "new"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or zip tool writes them
    shutil.copy(next((extracted["images"] / "cat").glob("*.png")), odd)
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    code, stdout, err = run(["predict", "--model", str(extracted["resnet18-model"]), str(folder), "--out", str(out)],
                            capsys)  # fmt: skip
    assert code == 0, err
    rows = {r["path"]: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert set(rows) == {f"{folder}/caf\\xe9.png", f"{folder}/bad\\xff.png"}
    assert rows[f"{folder}/caf\\xe9.png"]["class"] == "cat" and rows[f"{folder}/bad\\xff.png"]["error"]
    assert "bad\\xff.png" in stdout and not list(tmp_path.glob("p.tmp*"))


def test_a_failure_mid_predict_leaves_no_tmp(extracted: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr("pipeline.deploy.predict.embed_batch", fail)
    out = tmp_path / "p.csv"
    with pytest.raises(RuntimeError):
        predict(extracted["resnet18-clf"], [extracted["images"]], out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_predict_device_option(extracted: dict[str, Any], tmp_path: Path, capsys, monkeypatch) -> None:
    model, images = str(extracted["resnet18-model"]), str(extracted["images"] / "bird")
    cpu = tmp_path / "cpu.csv"
    code, _, err = run(["predict", "--model", model, images, "--out", str(cpu), "--device", "cpu"], capsys)
    assert code == 0, err
    if torch.cuda.is_available():  # the same predictions on the GPU (TF32 off: fp32 convolutions on CUDA are TF32)
        gpu = tmp_path / "gpu.csv"
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        code, _, err = run(["predict", "--model", model, images, "--out", str(gpu), "--device", "cuda"], capsys)
        assert code == 0, err
        for a, b in zip(csv.DictReader(cpu.open()), csv.DictReader(gpu.open()), strict=True):
            assert a["class"] == b["class"] and float(a["probability"]) == pytest.approx(float(b["probability"]), 1e-3)
    else:
        code, _, err = run(["predict", "--model", model, images, "--out", str(tmp_path / "g.csv"), "--device", "cuda"],
                           capsys)  # fmt: skip
        assert_one_line_error(code, err, "no CUDA GPU")


def test_predictions_csv_rows_equal_predict_through_the_exported_model(
    extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train-head's predictions.csv (from the cached val features, no backbone run) says what ``predict`` says for
    the same images through the exported model: the same class, the same probability to float32 rounding."""
    from pipeline.stage2.answers import read_predictions

    head_dir, images = extracted["resnet18-head"], extracted["images"]
    cached = read_predictions(head_dir / "predictions.csv")
    assert cached and set(cached[0]) >= {"id", "true", "predicted", "probability", "top_k"}
    live = {Path(r["path"]).resolve(): r for r in _predict_rows(extracted["resnet18-model"], images, tmp_path / "p.csv",
                                                                capsys)}  # fmt: skip
    for row in cached:
        got = live[(images / row["id"]).resolve()]
        assert got["class"] == row["predicted"] and row["true"] == Path(row["id"]).parent.name
        assert float(got["probability"]) == pytest.approx(float(row["probability"]), abs=2e-3)
    assert (head_dir / "errors.png").is_file()
