"""Shared browser fixtures: Debian's Chromium driven by Playwright, with every non-loopback request refused."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("WT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium; CI installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements.txt)"
    return None


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """One headless Chromium per test module.

    Not per session: Playwright's sync API keeps an asyncio loop running on the main thread while it is open, and
    a later module's `asyncio.run` (the SDK's async tests) would then refuse to start.
    """
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class OfflinePage:
    """A page whose requests to anything but loopback are aborted and recorded, with its console errors."""

    def __init__(self, browser: object) -> None:
        """Open a fresh context and page on the browser."""
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    def _route(self, route: object) -> None:
        """Let loopback through; refuse (and note) any other host, as on a machine with no network."""
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOOPBACK:
            route.continue_()
        else:
            self.external.append(url)
            route.abort("internetdisconnected")

    def close(self) -> None:
        """Close the context."""
        self.context.close()


@pytest.fixture
def offline_page(chromium: object) -> Iterator[OfflinePage]:
    """A fresh offline page per test."""
    page = OfflinePage(chromium)
    yield page
    page.close()


@pytest.fixture
def artefact_dir(request: pytest.FixtureRequest) -> Path:
    """Where a test saves its screenshots: $WT_ARTEFACT_DIR or test-artefacts/ in the project, per test."""
    root = Path(os.environ.get("WT_ARTEFACT_DIR", Path(__file__).resolve().parent.parent / "test-artefacts"))
    out = root / request.node.name
    out.mkdir(parents=True, exist_ok=True)
    return out
