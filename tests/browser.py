"""Headless Chromium for the browser tests: Debian's `chromium` driven by the PyPI `playwright` package.

Playwright's own browser download (`playwright install`) is not used: `make install-test` installs Debian's
chromium when it is missing, and the tests point playwright at it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    found = os.environ.get("CDS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("no chromium on PATH: run `make install-test` (it installs Debian's chromium), "
                           "or set CDS_CHROMIUM to a Chromium binary")
    return found


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
