"""level06/central_logging.py, black-box: HTTP JSON and NDJSON ingestion with per-line errors,
syslog over UDP and TCP from the real clients (`SysLogHandler`, `logger`) and by the RFCs' own
examples, Loki's push format, queries, the live tail, counts, retention, back-pressure, and
records that survive a kill -9 once acknowledged.
"""
import concurrent.futures
import contextlib
import datetime
import json
import logging
import logging.handlers
import re
import shutil
import socket
import sqlite3
import subprocess
import time
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once

SCRIPT = "level06/central_logging.py"
TIMEOUT = 10
SYSLOG_LINE = re.compile(r"syslog on udp\+tcp://([0-9.]+):([0-9]+)")


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--syslog-port", "0")


def syslog_address(server, timeout=5.0):
    """The syslog port from the server's second stdout line."""
    deadline = time.monotonic() + timeout
    while not (match := SYSLOG_LINE.search(server.stdout_text())):
        assert time.monotonic() < deadline, f"no syslog line: {server.stdout_text()!r}"
        time.sleep(0.02)
    return match.group(1), int(match.group(2))


def new_service():
    return f"svc-{uuid.uuid4().hex[:10]}"


def record(service, message="hello", level="info", **extra):
    return {"ts": "2026-12-06T10:00:00Z", "service": service, "level": level,
            "message": message, **extra}


def post_ndjson(server, records, raw_lines=()):
    body = "\n".join([*map(json.dumps, records), *raw_lines]) + "\n"
    return requests.post(f"{server.url}/logs", data=body.encode(), timeout=TIMEOUT,
                         headers={"Content-Type": "application/x-ndjson"})


def logs(server, **params):
    return expect_json(requests.get(f"{server.url}/logs", params=params, timeout=TIMEOUT),
                       200)["items"]


def logs_of(server, service, count, timeout=5.0):
    """The service's records once there are `count` of them (syslog is stored a moment after
    it is sent)."""
    deadline = time.monotonic() + timeout
    while len(items := logs(server, service=service, limit=100)) < count:
        assert time.monotonic() < deadline, f"{service}: {len(items)} of {count} records"
        time.sleep(0.05)
    return items


# --------------------------------------------------------------------------------------------
# HTTP ingestion


def test_one_json_record_is_stored_and_read_back(server):
    service = new_service()
    sent = record(service, "disk almost full", "WARN", fields={"disk": "/", "pct": 91},
                  trace_id="abc123", ts="2026-12-06T11:00:00.250+01:00")
    answer = expect_json(requests.post(f"{server.url}/logs", json=sent, timeout=TIMEOUT), 200)
    assert answer == {"accepted": 1, "rejected": []}
    [item] = logs(server, service=service)
    assert {k: v for k, v in item.items() if k != "id"} == {
        "ts": "2026-12-06T10:00:00.250Z", "service": service, "level": "warning",
        "message": "disk almost full", "fields": {"disk": "/", "pct": 91}, "trace_id": "abc123"}


def test_a_lone_invalid_record_is_a_422_naming_its_fields(server):
    problem = expect_problem(requests.post(f"{server.url}/logs", timeout=TIMEOUT, json={
        "ts": "yesterday", "service": "", "level": "loud", "message": 5}), 422)
    assert {e["field"] for e in problem["errors"]} == {"ts", "service", "level", "message"}


def test_ndjson_keeps_the_good_lines_and_reports_each_bad_one(server):
    service = new_service()
    resp = post_ndjson(server, [record(service, "one"), {"service": service},
                                record(service, "three")], raw_lines=["not json", "", "[1, 2]"])
    answer = expect_json(resp, 200)
    assert answer["accepted"] == 2
    assert [r["line"] for r in answer["rejected"]] == [2, 4, 6]
    assert {e["field"] for e in answer["rejected"][0]["errors"]} == {"ts", "level", "message"}
    assert answer["rejected"][1]["errors"][0]["field"] == "line"
    assert [i["message"] for i in logs(server, service=service)] == ["three", "one"]


@pytest.mark.parametrize("given, stored", [
    ("debug", "debug"), ("INFO", "info"), ("Notice", "notice"), ("warn", "warning"),
    ("WARNING", "warning"), ("err", "error"), ("crit", "critical"), ("fatal", "critical"),
    ("alert", "alert"), ("emerg", "emergency"), ("EMERGENCY", "emergency")])
def test_levels_in_any_case_and_by_alias_are_stored_by_their_first_name(server, given, stored):
    service = new_service()
    expect_json(requests.post(f"{server.url}/logs", json=record(service, level=given),
                              timeout=TIMEOUT), 200)
    assert logs(server, service=service)[0]["level"] == stored


def test_a_level_filter_means_this_or_more_severe(server):
    service = new_service()
    post_ndjson(server, [record(service, level, level) for level in
                         ("debug", "info", "warning", "error", "emergency")])
    assert [i["message"] for i in logs(server, service=service, level="WARN")] == [
        "emergency", "error", "warning"]
    expect_problem(requests.get(f"{server.url}/logs", params={"level": "loud"},
                                timeout=TIMEOUT), 400)


def test_wrong_media_types_and_oversized_bodies_are_refused(server):
    expect_problem(requests.post(f"{server.url}/logs", data="x", timeout=TIMEOUT,
                                 headers={"Content-Type": "application/xml"}), 415)
    line = json.dumps(record("big", "x" * 60_000)) + "\n"
    resp = requests.post(f"{server.url}/logs", data=(line * 90).encode(), timeout=TIMEOUT,
                         headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 413


# --------------------------------------------------------------------------------------------
# Syslog


def sysloghandler(server, socktype):
    handler = logging.handlers.SysLogHandler(address=syslog_address(server), socktype=socktype)
    logger = logging.getLogger(f"test-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger, handler


@pytest.mark.parametrize("socktype", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_python_sysloghandler_ships_here_unchanged(server, socktype):
    service = new_service()
    logger, handler = sysloghandler(server, socktype)
    handler.setFormatter(logging.Formatter(f"{service}[42]: %(message)s"))
    try:
        logger.warning("low on tea")
        logger.error("out of tea")
    finally:
        handler.close()
    items = logs_of(server, service, 2)
    assert [(i["level"], i["message"]) for i in items] == [("error", "out of tea"),
                                                           ("warning", "low on tea")]


@pytest.mark.skipif(shutil.which("logger") is None, reason="logger (util-linux) is not installed")
@pytest.mark.parametrize("options", [["--udp"], ["--tcp"], ["--tcp", "--octet-count"],
                                     ["--udp", "--rfc3164"]])
def test_the_logger_command_ships_here_unchanged(server, options):
    host, port = syslog_address(server)
    service = new_service()
    done = subprocess.run(["logger", "-n", host, "-P", str(port), *options, "-t", service,
                           "-p", "local0.err", "--", "logged by logger"],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    [item] = logs_of(server, service, 1)
    assert (item["level"], item["message"]) == ("error", "logged by logger")


def send_tcp(server, *pieces):
    with socket.create_connection(syslog_address(server), timeout=5) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.01)


def test_rfc5424s_own_example_with_structured_data(server):
    """RFC 5424 §6.5's example 3 (the app name made unique here)."""
    service = new_service()
    message = (f'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com {service} - ID47 '
               f'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"] '
               f'An application event log entry...').encode()
    send_tcp(server, b"%d " % len(message) + message)
    [item] = logs_of(server, service, 1)
    assert item["ts"] == "2003-10-11T22:14:15.003Z" and item["level"] == "notice"
    assert item["message"] == "An application event log entry..."
    assert item["fields"] == {"host": "mymachine.example.com", "msgid": "ID47",
                              "exampleSDID@32473": {"iut": "3", "eventSource": "Application",
                                                    "eventID": "1011"}}


def test_rfc3164_with_its_timestamp_host_and_tag(server):
    service = new_service()
    send_tcp(server, f"<34>Oct 11 22:14:15 mymachine {service}[8]: 'su root' failed\n".encode())
    [item] = logs_of(server, service, 1)
    assert item["level"] == "critical" and item["message"] == "'su root' failed"
    assert item["fields"] == {"host": "mymachine"} and item["ts"].endswith("-10-11T22:14:15.000Z")


def test_tcp_framings_mixed_and_split_across_packets(server):
    service = new_service()
    counted = f"<14>{service}: counted".encode()
    send_tcp(server, f"<14>{service}: by LF\n<14>{service}: by ".encode(),
             f"NUL\x00{len(counted)} ".encode() + counted[:5], counted[5:])
    assert sorted(i["message"] for i in logs_of(server, service, 3)) == [
        "by LF", "by NUL", "counted"]


# --------------------------------------------------------------------------------------------
# Loki


def test_a_loki_push_is_answered_204_and_its_labels_mapped(server):
    service = new_service()
    nanoseconds = str(int(datetime.datetime(2026, 12, 6, 9, 30, tzinfo=datetime.timezone.utc)
                          .timestamp() * 1e9) + 123_000_000)
    push = {"streams": [{"stream": {"service": service, "level": "error", "env": "prod"},
                         "values": [[nanoseconds, "payment failed"],
                                    [nanoseconds, "with metadata", {"order": "42"}]]}]}
    resp = requests.post(f"{server.url}/loki/api/v1/push", json=push, timeout=TIMEOUT)
    assert resp.status_code == 204 and resp.content == b""
    items = logs(server, service=service)
    assert [(i["ts"], i["level"], i["message"], i["fields"]) for i in items] == [
        ("2026-12-06T09:30:00.123Z", "error", "with metadata", {"env": "prod", "order": "42"}),
        ("2026-12-06T09:30:00.123Z", "error", "payment failed", {"env": "prod"})]


@pytest.mark.parametrize("body, content_type, status", [
    ({"streams": "no"}, "application/json", 400),
    ({"streams": [{"stream": {"a": 1}, "values": []}]}, "application/json", 400),
    ({"streams": [{"stream": {}, "values": [["soon", "x"]]}]}, "application/json", 400),
    ({"streams": [{"stream": {}, "values": [["1", "x", None]]}]}, "application/json", 400),
    ({"streams": [{"stream": {}, "values": [["1", "x", {}, 4]]}]}, "application/json", 400),
    ({"streams": []}, "application/x-protobuf", 415)])
def test_a_bad_loki_push_is_a_4xx(server, body, content_type, status):
    resp = requests.post(f"{server.url}/loki/api/v1/push", data=json.dumps(body),
                         headers={"Content-Type": content_type}, timeout=TIMEOUT)
    expect_problem(resp, status)


# --------------------------------------------------------------------------------------------
# Reading


def test_filters_search_and_pages(server):
    service = new_service()
    post_ndjson(server, [
        record(service, "user signed in", ts="2026-12-06T10:00:00Z", trace_id="t-1"),
        record(service, "payment declined", "error", ts="2026-12-06T10:05:00Z", trace_id="t-2"),
        record(service, "payment accepted", ts="2026-12-06T10:10:00Z", trace_id="t-2")])
    assert [i["message"] for i in logs(server, service=service, q="payment")] == [
        "payment accepted", "payment declined"]
    assert [i["message"] for i in logs(server, service=service, q="payment -declined")] == [
        "payment accepted"]
    assert [i["message"] for i in logs(server, service=service, trace_id="t-2", level="error")] \
        == ["payment declined"]
    assert [i["message"] for i in logs(server, service=service, since="2026-12-06T10:05:00Z",
                                       until="2026-12-06T10:10:00Z")] == ["payment declined"]
    first = expect_json(requests.get(f"{server.url}/logs", params={"service": service, "limit": 2},
                                     timeout=TIMEOUT), 200)
    rest = logs(server, service=service, cursor=first["next_cursor"])
    assert [i["message"] for i in first["items"] + rest] == [
        "payment accepted", "payment declined", "user signed in"]
    for hostile in ('"', "a AND (", "NEAR(", "*", "message:x", "-"):
        expect(requests.get(f"{server.url}/logs", params={"q": hostile}, timeout=TIMEOUT), 200)
    expect_problem(requests.get(f"{server.url}/logs", params={"since": "today"},
                                timeout=TIMEOUT), 400)


def test_the_live_tail_streams_new_records_that_match(server):
    service = new_service()
    with requests.get(f"{server.url}/logs/stream", params={"service": service, "level": "error"},
                      stream=True, timeout=TIMEOUT) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        post_ndjson(server, [record(service, "quiet", "info"), record(service, "loud", "error"),
                             record("other-" + service, "elsewhere", "error")])
        events = []
        for line in stream.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                break
    assert [(e["service"], e["message"]) for e in events] == [(service, "loud")]


def tail_while_sending(server, clients=4, batches=30, size=200):
    """What a live tail of a new service receives while `clients` post to it at once, and
    what they sent."""
    service = new_service()
    sent = [f"{c}-{b}-{n}" for c in range(clients) for b in range(batches) for n in range(size)]

    def send(client):
        for batch in range(batches):
            expect_json(post_ndjson(server, [record(service, f"{client}-{batch}-{n}")
                                             for n in range(size)]), 200)

    received = []
    with requests.get(f"{server.url}/logs/stream", params={"service": service}, stream=True,
                      timeout=(TIMEOUT, 3)) as stream, \
            concurrent.futures.ThreadPoolExecutor(clients) as pool:
        sending = [pool.submit(send, client) for client in range(clients)]
        with contextlib.suppress(requests.ConnectionError):   # 3 s with nothing: no more comes
            for line in stream.iter_lines():
                if line.startswith(b"data: "):
                    received.append(json.loads(line[6:])["message"])
                    if len(received) == len(sent):
                        break
        for future in sending:
            future.result()
    return received, sent


def test_the_live_tail_misses_no_record_while_many_are_committed(server):
    """The tail moves past an id only once that record can be read: a tail that took the
    writer's newest id before its commit was visible stepped over records, never to send them
    (seen in about 2 runs of 5; three rounds here)."""
    for _ in range(3):
        received, sent = tail_while_sending(server)
        assert not set(sent) - set(received), f"{len(set(sent) - set(received))} never sent"
        assert len(received) == len(sent), "records sent twice"


def test_counts_per_minute_service_and_level(server):
    service = new_service()
    post_ndjson(server, [record(service, ts="2026-12-06T10:00:05Z"),
                         record(service, ts="2026-12-06T10:00:55Z"),
                         record(service, level="error", ts="2026-12-06T10:01:00Z")])
    answer = expect_json(requests.get(f"{server.url}/stats", timeout=TIMEOUT,
                                      params={"since": "2026-12-06T00:00:00Z"}), 200)
    mine = [(m["minute"], m["level"], m["count"]) for m in answer["minutes"]
            if m["service"] == service]
    assert mine == [("2026-12-06T10:00Z", "info", 2), ("2026-12-06T10:01Z", "error", 1)]


# --------------------------------------------------------------------------------------------
# The writer: durability, back-pressure, retention


def test_acknowledged_records_survive_a_kill_9(start_server):
    server = start_server(SCRIPT, "--syslog-port", "0")
    service = new_service()
    for batch in range(5):
        answer = expect_json(post_ndjson(server, [record(service, f"{batch}-{n}")
                                                  for n in range(1000)]), 200)
        assert answer["accepted"] == 1000
    server.kill9()
    again = start_server(SCRIPT, "--syslog-port", "0", db=server.db_path)
    total = sum(m["count"] for m in expect_json(requests.get(
        f"{again.url}/stats", params={"since": "2026-01-01T00:00:00Z"}, timeout=TIMEOUT),
        200)["minutes"] if m["service"] == service)
    assert total == 5000


def test_at_shutdown_the_writer_commits_what_is_queued_before_the_database_closes(
        start_server):
    """Records still queued when SIGTERM's drain gives up (another process holds the write
    lock) are committed once the lock is let go, and only then does the database close."""
    server = start_server(SCRIPT, "--syslog-port", "0", "--drain-timeout", "0.1")
    service = new_service()
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(requests.Timeout):
            requests.post(f"{server.url}/logs", json=record(service, "queued at shutdown"),
                          timeout=1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stopped = pool.submit(server.stop)   # SIGTERM, then exit status 0 expected
            time.sleep(1)   # no line says the hooks have begun; too short could only hide a bug
            blocker.execute("ROLLBACK")
            stopped.result()
    finally:
        blocker.close()
    assert not server.stderr_lines("error:"), server.stderr_text()
    again = start_server(SCRIPT, "--syslog-port", "0", db=server.db_path)
    assert [item["message"] for item in logs(again, service=service)] == ["queued at shutdown"]


def test_a_writer_too_far_behind_answers_503_with_retry_after(start_server):
    server = start_server(SCRIPT, "--syslog-port", "0", "--max-pending", "10")
    resp = post_ndjson(server, [record("bp", str(n)) for n in range(11)])
    expect_problem(resp, 503)
    assert int(resp.headers["Retry-After"]) >= 1
    assert expect_json(post_ndjson(server, [record("bp", "fits")]), 200)["accepted"] == 1


def test_old_records_are_deleted_by_retention(start_server):
    server = start_server(SCRIPT, "--syslog-port", "0", "--retention-days", "1",
                          "--retention-interval-s", "0.2")
    service = new_service()
    now = datetime.datetime.now(datetime.timezone.utc)
    old, recent = (now - datetime.timedelta(days=3)), (now - datetime.timedelta(hours=1))
    post_ndjson(server, [record(service, "old", ts=old.isoformat()),
                         record(service, "recent", ts=recent.isoformat())])
    deadline = time.monotonic() + 5
    while [i["message"] for i in logs(server, service=service)] != ["recent"]:
        assert time.monotonic() < deadline, "the old record was not deleted"
        time.sleep(0.1)


def test_a_syslog_port_in_use_exits_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_once(SCRIPT, "--port", "0", "--db", tmp_path / "db.sqlite3",
                        "--syslog-port", str(port), timeout=10)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_any_server_ships_its_access_log_here_with_log_to(server, start_server):
    """lib's `--log-to URL`, on a level 01 server: its access lines arrive as records."""
    health = start_server("level01/health_check.py", "--log-to", server.url)
    request_id = requests.get(f"{health.url}/health", timeout=TIMEOUT).headers["X-Request-Id"]
    deadline = time.monotonic() + 10
    while not (items := logs(server, service="health_check", trace_id=request_id)):
        assert time.monotonic() < deadline, "the access line never arrived"
        time.sleep(0.1)
    [item] = items
    assert (item["level"], item["fields"]["path"], item["fields"]["status"]) == (
        "info", "/health", 200)
