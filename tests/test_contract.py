"""The common contract (spec/common.md, "Running" and "HTTP behaviour"), checked black-box on
every project that exists, so each new project is held to it for free.

Only the rules that depend on a project run here, one server per project on the default
transport: /health, /, /openapi.json, problem details, X-Request-Id, the access log and the
trace, JSON bodies on every route that takes one, flags and exit statuses, signals. The wire
rules (framing, keep-alive, pipelining, limits, smuggling, garbage, timeouts, the connection
limit) belong to lib's transports and run once per transport on a test application
(tests/lib/test_wire.py). user_service is skipped: it cannot run without auth_service, and its
own tests start both.
"""
import json
import re
import signal
import socket
import time
import uuid

import pytest
import requests

from tests.harness import (RawConnection, ServerGroup, assert_quiet_exit,
                           assert_sigterm_closes_an_idle_connection, assert_still_serving,
                           describe_exchange, expect, expect_json, expect_problem, request_bytes,
                           request_schemas, run_once, takes_db)
from tests.projects import NOT_STANDALONE, existing_projects

PROJECTS = [p for p in existing_projects() if p.name not in NOT_STANDALONE]
TIMEOUT = 5  # s, for every single request

project_params = [pytest.param(p, id=p.name) for p in PROJECTS]

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
# JSON bodies: a lone surrogate (issue 11, item 1)


LONE_SURROGATE = "\\ud800"  # the JSON escape, six characters: any decoded string can hold one


def json_routes(server):
    """(METHOD, concrete path, schema) for every route whose OpenAPI entry takes a JSON body."""
    return [(method, re.sub(r"\{[^}/]*\}", "contract1", path), schema)
            for (method, path), schema in request_schemas(requests.get, server.url).items()]


def string_fields(schema):
    return [name for name, field in (schema.get("properties") or {}).items()
            if "string" in ([field.get("type")] if isinstance(field.get("type"), str)
                            else field.get("type") or [])]


def assert_json_answer(resp, what):
    assert resp.status_code < 500, f"{what} → {resp.status_code}\n" + describe_exchange(resp)
    if resp.status_code in (204, 304) and not resp.content:
        return
    try:
        json.loads(resp.content.decode("utf-8"))
    except ValueError as error:
        raise AssertionError(f"{what}: the answer is not UTF-8 JSON ({error})\n"
                             + describe_exchange(resp)) from None


def test_a_lone_surrogate_in_a_json_body_is_answered_in_json(app_server):
    """`{"\\ud800": 1}` as a field name, and as the value of each string field in turn, on
    every JSON route: refused or stored, never a 500, and the answer is valid UTF-8 JSON."""
    routes = json_routes(app_server)
    if not routes:
        pytest.skip("no route takes a JSON body")
    headers = {"Content-Type": "application/json", "X-User-Id": "contract"}
    for method, path, schema in routes:
        bodies = [("a field name", '{"%s": 1}' % LONE_SURROGATE)]
        bodies += [(f"field {name!r}", '{"%s": "a%sb"}' % (name, LONE_SURROGATE))
                   for name in string_fields(schema)]
        for where, body in bodies:
            resp = requests.request(method, app_server.url + path, data=body.encode(),
                                    headers=headers, timeout=TIMEOUT)
            assert_json_answer(resp, f"{method} {path} with a lone surrogate in {where}")
    assert_still_serving(app_server)


# --------------------------------------------------------------------------------------------
# Control characters a client sends do not reach the log raw (issue 11, item 4)


FORGED_LINE = "2026-01-01T00:00:00Z 127.0.0.1 DELETE /x 204"
FORGING_PATH = "/health%0d%0a" + FORGED_LINE.replace(" ", "%20") + "%1b[2J%00"
ESCAPED_FORMS = ("%0d%0a", "\\r\\n", "\\x0d\\x0a", "\\u000d\\u000a")


def assert_no_forged_line(server, rid):
    text = server.stderr_text()
    forged = [line for line in text.splitlines() if line.lstrip().startswith(FORGED_LINE)]
    assert not forged, f"a client forged a log line through the path: {forged!r}"
    for char, name in (("\r", "CR"), ("\x1b", "ESC"), ("\x00", "NUL")):
        assert char not in text, f"stderr holds a raw {name} the client sent: " \
                                 f"{[line for line in text.splitlines() if char in line][:3]!r}"
    lines = server.stderr_lines(rid)
    assert lines, f"no stderr line names the request id {rid}:\n{text[-1500:]}"
    for line in lines:
        if FORGED_LINE.split()[-2] in line:  # the line that shows the path
            assert any(form in line.lower() for form in ESCAPED_FORMS), \
                f"the path's CR LF is not shown escaped: {line!r}"
    return lines


def _send_forging_request(server, rid):
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", FORGING_PATH, {"X-Request-Id": rid,
                                                      "Connection": "close"}))
        resp = conn.read_response()
    assert resp.status < 500, resp.raw[:300]
    server.wait_for_stderr(rid)


def test_a_path_with_control_characters_cannot_forge_an_access_log_line(app_server):
    rid = unique_id("forge")
    _send_forging_request(app_server, rid)
    assert_no_forged_line(app_server, rid)


@pytest.mark.parametrize("project", project_params)
def test_a_path_with_control_characters_cannot_forge_a_trace_line(start_server, project):
    server = start_server(project.script, "--trace")
    rid = unique_id("forge")
    _send_forging_request(server, rid)
    deadline = time.monotonic() + 5
    while len(server.stderr_lines(rid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the trace and the access line are written after the answer
    lines = assert_no_forged_line(server, rid)
    assert any(line.startswith(f"trace {rid} ") for line in lines), \
        f"no trace header for {rid}: {lines!r}"


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


@pytest.mark.parametrize("project", project_params)
def test_sigint_exits_0(start_server, project):
    server = start_server(project.script)
    expect(get(server, "/health"), 200)
    server.stop(signal.SIGINT)
    assert_quiet_exit(server)


@pytest.mark.parametrize("project", project_params)
def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(start_server, project):
    server = start_server(project.script)
    assert_sigterm_closes_an_idle_connection(server)
