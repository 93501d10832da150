"""--precision: resolved per device, recorded in the fingerprint (old files' values kept), TF32 flags restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.stage1.extract import ExtractConfig, plan_extraction
from pipeline.stage1.precision import from_amp_option, precision_context, resolve_precision
from pipeline.store import read_meta
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere_with_the_old_labels() -> None:
    assert resolve_precision("auto", CUDA).label == "bf16-autocast"  # the old CUDA default's value
    assert resolve_precision("auto", CPU).label == "fp32"  # the old CPU value
    assert resolve_precision("fp32", CUDA).label == "fp32-no-tf32"  # old --no-amp CUDA files had TF32 convolutions
    assert resolve_precision("tf32", CPU).name == "fp32"  # TF32 exists on CUDA only
    assert resolve_precision("bf16", CPU).autocast is torch.bfloat16  # selectable on CPU, never the default
    with pytest.raises(PipelineError, match="unknown precision 'fp8'"):
        ExtractConfig(precision="fp8")


def test_amp_is_an_alias() -> None:
    assert from_amp_option("auto", None) == "auto" and from_amp_option("fp16", None) == "fp16"
    assert from_amp_option("auto", True) == "auto" and from_amp_option("auto", False) == "fp32"
    assert from_amp_option("fp32", False) == "fp32"
    with pytest.raises(PipelineError, match="--amp contradicts --precision fp16"):
        from_amp_option("fp16", True)


@pytest.mark.parametrize(("name", "inside"), [("fp32", False), ("tf32", True)])
def test_tf32_flags_are_set_for_the_extraction_and_restored(name: str, inside: bool) -> None:
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = not inside, not inside
    try:
        with pytest.raises(RuntimeError, match="boom"), precision_context(resolve_precision(name, CUDA), CUDA):
            assert flags() == (inside, inside)
            raise RuntimeError("boom")
        assert flags() == (not inside, not inside)  # restored, even on an error
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_bf16_autocast_runs_on_cpu() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode(), precision_context(resolve_precision("bf16", CPU), CPU):
        assert conv(x).dtype == torch.bfloat16
    with torch.inference_mode(), precision_context(resolve_precision("fp32", CPU), CPU):
        assert conv(x).dtype == torch.float32


def test_default_identity_is_what_files_had_before(image_folder: Path) -> None:
    """Default settings keep the fingerprint of files written before --precision and --resize existed."""
    plan = plan_extraction(ExtractConfig(dataset=str(image_folder), **TINY_EXTRACT))
    assert plan.identity["precision"] == "fp32"
    assert set(plan.identity["preprocessing"]) == {"resize_size", "crop_size", "mean", "std", "interpolation"}
    full = plan_extraction(ExtractConfig(dataset=str(image_folder), resize="full", precision="bf16", **TINY_EXTRACT))
    assert full.identity["preprocessing"]["resize"] == "full" and full.identity["precision"] == "bf16-autocast"
    assert full.fp != plan.fp


def test_cli_precision_resize_and_amp_alias(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["extract", "--dataset", str(image_folder), "--amp", "--precision", "fp16", *TINY_ARGS], capsys)
    assert_one_line_error(code, err, "contradicts --precision fp16")
    out = tmp_path / "f.h5"
    args = ["extract", "--dataset", str(image_folder), "--out", str(out), "--no-amp", "--resize", "full", *TINY_ARGS]
    code, _, err = run(args, capsys)
    assert code == 0, err

    meta = read_meta(out)
    assert meta.precision == "fp32" and meta.preprocessing["resize"] == "full"
    assert meta.config["precision"] == "fp32"
