"""Render a report page in a real browser (headless Chromium) and read back what it saw: how many images, how many
broken, which console messages and load errors. Skips, with its reason, where no Chromium can be had (.ci/run
installs Debian's ``chromium`` when missing)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


# Injected into a copy of the page (the page itself has no script): counts images, broken ones, and every load or
# script error event (captured on window: an <img> error does not bubble).
PROBE = """<script>let errors = 0; addEventListener('error', () => { errors++; }, true);
addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken', broken);
  document.body.setAttribute('data-errors', errors);
});</script>"""


def render_in_chromium(
    page: Path, *, tmp: Path, screenshot: Path | None = None, window: tuple[int, int] = (1200, 1400)
) -> dict:
    """Load ``page`` in headless Chromium: ``images`` and ``broken`` (images not decoded), ``errors`` (error events)
    from the dumped DOM, ``console`` (the console lines Chromium logged)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium; .ci/run installs it)")
    probe = page.with_name(f".probe_{page.name}")  # beside the page: relative links resolve as they would
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}"]  # fmt: skip
    try:
        dom = subprocess.run(flags + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                                      probe.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)
    if screenshot is not None:
        subprocess.run(flags + [f"--screenshot={screenshot}", f"--window-size={window[0]},{window[1]}", page.as_uri()],
                       capture_output=True, timeout=120)  # fmt: skip
    found = re.search(r'data-images="(\d+)" data-broken="(\d+)" data-errors="(\d+)"', dom.stdout)
    assert found, f"the page did not load in {browser}: {dom.stderr[-500:]}"
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return {"images": int(found[1]), "broken": int(found[2]), "errors": int(found[3]), "console": console}
