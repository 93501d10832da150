"""One progress display for every long loop (extract, predict): a live bar on a terminal; in a log (output not a
terminal), a plain line at most every ~10% of the work or every 30 s, and one at the end. A 50,000-image extract
once wrote ~800 bar redraws into one line of a CI log."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LOG_EVERY_FRACTION = 0.10
LOG_EVERY_SECONDS = 30.0


class _LogLines:
    """``tqdm``'s ``update``/``close`` for a stream that is not a terminal: ``desc: done/total (pct%) rate``."""

    def __init__(self, *, total: int, desc: str, unit: str, initial: int, stream: TextIO):
        self.total, self.desc, self.unit, self.n, self.stream = total, desc, unit, initial, stream
        self._start_n, self._t0 = initial, time.monotonic()
        self._last_n, self._last_t = initial, self._t0
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = max(1, int(self.total * LOG_EVERY_FRACTION))
        if self.n - self._last_n >= step or now - self._last_t >= LOG_EVERY_SECONDS:
            self._line(now)

    def _line(self, now: float) -> None:
        rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        self.stream.write(f"{self.desc}: {self.n}/{self.total}{pct} {rate:.0f} {self.unit}/s\n")
        self.stream.flush()
        self._last_n, self._last_t = self.n, now

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._line(time.monotonic())
        self._closed = True


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    *, total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True, stream: TextIO | None = None
) -> Any:
    """An object with ``update(n)`` and ``close()``: a tqdm bar when ``stream`` (default stderr) is a terminal, log
    lines otherwise, nothing when not ``enabled``."""
    if not enabled:
        return _Off()
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True, mininterval=0.5
        )
    return _LogLines(total=total, desc=desc, unit=unit, initial=initial, stream=stream)
