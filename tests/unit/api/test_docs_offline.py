"""Swagger UI (/docs) and ReDoc (/redoc) work without internet access: every asset they load is served
by the service itself, and headless Chromium, with every host but the service unresolvable, renders
the Swagger UI page with the upload operation (POST /v1/models) and its multipart ``file`` field."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_report_html import chromium_binary, decode_png

UPLOAD_OPERATION = "models/upload_model_v1_models_post"   # Swagger UI's deep link: tag / operationId


def _asset_urls(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", page) + re.findall(r"""url:\s*'([^']+)'""", page)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_the_services_own_assets(api_client, page):
    response = api_client.get(page)
    assert response.status_code == 200
    assert "http://" not in response.text and "https://" not in response.text, "the page names another host"
    urls = _asset_urls(response.text)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/"), url
        asset = api_client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 0, url


@pytest.fixture
def live_api(migrated: Path) -> Iterator[str]:
    """The API app served by uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn

    from api.main import create_app
    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # Every host name but the loopback address fails to resolve: a page that needs a CDN stays blank.
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={profile}",
         "--window-size=1000,1000", "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=180)


def test_swagger_ui_renders_offline_in_chromium(live_api, tmp_path: Path):
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    url = f"{live_api}/docs#/{UPLOAD_OPERATION}"   # the deep link opens the upload operation

    dom = _chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # Swagger UI built the page from /openapi.json: the upload operation is there, expanded, with
    # its multipart request body and the `file` field.
    assert 'id="operations-models-upload_model_v1_models_post"' in html, html[-3000:]
    assert 'data-path="/v1/models"' in html and "opblock-post" in html
    assert 'data-property-name="file"' in html and '<option value="multipart/form-data">' in html, \
        "the upload form's file field is missing"

    screenshot = tmp_path / "docs.png"
    shot = _chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
    assert screenshot.exists(), f"chromium wrote no screenshot (exit {shot.returncode}): {shot.stderr[-2000:]}"
    width, height, channels, pixels = decode_png(screenshot.read_bytes())
    assert (width, height) == (1000, 1000)
    colours, dark = set(), 0
    for offset in range(0, len(pixels), channels * 7):
        pixel = pixels[offset:offset + min(channels, 3)]
        colours.add(pixel)
        dark += max(pixel) < 128
    assert len(colours) > 20, f"only {len(colours)} colours: the page looks blank"
    assert dark / (len(pixels) // (channels * 7)) > 0.005, "almost no dark pixels: no text was drawn"
