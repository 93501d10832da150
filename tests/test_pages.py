"""Large arrays mapped up front (pipeline.pages): the same arrays as np.empty / torch.empty would give, zeroed,
writable, freed with the array; small ones from the usual allocators. And the features read through them."""

from __future__ import annotations

import mmap
import sys

import h5py
import numpy as np
import pytest
import torch

from pipeline import pages

LINUX = sys.platform == "linux"


def _mapped(a: np.ndarray) -> bool:
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return isinstance(base, mmap.mmap)


@pytest.mark.skipif(not LINUX, reason="MAP_POPULATE is Linux's")
def test_a_large_array_is_mapped_zeroed_and_writable() -> None:
    a = pages.empty((pages.MIN_BYTES // 4 // 256 + 1, 256), np.float32)
    assert _mapped(a) and a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32
    assert not a.any()
    a[-1, -1] = 3.0
    assert a.sum() == 3.0


def test_a_small_array_comes_from_numpy() -> None:
    a = pages.empty((4, 3), np.int64)
    assert not _mapped(a) and a.shape == (4, 3) and a.dtype == np.int64


@pytest.mark.skipif(not LINUX, reason="MAP_POPULATE is Linux's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_large_tensor_is_mapped_and_behaves_as_torch_empty(dtype: torch.dtype) -> None:
    rows = pages.MIN_BYTES // (256 * torch.empty((), dtype=dtype).element_size()) + 1
    t = pages.tensor((rows, 256), dtype)
    assert t.shape == (rows, 256) and t.dtype == dtype and t.is_contiguous() and not t.any()
    t[:, 0] = 1
    assert float(t.float().sum()) == rows
    torch.mm(torch.ones(2, rows, dtype=dtype), t, out=torch.empty(2, 256, dtype=dtype))  # usable as any tensor


def test_a_tensor_off_the_cpu_is_torch_empty_there() -> None:
    t = pages.tensor((pages.MIN_BYTES // 4 + 1,), torch.float32, device="meta")
    assert t.device.type == "meta" and t.shape == (pages.MIN_BYTES // 4 + 1,)


def test_features_read_into_mapped_memory_are_the_stored_values(tmp_path, monkeypatch) -> None:
    """A feature file's features, read through pages.empty (the threshold lowered so a small file takes that path),
    equal what h5py reads, and can be written to (copy-on-write: nothing reaches the file)."""
    from pipeline.store import read as store_read
    from tests.conftest import write_feature_file

    path = write_feature_file(tmp_path / "f.h5", n_train=300, n_val=50, dim=64)
    monkeypatch.setattr(pages, "MIN_BYTES", 0)
    fs = store_read.read_features(path)
    with h5py.File(path, "r") as f:
        for split in ("train", "val"):
            expected = f[split]["features"][()]
            got = fs.splits[split].features
            assert np.array_equal(got, expected) and got.dtype == expected.dtype
            assert _mapped(got) == LINUX
    fs.train.features[0, 0] = 1e6
    with h5py.File(path, "r") as f:
        assert f["train"]["features"][0, 0] != 1e6
