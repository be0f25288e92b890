"""level01/request_logger.py, black-box: the JSON Lines log, redaction, /logs, /logs/stats and
the demo routes (spec/level01.md §3).

Every test gives the server its own `--log` file in a temporary folder and reads that file
directly, as `jq` or a log shipper would. Rules whose point is threads and the transport
(concurrent appends, a sleeping handler not stalling others) run on both `--server threaded`
and `--server asyncio`.
"""
import base64
import concurrent.futures
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tests.harness import RawConnection, expect, expect_json, expect_problem, request_bytes, run_once

SCRIPT = "level01/request_logger.py"
TRANSPORTS = ("threaded", "asyncio")
TIMEOUT = 10  # s, for every single request
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FIELDS = {"ts", "seq", "request_id", "method", "path", "query", "status", "duration_ms", "slow",
          "bytes_in", "bytes_out", "client_ip", "user_agent", "headers"}


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "r.log"


@pytest.fixture
def server(start_server, log_path):
    return start_server(SCRIPT, "--log", log_path)


@pytest.fixture(scope="module")
def shared(start_server_module, tmp_path_factory):
    """One server for the tests that only look at answers, not at the log's contents."""
    return start_server_module(SCRIPT, "--log", tmp_path_factory.mktemp("shared") / "r.log")


def get(server, path, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return requests.get(server.url + path, **kw)


def read_log(path):
    """Every line of a log file as an entry; every line must be whole JSON ending in a newline."""
    data = Path(path).read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends inside a line: {data[-200:]!r}"
    entries = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path}:{number} is not one JSON object: {line[:300]!r}") from None
    return entries


def entry_for(path, request_id):
    found = [e for e in read_log(path) if e.get("request_id") == request_id]
    assert len(found) == 1, f"expected one line for {request_id}, found {len(found)}"
    return found[0]


def all_pages(server, query=""):
    """Follow `next_cursor` to the end; returns every item, in order."""
    items, cursor = [], None
    for _ in range(1000):
        params = query + (f"&cursor={cursor}" if cursor else "")
        body = expect_json(get(server, f"/logs?{params}"), 200)
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("next_cursor never ended")


# --------------------------------------------------------------------------------------------
# The log line


def test_each_request_is_one_json_line_with_every_field(server, log_path):
    resp = requests.post(f"{server.url}/echo?color=blue", data=b"hello", timeout=TIMEOUT,
                         headers={"X-Request-Id": "line-1", "User-Agent": "pytest-agent/1.0",
                                  "Content-Type": "text/plain"})
    expect_json(resp, 200)
    entries = read_log(log_path)  # written before the answer was sent: no wait needed
    assert len(entries) == 1, entries
    entry = entries[0]
    assert FIELDS <= set(entry), f"missing fields: {FIELDS - set(entry)}"
    assert TS.fullmatch(entry["ts"]), entry["ts"]
    logged_at = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - logged_at) < timedelta(seconds=30)
    assert entry["request_id"] == "line-1" == resp.headers["X-Request-Id"]
    assert (entry["method"], entry["path"], entry["query"]) == ("POST", "/echo", "color=blue")
    assert entry["status"] == 200 and entry["slow"] is False
    assert isinstance(entry["duration_ms"], (int, float)) and 0 <= entry["duration_ms"] < 5000
    assert entry["bytes_in"] == 5
    assert entry["bytes_out"] == len(resp.content)
    assert entry["client_ip"] == "127.0.0.1"
    assert entry["user_agent"] == "pytest-agent/1.0"
    assert entry["headers"]["content-type"] == "text/plain"


def test_the_stderr_access_log_still_has_its_line(server):
    expect(get(server, "/echo", headers={"X-Request-Id": "stderr-1"}), 200)
    line = server.wait_for_stderr("stderr-1")
    assert "GET /echo 200" in line, line


def test_requests_that_match_no_route_are_logged_too(server, log_path):
    expect_problem(get(server, "/no/such/page", headers={"X-Request-Id": "nf-1"}), 404)
    expect_problem(requests.delete(f"{server.url}/echo", headers={"X-Request-Id": "na-1"},
                                   timeout=TIMEOUT), 405)
    expect_problem(get(server, "/status/abc", headers={"X-Request-Id": "bad-1"}), 400)
    assert entry_for(log_path, "nf-1")["status"] == 404
    assert entry_for(log_path, "na-1")["status"] == 405
    assert entry_for(log_path, "bad-1")["status"] == 400


def test_a_request_refused_by_the_transport_is_logged(server, log_path):
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/echo", {"Content-Length": str(10 * 1024 * 1024),
                                                   "X-Request-Id": "big-1"}))
        assert conn.read_response().status == 413
    assert entry_for(log_path, "big-1")["status"] == 413


def test_head_logs_no_bytes_out(server, log_path):
    expect(requests.head(f"{server.url}/echo", headers={"X-Request-Id": "head-1"},
                         timeout=TIMEOUT), 200)
    entry = entry_for(log_path, "head-1")
    assert (entry["method"], entry["bytes_out"]) == ("HEAD", 0)


# --------------------------------------------------------------------------------------------
# Redaction


SECRET_HEADERS = {"Authorization": "Bearer sekrit-bearer", "Cookie": "session=sekrit-cookie",
                  "Set-Cookie": "sid=sekrit-set-cookie", "X-Api-Key": "sekrit-api-key",
                  "X-Session": "sekrit-session"}
SECRET_PARAMS = {"token": "sekrit-t1", "password": "sekrit-p1", "secret": "sekrit-s1",
                 "key": "sekrit-k1", "api_key": "sekrit-k2", "Access_Token": "sekrit-t2",
                 "userPassword": "sekrit-p2", "passwd": "sekrit-p3", "pwd": "sekrit-p4",
                 "auth": "sekrit-a1", "authCode": "sekrit-a2", "sig": "sekrit-g1",
                 "X-Amz-Signature": "sekrit-g2", "code": "sekrit-c1", "session_id": "sekrit-s2"}
# Names that merely contain a short secret word are not secrets: `code` is in `zipcode`.
PLAIN_PARAMS = {"q": "shoes", "zipcode": "75001", "author": "ann", "design": "flat"}


def test_secret_headers_are_redacted_in_the_file_and_in_echo(server, log_path):
    headers = {**SECRET_HEADERS, "X-Request-Id": "redact-h", "X-Plain": "visible"}
    echoed = expect_json(get(server, "/echo", headers=headers), 200)["headers"]
    for name in SECRET_HEADERS:
        assert echoed[name.lower()] == "[REDACTED]", echoed
    assert echoed["x-plain"] == "visible"
    logged = entry_for(log_path, "redact-h")["headers"]
    for name in SECRET_HEADERS:
        assert logged[name.lower()] == "[REDACTED]", logged
    assert logged["x-plain"] == "visible"
    assert "sekrit" not in log_path.read_text(), "a secret header value reached the log file"


def test_secret_query_parameters_are_redacted_everywhere(server, log_path):
    params = {**SECRET_PARAMS, **PLAIN_PARAMS}
    resp = get(server, "/echo", params=params, headers={"X-Request-Id": "redact-q"})
    query = expect_json(resp, 200)["query"]
    for name in SECRET_PARAMS:
        assert query[name] == ["[REDACTED]"], query
    for name, value in PLAIN_PARAMS.items():
        assert query[name] == [value], query
    logged = entry_for(log_path, "redact-q")["query"]
    pairs = dict(pair.split("=", 1) for pair in logged.split("&"))
    assert pairs == {**{name: "[REDACTED]" for name in SECRET_PARAMS}, **PLAIN_PARAMS}, logged
    listed = expect_json(get(server, "/logs?limit=1"), 200)["items"][0]
    assert listed["query"] == logged
    for place, text in (("the log file", log_path.read_text()),
                        ("stderr", server.stderr_text()), ("/logs", json.dumps(listed))):
        assert "sekrit" not in text, f"a secret query value reached {place}"


def test_a_malformed_query_is_still_logged_and_redacted(server, log_path):
    with RawConnection(server.host, server.port) as conn:  # raw: requests would re-encode it
        conn.send(request_bytes("GET", "/status/200?token=sekrit%ZZ&x=%ff",
                                {"X-Request-Id": "odd-q"}))
        assert conn.read_response().status == 200
    assert entry_for(log_path, "odd-q")["query"] == "token=[REDACTED]&x=%ff"


# --------------------------------------------------------------------------------------------
# Slow requests


def test_requests_over_slow_ms_are_flagged(start_server, log_path):
    server = start_server(SCRIPT, "--log", log_path, "--slow-ms", "150")
    expect_json(get(server, "/slow?ms=300", headers={"X-Request-Id": "slow-1"}), 200)
    expect_json(get(server, "/slow?ms=0", headers={"X-Request-Id": "fast-1"}), 200)
    slow, fast = entry_for(log_path, "slow-1"), entry_for(log_path, "fast-1")
    assert slow["slow"] is True and slow["duration_ms"] >= 300, slow
    assert fast["slow"] is False and fast["duration_ms"] < 150, fast


@pytest.mark.parametrize("ms", ["-1", "5001", "abc", "1.5"])
def test_slow_out_of_bounds_is_a_400(shared, ms):
    problem = expect_problem(get(shared, f"/slow?ms={ms}"), 400)
    assert [e["field"] for e in problem["errors"]] == ["ms"], problem


def test_slow_sleeps_as_asked(shared):
    started = time.monotonic()
    assert expect_json(get(shared, "/slow?ms=200"), 200) == {"slept_ms": 200}
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_slow_request_does_not_stall_the_others(start_server, log_path, transport):
    server = start_server(SCRIPT, "--log", log_path, "--server", transport)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sleeping = pool.submit(get, server, "/slow?ms=2000")
        time.sleep(0.2)  # let it reach the handler
        started = time.monotonic()
        expect(get(server, "/echo"), 200)
        assert time.monotonic() - started < 1.0, "/echo waited for /slow"
        expect(sleeping.result(), 200)


# --------------------------------------------------------------------------------------------
# /status/{code}


@pytest.mark.parametrize("code", [200, 201, 202, 299])
def test_status_answers_2xx_with_json(shared, code):
    assert expect_json(get(shared, f"/status/{code}"), code) == {"status": code}


@pytest.mark.parametrize("code", [204, 304])
def test_status_204_and_304_have_no_body(shared, code):
    with RawConnection(shared.host, shared.port) as conn:
        conn.send(request_bytes("GET", f"/status/{code}"))
        resp = conn.read_response()
        assert resp.status == code and resp.body == b""
        assert resp.header("Content-Length") is None
        conn.send(request_bytes("GET", "/status/200", {"Connection": "close"}))
        assert conn.read_response().status == 200, "the connection is garbled after the answer"


@pytest.mark.parametrize("code", [400, 404, 418, 422, 500, 502, 599])
def test_status_4xx_and_5xx_are_problems(shared, code):
    problem = expect_problem(get(shared, f"/status/{code}"), code)
    assert problem["status"] == code


def test_status_answers_carry_the_headers_the_rfcs_require(shared):
    assert get(shared, "/status/401").headers.get("WWW-Authenticate")
    assert "GET" in get(shared, "/status/405").headers.get("Allow", "")
    assert get(shared, "/status/429").headers.get("Retry-After", "").isdigit()
    assert get(shared, "/status/503").headers.get("Retry-After", "").isdigit()
    resp = get(shared, "/status/302", allow_redirects=False)
    expect_json(resp, 302)


@pytest.mark.parametrize("code", ["100", "199", "600", "999", "0", "abc"])
def test_status_out_of_range_is_a_400(shared, code):
    problem = expect_problem(get(shared, f"/status/{code}"), 400)
    assert [e["field"] for e in problem["errors"]] == ["code"], problem


# --------------------------------------------------------------------------------------------
# /echo


def test_echo_parses_json_bodies(shared):
    body = expect_json(requests.post(f"{shared.url}/echo?a=1&a=2", json={"name": "Ada", "n": [1, 2]},
                                     timeout=TIMEOUT), 200)
    assert body["method"] == "POST" and body["path"] == "/echo"
    assert body["query"] == {"a": ["1", "2"]}
    assert (body["body"], body["body_encoding"]) == ({"name": "Ada", "n": [1, 2]}, "json")


def test_echo_text_binary_and_empty_bodies(shared):
    text = expect_json(requests.post(f"{shared.url}/echo", data="héllo".encode(), timeout=TIMEOUT,
                                     headers={"Content-Type": "text/plain"}), 200)
    assert (text["body"], text["body_encoding"]) == ("héllo", "text")
    raw = bytes([0xff, 0x00, 0xfe, 0x80])
    binary = expect_json(requests.post(f"{shared.url}/echo", data=raw, timeout=TIMEOUT,
                                       headers={"Content-Type": "application/octet-stream"}), 200)
    assert binary["body_encoding"] == "base64" and base64.b64decode(binary["body"]) == raw
    empty = expect_json(get(shared, "/echo"), 200)
    assert (empty["method"], empty["body"], empty["body_encoding"]) == ("GET", None, None)


def test_echo_malformed_json_is_a_400(shared):
    expect_problem(requests.post(f"{shared.url}/echo", data=b"{oops", timeout=TIMEOUT,
                                 headers={"Content-Type": "application/json"}), 400)


def test_echo_body_over_its_limit_is_a_413(shared):
    expect_problem(requests.post(f"{shared.url}/echo", data=b"x" * (64 * 1024 + 1),
                                 timeout=TIMEOUT), 413)


# --------------------------------------------------------------------------------------------
# GET /logs


def make_traffic(server, count, prefix="t"):
    for n in range(count):
        expect(get(server, f"/echo?n={n}", headers={"X-Request-Id": f"{prefix}-{n}"}), 200)


def test_logs_are_newest_first_and_paginate(server):
    make_traffic(server, 25)
    first = expect_json(get(server, "/logs?limit=10"), 200)
    assert [e["request_id"] for e in first["items"]] == [f"t-{n}" for n in range(24, 14, -1)]
    assert isinstance(first["next_cursor"], str)
    make_traffic(server, 3, prefix="later")  # new entries must not shift the pages
    second = expect_json(get(server, f"/logs?limit=10&cursor={first['next_cursor']}"), 200)
    assert [e["request_id"] for e in second["items"]] == [f"t-{n}" for n in range(14, 4, -1)]
    third = expect_json(get(server, f"/logs?limit=10&cursor={second['next_cursor']}"), 200)
    assert [e["request_id"] for e in third["items"]] == [f"t-{n}" for n in range(4, -1, -1)]
    assert third["next_cursor"] is None
    seqs = [e["seq"] for page in (first, second, third) for e in page["items"]]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 25


def test_logs_default_limit_is_20(server):
    make_traffic(server, 23)
    body = expect_json(get(server, "/logs"), 200)
    assert len(body["items"]) == 20 and body["next_cursor"]


def test_reading_the_logs_is_not_logged(server, log_path):
    make_traffic(server, 2)
    for _ in range(3):
        expect(get(server, "/logs"), 200)
        expect(get(server, "/logs/stats"), 200)
        expect(requests.head(f"{server.url}/logs", timeout=TIMEOUT), 200)
    assert [e["path"] for e in read_log(log_path)] == ["/echo", "/echo"]
    assert [e["path"] for e in expect_json(get(server, "/logs"), 200)["items"]] == ["/echo"] * 2
    server.wait_for_stderr("GET /logs/stats 200")  # the stderr access log still shows them


def test_logs_filters(server):
    for path, method in [("/echo", "GET"), ("/echo", "POST"), ("/status/404", "GET"),
                         ("/status/410", "GET"), ("/status/503", "GET"), ("/status/201", "GET"),
                         ("/nowhere", "GET"), ("/echo", "POST")]:
        requests.request(method, server.url + path, timeout=TIMEOUT)

    def listed(query):
        return [(e["method"], e["path"], e["status"])
                for e in expect_json(get(server, f"/logs?{query}"), 200)["items"]]

    assert listed("status=404") == [("GET", "/nowhere", 404), ("GET", "/status/404", 404)]
    assert listed("status=4xx") == [("GET", "/nowhere", 404), ("GET", "/status/410", 410),
                                    ("GET", "/status/404", 404)]
    assert listed("status=4XX&path_prefix=/status/") == [("GET", "/status/410", 410),
                                                         ("GET", "/status/404", 404)]
    assert listed("status=5xx") == [("GET", "/status/503", 503)]
    assert listed("method=post") == [("POST", "/echo", 200)] * 2
    assert listed("method=GET&status=2xx") == [("GET", "/status/201", 201), ("GET", "/echo", 200)]
    assert listed("path_prefix=/stat&limit=2") == [("GET", "/status/201", 201),
                                                    ("GET", "/status/503", 503)]
    assert listed("method=DELETE") == []


def test_logs_since(server):
    make_traffic(server, 3, prefix="old")
    time.sleep(0.05)
    boundary = datetime.now(timezone.utc)
    time.sleep(0.05)
    make_traffic(server, 2, prefix="new")
    since = boundary.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    got = [e["request_id"] for e in expect_json(get(server, f"/logs?since={since}"), 200)["items"]]
    assert got == ["new-1", "new-0"]
    offset = boundary.astimezone(timezone(timedelta(hours=2))).isoformat()  # the same moment
    got = [e["request_id"] for e in expect_json(get(server, "/logs", params={"since": offset}), 200)["items"]]
    assert got == ["new-1", "new-0"]
    assert expect_json(get(server, "/logs?since=2000-01-01T00:00:00Z"), 200)["items"][-1]["request_id"] == "old-0"
    assert expect_json(get(server, "/logs?since=2999-01-01T00:00:00Z"), 200)["items"] == []


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=ten", "limit"),
    ("cursor=not-a-cursor", "cursor"), ("cursor=WyJ4Il0", "cursor"),
    ("status=600", "status"), ("status=4x", "status"), ("status=teapot", "status"),
    ("status=4xxx", "status"), ("method=G%20T", "method"), ("method=123", "method"),
    ("path_prefix=echo", "path_prefix"), ("since=yesterday", "since"),
    ("since=2026-02-30T00:00:00Z", "since"), ("since=2026-01-01T00:00:00", "since"),
    ("since=2026-01-01", "since"),
])
def test_logs_bad_parameters_are_400s_naming_them(shared, query, field):
    problem = expect_problem(get(shared, f"/logs?{query}"), 400)
    assert field in [e["field"] for e in problem.get("errors", [])], problem


def test_logs_names_every_bad_parameter_at_once(shared):
    problem = expect_problem(get(shared, "/logs?status=9&method=1&since=x&path_prefix=y"), 400)
    assert {e["field"] for e in problem["errors"]} == {"status", "method", "since", "path_prefix"}


# --------------------------------------------------------------------------------------------
# GET /logs/stats


def test_stats_count_by_status_class_and_method(server):
    for path, method in [("/echo", "POST")] * 3 + [("/status/404", "GET")] * 2 + \
            [("/status/503", "GET"), ("/status/302", "GET"), ("/status/200", "GET")]:
        requests.request(method, server.url + path, timeout=TIMEOUT, allow_redirects=False)
    stats = expect_json(get(server, "/logs/stats"), 200)
    assert stats["count"] == 8
    assert stats["by_status_class"] == {"1xx": 0, "2xx": 4, "3xx": 1, "4xx": 2, "5xx": 1}
    assert stats["by_method"] == {"GET": 5, "POST": 3}
    assert expect_json(get(server, "/logs/stats"), 200)["count"] == 8, "reading stats was counted"


def test_stats_percentiles(server):
    # 20 requests: 18 quick, one of 300 ms, one of 700 ms. Nearest rank: p50 is the 10th
    # smallest (quick), p95 the 19th (the 300 ms one), p99 the 20th (the 700 ms one).
    for _ in range(18):
        expect(get(server, "/slow?ms=0"), 200)
    expect(get(server, "/slow?ms=300"), 200)
    expect(get(server, "/slow?ms=700"), 200)
    stats = expect_json(get(server, "/logs/stats"), 200)
    durations = stats["duration_ms"]
    assert stats["count"] == 20
    assert durations["p50"] < 100, durations
    assert 300 <= durations["p95"] < 700, durations
    assert 700 <= durations["p99"] == durations["max"], durations
    assert stats["slow"] == 1, stats  # only the 700 ms one is over the default --slow-ms 500


def test_stats_of_an_empty_log(server):
    stats = expect_json(get(server, "/logs/stats"), 200)
    assert stats["count"] == 0
    assert stats["duration_ms"]["p50"] is None


def test_stats_cover_the_ring_only(start_server, log_path):
    server = start_server(SCRIPT, "--log", log_path, "--ring-size", "5")
    make_traffic(server, 12)
    assert expect_json(get(server, "/logs/stats"), 200)["count"] == 5
    assert len(all_pages(server, "limit=3")) == 12, "/logs reads past the ring into the file"


# --------------------------------------------------------------------------------------------
# Many threads, one file


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_requests_give_exactly_one_whole_line_each(start_server, log_path, transport):
    server = start_server(SCRIPT, "--log", log_path, "--server", transport)
    threads, per_thread = 32, 50
    start = threading.Barrier(threads)

    def client(t):
        with requests.Session() as session:
            start.wait()
            for n in range(per_thread):
                resp = session.post(f"{server.url}/echo?worker={t}", data=b"x" * n,
                                    headers={"X-Request-Id": f"c-{t}-{n}"}, timeout=TIMEOUT)
                expect(resp, 200)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(client, t) for t in range(threads)]:
            done.result()
    entries = read_log(log_path)
    assert len(entries) == threads * per_thread
    assert {e["request_id"] for e in entries} == {f"c-{t}-{n}" for t in range(threads)
                                                  for n in range(per_thread)}
    assert [e["seq"] for e in entries] == list(range(1, threads * per_thread + 1))
    assert all(e["bytes_in"] == int(e["request_id"].rsplit("-", 1)[1]) for e in entries)


# --------------------------------------------------------------------------------------------
# Rotation


def test_rotation_keeps_at_most_log_backups_files(start_server, log_path):
    server = start_server(SCRIPT, "--log", log_path, "--log-max-bytes", "2000",
                          "--log-backups", "2", "--ring-size", "3")
    make_traffic(server, 60)
    files = sorted(log_path.parent.glob("r.log*"))
    assert [f.name for f in files] == ["r.log", "r.log.1", "r.log.2"], files
    chunks = [read_log(log_path.parent / name) for name in ("r.log.2", "r.log.1", "r.log")]
    for name in ("r.log", "r.log.1", "r.log.2"):
        assert (log_path.parent / name).stat().st_size <= 2000
    seqs = [e["seq"] for chunk in chunks for e in chunk]
    assert seqs == list(range(seqs[0], 61)), "the files hold a gapless run of the newest entries"
    assert len(chunks[0]) > 0 and len(chunks[1]) > 0
    listed = all_pages(server, "limit=7")
    assert [e["seq"] for e in listed] == seqs[::-1], "/logs reads the ring, then each file"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rotation_under_concurrency_tears_no_line(start_server, log_path, transport):
    server = start_server(SCRIPT, "--log", log_path, "--log-max-bytes", "4096",
                          "--log-backups", "3", "--server", transport)

    def client(t):
        with requests.Session() as session:
            for n in range(25):
                expect(session.get(f"{server.url}/echo?t={t}&n={n}", timeout=TIMEOUT), 200)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for done in [pool.submit(client, t) for t in range(16)]:
            done.result()
    names = sorted(f.name for f in log_path.parent.glob("r.log*"))
    assert names == ["r.log", "r.log.1", "r.log.2", "r.log.3"], names
    seqs = []
    for name in ("r.log.3", "r.log.2", "r.log.1", "r.log"):
        assert (log_path.parent / name).stat().st_size <= 4096
        seqs += [e["seq"] for e in read_log(log_path.parent / name)]
    assert seqs == list(range(seqs[0], 401))


def test_zero_max_bytes_never_rotates(start_server, log_path):
    server = start_server(SCRIPT, "--log", log_path, "--log-max-bytes", "0")
    make_traffic(server, 20)
    assert [f.name for f in log_path.parent.glob("r.log*")] == ["r.log"]
    assert len(read_log(log_path)) == 20


# --------------------------------------------------------------------------------------------
# Restarts, damaged files, full disks


def test_entries_survive_a_restart(start_server, log_path):
    first = start_server(SCRIPT, "--log", log_path)
    make_traffic(first, 5, prefix="before")
    first.stop()
    second = start_server(SCRIPT, "--log", log_path, "--ring-size", "3")
    make_traffic(second, 1, prefix="after")
    listed = all_pages(second, "limit=2")
    assert [e["request_id"] for e in listed] == ["after-0"] + [f"before-{n}" for n in range(4, -1, -1)]
    assert [e["seq"] for e in listed] == [6, 5, 4, 3, 2, 1], "seq goes on counting after a restart"
    assert expect_json(get(second, "/logs/stats"), 200)["count"] == 3, "the ring refills from the file"


def test_a_damaged_log_file_is_read_around(start_server, log_path):
    first = start_server(SCRIPT, "--log", log_path)
    make_traffic(first, 3, prefix="good")
    first.stop()
    with open(log_path, "ab") as file:  # a line torn by a power cut, and some junk
        file.write(b'not json at all\n["a list"]\n{"seq": 99, "ts": "x"}\n{"ts":"2026-01-01T00:00:00.000Z","seq":4,"req')
    second = start_server(SCRIPT, "--log", log_path)
    make_traffic(second, 1, prefix="next")
    items = expect_json(get(second, "/logs"), 200)["items"]
    assert [e["request_id"] for e in items] == ["next-0", "good-2", "good-1", "good-0"]
    assert items[0]["seq"] == 4


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_does_not_stop_the_server(start_server):
    server = start_server(SCRIPT, "--log", "/dev/full")  # every write fails with ENOSPC
    make_traffic(server, 3)
    stats = expect_json(get(server, "/logs/stats"), 200)
    assert stats["count"] == 3 and stats["file_write_errors"] == 3
    assert len(expect_json(get(server, "/logs"), 200)["items"]) == 3, "the ring still serves"
    server.wait_for_stderr("No space left on device")


# --------------------------------------------------------------------------------------------
# --trace and the command line


def test_trace_shows_the_logger_as_one_link_of_the_chain(start_server, log_path):
    server = start_server(SCRIPT, "--log", log_path, "--trace")
    expect(get(server, "/echo", headers={"X-Request-Id": "traced-1"}), 200)
    server.wait_for_stderr("← assign_request_id")
    text = server.stderr_text()
    block = text[text.index("trace traced-1 GET /echo"):]
    order = ["→ assign_request_id", "→ time_request", "→ log_requests", "→ match_route",
             "→ handler echo", "← handler echo 200", "log line seq=1", "← log_requests 200",
             "← assign_request_id 200"]
    positions = [block.find(step) for step in order]
    assert -1 not in positions and positions == sorted(positions), block[:2000]


@pytest.mark.parametrize("log", ["/proc/no-such-dir/r.log", "DIRECTORY"])
def test_unusable_log_path_exits_2(tmp_path, log):
    done = run_once(SCRIPT, "--port", "0", "--log", tmp_path if log == "DIRECTORY" else log)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--log" in done.stderr, done.stderr
    assert "listening on" not in done.stdout


@pytest.mark.parametrize("args", [["--log-max-bytes", "-1"], ["--log-backups", "101"],
                                  ["--ring-size", "0"], ["--slow-ms", "soon"]])
def test_bad_project_flags_exit_2(tmp_path, args):
    done = run_once(SCRIPT, "--port", "0", "--log", tmp_path / "r.log", *args)
    assert done.returncode == 2, done.stderr
    assert "usage" in done.stderr.lower() and "Traceback" not in done.stderr, done.stderr
