"""level05/chat.py's page in a real browser: headless Chromium, driven over the DevTools protocol
(tests/test_browser.py's client). Two pages join one room and see each other's messages, with
the page's Content-Security-Policy in force and nothing reported on the console. Skipped where
no Chromium is installed.
"""
import contextlib
import json

from tests.test_browser import DevTools, Page, chromium, pytestmark  # noqa: F401 (the fixture, the skip)

SCRIPT = "level05/chat.py"


@contextlib.contextmanager
def browser_page(chromium):   # noqa: F811 (the fixture's value)
    """A page in a browser context of its own: two of them are two people."""
    browser, address = chromium
    context = browser.call("Target.createBrowserContext")["browserContextId"]
    target = browser.call("Target.createTarget", url="about:blank",
                          browserContextId=context)["targetId"]
    tools = DevTools(f"ws://{address}/devtools/page/{target}")
    try:
        yield Page(tools)
    finally:
        tools.close()
        browser.call("Target.disposeBrowserContext", browserContextId=context)


def join(page, url, room, name):
    page.open(url + "/app")
    page.evaluate(f"document.getElementById('room').value = {json.dumps(room)}; "
                  f"document.getElementById('name').value = {json.dumps(name)}; "
                  f"document.getElementById('join').requestSubmit()")
    page.wait_until("!document.getElementById('chat').hidden")


def say(page, text):
    page.evaluate(f"document.getElementById('text').value = {json.dumps(text)}; "
                  f"document.getElementById('chat').requestSubmit()")


def shows(page, text):
    return f"[...document.querySelectorAll('#messages li')].some((li) => li.textContent === {json.dumps(text)})"


def test_two_pages_chat_in_one_room(start_server, chromium, tmp_path):   # noqa: F811
    server = start_server(SCRIPT)
    with browser_page(chromium) as ada, browser_page(chromium) as bob:
        join(ada, server.url, "browsers", "ada")
        join(bob, server.url, "browsers", "bob")
        ada.wait_until("document.getElementById('online').textContent === 'ada, bob'")
        assert bob.evaluate("document.getElementById('online').textContent") == "ada, bob"

        say(ada, "hello from ada <script>")          # shown as text, never as markup
        bob.wait_until(shows(bob, "adahello from ada <script>"))
        say(bob, "hi ada, bob here")
        ada.wait_until(shows(ada, "bobhi ada, bob here"))
        assert ada.evaluate(shows(ada, "adahello from ada <script>")), "the sender sees its own"
        ada.screenshot(tmp_path / "chat-ada.png")
        for page in (ada, bob):
            assert page.console_errors() == [], page.console_errors()
