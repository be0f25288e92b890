"""Black-box harness: start a project the way spec/common.md says, talk to it, stop it cleanly.

A server is started as a subprocess exactly as a learner would run it, from a temporary working
directory (so it must not depend on the current directory or on PYTHONPATH):

    python levelNN/<name>.py --port 0 [--db TMP/db.sqlite3] [extra args]

`--db` is added only when the project's `--help` mentions it. The harness reads the first stdout
line (with a deadline) and expects exactly `listening on http://HOST:PORT`. stderr goes to a file,
never a pipe: a pipe nobody reads fills up and the server blocks on its next log line.

`stop()` sends SIGTERM (or the given signal) and asserts exit status 0 within 10 s; `kill9()` is
for durability tests. The pytest fixtures in conftest.py stop every server still running at
teardown and assert the clean exit there too.

Helpers for the tests themselves:

- `expect(resp, status)` / `expect_json` / `expect_problem`: on failure the message carries the
  request as a curl command and the response, so a failure can be replayed by hand;
- `raw_exchange(host, port, data)`, `RawConnection` and `parse_response`: the wire, for tests
  whose point is framing (keep-alive, pipelining, HEAD, limits, garbage).
"""
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

START_TIMEOUT = 15.0   # s until the `listening on` line
STOP_TIMEOUT = 10.0    # s from the signal to the exit
LISTENING = re.compile(
    r"listening on http://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>[0-9]{1,5})")

# Variables that would make a server work only under the test's environment.
_SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUNBUFFERED")


# --------------------------------------------------------------------------------------------
# Starting and stopping servers


def script_path(script):
    """`level01/counter.py` → its absolute path under the repository root."""
    path = Path(script)
    return path if path.is_absolute() else ROOT / path


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=None)
def help_text(script):
    """The project's `--help` output (stdout and stderr), cached per script."""
    done = subprocess.run([sys.executable, str(script_path(script)), "--help"],
                          capture_output=True, text=True, timeout=30, cwd=tempfile.gettempdir(),
                          env=clean_env(), stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def takes_db(script):
    """Whether the project stores data, i.e. its `--help` mentions `--db`."""
    return "--db" in help_text(script)


def _has_flag(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in map(str, args))


class Server:
    """One running project. Attributes: `url`, `host`, `port`, `proc`, `db_path`, `workdir`,
    `cmd`. Methods: `stderr_text()`, `stdout_text()`, `wait_for_stderr()`, `stop()`,
    `kill9()`, `send_signal()`."""

    def __init__(self, script, *args, workdir, db="auto", env=None,
                 start_timeout=START_TIMEOUT, preexec_fn=None):
        self.script = str(script)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stopped = False
        self.returncode = None
        self.stop_seconds = None
        args = [str(a) for a in args]
        cmd = [sys.executable, str(script_path(script))]
        if not _has_flag(args, "--port"):
            cmd += ["--port", "0"]
        self.db_path = None
        if _has_flag(args, "--db"):
            i = next(i for i, a in enumerate(args) if a == "--db" or a.startswith("--db="))
            self.db_path = Path(args[i].partition("=")[2] if "=" in args[i] else args[i + 1])
        elif db == "auto":
            if takes_db(script):
                self.db_path = self.workdir / "db.sqlite3"
        elif db:
            self.db_path = Path(db)
        if self.db_path is not None and not _has_flag(args, "--db"):
            cmd += ["--db", str(self.db_path)]
        self.cmd = cmd + args
        self.stderr_path = self.workdir / "stderr.log"
        self._stdout_chunks = []
        self._first_line = None
        self._ready = threading.Event()
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=stderr,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         env=clean_env(env), preexec_fn=preexec_fn)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True,
                                        name=f"stdout-{Path(self.script).stem}")
        self._reader.start()
        try:
            self._await_listening(start_timeout)
        except BaseException:
            self._kill_quietly()
            raise

    # -- start-up

    def _read_stdout(self):
        try:
            self._first_line = self.proc.stdout.readline()
            self._ready.set()
            while chunk := self.proc.stdout.read1(65536):
                self._stdout_chunks.append(chunk)
        except (OSError, ValueError):
            pass
        finally:
            self._ready.set()

    def _await_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if time.monotonic() > deadline:
                raise AssertionError(self._describe(
                    f"no `listening on` line on stdout within {timeout:.0f} s"))
        line = self._first_line or b""
        if not line:
            self.proc.wait(timeout=5)
            raise AssertionError(self._describe(
                f"exited with status {self.proc.returncode} before printing `listening on`"))
        text = line.decode("utf-8", "replace")
        match = LISTENING.fullmatch(text.rstrip("\n"))
        if not text.endswith("\n") or not match:
            raise AssertionError(self._describe(
                f"first stdout line is {text!r}, not exactly 'listening on http://HOST:PORT\\n'"))
        self.port = int(match["port"])
        if not 0 < self.port < 65536:
            raise AssertionError(self._describe(f"`listening on` names port {self.port}"))
        self.host = match["host"].strip("[]")
        self.url = f"http://{match['host']}:{self.port}"

    def _describe(self, problem):
        return (f"{problem}\n  command: {shlex.join(self.cmd)}\n  cwd: {self.workdir}\n"
                f"  stderr:\n{_indent(self.stderr_text()[-4000:])}")

    def _kill_quietly(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.stopped = True
        self.returncode = self.proc.returncode

    # -- observing

    @property
    def running(self):
        return self.proc.poll() is None

    def stderr_text(self):
        """Everything the server wrote to stderr so far (access log, trace, errors)."""
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self):
        """What the server printed on stdout after the `listening on` line (should be nothing).
        Complete only once the server has exited."""
        if not self.running:
            self._reader.join(timeout=2)
        return b"".join(self._stdout_chunks).decode("utf-8", "replace")

    def wait_for_stderr(self, pattern, timeout=5.0):
        """Poll stderr until a line matches `pattern` (a regex or a plain string); return that
        line. Log lines may be written just after the response, hence the poll."""
        regex = re.compile(pattern if isinstance(pattern, re.Pattern) else re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            for line in self.stderr_text().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(self._describe(
                    f"no stderr line matching {regex.pattern!r} within {timeout} s"))
            time.sleep(0.02)

    def stderr_lines(self, needle):
        return [line for line in self.stderr_text().splitlines() if needle in line]

    # -- stopping

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Send `sig` and assert the server exits with status 0 within `timeout` seconds
        (killed, and the test failed, otherwise). Returns the seconds it took."""
        if self.stopped:
            return self.stop_seconds
        started = time.monotonic()
        exited_before = self.proc.poll() is not None
        if not exited_before:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_quietly()
            raise AssertionError(self._describe(
                f"still running {timeout:.0f} s after {signal.Signals(sig).name}; killed"))
        self.stopped = True
        self.returncode = code
        self.stop_seconds = time.monotonic() - started
        self._reader.join(timeout=2)
        if exited_before:
            raise AssertionError(self._describe(
                f"had already exited (status {code}) before {signal.Signals(sig).name}"))
        if code != 0:
            raise AssertionError(self._describe(
                f"exit status {code} after {signal.Signals(sig).name}, not 0"))
        return self.stop_seconds

    def kill9(self):
        """SIGKILL, as a crash: nothing is flushed or closed. Returns the exit status (-9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(timeout=STOP_TIMEOUT)
        self.stopped = True
        self.returncode = code
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.stop()
        else:
            self._kill_quietly()

    def __repr__(self):
        return f"<Server {self.script} {getattr(self, 'url', '?')} pid={self.proc.pid}>"


class ServerGroup:
    """Starts servers and stops all of them at the end, asserting a clean exit for each."""

    def __init__(self, tmp_path_factory=None):
        self._tmp_path_factory = tmp_path_factory
        self.servers = []

    def _workdir(self, script):
        stem = Path(str(script)).stem
        if self._tmp_path_factory is not None:
            return self._tmp_path_factory.mktemp(stem)
        return Path(tempfile.mkdtemp(prefix=f"{stem}-"))

    def start(self, script, *args, db="auto", env=None, workdir=None,
              start_timeout=START_TIMEOUT, preexec_fn=None):
        """Start `script` ("level01/counter.py") with `--port 0`, a fresh `--db` when the project
        takes one (or `db=PATH` to reuse a file, `db=None` for none) and `args`. `preexec_fn`
        runs in the child before the server starts (e.g. to set a resource limit)."""
        server = Server(script, *args, workdir=workdir or self._workdir(script), db=db, env=env,
                        start_timeout=start_timeout, preexec_fn=preexec_fn)
        self.servers.append(server)
        return server

    __call__ = start

    def stop_all(self):
        problems = []
        for server in self.servers:
            if server.stopped:
                continue
            try:
                server.stop()
            except AssertionError as err:
                problems.append(f"{server.script}: {err}")
        self.servers.clear()
        if problems:
            raise AssertionError("unclean shutdown at teardown:\n" + "\n".join(problems))


def run_once(script, *args, timeout=20):
    """Run a project that is expected to exit by itself (bad flags, unusable port or db):
    returns the CompletedProcess; a server that starts and keeps running is killed and fails."""
    cmd = [sys.executable, str(script_path(script)), *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=tempfile.gettempdir(), env=clean_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{shlex.join(cmd)} still running after {timeout} s "
                             f"(stdout {err.stdout!r}); it should have exited") from None


# --------------------------------------------------------------------------------------------
# requests helpers: on failure, show the request as curl


_DEFAULT_REQUESTS_HEADERS = {"user-agent", "accept-encoding", "accept", "connection",
                             "content-length"}


def curl_command(request):
    """A `requests.PreparedRequest` as a curl command line that replays it."""
    parts = ["curl", "-i"]
    if request.method == "HEAD":
        parts.append("-I")
    elif request.method != "GET" or request.body:
        parts += ["-X", request.method]
    parts.append(request.url)
    for name, value in request.headers.items():
        if name.lower() in _DEFAULT_REQUESTS_HEADERS:
            if name.lower() != "connection" or value.lower() != "close":
                continue
        parts += ["-H", f"{name}: {value}"]
    body = request.body
    if body:
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                body = None
                parts += ["--data-binary", f"@<{len(request.body)} binary bytes>"]
        if body is not None:
            parts += ["--data-binary", body if isinstance(body, str) else repr(body)]
    return shlex.join(parts)


def describe_exchange(resp, limit=2000):
    headers = "\n".join(f"    {k}: {v}" for k, v in resp.headers.items())
    body = resp.content[:limit].decode("utf-8", "replace")
    more = " …" if len(resp.content) > limit else ""
    return (f"  request:  {curl_command(resp.request)}\n"
            f"  response: {resp.status_code} {resp.reason}\n{headers}\n"
            f"  body: {body}{more}")


def expect(resp, status, *, content_type=None):
    """Assert the response's status (an int or a collection of ints) and optionally the media
    type. The message replays the request as curl. Returns `resp`."""
    ok = resp.status_code in status if isinstance(status, (set, tuple, list, range)) \
        else resp.status_code == status
    if not ok:
        raise AssertionError(f"expected status {status}, got {resp.status_code}\n"
                             + describe_exchange(resp))
    if content_type is not None:
        media = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media != content_type:
            raise AssertionError(f"expected Content-Type {content_type}, got {media!r}\n"
                                 + describe_exchange(resp))
    return resp


def expect_json(resp, status):
    """`expect` with `application/json`; returns the decoded body."""
    expect(resp, status, content_type="application/json")
    try:
        return resp.json()
    except ValueError:
        raise AssertionError("body is not JSON\n" + describe_exchange(resp)) from None


def request_schemas(get, url):
    """{(METHOD, path): JSON Schema} of every operation in the server's /openapi.json that takes
    a JSON body; `get` is `requests.get` or a session's."""
    doc = expect_json(get(url + "/openapi.json", timeout=10), 200)
    return {(method.upper(), path): body["content"]["application/json"]["schema"]
            for path, operations in doc["paths"].items()
            for method, operation in operations.items()
            if "application/json" in (body := operation.get("requestBody", {})).get("content", {})}


def without_description(schema):
    return {key: value for key, value in schema.items() if key != "description"}


def expect_problem(resp, status):
    """An RFC 9457 problem: `application/problem+json` with type, title and the same status,
    and no stack trace. Returns the decoded problem."""
    expect(resp, status, content_type="application/problem+json")
    try:
        problem = resp.json()
    except ValueError:
        raise AssertionError("problem body is not JSON\n" + describe_exchange(resp)) from None
    ok = (isinstance(problem, dict) and isinstance(problem.get("type"), str)
          and isinstance(problem.get("title"), str) and problem.get("status") == resp.status_code)
    if not ok:
        raise AssertionError("not an RFC 9457 problem (type, title, status)\n"
                             + describe_exchange(resp))
    if "Traceback" in resp.text:
        raise AssertionError("the problem leaks a traceback\n" + describe_exchange(resp))
    return problem


# --------------------------------------------------------------------------------------------
# The wire: raw sockets and a minimal HTTP/1.1 response parser


class RawResponse:
    """A parsed response. `headers` keeps order and repeats; `header(name)` is the first
    value (case-insensitive) or None."""

    def __init__(self, version, status, reason, headers, body, raw):
        self.version, self.status, self.reason = version, status, reason
        self.headers, self.body, self.raw = headers, body, raw

    def header(self, name, default=None):
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def header_values(self, name):
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    @property
    def header_names(self):
        return {key.lower() for key, _ in self.headers}

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self):
        return f"<RawResponse {self.status} {self.reason} {len(self.body)} body bytes>"


class Incomplete(Exception):
    """More bytes are needed to finish the response."""


def parse_response(data, *, head=False, eof=False):
    """Parse one response from the front of `data`. Returns `(RawResponse, rest)`.

    `head=True`: the answer to a HEAD request, which has no body whatever its headers say.
    `eof=True`: the peer has closed, so a body without length ends here. Raises `Incomplete`
    when more bytes are needed and ValueError when the bytes are not an HTTP response."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if eof and data:
            raise ValueError(f"connection closed inside a response head: {data[:200]!r}")
        raise Incomplete
    head_bytes, rest = data[:end], data[end + 4:]
    lines = head_bytes.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"(HTTP/\d\.\d) (\d{3}) ?(.*)", lines[0])
    if not match:
        raise ValueError(f"not an HTTP status line: {lines[0][:200]!r}")
    version, status, reason = match[1], int(match[2]), match[3]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"malformed response header line {line[:200]!r}")
        headers.append((name, value.strip(" \t")))
    response = RawResponse(version, status, reason, headers, b"", data[:end + 4])
    if head or 100 <= status < 200 or status in (204, 304):
        return response, rest
    te = ",".join(response.header_values("Transfer-Encoding")).lower()
    if "chunked" in te:
        body, rest = _dechunk(rest, eof)
    elif response.header("Content-Length") is not None:
        length = int(response.header("Content-Length"))
        if len(rest) < length:
            if eof:
                raise ValueError(f"connection closed after {len(rest)} of {length} body bytes")
            raise Incomplete
        body, rest = rest[:length], rest[length:]
    else:
        if not eof:
            raise Incomplete
        body, rest = rest, b""
    response.body = body
    response.raw = data[:len(data) - len(rest)]
    return response, rest


def _dechunk(data, eof):
    body, pos = b"", 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            raise ValueError("truncated chunked body") if eof else Incomplete()
        size = int(data[pos:line_end].split(b";")[0].strip(), 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", pos)
            while trailer_end >= 0 and trailer_end != pos:  # skip trailer fields
                pos = trailer_end + 2
                trailer_end = data.find(b"\r\n", pos)
            if trailer_end < 0:
                raise ValueError("truncated chunked body") if eof else Incomplete()
            return body, data[pos + 2:]
        if len(data) < pos + size + 2:
            raise ValueError("truncated chunked body") if eof else Incomplete()
        body += data[pos:pos + size]
        pos += size + 2


def parse_responses(data, heads=()):
    """All complete responses in `data` (what a closed connection delivered). `heads` lists
    the indexes of responses that answer HEAD requests."""
    responses = []
    while data:
        response, data = parse_response(data, head=len(responses) in heads, eof=True)
        responses.append(response)
    return responses


def raw_exchange(host, port, data, timeout=5.0):
    """Connect, send `data`, and return every byte the server sent until it closed the
    connection or `timeout` seconds passed."""
    with RawConnection(host, port, timeout=timeout) as conn:
        conn.send(data)
        return conn.read_until_closed(timeout, fail=False)


class RawConnection:
    """A client socket for wire-level tests: send bytes, read one response at a time, check
    whether the server closed the connection."""

    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closed_by_peer = False
        self.sent = b""

    def send(self, data):
        self.sent += data
        self.sock.sendall(data)

    def _recv(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed_by_peer = True
        self.buffer += chunk
        return chunk

    def read_response(self, head=False, timeout=5.0):
        """The next complete response. Fails if the server closes or stays silent first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response, self.buffer = parse_response(self.buffer, head=head,
                                                       eof=self.closed_by_peer)
                return response
            except Incomplete:
                pass
            except ValueError as err:
                raise AssertionError(f"{err}\n  sent: {self.sent[:600]!r}") from None
            if self.closed_by_peer:
                raise AssertionError(f"server closed the connection before a full response "
                                     f"(got {self.buffer[:300]!r})\n  sent: {self.sent[:600]!r}")
            try:
                self._recv(deadline)
            except TimeoutError:
                raise AssertionError(f"no complete response within {timeout} s "
                                     f"(got {self.buffer[:300]!r})\n  sent: {self.sent[:600]!r}"
                                     ) from None

    def read_until_closed(self, timeout=5.0, fail=True):
        """Every byte until the server closes. With `fail`, not closing in time is an
        AssertionError; otherwise what arrived so far is returned."""
        deadline = time.monotonic() + timeout
        while not self.closed_by_peer:
            try:
                self._recv(deadline)
            except TimeoutError:
                if fail:
                    raise AssertionError(f"server kept the connection open more than {timeout} s"
                                         f"\n  sent: {self.sent[:600]!r}") from None
                break
        data, self.buffer = self.buffer, b""
        return data

    def is_closed(self, timeout=2.0):
        """True when the server closes the connection within `timeout` (sending nothing more
        than what is already buffered is not required)."""
        try:
            self.read_until_closed(timeout)
            return True
        except AssertionError:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request_bytes(method, target, headers=(), body=b"", host="test.invalid"):
    """A request as bytes: `Host` first, then `headers` ((name, value) pairs or a dict),
    then `Content-Length` when there is a body and no framing header was given."""
    headers = list(headers.items()) if isinstance(headers, dict) else list(headers)
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _indent(text, prefix="    "):
    return "\n".join(prefix + line for line in text.splitlines()) or prefix + "(empty)"


def assert_content_length(resp):
    length = resp.header("Content-Length")
    assert length is not None, f"no Content-Length on a {resp.status}: {resp.raw[:400]!r}"
    assert int(length) == len(resp.body), f"Content-Length {length}, body {len(resp.body)} bytes"


def assert_still_serving(server):
    """After a request meant to upset it, the server still answers a fresh connection."""
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/health", {"Connection": "close"}))
        resp = conn.read_response()
    assert resp.status == 200, f"after the bad request GET /health → {resp.status}"


def assert_quiet_exit(server):
    """After a stop: no traceback on stderr, nothing on stdout after the `listening on` line
    but the further lines a level file names (level04.md: the mail catcher's `listening on
    smtp://…`; level06.md: central_logging's `syslog on udp+tcp://…`)."""
    assert "Traceback" not in server.stderr_text(), server.stderr_text()[-2000:]
    stray = re.sub(r"(?m)^(listening on [a-z]+|syslog on udp\+tcp)://\S+\n", "",
                   server.stdout_text())
    assert stray == "", f"stdout after the `listening on` line: {stray!r}"


def assert_sigterm_closes_an_idle_connection(server):
    """SIGTERM while a keep-alive connection idles: the server closes it and exits 0 promptly."""
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
        took = server.stop(signal.SIGTERM, timeout=5)
        assert conn.is_closed(timeout=2), "the idle connection survived the server"
    assert took < 5
    assert_quiet_exit(server)
