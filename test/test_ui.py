"""Offline /docs and /redoc, and the web dashboard, in a real browser (Debian's Chromium via Playwright)."""

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import OfflinePage

from conftest import start_server, stop_server

EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_root: Path) -> Iterator[str]:
    """A real server on loopback serving the tiny model (the browser needs a socket)."""
    url, proc = start_server(tmp_path_factory.mktemp("ui_server"), tiny_model_root)
    yield url
    stop_server(proc)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_reference_no_external_url(live: str, path: str) -> None:
    html = httpx.get(live + path).text
    assert "/static/vendor/" in html
    assert not EXTERNAL_URL.search(html), html
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert httpx.get(live + asset).status_code == 200, asset


def test_swagger_ui_renders_operations_offline(live: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    page = offline_page.page
    page.goto(live + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/train/start" in p for p in paths), paths
    assert any("/v1/chat/completions" in p for p in paths), paths
    page.locator(".opblock-summary-path", has_text="/health").first.click()
    page.wait_for_selector("text=Try it out")
    page.screenshot(path=str(artefact_dir / "docs.png"))
    assert offline_page.external == []


def test_redoc_renders_operations_offline(live: str, offline_page: OfflinePage, artefact_dir: Path) -> None:
    page = offline_page.page
    page.goto(live + "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']", timeout=60_000)
    assert page.locator("[data-section-id^='operation/']").count() > 10
    assert "/api/train/start" in page.content()
    page.screenshot(path=str(artefact_dir / "redoc.png"))
    assert offline_page.external == []
