"""Issue 24, stage one: inputs that must not hang or fail obscurely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.stage1.datasets import load_folder, load_image


@pytest.mark.parametrize("verify", ["stat", "content"])
def test_fifo_and_device_link_are_skipped_not_opened(image_folder: Path, verify: str) -> None:
    """Issue 24 item 3: a FIFO or a link to /dev/zero named like an image hung the scan (content) and the load."""
    cls = sorted(p for p in image_folder.iterdir() if p.is_dir())[0]
    os.mkfifo(cls / "pipe.png")
    (cls / "zero.png").symlink_to("/dev/zero")
    source = load_folder(image_folder, verify=verify)
    ids = [i for s in source.splits.values() for i in s.ids]
    assert not any(i.endswith(("pipe.png", "zero.png")) for i in ids)
    assert sum("not a regular file" in p for p in source.unreadable) == 2


def test_load_image_refuses_a_fifo_before_opening(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(tmp_path / "pipe.png")


def test_targets_field_over_csv_limit_is_one_line(tmp_path: Path) -> None:
    """Issue 24 item 6: a field over 131,072 characters raised _csv.Error as a traceback."""
    from pipeline.errors import PipelineError
    from pipeline.stage1.targets import read_targets_csv

    path = tmp_path / "t.csv"
    path.write_text("id,y\n" + "a" * 200_000 + ",1\n")
    with pytest.raises(PipelineError, match="not a readable CSV"):
        read_targets_csv(path)
