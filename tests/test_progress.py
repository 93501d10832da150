"""The one progress display (issue 23): a bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

from pipeline.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_at_most() -> None:
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="extract train", stream=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 11, lines
    assert lines[-1].startswith("extract train: 1000/1000 (100%)")
    assert "\r" not in log.getvalue()


def test_a_resumed_run_counts_from_where_it_was_and_ends_with_a_line() -> None:
    log = io.StringIO()
    bar = progress_bar(total=100, initial=95, desc="extract val", stream=log)
    bar.update(5)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("extract val: 100/100 (100%)")


def test_a_terminal_gets_a_live_bar() -> None:
    tty = _Tty()
    bar = progress_bar(total=10, desc="predict", stream=tty)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue()


def test_disabled_writes_nothing() -> None:
    log = io.StringIO()
    bar = progress_bar(total=10, desc="x", stream=log, enabled=False)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
