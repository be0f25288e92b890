"""What the tests of auth_service, user_service and microservices.py share: the pair of services
started side by side, a stand-in consumer of the outbox, accounts, and polling for what happens
eventually (an event delivered by a relay thread has no readiness signal of its own to wait on).
"""
import http.server
import json
import socket
import threading
import time

import requests

from tests.harness import expect_json
from tests.level03.accounts import LOW_COST, PASSWORD, TIMEOUT, fresh_email

AUTH = "level06/auth_service.py"
USERS = "level06/user_service.py"
SERVICE_TOKEN = "test-service-token-0123456789abcdef"
FAST_RETRIES = ("--retry-s", "0.05", "--retry-max-s", "0.3")   # the outbox catches up quickly
EVENTUALLY_S = 20   # generous: the machine is shared


def free_port():
    """A port nothing listens on now (for a service that must be named before it starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_url():
    return f"http://127.0.0.1:{free_port()}"


def eventually(check, what, timeout=EVENTUALLY_S):
    """Call `check` until it returns something truthy; that value. Fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def signup(auth, email, password=PASSWORD):
    resp = requests.post(f"{auth.url}/auth/signup", json={"email": email, "password": password},
                         timeout=TIMEOUT)
    return expect_json(resp, 201)


def login(auth, email, password=PASSWORD):
    resp = requests.post(f"{auth.url}/auth/login", json={"email": email, "password": password},
                         timeout=TIMEOUT)
    return expect_json(resp, 200)


def account(auth, prefix="u"):
    """A new account: (user, access token)."""
    email = fresh_email(prefix)
    user = signup(auth, email)
    return user, login(auth, email)["access_token"]


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def start_auth(start_server, *args, user_url=None, **kw):
    return start_server(AUTH, "--service-token", SERVICE_TOKEN, *LOW_COST, *FAST_RETRIES,
                        "--user-service-url", user_url or closed_url(), *args, **kw)


def start_users(start_server, auth_url, *args, **kw):
    return start_server(USERS, "--service-token", SERVICE_TOKEN, "--auth-service-url", auth_url,
                        *args, **kw)


def start_pair(start_server, auth_args=(), user_args=()):
    """auth_service told to deliver to a port user_service then listens on: (auth, users)."""
    port = free_port()
    auth = start_auth(start_server, *auth_args, user_url=f"http://127.0.0.1:{port}")
    users = start_users(start_server, auth.url, "--port", port, *user_args)
    return auth, users


def introspections(auth):
    """How many introspection requests auth_service has answered (its access log)."""
    return len([line for line in auth.stderr_text().splitlines()
                if " POST /internal/introspect " in line])


class EventSink:
    """A stand-in for user_service's `POST /internal/events`, in the test process: it records
    every request, and answers with the statuses of `answers` in turn, then 204; `hang` holds
    each request without answering."""

    def __init__(self, answers=(), hang=False):
        self.received = []
        self.answers = list(answers)
        self.lock = threading.Lock()
        self.release = threading.Event()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    sink.received.append((self.path, dict(self.headers), json.loads(body)))
                    status = sink.answers.pop(0) if sink.answers else 204
                if hang:
                    sink.release.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self):
        with self.lock:
            return [body for _, _, body in self.received]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
