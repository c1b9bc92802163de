"""The web chat page in a real browser: Playwright drives Debian's headless Chromium against a live server."""

import os
from pathlib import Path

import pytest

from gptforge.engine import Engine
from gptforge.serve.app import ServerSettings, create_app

CHROMIUM = Path(os.environ.get("GPTFORGE_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def live(make_tiny_model, live_server):
    model, tok = make_tiny_model(block_size=96)
    server = live_server(create_app(Engine(model, tok), ServerSettings(model_name="tiny-chat")))
    yield server
    server.close()


@pytest.fixture(scope="module")
def page(live):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium (CI installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(live.url + "/")
        yield page
        browser.close()


def test_chat_page_streams_a_reply_and_keeps_the_conversation(page):
    assert "tiny-chat" in page.text_content("#model-name")
    assert page.input_value("#temperature") == "0.8" and page.input_value("#top_p") == "0.95"
    page.fill("#max_tokens", "40")
    page.fill("#seed", "3")
    # Record every text the reply bubble shows while it streams.
    page.evaluate("""() => {
        window.__snapshots = [];
        new MutationObserver(() => {
            const r = document.querySelector('.msg.assistant');
            if (r) window.__snapshots.push(r.firstChild ? r.firstChild.textContent || '' : '');
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "Hello, who are you?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.user")
    assert page.text_content(".msg.user") == "Hello, who are you?"
    page.wait_for_selector(".msg.assistant .meta", timeout=30_000)  # the reply finished
    reply = page.locator(".msg.assistant").first
    meta = reply.locator(".meta").text_content()
    assert "temperature 0.8" in meta and "top-p 0.95" in meta
    text = reply.evaluate("el => el.firstChild.textContent")
    assert len(text.strip()) > 0
    snapshots = [s for s in page.evaluate("window.__snapshots") if s]
    assert len(set(snapshots)) >= 3  # the reply grew piece by piece: it was streamed
    assert "error" not in (reply.get_attribute("class") or "")

    # A second message continues the same conversation.
    page.fill("#prompt", "And then?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=30_000)
    assert page.locator(".msg.user").count() == 2
    assert page.evaluate("conversation.length") == 4

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.evaluate("conversation.length") == 0
