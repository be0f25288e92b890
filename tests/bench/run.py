"""The project's benchmark: what its servers cost, next to the standard library at its best.

Each scenario starts a project server as a subprocess, drives it from a separate load-generating
process (wrk when installed, else tests/bench/loadgen.py) with keep-alive connections, and
measures requests per second and p50/p99 latency. In the same run it measures a reference that
does the same job with the standard library and nothing else:

- health:  `GET /health` on level01/health_check.py, once per transport (`--server threaded`,
           `--server asyncio`): the threaded one beside a tuned `http.server` handler that sends
           the very same body (tests/bench/references.py), the asyncio one beside uvicorn +
           httptools + Starlette serving the same JSON (tests/bench/uvicorn_starlette.py, only
           when requirements-bench.txt is installed), and a minimal asyncio-streams server
           (references.py) printed for context.
- connections: 1,000 idle keep-alive connections held open at once on health_check --server
           asyncio: the server's memory per idle connection, then one request on each, all of
           which must be answered 200 (the references measured the same way, for context).
- counter: durable `POST /counters/bench/increment` on level01/counter.py, beside raw sqlite
           running the counter's own statement, one commit each, in a loop
           (tests/bench/sqlite_commits.py); afterwards the stored value is checked against the
           number of increments the load generator saw acknowledged.
- crud:    level02/notes.py under a POST / GET list / GET / PATCH mix, a user per connection
           (tests/bench/flows.py), and its list alone. No stdlib reference does CRUD: the figures
           are absolute, printed beside health_check's from the same run for context.
- auth:    level03/jwt_auth.py: logins per second, bounded by design by one scrypt hash each,
           beside raw `hashlib.scrypt` at the same cost on every core (tests/bench/scrypt_hashes.py);
           and `GET /me` with a bearer token, beside health_check for context.
- redirects: `GET /{code}` on level04/url_shortener.py (302s, not followed, each a click counted),
           beside health_check --server asyncio; afterwards the link's stats are checked against
           the number of redirects the load generator saw answered.
- search:  level04/search_api.py loaded with N generated documents (tests/bench/documents.py,
           through POST /documents/bulk), then a mix of queries (words, a phrase, a prefix,
           filters): p50/p95/p99 on one connection, and req/s on all of them.
- evaluations: OFREP `POST /ofrep/v1/evaluate/flags/{key}` on level04/feature_flags.py, a flag
           with a targeting rule and a rollout, beside health_check --server asyncio; one probe
           first checks the answer's variant against the rollout bucket computed here.
- upload, jobs, chat, limits, logs, gateway: levels 04-06 (tests/bench/README.md describes each).
- analytics: level07/analytics_collector.py: events acknowledged durably per second through
           `/v1/batch` (100 events a call, a messageId each, every connection at once; flows.py),
           then single `/v1/track` calls beside health_check asyncio; afterwards every acknowledged
           batch must be in the database whole and once (tests/bench/analytics.py).
- audit:   level07/audit_log.py: appends (`POST /audit`, the service token) beside raw sqlite
           single-row commits (sqlite_commits.py), the chain verified afterwards; then
           `GET /audit/verify` over --audit-entries entries (default 1,000,000) written straight
           into a new database with audit_log's own hash (tests/bench/audit_chain.py).
- payments: level07/payment_webhooks.py: Stripe-signed deliveries, each of its own id,
           acknowledged per second while its workers process them (flows.py), then the time until
           all are processed (its status route polled); each must be processed once.
- deploy:  level07/deployment_ready.py configured by its environment (APP_ENV=production,
           SECRET_KEY, DATABASE_PATH, LOG_FORMAT=json), metrics on: `GET /notes/{id}` beside the
           same route on level02/notes.py; its metrics and JSON log must have counted the reads.

Why ratios: on a shared 2-core machine absolute figures move ±20% between runs, and the load
generator competes with the server for the same two cores. Both effects hit the project's server
and its reference alike when they are measured back to back in one run, so the benchmark judges
ratios within a run (server ÷ reference) against targets, never a figure from another run.

Run: python tests/bench/run.py [--duration S] [--connections N] [--only NAME] [--tool wrk|python]
                               [--idle-connections N] [--documents N] [--upload-mib N] [--audit-entries N]

Adding a scenario: write a function that takes the Bench and returns a ScenarioReport (rows for
the table, targets to judge, ratios given for context), and add it to SCENARIOS.
"""

import argparse
import hashlib
import http.client
import importlib.util
import json
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from documents import ndjson_batches, search_queries
from flows import (ANALYTICS_WRITE_KEY, EVENTS_PER_BATCH, LOGIN_PASSWORD, WEBHOOK_SECRET, basic_auth, login_email,
                   notes_user)
from loadgen import build_request, split_response
import analytics
import jobs
import logs
import uploads
import webhooks

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parents[1]
WARMUP_S = 1
SERVER_START_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 10.0
LISTENING_LINE = re.compile(r"listening on (http://\S+)")


class BenchError(Exception):
    """A scenario could not be measured: a server did not start, a load generator failed."""


# --- Load generators ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What every connection of the load generator sends, over and over."""

    method: str = "GET"
    body: str = ""
    content_type: str | None = None
    headers: tuple[str, ...] = ()  # more header fields, each "Name: value"
    # The status that counts as a success (a redirect: 302); None: any 2xx. wrk has its own
    # rule, which cannot be changed without slowing it down: any status below 400.
    expected_status: int | None = None


GET = Request()


@dataclass(frozen=True)
class LoadResult:
    requests: int  # responses received
    ok: int  # 2xx responses
    errors: int  # other statuses and connection failures
    rps: float
    p50_ms: float
    p99_ms: float
    p95_ms: float | None = None  # wrk does not report it; the Python generators do


class WrkLoadGenerator:
    """wrk (C, epoll), one thread: far cheaper per request than any Python client.

    When its time is up wrk abandons the requests in flight, so a server may have done up to
    one request per connection more than wrk counted.
    """

    counts_every_request = False
    name = "wrk"

    def __init__(self, executable: str, workdir: Path):
        self.executable = executable
        self.workdir = workdir
        version = subprocess.run([executable, "--version"], capture_output=True, text=True)
        first_line = (version.stdout or version.stderr).splitlines()[0]
        self.description = first_line.split(" Copyright")[0] + ", one thread (-t1)"

    def run(self, url: str, request: Request, connections: int, duration: int) -> LoadResult:
        command = [self.executable, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
        if replace(request, expected_status=None) != GET:
            command += ["-s", str(self.write_request_script(request))]
        completed = subprocess.run(command + [url], capture_output=True, text=True, timeout=duration + 30)
        if completed.returncode != 0:
            raise BenchError(f"wrk failed: {completed.stderr.strip() or completed.stdout.strip()}")
        return parse_wrk_output(completed.stdout)

    def write_request_script(self, request: Request) -> Path:
        # json.dumps gives a valid Lua string literal for ASCII text, which our bodies are.
        lines = [f"wrk.method = {json.dumps(request.method)}", f"wrk.body = {json.dumps(request.body)}"]
        if request.content_type:
            lines.append(f'wrk.headers["Content-Type"] = {json.dumps(request.content_type)}')
        for header in request.headers:
            name, _, value = header.partition(":")
            lines.append(f"wrk.headers[{json.dumps(name.strip())}] = {json.dumps(value.strip())}")
        script = self.workdir / "request.lua"
        script.write_text("\n".join(lines) + "\n")
        return script


def parse_wrk_output(output: str) -> LoadResult:
    def number(pattern: str, default: str | None = None) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match:
            return match.group(1)
        if default is None:
            raise BenchError(f"unexpected wrk output (no match for {pattern!r}):\n{output}")
        return default

    def latency_ms(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not match:
            raise BenchError(f"unexpected wrk output (no {percent}% latency line):\n{output}")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(number(r"^\s+(\d+) requests in "))
    failed_responses = int(number(r"Non-2xx or 3xx responses: (\d+)", default="0"))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    broken = sum(int(count) for count in socket_errors.groups()) if socket_errors else 0
    return LoadResult(
        requests=requests,
        ok=requests - failed_responses,
        errors=failed_responses + broken,
        rps=float(number(r"^Requests/sec:\s+([\d.]+)")),
        p50_ms=latency_ms("50"),
        p99_ms=latency_ms("99"),
    )


class PythonLoadGenerator:
    """tests/bench/loadgen.py: one process, one selectors loop; waits for the requests in flight."""

    counts_every_request = True
    name = "Python loadgen"
    description = "Python load generator (tests/bench/loadgen.py, one process, selectors loop)"

    def run(self, url: str, request: Request, connections: int, duration: int) -> LoadResult:
        command = [sys.executable, str(BENCH_DIR / "loadgen.py"), url,
                   "--connections", str(connections), "--duration", str(duration),
                   "--method", request.method, "--body", request.body]
        if request.content_type:
            command += ["--content-type", request.content_type]
        for header in request.headers:
            command += ["--header", header]
        if request.expected_status is not None:
            command += ["--expect-status", str(request.expected_status)]
        return run_measuring_process(command, timeout=duration + 30)


def run_measuring_process(command: list[str], timeout: float) -> LoadResult:
    """Run loadgen.py, sqlite_commits.py or scrypt_hashes.py, which print their result as one JSON line."""
    return load_result(run_json_process(command, timeout))


def run_json_process(command: list[str], timeout: float) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if completed.returncode != 0 or not completed.stdout.strip():
        raise BenchError(f"{Path(command[1]).name} failed: {completed.stderr.strip()}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def load_result(figures: dict) -> LoadResult:
    return LoadResult(**{name: figures[name] for name in LoadResult.__dataclass_fields__ if name in figures})


FLOW_DRAIN_TIMEOUT_S = 30  # a login in flight may wait behind a hash per connection: seconds


def run_flow(url: str, flow: str, connections: int, duration: int) -> tuple[LoadResult, dict[str, LoadResult]]:
    """tests/bench/flows.py: request sequences, one user per connection. The whole mix, and
    each operation on its own."""
    command = [sys.executable, str(BENCH_DIR / "flows.py"), url, flow, "--connections", str(connections),
               "--duration", str(duration), "--drain-timeout", str(FLOW_DRAIN_TIMEOUT_S)]
    figures = run_json_process(command, timeout=duration + FLOW_DRAIN_TIMEOUT_S + 30)
    return load_result(figures), {name: load_result(each) for name, each in figures["operations"].items()}


# --- Servers and measurements -------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a server (or reference) and what it measured."""

    server: str
    result: LoadResult


@dataclass
class Bench:
    """The settings of this run, and the means every scenario uses: start a server, measure it."""

    load_generator: WrkLoadGenerator | PythonLoadGenerator
    duration: int
    connections: int
    workdir: Path  # temporary: databases, server logs, wrk scripts
    idle_connections: int = 1000  # held open at once by the connections scenario
    documents: int = 100_000  # indexed by the search scenario
    upload_bytes: int = 1 << 30  # sent by the upload scenario
    jobs: int = 5000  # enqueued by the jobs scenario, in each of its two runs
    audit_entries: int = 1_000_000  # in the log the audit scenario verifies
    # health_check --server asyncio measured with each load generator: the context that the
    # scenarios without a stdlib reference (crud, auth) print beside their own figures.
    health_rows: dict[str, Row] = field(default_factory=dict)

    def measure(self, server: str, url: str, request: Request = GET, warmup_url: str | None = None,
                load_generator: WrkLoadGenerator | PythonLoadGenerator | None = None,
                warmup_request: Request | None = None) -> Row:
        """Warm up for WARMUP_S (on warmup_url with warmup_request if given), then load url for the
        run's duration (with the run's load generator unless another is given)."""
        load_generator = load_generator or self.load_generator
        print(f"  {server}", flush=True)
        load_generator.run(warmup_url or url, warmup_request or request, self.connections, WARMUP_S)
        return Row(server, load_generator.run(url, request, self.connections, self.duration))

    def measure_flow(self, server: str, url: str, flow: str,
                     connections: int | None = None) -> tuple[Row, dict[str, LoadResult]]:
        """Like measure, with a flow of tests/bench/flows.py (always the Python generator), on the
        run's connections unless told: the row for the whole mix, and the figures of each operation."""
        connections = connections or self.connections
        print(f"  {server}", flush=True)
        run_flow(url, flow, connections, WARMUP_S)
        mix, operations = run_flow(url, flow, connections, self.duration)
        return Row(server, mix), operations

    def health_context(self, load_generator: WrkLoadGenerator | PythonLoadGenerator) -> Row:
        """GET /health on health_check --server asyncio with this load generator: taken from the
        health scenario when it ran with the same generator, else measured now."""
        key = load_generator.description
        if key not in self.health_rows:
            with self.running_server("level01/health_check.py", "--server", "asyncio",
                                     "--db", self.workdir / "health_check.sqlite3") as url:
                row = self.measure(f"health_check --server asyncio, {load_generator.name}", url + "/health",
                                   load_generator=load_generator)
            self.health_rows[key] = Row(f"{row.server} (context)", row.result)
        return self.health_rows[key]

    @contextmanager
    def running_server(self, script: str, *args: str | Path, env: dict[str, str] | None = None) -> Iterator[str]:
        """Start `python script --port 0 args...` (with `env` added to the environment), yield its
        base URL, stop it with SIGTERM."""
        with self.running_process(script, *args, env=env) as (url, _):
            yield url

    @contextmanager
    def running_process(self, script: str, *args: str | Path,
                        env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
        """Like running_server, yielding the server's process id as well as its base URL.

        Its stderr (the access log) goes to a file in workdir, shown if the server fails to start.
        """
        command = [sys.executable, script, "--port", "0", *map(str, args)]
        with tempfile.NamedTemporaryFile(dir=self.workdir, prefix=Path(script).stem + "-",
                                         suffix=".log", delete=False) as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log,
                                       env={**os.environ, **env} if env else None)
        try:
            yield wait_until_listening(process, " ".join(command[1:]), Path(log.name)), process.pid
        finally:
            stop_server(process, script)


def wait_until_listening(process: subprocess.Popen, name: str, log_path: Path) -> str:
    ready, _, _ = select.select([process.stdout], [], [], SERVER_START_TIMEOUT_S)
    line = process.stdout.readline().decode(errors="replace") if ready else ""
    match = LISTENING_LINE.fullmatch(line.strip())
    if not match:
        try:
            state = f"exited with status {process.wait(1)}"
        except subprocess.TimeoutExpired:
            state = "still running"
        stderr_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{name} did not print 'listening on http://HOST:PORT' (got {line.strip()!r}, "
                         f"{state}); its stderr ends with:\n{stderr_tail}")
    return match.group(1)


def stop_server(process: subprocess.Popen, script: str) -> None:
    process.stdout.close()
    if process.poll() is not None:
        return  # it never started: wait_until_listening has already said why
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
        print(f"  warning: {script} did not exit within {SERVER_STOP_TIMEOUT_S:.0f} s of SIGTERM; killed")
    else:
        if status != 0:
            print(f"  warning: {script} exited with status {status} after SIGTERM (expected 0)")


def http_json(method: str, url: str, body: object = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict]:
    """One request with an optional JSON body: the status and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, method=method, headers={
        **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
    except OSError as error:
        raise BenchError(f"{method} {url} failed: {error}") from error


def fetch(url: str) -> tuple[bytes, str]:
    """GET url: its body and Content-Type."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read(), response.headers["Content-Type"]
    except OSError as error:  # urllib.error.URLError and HTTPError are OSErrors
        raise BenchError(f"GET {url} failed: {error}") from error


# --- Scenarios ----------------------------------------------------------------------------------


@dataclass
class Target:
    description: str
    value: str
    goal: str
    met: bool | None  # None: a figure given for context, with no goal to meet


@dataclass
class ScenarioReport:
    rows: list[Row]
    targets: list[Target]
    notes: list[str] = field(default_factory=list)


def ratio_target(description: str, measured: Row, reference: Row, minimum: float) -> Target:
    ratio = measured.result.rps / reference.result.rps if reference.result.rps else 0.0
    return Target(description, f"{ratio:.2f}", f"≥ {minimum}", ratio >= minimum)


def context_ratio(description: str, measured: Row, reference: Row) -> Target:
    """A ratio printed for context only: what a figure is next to another, with no goal."""
    ratio = measured.result.rps / reference.result.rps if reference.result.rps else 0.0
    return Target(description, f"{ratio:.2f}", "-", None)


def p99_no_worse_target(description: str, measured: Row, reference: Row) -> Target:
    p99_ms, reference_ms = measured.result.p99_ms, reference.result.p99_ms
    return Target(description, f"{p99_ms:.2f} ms", f"≤ {reference_ms:.2f} ms", p99_ms <= reference_ms)


UVICORN_STACK = ("uvicorn", "httptools", "starlette")  # requirements-bench.txt
UVICORN_ROW = "uvicorn + httptools + Starlette (reference)"
UVICORN_MISSING = "uvicorn + httptools + Starlette not installed: pip install -r requirements-bench.txt"


def uvicorn_installed() -> bool:
    return all(importlib.util.find_spec(package) for package in UVICORN_STACK)


def write_health_body(bench: Bench, url: str) -> tuple[Path, bytes, str]:
    """health_check's answer to GET /health, in a file for the references to send: (the file,
    the body, its Content-Type)."""
    body, content_type = fetch(url + "/health")
    body_file = bench.workdir / "health_body"
    body_file.write_bytes(body)
    return body_file, body, content_type


def health_scenario(bench: Bench) -> ScenarioReport:
    """GET /health on each transport of health_check, beside the reference for that transport."""
    db = bench.workdir / "health_check.sqlite3"

    with bench.running_server("level01/health_check.py", "--server", "threaded", "--db", db) as url:
        body_file, body, content_type = write_health_body(bench, url)
        threaded = bench.measure("health_check --server threaded", url + "/health")
    with bench.running_server("tests/bench/references.py", "threaded",
                              "--body-file", body_file, "--content-type", content_type) as url:
        tuned_http_server = bench.measure("tuned http.server (reference)", url + "/health")
    with bench.running_server("level01/health_check.py", "--server", "asyncio", "--db", db) as url:
        asyncio_server = bench.measure("health_check --server asyncio", url + "/health")
    context = f"health_check --server asyncio, {bench.load_generator.name} (context: as in health)"
    bench.health_rows[bench.load_generator.description] = Row(context, asyncio_server.result)
    rows = [threaded, tuned_http_server, asyncio_server]
    asyncio_goal = "health_check asyncio ÷ uvicorn + httptools + Starlette"
    notes = [f"/health body ({content_type}, {len(body)} bytes), the stdlib references send it too, and "
             f"uvicorn + Starlette the same JSON (a JSONResponse): {body.decode()}"]
    if uvicorn_installed():
        with bench.running_server("tests/bench/uvicorn_starlette.py", "--body-file", body_file) as url:
            uvicorn_starlette = bench.measure(UVICORN_ROW, url + "/health")
        rows.append(uvicorn_starlette)
        asyncio_target = ratio_target(asyncio_goal, asyncio_server, uvicorn_starlette, 1.5)
    else:
        asyncio_target = Target(asyncio_goal, "not run", "≥ 1.5", None)
        notes.append(UVICORN_MISSING)
    with bench.running_server("tests/bench/references.py", "asyncio",
                              "--body-file", body_file, "--content-type", content_type) as url:
        minimal_asyncio = bench.measure("minimal asyncio streams (reference)", url + "/health")
    rows.append(minimal_asyncio)

    return ScenarioReport(
        rows=rows,
        targets=[
            ratio_target("health_check threaded ÷ tuned http.server", threaded, tuned_http_server, 0.8),
            p99_no_worse_target("health_check threaded p99, tuned http.server's as the bound",
                                threaded, tuned_http_server),
            asyncio_target,
            context_ratio("health_check asyncio ÷ minimal asyncio streams", asyncio_server, minimal_asyncio),
        ],
        notes=notes,
    )


@dataclass
class HeldConnections:
    """What holding many idle keep-alive connections open cost a server, and how they were served."""

    opened: int
    answered: int  # connections whose one request was answered 200
    failures: list[str]  # why the others were not
    rss_before_kib: int  # the server's resident memory, warmed up, before the connections
    rss_idle_kib: int  # with every connection open and idle
    rss_after_kib: int  # after one request on each, all still open

    def memory_per_connection(self) -> str:
        kib = (self.rss_idle_kib - self.rss_before_kib) / self.opened if self.opened else 0.0
        return f"{kib:.1f} KiB"

    def summary(self, server: str) -> str:
        failed = f"; not answered 200: {', '.join(self.failures[:3])}" if self.failures else ""
        return (f"{server}: {self.answered}/{self.opened} answered 200; resident memory "
                f"{self.rss_before_kib / 1024:.1f} MiB before, {self.rss_idle_kib / 1024:.1f} MiB with "
                f"{self.opened} idle connections, {self.rss_after_kib / 1024:.1f} MiB after one request "
                f"on each{failed}")


def rss_kib(pid: int) -> int:
    """The process's resident set size (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def settled_rss_kib(pid: int) -> int:
    """The RSS once the server has set up what it just accepted: two readings 50 ms apart agree."""
    previous = rss_kib(pid)
    for _ in range(40):
        time.sleep(0.05)
        current = rss_kib(pid)
        if current == previous:
            break
        previous = current
    return current


def read_status(sock: socket.socket, deadline: float) -> int:
    """Read one whole response (by Content-Length) and return its status code."""
    received = b""
    while (bounds := split_response(received)) is None or len(received) < bounds[1]:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        received += chunk
    return int(received[9:12])


def hold_idle_connections(url: str, pid: int, count: int) -> HeldConnections:
    """Open `count` keep-alive connections to a server that has none yet and leave them idle;
    read the server's RSS before and after; then send GET /health on each and read every answer."""
    if not os.path.isdir(f"/proc/{pid}"):
        raise BenchError("the connections scenario reads the server's memory from /proc (Linux)")
    baseline_files = open_files(pid)  # no connection open: the count to come back to
    fetch(url + "/health")  # the route has run once before the first reading; the connection closes
    if not wait_until(lambda: open_files(pid) == baseline_files, timeout=10):
        raise BenchError(f"the warm-up connection to {url} was never closed")
    rss_before = settled_rss_kib(pid)

    address = urlsplit(url)
    request = build_request("GET", address.netloc, "/health", b"", None)
    connections, failures = [], []
    for _ in range(count):
        try:
            connections.append(socket.create_connection((address.hostname, address.port), timeout=10))
        except OSError as error:
            failures.append(f"connect: {error}")
            break
    if not wait_until(lambda: open_files(pid) >= baseline_files + len(connections), timeout=10):
        failures.append(f"the server accepted {open_files(pid) - baseline_files} of {len(connections)} connections")
    rss_idle = settled_rss_kib(pid)

    answered = 0
    try:
        for sock in connections:
            sock.sendall(request)
        deadline = time.monotonic() + 30
        for sock in connections:
            try:
                status = read_status(sock, deadline)
            except OSError as error:  # socket.timeout and ConnectionError are OSErrors
                failures.append(f"{type(error).__name__}: {error}")
                continue
            if status == 200:
                answered += 1
            else:
                failures.append(f"status {status}")
        rss_after = rss_kib(pid)
    finally:
        for sock in connections:
            sock.close()
    return HeldConnections(len(connections), answered, failures, rss_before, rss_idle, rss_after)


def allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files if it is below `needed` (servers started
    afterwards inherit it): many systems default to 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY
                                                    else min(needed, hard), hard))


def connections_scenario(bench: Bench) -> ScenarioReport:
    """Many idle keep-alive connections at once on health_check --server asyncio: all served, and
    what each idle one costs in memory; the asyncio references held the same way, for context."""
    count = bench.idle_connections
    allow_open_files(count + 256)
    db = bench.workdir / "health_check.sqlite3"
    print(f"  health_check --server asyncio, {count} idle keep-alive connections", flush=True)
    with bench.running_process("level01/health_check.py", "--server", "asyncio", "--db", db) as (url, pid):
        health_check = hold_idle_connections(url, pid, count)
        body_file, _, content_type = write_health_body(bench, url)
    held = {"health_check --server asyncio": health_check}
    references = [("minimal asyncio streams", "tests/bench/references.py", "asyncio",
                   "--content-type", content_type)]
    if uvicorn_installed():
        references.append(("uvicorn + httptools + Starlette", "tests/bench/uvicorn_starlette.py"))
    for name, script, *args in references:
        print(f"  {name} (reference), {count} idle keep-alive connections", flush=True)
        with bench.running_process(script, *args, "--body-file", body_file) as (url, pid):
            held[name] = hold_idle_connections(url, pid, count)

    targets = [Target(f"{count} keep-alive connections on health_check asyncio, each answered 200",
                      f"{health_check.answered}/{count}", "all", health_check.answered == count)]
    targets += [Target(f"{name}: memory per idle connection", each.memory_per_connection(), "-", None)
                for name, each in held.items()]
    notes = [each.summary(name) for name, each in held.items()]
    if not uvicorn_installed():
        notes.append(UVICORN_MISSING)
    return ScenarioReport(rows=[], targets=targets, notes=notes)


def counter_scenario(bench: Bench) -> ScenarioReport:
    """Durable increments over HTTP on counter.py, beside raw sqlite single-row WAL commits."""
    increment = Request("POST", '{"by": 1}', "application/json")
    with bench.running_server("level01/counter.py", "--db", bench.workdir / "counter.sqlite3") as url:
        # The warm-up increments another counter, so that "bench" counts the measured requests only.
        over_http = bench.measure("counter.py POST /counters/bench/increment", url + "/counters/bench/increment",
                                  increment, warmup_url=url + "/counters/warmup/increment")
        stored, _ = fetch(url + "/counters/bench")

    raw_sqlite = measure_sqlite_commits(bench)
    return ScenarioReport(
        rows=[over_http, raw_sqlite],
        targets=[ratio_target("counter increments ÷ raw sqlite commits", over_http, raw_sqlite, 0.2)],
        notes=[check_acknowledged("counter", "stored value", json.loads(stored)["value"],
                                  over_http.result, "increments answered 200", bench)],
    )


def measure_sqlite_commits(bench: Bench) -> Row:
    server = "raw sqlite: the counter's statement, autocommit, WAL (reference)"
    print(f"  {server}", flush=True)
    command = [sys.executable, str(BENCH_DIR / "sqlite_commits.py"), "--db", str(bench.workdir / "raw.sqlite3")]
    run_measuring_process(command + ["--duration", str(WARMUP_S)], timeout=WARMUP_S + 30)
    return Row(server, run_measuring_process(command + ["--duration", str(bench.duration)],
                                             timeout=bench.duration + 30))


def check_acknowledged(check: str, stored: str, count: int, measured: LoadResult, answered: str,
                       bench: Bench) -> str:
    """Every request the load generator saw acknowledged must be in what the server stored:
    `count` (the `stored` figure, e.g. "total_clicks") against the `answered` requests. wrk
    abandons the requests in flight when its time is up, and the server still carries them
    out, so with wrk the count may exceed the answers by up to one per connection."""
    if bench.load_generator.counts_every_request:
        if count == measured.ok:
            return f"{check} check OK: {stored} {count} = {measured.ok} {answered}"
    elif measured.ok <= count <= measured.ok + bench.connections:
        return (f"{check} check OK: {stored} {count}, {measured.ok} {answered} "
                f"(+{count - measured.ok} in flight when wrk stopped)")
    return (f"WARNING: {check} check failed: {stored} {count}, "
            f"but the load generator counted {measured.ok} {answered}")


def crud_scenario(bench: Bench) -> ScenarioReport:
    """The notes API under a create/list/get/patch mix, one user per connection.

    There is no standard-library reference for CRUD, so the figures are absolute; for context,
    health_check --server asyncio is measured with the same load generators in the same run."""
    with bench.running_server("level02/notes.py", "--db", bench.workdir / "notes.sqlite3") as url:
        mix, operations = bench.measure_flow(
            "notes.py mix: POST, GET list, GET, PATCH (flows.py)", url, "notes")
        # The list alone, as fast as the run's generator goes: one user's first page of 20.
        reader = f"X-User-Id: {notes_user(0)}"
        listing = bench.measure(f"notes.py GET /notes?limit=20, {bench.load_generator.name}",
                                url + "/notes?limit=20", Request(headers=(reader,)))
        _, page = http_json("GET", url + "/notes?limit=20", headers={"X-User-Id": notes_user(0)})

    python_health = bench.health_context(PythonLoadGenerator())
    health = bench.health_context(bench.load_generator)  # the same row when the run uses loadgen.py
    rows = [mix, *[Row(f"  · {name}", result) for name, result in operations.items()], python_health, listing]
    if health.result is not python_health.result:
        rows.append(health)
    targets = [context_ratio("notes mix ÷ health_check asyncio (both Python generators)", mix, python_health),
               context_ratio(f"notes GET /notes?limit=20 ÷ health_check asyncio ({bench.load_generator.name})",
                             listing, health)]
    return ScenarioReport(rows, targets, notes=[
        f"crud: each of the {bench.connections} connections is its own X-User-Id and loops POST /notes, "
        f"GET /notes?limit=20, GET /notes/{{id}}, PATCH /notes/{{id}} (If-Match) with the id of the note it "
        f"created; the list row reads {notes_user(0)}'s first page ({len(page['items'])} notes) "
        f"on every connection"])


def auth_scenario(bench: Bench) -> ScenarioReport:
    """Logins (one scrypt hash each, by design) and requests authenticated by a bearer token on
    jwt_auth.py, beside raw scrypt hashes per second at the same cost."""
    secret = secrets.token_urlsafe(32)  # 43 characters: the server wants at least 32 bytes
    with bench.running_server("level03/jwt_auth.py", "--db", bench.workdir / "jwt_auth.sqlite3",
                              "--secret", secret) as url:
        sign_up_login_users(url, bench.connections)
        _, tokens = http_json("POST", url + "/auth/login", {"email": login_email(0), "password": LOGIN_PASSWORD})
        logins, _ = bench.measure_flow("jwt_auth.py POST /auth/login, a user per connection (flows.py)",
                                       url, "login")
        bearer = f"Authorization: Bearer {tokens['access_token']}"
        me = bench.measure(f"jwt_auth.py GET /me, Bearer token, {bench.load_generator.name}", url + "/me",
                           Request(headers=(bearer,)))
    hashes, cost = measure_scrypt_hashes(bench)
    health = bench.health_context(bench.load_generator)
    return ScenarioReport(
        rows=[logins, hashes, me, health],
        targets=[context_ratio("logins ÷ raw scrypt hashes (the bound, by design)", logins, hashes),
                 context_ratio(f"GET /me ÷ health_check asyncio ({bench.load_generator.name})", me, health)],
        notes=[f"auth: scrypt N={cost['n']} r={cost['r']} p={cost['p']} (jwt_auth's default); the reference "
               f"hashes on {cost['threads']} threads, one per core, as the server's worker pool can; a login's "
               f"latency at {bench.connections} connections is mostly its wait for the hashes queued ahead of it"],
    )


def sign_up_login_users(url: str, count: int) -> None:
    """The users of the login flow: login_email(i) for each connection i (each signup hashes a
    password, so they are sent a few at a time)."""
    def sign_up(index: int) -> None:
        status, answer = http_json("POST", url + "/auth/signup",
                                   {"email": login_email(index), "password": LOGIN_PASSWORD})
        if status != 201:
            raise BenchError(f"signup of {login_email(index)} answered {status}: {answer}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sign_up, range(count)))


def measure_scrypt_hashes(bench: Bench) -> tuple[Row, dict]:
    server = "raw hashlib.scrypt, same cost (reference)"
    print(f"  {server}", flush=True)
    command = [sys.executable, str(BENCH_DIR / "scrypt_hashes.py"), "--duration", str(bench.duration)]
    figures = run_json_process(command, timeout=bench.duration + 60)
    return Row(server, load_result(figures)), figures


CLICK_FLUSH_WAIT_S = 3.0  # url_shortener writes buffered clicks every 0.5 s by default


def redirects_scenario(bench: Bench) -> ScenarioReport:
    """Redirects on url_shortener.py, each one a click counted off the hot path, beside
    health_check --server asyncio; then the link's stats must hold every redirect answered."""
    with bench.running_server("level04/url_shortener.py", "--db", bench.workdir / "url_shortener.sqlite3") as url:
        link = create_link(url, "https://example.com/landing?campaign=bench")
        warmup = create_link(url, "https://example.com/warm-up")  # so that `link` counts the measured clicks only
        status = redirect_status(url + "/" + link["code"])
        if status != 302:
            raise BenchError(f"HEAD /{link['code']} answered {status}, not a 302 redirect")
        redirects = bench.measure(f"url_shortener.py GET /{{code}} → 302, {bench.load_generator.name}",
                                  url + "/" + link["code"], Request(expected_status=302),
                                  warmup_url=url + "/" + warmup["code"])
        clicks = counted_clicks(url, link, at_least=redirects.result.ok)
    health = bench.health_context(bench.load_generator)
    return ScenarioReport(
        rows=[redirects, health],
        targets=[ratio_target(f"url_shortener redirects ÷ health_check asyncio ({bench.load_generator.name})",
                              redirects, health, 0.8)],
        notes=[check_acknowledged("redirects", "total_clicks", clicks, redirects.result,
                                  "redirects answered 302", bench)],
    )


def create_link(url: str, target: str) -> dict:
    status, answer = http_json("POST", url + "/links", {"url": target})
    if status != 201:
        raise BenchError(f"POST /links answered {status}: {answer}")
    return answer


def redirect_status(url: str) -> int:
    """The status of HEAD url (not a click), the redirect not followed (urllib would follow it)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("HEAD", parts.path)
        return connection.getresponse().status
    except OSError as error:
        raise BenchError(f"GET {url} failed: {error}") from error
    finally:
        connection.close()


def counted_clicks(url: str, link: dict, at_least: int) -> int:
    """The link's total_clicks once the click buffer has been written (up to CLICK_FLUSH_WAIT_S)."""
    deadline = time.monotonic() + CLICK_FLUSH_WAIT_S
    while True:
        status, stats = http_json("GET", f"{url}/links/{link['code']}/stats",
                                  headers={"Authorization": f"Bearer {link['manage_token']}"})
        if status != 200:
            raise BenchError(f"GET /links/{link['code']}/stats answered {status}: {stats}")
        if stats["total_clicks"] >= at_least or time.monotonic() > deadline:
            return stats["total_clicks"]
        time.sleep(0.1)


SEARCH_P95_GOAL_MS = 30.0  # issue 12: p95 under 30 ms on 100,000 documents, a quiet machine
BULK_LINES = 10_000  # the most POST /documents/bulk takes in one request


def search_scenario(bench: Bench) -> ScenarioReport:
    """search_api.py with bench.documents generated documents: how fast they are imported, then a
    mix of queries, its latency on one connection (a query alone) and its req/s on all of them."""
    count = bench.documents
    with bench.running_server("level04/search_api.py", "--db", bench.workdir / "search_api.sqlite3") as url:
        print(f"  importing {count:,} documents (POST /documents/bulk, {BULK_LINES:,} a request)", flush=True)
        import_seconds = import_documents(url, count)
        totals = {name: query_total(url + target) for name, target in search_queries().items()}
        alone, operations = bench.measure_flow("search_api.py GET /search mix, one connection (flows.py)",
                                               url, "search", connections=1)
        loaded, _ = bench.measure_flow(f"search_api.py GET /search mix, {bench.connections} connections "
                                       "(flows.py)", url, "search")
    p95 = alone.result.p95_ms
    return ScenarioReport(
        rows=[alone, *[Row(f"  · {name}", result) for name, result in operations.items()], loaded],
        targets=[Target(f"search p95 on {count:,} documents (one connection)", f"{p95:.1f} ms",
                        f"≤ {SEARCH_P95_GOAL_MS:.0f} ms", p95 <= SEARCH_P95_GOAL_MS),
                 Target("bulk import", f"{count / import_seconds:,.0f} docs/s", "-", None)],
        notes=[f"search: {count:,} documents imported in {import_seconds:.1f} s; p50 / p95 / p99 on one "
               f"connection: " + "; ".join(f"{name} {result.p50_ms:.1f} / {result.p95_ms:.1f} / "
                                           f"{result.p99_ms:.1f} ms ({totals[name]:,} hits)"
                                           for name, result in operations.items())],
    )


def import_documents(url: str, count: int) -> float:
    """POST the generated documents in NDJSON batches; the seconds it took."""
    started = time.perf_counter()
    for body in ndjson_batches(count, BULK_LINES):
        request = urllib.request.Request(url + "/documents/bulk", body, method="POST",
                                         headers={"Content-Type": "application/x-ndjson"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
        except urllib.error.HTTPError as error:
            raise BenchError(f"POST /documents/bulk answered {error.code}: {error.read()[:500]!r}") from error
        except OSError as error:
            raise BenchError(f"POST /documents/bulk failed: {error}") from error
    return time.perf_counter() - started


def query_total(url: str) -> int:
    """How many documents a query matches (a query that matches nothing measures little)."""
    status, answer = http_json("GET", url)
    if status != 200:
        raise BenchError(f"GET {url} answered {status}: {answer}")
    return answer["total"]


EVALUATED_FLAG = {
    "key": "new-checkout", "description": "benchmarked by tests/bench/run.py", "enabled": True, "rollout": 50,
    "rules": [{"attribute": "email", "op": "ends_with", "values": ["@example.com"], "serve": "on"}],
}
# No rule matches this context, so each evaluation walks the rule and then the rollout.
EVALUATION_CONTEXT = {"targetingKey": "user-1", "email": "bob@elsewhere.example", "plan": "pro"}


def evaluations_scenario(bench: Bench) -> ScenarioReport:
    """OFREP evaluations on feature_flags.py, beside health_check --server asyncio: a flag with a
    rule and a rollout, one user's context, the SDK key as a bearer token."""
    admin_token, sdk_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with bench.running_server("level04/feature_flags.py", "--db", bench.workdir / "feature_flags.sqlite3",
                              "--admin-token", admin_token, "--sdk-key", sdk_key) as url:
        status, flag = http_json("POST", url + "/flags?env=production", EVALUATED_FLAG,
                                 headers={"Authorization": f"Bearer {admin_token}"})
        if status != 201:
            raise BenchError(f"POST /flags?env=production answered {status}: {flag}")
        evaluate = f"{url}/ofrep/v1/evaluate/flags/{EVALUATED_FLAG['key']}"
        body = {"context": EVALUATION_CONTEXT}
        bearer = f"Bearer {sdk_key}"
        probe = check_evaluation(evaluate, body, bearer)
        evaluations = bench.measure(f"feature_flags.py POST /ofrep/v1/evaluate/flags/{{key}}, "
                                    f"{bench.load_generator.name}", evaluate,
                                    Request("POST", json.dumps(body), "application/json",
                                            (f"Authorization: {bearer}",), expected_status=200))
    health = bench.health_context(bench.load_generator)
    return ScenarioReport(
        rows=[evaluations, health],
        targets=[ratio_target(f"feature_flags OFREP evaluations ÷ health_check asyncio "
                              f"({bench.load_generator.name})", evaluations, health, 0.7)],
        notes=[f"evaluations check OK: the probe answered 200, variant {probe['variant']!r}, "
               f"reason {probe['reason']} (rollout {EVALUATED_FLAG['rollout']} %, "
               f"{EVALUATION_CONTEXT['targetingKey']}'s bucket {rollout_bucket()})"],
    )


def rollout_bucket() -> int:
    """The evaluated user's bucket, by feature_flags.md's formula, computed here independently."""
    key = f"{EVALUATED_FLAG['key']}:{EVALUATION_CONTEXT['targetingKey']}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10_000


def check_evaluation(url: str, body: dict, bearer: str) -> dict:
    """One evaluation before measuring: 200, and the variant the rollout gives this user."""
    inside = rollout_bucket() < EVALUATED_FLAG["rollout"] * 100
    expected = {"key": EVALUATED_FLAG["key"], "value": inside, "variant": "on" if inside else "off",
                "reason": "SPLIT" if inside else "DEFAULT"}
    status, answer = http_json("POST", url, body, headers={"Authorization": bearer})
    if status != 200 or any(answer.get(name) != value for name, value in expected.items()):
        raise BenchError(f"POST {urlsplit(url).path} answered {status}: {answer}, expected {expected}")
    return answer


def upload_scenario(bench: Bench) -> ScenarioReport:
    """One large raw upload streamed to file_upload.py (--max-bytes raised to its size), beside
    writing the same bytes to a file and fsyncing it in the same run; and what the upload cost
    the server in memory: its peak resident set (VmHWM) over its resident set before."""
    size = bench.upload_bytes
    expected = uploads.content_sha256(size)
    print("  writing the same bytes to a file (reference)", flush=True)
    write_s = uploads.write_file_seconds(bench.workdir / "reference.bin", size)
    with bench.running_process("level04/file_upload.py", "--db", bench.workdir / "file_upload.sqlite3",
                               "--storage", bench.workdir / "uploads", "--max-bytes", str(size),
                               "--scrypt-n", "1024") as (url, pid):
        token = sign_up_and_log_in(url, "uploader@example.com")
        rss_before = settled_rss_kib(pid)
        print(f"  file_upload.py POST /files, {size / 2**20:,.0f} MiB raw body", flush=True)
        upload_s, status, answer = uploads.upload_seconds(url, token, size)
        peak = uploads.peak_rss_kib(pid)
    if status != 201 or answer["items"][0]["sha256"] != expected:
        raise BenchError(f"the upload answered {status}: {answer}")
    upload_rate, write_rate = size / upload_s / 2**20, size / write_s / 2**20
    growth_mib = (peak - rss_before) / 1024
    return ScenarioReport(
        rows=[],
        targets=[Target("upload ÷ writing the same bytes to a file", f"{write_s / upload_s:.2f}",
                        "≥ 0.5", write_s / upload_s >= 0.5),
                 Target("server peak RSS growth during the upload", f"{growth_mib:.1f} MiB",
                        "< 32 MiB", growth_mib < 32)],
        notes=[f"upload: {size / 2**20:,.0f} MiB streamed at {upload_rate:,.0f} MiB/s (stored, "
               f"fsynced, SHA-256 checked), a file written at {write_rate:,.0f} MiB/s; server RSS "
               f"{rss_before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB"],
    )


def jobs_scenario(bench: Bench) -> ScenarioReport:
    """No-op jobs end to end on job_processor.py with its default workers: enqueued over HTTP,
    claimed, run, until the last has succeeded, each exactly once. Then the same beside an extra
    `worker` process that is killed -9 mid-run: every job must still succeed (its lease expires,
    another worker claims it again), and the jobs claimed twice are counted."""
    count = bench.jobs
    db_path = bench.workdir / "jobs.sqlite3"
    with bench.running_server("level05/job_processor.py", "--db", db_path) as url:
        print(f"  job_processor.py: {count:,} no-op jobs, default workers", flush=True)
        started = time.monotonic()
        jobs.enqueue(url, count)
        finished = jobs.wait_for_succeeded(db_path, count, timeout=120)
    rate = count / (finished - started)
    runs = jobs.attempts(db_path)

    killed_db = bench.workdir / "jobs-killed.sqlite3"
    with bench.running_server("level05/job_processor.py", "--db", killed_db, "--lease-s", "1") as url:
        print("  the same with a worker process killed -9 mid-run (--lease-s 1)", flush=True)
        worker = subprocess.Popen([sys.executable, "level05/job_processor.py", "worker", "--db", killed_db,
                                   "--lease-s", "1"], cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
        enqueuing = ThreadPoolExecutor(1).submit(jobs.enqueue, url, count)
        try:
            jobs.wait_for_succeeded(killed_db, count // 3, timeout=120)
            worker.kill()
            enqueuing.result()
            jobs.wait_for_succeeded(killed_db, count, timeout=120)
        except RuntimeError as error:
            raise BenchError(str(error)) from error
        finally:
            worker.kill()
            worker.wait()
    killed_runs = jobs.attempts(killed_db)
    claimed_again = sum(n for claims, n in killed_runs.items() if claims > 1)
    return ScenarioReport(
        rows=[],
        targets=[Target("no-op jobs end to end, default workers", f"{rate:,.0f} jobs/s", "≥ 1,000",
                        rate >= 1000),
                 Target("every job ran exactly once", f"{runs.get(1, 0):,} of {count:,}", f"{count:,}",
                        runs == {1: count}),
                 Target("a worker killed -9: every job still succeeded", f"{sum(killed_runs.values()):,}",
                        f"{count:,}", sum(killed_runs.values()) == count)],
        notes=[f"jobs: {count:,} enqueued over HTTP by {jobs.CLIENTS} connections and run in "
               f"{finished - started:.2f} s; with a worker process killed -9 mid-run, {claimed_again} "
               f"job(s) were claimed again after its lease expired (at-least-once)"],
    )


UNLIMITED = "999999999/s"  # a policy every request passes: what is measured is the decision


def limits_scenario(bench: Bench) -> ScenarioReport:
    """rate_limiter.py's `POST /check` (one key, a policy it always passes, so every request
    takes the whole decision path), beside health_check asyncio; and the middleware's cost: the
    limited demo route beside the same server's unlimited `GET /health`."""
    with bench.running_server("level06/rate_limiter.py", "--policy", UNLIMITED) as url:
        body = json.dumps({"key": "bench", "policy": UNLIMITED})
        status, answer = http_json("POST", url + "/check", json.loads(body))
        if status != 200 or answer.get("allowed") is not True:
            raise BenchError(f"POST /check answered {status}: {answer}")
        checks = bench.measure(f"rate_limiter.py POST /check, {bench.load_generator.name}", url + "/check",
                               Request("POST", body, "application/json", expected_status=200))
        limited = bench.measure("rate_limiter.py GET /api/resource (the middleware)", url + "/api/resource")
        plain = bench.measure("rate_limiter.py GET /health (not limited)", url + "/health")
    health = bench.health_context(bench.load_generator)
    return ScenarioReport(
        rows=[checks, limited, plain, health],
        targets=[ratio_target(f"rate_limiter POST /check ÷ health_check asyncio ({bench.load_generator.name})",
                              checks, health, 0.7),
                 context_ratio("the demo route through the middleware ÷ the same server's /health",
                               limited, plain)],
    )


def gateway_scenario(bench: Bench) -> ScenarioReport:
    """`GET /health` on health_check asyncio, alone and through api_gateway.py (asyncio, one
    route stripping its prefix, no auth, no rate limit, upstream keep-alive), same generator."""
    with bench.running_server("level01/health_check.py", "--db", bench.workdir / "gw_health.sqlite3") as upstream:
        config = bench.workdir / "gateway.json"
        config.write_text(json.dumps({"routes": [{"prefix": "/up", "upstreams": [upstream],
                                                  "strip_prefix": True, "auth": "none",
                                                  "rate_limit": None, "timeout_s": 5}]}))
        alone = bench.measure(f"health_check asyncio GET /health, {bench.load_generator.name}",
                              upstream + "/health")
        with bench.running_server("level06/api_gateway.py", "--config", config) as gateway:
            status, _ = http_json("GET", gateway + "/up/health")
            if status != 200:
                raise BenchError(f"GET /up/health through the gateway answered {status}")
            through = bench.measure("the same through api_gateway.py", gateway + "/up/health")
    added_ms = through.result.p50_ms - alone.result.p50_ms
    return ScenarioReport(
        rows=[through, alone],
        targets=[ratio_target(f"through api_gateway ÷ health_check alone ({bench.load_generator.name})",
                              through, alone, 0.5),
                 Target("p50 the gateway adds", f"{added_ms:.2f} ms", "-", None)],
    )


LOG_BATCHES = 50                      # × logs.BATCH lines: 500,000
UDP_RATES = (5_000, 10_000, 20_000, 40_000, 80_000)   # datagrams/s, 2 s each, until one is lost


def logs_scenario(bench: Bench) -> ScenarioReport:
    """central_logging.py: NDJSON over HTTP from 4 connections, 10,000 lines a POST, each
    answered after its lines' commit; every line must then be in the database. Then syslog
    over UDP at rising rates: the highest rate at which every datagram was stored."""
    db_path, port = bench.workdir / "central_logging.sqlite3", free_port()
    with bench.running_process("level06/central_logging.py", "--db", db_path, "--syslog-port", port,
                               "--max-pending", "1000000") as (url, _):
        print(f"  central_logging.py POST /logs, {LOG_BATCHES * logs.BATCH:,} NDJSON lines", flush=True)
        seconds, accepted = logs.ingest(url, "bench-http", LOG_BATCHES)
        in_db = logs.stored(db_path, "bench-http")
        host = urlsplit(url).hostname
        lossless, losses = None, []
        for rate in UDP_RATES:
            print(f"  syslog over UDP at {rate:,} datagrams/s", flush=True)
            sent = logs.udp_burst(host, port, f"bench-udp-{rate}", rate, 2)
            kept = logs.settled_count(db_path, f"bench-udp-{rate}")
            losses.append(f"{rate:,}/s: {sent - kept:,} of {sent:,} lost")
            if kept < sent:
                break
            lossless = rate
    rate = accepted / seconds
    return ScenarioReport(
        rows=[],
        targets=[Target("NDJSON lines acknowledged durably", f"{rate:,.0f} lines/s", "≥ 100,000",
                        rate >= 100_000),
                 Target("every acknowledged line stored", f"{in_db:,} of {accepted:,}", f"{accepted:,}",
                        in_db == accepted),
                 Target("syslog over UDP, the highest rate with no loss",
                        f"{lossless:,}/s" if lossless else "none", "-", None)],
        notes=[f"logs: {accepted:,} lines in {seconds:.2f} s ({LOG_BATCHES} POSTs of {logs.BATCH:,} from "
               f"{logs.CLIENTS} connections); syslog UDP: " + "; ".join(losses)],
    )


def free_port() -> int:
    """A port free for TCP and UDP just now (the server binds both to it right after)."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        return tcp.getsockname()[1]


FANOUT_CLIENTS, FANOUT_RATE = 100, 500


def chat_scenario(bench: Bench) -> ScenarioReport:
    """Fan-out on chat.py: 100 WebSocket clients in one room, one of them sending 500 messages a
    second, each delivered to all 100 (fanout.py); beside the `websockets` library doing the
    same broadcast, when it is installed."""
    figures = {}
    with bench.running_server("level05/chat.py", "--db", bench.workdir / "chat.sqlite3") as url:
        figures["chat.py"] = measure_fanout(bench, "chat.py", url.replace("http://", "ws://"))
    if importlib.util.find_spec("websockets"):
        with bench.running_process("tests/bench/fanout.py", "reference") as (url, _):
            figures["websockets"] = measure_fanout(bench, "websockets library (reference)",
                                                   url.replace("http://", "ws://"))
    chat = figures["chat.py"]
    targets = [Target(f"chat fan-out p99, {FANOUT_CLIENTS} clients × {FANOUT_RATE} msg/s",
                      f"{chat['p99_ms']:.1f} ms", "≤ 5 ms", chat["p99_ms"] <= 5)]
    if "websockets" in figures:
        ratio = chat["deliveries_per_s"] / figures["websockets"]["deliveries_per_s"]
        targets.append(Target("chat deliveries/s ÷ websockets library", f"{ratio:.2f}", "≥ 0.5",
                              ratio >= 0.5))
    notes = [f"fan-out {name}: {f['deliveries_per_s']:,.0f} deliveries/s, p50 {f['p50_ms']:.1f} ms, "
             f"p99 {f['p99_ms']:.1f} ms; {f['complete']:,} of {f['sent']:,} messages reached all "
             f"{f['clients']} clients" for name, f in figures.items()]
    if "websockets" not in figures:
        notes.append("the websockets library is not installed: its reference is not measured")
    return ScenarioReport(rows=[], targets=targets, notes=notes)


def measure_fanout(bench: Bench, name: str, ws_url: str) -> dict:
    print(f"  {name}", flush=True)
    command = [sys.executable, str(BENCH_DIR / "fanout.py"), "measure", ws_url + "/ws?room=bench",
               "--clients", str(FANOUT_CLIENTS), "--rate", str(FANOUT_RATE), "--seconds", str(bench.duration)]
    return run_json_process(command, timeout=bench.duration + 60)


def sign_up_and_log_in(url: str, email: str) -> str:
    """A new account on a server with jwt_auth's routes: its access token."""
    for path, expected in (("/auth/signup", 201), ("/auth/login", 200)):
        status, answer = http_json("POST", url + path, {"email": email, "password": LOGIN_PASSWORD})
        if status != expected:
            raise BenchError(f"POST {path} answered {status}: {answer}")
    return answer["access_token"]


ANALYTICS_READ_KEY = "bench-read-key"
TRACK_EVENT = "Bench Track"   # the single /v1/track calls' event, counted apart from the batches'


def acknowledged_per_s(result: LoadResult) -> float:
    """2xx answers per second of the measurement (rps counts every answer)."""
    return result.ok * result.rps / result.requests if result.requests else 0.0


def analytics_scenario(bench: Bench) -> ScenarioReport:
    """analytics_collector.py: events acknowledged durably through /v1/batch (100 events a call,
    a messageId each, from every connection at once), then single /v1/track calls beside
    health_check asyncio; once the server has stopped, every acknowledged event must be in its
    database, each batch whole and once, and every track answered."""
    db_path = bench.workdir / "analytics_collector.sqlite3"
    write_key = f"Authorization: {basic_auth(ANALYTICS_WRITE_KEY)}"
    with bench.running_server("level07/analytics_collector.py", "--db", db_path, "--write-key", ANALYTICS_WRITE_KEY,
                              "--read-key", ANALYTICS_READ_KEY) as url:
        server = f"analytics_collector.py POST /v1/batch, {EVENTS_PER_BATCH} events a call (flows.py)"
        print(f"  {server}", flush=True)
        # The warm-up's batches are stored too: the check below counts them with the measured ones.
        warmup, _ = run_flow(url, "analytics-batch", bench.connections, WARMUP_S)
        batches, _ = run_flow(url, "analytics-batch", bench.connections, bench.duration)
        track_body = json.dumps({"userId": "bench-user", "event": TRACK_EVENT, "properties": {"plan": "pro"}})
        # The warm-up sends the same body to /v1/identify, which stores no track: the track count
        # below is the measured calls' alone.
        tracks = bench.measure(f"analytics_collector.py POST /v1/track, {bench.load_generator.name}",
                               url + "/v1/track", Request("POST", track_body, "application/json", (write_key,),
                                                          expected_status=200),
                               warmup_url=url + "/v1/identify")
    health = bench.health_context(bench.load_generator)
    batch_row = Row(server, batches)
    stored, whole, problems = analytics.check_batches(db_path)
    acknowledged = (warmup.ok + batches.ok) * EVENTS_PER_BATCH
    events_per_s = acknowledged_per_s(batches) * EVENTS_PER_BATCH
    all_stored = stored == acknowledged and whole == warmup.ok + batches.ok and not problems
    notes = [f"analytics: {batches.ok:,} batches of {EVENTS_PER_BATCH} acknowledged in the measurement "
             f"({batches.errors} errors), {warmup.ok:,} in the warm-up; {stored:,} batch events stored, "
             f"{whole:,} whole batches" + (f"; WARNING: {'; '.join(problems)}" if problems else ""),
             check_acknowledged("analytics tracks", "track events stored",
                                analytics.stored_tracks(db_path, TRACK_EVENT), tracks.result, "tracks answered 200",
                                bench)]
    return ScenarioReport(
        rows=[batch_row, tracks, health],
        targets=[Target("analytics_collector events acknowledged durably through /v1/batch",
                        f"{events_per_s:,.0f} events/s", "≥ 100,000", events_per_s >= 100_000),
                 Target("every acknowledged batch event stored, once", f"{stored:,} of {acknowledged:,}",
                        f"{acknowledged:,}", all_stored),
                 ratio_target(f"analytics_collector POST /v1/track ÷ health_check asyncio "
                              f"({bench.load_generator.name})", tracks, health, 0.5)],
        notes=notes,
    )


AUDIT_TOKEN = "bench-audit-token-0123456789"
AUDIT_KEY = "bench-checkpoint-key-0123456789"
AUDIT_BUILD_TIMEOUT_S = 1800   # writing a million chained entries: about 30 s on a quiet machine
AUDIT_VERIFY_TIMEOUT_S = 1800  # verifying them: about 15 s


def audit_append(actor: str) -> Request:
    body = {"actor": actor, "action": "invoice.update", "target": "invoice:1042",
            "metadata": {"amount_cents": 12500, "reason": "bench"}, "ip": "192.0.2.10"}
    return Request("POST", json.dumps(body), "application/json", (f"Authorization: Bearer {AUDIT_TOKEN}",),
                   expected_status=201)


def audit_scenario(bench: Bench) -> ScenarioReport:
    """audit_log.py: appends over HTTP (each a serialised, chained, committed entry) beside raw
    sqlite single-row commits, the chain verified afterwards; then GET /audit/verify over a log of
    bench.audit_entries entries written straight into a new database (audit_chain.py)."""
    db_path = bench.workdir / "audit_log.sqlite3"
    secrets_flags = ("--token", AUDIT_TOKEN, "--key", AUDIT_KEY)
    bearer = {"Authorization": f"Bearer {AUDIT_TOKEN}"}
    with bench.running_server("level07/audit_log.py", "--db", db_path, *secrets_flags) as url:
        # The warm-up appends as another actor, so that "bench" counts the measured appends only.
        appends = bench.measure(f"audit_log.py POST /audit, {bench.load_generator.name}", url + "/audit",
                                audit_append("bench"), warmup_request=audit_append("bench-warmup"))
        status, verdict = http_json("GET", url + "/audit/verify", headers=bearer, timeout=AUDIT_VERIFY_TIMEOUT_S)
    with analytics.read_only(db_path) as db:
        appended = db.execute("SELECT count(*) FROM entries WHERE actor = 'bench'").fetchone()[0]
    raw_sqlite = measure_sqlite_commits(bench)

    count = bench.audit_entries
    long_db = bench.workdir / "audit_log-long.sqlite3"
    print(f"  writing {count:,} chained entries into a new audit_log database (audit_chain.py)", flush=True)
    built = run_json_process([sys.executable, str(BENCH_DIR / "audit_chain.py"), "--db", str(long_db),
                              "--entries", str(count), "--key", AUDIT_KEY], timeout=AUDIT_BUILD_TIMEOUT_S)
    with bench.running_server("level07/audit_log.py", "--db", long_db, *secrets_flags) as url:
        print(f"  audit_log.py GET /audit/verify over {count:,} entries", flush=True)
        started = time.perf_counter()
        long_status, long_verdict = http_json("GET", url + "/audit/verify", headers=bearer,
                                              timeout=AUDIT_VERIFY_TIMEOUT_S)
        verify_s = time.perf_counter() - started
    expected = {"valid": True, "entries": count, "head": built["head"]}
    if long_status != 200 or long_verdict != expected:
        raise BenchError(f"GET /audit/verify over the built log answered {long_status}: {long_verdict}, "
                         f"expected {expected}")

    chain_ok = status == 200 and verdict.get("valid") is True
    return ScenarioReport(
        rows=[appends, raw_sqlite],
        targets=[ratio_target("audit_log appends ÷ raw sqlite commits", appends, raw_sqlite, 0.3),
                 Target("the appended chain verifies", "valid" if chain_ok else "INVALID", "valid", chain_ok),
                 Target(f"audit_log GET /audit/verify over {count:,} entries", f"{count / verify_s:,.0f} entries/s",
                        "-", None)],
        notes=[check_acknowledged("audit", "entries by actor bench", appended, appends.result,
                                  "appends answered 201", bench)
               + f"; GET /audit/verify after the appends: {verdict}",
               f"audit verify: {count:,} entries ({built['checkpoints']:,} checkpoints) written in "
               f"{built['seconds']:.2f} s by audit_chain.py, verified in {verify_s:.2f} s, "
               f"head {built['head'][:16]}…"],
    )


PROCESSING_TIMEOUT_S = 600


def payments_scenario(bench: Bench) -> ScenarioReport:
    """payment_webhooks.py (its default 2 workers): deliveries of properly signed Stripe events,
    each of its own id, acknowledged per second while the workers process them; then the time
    until every one is processed, polling the server's processing status; then each must be
    stored and processed once, its payment paid."""
    db_path = bench.workdir / "payment_webhooks.sqlite3"
    with bench.running_server("level07/payment_webhooks.py", "--db", db_path, "--webhook-secret",
                              WEBHOOK_SECRET) as url:
        server = "payment_webhooks.py POST /webhooks/stripe, signed, an id each (flows.py)"
        print(f"  {server}", flush=True)
        started = time.monotonic()
        warmup, _ = run_flow(url, "webhooks", bench.connections, WARMUP_S)
        deliveries, _ = run_flow(url, "webhooks", bench.connections, bench.duration)
        last_acknowledged = time.monotonic()
        print("  waiting until every delivery is processed (GET /webhooks/events?status=received)", flush=True)
        try:
            all_processed = webhooks.wait_until_processed(url, PROCESSING_TIMEOUT_S)
        except RuntimeError as error:
            raise BenchError(str(error)) from error
    outcome = webhooks.outcome(db_path)
    acknowledged = warmup.ok + deliveries.ok
    processed = outcome["statuses"].get("processed", 0)
    once = (outcome["events"] == outcome["deliveries"] == outcome["times_applied"] == processed
            == outcome["paid"] == acknowledged)
    lag = all_processed - last_acknowledged
    return ScenarioReport(
        rows=[Row(server, deliveries)],
        targets=[Target("payment_webhooks verified deliveries acknowledged",
                        f"{acknowledged_per_s(deliveries):,.0f} /s", "-", None),
                 Target("time until all are processed, after the last acknowledgement", f"{lag:.2f} s", "-", None),
                 Target("every acknowledged delivery stored and processed once, its payment paid",
                        f"{processed:,} of {acknowledged:,}", f"{acknowledged:,}", once)],
        notes=[f"payments: {acknowledged:,} deliveries acknowledged ({warmup.ok:,} in the warm-up), "
               f"{deliveries.errors} errors; all processed {all_processed - started:.2f} s after the first "
               f"({acknowledged / (all_processed - started):,.0f} events/s end to end); stored: "
               f"{outcome['events']:,} events by status {outcome['statuses']}, {outcome['deliveries']:,} "
               f"deliveries, {outcome['times_applied']:,} processings, {outcome['paid']:,} payments paid"],
    )


DEPLOY_NOTE = {"title": "bench note", "body": "some text " * 10, "tags": ["bench"]}


def deploy_scenario(bench: Bench) -> ScenarioReport:
    """`GET /notes/{id}` on deployment_ready.py configured the way it is deployed, from the
    environment (APP_ENV=production with its SECRET_KEY, DATABASE_PATH, LOG_FORMAT=json: a JSON
    line on stderr per request) with its Prometheus metrics counting every request, beside the
    same route on level02/notes.py (its X-User-Id, text access log, no metrics). Afterwards the
    metrics and the log must have counted the reads."""
    if not (REPO_ROOT / "level07" / "deployment_ready.py").exists():
        raise BenchError("level07/deployment_ready.py does not exist yet")
    environment = {"APP_ENV": "production", "SECRET_KEY": secrets.token_hex(32), "LOG_FORMAT": "json",
                   "DATABASE_PATH": str(bench.workdir / "deployment_ready.sqlite3")}
    with bench.running_process("level07/deployment_ready.py", env=environment) as (url, pid):
        note_url = f"{url}/notes/{create_note(url, {})}"
        deployed = bench.measure(f"deployment_ready.py GET /notes/{{id}}, metrics, JSON logs, "
                                 f"{bench.load_generator.name}", note_url)
        metrics_text, _ = fetch(url + "/metrics")
        log_path = Path(os.readlink(f"/proc/{pid}/fd/2"))
    counted = metric_note_reads(metrics_text.decode())
    logged = json_log_reads(log_path)
    user = notes_user(0)
    with bench.running_server("level02/notes.py", "--db", bench.workdir / "deploy-notes.sqlite3") as url:
        note_url = f"{url}/notes/{create_note(url, {'X-User-Id': user})}"
        notes = bench.measure(f"notes.py GET /notes/{{id}}, X-User-Id, {bench.load_generator.name}", note_url,
                              Request(headers=(f"X-User-Id: {user}",)))
    # Each served read counted once by the metrics and logged once; the warm-up's reads too, and
    # with wrk those still in flight when it stopped: at least the reads answered.
    answered = deployed.result.ok
    all_counted = counted >= answered and logged is not None and logged >= answered
    return ScenarioReport(
        rows=[deployed, notes],
        targets=[ratio_target(f"deployment_ready GET /notes/{{id}} ÷ level 02 notes.py's "
                              f"({bench.load_generator.name})", deployed, notes, 0.8),
                 Target("reads counted by /metrics and logged as JSON lines",
                        f"{counted:,} and {'not JSON' if logged is None else f'{logged:,}'}",
                        f"≥ {answered:,}", all_counted)],
        notes=[f"deploy: deployment_ready.py configured by its environment (APP_ENV=production, SECRET_KEY, "
               f"DATABASE_PATH, LOG_FORMAT=json), metrics on; {answered:,} reads answered 200 in the measurement, "
               f"{counted:,} counted by http_requests_total (warm-up included), "
               + ("a line of its log was not JSON" if logged is None else f"{logged:,} logged as JSON lines")],
    )


def create_note(url: str, headers: dict[str, str]) -> int:
    status, note = http_json("POST", url + "/notes", DEPLOY_NOTE, headers=headers)
    if status != 201:
        raise BenchError(f"POST /notes answered {status}: {note}")
    return note["id"]


def metric_note_reads(exposition: str) -> int:
    """The `GET /notes/{id}` 200s that http_requests_total counted, in Prometheus' text format
    (the route label holds braces of its own: `route="/notes/{note_id:int}"`)."""
    reads = 0
    for line in exposition.splitlines():
        if not line.startswith("http_requests_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        if all(label in labels for label in ('method="GET"', 'route="/notes/{', 'status="200"')):
            reads += int(float(value))
    return reads


def json_log_reads(log_path: Path) -> int | None:
    """The `GET /notes/{id}` 200s in a JSON log (one object a line); None if a line is not JSON."""
    reads = 0
    with open(log_path, encoding="utf-8") as log:
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                return None
            reads += (entry.get("method") == "GET" and entry.get("status") == 200
                      and str(entry.get("path", "")).startswith("/notes/"))
    return reads


SCENARIOS: dict[str, Callable[[Bench], ScenarioReport]] = {
    "health": health_scenario,
    "connections": connections_scenario,
    "counter": counter_scenario,
    "crud": crud_scenario,
    "auth": auth_scenario,
    "redirects": redirects_scenario,
    "search": search_scenario,
    "evaluations": evaluations_scenario,
    "upload": upload_scenario,
    "jobs": jobs_scenario,
    "chat": chat_scenario,
    "limits": limits_scenario,
    "logs": logs_scenario,
    "gateway": gateway_scenario,
    "analytics": analytics_scenario,
    "audit": audit_scenario,
    "payments": payments_scenario,
    "deploy": deploy_scenario,
}


# --- Report -------------------------------------------------------------------------------------


def print_table(header: list[str], lines: list[list[str]], left_aligned: int) -> None:
    """Columns sized to fit; the first left_aligned columns are text, the rest numbers."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    for line in [header, *lines]:
        cells = [cell.ljust(width) if i < left_aligned else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())


def print_report(reports: dict[str, ScenarioReport]) -> None:
    if not reports:
        return
    if any(report.rows for report in reports.values()):  # the connections scenario has none
        print()
        print_table(
            ["scenario", "server", "req/s", "p50 ms", "p99 ms", "errors"],
            [[name, row.server, f"{row.result.rps:,.0f}" if row.result.rps >= 100 else f"{row.result.rps:.1f}",
              f"{row.result.p50_ms:.2f}",
              f"{row.result.p99_ms:.2f}", str(row.result.errors)]
             for name, report in reports.items() for row in report.rows],
            left_aligned=2,
        )
    print()
    print_table(
        ["target", "value", "goal", "result"],
        [[target.description, target.value, target.goal, {True: "PASS", False: "MISS", None: "-"}[target.met]]
         for report in reports.values() for target in report.targets],
        left_aligned=1,
    )
    notes = [note for report in reports.values() for note in report.notes]
    if notes:
        print()
        for note in notes:
            print(note)


def load_average_before_run() -> str:
    """The 1-minute load average, with a word when other processes already compete for the cores."""
    load = os.getloadavg()[0]
    busy = " (other processes compete for the cores: figures are low, ratios noisier)" if load > 1 else ""
    return f"{load:.2f}{busy}"


def choose_load_generator(tool: str | None, workdir: Path) -> WrkLoadGenerator | PythonLoadGenerator:
    wrk = shutil.which("wrk")
    if tool == "python" or (tool is None and not wrk):
        return PythonLoadGenerator()
    if not wrk:
        raise BenchError("--tool wrk: wrk is not installed (apt-get install wrk, brew install wrk)")
    return WrkLoadGenerator(wrk, workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the project's servers against stdlib references.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--only", choices=list(SCENARIOS), help="run this scenario only")
    parser.add_argument("--tool", choices=["wrk", "python"], help="load generator (default: wrk if installed)")
    parser.add_argument("--idle-connections", type=int, default=1000,
                        help="keep-alive connections held open at once by the connections scenario (default 1000)")
    parser.add_argument("--documents", type=int, default=100_000,
                        help="documents indexed by the search scenario (default 100,000)")
    parser.add_argument("--upload-mib", type=int, default=1024,
                        help="size of the upload scenario's body in MiB (default 1024)")
    parser.add_argument("--audit-entries", type=int, default=1_000_000,
                        help="entries in the log the audit scenario verifies (default 1,000,000)")
    args = parser.parse_args()
    if min(args.duration, args.connections, args.idle_connections, args.documents, args.upload_mib,
           args.audit_entries) < 1:
        parser.error("--duration, --connections, --idle-connections, --documents, --upload-mib and "
                     "--audit-entries must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        try:
            load_generator = choose_load_generator(args.tool, Path(workdir))
        except BenchError as error:
            parser.error(str(error))
        bench = Bench(load_generator, args.duration, args.connections, Path(workdir), args.idle_connections,
                      args.documents, upload_bytes=args.upload_mib * 2**20, audit_entries=args.audit_entries)
        print(f"load generator: {load_generator.description}")
        print(f"{args.connections} keep-alive connections, {args.duration} s per measurement after a "
              f"{WARMUP_S} s warm-up; {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        print(f"load average before the run: {load_average_before_run()}")

        reports: dict[str, ScenarioReport] = {}
        failed = []
        for name, scenario in SCENARIOS.items():
            if args.only and name != args.only:
                continue
            print(f"{name}:", flush=True)
            try:
                reports[name] = scenario(bench)
            except BenchError as error:
                failed.append(name)
                print(f"  scenario {name} could not run: {error}", flush=True)

    print_report(reports)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
