"""The demo page in headless Chromium, driven over the DevTools protocol: the first sample chosen on load, upload,
slider, reconstruction, labels, the nearest gallery images, screenshots."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from service_helpers import ARTIFACTS, SAMPLES, server_process

from service.settings import BUNDLED_MODEL_DIR

websockets = pytest.importorskip("websockets")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: Any):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    async def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


def _page_websocket(profile: Path, timeout: float = 30.0) -> str:
    """The DevTools websocket of the first page, once Chromium has written its port."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


NEIGHBORS = 8  # app.js: the gallery images shown per query
CAPTIONS = "[...document.querySelectorAll('#neighbor-list figcaption')].map(c => c.textContent)"


async def _open(page: DevTools, url: str, height: int = 760) -> None:
    await page.call("Page.enable")
    await page.call("Emulation.setDeviceMetricsOverride", width=1100, height=height, deviceScaleFactor=1, mobile=False)
    await page.call("Page.navigate", url=url)
    await page.wait_for("document.body && document.body.dataset.ready === 'true'")


async def _neighbors_of(page: DevTools, image: str) -> list[str]:
    """The nearest-images panel once it shows `image`'s neighbours, every picture loaded: their captions."""
    await page.wait_for(f"document.querySelector('#result').dataset.image === '{image}'")
    await page.wait_for(f"document.querySelectorAll('#neighbor-list img').length === {NEIGHBORS} && "
                        "[...document.querySelectorAll('#neighbor-list img')].every(i => i.naturalWidth > 0)")
    return await page.evaluate(CAPTIONS)


async def _drive(ws_url: str, url: str, upload: Path, screenshot: Path) -> dict[str, Any]:
    async with websockets.connect(ws_url, max_size=None) as ws:
        page = DevTools(ws)
        await _open(page, url)
        await page.wait_for("document.querySelectorAll('#samples img').length >= 10")
        # the page opened with the first sample chosen and searched
        opened = {"neighbors": await _neighbors_of(page, "ankle-boot.png"),
                  "image": await page.evaluate("document.querySelector('#result').dataset.image")}
        # Upload a file through the real <input type=file>, as a user picking a file does.
        document = await page.call("DOM.getDocument")
        node = await page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
        await page.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(upload)])
        await page.wait_for("document.querySelector('#result').dataset.image === 'sneaker.png' && "
                            "document.querySelector('#result').dataset.ratio === '0.75'")
        first_seed = await page.evaluate("document.querySelector('#result').dataset.seed")
        # Move the slider with the keyboard: two steps of 0.05 to the left.
        await page.evaluate("document.querySelector('#ratio').focus()")
        await page.press("ArrowLeft", 37)
        await page.press("ArrowLeft", 37)
        await page.wait_for("document.querySelector('#result').dataset.ratio === '0.65'")
        await page.wait_for("['original','masked','reconstruction','pasted'].every("
                            "n => document.querySelector('#img-' + n).naturalWidth === 28)")
        await page.wait_for("document.querySelectorAll('#label-list li').length === 5")
        state = {
            "opened": opened,
            "neighbors": await _neighbors_of(page, "sneaker.png"),
            "seed": await page.evaluate("document.querySelector('#result').dataset.seed"),
            "first_seed": first_seed,
            "scores": await page.evaluate("document.querySelector('#scores').textContent"),
            "labels": await page.evaluate("[...document.querySelectorAll('#label-list li')].map(li => li.textContent)"),
            "status": await page.evaluate("document.querySelector('#status').textContent"),
        }
        shot = await page.call("Page.captureScreenshot", format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return state


@contextmanager
def _chromium(profile: Path) -> Iterator[str]:
    """Headless Chromium on about:blank; yields its page's DevTools websocket."""
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield _page_websocket(profile)
    finally:
        browser.terminate()
        browser.wait(timeout=20)


def test_demo_page_upload_slider_reconstruction(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With a folder gallery of the samples (a class folder each): the page opens with the first sample chosen and
    its nearest gallery images shown, itself first at similarity 1; an upload searches again."""
    gallery = tmp_path / "gallery"
    for sample in SAMPLES.glob("*.png"):
        (gallery / sample.stem).mkdir(parents=True)
        shutil.copy(sample, gallery / sample.stem / sample.name)
    screenshot = ARTIFACTS / "demo-page.png"
    with server_process(tiny_model_dir, "--gallery", str(gallery)) as (url, _), \
            _chromium(tmp_path / "chromium-profile") as ws_url:
        state = asyncio.run(_drive(ws_url, f"{url}/", SAMPLES / "sneaker.png", screenshot))
    assert state["opened"]["image"] == "ankle-boot.png"
    assert len(state["opened"]["neighbors"]) == NEIGHBORS and state["opened"]["neighbors"][0] == "ankle-boot · 1.000"
    assert len(state["neighbors"]) == NEIGHBORS and state["neighbors"][0] == "sneaker · 1.000"
    assert state["seed"] == state["first_seed"]  # the slider keeps the mask's seed
    assert state["scores"].startswith("17 of 49 patches visible")  # int(49 * 0.35)
    assert len(state["labels"]) == 5 and state["status"] == ""
    assert screenshot.stat().st_size > 10_000


def test_demo_page_with_the_bundled_model_and_gallery(tmp_path: Path) -> None:
    """The bundled model and its bundled gallery (MAE_GALLERY=auto): on load, without a click, the first sample's
    reconstruction, labels and nearest Fashion-MNIST test images; the screenshot is the README's
    (docs/demo_search.png, copied from tmp/artifacts/demo-search.png)."""

    async def drive(ws_url: str, url: str) -> dict[str, Any]:
        async with websockets.connect(ws_url, max_size=None) as ws:
            page = DevTools(ws)
            await _open(page, url, height=780)
            neighbors = await _neighbors_of(page, "ankle-boot.png")
            await page.wait_for("document.querySelectorAll('#label-list li').length === 5")
            shot = await page.call("Page.captureScreenshot", format="png")
            return {"neighbors": neighbors, "gallery": await page.evaluate("document.querySelector('#gallery-line')"
                                                                           ".textContent"),
                    "labels": await page.evaluate("[...document.querySelectorAll('#label-list li')]"
                                                  ".map(li => li.textContent)"), "shot": shot["data"]}

    screenshot = ARTIFACTS / "demo-search.png"
    with server_process(BUNDLED_MODEL_DIR) as (url, _), _chromium(tmp_path / "chromium-profile") as ws_url:
        state = asyncio.run(drive(ws_url, f"{url}/"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(state["shot"]))
    labels = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert len(state["neighbors"]) == NEIGHBORS
    assert all(c.split(" · ")[0] in labels for c in state["neighbors"]), state["neighbors"]
    assert sum(c.startswith("Ankle boot") for c in state["neighbors"]) >= NEIGHBORS // 2, state["neighbors"]
    assert state["gallery"].startswith("bundled: 1000 Fashion-MNIST test images")
    assert state["labels"][0].startswith("Ankle boot"), state["labels"]
    assert screenshot.stat().st_size > 10_000


def test_api_docs_render_without_internet(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Swagger UI at /docs draws every route from this server's own assets (no CDN: this machine has no
    internet, so a page that needed one would stay blank)."""

    async def drive(ws_url: str, url: str) -> dict[str, Any]:
        async with websockets.connect(ws_url, max_size=None) as ws:
            page = DevTools(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for("document.querySelectorAll('.opblock').length >= 3")
            return {"title": await page.evaluate("document.querySelector('.info .title').textContent"),
                    "paths": await page.evaluate("[...document.querySelectorAll('.opblock-summary-path')]"
                                                 ".map(e => e.textContent.replace(/\\u200b/g, ''))")}

    with server_process(tiny_model_dir) as (url, _), _chromium(tmp_path / "chromium-profile") as ws_url:
        state = asyncio.run(drive(ws_url, f"{url}/docs"))
    assert state["title"].startswith("MAE service")
    assert {"/embed", "/reconstruct", "/classify"} <= set(state["paths"]), state["paths"]
