"""level05/notification_queue.py, black-box: events fanned out to inbox, live stream, signed
webhooks and email; duplicate ids delivered once (also posted at once); preferences and their
validation; SSRF refused when a webhook is set and again at delivery; retries, timeouts and dead
letters; per-user webhook order; every attempt listed; restarts, kill -9 and SIGTERM.

The webhook subscriber is a small `http.server` in the test that verifies `X-Signature-256`
the way a subscriber would (HMAC-SHA256 of the raw body, `hmac.compare_digest`). Servers that
call it run with `--allow-private-webhooks` (it is on loopback); backoffs and timeouts are
short by flag, so the module runs in well under a minute.
"""
import concurrent.futures
import hashlib
import hmac
import http.server
import json
import re
import threading
import time

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem

SCRIPT = "level05/notification_queue.py"
TIMEOUT = 10
SECRET = "whsec-test-0123456789"
FAST = ["--backoff-s", "0.05", "--backoff-max-s", "0.2", "--poll-s", "0.02"]
EVENT_KEYS = {"id", "type", "user_id", "data", "created_at"}


# --------------------------------------------------------------------------------------------
# A webhook subscriber


class Subscriber:
    """A webhook receiver on 127.0.0.1. `answer(event_id, nth)` says what the nth request for
    an event (1-based) gets: a status, or ("hold", event) to answer 200 only once the event is
    set. Every request is recorded as (event id, verified, body, status answered)."""

    def __init__(self, answer=lambda event_id, nth: 200, secret=SECRET):
        self.answer, self.secret = answer, secret
        self.requests = []
        self.arrivals = {}
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        subscriber = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                subscriber.receive(self, raw)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verify(self, raw, header):
        """What a subscriber does before trusting a delivery: recompute the HMAC over the bytes
        received and compare in constant time."""
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        return header is not None and hmac.compare_digest(expected, header)

    def receive(self, handler, raw):
        body = json.loads(raw)
        verified = self.verify(raw, handler.headers.get("X-Signature-256"))
        with self.lock:   # counted as they arrive: a slow answer must not hide a later request
            nth = self.arrivals[body["id"]] = self.arrivals.get(body["id"], 0) + 1
        status = self.answer(body["id"], nth) if verified else 401
        if isinstance(status, tuple):          # ("hold", event): answer once the test says so
            status[1].wait(TIMEOUT)
            status = 200
        if status == "slow":
            time.sleep(1.0)
            status = 200
        with self.arrived:
            self.requests.append({"id": body["id"], "verified": verified, "body": body,
                                  "status": status})
            self.arrived.notify_all()
        try:
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        except OSError:   # the caller gave up (a timeout): nothing to answer
            pass

    def delivered(self):
        """Event ids answered 2xx, in the order they were answered."""
        with self.lock:
            return [r["id"] for r in self.requests if 200 <= r["status"] < 300]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def subscriber():
    made = []

    def make(answer=lambda event_id, nth: 200):
        made.append(Subscriber(answer))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# --------------------------------------------------------------------------------------------
# Helpers


def post_event(server, user, event_id=None, event_type="order.shipped", data=None, status=202):
    body = {"type": event_type, "user_id": user, "data": data or {"order": 1}}
    if event_id is not None:
        body["id"] = event_id
    resp = requests.post(f"{server.url}/events", json=body, timeout=TIMEOUT)
    event = expect_json(resp, status)
    assert resp.headers["Location"] == f"/events/{event['id']}"
    return event


def set_preferences(server, user, preferences, status=200):
    resp = requests.put(f"{server.url}/users/{user}/preferences", json=preferences,
                        timeout=TIMEOUT)
    return expect_json(resp, status) if status == 200 else expect_problem(resp, status)


def webhook_only(url, secret=SECRET):
    return {"channels": {"webhook": {"url": url, "secret": secret}}}


def inbox(server, user, **query):
    resp = requests.get(f"{server.url}/users/{user}/notifications", params=query, timeout=TIMEOUT)
    return expect_json(resp, 200)


def attempts(server, event_id):
    resp = requests.get(f"{server.url}/events/{event_id}/deliveries", params={"limit": 100},
                        timeout=TIMEOUT)
    return expect_json(resp, 200)["items"]


def wait_until(check, what, timeout=10.0):
    """Poll `check()` until it returns something true; return it."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)
    return result


def finished(server, event_id, channel, count=1):
    """The event's attempts once `count` of the channel's are final (succeeded or dead)."""
    def check():
        rows = attempts(server, event_id)
        final = [a for a in rows if a["channel"] == channel and a["status"] != "failed"]
        return rows if len(final) >= count else None
    return wait_until(check, f"{channel} delivery of {event_id} finished")


def sse_events(lines, count):
    """Read `count` events (dicts of their fields) from an iterator of SSE lines."""
    events, fields = [], {}
    for line in lines:
        line = line.decode() if isinstance(line, bytes) else line
        if line == "":
            if "data" in fields:
                events.append(fields)
                if len(events) == count:
                    return events
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    raise AssertionError(f"the stream ended after {len(events)} of {count} events")


# --------------------------------------------------------------------------------------------
# Events, inbox, preferences


def test_event_reaches_the_default_channels_and_the_inbox_is_a_list(start_server):
    server = start_server(SCRIPT, *FAST)
    defaults = expect_json(requests.get(f"{server.url}/users/ann/preferences", timeout=TIMEOUT),
                           200)
    assert defaults == {"channels": {"inbox": True, "live": True, "webhook": None, "email": None},
                        "muted_types": []}
    events = [post_event(server, "ann", data={"n": n}) for n in range(3)]
    assert set(events[0]) == EVENT_KEYS and events[0]["id"].startswith("evt_")
    post_event(server, "bob")
    items = wait_until(lambda: len(inbox(server, "ann")["items"]) == 3 and inbox(server, "ann"),
                       "three notifications")["items"]
    assert [item["event"] for item in items] == events[::-1]          # newest first
    assert all(item["read_at"] is None for item in items)

    first = inbox(server, "ann", limit=2)
    second = inbox(server, "ann", limit=2, cursor=first["next_cursor"])
    assert [i["id"] for i in first["items"] + second["items"]] == [i["id"] for i in items]
    assert second["next_cursor"] is None
    expect_problem(requests.get(f"{server.url}/users/ann/notifications",
                                params={"cursor": "nonsense"}, timeout=TIMEOUT), 400)
    expect_problem(requests.get(f"{server.url}/users/ann/notifications",
                                params={"unread": "yes"}, timeout=TIMEOUT), 400)

    oldest = items[-1]["id"]
    read = expect_json(requests.post(f"{server.url}/users/ann/notifications/{oldest}/read",
                                     timeout=TIMEOUT), 200)
    assert read["read_at"] is not None
    again = expect_json(requests.post(f"{server.url}/users/ann/notifications/{oldest}/read",
                                      timeout=TIMEOUT), 200)
    assert again["read_at"] == read["read_at"]
    assert [i["id"] for i in inbox(server, "ann", unread="true")["items"]] == \
        [i["id"] for i in items[:2]]
    expect_problem(requests.post(f"{server.url}/users/bob/notifications/{oldest}/read",
                                 timeout=TIMEOUT), 404)   # ann's notification, not bob's
    marked = expect_json(requests.post(f"{server.url}/users/ann/notifications/read-all",
                                       timeout=TIMEOUT), 200)
    assert marked == {"marked": 2}
    assert inbox(server, "ann", unread="true")["items"] == []
    assert len(inbox(server, "bob", unread="true")["items"]) == 1

    rows = finished(server, events[0]["id"], "live")
    assert sorted((a["channel"], a["attempt"], a["status"]) for a in rows) == \
        [("inbox", 1, "succeeded"), ("live", 1, "succeeded")]
    assert all(a["http_status"] is None and a["error"] is None and a["at"] for a in rows)
    expect_problem(requests.get(f"{server.url}/events/nope/deliveries", timeout=TIMEOUT), 404)
    assert expect_json(requests.get(f"{server.url}/events/{events[0]['id']}", timeout=TIMEOUT),
                       200) == events[0]


def test_a_repeated_event_id_is_accepted_and_delivered_once(start_server, subscriber):
    receiver = subscriber()
    server = start_server(SCRIPT, *FAST, "--allow-private-webhooks")
    set_preferences(server, "ann", {"channels": {"inbox": True, "webhook": {
        "url": receiver.url, "secret": SECRET}}})
    first = post_event(server, "ann", "order-1")
    assert post_event(server, "ann", "order-1", data={"changed": True}, status=200) == first

    def post(_):
        return requests.post(f"{server.url}/events", timeout=TIMEOUT, json={
            "id": "order-2", "type": "order.paid", "user_id": "ann", "data": {}})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = sorted(resp.status_code for resp in pool.map(post, range(24)))
    assert statuses == [200] * 23 + [202]

    for event_id in ("order-1", "order-2"):
        rows = finished(server, event_id, "webhook")
        assert sorted(a["channel"] for a in rows) == ["inbox", "webhook"]
    wait_until(lambda: len(receiver.delivered()) == 2, "both webhooks")
    time.sleep(0.3)   # room for a duplicate to show up, were one queued
    assert sorted(receiver.delivered()) == ["order-1", "order-2"]
    assert len(inbox(server, "ann")["items"]) == 2


def test_preferences_are_validated_and_replaced(start_server):
    server = start_server(SCRIPT, *FAST)
    problem = set_preferences(server, "ann", {
        "channels": {"inbox": "yes", "webhook": {"url": "ftp://example.com/", "secret": "short"},
                     "sms": True},
        "muted_types": "order.paid", "owner": "bob"}, status=422)
    assert {e["field"] for e in problem["errors"]} == {
        "channels.inbox", "channels.webhook.url", "channels.webhook.secret", "channels.sms",
        "muted_types", "owner"}
    problem = set_preferences(server, "ann", {"muted_types": []}, status=422)
    assert [e["field"] for e in problem["errors"]] == ["channels"]
    problem = set_preferences(server, "ann", {"channels": {"email": "ann@example.com"}},
                              status=422)   # no --smtp: nothing would send it
    assert [e["field"] for e in problem["errors"]] == ["channels.email"]
    expect_problem(requests.put(f"{server.url}/users/ann/preferences", data="[1",
                                headers={"Content-Type": "application/json"},
                                timeout=TIMEOUT), 400)
    expect_problem(requests.get(f"{server.url}/users/a%20b/preferences", timeout=TIMEOUT), 400)

    # PUT replaces: a channel left out is off; a muted type reaches no channel.
    chosen = set_preferences(server, "ann", {"channels": {"inbox": True},
                                             "muted_types": ["order.paid"]})
    assert chosen == {"channels": {"inbox": True, "live": False, "webhook": None, "email": None},
                      "muted_types": ["order.paid"]}
    assert expect_json(requests.get(f"{server.url}/users/ann/preferences", timeout=TIMEOUT),
                       200) == chosen
    muted = post_event(server, "ann", event_type="order.paid")
    shipped = post_event(server, "ann", event_type="order.shipped")
    rows = finished(server, shipped["id"], "inbox")
    assert [a["channel"] for a in rows] == ["inbox"]
    assert attempts(server, muted["id"]) == []
    assert [i["event"]["id"] for i in inbox(server, "ann")["items"]] == [shipped["id"]]


# --------------------------------------------------------------------------------------------
# SSRF


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook", "http://10.0.0.1/hook", "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/hook"])
def test_a_webhook_to_a_private_address_is_refused(start_server_module, url):
    server = start_server_module(SCRIPT)
    problem = set_preferences(server, "ann", webhook_only(url), status=422)
    assert [e["field"] for e in problem["errors"]] == ["channels.webhook.url"]
    assert "--allow-private-webhooks" in problem["errors"][0]["message"]


def test_the_address_is_checked_again_at_delivery(start_server, subscriber, tmp_path):
    receiver = subscriber()
    db = tmp_path / "nq.sqlite3"
    flags = [*FAST, "--max-attempts", "2"]     # (fixed when a delivery is queued)
    server = start_server(SCRIPT, *flags, "--allow-private-webhooks", "--workers", "0", db=db)
    set_preferences(server, "ann", webhook_only(receiver.url))
    event = post_event(server, "ann")         # queued while the address was allowed …
    server.stop()
    server = start_server(SCRIPT, *flags, db=db)   # … sent without
    rows = finished(server, event["id"], "webhook")
    assert [(a["attempt"], a["status"]) for a in rows] == [(1, "failed"), (2, "dead")]
    assert "loopback" in rows[-1]["error"] and rows[-1]["http_status"] is None
    assert receiver.requests == []


# --------------------------------------------------------------------------------------------
# Webhooks


def test_a_webhook_is_signed_retried_after_errors_and_timeouts(start_server, subscriber):
    answers = {1: "slow", 2: 503, 3: 200}     # no answer in time, then an error, then OK
    receiver = subscriber(lambda event_id, nth: answers[nth])
    server = start_server(SCRIPT, *FAST, "--allow-private-webhooks", "--webhook-timeout-s",
                          "0.3")
    set_preferences(server, "ann", webhook_only(receiver.url))
    event = post_event(server, "ann", "e-1", data={"amount": "12.50", "note": "café"})
    rows = finished(server, "e-1", "webhook")
    assert [(a["attempt"], a["status"], a["http_status"]) for a in rows] == \
        [(1, "failed", None), (2, "failed", 503), (3, "succeeded", None)]
    assert "no answer within 0.3 s" in rows[0]["error"]
    assert "503" in rows[1]["error"] and rows[2]["error"] is None
    wait_until(lambda: len(receiver.requests) == 3, "the slow first request recorded")
    assert all(r["verified"] for r in receiver.requests)
    assert receiver.requests[-1]["body"] == event and set(event) == EVENT_KEYS


def test_a_webhook_that_keeps_failing_is_dead_and_wrong_signatures_do_not_verify(
        start_server, subscriber):
    receiver = subscriber(lambda event_id, nth: 500)
    server = start_server(SCRIPT, *FAST, "--allow-private-webhooks", "--max-attempts", "3")
    set_preferences(server, "ann", webhook_only(receiver.url, secret="not-the-subscribers-one"))
    post_event(server, "ann", "e-1")
    rows = finished(server, "e-1", "webhook")
    # signed with another secret: the subscriber refuses it (401) like any failure
    assert [(a["attempt"], a["status"], a["http_status"]) for a in rows] == \
        [(1, "failed", 401), (2, "failed", 401), (3, "dead", 401)]
    assert [r["verified"] for r in receiver.requests] == [False] * 3

    set_preferences(server, "bob", webhook_only(receiver.url))
    post_event(server, "bob", "e-2")
    rows = finished(server, "e-2", "webhook")
    assert [(a["attempt"], a["status"], a["http_status"]) for a in rows] == \
        [(1, "failed", 500), (2, "failed", 500), (3, "dead", 500)]
    assert all(r["verified"] for r in receiver.requests[3:])
    first = expect_json(requests.get(f"{server.url}/events/e-2/deliveries",
                                     params={"limit": 2}, timeout=TIMEOUT), 200)
    rest = expect_json(requests.get(f"{server.url}/events/e-2/deliveries", timeout=TIMEOUT,
                                    params={"limit": 2, "cursor": first["next_cursor"]}), 200)
    assert [a["attempt"] for a in first["items"] + rest["items"]] == [1, 2, 3]
    assert rest["next_cursor"] is None


def test_a_failing_webhook_holds_back_that_users_later_ones_only(start_server, subscriber):
    healed = threading.Event()
    receiver = subscriber(lambda event_id, nth: 200 if event_id != "a-1" or healed.is_set()
                          else 500)
    server = start_server(SCRIPT, *FAST, "--allow-private-webhooks", "--max-attempts", "25")
    for user in ("ann", "bob"):
        set_preferences(server, user, {"channels": {"inbox": True, "webhook": {
            "url": receiver.url, "secret": SECRET}}})
    for event_id in ("a-1", "a-2", "a-3"):
        post_event(server, "ann", event_id)
    post_event(server, "bob", "b-1")
    # While a-1 fails: bob's webhook and ann's inbox go on; a-2 and a-3 wait.
    wait_until(lambda: "b-1" in receiver.delivered(), "bob's webhook")
    wait_until(lambda: len(inbox(server, "ann")["items"]) == 3, "ann's inbox")
    wait_until(lambda: sum(r["id"] == "a-1" for r in receiver.requests) >= 3, "a-1 retried")
    assert [r["id"] for r in receiver.requests if r["id"] != "b-1"] == \
        ["a-1"] * len([r for r in receiver.requests if r["id"] == "a-1"])
    healed.set()
    wait_until(lambda: "a-3" in receiver.delivered(), "ann's last webhook")
    assert [i for i in receiver.delivered() if i.startswith("a-")] == ["a-1", "a-2", "a-3"]
    first_a2 = next(n for n, r in enumerate(receiver.requests) if r["id"] == "a-2")
    assert all(r["id"] != "a-1" for r in receiver.requests[first_a2:])


def test_after_a_dead_webhook_the_next_one_goes(start_server, subscriber):
    receiver = subscriber(lambda event_id, nth: 500 if event_id == "a-1" else 200)
    server = start_server(SCRIPT, *FAST, "--allow-private-webhooks", "--max-attempts", "2")
    set_preferences(server, "ann", webhook_only(receiver.url))
    post_event(server, "ann", "a-1")
    post_event(server, "ann", "a-2")
    rows = finished(server, "a-2", "webhook")
    assert rows[-1]["status"] == "succeeded"
    assert [a["status"] for a in attempts(server, "a-1")] == ["failed", "dead"]
    assert [r["id"] for r in receiver.requests] == ["a-1", "a-1", "a-2"]


# --------------------------------------------------------------------------------------------
# The live stream


def test_the_live_stream_sends_events_and_resumes_after_last_event_id(start_server):
    server = start_server(SCRIPT, *FAST)
    url = f"{server.url}/users/ann/stream"
    with requests.get(url, stream=True, timeout=TIMEOUT) as resp:
        expect(resp, 200, content_type="text/event-stream")
        lines = resp.iter_lines(chunk_size=1, decode_unicode=False)
        sent = [post_event(server, "ann", f"live-{n}") for n in range(2)]
        post_event(server, "bob", "not-for-ann")
        received = sse_events(lines, 2)
    assert [json.loads(e["data"]) for e in received] == sent     # data = the webhook body
    assert all(re.fullmatch(r"[0-9]+", e["id"]) for e in received)

    later = post_event(server, "ann", "live-2")
    with requests.get(url, stream=True, timeout=TIMEOUT,
                      headers={"Last-Event-ID": received[0]["id"]}) as resp:
        resumed = sse_events(resp.iter_lines(chunk_size=1), 2)
    assert [json.loads(e["data"]) for e in resumed] == [sent[1], later]
    expect_problem(requests.get(url, headers={"Last-Event-ID": "x1"}, timeout=TIMEOUT), 400)

    # SIGTERM with a stream open: the stream ends, the server exits 0 (the fixture checks).
    resp = requests.get(url, stream=True, timeout=TIMEOUT)
    next(resp.iter_lines(chunk_size=1))
    server.stop()
    resp.close()


# --------------------------------------------------------------------------------------------
# Restarts and crashes


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_queued_deliveries_are_sent_after_a_restart(start_server, tmp_path, stop):
    db = tmp_path / "nq.sqlite3"
    server = start_server(SCRIPT, *FAST, "--workers", "0", db=db)   # the API only: nothing sent
    events = [post_event(server, "ann", f"e-{n}") for n in range(5)]
    assert inbox(server, "ann")["items"] == []
    server.kill9() if stop == "kill9" else server.stop()
    server = start_server(SCRIPT, *FAST, db=db)
    items = wait_until(lambda: len(inbox(server, "ann")["items"]) == 5 and inbox(server, "ann"),
                       "the inbox after the restart")["items"]
    assert [i["event"]["id"] for i in items] == [e["id"] for e in events[::-1]]


def test_kill9_in_the_middle_of_a_webhook_delivers_it_again(start_server, subscriber, tmp_path):
    release = threading.Event()
    receiver = subscriber(lambda event_id, nth: ("hold", release) if nth == 1 else 200)
    db = tmp_path / "nq.sqlite3"
    flags = [*FAST, "--allow-private-webhooks", "--lease-s", "0.5"]
    server = start_server(SCRIPT, *flags, db=db)
    set_preferences(server, "ann", webhook_only(receiver.url))
    post_event(server, "ann", "e-1")
    wait_until(lambda: receiver.arrivals.get("e-1"), "attempt 1 at the subscriber")
    server.kill9()                          # the subscriber is still holding the request
    release.set()
    server = start_server(SCRIPT, *flags, db=db)
    rows = finished(server, "e-1", "webhook")
    assert rows[-1]["status"] == "succeeded"
    assert receiver.delivered().count("e-1") >= 2         # at-least-once: the repeat is the cost


# --------------------------------------------------------------------------------------------
# Email, through email_queue and an SMTP server (level04's mail catcher)


def test_the_email_channel_sends_through_smtp(start_server):
    catcher = start_server("level04/email_notifications.py", "--catcher-port", "0")
    match = wait_until(lambda: re.search(r"listening on smtp://([0-9.]+):([0-9]+)",
                                         catcher.stdout_text()), "the catcher's smtp line")
    server = start_server(SCRIPT, *FAST, "--smtp", f"{match[1]}:{match[2]}")
    set_preferences(server, "ann", {"channels": {"email": "ann@example.com"}})
    post_event(server, "ann", "mail-1", data={"order": 42})
    rows = finished(server, "mail-1", "email")
    assert [(a["attempt"], a["status"]) for a in rows] == [(1, "succeeded")]
    mailbox = wait_until(lambda: expect_json(requests.get(f"{catcher.url}/mailbox",
                                                          timeout=TIMEOUT), 200)["items"],
                         "the mail in the catcher")
    assert len(mailbox) == 1 and "mail-1" in json.dumps(mailbox[0])

    # email_queue's verdicts: a 4xx is retried, a 5xx is dead at once.
    for event_id, code, expected in (("mail-2", 451, [(1, "failed"), (2, "succeeded")]),
                                     ("mail-3", 550, [(1, "dead")])):
        expect_json(requests.post(f"{catcher.url}/mailbox/faults",
                                  json={"fail_next": 1, "code": code}, timeout=TIMEOUT), 200)
        post_event(server, "ann", event_id)
        rows = finished(server, event_id, "email")
        assert [(a["attempt"], a["status"]) for a in rows] == expected
        assert str(code) in rows[0]["error"]
