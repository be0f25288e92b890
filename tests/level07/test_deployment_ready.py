"""level07/deployment_ready.py, black-box: configuration from the environment and flags, every
problem reported before the port opens (exit 2), `--check-config`, the secret never logged;
the probes, readiness 503 while draining, without the database, with a migration missing;
migrations applied once by processes starting together, checksums; JSON log lines and request
ids; Prometheus metrics read by `prometheus_client`'s own parser; security headers, the
request deadline, body limits; SIGTERM with a request in flight; the notes API with signed
cursors; and the shipping files (the Dockerfile's image contents run for real, the systemd
unit through `systemd-analyze verify`, the env example through `--check-config`).
"""
import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.harness import ROOT, clean_env, expect, expect_json, expect_problem

SCRIPT = "level07/deployment_ready.py"
TIMEOUT = 10
MIGRATIONS = ROOT / "level07" / "deployment_ready_migrations"
SECRET = "s3cret-" + "k" * 40  # 47 characters: valid, and easy to search for in a log
VARIABLES = {"PORT", "HOST", "DATABASE_PATH", "LOG_LEVEL", "LOG_FORMAT", "APP_ENV", "SECRET_KEY",
             "SHUTDOWN_GRACE_S", "REQUEST_TIMEOUT_S"}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
PRODUCTION = {"APP_ENV": "production", "SECRET_KEY": SECRET}


def run(*args, env=None, cwd=None, timeout=20):
    """The server run to completion (a config check, or a refusal to start)."""
    return subprocess.run([sys.executable, str(ROOT / SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=clean_env(env),
                          cwd=cwd or ROOT, stdin=subprocess.DEVNULL)


def config_errors(done):
    return [line for line in done.stderr.splitlines() if line.startswith("config error: ")]


def wait_exit(server, timeout=15):
    """After a SIGTERM the test sent itself: the exit status, recorded so teardown does not
    signal again (a second signal exits at once, with status 1)."""
    code = server.proc.wait(timeout=timeout)
    server.stopped, server.returncode = True, code
    return code


def new_note(server, title="a note", **fields):
    resp = requests.post(server.url + "/notes", json={"title": title, **fields}, timeout=TIMEOUT)
    return expect_json(resp, 201)


def json_lines(server):
    return [json.loads(line) for line in server.stderr_text().splitlines() if line.strip()]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refuses_connections(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


# --------------------------------------------------------------------------------------------
# Configuration


def test_every_bad_setting_is_named_on_its_own_line(tmp_path):
    done = run(env={"PORT": "eighty", "HOST": "not a host!", "DATABASE_PATH": str(tmp_path),
                    "LOG_LEVEL": "loud", "LOG_FORMAT": "xml", "APP_ENV": "staging",
                    "SHUTDOWN_GRACE_S": "-1", "REQUEST_TIMEOUT_S": "0"})
    assert done.returncode == 2, done.stderr
    errors = config_errors(done)
    assert len(errors) == 8, done.stderr
    for variable in VARIABLES - {"SECRET_KEY"}:
        assert any(line.startswith(f"config error: {variable}") for line in errors), \
            (variable, done.stderr)
    assert "listening on" not in done.stdout and "Traceback" not in done.stderr


def test_the_config_is_checked_before_the_port_and_the_database_are_touched(tmp_path):
    """The port is taken and the database folder missing: had the server bound the port or
    opened the database first, that is what it would report (or make)."""
    db = tmp_path / "not-yet" / "db.sqlite3"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run(env={"PORT": str(taken.getsockname()[1]), "DATABASE_PATH": str(db),
                        "LOG_LEVEL": "loud"})
    assert done.returncode == 2
    assert [line.split(":")[1].strip() for line in config_errors(done)] == ["LOG_LEVEL"]
    assert "cannot listen" not in done.stderr, done.stderr
    assert not db.parent.exists()


def test_a_flag_error_is_argparse_usage_and_exit_2():
    done = run("--log-format", "xml")
    assert done.returncode == 2 and "usage" in done.stderr.lower(), done.stderr
    assert "listening on" not in done.stdout


def test_production_requires_a_long_secret_and_never_quotes_it():
    missing = run("--check-config", env={"APP_ENV": "production"})
    assert missing.returncode == 2
    assert [line for line in config_errors(missing) if line.startswith("config error: SECRET_KEY")]
    short = "tooshort-4f1c"
    done = run("--check-config", env={"APP_ENV": "production", "SECRET_KEY": short})
    assert done.returncode == 2
    assert any("SECRET_KEY" in line and "32" in line for line in config_errors(done)), done.stderr
    assert short not in done.stderr + done.stdout
    development = run("--check-config", env={"APP_ENV": "development"})
    assert development.returncode == 0, development.stderr


def test_the_request_timeout_may_not_outlast_the_shutdown_grace():
    done = run("--check-config", env={"SHUTDOWN_GRACE_S": "2", "REQUEST_TIMEOUT_S": "3"})
    assert done.returncode == 2
    assert any(line.startswith("config error: REQUEST_TIMEOUT_S") and "SHUTDOWN_GRACE_S" in line
               for line in config_errors(done)), done.stderr
    equal = run("--check-config", env={"SHUTDOWN_GRACE_S": "3", "REQUEST_TIMEOUT_S": "3"})
    assert equal.returncode == 0, equal.stderr


def test_check_config_prints_the_redacted_config_and_touches_nothing(tmp_path):
    db = tmp_path / "sub" / "db.sqlite3"
    done = run("--check-config", "--port", "9123",
               env={**PRODUCTION, "DATABASE_PATH": str(db), "PORT": "8123"})
    assert done.returncode == 0, done.stderr
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert shown["PORT"] == "9123" and shown["APP_ENV"] == "production"
    assert shown["DATABASE_PATH"] == str(db) and shown["SECRET_KEY"] == "[redacted]"
    assert SECRET not in done.stdout + done.stderr
    assert not db.parent.exists(), "--check-config made the database folder"


def test_flags_override_the_environment(start_server):
    # The environment says: a bad port, text logs, production; the flags say otherwise.
    server = start_server(SCRIPT, "--log-format", "json", "--app-env", "development",
                          env={"PORT": "not-a-port", "LOG_FORMAT": "text", **PRODUCTION})
    expect_json(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)
    expect(requests.get(server.url + "/debug/sleep?s=0", timeout=TIMEOUT), 200)  # development
    assert json_lines(server)  # every line is JSON


def test_the_environment_configures_port_database_and_logs(tmp_path):
    port = free_port()
    db = tmp_path / "from-env.sqlite3"
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=tmp_path,
                            env=clean_env({"PORT": str(port), "DATABASE_PATH": str(db),
                                           "LOG_FORMAT": "json", **PRODUCTION}))
    try:
        line = proc.stdout.readline().decode()
        assert line == f"listening on http://127.0.0.1:{port}\n", (line, proc.stderr.read1(4000))
        expect_json(requests.get(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT), 200)
        assert db.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    config = next(entry for entry in map(json.loads, proc.stderr.read().decode().splitlines())
                  if entry["msg"] == "config")
    assert config["port"] == port and config["database_path"] == str(db)
    assert config["app_env"] == "production" and config["secret_key"] == "[redacted]"


def test_the_secret_appears_in_no_log_and_no_answer(start_server):
    server = start_server(SCRIPT, "--trace", env={**PRODUCTION, "LOG_LEVEL": "debug",
                                                  "LOG_FORMAT": "json"})
    bodies = []
    for method, path, body in [("GET", "/", None), ("GET", "/openapi.json", None),
                               ("GET", "/health", None), ("GET", "/readyz", None),
                               ("GET", "/metrics", None), ("POST", "/notes", {"title": "x"}),
                               ("POST", "/notes", {"id": 5}), ("GET", "/notes?cursor=forged", None),
                               ("GET", "/debug/sleep", None)]:
        bodies.append(requests.request(method, server.url + path, json=body, timeout=TIMEOUT).text)
    config = next(json.loads(line) for line in server.stderr_lines('"msg": "config"'))
    assert config["secret_key"] == "[redacted]"
    server.stop()
    assert SECRET not in server.stderr_text() + server.stdout_text()
    assert not any(SECRET in body for body in bodies)


# --------------------------------------------------------------------------------------------
# Probes


def test_probes_answer_ready_on_a_fresh_server(server):
    live = expect(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)
    assert live.json() == {"status": "alive"} and live.headers["Cache-Control"] == "no-store"
    ready = expect_json(requests.get(server.url + "/readyz", timeout=TIMEOUT), 200)
    assert ready["status"] == "ready"
    assert ready["checks"]["db"] == "ok" and ready["checks"]["migrations"] == "ok"
    health = expect_json(requests.get(server.url + "/health", timeout=TIMEOUT), 200)
    assert health["status"] == "ok" and health["live"] and health["ready"]
    assert health["draining"] is False
    assert health["migrations"] == {"known": sorted(p.name for p in MIGRATIONS.glob("*.sql")),
                                    "pending": []}


def test_readiness_fails_while_a_migration_is_missing(start_server):
    server = start_server(SCRIPT)
    with sqlite3.connect(server.db_path) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    problem = expect_problem(requests.get(server.url + "/readyz", timeout=TIMEOUT), 503)
    assert "0002_" in problem["checks"]["migrations"] and problem["checks"]["db"] == "ok"
    assert "Retry-After" in requests.get(server.url + "/readyz", timeout=TIMEOUT).headers
    health = expect_problem(requests.get(server.url + "/health", timeout=TIMEOUT), 503)
    assert health["ready"] is False and health["live"] is True
    assert health["migrations"]["pending"] == ["0002_notes_by_recency.sql"]
    expect(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)


def test_readiness_fails_when_the_database_is_gone(start_server):
    server = start_server(SCRIPT)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{server.db_path}{suffix}").unlink(missing_ok=True)
    problem = expect_problem(requests.get(server.url + "/readyz", timeout=TIMEOUT), 503)
    assert problem["checks"]["db"] != "ok", problem
    expect(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)


def test_draining_turns_readiness_503_at_once_while_liveness_stays(start_server):
    # --shutdown-delay keeps the listener open after SIGTERM, as a load balancer needs to
    # notice the 503; without it the listener closes at once (the next test).
    server = start_server(SCRIPT, "--shutdown-delay", "8")
    expect_json(requests.get(server.url + "/readyz", timeout=TIMEOUT), 200)
    server.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (status := requests.get(server.url + "/readyz", timeout=TIMEOUT).status_code) == 200:
        assert time.monotonic() < deadline, "readiness still 200 after SIGTERM"
        time.sleep(0.02)
    assert status == 503  # within the delay: the listener is still open
    problem = expect_problem(requests.get(server.url + "/readyz", timeout=TIMEOUT), 503)
    assert "draining" in problem["detail"]
    health = expect_problem(requests.get(server.url + "/health", timeout=TIMEOUT), 503)
    assert health["draining"] is True and health["live"] is True
    expect(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)
    assert wait_exit(server, timeout=25) == 0


# --------------------------------------------------------------------------------------------
# Graceful shutdown and the request deadline


def sleep_in_background(server, seconds, request_id):
    """GET /debug/sleep on a thread; returns the future of its response, once the server has
    logged that the handler started (LOG_LEVEL=debug)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(requests.get, f"{server.url}/debug/sleep?s={seconds}",
                         headers={"X-Request-Id": request_id}, timeout=60)
    pool.shutdown(wait=False)
    server.wait_for_stderr(re.compile(rf"debug sleep .*{request_id}"), timeout=10)
    return future


def test_sigterm_lets_the_request_in_flight_finish_and_stops_listening(start_server):
    server = start_server(SCRIPT, env={"LOG_LEVEL": "debug", "SHUTDOWN_GRACE_S": "20",
                                       "REQUEST_TIMEOUT_S": "20"})
    in_flight = sleep_in_background(server, 4, "in-flight-1")
    server.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not refuses_connections(server.host, server.port):
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.02)
    assert not in_flight.done(), "the slow request ended before the listener closed"
    resp = in_flight.result(timeout=30)
    assert expect_json(resp, 200) == {"slept_s": 4}
    assert wait_exit(server) == 0
    assert server.stderr_lines("in-flight-1")


def test_a_handler_stuck_past_the_grace_gets_its_503_and_the_exit_is_clean(start_server):
    server = start_server(SCRIPT, env={"LOG_LEVEL": "debug", "SHUTDOWN_GRACE_S": "2",
                                       "REQUEST_TIMEOUT_S": "1"})
    in_flight = sleep_in_background(server, 60, "stuck-1")
    server.send_signal(signal.SIGTERM)
    expect_problem(in_flight.result(timeout=30), 503)
    # The sleeping handler cannot be stopped from outside; it must not hold the exit for 60 s.
    assert wait_exit(server, timeout=15) == 0


def test_the_client_gets_a_503_when_the_deadline_passes_not_when_the_handler_ends(start_server):
    server = start_server(SCRIPT, env={"LOG_LEVEL": "debug", "REQUEST_TIMEOUT_S": "0.5"})
    resp = requests.get(server.url + "/debug/sleep?s=30", headers={"X-Request-Id": "slow-1"},
                        timeout=20)
    problem = expect_problem(resp, 503)
    assert "REQUEST_TIMEOUT_S" in problem["detail"] and resp.headers["Retry-After"]
    assert not [line for line in server.stderr_lines("slow-1") if "debug sleep done" in line], \
        "the 503 waited for the handler"
    expect_json(requests.get(server.url + "/debug/sleep?s=0", timeout=TIMEOUT), 200)
    new_note(server)  # the server goes on serving


def test_a_read_is_stopped_at_the_deadline_too(start_server):
    """Reads run inline, not on a deadline worker: sqlite's progress handler stops the query."""
    server = start_server(SCRIPT, env={"REQUEST_TIMEOUT_S": "0.001"})
    with sqlite3.connect(server.db_path) as conn:  # enough rows that a full scan takes a while
        conn.executemany("INSERT INTO notes (title, body, created_at, updated_at) "
                         "VALUES (?, ?, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
                         ((f"bulk {n}", "text " * 20) for n in range(100_000)))
    resp = requests.get(server.url + "/notes", params={"q": "matches-nothing"}, timeout=TIMEOUT)
    problem = expect_problem(resp, 503)
    assert "REQUEST_TIMEOUT_S" in problem["detail"] and resp.headers["Retry-After"]
    expect(requests.get(server.url + "/livez", timeout=TIMEOUT), 200)


def test_debug_routes_exist_only_in_development(start_server):
    server = start_server(SCRIPT, env=PRODUCTION)
    expect_problem(requests.get(server.url + "/debug/sleep?s=0", timeout=TIMEOUT), 404)
    paths = expect_json(requests.get(server.url + "/openapi.json", timeout=TIMEOUT), 200)["paths"]
    assert "/debug/sleep" not in paths and "/notes" in paths


# --------------------------------------------------------------------------------------------
# Migrations


def file_checksums():
    return {int(p.name[:4]): (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in MIGRATIONS.glob("*.sql")}


def recorded(db_path):
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT version, name, checksum FROM schema_migrations "
                            "ORDER BY version").fetchall()


def schema(db_path):
    with sqlite3.connect(db_path) as conn:
        return {(kind, name) for kind, name in conn.execute(
            "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}


def test_migrations_are_applied_in_order_and_recorded_with_checksums(start_server):
    server = start_server(SCRIPT)
    assert [(v, n, c) for v, n, c in recorded(server.db_path)] == \
        [(v, *file_checksums()[v]) for v in sorted(file_checksums())]
    assert {("table", "notes"), ("index", "notes_by_recency"),
            ("table", "schema_migrations")} <= schema(server.db_path)
    first = server.wait_for_stderr("migrations")
    assert "0001_notes.sql" in first and "0002_notes_by_recency.sql" in first
    server.stop()
    again = start_server(SCRIPT, db=server.db_path)
    assert "applied=[]" in again.wait_for_stderr("migrations")
    assert len(recorded(server.db_path)) == len(file_checksums())


# Each child waits for one byte on stdin, then becomes the server: all are started first, then
# let go together, so their migrations race rather than run one after the other.
AT_THE_GATE = ("import os, sys; os.read(0, 1); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def all_listen_then_stop(procs, tmp_path):
    """Each process announces it listens, then SIGTERM stops each with exit status 0."""
    lines = [proc.stdout.readline().decode() for proc in procs]
    assert all(line.startswith("listening on http://") for line in lines), \
        (lines, [(tmp_path / f"stderr{n}.log").read_text()[-1500:] for n in range(len(procs))])
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=15) for proc in procs] == [0] * len(procs)


def reap(procs):
    """Whatever still runs is killed, and the pipes closed: a failing test leaves nothing."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_processes_starting_together_apply_each_migration_once(tmp_path):
    db = tmp_path / "shared.sqlite3"
    procs = []
    try:
        for n in range(4):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", AT_THE_GATE, str(ROOT / SCRIPT), "--port", "0",
                 "--db", str(db)],
                stdout=subprocess.PIPE, stderr=open(tmp_path / f"stderr{n}.log", "wb"),
                stdin=subprocess.PIPE, cwd=tmp_path, env=clean_env()))
        for proc in procs:
            proc.stdin.write(b"g")
            proc.stdin.flush()
        all_listen_then_stop(procs, tmp_path)
    finally:
        reap(procs)
    assert [(v, n, c) for v, n, c in recorded(db)] == \
        [(v, *file_checksums()[v]) for v in sorted(file_checksums())]
    applied = [re.search(r"applied=(\[.*?\])", (tmp_path / f"stderr{n}.log").read_text())[1]
               for n in range(4)]
    names = [name for text in applied for name in re.findall(r"'([^']+)'", text)]
    assert sorted(names) == sorted(p.name for p in MIGRATIONS.glob("*.sql")), applied
    assert {("table", "notes"), ("index", "notes_by_recency")} <= schema(db)


def opened(pid, path):
    """Whether process `pid` has the file `path` open (Linux /proc)."""
    try:
        return any(os.path.realpath(link) == str(path)
                   for link in (str(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
                   if os.path.exists(link))
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_the_check_and_the_apply_share_one_lock(tmp_path):
    """The interleaving that lock prevents, forced: four processes reach their migrations while
    the test holds the write lock. A process that checked before taking the lock would find
    every migration unapplied and, once let through, apply it again (a second CREATE TABLE
    fails); under the lock, each re-checks and exactly one applies each migration."""
    db = (tmp_path / "held.sqlite3").resolve()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    # The documented table (README, "Migrations"), made first so that the servers' own
    # CREATE TABLE IF NOT EXISTS has nothing to do and they go straight to the migrations.
    holder.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                   "name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at TEXT NOT NULL)")
    holder.execute("BEGIN IMMEDIATE")
    procs = []
    try:
        for n in range(4):
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / SCRIPT), "--port", "0", "--db", str(db)],
                stdout=subprocess.PIPE, stderr=open(tmp_path / f"stderr{n}.log", "wb"),
                stdin=subprocess.DEVNULL, cwd=tmp_path, env=clean_env()))
        deadline = time.monotonic() + 8
        while not all(opened(proc.pid, db) for proc in procs):
            assert time.monotonic() < deadline, "the servers never opened the database"
            time.sleep(0.02)
        time.sleep(1)  # no signal for "now waiting for the lock": they are milliseconds from it
        holder.execute("COMMIT")
        holder.close()
        all_listen_then_stop(procs, tmp_path)
    finally:
        reap(procs)
    assert [v for v, _, _ in recorded(db)] == sorted(file_checksums())


def test_a_migration_changed_after_it_ran_stops_the_start(start_server):
    server = start_server(SCRIPT)
    server.stop()
    with sqlite3.connect(server.db_path) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    done = run("--port", "0", "--db", server.db_path)
    assert done.returncode == 2 and "0001_notes.sql" in done.stderr, done.stderr
    assert "listening on" not in done.stdout and "Traceback" not in done.stderr


def test_a_failing_migration_is_rolled_back_whole_and_stops_the_start(tmp_path):
    """A copy of the app (as the image holds it) with a third migration whose second
    statement fails: its first statement is undone too, and nothing is recorded for it."""
    app_dir = image_contents(tmp_path / "app")
    (app_dir / "level07/deployment_ready_migrations/0003_half_done.sql").write_text(
        "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n")
    db = tmp_path / "db.sqlite3"
    done = subprocess.run([sys.executable, "level07/deployment_ready.py", "--port", "0",
                           "--db", str(db)], cwd=app_dir, capture_output=True, text=True,
                          timeout=20, env=clean_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "0003_half_done.sql" in done.stderr, done.stderr
    assert "listening on" not in done.stdout and "Traceback" not in done.stderr
    assert [v for v, _, _ in recorded(db)] == [1, 2]
    assert ("table", "half_done") not in schema(db) and ("table", "notes") in schema(db)


def test_a_migrations_folder_in_disorder_is_a_config_error(tmp_path):
    app_dir = image_contents(tmp_path / "app")
    folder = app_dir / "level07/deployment_ready_migrations"
    (folder / "0002_again.sql").write_text("SELECT 1;\n")
    (folder / "later.sql").write_text("SELECT 1;\n")
    done = subprocess.run([sys.executable, "level07/deployment_ready.py", "--check-config"],
                          cwd=app_dir, capture_output=True, text=True, timeout=20,
                          env=clean_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    errors = config_errors(done)
    assert any("0002_again.sql" in line and "version 2" in line for line in errors), errors
    assert any("later.sql" in line for line in errors), errors


# --------------------------------------------------------------------------------------------
# Logs


def test_json_log_lines_carry_the_request_fields_and_id(start_server):
    server = start_server(SCRIPT, env={"LOG_FORMAT": "json"})
    rid = f"trace-{uuid.uuid4().hex}"
    resp = requests.get(server.url + "/notes/424242", headers={"X-Request-Id": rid},
                        timeout=TIMEOUT)
    expect_problem(resp, 404)
    assert resp.headers["X-Request-Id"] == rid
    server.wait_for_stderr(rid)
    entries = json_lines(server)  # every line of stderr parses
    line = next(entry for entry in entries if entry.get("request_id") == rid)
    assert RFC3339_UTC.fullmatch(line["ts"]), line
    assert line["level"] == "warning" and isinstance(line["msg"], str)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/notes/424242", 404)
    assert isinstance(line["duration_ms"], (int, float)) and line["bytes"] == len(resp.content)
    assert line["client"] == "127.0.0.1"
    assert any(entry.get("msg") == "config" for entry in entries)


def test_log_level_warning_drops_the_info_lines(start_server):
    server = start_server(SCRIPT, env={"LOG_LEVEL": "warning", "LOG_FORMAT": "json"})
    quiet, loud = f"ok-{uuid.uuid4().hex}", f"missing-{uuid.uuid4().hex}"
    for path, rid, status in (("/livez", quiet, 200), ("/nowhere", loud, 404)):
        expect(requests.get(server.url + path, headers={"X-Request-Id": rid}, timeout=TIMEOUT),
               status)
    server.wait_for_stderr(loud)
    assert not server.stderr_lines(quiet)
    assert not [entry for entry in json_lines(server) if entry.get("msg") == "config"]


# --------------------------------------------------------------------------------------------
# Metrics, read by Prometheus' own parser


def test_metrics_parse_with_prometheus_and_count_the_requests_made(start_server):
    parser = pytest.importorskip("prometheus_client.parser")
    server = start_server(SCRIPT)
    note = new_note(server)
    for _ in range(3):
        expect(requests.get(f"{server.url}/notes/{note['id']}", timeout=TIMEOUT), 200)
    for _ in range(2):
        expect(requests.get(f"{server.url}/notes/999999", timeout=TIMEOUT), 404)
    resp = expect(requests.get(server.url + "/metrics", timeout=TIMEOUT), 200)
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(resp.text)}

    totals = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
              for s in families["http_requests"].samples if s.name == "http_requests_total"}
    assert families["http_requests"].type == "counter"
    one = next(route for (_, route, _) in totals if route.startswith("/notes/{"))
    assert totals[("GET", one, "200")] == 3 and totals[("GET", one, "404")] == 2
    assert totals[("POST", "/notes", "201")] == 1

    histogram = families["http_request_duration_seconds"]
    assert histogram.type == "histogram"
    buckets = [(float(s.labels["le"]), s.value) for s in histogram.samples
               if s.name.endswith("_bucket") and s.labels["route"] == one
               and s.labels["method"] == "GET"]
    bounds = [bound for bound, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert {0.005, 0.01, 0.1, 1.0, 10.0} <= set(bounds)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "buckets are not cumulative"
    count = next(s.value for s in histogram.samples if s.name.endswith("_count")
                 and s.labels["route"] == one and s.labels["method"] == "GET")
    assert counts[-1] == count == 5

    assert families["http_requests_in_flight"].samples[0].value == 1  # this scrape
    started = families["process_start_time_seconds"].samples[0].value
    assert time.time() - 3600 < started <= time.time()
    info = families["app_info"].samples[0]
    version = expect_json(requests.get(server.url + "/", timeout=TIMEOUT), 200)["version"]
    assert info.labels["version"] == version and info.value == 1


# --------------------------------------------------------------------------------------------
# Security headers and limits


def assert_security_headers(resp):
    assert resp.headers.get("X-Content-Type-Options") == "nosniff", resp.headers
    assert resp.headers.get("Referrer-Policy") == "no-referrer", resp.headers
    assert "default-src 'none'" in resp.headers.get("Content-Security-Policy", ""), resp.headers


def test_every_answer_carries_the_security_headers(server):
    note = new_note(server)
    answers = [
        requests.get(server.url + "/notes", timeout=TIMEOUT),
        requests.post(server.url + "/notes", json={"title": "h"}, timeout=TIMEOUT),
        requests.get(f"{server.url}/notes/{note['id']}", timeout=TIMEOUT),
        requests.get(server.url + "/no/such/route", timeout=TIMEOUT),
        requests.delete(server.url + "/notes", timeout=TIMEOUT),
        requests.get(server.url + "/metrics", timeout=TIMEOUT),
        requests.post(server.url + "/notes", data="{", timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"}),
    ]
    assert [r.status_code for r in answers] == [200, 201, 200, 404, 405, 200, 400]
    for resp in answers:
        assert_security_headers(resp)


def test_a_body_over_the_limit_is_a_413_with_the_headers(server):
    body = b'{"title": "big", "body": "' + b"x" * (1024 * 1024) + b'"}'
    resp = requests.post(server.url + "/notes", data=body, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json"})
    expect_problem(resp, 413)
    assert_security_headers(resp)


# --------------------------------------------------------------------------------------------
# The notes API


def test_notes_crud_with_etags(server):
    note = new_note(server, "first", body="text", tags=["Work"])
    assert note["tags"] == ["work"] and note["version"] == 1
    url = f"{server.url}/notes/{note['id']}"
    resp = expect(requests.get(url, timeout=TIMEOUT), 200)
    assert resp.headers["ETag"] == '"1"'
    changed = expect_json(requests.patch(url, json={"title": "renamed"},
                                         headers={"If-Match": '"1"'}, timeout=TIMEOUT), 200)
    assert changed["title"] == "renamed" and changed["body"] == "text" and changed["version"] == 2
    expect_problem(requests.patch(url, json={"title": "again"}, headers={"If-Match": '"1"'},
                                  timeout=TIMEOUT), 412)
    problem = expect_problem(requests.post(server.url + "/notes", json={"id": 9, "title": ""},
                                           timeout=TIMEOUT), 422)
    assert {e["field"] for e in problem["errors"]} == {"id", "title"}
    expect(requests.delete(url, headers={"If-Match": '"1"'}, timeout=TIMEOUT), 412)
    expect(requests.delete(url, timeout=TIMEOUT), 204)
    expect_problem(requests.get(url, timeout=TIMEOUT), 404)
    expect_problem(requests.patch(url, json={"title": "x"}, timeout=TIMEOUT), 404)


def read_all(server, query, cursor=None, seen=None):
    seen = seen or []
    params = {**query, **({"cursor": cursor} if cursor else {})}
    page = expect_json(requests.get(server.url + "/notes", params=params, timeout=TIMEOUT), 200)
    seen += page["items"]
    return read_all(server, query, page["next_cursor"], seen) if page["next_cursor"] else seen


def test_pages_follow_signed_cursors_and_a_forged_one_is_a_400(server):
    tag = uuid.uuid4().hex[:12]
    made = [new_note(server, f"paged {n}", tags=[tag])["id"] for n in range(5)]
    assert sorted(n["id"] for n in read_all(server, {"tag": tag, "limit": 2})) == made
    first = expect_json(requests.get(server.url + "/notes", params={"tag": tag, "limit": 2},
                                     timeout=TIMEOUT), 200)
    cursor, _, tag_part = first["next_cursor"].rpartition(".")
    assert cursor and tag_part
    for forged in (cursor, f"{cursor}.{'A' * len(tag_part)}", "not-a-cursor"):
        problem = expect_problem(requests.get(server.url + "/notes", timeout=TIMEOUT,
                                              params={"tag": tag, "cursor": forged}), 400)
        assert problem["errors"][0]["field"] == "cursor"


def test_replicas_sharing_a_secret_accept_each_others_cursors(start_server):
    shared = {"SECRET_KEY": SECRET}
    one = start_server(SCRIPT, env=shared)
    two = start_server(SCRIPT, env=shared, db=one.db_path)
    other = start_server(SCRIPT, env={"SECRET_KEY": "another-" + "k" * 40}, db=one.db_path)
    for n in range(3):
        new_note(one, f"replicated {n}")
    first = expect_json(requests.get(one.url + "/notes?limit=1", timeout=TIMEOUT), 200)
    cursor = first["next_cursor"]
    expect_json(requests.get(two.url + "/notes", params={"limit": 1, "cursor": cursor},
                             timeout=TIMEOUT), 200)
    expect_problem(requests.get(other.url + "/notes", params={"limit": 1, "cursor": cursor},
                                timeout=TIMEOUT), 400)


# --------------------------------------------------------------------------------------------
# Shipping files


DOCKERFILE = ROOT / "level07" / "deployment_ready.Dockerfile"
UNIT = ROOT / "level07" / "deployment_ready.service"
ENV_EXAMPLE = ROOT / "level07" / "deployment_ready.env.example"


def dockerfile_instructions():
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def docker_env():
    env = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            env.update(dict(word.split("=", 1) for word in shlex.split(arguments)))
    return env


def test_the_dockerfile_runs_as_a_user_and_checks_health_with_the_stdlib():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert instructions[0][0] == "FROM" and "slim" in instructions[0][1]
    users = [arguments for kind, arguments in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k in ("RUN", "COPY"))
    healthcheck = next(arguments for kind, arguments in instructions if kind == "HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python" and not {"curl", "wget"} & set(" ".join(command).split())
    cmd = json.loads(next(arguments for kind, arguments in instructions if kind == "CMD"))
    assert cmd == ["python", SCRIPT], "CMD must be the exec form: Python is PID 1 and gets SIGTERM"
    env = docker_env()
    assert env["APP_ENV"] == "production" and env["HOST"] == "0.0.0.0"
    assert "SECRET_KEY" not in env, "an image is shared; its secret must not be"
    assert float(env["SHUTDOWN_GRACE_S"]) < 10, "docker stop sends SIGKILL after 10 s"


def image_contents(app_dir):
    """What the Dockerfile COPYs, copied into `app_dir` as the image would hold it."""
    for kind, arguments in dockerfile_instructions():
        if kind == "COPY":
            *sources, target = arguments.split()
            for source in sources:  # a folder into a folder, or files into a folder
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, app_dir / target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    (app_dir / target).mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, app_dir / target)
    return app_dir


def test_the_image_contents_suffice_and_its_healthcheck_works(tmp_path):
    """What the Dockerfile COPYs, alone in a folder, is a server that starts with the image's
    settings, and the HEALTHCHECK command passes against it (and fails with nothing there)."""
    app_dir = image_contents(tmp_path / "app")
    env = {**docker_env(), "SECRET_KEY": SECRET, "HOST": "127.0.0.1",
           "DATABASE_PATH": str(tmp_path / "data" / "db.sqlite3")}
    proc = subprocess.Popen([sys.executable, "level07/deployment_ready.py", "--port", "0"],
                            cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=clean_env(env))
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on http://"), (line, proc.stderr.read1(4000))
        port = line.rstrip().rsplit(":", 1)[1]
        healthcheck = next(arguments for kind, arguments in dockerfile_instructions()
                           if kind == "HEALTHCHECK")
        command = json.loads(healthcheck.split("CMD", 1)[1])
        command[0] = sys.executable
        check = subprocess.run(command, env=clean_env({"PORT": port}), capture_output=True,
                               timeout=20)
        assert check.returncode == 0, check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        refused = subprocess.run(command, env=clean_env({"PORT": port}), capture_output=True,
                                 timeout=20)
        assert refused.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = [json.loads(line) for line in proc.stderr.read().decode().splitlines()]
    assert any(entry.get("msg") == "config" for entry in entries)  # LOG_FORMAT=json


def unit_settings():
    settings, section = {}, None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault((section, key), []).append(value)
    return settings


def test_the_systemd_unit_is_sandboxed_and_waits_longer_than_the_grace():
    unit = unit_settings()
    service = {key: values for (section, key), values in unit.items() if section == "Service"}
    assert service.get("DynamicUser") == ["yes"] or service.get("User"), "runs as root"
    for key, value in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("PrivateTmp", "yes"), ("KillSignal", "SIGTERM")]:
        assert service.get(key) == [value], (key, service.get(key))
    assert service["StateDirectory"] and service["RestrictAddressFamilies"]
    assert service["SystemCallFilter"] and service["CapabilityBoundingSet"] == [""]
    environment = dict(pair.split("=", 1) for value in service["Environment"]
                       for pair in shlex.split(value))
    assert environment["APP_ENV"] == "production"
    assert environment["DATABASE_PATH"].startswith(f"/var/lib/{service['StateDirectory'][0]}/")
    assert float(service["TimeoutStopSec"][0]) > float(environment["SHUTDOWN_GRACE_S"])
    assert "SECRET_KEY" not in environment, "the secret belongs in the EnvironmentFile"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit():
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), \
        done.stdout + done.stderr


def env_example():
    return dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def test_the_env_example_names_every_setting_and_is_valid_once_filled(tmp_path):
    example = env_example()
    assert set(example) == VARIABLES
    assert example["SECRET_KEY"] == "", "an example must not carry a secret someone will reuse"
    as_is = run("--check-config", env=example)
    assert as_is.returncode == 2 and any("SECRET_KEY" in line for line in config_errors(as_is))
    filled = {**example, "SECRET_KEY": SECRET, "DATABASE_PATH": str(tmp_path / "db.sqlite3")}
    done = run("--check-config", env=filled)
    assert done.returncode == 0, done.stderr


def test_the_readme_explains_each_shipping_file():
    readme = (ROOT / "level07" / "deployment_ready.md").read_text()
    for path in (DOCKERFILE, UNIT, ENV_EXAMPLE):
        assert path.name in readme, path.name
    for variable in VARIABLES:
        assert variable in readme, variable
