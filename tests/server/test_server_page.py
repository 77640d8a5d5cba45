"""The chat page at GET /, in a real headless Chromium (Debian's, driven by Playwright):
attach an image, ask, watch the streamed answer, ask again; a new chat with a pasted image.
The answers are generate()'s."""

import base64
import os
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from llava_mlx import generate

from conftest import SERVER_MODEL

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# docs/server.md's screenshot (docs/server-chat.png) is refreshed only when asked for: a test run
# never rewrites a tracked file.
SCREENSHOT = os.environ.get("LLAVA_SCREENSHOT")
# Paste a PNG (base64) as the browser does when an image is on the clipboard.
PASTE = """png => {
  const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
  document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data }));
}"""


def test_chat_page_answers_an_uploaded_image(live_server, loaded, images, tmp_path):
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh or set CHROMIUM_PATH"
    model, processor = loaded(SERVER_MODEL)
    questions = ["What is in this picture?", "And what colours does it have?"]
    history = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 900, "height": 640},
        )
        try:
            page = browser.new_page()
            page.goto(live_server.url + "/")
            page.fill("#max-tokens", "16")
            page.set_input_files("#file", str(images["square"]))
            page.wait_for_selector("#attached img")
            for turn, question in enumerate(questions):
                page.fill("#prompt", question)
                page.click("#send")
                done = page.wait_for_selector(f".assistant[data-state=done] >> nth={turn}", timeout=120_000)
                answer = done.eval_on_selector("span", "e => e.textContent")
                expected = generate(model, processor, question, [images["square"]], max_tokens=16, history=history).text
                assert answer == expected
                history.append((question, answer))
            assert page.locator(".user img").count() == 1  # the image went with the first question
            assert "from the cache" in page.inner_text("#status")
            page.screenshot(path=SCREENSHOT or str(tmp_path / "chat.png"))

            # a new chat, the image pasted from the clipboard this time
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            png = base64.b64encode(images["tiny"].read_bytes()).decode()
            page.evaluate(PASTE, png)
            page.wait_for_selector("#attached img")
            page.fill("#prompt", questions[0])
            page.click("#send")
            done = page.wait_for_selector(".assistant[data-state=done]", timeout=120_000)
            expected = generate(model, processor, questions[0], [images["tiny"]], max_tokens=16).text
            assert done.eval_on_selector("span", "e => e.textContent") == expected
        finally:
            browser.close()
