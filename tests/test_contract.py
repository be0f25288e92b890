"""The common contract (spec/common.md, "Running" and "HTTP behaviour"), checked black-box on
every project that exists, so each new project is held to it for free.

Application-level rules (/health, /, /openapi.json, problem details, X-Request-Id, the access
log) run against one server per project. Rules whose point is the transport (framing,
keep-alive, pipelining, limits, garbage, idle clients, signals) run against both
`--server threaded` and `--server asyncio`. user_service is skipped: it cannot run without
auth_service, and its own tests start both.
"""
import json
import re
import signal
import socket
import time
import uuid

import pytest
import requests

from tests.harness import (RawConnection, ServerGroup, expect, expect_json, expect_problem,
                           raw_exchange, request_bytes, run_once, takes_db)
from tests.projects import NOT_STANDALONE, existing_projects

PROJECTS = [p for p in existing_projects() if p.name not in NOT_STANDALONE]
TRANSPORTS = ("threaded", "asyncio")
TIMEOUT = 5  # s, for every single request

project_params = [pytest.param(p, id=p.name) for p in PROJECTS]
transport_params = [pytest.param(p, t, id=f"{p.name}-{t}") for p in PROJECTS for t in TRANSPORTS]
wire_params = [pytest.param((p, t), id=f"{p.name}-{t}") for p in PROJECTS for t in TRANSPORTS]

# RFC 9110 §5.5 / common.md: a sane id is 1–128 visible ASCII characters (0x21–0x7E).
SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def unique_id(prefix="contract"):
    return f"{prefix}-{uuid.uuid4().hex}"


@pytest.fixture(scope="module", params=project_params)
def app_server(request, tmp_path_factory):
    """One server per project, default transport, for the application-level rules. Stopped
    (and its clean exit asserted) when pytest moves on to the next project."""
    group = ServerGroup(tmp_path_factory)
    yield group.start(request.param.script)
    group.stop_all()


@pytest.fixture(scope="module", params=wire_params)
def wire_server(request, tmp_path_factory):
    """One server per project and transport, for the wire-level rules."""
    project, transport = request.param
    group = ServerGroup(tmp_path_factory)
    yield group.start(project.script, "--server", transport)
    group.stop_all()


def get(server, path, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return requests.get(server.url + path, **kw)


# --------------------------------------------------------------------------------------------
# Helpers for the index and the OpenAPI document


def _normalise_path(path):
    """`/counters/{name}`, `/counters/<name>`, `/counters/:name` → `/counters/{}`."""
    path = re.sub(r"\{[^}/]*\}", "{}", path)
    path = re.sub(r"<[^>/]*>", "{}", path)
    return re.sub(r"(?<=/):[A-Za-z_][A-Za-z0-9_]*", "{}", path)


def index_routes(index):
    """The routes an index lists, as a set of (METHOD or None, path). Accepts the usual shapes:
    ["GET /x", ...], [{"method"|"methods", "path"}, ...] or {"/x": ["GET", ...]}."""
    routes = index["routes"]
    found = set()

    def add(methods, path):
        if isinstance(methods, str):
            methods = [methods]
        methods = [m for word in methods or [] for m in re.split(r"[|, ]+", word) if m]
        for method in methods or [None]:
            found.add((method.upper() if method else None, path))

    if isinstance(routes, dict):
        for path, methods in routes.items():
            add(methods if isinstance(methods, (list, str)) else list(methods or []), path)
        return found
    for route in routes:
        if isinstance(route, str):
            words = route.split()
            path = next((w for w in words if w.startswith("/")), None)
            assert path, f"index route {route!r} names no path"
            add([w for w in words if not w.startswith("/") and w.isupper()], path)
        elif isinstance(route, dict):
            path = route.get("path") or route.get("pattern")
            assert isinstance(path, str), f"index route {route!r} has no path"
            add(route.get("methods") or route.get("method"), path)
        else:
            raise AssertionError(f"index route {route!r} is neither a string nor an object")
    return found


def openapi_doc(server):
    return expect_json(get(server, "/openapi.json"), 200)


def first_post_path(doc):
    """A concrete path of a route that takes POST, or None."""
    for path, item in doc.get("paths", {}).items():
        if isinstance(item, dict) and "post" in item:
            return re.sub(r"\{[^}/]*\}", "contract1", path)
    return None


def assert_problem_bytes(resp, status):
    """A raw response is an RFC 9457 problem with this status and no stack trace."""
    assert resp.status == status, f"status {resp.status}, expected {status}: {resp.raw[:600]!r}"
    media = (resp.header("Content-Type") or "").split(";")[0].strip().lower()
    assert media == "application/problem+json", f"Content-Type {media!r} on a {status}"
    assert b"Traceback" not in resp.body, f"the {status} body leaks a traceback: {resp.body!r}"
    problem = json.loads(resp.body)
    assert problem.get("status") == status and isinstance(problem.get("title"), str) \
        and isinstance(problem.get("type"), str), f"not a problem: {problem!r}"
    assert resp.header("X-Request-Id"), f"no X-Request-Id on the {status}"
    assert_content_length(resp)


def assert_content_length(resp):
    length = resp.header("Content-Length")
    assert length is not None, f"no Content-Length on a {resp.status}: {resp.raw[:400]!r}"
    assert int(length) == len(resp.body), f"Content-Length {length}, body {len(resp.body)} bytes"


def assert_still_serving(server):
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/health", {"Connection": "close"}))
        resp = conn.read_response()
    assert resp.status == 200, f"after the bad request GET /health → {resp.status}"


# --------------------------------------------------------------------------------------------
# Running: the listening line, /health, /, /openapi.json


@pytest.mark.parametrize("project", project_params)
def test_help_names_the_common_flags(project):
    done = run_once(project.script, "--help")
    assert done.returncode == 0, f"--help exited {done.returncode}: {done.stderr}"
    for flag in ("--host", "--port", "--server", "--idle-timeout", "--trace"):
        assert flag in done.stdout, f"`{project.script} --help` does not mention {flag}"


def test_listening_line(app_server):
    # The harness already required exactly `listening on http://HOST:PORT` as the first line.
    assert app_server.host == "127.0.0.1", "the default --host is 127.0.0.1"
    assert app_server.port > 0
    assert app_server.url == f"http://127.0.0.1:{app_server.port}"


def test_health(app_server):
    resp = get(app_server, "/health")
    body = expect_json(resp, 200)
    assert isinstance(body, dict) and body.get("status") == "ok", body


def test_index(app_server):
    index = expect_json(get(app_server, "/"), 200)
    assert isinstance(index, dict), index
    for key in ("name", "description"):
        assert isinstance(index.get(key), str) and index[key].strip(), f"index {key}: {index!r}"
    assert "\n" not in index["description"].strip(), "description is one line"
    assert index.get("routes"), f"index lists no routes: {index!r}"
    paths = {path for _, path in index_routes(index)}
    assert "/health" in paths, f"the index does not list /health: {sorted(paths)}"


def test_openapi_document(app_server):
    doc = openapi_doc(app_server)
    assert str(doc.get("openapi", "")).startswith("3.1"), f"openapi = {doc.get('openapi')!r}"
    info = doc.get("info", {})
    assert isinstance(info.get("title"), str) and isinstance(info.get("version"), str), info
    paths = doc.get("paths")
    assert isinstance(paths, dict) and "/health" in paths, "paths must describe /health"
    assert "get" in paths["/health"], paths["/health"]
    for path, item in paths.items():
        assert path.startswith("/"), f"path {path!r}"
        declared = {p.get("name") for p in item.get("parameters", []) if p.get("in") == "path"}
        for method, op in item.items():
            if method not in {"get", "put", "post", "delete", "patch", "head", "options"}:
                continue
            names = declared | {p.get("name") for p in op.get("parameters", [])
                                if p.get("in") == "path"}
            for param in re.findall(r"\{([^}/]+)\}", path):
                assert param in names, f"{method.upper()} {path}: path parameter {param!r} " \
                                       f"is not declared (Swagger UI needs it)"


def test_openapi_covers_the_index(app_server):
    index = expect_json(get(app_server, "/"), 200)
    paths = {_normalise_path(p): {m.upper() for m in item} for p, item in
             openapi_doc(app_server)["paths"].items()}
    missing = []
    for method, path in sorted(index_routes(index), key=str):
        methods = paths.get(_normalise_path(path))
        if methods is None:
            missing.append(f"{path} (no path)")
        elif method and method not in ("HEAD", "OPTIONS") and method not in methods:
            missing.append(f"{method} {path}")
    assert not missing, f"/openapi.json does not describe index routes: {missing}"


# --------------------------------------------------------------------------------------------
# Errors


def test_unknown_route_is_a_404_problem(app_server):
    resp = get(app_server, f"/no/such/route/{uuid.uuid4().hex}")
    problem = expect_problem(resp, 404)
    assert isinstance(problem.get("detail"), str) and problem["detail"], problem
    assert resp.headers.get("X-Request-Id")


def test_wrong_method_is_a_405_with_allow(app_server):
    resp = requests.delete(app_server.url + "/health", timeout=TIMEOUT)
    expect_problem(resp, 405)
    allow = {m.strip().upper() for m in resp.headers.get("Allow", "").split(",") if m.strip()}
    assert "GET" in allow, f"Allow: {resp.headers.get('Allow')!r} should list GET"
    assert "DELETE" not in allow


# --------------------------------------------------------------------------------------------
# X-Request-Id and the access log


def test_sane_request_id_is_echoed(app_server):
    for rid in (unique_id(), "a" * 128, "abc!#$%&'*+-.^_`|~:/=?@[]{}"):
        resp = get(app_server, "/health", headers={"X-Request-Id": rid})
        expect(resp, 200)
        assert resp.headers.get("X-Request-Id") == rid, f"sent {rid!r}, got " \
                                                        f"{resp.headers.get('X-Request-Id')!r}"


def test_missing_request_id_gets_a_fresh_one(app_server):
    ids = [get(app_server, "/health").headers.get("X-Request-Id") for _ in range(2)]
    for rid in ids:
        assert rid and SANE_ID.fullmatch(rid), f"fresh X-Request-Id {rid!r} is not sane"
    assert ids[0] != ids[1], "two requests got the same fresh id"


@pytest.mark.parametrize("bad_id", [
    pytest.param(b"x" * 129, id="129-chars"),
    pytest.param(b"has space", id="space"),
    pytest.param(b"ctl\x01char", id="control-char"),
    pytest.param(b"caf\xc3\xa9", id="non-ascii"),
])
def test_insane_request_id_is_replaced(app_server, bad_id):
    raw = (b"GET /health HTTP/1.1\r\nHost: test.invalid\r\nConnection: close\r\n"
           b"X-Request-Id: " + bad_id + b"\r\n\r\n")
    with RawConnection(app_server.host, app_server.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
    # An id with a control character is a malformed header; a 400 is acceptable for that one.
    assert resp.status in ((200, 400) if b"\x01" in bad_id else (200,)), resp.raw[:400]
    rid = resp.header("X-Request-Id")
    assert rid and SANE_ID.fullmatch(rid), f"X-Request-Id {rid!r} is not a sane fresh id"
    assert rid.encode("latin-1") != bad_id


def test_access_log_line_per_request(app_server):
    cases = [("GET", "/health", 200), ("GET", f"/no/such/{uuid.uuid4().hex}", 404),
             ("DELETE", "/health", 405)]
    for method, path, status in cases:
        rid = unique_id("log")
        resp = requests.request(method, app_server.url + path, timeout=TIMEOUT,
                                headers={"X-Request-Id": rid})
        expect(resp, status)
        line = app_server.wait_for_stderr(rid)
        for part in (method, path, str(status)):
            assert part in line, f"access log line lacks {part!r}: {line!r}"
        assert len(app_server.stderr_lines(rid)) == 1, \
            f"expected one log line for {rid}: {app_server.stderr_lines(rid)}"


@pytest.mark.parametrize("project", project_params)
def test_trace_shows_the_request_flow(start_server, project):
    server = start_server(project.script, "--trace")
    rid = unique_id("trace")
    expect(get(server, "/health", headers={"X-Request-Id": rid}), 200)
    server.wait_for_stderr(rid)
    deadline = time.monotonic() + 5
    while len(server.stderr_lines(rid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = server.stderr_lines(rid)
    assert len(lines) >= 2, f"--trace: the request id should be in the access log and in the " \
                            f"trace; stderr:\n{server.stderr_text()[-2000:]}"
    assert len(server.stderr_text().strip().splitlines()) > 2, \
        f"--trace printed no flow:\n{server.stderr_text()[-2000:]}"


def test_access_log_names_a_fresh_id(app_server):
    resp = expect(get(app_server, "/health", headers={"X-Request-Id": "x" * 200}), 200)
    fresh = resp.headers["X-Request-Id"]
    line = app_server.wait_for_stderr(fresh)
    assert "/health" in line and "200" in line, line


# --------------------------------------------------------------------------------------------
# The wire: framing, keep-alive, pipelining, HEAD


def test_responses_carry_content_length_and_request_id(wire_server):
    for target, status in (("/health", 200), ("/", 200), ("/openapi.json", 200),
                           (f"/no/such/{uuid.uuid4().hex}", 404)):
        with RawConnection(wire_server.host, wire_server.port) as conn:
            conn.send(request_bytes("GET", target, {"Connection": "close"}))
            resp = conn.read_response()
        assert resp.status == status, f"GET {target} → {resp.status}"
        assert_content_length(resp)
        assert resp.header("X-Request-Id"), f"GET {target}: no X-Request-Id"
        assert "chunked" not in (resp.header("Transfer-Encoding") or "")


@pytest.mark.parametrize("path", ["/health", "/openapi.json"])
def test_head_has_the_headers_of_get_and_no_body(wire_server, path):
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(request_bytes("GET", path))
        get_resp = conn.read_response()
        conn.send(request_bytes("HEAD", path))
        head_resp = conn.read_response(head=True)
        # If HEAD sent body bytes, they would be read as the start of this next response.
        conn.send(request_bytes("GET", "/health", {"X-Request-Id": "after-head"}))
        after = conn.read_response()
    assert get_resp.status == head_resp.status == 200
    assert head_resp.header("Content-Length"), f"HEAD {path} has no Content-Length"
    if path != "/health":  # /health may carry a changing uptime, so its length can move
        assert head_resp.header("Content-Length") == get_resp.header("Content-Length"), \
            f"HEAD {path}: Content-Length differs from GET's"
    assert head_resp.header("Content-Type") == get_resp.header("Content-Type")
    ignore = {"date", "x-request-id"}
    assert head_resp.header_names - ignore == get_resp.header_names - ignore
    assert after.status == 200 and after.header("X-Request-Id") == "after-head", \
        f"the response after HEAD is garbled: {after.raw[:300]!r}"


def test_head_sends_no_body_before_close(wire_server):
    data = raw_exchange(wire_server.host, wire_server.port,
                        request_bytes("HEAD", "/health", {"Connection": "close"}))
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    assert sep and rest == b"", f"HEAD answered with {len(rest)} body bytes: {rest[:100]!r}"
    assert b"\r\ncontent-length: " in head.lower(), f"HEAD without Content-Length: {head!r}"


def test_keep_alive_serves_two_requests_on_one_connection(wire_server):
    with RawConnection(wire_server.host, wire_server.port) as conn:
        for n in range(2):
            conn.send(request_bytes("GET", "/health", {"X-Request-Id": f"ka-{n}"}))
            resp = conn.read_response()
            assert resp.status == 200 and resp.header("X-Request-Id") == f"ka-{n}"
            assert (resp.header("Connection") or "").lower() != "close"
        assert not conn.closed_by_peer


def test_connection_close_is_honoured(wire_server):
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(request_bytes("GET", "/health", {"Connection": "close"}))
        resp = conn.read_response()
        assert resp.status == 200
        rest = conn.read_until_closed(timeout=3)
    assert rest == b"", f"bytes after the response: {rest[:200]!r}"


def test_pipelined_requests_are_answered_in_order(wire_server):
    batch = (request_bytes("GET", "/health", {"X-Request-Id": "pipe-1"})
             + request_bytes("HEAD", "/health", {"X-Request-Id": "pipe-2"})
             + request_bytes("GET", "/no/such/route", {"X-Request-Id": "pipe-3"})
             + request_bytes("GET", "/health", {"X-Request-Id": "pipe-4", "Connection": "close"}))
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(batch)
        got = [conn.read_response(head=(n == 1)) for n in range(4)]
        rest = conn.read_until_closed(timeout=3)
    assert [(r.status, r.header("X-Request-Id")) for r in got] == [
        (200, "pipe-1"), (200, "pipe-2"), (404, "pipe-3"), (200, "pipe-4")]
    assert rest == b""


# --------------------------------------------------------------------------------------------
# The wire: smuggling, chunked, limits, garbage


def test_content_length_with_transfer_encoding_is_a_400(wire_server):
    raw = (b"POST /health HTTP/1.1\r\nHost: test.invalid\r\nContent-Length: 5\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
        assert_problem_bytes(resp, 400)
        # The framing is ambiguous, so nothing after it can be trusted: the server must close.
        assert conn.is_closed(timeout=3), "the connection stays open after a smuggling attempt"
    assert_still_serving(wire_server)


def test_malformed_chunked_body_is_a_4xx(wire_server):
    path = first_post_path(openapi_doc(wire_server)) or "/health"
    raw = (f"POST {path} HTTP/1.1\r\nHost: test.invalid\r\nContent-Type: application/json\r\n"
           f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() \
        + b"zz\r\n{}\r\n0\r\n\r\n"
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
    assert 400 <= resp.status < 500, f"POST {path} with a bad chunk size → {resp.status}"
    assert b"Traceback" not in resp.body
    assert resp.header("X-Request-Id")
    assert_still_serving(wire_server)


def _exchange_expect_problem(server, raw, status):
    with RawConnection(server.host, server.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
    assert_problem_bytes(resp, status)
    assert_still_serving(server)


def test_request_line_over_8k_is_a_414(wire_server):
    raw = request_bytes("GET", "/" + "a" * (9 * 1024), {"Connection": "close"})
    _exchange_expect_problem(wire_server, raw, 414)


def test_request_line_under_the_limit_is_routed(wire_server):
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(request_bytes("GET", "/" + "a" * 4000, {"Connection": "close"}))
        assert conn.read_response().status == 404


def test_header_line_over_8k_is_a_431(wire_server):
    raw = request_bytes("GET", "/health", {"Connection": "close", "X-Big": "b" * (9 * 1024)})
    _exchange_expect_problem(wire_server, raw, 431)


def test_more_than_100_header_lines_is_a_431(wire_server):
    headers = [("Connection", "close")] + [(f"X-H{n}", "v") for n in range(100)]  # + Host: 102
    _exchange_expect_problem(wire_server, request_bytes("GET", "/health", headers), 431)


def test_headers_within_the_limits_are_accepted(wire_server):
    headers = [("Connection", "close"), ("X-Big", "b" * 4000)] + \
              [(f"X-H{n}", "v") for n in range(80)]
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(request_bytes("GET", "/health", headers))
        assert conn.read_response().status == 200


GARBAGE = [
    pytest.param(b"HELLO\r\n\r\n", id="one-word"),
    pytest.param(b"GET /\r\n\r\n", id="http-0.9"),
    pytest.param(b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", id="four-words"),
    pytest.param(b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n", id="nul-in-method"),
    pytest.param(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", id="non-ascii-target"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", id="header-no-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 id="content-length-abc"),
    pytest.param(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                 id="content-length-negative"),
    pytest.param(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                 b"Content-Length: 2\r\n\r\nab", id="content-length-twice"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32))
                 + b"\r\n\r\n", id="tls-hello"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_is_a_400_and_the_server_keeps_serving(wire_server, garbage):
    _exchange_expect_problem(wire_server, garbage, 400)


# --------------------------------------------------------------------------------------------
# Slow and idle clients


@pytest.mark.parametrize("project, transport", transport_params)
def test_idle_client_is_dropped_and_does_not_block_others(start_server, project, transport):
    server = start_server(project.script, "--server", transport, "--idle-timeout", "1")
    started = time.monotonic()
    silent = RawConnection(server.host, server.port)           # A: connects, sends nothing
    half = RawConnection(server.host, server.port)             # C: half a request head
    half.send(b"GET /health HTTP/1.1\r\nHost: test.invalid\r\n")
    idle = RawConnection(server.host, server.port)             # D: one request, then idle
    try:
        idle.send(request_bytes("GET", "/health"))
        assert idle.read_response(timeout=2).status == 200
        with RawConnection(server.host, server.port) as other:  # B is served meanwhile
            other.send(request_bytes("GET", "/health", {"Connection": "close"}))
            assert other.read_response(timeout=2).status == 200, "B waited for A/C"
        for name, conn in (("silent", silent), ("idle keep-alive", idle)):
            got = conn.read_until_closed(timeout=6)
            elapsed = time.monotonic() - started
            assert got == b"" or got.startswith(b"HTTP/1.1 408"), f"{name}: sent {got[:200]!r}"
            assert elapsed >= 0.5, f"{name} connection closed after {elapsed:.2f} s, before " \
                                   f"--idle-timeout 1"
    finally:
        for conn in (silent, half, idle):
            conn.close()


@pytest.mark.parametrize("project, transport", transport_params)
def test_connection_over_the_limit_gets_503_and_a_freed_slot_serves_again(
        start_server, project, transport):
    server = start_server(project.script, "--server", transport, "--max-connections", "2")
    held = [RawConnection(server.host, server.port) for _ in range(2)]
    try:
        for conn in held:  # a served request proves the server counts the connection
            conn.send(request_bytes("GET", "/health"))
            assert conn.read_response(timeout=2).status == 200
        with RawConnection(server.host, server.port) as third:
            third.send(request_bytes("GET", "/health"))
            refused = third.read_response(timeout=2)
            assert refused.status == 503, refused
            assert refused.header("Retry-After") == "1"
            assert refused.json()["status"] == 503
            assert third.read_until_closed(timeout=3) == b""
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close asynchronously: poll with a deadline
            with RawConnection(server.host, server.port) as fourth:
                fourth.send(request_bytes("GET", "/health", {"Connection": "close"}))
                status = fourth.read_response(timeout=2).status
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200, "a freed connection slot was not given to a new client"
    finally:
        for conn in held:
            conn.close()


# --------------------------------------------------------------------------------------------
# Command line: bad flags, unusable port or db


@pytest.mark.parametrize("args", [
    pytest.param(["--no-such-flag"], id="unknown-flag"),
    pytest.param(["--port", "not-a-port"], id="port-not-a-number"),
    pytest.param(["--server", "bogus"], id="bad-server"),
    pytest.param(["--idle-timeout", "soon"], id="bad-idle-timeout"),
])
@pytest.mark.parametrize("project", project_params)
def test_bad_flags_exit_2_with_usage(project, args):
    done = run_once(project.script, *args)
    assert done.returncode == 2, f"{project.script} {' '.join(args)} → exit {done.returncode}" \
                                 f"\n{done.stderr}"
    assert "usage" in done.stderr.lower(), f"no usage line on stderr: {done.stderr!r}"
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening on" not in done.stdout


@pytest.mark.parametrize("project", project_params)
def test_port_in_use_exits_2(project, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", port]
        if takes_db(project.script):
            args += ["--db", tmp_path / "db.sqlite3"]
        done = run_once(project.script, *args)
    assert done.returncode == 2, f"port {port} in use → exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening on" not in done.stdout
    assert done.stderr.strip(), "no error message on stderr"


@pytest.mark.parametrize("where", ["proc", "directory"])
@pytest.mark.parametrize("project", project_params)
def test_unusable_db_exits_2(project, where, tmp_path):
    if not takes_db(project.script):
        pytest.skip(f"{project.name} takes no --db")
    db = "/proc/contract-check/db.sqlite3" if where == "proc" else tmp_path
    done = run_once(project.script, "--port", "0", "--db", db)
    assert done.returncode == 2, f"--db {db} → exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening on" not in done.stdout
    assert done.stderr.strip(), "no error message on stderr"


# --------------------------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize("project, transport", transport_params)
def test_sigint_exits_0(start_server, project, transport):
    server = start_server(project.script, "--server", transport)
    expect(get(server, "/health"), 200)
    server.stop(signal.SIGINT)
    assert "Traceback" not in server.stderr_text(), server.stderr_text()[-2000:]
    assert server.stdout_text() == "", "stdout after the `listening on` line: " \
                                       f"{server.stdout_text()!r}"


@pytest.mark.parametrize("project, transport", transport_params)
def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(start_server, project,
                                                                   transport):
    server = start_server(project.script, "--server", transport)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
        took = server.stop(signal.SIGTERM, timeout=5)
        assert conn.is_closed(timeout=2), "the idle connection survived the server"
    assert took < 5
    assert "Traceback" not in server.stderr_text(), server.stderr_text()[-2000:]
    assert server.stdout_text() == "", "stdout after the `listening on` line: " \
                                       f"{server.stdout_text()!r}"
