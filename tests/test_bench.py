"""The benchmark runs end to end at --quick sizes and writes its JSON; no timing is asserted (shared CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import bench

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
