"""The one safetensors writer (pipeline.tensorfile): what the safetensors library reads back, through the page
cache and with O_DIRECT, and where a filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from pipeline import tensorfile
from pipeline.tensorfile import ALIGN, write_safetensors


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    kinds = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8")
    out = {f"a_{t}": rng.integers(0, 100, size=(3, 5)).astype(t) for t in kinds}
    out |= {
        "flags": np.array([True, False, True]),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 4), np.int32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        "big_endian": np.arange(6, dtype=">f4"),
    }
    return out


def test_numpy_arrays_read_back_equal(tmp_path: Path) -> None:
    arrays = _arrays()
    write_safetensors(tmp_path / "t.safetensors", arrays, metadata={"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        expected = np.asarray(value)
        assert back[name].shape == expected.shape, name
        assert np.array_equal(back[name], expected), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="np") as f:
        assert f.metadata() == {"k": "v"}


def test_each_tensor_starts_at_a_multiple_of_its_element_size(tmp_path: Path) -> None:
    """Laid out as the library lays them out (by element size, then name), so each can be mapped in place."""
    write_safetensors(tmp_path / "t.safetensors", _arrays())
    start, header = _header(tmp_path / "t.safetensors")
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "I16": 2, "U16": 2}
    ends = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        assert (start + begin) % sizes.get(entry["dtype"], 1) == 0, name
        ends.append((begin, end))
    ends.sort()
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[0][0] == 0  # back to back, no gaps
    assert (tmp_path / "t.safetensors").stat().st_size == start + ends[-1][1]


def test_torch_tensors_read_back_equal(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(4, 3, dtype=torch.bfloat16),
        "t": torch.randn(3, 5).t(),  # a view, not contiguous
        "i": torch.arange(7),
        "shared": torch.ones(3),
    }
    tensors["alias"] = tensors["shared"]  # the library's writer refuses tensors sharing memory; each is copied here
    write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"id": "{}"})
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"id": "{}"}
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value), name


def _direct_works(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o666)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def test_a_large_file_written_with_o_direct_reads_back_equal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From DIRECT_BYTES a file goes through an aligned buffer (here small: several full buffers, then a padded
    last block cut back to the file's size), its data starting on an ALIGN boundary."""
    monkeypatch.setattr(tensorfile, "DIRECT_BYTES", 1 << 10)
    monkeypatch.setattr(tensorfile, "BOUNCE_BYTES", 2 * ALIGN)
    arrays = {"features": np.random.default_rng(1).standard_normal((37, 129)).astype(np.float32),
              "labels": np.arange(37, dtype=np.int64)}  # fmt: skip
    path = tmp_path / "head.safetensors"
    write_safetensors(path, arrays)
    back = load_file(str(path))
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())
    start, _ = _header(path)
    assert path.stat().st_size == start + sum(a.nbytes for a in arrays.values())
    if _direct_works(tmp_path):
        assert start % ALIGN == 0  # the header padded with spaces up to the boundary


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_refusing_o_direct_gets_the_usual_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    """tmpfs refuses O_DIRECT when the file is opened; some filesystems only at the first write: either way the
    file is written through the page cache instead, whole."""
    monkeypatch.setattr(tensorfile, "DIRECT_BYTES", 1 << 10)
    real_open, real_write = os.open, os.write
    direct = getattr(os, "O_DIRECT", 0)
    monkeypatch.setattr(os, "O_DIRECT", direct or 0x4000, raising=False)
    handles: set[int] = set()

    def fake_open(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags & ~os.O_DIRECT, *args)
        if flags & os.O_DIRECT:
            handles.add(fd)
        return fd

    def fake_write(fd, data):  # type: ignore[no-untyped-def]
        if fd in handles:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    arrays = {"x": np.arange(5000, dtype=np.float32)}
    write_safetensors(tmp_path / "t.safetensors", arrays)
    assert np.array_equal(load_file(str(tmp_path / "t.safetensors"))["x"], arrays["x"])
    assert (tmp_path / "t.safetensors").stat().st_size == _header(tmp_path / "t.safetensors")[0] + 20000


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk is not a refusal of O_DIRECT: it reaches the caller (atomic_write makes it one line)."""
    monkeypatch.setattr(tensorfile, "DIRECT_BYTES", 1 << 10)
    monkeypatch.setattr(tensorfile, "_write_all", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    if not _direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    with pytest.raises(OSError, match="full"):
        write_safetensors(tmp_path / "t.safetensors", {"x": np.zeros(5000, np.float32)})


def test_an_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "t.safetensors", {"z": np.zeros(3, np.complex64)})
