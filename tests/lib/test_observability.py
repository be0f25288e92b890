"""lib's logs and metrics on any server (lib/logs.py, lib/metrics.py), on both transports:

- `--log-format json`: every stderr line one JSON object; the access line carries ts, level, msg,
  request_id, method, path, status, duration_ms, bytes and client; a handler's traceback is a
  field of its error line, never loose lines;
- `--log-level`: lines below it are dropped (an access line is info, a 4xx warning, a 5xx error);
- `add_metrics(app)`: `GET /metrics` in Prometheus' text format, counting every request by method,
  route pattern and status, 404s and unknown methods included, with bounded labels.
"""
import json
import math
import re
import socket
import time

import pytest
import requests

from tests.harness import expect

APP = "tests/lib/transport_app.py"
TRANSPORTS = ["asyncio", "threaded"]
SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')


def json_lines(server):
    """stderr after the server stopped, each line parsed: any line that is not JSON fails."""
    server.stop()
    return [json.loads(line) for line in server.stderr_text().splitlines()]


def samples(text):
    """{(name, frozenset of label pairs): value} of a metrics page, read by hand (the format's
    own rules: `name{a="b",…} value`), so the test stands without prometheus_client."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, labels, value = SAMPLE.fullmatch(line).groups()
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        found[name, pairs] = float(value)
    return found


def labels(**pairs):
    return frozenset(pairs.items())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_json_logs_are_one_object_a_line_with_the_request_fields(start_server, transport):
    server = start_server(APP, "--server", transport, "--log-format", "json")
    expect(requests.get(f"{server.url}/health", headers={"X-Request-Id": "trace-me-1"}, timeout=5), 200)
    expect(requests.get(f"{server.url}/nothing-here?token=secret", timeout=5), 404)
    failed = requests.get(f"{server.url}/fail", timeout=5)
    expect(failed, 500)
    records = json_lines(server)
    access = [r for r in records if "status" in r]
    assert [(r["method"], r["path"], r["status"], r["level"]) for r in access] == [
        ("GET", "/health", 200, "info"), ("GET", "/nothing-here", 404, "warning"),
        ("GET", "/fail", 500, "error")]
    first = access[0]
    assert first["request_id"] == "trace-me-1" and first["msg"] == "GET /health 200"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"]), first
    assert first["client"] == "127.0.0.1" and first["bytes"] > 0 and first["duration_ms"] >= 0
    assert all("secret" not in json.dumps(r) for r in records)  # the query string is never logged
    error = next(r for r in records if r.get("traceback"))
    assert error["level"] == "error" and error["request_id"] == failed.headers["X-Request-Id"]
    assert "RuntimeError: the handler failed on purpose" in error["traceback"]
    assert "the handler failed" not in failed.text  # the traceback goes to the log only


def test_text_logs_keep_the_traceback_on_the_lines_after_the_error(start_server):
    server = start_server(APP)
    failed = requests.get(f"{server.url}/fail", timeout=5)
    expect(failed, 500)
    server.stop()
    text = server.stderr_text()
    assert f"error in GET /fail request_id={failed.headers['X-Request-Id']}\nTraceback" in text
    assert "RuntimeError: the handler failed on purpose" in text


@pytest.mark.parametrize("level, kept", [("warning", ["/missing", "/fail"]), ("error", ["/fail"]),
                                         ("debug", ["/health", "/missing", "/fail"])])
def test_the_log_level_drops_what_is_below_it(start_server, level, kept):
    server = start_server(APP, "--log-format", "json", "--log-level", level)
    for path in ("/health", "/missing", "/fail"):
        requests.get(f"{server.url}{path}", timeout=5)
    access = [r["path"] for r in json_lines(server) if "status" in r]
    assert access == kept


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_metrics_count_every_request_by_route_pattern_and_status(start_server, transport):
    server = start_server(APP, "--server", transport)
    before = time.time()
    for _ in range(3):
        expect(requests.get(f"{server.url}/health", timeout=5), 200)
    expect(requests.post(f"{server.url}/echo", data=b"x", timeout=5), 200)
    expect(requests.get(f"{server.url}/no/such/page/41", timeout=5), 404)
    expect(requests.get(f"{server.url}/fail", timeout=5), 500)
    expect(requests.request("BREW", f"{server.url}/health", timeout=5), 405)
    page = requests.get(f"{server.url}/metrics", timeout=5)
    expect(page, 200)
    assert page.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(page.text)
    total = "http_requests_total"
    assert found[total, labels(method="GET", route="/health", status="200")] == 3
    assert found[total, labels(method="POST", route="/echo", status="200")] == 1
    assert found[total, labels(method="GET", route="unmatched", status="404")] == 1
    assert found[total, labels(method="GET", route="/fail", status="500")] == 1
    assert found[total, labels(method="other", route="unmatched", status="405")] == 1
    assert not [key for key in found if "41" in str(key) or "BREW" in str(key)]  # bounded labels
    assert found["http_requests_in_flight", labels()] == 1  # this scrape itself
    started = found["process_start_time_seconds", labels()]
    assert before - 60 < started <= time.time()
    assert found["app_info", labels(name="transport_app", version="1.0.0")] == 1

    health = labels(method="GET", route="/health")
    buckets = sorted((float(dict(key[1])["le"]), value) for key, value in found.items()
                     if key[0] == "http_request_duration_seconds_bucket" and key[1] > health)
    assert [bound for bound, _ in buckets] == [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                                2.5, 5.0, 10.0, math.inf]
    counts = [count for _, count in buckets]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative, +Inf holds every one
    assert found["http_request_duration_seconds_count", health] == 3
    assert 0 < found["http_request_duration_seconds_sum", health] < 30


def test_metrics_show_the_requests_in_flight(start_server):
    server = start_server(APP, "--server", "threaded")
    slow = socket.create_connection((server.host, server.port))
    slow.sendall(b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + 5
    while True:
        found = samples(requests.get(f"{server.url}/metrics", timeout=5).text)
        if found["http_requests_in_flight", labels()] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # the sleeper's request is on its way in
    assert found["http_requests_in_flight", labels()] == 2  # the sleeper and this scrape
    assert slow.recv(4096).startswith(b"HTTP/1.1 200")
    slow.close()
    found = samples(requests.get(f"{server.url}/metrics", timeout=5).text)
    assert found["http_requests_in_flight", labels()] == 1


def test_prometheus_own_parser_reads_the_page(start_server):
    parser = pytest.importorskip("prometheus_client.parser")
    server = start_server(APP)
    requests.get(f"{server.url}/health", timeout=5)
    families = {family.name: family for family in
                parser.text_string_to_metric_families(requests.get(f"{server.url}/metrics", timeout=5).text)}
    assert families["http_requests"].type == "counter"
    assert families["http_request_duration_seconds"].type == "histogram"
    assert {family.type for name, family in families.items() if name != "http_requests"
            and name != "http_request_duration_seconds"} == {"gauge"}
    health = [s for s in families["http_requests"].samples if s.labels.get("route") == "/health"]
    assert [(s.name, s.value) for s in health] == [("http_requests_total", 1.0)]
