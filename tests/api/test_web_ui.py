"""The built-in chat page: its routes, and the page itself in a real browser.

Browser tests drive headless Chromium from Debian's packages through selenium, against the real
``caldera serve`` on a loopback port with an API key. Screenshots (desktop, and a phone-sized
window in dark mode) go to ``$CALDERA_TEST_ARTIFACTS/web-ui`` when that is set, else to a
temporary folder; the run prints where. Without Chromium these tests skip, saying how to
install it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from server_support import ServerProcess, read_metrics

from caldera.api.ui import STATIC_DIR, mount_ui
from caldera.worker.config import ModelConfig

API_KEY = "web-ui-test-key"
CHROMIUM = Path(os.environ.get("CALDERA_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CALDERA_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL = ("install Chromium from Debian's packages and selenium: "
           "`apt-get install -y chromium chromium-driver` (as root) and "
           "`pip install selenium` (or the dev extra)")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed; {INSTALL}"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            return f"{path} is missing; {INSTALL}"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None,
                                   reason=_browser_missing() or "")


# ---- routes (no browser, no engine) --------------------------------------------------------


@pytest.fixture(scope="module")
def ui_client() -> TestClient:
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": []}

    mount_ui(app)
    return TestClient(app)


def test_page_and_assets_are_served_with_their_types(ui_client):
    page = ui_client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, media_type in [("/ui/js/app.js", "text/javascript"), ("/ui/style.css", "text/css"),
                             ("/ui/icon.svg", "image/svg+xml")]:
        response = ui_client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] == media_type, path
    assert ui_client.get("/v1/models").json() == {"data": []}  # API routes are not shadowed
    for missing in ["/ui/nothing.js", "/ui/../ui.py", "/ui/%2e%2e/ui.py", "/ui/js/../../ui.py",
                    "/ui/README.md"]:
        assert ui_client.get(missing).status_code == 404, missing


def test_every_static_file_is_referenced_and_loads_nothing_from_outside():
    files = {p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()}
    text = {name: (STATIC_DIR / name).read_text() for name in files}
    for name, body in text.items():
        for needle in ("http://", "https://", "//cdn", "innerHTML", "insertAdjacentHTML",
                       "document.write", "eval("):
            allowed = needle in ("http://", "https://") and (
                name.endswith(".svg") or name in ("js/images.js", "index.html"))
            assert allowed or needle not in body, f"{name} contains {needle!r}"
    modules = {n for n in files if n.endswith(".js")}
    imported = {"js/app.js"} | {
        f"js/{line.split('./')[1].split(chr(34))[0]}"
        for n in modules for line in text[n].splitlines() if 'from "./' in line
    }
    assert modules == imported, modules ^ imported


# ---- the page in Chromium against the real server ------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, pytestconfig) -> Path:
    root = os.environ.get("CALDERA_TEST_ARTIFACTS")
    folder = Path(root) / "web-ui" if root else tmp_path_factory.mktemp("web-ui")
    folder.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even when pytest captures output
        print(f"\nweb UI screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def server(next_mistral_dir):
    proc = ServerProcess([
        "--model", str(next_mistral_dir), "--served-model-name", "tiny-llava-next",
        "--kv-cache-memory", "64MiB", "--max-model-len", "8192", "--max-num-seqs", "8",
    ], api_key=API_KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--hide-scrollbars", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60, message: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message)


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _js(driver, body: str, *args):
    """Run an async function body in the page (modules at /ui/js/...), return its value."""
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async (...args) => {{ {body} }})(...Array.from(arguments).slice(0, -1))"
        ".then((value) => done({value}), (e) => done({error: String(e && e.stack || e)}));",
        *args)
    assert "error" not in result, result["error"]
    return result["value"]


def _open_page(driver, server) -> None:
    driver.get(server.base_url + "/")
    _wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready"),
          message="the page did not start")


def _ensure_key(driver) -> bool:
    """The page calls /v1/models on load and asks for the key when the server answers 401;
    enter it then. Returns whether the page asked."""
    found = _wait(driver, lambda d: (_css(d, "#key-form:not([hidden])")
                                     or _css(d, "#model:not(:empty)")),
                  message="neither the key prompt nor the model name appeared")
    asked = found[0].get_attribute("id") == "key-form"
    if asked:
        _css(driver, "#key-input")[0].send_keys(API_KEY)
        _css(driver, "#key-form button.primary")[0].click()
    _wait(driver, lambda d: _css(d, "#model:not(:empty)"), message="no model name shown")
    return asked


def _settings(driver, **values: str) -> None:
    _css(driver, "#open-settings")[0].click()
    for name, value in values.items():
        field = _css(driver, f'#settings-form [name="{name}"]')[0]
        field.clear()
        field.send_keys(value)
    _css(driver, '#settings-form button[value="save"]')[0].click()
    _wait(driver, lambda d: not _css(d, "#settings-dialog[open]"))


def _send(driver, text: str) -> None:
    box = _css(driver, "#input")[0]
    box.send_keys(text)
    _css(driver, "#send")[0].click()


def _reply(driver) -> dict:
    """The last reply as the page shows it, read in one script: the page re-renders its
    messages, so element handles held across calls go stale."""
    return driver.execute_script("""
        const reply = [...document.querySelectorAll('.msg.assistant')].at(-1)
                      ?? document.createElement('div');
        const text = (selector) => reply.querySelector(selector)?.innerText ?? '';
        return {status: reply.dataset.status ?? null, body: text('.body'), stats: text('.stats'),
                note: text('.status'), caption: text('figcaption'),
                figures: [...reply.querySelectorAll('figure.seen')].map((f) => ({
                  tokens: f.dataset.imageTokens, canvases: f.querySelectorAll('canvas').length}))};
    """)


def _running(server) -> dict[str, float]:
    with server.client() as c:
        return read_metrics(c)


_WATCH_STREAM = """
// Record each text the streaming reply shows while it is still streaming.
window.__seen = [];
new MutationObserver(() => {
  const reply = [...document.querySelectorAll('.msg.assistant')].at(-1);
  if (reply && reply.dataset.status === 'streaming') {
    const text = reply.querySelector('.body').textContent;
    if (text && window.__seen.at(-1) !== text) window.__seen.push(text);
  }
}).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                 characterData: true, attributes: true});
"""


@needs_browser
def test_page_logic_in_the_browser(browser, server):
    _open_page(browser, server)
    checks = _js(browser, """
        const {parseBlocks} = await import('/ui/js/text.js');
        const {SSEParser} = await import('/ui/js/sse.js');
        const {sha256Plain, sha256Hex} = await import('/ui/js/sha256.js');
        const {layoutFigure} = await import('/ui/js/figure.js');
        const {renderText} = await import('/ui/js/text.js');
        const parser = new SSEParser();
        const events = [parser.push('data: {"a":1}\\r'), parser.push('\\n\\r\\n: c\\ndata:x\\n'),
                        parser.push('data: y\\n\\n')];
        const bytes = new Uint8Array(1000).map((_, i) => (i * 31 + 7) & 255);
        const div = document.createElement('div');
        renderText(div, 'Hi <b>there</b>\\n\\n```js\\nlet x = "<img src=x>";\\n```');
        return {
          blocks: parseBlocks('a\\nb\\n\\n```py\\nx\\n```\\nc\\n```\\nopen'),
          events,
          sha: [sha256Plain(bytes), await sha256Hex(bytes)],
          layout: layoutFigure({original: {width: 500, height: 300}, image_tokens: 1, detail: 'high',
            tile: {width: 336, height: 336}, base: {mode: 'squeeze', resized: {width: 336, height: 336}},
            grid: {canvas: {width: 672, height: 336}, resized: {width: 560, height: 336},
                   padding: {top: 0, left: 56, bottom: 0, right: 56}, tile_size: 336, rows: 1, cols: 2}}, 220),
          crop: layoutFigure({original: {width: 500, height: 300}, image_tokens: 576, detail: 'high',
            tile: {width: 336, height: 336}, base: {mode: 'crop', resized: {width: 560, height: 336},
            crop: {top: 0, left: 112, width: 336, height: 336}}, grid: null}, 220),
          rendered: [div.querySelectorAll('b, img').length, div.querySelector('p').textContent,
                     div.querySelector('pre code').textContent],
        };
    """)
    assert checks["blocks"] == [
        {"type": "paragraph", "text": "a\nb"},
        {"type": "code", "lang": "py", "text": "x", "closed": True},
        {"type": "paragraph", "text": "c"},
        {"type": "code", "lang": "", "text": "open", "closed": False},
    ]
    assert checks["events"] == [[], ['{"a":1}'], ["x\ny"]]
    assert checks["sha"][0] == checks["sha"][1]
    layout = checks["layout"]
    assert (layout["width"], layout["height"]) == (220, 110)
    assert layout["image"] == {"x": 18.33, "y": 0, "w": 183.33, "h": 110}
    assert layout["lines"] == [{"x1": 110, "y1": 0, "x2": 110, "y2": 110}]
    crop = checks["crop"]  # LLaVA 1.5: the resized image, the centre crop marked on it
    assert (crop["kind"], crop["width"], crop["height"]) == ("crop", 220, 132)
    assert crop["crop"] == {"x": 44, "y": 0, "w": 132, "h": 132}
    # Model text is text: markup in it is shown, never parsed.
    assert checks["rendered"] == [0, "Hi <b>there</b>", 'let x = "<img src=x>";']


@needs_browser
def test_a_failed_write_keeps_the_stored_history(browser, server):
    _open_page(browser, server)
    kept = _js(browser, """
        const {IndexedStore} = await import('/ui/js/store.js');
        const store = await IndexedStore.open();
        const conv = {id: 'write-test', title: 't', created: 1, updated: 1,
                      messages: [{role: 'user', text: 'first', images: []}]};
        await store.saveConversation(conv);
        const image = {hash: 'f'.repeat(64), blob: new Blob(['x']), type: 'image/png'};
        let failed = false;
        try {  // a value IndexedDB cannot store makes the whole write fail
          await store.saveConversation({...conv, messages: [], bad: () => 1}, [image]);
        } catch { failed = true; }
        const stored = await store.getConversation('write-test');
        const orphan = await store.getImage(image.hash);
        await store.deleteConversation('write-test');
        return {failed, text: stored.messages[0].text, orphan};
    """)
    assert kept == {"failed": True, "text": "first", "orphan": None}


@needs_browser
def test_images_by_drop_paste_and_url(browser, server):
    _open_page(browser, server)
    _ensure_key(browser)
    _css(browser, "#new-chat")[0].click()
    browser.execute_script("""
        const canvas = Object.assign(document.createElement('canvas'), {width: 64, height: 48});
        canvas.getContext('2d').fillRect(0, 0, 32, 48);
        canvas.toBlob((blob) => {
          const drop = new DataTransfer();
          drop.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
          document.dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true,
                                                         cancelable: true}));
          const paste = new DataTransfer();
          paste.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
          document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {
            clipboardData: paste, bubbles: true, cancelable: true}));
          window.__dataURL = canvas.toDataURL('image/png');
        }, 'image/png');
    """)
    _wait(browser, lambda d: len(_css(d, ".attachment")) == 2, message="drop/paste not attached")
    _css(browser, "#add-url")[0].click()
    _css(browser, "#url-input")[0].send_keys("not a url")
    _css(browser, "#url-form button.primary")[0].click()
    _wait(browser, lambda d: "not a URL" in _css(d, "#url-error")[0].text)
    browser.execute_script("document.getElementById('url-input').value = window.__dataURL")
    _css(browser, "#url-form button.primary")[0].click()
    _wait(browser, lambda d: len(_css(d, ".attachment")) == 3, message="URL not attached")
    assert [e.text for e in _css(browser, ".attachment-size")] == ["64×48"] * 3
    _css(browser, ".attachment .remove")[0].click()
    assert len(_css(browser, ".attachment")) == 2
    # A file that is not an image is refused with a message, and nothing is attached.
    browser.execute_script("""
        const drop = new DataTransfer();
        drop.items.add(new File(['hello'], 'notes.txt', {type: 'text/plain'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true}));
    """)
    _wait(browser, lambda d: "not an image" in _css(d, "#banner")[0].text)
    assert len(_css(browser, ".attachment")) == 2
    _css(browser, "#new-chat")[0].click()
    assert not _css(browser, ".attachment")


@needs_browser
def test_chat_with_an_image_streams_shows_figures_and_survives_reload(
        browser, server, next_mistral_dir, tmp_path, artifacts):
    height, width = 300, 500
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, 128 + 0 * x], -1).astype(np.uint8)
    picture = tmp_path / "gradient.png"
    PIL.Image.fromarray(pixels, "RGB").save(picture)
    expected_tokens = ModelConfig.from_model_dir(next_mistral_dir).num_image_tokens((height, width))

    _open_page(browser, server)
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    assert _ensure_key(browser), "the page did not ask for the API key"
    assert _css(browser, "#model")[0].text == "tiny-llava-next"
    _settings(browser, max_tokens="48", seed="7", temperature="0.8")
    _css(browser, "#new-chat")[0].click()

    _css(browser, "#file-input")[0].send_keys(str(picture))
    _wait(browser, lambda d: _css(d, ".attachment img[src^='blob:']"), message="no preview")
    assert _css(browser, ".attachment-size")[0].text == f"{width}×{height}"
    browser.execute_script(_WATCH_STREAM)
    _send(browser, "What is shown in this image?")

    _wait(browser, lambda d: _reply(d)["status"] == "done", timeout=120,
          message="the reply did not finish")
    _wait(browser, lambda d: _reply(d)["figures"], message="no figure drawn")
    reply = _reply(browser)
    text = reply["body"]
    assert text
    seen = browser.execute_script("return window.__seen")
    assert len(seen) >= 2 and seen[-1] != seen[0], f"the text did not arrive in pieces: {seen}"
    stats = reply["stats"]
    assert re.search(r"TTFT \d+(\.\d+)? m?s · \d+\.\d tok/s · \d+ tokens · prompt \d+", stats), stats
    assert reply["figures"] == [{"tokens": str(expected_tokens), "canvases": 2}]  # grid + base
    caption = reply["caption"]
    assert f"{expected_tokens} image tokens" in caption and "1×2 tiles of 336 px" in caption, caption

    # Reload: the conversation, its image and its figures come back from IndexedDB.
    browser.refresh()
    _wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
    _wait(browser, lambda d: _css(d, ".msg.user .thumb img[src^='blob:']"), message="no image")
    assert _css(browser, ".conversation.active .conversation-title")[0].text == (
        "What is shown in this image?")
    _wait(browser, lambda d: _reply(d)["figures"], message="no figure on reload")
    assert _reply(browser)["body"] == text
    assert not _ensure_key(browser)  # the key is kept for the browser session

    browser.set_window_size(1280, 860)
    browser.save_screenshot(str(artifacts / "desktop.png"))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    browser.set_window_size(390, 844)
    time.sleep(0.3)  # let the layout settle before the picture
    browser.save_screenshot(str(artifacts / "phone-dark.png"))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    browser.set_window_size(1280, 860)
    for name in ("desktop.png", "phone-dark.png"):
        with PIL.Image.open(artifacts / name) as shot:
            assert shot.width >= 390 and shot.height >= 600


@needs_browser
def test_stop_ends_the_request_on_the_server(browser, server):
    _open_page(browser, server)
    _ensure_key(browser)
    _settings(browser, max_tokens="3000", temperature="1")
    _css(browser, "#new-chat")[0].click()
    _send(browser, "Count to a thousand.")
    _wait(browser, lambda d: len(_reply(d)["body"]) > 20,
          timeout=120, message="no streamed text")
    assert _reply(browser)["status"] == "streaming"
    assert _running(server)["caldera_num_requests_running"] == 1
    _css(browser, "#stop")[0].click()
    _wait(browser, lambda d: _reply(d)["status"] == "stopped")
    assert "Stopped" in _reply(browser)["note"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = _running(server)
        if metrics["caldera_num_requests_running"] == 0 and metrics[
                "caldera_kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.2)
    assert metrics["caldera_num_requests_running"] == 0, metrics
    assert metrics["caldera_kv_cache_usage_perc"] == 0, metrics

    # Regenerate replaces the stopped reply; edit-and-resend replaces the question.
    _settings(browser, max_tokens="6")
    _css(browser, ".msg.assistant .actions button")[0].click()  # Regenerate
    _wait(browser, lambda d: _reply(d)["status"] == "done", timeout=120)
    assert len(_css(browser, ".msg")) == 2
    _css(browser, ".msg.user .actions button")[0].click()  # Edit
    box = _css(browser, "#input")[0]
    assert box.get_attribute("value") == "Count to a thousand."
    box.clear()
    _send(browser, "Count to three.")
    _wait(browser, lambda d: _reply(d)["status"] == "done", timeout=120)
    users = _css(browser, ".msg.user .body")
    assert [u.text for u in users] == ["Count to three."]


@needs_browser
def test_export_and_import_keep_images(browser, server, tmp_path):
    _open_page(browser, server)
    exported = _js(browser, """
        const {IndexedStore} = await import('/ui/js/store.js');
        const {readImage} = await import('/ui/js/images.js');
        const {toExport} = await import('/ui/js/transfer.js');
        const store = await IndexedStore.open();
        for (const c of await store.listConversations()) await store.deleteConversation(c.id);
        const canvas = Object.assign(document.createElement('canvas'), {width: 40, height: 30});
        canvas.getContext('2d').fillRect(0, 0, 20, 30);
        const {record, ref} = await readImage(
            await new Promise((resolve) => canvas.toBlob(resolve, 'image/png')), 'half.png');
        await store.saveConversation({id: 'exported', title: 'An exported chat', created: 1,
            updated: 2, messages: [{role: 'user', text: 'Look', images: [ref]},
                                   {role: 'assistant', text: 'Half black.', status: 'done'}]},
            [record]);
        const data = await toExport(await store.exportAll());
        await store.deleteConversation('exported');
        const left = await store.exportAll();
        return {data, left: [left.conversations.length, left.images.length], hash: ref.hash};
    """)
    assert exported["left"] == [0, 0]  # deleting the conversation took its image too
    data = exported["data"]
    assert data["format"] == "caldera-chat"
    assert list(data["images"]) == [exported["hash"]]
    file = tmp_path / "export.json"
    file.write_text(json.dumps(data))

    _open_page(browser, server)
    assert not _css(browser, ".conversation")
    _css(browser, "#import")[0].send_keys(str(file))
    _wait(browser, lambda d: _css(d, ".conversation"), message="nothing imported")
    assert "Imported 1 conversation" in _css(browser, "#banner")[0].text
    _css(browser, ".conversation")[0].click()
    _wait(browser, lambda d: d.execute_script(
        "const img = document.querySelector('.msg.user .thumb img');"
        "return img && img.complete && img.naturalWidth === 40"), message="no image after import")
    assert _css(browser, "#title")[0].text == "An exported chat"
    assert _css(browser, ".msg.assistant .body")[0].text == "Half black."

    _css(browser, "#delete-chat")[0].click()
    browser.switch_to.alert.accept()
    _wait(browser, lambda d: not _css(d, ".conversation"), message="not deleted")
    stored = _js(browser, """
        const {IndexedStore} = await import('/ui/js/store.js');
        const left = await (await IndexedStore.open()).exportAll();
        return [left.conversations.length, left.images.length];
    """)
    assert stored == [0, 0]
