"""The wire-level contract (spec/common.md "HTTP behaviour"), checked once per transport on the
test application tests/lib/transport_app.py: framing, Content-Length, HEAD, keep-alive,
pipelining, smuggling, chunked bodies, limits, garbage, timeouts, the connection limit, signals.

These rules belong to lib's transports, not to a project, so they run here once for
`--server asyncio` and once for `--server threaded`; each project's own rules stay in
tests/test_contract.py. The last section holds the wire faults of issue 10 item 7, which the
connection machine must not carry over.
"""
import hashlib
import json
import select
import signal
import socket
import struct
import threading
import time
import uuid

import pytest
import requests

from tests.harness import (RawConnection, assert_content_length, assert_quiet_exit,
                           assert_sigterm_closes_an_idle_connection, assert_still_serving,
                           raw_exchange, request_bytes, run_once)

APP = "tests/lib/transport_app.py"
TRANSPORTS = ("asyncio", "threaded")
BODY_ROUTE = "/echo"  # takes any body, up to the default limit of 1 MiB
DECODE_DEADLINE = 20.0  # s: a test timeout for a body a linear decoder reads in about a second


@pytest.fixture(scope="module")
def servers(start_server_module):
    """One transport_app per transport, shared by the module's read-only tests. A head must
    arrive within 3 s (--idle-timeout), so a head a server cannot parse costs seconds, not ten."""
    return {transport: start_server_module(APP, "--server", transport, "--idle-timeout", "3")
            for transport in TRANSPORTS}


@pytest.fixture(params=TRANSPORTS)
def wire_server(request, servers):
    return servers[request.param]


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


# --------------------------------------------------------------------------------------------
# Framing, keep-alive, pipelining, HEAD


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
# Smuggling, chunked, limits, garbage


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
    raw = (f"POST {BODY_ROUTE} HTTP/1.1\r\nHost: test.invalid\r\nContent-Type: application/json"
           f"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() \
        + b"zz\r\n{}\r\n0\r\n\r\n"
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
    assert 400 <= resp.status < 500, f"POST {BODY_ROUTE} with a bad chunk size → {resp.status}"
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
# Slow and idle clients, the connection limit


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_idle_client_is_dropped_and_does_not_block_others(start_server, transport):
    server = start_server(APP, "--server", transport, "--idle-timeout", "1")
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_over_the_limit_gets_503_and_a_freed_slot_serves_again(start_server,
                                                                          transport):
    server = start_server(APP, "--server", transport, "--max-connections", "2")
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
# Signals


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigint_exits_0(start_server, transport):
    server = start_server(APP, "--server", transport)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/health", {"Connection": "close"}))
        assert conn.read_response().status == 200
    server.stop(signal.SIGINT)
    assert_quiet_exit(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(start_server, transport):
    server = start_server(APP, "--server", transport)
    assert_sigterm_closes_an_idle_connection(server)


# --------------------------------------------------------------------------------------------
# Wire faults the connection machine must not carry over (issue 10, item 7)


def one_byte_chunks(body):
    """`body` as chunked framing, one byte a chunk (`1\\r\\nX\\r\\n`), then the last chunk."""
    size = len(body)
    wire = bytearray(6 * size)
    wire[0::6], wire[1::6], wire[2::6] = b"1" * size, b"\r" * size, b"\n" * size
    wire[3::6] = body
    wire[4::6], wire[5::6] = b"\r" * size, b"\n" * size
    return bytes(wire) + b"0\r\n\r\n"


class Uploader(threading.Thread):
    """Sends `data` on `conn` in pieces from a thread of its own; `sent_at_least(n)` waits until
    n bytes are out. A server that stops reading (it answered, or closed) ends the upload."""

    def __init__(self, conn, data, piece=64 * 1024):
        super().__init__(daemon=True)
        self.conn, self.data, self.piece = conn, data, piece
        self.sent = 0
        self.error = None
        self.progress = threading.Condition()

    def run(self):
        try:
            for start in range(0, len(self.data), self.piece):
                self.conn.sock.sendall(self.data[start:start + self.piece])
                with self.progress:
                    self.sent = start + len(self.data[start:start + self.piece])
                    self.progress.notify_all()
        except OSError as error:  # the server refused the rest (reset, broken pipe, timeout)
            self.error = error
        finally:
            with self.progress:
                self.progress.notify_all()

    @property
    def finished(self):
        return self.sent == len(self.data)

    def sent_at_least(self, count, timeout):
        with self.progress:
            return self.progress.wait_for(
                lambda: self.sent >= count or self.error or not self.is_alive(), timeout)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_body_of_a_million_one_byte_chunks_is_read_whole_and_others_are_served_meanwhile(
        start_server, transport):
    """2 MiB in one-byte chunks (12 MiB on the wire). Decoding must be linear in what
    arrives: a decoder that re-slices its buffer per chunk spends seconds on each read (about
    25 s for this body on today's asyncio transport, which holds every other client up
    meanwhile), a linear one about a second. The 20 s bound is a test timeout, not a speed
    target."""
    server = start_server(APP, "--server", transport)
    body = bytes(range(256)) * 4096 * 2
    wire = one_byte_chunks(body)
    started = time.monotonic()
    with RawConnection(server.host, server.port, timeout=60) as upload:
        upload.send(request_bytes("POST", "/echo/big", {"Transfer-Encoding": "chunked"}))
        uploader = Uploader(upload, wire)
        uploader.start()
        assert uploader.sent_at_least(len(wire) // 6, timeout=30), "the upload did not start"
        # While the upload is under way, three other requests, one after the other, each from
        # a client of its own, must be answered before the upload's own answer.
        for n in range(3):
            with RawConnection(server.host, server.port) as other:
                other.send(request_bytes("GET", "/health", {"Connection": "close"}))
                assert other.read_response(timeout=30).status == 200
            upload_answered = select.select([upload.sock], [], [], 0)[0]
            assert not upload_answered, (
                f"GET /health number {n + 1} was answered only after the server had decoded "
                f"the whole chunked upload ({uploader.sent} of {len(wire)} bytes sent): the "
                f"decoder holds other clients up")
        resp = upload.read_response(timeout=max(1.0, DECODE_DEADLINE - (time.monotonic()
                                                                        - started)))
        uploader.join(timeout=10)
        assert uploader.error is None, f"the upload was cut short: {uploader.error!r}"

    assert resp.status == 200, resp.raw[:300]
    assert resp.header("X-Length") == str(len(body))
    assert resp.body == body


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chunk_extensions_count_against_the_body_limit(start_server, transport):
    """20 KB of data with a 1,000-byte extension on every one-byte chunk: 20 MB on the wire,
    which must not be read as if only the 20 KB counted (the body limit is 1 MiB)."""
    server = start_server(APP, "--server", transport)
    extension = b";x=" + b"e" * 1000
    count = 20_000
    wire = (b"1" + extension + b"\r\nX\r\n") * count + b"0\r\n\r\n"
    assert len(wire) > 20_000_000
    with RawConnection(server.host, server.port, timeout=60) as conn:
        conn.send(request_bytes("POST", "/echo", {"Transfer-Encoding": "chunked"}))
        uploader = Uploader(conn, wire)
        uploader.start()
        resp = conn.read_response(timeout=60)
        uploader.join(timeout=10)
    assert resp.status in (400, 413), (
        f"{len(wire)} bytes of chunked framing for a {count}-byte body → {resp.status} "
        f"{resp.body[:200]!r}; everything read must count against the limit")
    assert resp.header("X-Length") is None
    assert not uploader.finished, "the server read all 20 MB before refusing them"
    assert_still_serving(server)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_body_that_drips_in_hits_a_total_deadline(start_server, transport):
    """One byte every 0.5 s never trips a per-byte timeout of 1 s; the body as a whole must
    have a deadline, like the head (10 s at most, lower with a lower --idle-timeout)."""
    server = start_server(APP, "--server", transport, "--idle-timeout", "1")
    length = 60
    drip_for = 14.0  # s: longer than any deadline the server may choose (the head's is 10 s)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/echo", {"Content-Length": str(length)}))
        started = time.monotonic()
        dripped = 0
        while time.monotonic() - started < drip_for and dripped < length - 1:
            readable, _, _ = select.select([conn.sock], [], [], 0.5)
            if readable:  # the server answered (408) or closed: it has a deadline
                break
            try:
                conn.sock.sendall(b"x")
            except OSError:  # reset by the server: it gave up on the body
                break
            dripped += 1
        else:
            pytest.fail(f"the server still waited for the body after {dripped} bytes dripped "
                        f"over {time.monotonic() - started:.1f} s with --idle-timeout 1: a "
                        f"body has no total deadline")
        got = conn.read_until_closed(timeout=5, fail=False)
        assert conn.closed_by_peer, "the server answered but kept the connection open"
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), f"after the deadline: {got[:200]!r}"
    assert_still_serving(server)


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_a_zero_or_negative_idle_timeout_is_refused(value):
    done = run_once(APP, "--port", "0", "--idle-timeout", value, timeout=10)
    assert done.returncode == 2, f"--idle-timeout {value} → exit {done.returncode}\n" \
                                 f"{done.stderr[-1500:]}"
    assert "usage" in done.stderr.lower(), f"no usage line on stderr: {done.stderr!r}"
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening on" not in done.stdout


def _head(lines, end=b"\r\n"):
    return end.join(lines) + end + end


HEADS = {  # name: (bytes, the statuses common.md allows)
    "valid": (_head([b"GET /health HTTP/1.1", b"Host: x", b"Connection: close"]), {200}),
    # Each line is under 8 KiB and there are fewer than 100: common.md names no bound for the
    # head as a whole, so either answer is allowed, but both transports and every split must
    # give the same one.
    "ten-7k-header-lines": (_head([b"GET /health HTTP/1.1", b"Host: x", b"Connection: close"]
                                  + [b"X-Big-%d: " % n + b"b" * 7000 for n in range(10)]),
                            {200, 431}),
    "101-header-lines": (_head([b"GET /health HTTP/1.1", b"Host: x", b"Connection: close"]
                               + [b"X-H%d: v" % n for n in range(99)]), {431}),
    "9k-header-line": (_head([b"GET /health HTTP/1.1", b"Host: x", b"Connection: close",
                              b"X-Big: " + b"b" * (9 * 1024)]), {431}),
    "8k-request-line": (_head([b"GET /" + b"a" * (8 * 1024 + 10) + b" HTTP/1.1", b"Host: x",
                               b"Connection: close"]), {414}),
    # RFC 9112 §5.2: obs-fold is refused with a 400 or replaced by a space; §2.2: a bare LF
    # may be read as a line end. Either way, the same bytes get the same answer.
    "obs-fold": (_head([b"GET /health HTTP/1.1", b"Host: x", b"X-Folded: a", b" b",
                        b"Connection: close"]), {200, 400}),
    "bare-lf": (_head([b"GET /health HTTP/1.1", b"Host: x", b"Connection: close"], b"\n"),
                {200, 400}),
}


def _answer_status(server, data, split):
    """The status of the first answer to `data`, sent all at once, in two writes, or one byte
    a write. Sending stops as soon as the server has answered (or closed)."""
    if split == "whole":
        pieces = [data]
    elif split == "two-writes":
        pieces = [data[:len(data) // 2], data[len(data) // 2:]]
    else:
        pieces = [data[i:i + 1] for i in range(len(data))]
    with RawConnection(server.host, server.port, timeout=20) as conn:
        for n, piece in enumerate(pieces):
            if n and select.select([conn.sock], [], [], 0.05 if split == "two-writes" else 0)[0]:
                break  # answered early (a limit) or closed
            try:
                conn.sock.sendall(piece)
            except OSError:
                break
        try:
            return conn.read_response(timeout=20).status
        except AssertionError as failure:
            return f"no answer ({str(failure).splitlines()[0][:60]})"



@pytest.mark.parametrize("name", list(HEADS))
def test_the_same_bytes_get_the_same_answer_on_both_transports_however_they_are_split(
        servers, name):
    data, allowed = HEADS[name]
    statuses = {(transport, split): _answer_status(servers[transport], data, split)
                for transport in TRANSPORTS for split in ("whole", "two-writes", "byte-by-byte")}
    assert len(set(statuses.values())) == 1, f"{name}: the answers differ: {statuses}"
    status = next(iter(statuses.values()))
    assert status in allowed, f"{name}: answered {status}, common.md allows {sorted(allowed)}"


# --------------------------------------------------------------------------------------------
# Streamed request bodies (a route's body_sink): written as they arrive, never held whole


def sink_counts(server):
    return requests.get(server.url + "/sink", timeout=5).json()


def await_sinks_closed(server, discarded, timeout=5.0):
    """Wait until no sink is open and `discarded` have been discarded (the connection's end is
    seen by the server a moment after the client's)."""
    deadline = time.monotonic() + timeout
    while (counts := sink_counts(server)) != {"open": 0, "discarded": discarded}:
        assert time.monotonic() < deadline, f"sinks after the upload: {counts}"
        time.sleep(0.02)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_streamed_body_reaches_its_sink_whole_in_both_framings(start_server, transport):
    """The sink gets every byte, in order: its size and digest are the body's, sent with a
    length or chunked."""
    server = start_server(APP, "--server", transport)
    body = bytes(range(256)) * 4096  # 1 MiB: the sink's limit exactly
    expected = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert requests.post(server.url + "/sink", data=body, timeout=10).json() == expected
    chunked = requests.post(server.url + "/sink", data=iter([body[:1000], body[1000:]]),
                            timeout=10)  # a generator: requests sends it chunked
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert chunked.json() == expected
    await_sinks_closed(server, discarded=2)  # a sink is discarded once its answer is sent


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_sink_refuses_at_the_byte_over_its_limit_not_after_the_whole_body(start_server,
                                                                           transport):
    """The client announces 100 MiB and sends 1.5 MiB: the 413 must come while it still has
    98 MiB to send, and the half-received body is discarded."""
    server = start_server(APP, "--server", transport)
    with RawConnection(server.host, server.port, timeout=10) as conn:
        conn.send(request_bytes("POST", "/sink", {"Content-Length": str(100 << 20)}))
        conn.send(b"x" * (1536 * 1024))
        resp = conn.read_response(timeout=10)
    assert_problem_bytes(resp, 413)
    await_sinks_closed(server, discarded=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_sink_may_refuse_from_the_head_before_the_body_is_sent(start_server, transport):
    """A client that waits for `100 Continue` hears the refusal instead, and never sends."""
    server = start_server(APP, "--server", transport)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/sink", {"Content-Length": "5000", "X-Refuse": "yes",
                                                  "Expect": "100-continue"}))
        resp = conn.read_response()
    assert_problem_bytes(resp, 403)
    assert sink_counts(server) == {"open": 0, "discarded": 0}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("how", ["closed", "reset"])
def test_an_upload_cut_off_midway_is_discarded(start_server, transport, how):
    """A client that goes away mid-body, with a FIN or a reset (which makes the server's read
    fail rather than end): its sink is discarded, and the server serves on."""
    server = start_server(APP, "--server", transport)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/sink", {"Content-Length": "100000"}) + b"x" * 50_000)
        deadline = time.monotonic() + 5
        while sink_counts(server)["open"] != 1:  # the server has begun the body
            assert time.monotonic() < deadline, "the upload never reached its sink"
            time.sleep(0.02)
        if how == "reset":  # SO_LINGER with a zero timeout: close() sends RST
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await_sinks_closed(server, discarded=1)
    assert_still_serving(server)


def test_a_stream_of_known_length_is_framed_by_it_and_head_reports_it(wire_server):
    """A download's length is known: Content-Length, not chunked, so a client sees its size
    and progress, and HEAD gives the same length with no body; the connection stays open."""
    with RawConnection(wire_server.host, wire_server.port) as conn:
        conn.send(request_bytes("GET", "/stream/sized?n=3"))
        got = conn.read_response()
        conn.send(request_bytes("HEAD", "/stream/sized?n=3"))
        head = conn.read_response(head=True)
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200
    assert got.status == 200 and got.body == b"000000000001000002"
    assert got.header("Content-Length") == "18" and got.header("Transfer-Encoding") is None
    assert head.status == 200 and head.header("Content-Length") == "18" and head.body == b""
