"""Render a page in headless Chromium and return the DOM after load, with how many figures decoded."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROBE = ("<script>window.addEventListener('load', () => { document.body.dataset.renderedFigures = "
         "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });</script>")


def render_in_browser(page: Path, workdir: Path) -> str:
    """The DOM Chromium built from `page` (a copy with a probe that counts decoded images)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("EDGESLIM_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (bash scripts/install.sh --dev installs it)")
        pytest.skip("chromium is not installed (bash scripts/install.sh --dev installs it)")
    probed = workdir / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={workdir / 'chrome'}",
         "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout
