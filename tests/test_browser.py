"""The level03 pages in a real browser: headless Chromium, driven over the DevTools protocol.

The other tests read the pages as HTML; only a browser says how they look and behave: which
CSS rule wins, whether the Content-Security-Policy lets the page's own style and script run,
what the console reports, whether cookies and the CSRF header work from a page. Skipped where
no Chromium is installed (Debian: `apt-get install chromium`).

No third-party package: Chromium is started with `--remote-debugging-port=0`, and `DevTools`
below is a minimal WebSocket client (RFC 6455: one handshake, masked text frames out, text
frames in) that sends protocol commands and keeps the events that arrive meanwhile. Each test
gets a fresh browser context: no cookie or cache carries over from another test.
"""
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.harness import expect
from tests.level03.accounts import LOW_COST, PASSWORD, fresh_email

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=800,900")
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
WAIT = 15   # s for one protocol answer or event


class DevTools:
    """One WebSocket connection to a DevTools target (the browser, or one page)."""

    def __init__(self, ws_url):
        parts = urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                          f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        self.stream = self.sock.makefile("rb")
        status = self.stream.readline()
        assert b" 101 " in status, f"no WebSocket upgrade: {status!r}"
        while self.stream.readline() not in (b"\r\n", b""):
            pass
        self.last_id = 0
        self.events = []

    def _send_frame(self, payload):
        mask = os.urandom(4)   # RFC 6455 §5.3: a client masks every frame
        size = len(payload)
        if size < 126:
            head = bytes([0x81, 0x80 | size])
        elif size < 1 << 16:
            head = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive(self):
        data = b""
        while True:   # a message may come in fragments: until the frame with FIN set
            first, second = self.stream.read(2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(self.stream.read(2 if size == 126 else 8), "big")
            data += self.stream.read(size)
            if first & 0x80:
                return json.loads(data)

    def call(self, method, **params):
        """Send one command and return its result; events that arrive first are kept."""
        self.last_id += 1
        self._send_frame(json.dumps({"id": self.last_id, "method": method,
                                     "params": params}).encode())
        while True:
            message = self._receive()
            if message.get("id") == self.last_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def wait_for_event(self, method):
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            message = self._receive()
            if message.get("method") == method:
                return message
            self.events.append(message)

    def close(self):
        self.stream.close()
        self.sock.close()


class Page:
    """A tab in a fresh browser context, recording what its console reports."""

    def __init__(self, tools):
        self.tools = tools
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable")

    def open(self, url):
        self.tools.call("Page.navigate", url=url)
        self.tools.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (a promise is awaited). DevTools
        runs it outside the page's Content-Security-Policy, which still governs the page."""
        result = self.tools.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                                 returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_until(self, condition):
        """Until the JavaScript `condition` is true in the page: its script has caught up."""
        return self.evaluate(f"new Promise((resolve) => {{ const check = () => ({condition}) "
                             f"? resolve(true) : setTimeout(check, 10); check(); }})")

    def console_errors(self):
        """Errors the console showed: failed loads (a 401 is one), CSP refusals, exceptions,
        console.error."""
        errors = []
        for event in self.tools.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                errors.append(repr(params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
        return errors

    def screenshot(self, path):
        """A PNG of the page, to look at by eye when a layout is in question."""
        data = self.tools.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One headless Chromium for the module: (its browser DevTools connection, host:port)."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    ws_url = None
    for line in process.stderr:
        match = LISTENING.search(line)
        if match:
            ws_url = match[1]
            break
    # Keep reading its stderr, or a chatty browser blocks on a full pipe.
    threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
    assert ws_url, "Chromium did not say where DevTools listens"
    browser = DevTools(ws_url)
    yield browser, urlsplit(ws_url).netloc
    browser.close()
    os.killpg(process.pid, signal.SIGTERM)   # its own session: the browser and its helpers
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def page(chromium):
    browser, address = chromium
    context = browser.call("Target.createBrowserContext")["browserContextId"]
    target = browser.call("Target.createTarget", url="about:blank",
                          browserContextId=context)["targetId"]
    tools = DevTools(f"ws://{address}/devtools/page/{target}")
    yield Page(tools)
    tools.close()
    browser.call("Target.disposeBrowserContext", browserContextId=context)


# --------------------------------------------------------------------------------------------
# session_auth's /app


def test_session_page_signed_out_logs_no_error_and_signs_up(start_server, page, tmp_path):
    server = start_server("level03/session_auth.py", *LOW_COST)
    page.open(server.url + "/app")
    page.wait_until("!document.getElementById('signed-out').hidden")
    assert page.console_errors() == [], "a signed-out visit is not an error"
    page.screenshot(tmp_path / "app-signed-out.png")

    # Sign up through the form, as a person would: the cookie and the CSRF token at work.
    email = fresh_email("browser")
    page.evaluate(f"document.querySelector('[name=email]').value = {json.dumps(email)}; "
                  f"document.querySelector('[name=password]').value = {json.dumps(PASSWORD)}; "
                  f"document.getElementById('signup').click()")
    page.wait_until("!document.getElementById('signed-in').hidden"
                    " && document.querySelectorAll('#sessions tr').length === 1")
    assert page.evaluate("document.getElementById('email').textContent") == email
    page.open(server.url + "/app")   # reloaded: the cookie brings the session back
    page.wait_until("!document.getElementById('signed-in').hidden")
    page.evaluate("document.getElementById('logout').click()")   # an unsafe request: CSRF header
    page.wait_until("!document.getElementById('signed-out').hidden")
    assert page.evaluate("document.getElementById('message').textContent") == "Logged out."
    assert page.console_errors() == []


# --------------------------------------------------------------------------------------------
# password_reset's pages


def displayed(page, selector):
    return page.evaluate(f"getComputedStyle(document.querySelector({json.dumps(selector)}))"
                         f".display") != "none"


def test_reset_pages_look_right_and_link_on(start_server, page, tmp_path):
    outbox = tmp_path / "outbox"
    server = start_server("level03/password_reset.py", "--outbox", outbox, *LOW_COST)
    email = fresh_email("reset")
    expect(requests.post(server.url + "/auth/signup", json={"email": email, "password": PASSWORD},
                         timeout=10), 201)
    expect(requests.post(server.url + "/auth/forgot", json={"email": email}, timeout=10), 202)
    deadline = time.monotonic() + 10
    while not (mails := list(outbox.glob("*.eml"))):
        assert time.monotonic() < deadline, "no reset mail"
        time.sleep(0.02)
    token = re.search(r"token=([\w-]+)", mails[0].read_text())[1]

    page.open(f"{server.url}/reset?token={token}")
    assert page.evaluate("document.querySelector('h1').textContent") == "Choose a new password"
    assert not displayed(page, "input[autocomplete=username]"), \
        "the username field for password managers is shown as an unlabelled text box"
    assert displayed(page, "#password") and displayed(page, "button")
    page.screenshot(tmp_path / "reset-form.png")

    for query in ("token=not-a-live-token", "token=%ff"):   # %ff: not UTF-8, still a page
        page.open(f"{server.url}/reset?{query}")
        assert page.evaluate("document.contentType") == "text/html", query
        assert page.evaluate("document.querySelector('h1').textContent") == \
            "This link does not work"
        assert page.evaluate("document.querySelector('a').textContent") == "Ask for a new link"
    page.screenshot(tmp_path / "reset-invalid.png")

    page.evaluate("document.querySelector('a').click()")   # on to the form that asks again
    page.tools.wait_for_event("Page.loadEventFired")
    page.evaluate(f"document.querySelector('[name=email]').value = {json.dumps(email)}; "
                  f"document.querySelector('form').submit()")
    page.tools.wait_for_event("Page.loadEventFired")
    assert page.evaluate("document.querySelector('h1').textContent") == "Check your mail"
    page.screenshot(tmp_path / "forgot-sent.png")
    deadline = time.monotonic() + 10
    while len(list(outbox.glob("*.eml"))) < 2:
        assert time.monotonic() < deadline, "the form did not ask for a second mail"
        time.sleep(0.02)
    # The pages answering 400 are expected; anything else (a style refused by the CSP) is not.
    assert [e for e in page.console_errors() if "status of 400" not in e] == []
