"""level01/health_check.py, black-box: /health, /health/live, /health/ready (spec/level01.md §1).

Readiness is broken for real, the way it breaks in production, never through a debug flag:
the sqlite file is moved away or replaced with garbage, a second connection holds sqlite's
write lock (the "slow dependency"), or `--min-free-mb` asks for more room than any disk has.
Rules whose point is the transport (timeouts, draining, HEAD on the wire, not stalling other
requests) run on both `--server threaded` and `--server asyncio`.
"""
import calendar
import concurrent.futures
import contextlib
import os
import re
import signal
import sqlite3
import time

import pytest
import requests

from tests.harness import RawConnection, expect, expect_json, expect_problem, request_bytes, run_once

SCRIPT = "level01/health_check.py"
TRANSPORTS = ("threaded", "asyncio")
TIMEOUT = 5    # s, for every single request
PROMPT = 1.5   # s: "answers within ~1 s", with the default 0.5 s check timeout
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
HEALTH_PATHS = ("/health", "/health/live", "/health/ready")


def get(server, path, **kw):
    kw.setdefault("timeout", TIMEOUT)
    return requests.get(server.url + path, **kw)


def timed_get(server, path):
    started = time.monotonic()
    resp = get(server, path)
    return resp, time.monotonic() - started


def poll(condition, timeout=5.0, what="the condition"):
    """Call `condition()` until it returns something other than None or False; return that, or
    fail at the deadline. (Not truthiness: a `requests` response with a 4xx/5xx is falsy.)"""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def expect_not_ready(resp, *failing):
    """A 503 problem whose `checks` marks exactly `failing` as not ok and whose detail names
    them; no cache may keep it. Returns the problem."""
    problem = expect_problem(resp, 503)
    assert resp.headers.get("Retry-After", "").isdigit(), resp.headers
    assert resp.headers.get("Cache-Control") == "no-store", resp.headers
    checks = problem.get("checks")
    assert isinstance(checks, dict), problem
    assert {name for name, result in checks.items() if result != "ok"} == set(failing), problem
    for name in failing:
        assert name in problem["detail"], problem
    return problem


@contextlib.contextmanager
def write_lock(db_path):
    """Hold sqlite's write lock from another connection, as a migration or a backup would."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.close()  # rolls back and releases the lock


def wait_for_exit(server, timeout=10.0):
    """The server stops by itself (after --shutdown-delay and the drain): its exit status."""
    code = server.proc.wait(timeout=timeout)
    server.stopped, server.returncode = True, code  # teardown must not signal it again
    return code


@pytest.fixture(scope="module")
def shared(start_server_module):
    """One untouched server for the read-only tests."""
    return start_server_module(SCRIPT)


# --------------------------------------------------------------------------------------------
# GET /health


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_reports_status_uptime_version_and_start(start_server, transport):
    before = int(time.time())
    server = start_server(SCRIPT, "--server", transport)
    resp = get(server, "/health")
    body = expect_json(resp, 200)
    assert body["status"] == "ok"
    assert isinstance(body["uptime_s"], (int, float)) and not isinstance(body["uptime_s"], bool)
    assert 0 <= body["uptime_s"] < time.time() - before + 1
    assert isinstance(body["version"], str) and body["version"]
    assert RFC3339_UTC.fullmatch(body["started_at"]), body
    started = calendar.timegm(time.strptime(body["started_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert before - 1 <= started <= time.time() + 1, body
    assert resp.headers["Cache-Control"] == "no-store"


def test_uptime_grows_and_start_time_stays(shared):
    first = expect_json(get(shared, "/health"), 200)

    def grown():
        body = expect_json(get(shared, "/health"), 200)
        return body if body["uptime_s"] > first["uptime_s"] else None

    later = poll(grown, what="uptime_s growing")
    assert later["started_at"] == first["started_at"]
    assert later["version"] == first["version"]


def test_health_does_not_depend_on_the_database(start_server):
    """/health and /health/live answer 200 with the database gone: liveness must not restart
    every replica because a dependency is down."""
    server = start_server(SCRIPT)
    os.replace(server.db_path, server.db_path.with_name("moved.sqlite3"))
    expect_not_ready(get(server, "/health/ready"), "db")
    assert expect_json(get(server, "/health"), 200)["status"] == "ok"
    expect_json(get(server, "/health/live"), 200)


# --------------------------------------------------------------------------------------------
# GET /health/live and Cache-Control


def test_live(shared):
    resp = get(shared, "/health/live")
    assert expect_json(resp, 200)["status"] == "alive"


@pytest.mark.parametrize("path", HEALTH_PATHS)
def test_every_health_answer_is_no_store(shared, path):
    resp = expect(get(shared, path), 200)
    assert resp.headers.get("Cache-Control") == "no-store", resp.headers


def test_other_routes_may_be_cached(shared):
    """no-store belongs to the health answers, not to the index or the OpenAPI document."""
    assert "Cache-Control" not in expect(get(shared, "/"), 200).headers


# --------------------------------------------------------------------------------------------
# GET /health/ready


def test_ready_runs_every_check(shared):
    resp = get(shared, "/health/ready")
    body = expect_json(resp, 200)
    assert body == {"status": "ready", "checks": {"db": "ok", "disk": "ok"}}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ready_is_503_naming_the_db_when_the_file_is_gone(start_server, transport):
    server = start_server(SCRIPT, "--server", transport)
    expect_json(get(server, "/health/ready"), 200)
    moved = server.db_path.with_name("moved.sqlite3")
    os.replace(server.db_path, moved)
    problem = expect_not_ready(get(server, "/health/ready"), "db")
    assert problem["checks"]["db"].startswith("failed"), problem
    assert problem["checks"]["disk"] == "ok"
    # The check is live, not cached: the file back in place, the server is ready again.
    os.replace(moved, server.db_path)
    assert expect_json(get(server, "/health/ready"), 200)["checks"]["db"] == "ok"


def test_ready_is_503_when_the_file_is_not_a_database(start_server):
    server = start_server(SCRIPT)
    garbage = server.db_path.with_name("garbage")
    garbage.write_bytes(b"this is not a sqlite database\n" * 200)
    os.replace(garbage, server.db_path)
    problem = expect_not_ready(get(server, "/health/ready"), "db")
    assert "not a database" in problem["checks"]["db"], problem


def test_ready_failure_reasons_name_no_path(start_server):
    server = start_server(SCRIPT)
    os.replace(server.db_path, server.db_path.with_name("moved.sqlite3"))
    resp = get(server, "/health/ready")
    expect_not_ready(resp, "db")
    assert str(server.workdir) not in resp.text and "sqlite3" not in resp.text, resp.text


def test_disk_check_fails_below_min_free(start_server):
    server = start_server(SCRIPT, "--min-free-mb", str(10**12))  # an exabyte: no disk has that
    problem = expect_not_ready(get(server, "/health/ready"), "disk")
    assert problem["checks"]["db"] == "ok"
    assert "MiB free" in problem["checks"]["disk"], problem
    assert expect_json(get(server, "/health"), 200)["status"] == "ok"


def test_min_free_mb_0_turns_the_disk_check_off(start_server):
    server = start_server(SCRIPT, "--min-free-mb", "0")
    assert expect_json(get(server, "/health/ready"), 200)["checks"] == {"db": "ok"}


def test_in_memory_database_is_checked_through_its_connection(start_server):
    server = start_server(SCRIPT, "--db", ":memory:")
    assert expect_json(get(server, "/health/ready"), 200)["checks"] == {"db": "ok"}


# --------------------------------------------------------------------------------------------
# A slow check: it counts as failed, and the endpoint stays prompt


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_db_check_times_out_and_the_answer_stays_prompt(start_server, transport):
    server = start_server(SCRIPT, "--server", transport)
    with write_lock(server.db_path):
        resp, elapsed = timed_get(server, "/health/ready")
        problem = expect_not_ready(resp, "db")
        assert problem["checks"]["db"] == "timed out after 0.5 s", problem
        assert problem["checks"]["disk"] == "ok"
        assert elapsed < PROMPT, f"/health/ready took {elapsed:.2f} s"
    # The lock released, the very same check passes again.
    poll(lambda: get(server, "/health/ready").status_code == 200, what="ready again")


def test_check_timeout_flag_sets_the_bound(start_server):
    server = start_server(SCRIPT, "--check-timeout", "0.2")
    with write_lock(server.db_path):
        resp, elapsed = timed_get(server, "/health/ready")
        problem = expect_not_ready(resp, "db")
        assert problem["checks"]["db"] == "timed out after 0.2 s", problem
        assert elapsed < 1.0, f"/health/ready took {elapsed:.2f} s"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_probes_on_a_hung_check_all_answer_promptly(start_server, transport):
    """Probes that pile up on a hung dependency each answer within the timeout."""
    server = start_server(SCRIPT, "--server", transport)
    with write_lock(server.db_path), concurrent.futures.ThreadPoolExecutor(8) as pool:
        for resp, elapsed in pool.map(lambda _: timed_get(server, "/health/ready"), range(8)):
            expect_not_ready(resp, "db")
            assert elapsed < PROMPT + 0.5, f"a probe took {elapsed:.2f} s"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_waiting_probe_does_not_stall_other_requests(start_server, transport):
    """While one readiness probe waits on a hung check, /health is answered at once: the probe
    waits in a worker (the route is `blocking=True`), not on the event loop."""
    server = start_server(SCRIPT, "--server", transport, "--check-timeout", "1.5")
    with write_lock(server.db_path), RawConnection(server.host, server.port) as probe:
        probe.send(request_bytes("GET", "/health/ready"))
        time.sleep(0.2)  # let the probe reach its check; nothing outside the server shows it
        resp, elapsed = timed_get(server, "/health")
        expect_json(resp, 200)
        assert elapsed < 1.0, f"/health took {elapsed:.2f} s behind a waiting readiness probe"
        assert probe.read_response(timeout=TIMEOUT).status == 503


# --------------------------------------------------------------------------------------------
# Shutting down: readiness turns 503 at once, the server keeps serving, then exits 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ready_is_503_while_draining_then_clean_exit(start_server, transport):
    server = start_server(SCRIPT, "--server", transport, "--shutdown-delay", "2")
    expect_json(get(server, "/health/ready"), 200)
    server.send_signal(signal.SIGTERM)

    def not_ready():
        resp = get(server, "/health/ready")
        return resp if resp.status_code == 503 else None

    resp = poll(not_ready, timeout=2, what="/health/ready turning 503 after SIGTERM")
    problem = expect_problem(resp, 503)
    assert "draining" in problem["detail"], problem
    assert resp.headers.get("Retry-After", "").isdigit(), resp.headers
    assert resp.headers.get("Cache-Control") == "no-store", resp.headers
    # Still alive and still serving during the delay: only readiness changed.
    expect_json(get(server, "/health/live"), 200)
    expect_json(get(server, "/health"), 200)
    assert wait_for_exit(server) == 0, server.stderr_text()[-2000:]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigterm_while_a_check_hangs_exits_0_promptly(start_server, transport):
    """A check thread stuck on a dependency does not hold up the shutdown."""
    server = start_server(SCRIPT, "--server", transport)
    with write_lock(server.db_path):
        expect_not_ready(get(server, "/health/ready"), "db")
        seconds = server.stop()  # SIGTERM; asserts exit status 0
    assert seconds < 1.5, f"shutdown took {seconds:.2f} s"


# --------------------------------------------------------------------------------------------
# HEAD, on the wire


@pytest.fixture(scope="module", params=TRANSPORTS)
def wire_server(request, start_server_module):
    """One server per transport, for the wire-level HEAD tests."""
    return start_server_module(SCRIPT, "--server", request.param)


@pytest.mark.parametrize("path", HEALTH_PATHS)
def test_head_has_the_headers_and_no_body(wire_server, path):
    with RawConnection(wire_server.host, wire_server.port) as conn:
        # HEAD then GET on one connection: a body after the HEAD would corrupt the GET's answer.
        conn.send(request_bytes("HEAD", path) + request_bytes("GET", "/health/live"))
        head = conn.read_response(head=True)
        after = conn.read_response()
    assert head.status == 200 and head.body == b""
    assert int(head.header("Content-Length")) > 0
    assert head.header("Content-Type") == "application/json"
    assert head.header("Cache-Control") == "no-store"
    assert after.status == 200 and after.json() == {"status": "alive"}


# --------------------------------------------------------------------------------------------
# Visibility: the log and the trace


def test_check_failures_and_recoveries_are_logged(start_server):
    server = start_server(SCRIPT)
    moved = server.db_path.with_name("moved.sqlite3")
    os.replace(server.db_path, moved)
    expect_not_ready(get(server, "/health/ready"), "db")
    server.wait_for_stderr("readiness check db: failed")
    os.replace(moved, server.db_path)
    expect_json(get(server, "/health/ready"), 200)
    server.wait_for_stderr("readiness check db: ok")


def test_trace_shows_each_check(start_server):
    server = start_server(SCRIPT, "--trace")
    expect_json(get(server, "/health/ready"), 200)
    server.wait_for_stderr("check db: ok")
    server.wait_for_stderr("check disk: ok")


def trace_block(server, request_id):
    """The `--trace` block of one request: its lines after `trace <id> …`, once it has closed."""
    server.wait_for_stderr(re.compile(rf"^trace {re.escape(request_id)} "))
    lines = server.stderr_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"trace {request_id} "))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        block.append(line.strip())
    assert any("← assign_request_id" in line for line in block), block
    return block


@pytest.mark.parametrize("db, statements", [
    ("file", ["SQL BEGIN IMMEDIATE", "SQL SELECT count(*) FROM sqlite_master", "SQL ROLLBACK"]),
    (":memory:", ["SQL SELECT count(*) FROM sqlite_master"]),
])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_trace_shows_the_sql_the_readiness_probe_ran(start_server, transport, db, statements):
    """common.md: the trace shows every SQL statement the request ran, the db check's too,
    although it runs on a thread (and, for a file, a connection) of its own."""
    args = ["--db", ":memory:"] if db == ":memory:" else []
    server = start_server(SCRIPT, "--trace", "--server", transport, *args)
    expect_json(get(server, "/health/ready", headers={"X-Request-Id": "ready-sql-1"}), 200)
    block = trace_block(server, "ready-sql-1")
    steps = [next((n for n, line in enumerate(block) if text in line), None)
             for text in ["→ handler readiness", *statements, "check db: ok"]]
    assert None not in steps and steps == sorted(steps), "\n".join(block)


def test_openapi_documents_the_503(shared):
    doc = expect_json(get(shared, "/openapi.json"), 200)
    assert "503" in doc["paths"]["/health/ready"]["get"]["responses"]


# --------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("args", [("--check-timeout", "0"), ("--check-timeout", "-1"),
                                  ("--check-timeout", "soon"), ("--check-timeout", "61"),
                                  ("--min-free-mb", "-5"), ("--min-free-mb", "lots")])
def test_bad_check_flags_exit_2(args):
    done = run_once(SCRIPT, "--port", "0", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert args[0] in done.stderr and "Traceback" not in done.stderr
