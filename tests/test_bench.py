"""The benchmark runs end to end at --quick sizes and writes its JSON; no timing is asserted (shared CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.bench import endtoend as bench

EXPECTED = {"machine", "config", "classic", "two_stage", "bare_forward", "heads", "memory", "gpu", "summary"}


def test_children_peak_rss_is_per_child(tmp_path: Path) -> None:
    """Each child reports its own high-water mark, not the parent's (which ru_maxrss would carry over)."""
    rss = bench.children_peak_rss(
        {"small": ["-c", "pass"], "big": ["-c", "b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096])"]},
        work=tmp_path,
    )
    small, big = rss["small"]["peak_rss_bytes"], rss["big"]["peak_rss_bytes"]
    assert small < 64 << 20  # a bare interpreter, not this torch-laden test process
    assert big - small > 90 << 20


def test_child_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="bench child boom failed"):
        bench.children_peak_rss({"boom": ["-c", "raise SystemExit(3)"]}, work=tmp_path)


def _fake_children(commands: dict[str, list[str]], *, work: Path) -> dict[str, dict[str, int]]:
    # The real children each import torch (seconds apiece); their mechanism is tested above.
    return {name: {"peak_rss_bytes": (500 << 20) + 1000 * i} for i, name in enumerate(commands)}


def test_quick_bench_writes_json_with_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "children_peak_rss", _fake_children)
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the heads' one-thread fitting is undone
    written = sorted(tmp_path.glob("bench-*-quick.json"))
    assert len(written) == 1 and (tmp_path / "latest-quick.json").read_text() == written[0].read_text()
    result = json.loads(written[0].read_text())
    assert set(result) >= EXPECTED
    assert result["quick"] is True and result["classic"]["extrapolated"] is True  # said, not hidden
    assert result["classic"]["epochs_reported"] == 15 and len(result["classic"]["epoch_seconds"]) == 1
    assert result["two_stage"]["images"] == bench.QUICK.n_images
    assert {"load_s", "linear_s", "logreg_s", "compare_s"} <= set(result["heads"])
    assert set(result["memory"]["extract"]) == {str(n) for n in bench.QUICK.rss_sizes}
    if not torch.cuda.is_available():
        assert result["gpu"]["status"].startswith("not measured")
    measures = [row["measure"] for row in result["summary"]]
    assert any("classic loop" in m for m in measures) and any("RSS" in m for m in measures)
    assert all({"measure", "shown", "target", "met"} <= set(row) for row in result["summary"])


def test_bench_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="classic_epochs"):
        bench.BenchConfig(classic_epochs=16)


def test_gpu_section_code_runs_on_cpu_at_tiny_size(tmp_path: Path) -> None:
    """The CUDA measurement cannot run here; its code path (device preprocessing, FLOP ceiling) still can."""
    cpu = torch.device("cpu")
    out = bench.accelerator_throughput(
        tmp_path, device=cpu, sizes={"train": 12, "val": 4}, image_size=32, batch_size=8, matmul_n=64
    )
    assert out["status"] == "measured" and out["images"] == 16 and out["preprocess"] == "device"
    assert out["flops_per_image"] > 1e7 and out["ceiling_images_per_second"] > 0


# ------------------------------------------------------------------------------------------ make bench-gpu


def test_bench_gpu_without_cuda_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.bench import gpu as bench_gpu

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench_gpu.main([]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "no CUDA" in out


def test_bench_gpu_quick_records_failures_and_prints_the_table_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.bench import gpu as bench_gpu

    def boom(ctx):
        raise ValueError("section exploded\nsecond line")

    monkeypatch.setitem(bench_gpu.SECTIONS, "ceiling", boom)
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--quick", "--out", str(out), "--sections", "ceiling,arrays,jpeg,compile,heads"]) == 0
    result = json.loads(out.read_text())
    assert result["ceiling"]["status"] == "failed: ValueError: section exploded"  # one line; the next ones ran
    assert result["arrays"]["status"] == "measured" and result["arrays"]["best_batch"] in bench_gpu.QUICK.batch_sizes
    assert result["arrays"]["defaults"]["batch_size"] == 64  # the CPU default, resolved
    jpeg = result["jpeg"]
    assert jpeg["status"] == "measured" and jpeg["gpu_decode"]["sources"] == ["gpu-decode"]
    assert jpeg["agreement"]["cosine_min"] > 0.999
    assert result["compile"]["status"].startswith("skipped") and result["heads"]["status"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("|") and any("gpu-decode" in line for line in printed)
    assert any("[ceiling] | OPEN" in line for line in printed)


def _measured(**kw):
    return {"status": "measured", **kw}


def test_bench_gpu_table_covers_every_section() -> None:
    """The rows a CUDA run prints, from a result shaped as the sections write it (no GPU here to make one)."""
    from pipeline.bench import gpu as bench_gpu

    run = {"images_per_second": 30_000.0, "images": 60_000, "seconds": 2.0, "compile_seconds": 0.0, "batch_size": 512}
    result = {
        "ceiling": _measured(matmul_flops_per_second=7.8e14, ceiling_images_per_second={"resnet18": 216_000.0}),
        "bare": _measured(
            resnet18={"256": 38_000.0, "512": 39_000.0},
            mobilenet_v2={"256": 28_000.0},
            resnet50={"256": 15_000.0},
            mobilenet_v2_no_cudnn_benchmark=9_000.0,
        ),  # fmt: skip
        "arrays": _measured(
            defaults=run, best=run, best_batch=512, sync_calls_per_batch={"per_batch": 0.0, "where": []}
        ),  # fmt: skip
        "families": _measured(mobilenet_v2=run, resnet50=run),
        "jpeg": _measured(
            folder={"files": 20_000, "mean_bytes": 1e5},
            gpu_decode=run,
            loader=run,
            agreement={"cosine_min": 0.99, "cosine_median": 0.999, "relative_l2_median": 0.04},
        ),
        "torchrun": _measured(plain={"wall_s": 10.0}, torchrun={"wall_s": 12.0}, torchrun_over_plain=1.2),
        "startup": _measured(phases_s={"import torch": 2.0, "scikit-learn imported by extract": False}, wall_s=9.0),
        "compile": _measured(
            mode="default",
            eager=run,
            compiled={**run, "compile_seconds": 40.0},
            compiled_steady_images_per_second=36_000.0,
            break_even_images=7.2e6,
            constant_in_use=2_000_000,
        ),  # fmt: skip
        "heads": _measured(
            rows=[
                {"name": "logreg torch, 60,000 x 2,048", "seconds": 0.81, "target_s": 2.0, "met": True, "note": "80 it"}
            ]
        ),
        "fidelity": _measured(
            digits={"rows": [{"path": "device fp32", "median_rel": 0.0, "min_cos": 1.0, "logreg_val_acc": 0.87}]}
        ),
    }
    rows = bench_gpu.summary_rows(result)
    table = bench_gpu.format_table(rows)
    assert "| extract resnet18 arrays, defaults (batch 512) (img/s) | 30,000 | >= 0.9 x bare | 0.77 x bare |" in table
    assert "0.18 x FLOP ceiling" in table  # ResNet18 bare at batch 512 against 216,000
    assert "| agreement with PIL fp32, digits: device fp32 | 0.0e+00 |" in table
    assert "| heads: logreg torch, 60,000 x 2,048 (s) | 0.81 | <= 2 s | met | 80 it |" in table
    for text in ("gpu-decode", "PIL loader", "torchrun", "start-up", "break-even", "7,200,000"):
        assert text in table, text


def test_break_even_images() -> None:
    from pipeline.bench.gpu import break_even_images

    # 40 s of compile, 30,000 -> 40,000 img/s: each image saves 1/120,000 s
    assert break_even_images(compile_s=40.0, eager_ips=30_000.0, compiled_ips=40_000.0) == pytest.approx(4.8e6)
    assert break_even_images(compile_s=40.0, eager_ips=30_000.0, compiled_ips=29_000.0) is None


def test_compile_measure_bookkeeping_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile child's arithmetic with torch.compile stood in for by the eager model (inductor takes minutes
    here): the compile time is reported apart from the run, and --compile pads the last batch."""
    from pipeline.bench import gpu as bench_gpu

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    ctx = bench_gpu.Context(cfg=bench_gpu.QUICK, device=torch.device("cpu"), work=tmp_path, quick=True)
    out = bench_gpu.compile_measure(ctx)
    assert out["eager"]["images"] == out["compiled"]["images"] == bench_gpu.QUICK.compile_images
    assert out["compiled"]["compile_seconds"] > 0 and out["eager"]["compile_seconds"] == 0
    assert out["constant_in_use"] > 0 and out["mode"]


def test_heads_bench_compare_rows_time_each_head_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head's row is the time the user waits for it (fit + evaluation + writing its folder), k-NN against its
    target, with the three parts in the note."""
    import subprocess
    from types import SimpleNamespace

    from pipeline.bench import heads

    def fake_compare(cmd: list[str], **kwargs: object) -> SimpleNamespace:
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        rows = [
            {"head": "logreg", "fit_seconds": 2.0, "eval_seconds": 0.5, "head_seconds": 3.0, "val_accuracy": 0.8},
            {"head": "knn", "fit_seconds": 0.3, "eval_seconds": 4.0, "head_seconds": 5.5, "val_accuracy": 0.7},
        ]
        (out / "compare.json").write_text(json.dumps({"rows": rows, "best": "logreg"}))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_compare)
    rows = heads.compare_rows(tmp_path / "f.h5", tmp_path, label="x", device="cpu", gpu=False)
    logreg, knn = rows[1], rows[2]
    assert logreg["seconds"] == 3.0 and logreg["target_s"] is None
    assert "fit 2.00 s, evaluation 0.50 s, writing 0.50 s" in logreg["note"]
    assert knn["seconds"] == 5.5 and knn["target_s"] == heads.KNN_TARGET_S and knn["met"] is False
    assert rows[0]["target_s"] == heads.COMPARE_TARGET_S


def test_heads_bench_compare_row_is_the_median_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several runs the row is the median run, its heads' rows that run's, and the note gives every run."""
    from types import SimpleNamespace

    from pipeline.bench import heads

    times = iter([31.0, 27.0, 29.0])

    def fake_process(path: Path, out: Path, *, device: str, one_by_one: bool = False) -> tuple:
        seconds = next(times)
        out.mkdir(parents=True, exist_ok=True)
        row = {"head": "logreg", "fit_seconds": 1.0, "eval_seconds": 0.5, "head_seconds": seconds / 10}
        (out / "compare.json").write_text(json.dumps({"rows": [row], "best": f"run of {seconds}"}))
        return seconds, 2 * seconds, SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(heads, "_compare_process", fake_process)
    whole, logreg = heads.compare_rows(tmp_path / "f.h5", tmp_path, label="x", device="cpu", gpu=False, runs=3)
    assert whole["seconds"] == 29.0 and whole["met"] is True
    assert "median of 3 runs (31.00, 27.00, 29.00 s)" in whole["note"]
    assert "best run of 29.0; CPU 58.0 s" in whole["note"]
    assert logreg["seconds"] == 2.9


def test_heads_bench_says_the_hosts_speed_beside_each_compare_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a probe, each run's time is said beside the host's speed measured just before it (the shared CPU's
    slow spells slow every head), and the speed is measured in GFLOP/s and GB/s that a matmul really reaches."""
    from types import SimpleNamespace

    import numpy as np

    from pipeline.bench import heads

    gflops, gbs = heads.host_speed(np.random.default_rng(0).random((4_000, 256), np.float32))
    assert 0.1 < gflops < 1e4 and 0.01 < gbs < 1e4
    speeds, times = iter([(80.0, 4.5), (60.0, 3.1)]), iter([25.0, 31.0])

    def fake_process(path: Path, out: Path, *, device: str, one_by_one: bool = False) -> tuple:
        seconds = next(times)
        out.mkdir(parents=True, exist_ok=True)
        row = {"head": "logreg", "fit_seconds": 1.0, "eval_seconds": 0.5, "head_seconds": 2.0}
        (out / "compare.json").write_text(json.dumps({"rows": [row], "best": "logreg"}))
        return seconds, 2 * seconds, SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(heads, "_compare_process", fake_process)
    monkeypatch.setattr(heads, "host_speed", lambda X: next(speeds))
    whole = heads.compare_rows(tmp_path / "f.h5", tmp_path, label="x", device="cpu", gpu=False, runs=2,
                               probe=np.zeros((2, 2), np.float32))  # fmt: skip
    assert "25.00 s (host 80 GFLOP/s, 4.5 GB/s), 31.00 s (host 60 GFLOP/s, 3.1 GB/s)" in whole[0]["note"]
