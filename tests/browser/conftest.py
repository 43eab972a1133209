"""Fixtures for the real-browser tests: a ComfyUI server with the pack, and Debian's Chromium.

Without Chromium or Playwright these tests skip locally, but FAIL under CI (``CI`` set):
``.ci/setup-env`` installs both there, so a missing one is a broken setup, not a reason to skip.
Screenshots go to ``output/browser/`` (git-ignored), one per workflow and step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "comfy"))
import comfy_harness  # noqa: E402
import frontend  # noqa: E402

ARTEFACTS = comfy_harness.REPO / "output" / "browser"


def _require(reason: str | None) -> None:
    if reason:
        if os.environ.get("CI", "").strip():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def artefacts() -> Path:
    """``output/browser/``, emptied of the previous session's screenshots (a stale one would mislead)."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTEFACTS.glob("*.png"):
        old.unlink()
    return ARTEFACTS


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory):
    """A ComfyUI server with only this pack, the first-run Templates dialog switched off."""
    _require(frontend.missing_reason() or comfy_harness.comfyui_missing_reason())
    server = comfy_harness.ComfyServer(tmp_path_factory.mktemp("browser_server"))
    server.start()
    try:
        server.post("/api/settings/Comfy.TutorialCompleted", True).raise_for_status()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(browser_server):
    """Chromium for one test module: Playwright's sync API marks an asyncio loop as running in this thread
    while it is open, and the in-process ComfyUI tests after this folder call ``asyncio.run``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = frontend.launch_browser(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, browser_server):
    """A fresh page (own context) on the server's frontend."""
    fe = frontend.Frontend(browser, browser_server.url).open()
    try:
        yield fe
    finally:
        fe.close()
