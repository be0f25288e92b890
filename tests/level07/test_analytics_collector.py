"""level07/analytics_collector.py, black-box: Segment's HTTP Tracking API (every /v1 call, the
write key as Basic username, 32 KB / 500 KB limits, messageId de-duplication, sentAt clock-skew
correction), the group commit (answers after the commit, 503 + Retry-After when the queue is
full, acknowledged events surviving a kill -9 mid-stream, each once, what is queued committed
at shutdown), the queries behind the read key, and Segment's own Python SDK sending to it
unchanged.
"""
import concurrent.futures
import datetime
import re
import sqlite3
import threading
import time
import uuid

import pytest
import requests

from tests.harness import expect_json, expect_problem

SCRIPT = "level07/analytics_collector.py"
WRITE_KEY = "write-key-0123456789"
OTHER_WRITE_KEY = "write-key-second-one"
READ_KEY = "read-key-0123456789"
KEYS = ("--write-key", WRITE_KEY, "--write-key", OTHER_WRITE_KEY, "--read-key", READ_KEY)
TIMEOUT = 10


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *KEYS)


def send(server, kind, body, key=WRITE_KEY, timeout=TIMEOUT):
    auth = (key, "") if key is not None else None
    return requests.post(f"{server.url}/v1/{kind}", json=body, auth=auth, timeout=timeout)


def stats(server, what, key=READ_KEY, **params):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(f"{server.url}/stats/{what}", params=params, headers=headers,
                        timeout=TIMEOUT)


def count(server, event, **params):
    """How many `event` track events are stored (all time unless from/to are given)."""
    buckets = expect_json(stats(server, "events", event=event, interval="day", **params),
                          200)["buckets"]
    return sum(bucket["count"] for bucket in buckets)


def new_name():
    return f"evt-{uuid.uuid4().hex[:10]}"


def track(event, user="u1", **extra):
    return {"type": "track", "event": event, "userId": user, **extra}


# --------------------------------------------------------------------------------------------
# The Tracking API


def test_a_track_call_is_stored_and_answered_as_segment_does(server):
    event = new_name()
    answer = expect_json(send(server, "track", {"userId": "u1", "event": event,
                                                "properties": {"plan": "pro"},
                                                "context": {"ip": "1.2.3.4"},
                                                "integrations": {"All": True},
                                                "writeKey": "ignored"}), 200)
    assert answer == {"success": True}
    assert count(server, event) == 1


@pytest.mark.parametrize("kind, body", [
    ("identify", {"userId": "u1", "traits": {"email": "a@example.com"}}),
    ("page", {"anonymousId": "anon-1", "name": "Home"}),
    ("screen", {"userId": "u1", "name": "Settings"}),
    ("group", {"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}}),
    ("alias", {"userId": "u1", "previousId": "anon-1"}),
])
def test_every_call_type_is_taken(server, kind, body):
    assert expect_json(send(server, kind, body), 200) == {"success": True}


@pytest.mark.parametrize("kind, body, field", [
    ("track", {"event": "x"}, "userId"),
    ("track", {"userId": "u1"}, "event"),
    ("group", {"userId": "u1"}, "groupId"),
    ("alias", {"userId": "u1"}, "previousId"),
    ("identify", {"userId": "u1", "timestamp": "yesterday"}, "timestamp"),
    ("identify", {"userId": "u1", "messageId": 7}, "messageId"),
])
def test_an_invalid_event_is_a_400_naming_it(server, kind, body, field):
    problem = expect_problem(send(server, kind, body), 400)
    assert field in [error["field"] for error in problem["errors"]]


def test_a_batch_takes_every_type_at_once(server):
    event = new_name()
    batch = [track(event), {"type": "identify", "anonymousId": "a9"},
             {"type": "page", "userId": "u1"}, {"type": "screen", "userId": "u1"},
             {"type": "group", "userId": "u1", "groupId": "g"},
             {"type": "alias", "userId": "u1", "previousId": "a9"}, track(event)]
    assert expect_json(send(server, "batch", {"batch": batch}), 200) == {"success": True}
    assert count(server, event) == 2


def test_one_bad_event_refuses_the_whole_batch_naming_it(server):
    event = new_name()
    problem = expect_problem(send(server, "batch", {"batch": [
        track(event), {"type": "track", "event": event},
        {"type": "purchase", "userId": "u1"}]}), 400)
    assert {e["field"] for e in problem["errors"]} == {"batch[1].userId", "batch[2].type"}
    assert count(server, event) == 0


@pytest.mark.parametrize("body", [b"{not json", b'["a list"]', b'{"batch": {"not": "a list"}}'])
def test_a_malformed_batch_is_a_400(server, body):
    expect_problem(requests.post(f"{server.url}/v1/batch", data=body, auth=(WRITE_KEY, ""),
                                 headers={"Content-Type": "application/json"},
                                 timeout=TIMEOUT), 400)


# --------------------------------------------------------------------------------------------
# Write keys


def test_no_write_key_is_a_401_asking_for_basic(server):
    resp = send(server, "track", track(new_name()), key=None)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")


def test_a_wrong_write_key_is_a_401_and_nothing_is_stored(server):
    event = new_name()
    expect_problem(send(server, "track", track(event), key="not-the-write-key"), 401)
    expect_problem(send(server, "batch", {"batch": [track(event)]}, key=READ_KEY), 401)
    assert count(server, event) == 0


def test_every_write_key_given_works(server):
    event = new_name()
    expect_json(send(server, "track", track(event), key=OTHER_WRITE_KEY), 200)
    assert count(server, event) == 1


def test_keys_left_out_are_made_once_and_kept(start_server):
    first = start_server(SCRIPT)
    first.wait_for_stderr("--read-key not given")
    made = dict(re.findall(r"(--write-key|--read-key) not given: made one and kept it in the "
                           r"database: (\S+)", first.stderr_text()))
    event = new_name()
    expect_json(send(first, "track", track(event), key=made["--write-key"]), 200)
    first.stop()
    again = start_server(SCRIPT, db=first.db_path)
    assert "not given" not in again.stderr_text()
    expect_json(send(again, "track", track(event), key=made["--write-key"]), 200)
    assert count(again, event, key=made["--read-key"]) == 2


# --------------------------------------------------------------------------------------------
# Limits: 32 KB an event, 500 KB a batch


def test_an_event_over_32_kb_is_a_413(server):
    event = new_name()
    resp = send(server, "track", track(event, properties={"pad": "x" * 33_000}))
    expect_problem(resp, 413)
    assert count(server, event) == 0


def test_a_batched_event_over_32_kb_is_a_413_naming_it(server):
    event = new_name()
    problem = expect_problem(send(server, "batch", {"batch": [
        track(event), track(event, properties={"pad": "x" * 33_000})]}), 413)
    assert "batch[1]" in problem["detail"]
    assert count(server, event) == 0


def test_a_batch_may_reach_500_kb_but_not_pass_it(server):
    event = new_name()
    small = [track(event, properties={"pad": "x" * 1000}) for _ in range(400)]  # ~440 KB
    expect_json(send(server, "batch", {"batch": small}), 200)
    assert count(server, event) == 400
    expect_problem(send(server, "batch", {"batch": small + small[:100]}), 413)   # ~550 KB
    assert count(server, event) == 400


# --------------------------------------------------------------------------------------------
# messageId de-duplication


def test_a_retried_message_id_is_stored_once(server):
    event = new_name()
    message = track(event, messageId=str(uuid.uuid4()))
    for _ in range(3):
        expect_json(send(server, "track", message), 200)
    expect_json(send(server, "batch", {"batch": [message, message]}), 200)
    assert count(server, event) == 1


def test_concurrent_duplicates_are_stored_once(server):
    event = new_name()
    messages = [track(event, messageId=f"{event}-{n}") for n in range(5)]
    barrier = threading.Barrier(16)

    def deliver(_):
        barrier.wait()
        return send(server, "batch", {"batch": messages}).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(deliver, range(16))) == {200}
    assert count(server, event) == 5


# --------------------------------------------------------------------------------------------
# sentAt: clock-skew correction


def iso(moment):
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_device_clock_a_day_off_is_corrected_by_sent_at(server):
    """The device's clock is a day behind: it says the event happened an hour before it was
    sent. Stored: an hour before the server received it, today, not yesterday."""
    event = new_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    device_now = now - datetime.timedelta(days=1)
    body = track(event, timestamp=iso(device_now - datetime.timedelta(hours=1)),
                 sentAt=iso(device_now))
    expect_json(send(server, "track", body), 200)
    expected = now - datetime.timedelta(hours=1)
    window = {"from": iso(expected - datetime.timedelta(minutes=5)),
              "to": iso(expected + datetime.timedelta(minutes=5))}
    assert count(server, event, **window) == 1


def test_a_batch_level_sent_at_corrects_its_events(server):
    event = new_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    device_now = now + datetime.timedelta(days=3)    # a clock three days ahead
    expect_json(send(server, "batch", {"sentAt": iso(device_now), "batch": [
        track(event, timestamp=iso(device_now - datetime.timedelta(minutes=30)))]}), 200)
    expected = now - datetime.timedelta(minutes=30)
    assert count(server, event, **{"from": iso(expected - datetime.timedelta(minutes=5)),
                                   "to": iso(expected + datetime.timedelta(minutes=5))}) == 1


def test_without_sent_at_the_timestamp_is_taken_as_sent(server):
    event = new_name()
    expect_json(send(server, "track", track(event, timestamp="2026-03-01T09:30:00Z")), 200)
    buckets = expect_json(stats(server, "events", event=event, interval="minute"), 200)
    assert buckets["buckets"] == [{"start": "2026-03-01T09:30:00Z", "count": 1}]


# --------------------------------------------------------------------------------------------
# Group commit: answers after the commit, back-pressure, the trace, kill -9


def test_a_full_queue_answers_503_with_retry_after(start_server):
    server = start_server(SCRIPT, *KEYS, "--queue-size", "5")
    event = new_name()
    resp = send(server, "batch", {"batch": [track(event) for _ in range(6)]})
    expect_problem(resp, 503)
    assert int(resp.headers["Retry-After"]) >= 1
    expect_json(send(server, "batch", {"batch": [track(event) for _ in range(5)]}), 200)
    assert count(server, event) == 5


def test_the_trace_shows_requests_sharing_one_commit(start_server):
    server = start_server(SCRIPT, *KEYS, "--trace")
    event = new_name()
    shared = 0
    for _ in range(5):   # concurrent requests share commits; a commit per request never does
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(lambda n: send(server, "track", track(event)).status_code,
                                     range(96)))
        assert set(statuses) == {200}
        text = server.stderr_text()
        assert "events queued" in text
        shared = max(int(n) for n in re.findall(r"from (\d+) requests in one transaction", text))
        if shared > 1:
            break
    assert shared > 1, "every request had a commit of its own"


def test_no_answer_before_the_commit(start_server):
    """Another process holds the database's write lock, so nothing can commit: a server that
    answered before its commit would say 200 at once; this one cannot answer until the lock is
    let go (then the event is stored, though its client stopped waiting)."""
    server = start_server(SCRIPT, *KEYS)
    event = new_name()
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(requests.Timeout):
            send(server, "track", track(event, messageId=event), timeout=1.5)
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    expect_json(send(server, "track", track(event, messageId=event)), 200)   # the retry
    assert count(server, event) == 1


def test_at_shutdown_the_writer_commits_what_is_queued_before_the_database_closes(
        start_server):
    """An event still queued when SIGTERM's drain gives up (its commit held back by another
    process's write lock) is committed once the lock is let go, then the database closes. A
    server that closed the database first would lose it (and say so on stderr)."""
    server = start_server(SCRIPT, *KEYS, "--drain-timeout", "0.1")
    event = new_name()
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(requests.Timeout):
            send(server, "track", track(event), timeout=1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stopped = pool.submit(server.stop)   # SIGTERM, then exit status 0 expected
            # No line says the shutdown hooks have begun; too short a wait could only hide a bug.
            time.sleep(1)
            blocker.execute("ROLLBACK")
            stopped.result()
    finally:
        blocker.close()
    assert not server.stderr_lines("error:"), server.stderr_text()
    again = start_server(SCRIPT, *KEYS, db=server.db_path)
    assert count(again, event) == 1


def test_acknowledged_events_survive_a_kill_9_mid_stream_exactly_once(start_server):
    server = start_server(SCRIPT, *KEYS)
    acknowledged, sent = [], []
    enough = threading.Event()
    lock = threading.Lock()

    def client(number):
        session = requests.Session()
        session.auth = (WRITE_KEY, "")
        for batch in range(10_000):
            name = f"kill-{number}-{batch}"
            body = {"batch": [track(name, messageId=f"{name}-{n}") for n in range(100)]}
            with lock:
                sent.append(body)
            try:
                resp = session.post(f"{server.url}/v1/batch", json=body, timeout=TIMEOUT)
            except requests.ConnectionError:
                return
            if resp.status_code == 200:
                with lock:
                    acknowledged.append(name)
                    if len(acknowledged) >= 40:
                        enough.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(30), "the server acknowledged too few batches"
    server.kill9()   # while the four clients are still sending
    for thread in threads:
        thread.join(TIMEOUT)
    again = start_server(SCRIPT, *KEYS, db=server.db_path)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {READ_KEY}"
    for name in acknowledged:
        assert count(again, name) == 100, f"{name}: acknowledged, then lost"
    for body in sent:   # every client retries what it sent: nothing is stored twice
        expect_json(send(again, "batch", body), 200)
    top = expect_json(stats(again, "top", limit=100), 200)["items"]
    assert {item["count"] for item in top} == {100}
    for name in acknowledged[::5]:
        assert count(again, name) == 100


# --------------------------------------------------------------------------------------------
# Queries


def test_the_stats_need_the_read_key(server):
    resp = stats(server, "users", key=None)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    expect_problem(stats(server, "users", key="wrong-read-key"), 401)
    expect_problem(stats(server, "users", key=WRITE_KEY), 403)
    expect_problem(requests.get(f"{server.url}/stats/top", auth=(WRITE_KEY, ""),
                                timeout=TIMEOUT), 403)


def test_counts_per_minute_hour_and_day(server):
    event = new_name()
    times = ["2026-05-01T10:00:05Z", "2026-05-01T10:00:55Z", "2026-05-01T10:01:00Z",
             "2026-05-01T11:30:00Z", "2026-05-02T00:00:00Z"]
    expect_json(send(server, "batch", {"batch": [track(event, timestamp=t) for t in times]}), 200)

    def buckets(interval, **params):
        return [(b["start"], b["count"]) for b in expect_json(
            stats(server, "events", event=event, interval=interval, **params), 200)["buckets"]]

    assert buckets("minute") == [("2026-05-01T10:00:00Z", 2), ("2026-05-01T10:01:00Z", 1),
                                 ("2026-05-01T11:30:00Z", 1), ("2026-05-02T00:00:00Z", 1)]
    assert buckets("hour") == [("2026-05-01T10:00:00Z", 3), ("2026-05-01T11:00:00Z", 1),
                               ("2026-05-02T00:00:00Z", 1)]
    assert buckets("day") == [("2026-05-01T00:00:00Z", 4), ("2026-05-02T00:00:00Z", 1)]
    assert buckets("day", **{"from": "2026-05-01T10:01:00Z", "to": "2026-05-02T00:00:00Z"}) \
        == [("2026-05-01T00:00:00Z", 2)]


@pytest.mark.parametrize("params, name", [({"interval": "week"}, "interval"),
                                          ({"from": "last tuesday"}, "from"),
                                          ({"to": "2026-02-30T00:00:00Z"}, "to")])
def test_a_bad_stats_parameter_is_a_400_naming_it(server, params, name):
    problem = expect_problem(stats(server, "events", **params), 400)
    assert problem["errors"][0]["field"] == name


def test_top_events_most_first_and_unique_users(server):
    day = "2026-07-04"
    a, b, c = sorted(new_name() for _ in range(3))
    batch = [track(b, user=f"u{n}", timestamp=f"{day}T10:00:00Z") for n in range(3)]
    batch += [track(a, user="u1", timestamp=f"{day}T11:00:00Z")]
    batch += [track(c, user="u1", timestamp=f"{day}T12:00:00Z") for _ in range(2)]
    batch += [{"type": "page", "anonymousId": "anon-7", "timestamp": f"{day}T13:00:00Z"},
              {"type": "identify", "userId": "u0", "anonymousId": "anon-8",
               "timestamp": f"{day}T13:00:00Z"}]
    expect_json(send(server, "batch", {"batch": batch}), 200)
    window = {"from": f"{day}T00:00:00Z", "to": f"{day}T23:59:59Z"}
    top = expect_json(stats(server, "top", **window), 200)["items"]
    assert top == [{"event": b, "count": 3}, {"event": c, "count": 2}, {"event": a, "count": 1}]
    assert expect_json(stats(server, "top", limit=1, **window), 200)["items"] == top[:1]
    assert expect_json(stats(server, "users", **window), 200) == {"users": 4}  # u0-u2, anon-7


def test_a_funnel_counts_users_through_ordered_steps_within_the_window(server):
    visit, signup, pay = (new_name() for _ in range(3))
    base = datetime.datetime(2026, 8, 1, 9, tzinfo=datetime.timezone.utc)

    def at(hours, event, user):
        return track(event, user=user, timestamp=iso(base + datetime.timedelta(hours=hours)))

    batch = [at(0, visit, "ann"), at(1, signup, "ann"), at(2, pay, "ann"),      # all three
             at(0, visit, "bob"), at(3, signup, "bob"), at(50, pay, "bob"),     # pays too late
             at(0, visit, "cat"),                                               # only visits
             at(0, signup, "dan"), at(1, visit, "dan"),                         # out of order
             at(0, visit, "eve"), at(30, visit, "eve"), at(31, signup, "eve")]  # a later start
    expect_json(send(server, "batch", {"batch": batch}), 200)
    steps = f"{visit},{signup},{pay}"
    answer = expect_json(stats(server, "funnel", steps=steps, within="1d"), 200)
    assert answer == {"steps": [{"event": visit, "users": 5, "conversion": 1.0},
                                {"event": signup, "users": 3, "conversion": 0.6},
                                {"event": pay, "users": 1, "conversion": 0.2}]}
    wide = expect_json(stats(server, "funnel", steps=steps, within="3d"), 200)["steps"]
    assert [step["users"] for step in wide] == [5, 3, 2]
    narrow = expect_json(stats(server, "funnel", steps=steps, within="90m"), 200)["steps"]
    assert [step["users"] for step in narrow] == [5, 2, 0]
    later = expect_json(stats(server, "funnel", steps=steps, within="1d",
                              **{"from": iso(base + datetime.timedelta(hours=20))}), 200)
    assert [step["users"] for step in later["steps"]] == [1, 1, 0]


@pytest.mark.parametrize("params, name", [({"steps": "only-one"}, "steps"), ({}, "steps"),
                                          ({"steps": "a,b", "within": "2w"}, "within")])
def test_a_bad_funnel_is_a_400_naming_it(server, params, name):
    problem = expect_problem(stats(server, "funnel", **params), 400)
    assert problem["errors"][0]["field"] == name


# --------------------------------------------------------------------------------------------
# Segment's own SDK, unchanged


def test_segments_python_sdk_sends_here_unchanged(server):
    analytics = pytest.importorskip("segment.analytics")
    errors = []
    client = analytics.Client(WRITE_KEY, host=server.url, on_error=lambda e, b: errors.append(e),
                              max_retries=1)
    event = new_name()
    client.identify("sdk-user", {"email": "sdk@example.com"})
    for n in range(25):
        client.track("sdk-user", event, {"n": n})
    client.flush()
    client.shutdown()
    assert errors == []
    assert count(server, event) == 25

    refused = []
    wrong = analytics.Client("not-the-write-key", host=server.url, max_retries=0,
                             on_error=lambda e, b: refused.append(e))
    wrong.track("sdk-user", event)
    wrong.flush()
    wrong.shutdown()
    assert len(refused) == 1 and count(server, event) == 25
