"""Both transports, on the wire, doing their less common work: bodies that arrive in pieces,
`100-continue`, pipelining behind a body or a blocking handler, streamed answers (and one that
fails halfway), a big answer to a client that reads slowly, a client that half-closes.

The server is tests/lib/transport_app.py, started like any project (`--port 0`, SIGTERM → 0).
"""
import hashlib
import re
import signal
import socket
import threading
import time

import pytest

from tests.harness import RawConnection, parse_response, request_bytes

APP = "tests/lib/transport_app.py"
TRANSPORTS = ["asyncio", "threaded"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request, start_server_module):
    return start_server_module(APP, "--server", request.param, "--idle-timeout", "2")


def connect(server):
    return RawConnection(server.host, server.port)


def test_a_body_sent_in_pieces_is_read_whole(server):
    body = bytes(range(256)) * 400
    with connect(server) as conn:
        conn.send(request_bytes("POST", "/echo", {"Content-Length": str(len(body))}))
        for start in range(0, len(body), 30_000):
            time.sleep(0.02)
            conn.send(body[start:start + 30_000])
        resp = conn.read_response()
    assert resp.status == 200, resp.raw
    assert resp.body == body


def test_a_chunked_body_in_pieces_then_a_pipelined_request(server):
    chunked = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
    head = request_bytes("POST", "/echo", {"Transfer-Encoding": "chunked"})
    following = request_bytes("GET", "/health")
    stream = head + chunked + following
    with connect(server) as conn:
        for position in range(0, len(stream), 7):  # seven bytes at a time
            conn.send(stream[position:position + 7])
        first = conn.read_response()
        second = conn.read_response()
    assert first.status == 200 and first.body == b"hello, world", first.raw
    assert second.status == 200 and b'"status"' in second.body, second.raw


def test_expect_100_continue_is_answered_before_the_body(server):
    body = b"x" * 5000
    with connect(server) as conn:
        conn.send(request_bytes("POST", "/echo", {"Content-Length": str(len(body)),
                                                  "Expect": "100-continue"}))
        interim = conn.read_response()
        assert interim.status == 100, interim.raw
        conn.send(body)
        final = conn.read_response()
    assert final.status == 200 and final.header("X-Length") == "5000", final.raw


def test_many_pipelined_requests_in_one_write_are_answered_in_order(server):
    targets = [f"/no/such/{n}" if n % 3 else "/health" for n in range(60)]
    with connect(server) as conn:
        conn.send(b"".join(request_bytes("GET", target) for target in targets))
        statuses = [conn.read_response().status for _ in targets]
    assert statuses == [200 if n % 3 == 0 else 404 for n in range(60)]


def test_a_handler_that_asks_to_close_gets_one_connection_header_and_a_closed_connection(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/goodbye") + request_bytes("GET", "/health"))
        resp = conn.read_response()
        assert resp.status == 200 and resp.body == b"bye", resp.raw
        assert resp.header_values("Connection") == ["close"], resp.raw
        assert conn.read_until_closed() == b""  # the pipelined request is not answered


def test_a_request_pipelined_behind_a_blocking_handler_waits_its_turn(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/sleep?ms=150")
                  + request_bytes("POST", "/echo", body=b"after"))
        first = conn.read_response()
        second = conn.read_response()
    assert first.status == 200 and b"slept" in first.body, first.raw
    assert second.status == 200 and second.body == b"after", second.raw


def test_a_streamed_answer_is_chunked_and_the_connection_stays_usable(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/stream?n=5&size=3"))
        streamed = conn.read_response()
        conn.send(request_bytes("GET", "/health"))
        after = conn.read_response()
    assert streamed.status == 200, streamed.raw
    assert streamed.header("Transfer-Encoding") == "chunked"
    assert streamed.header("Content-Length") is None
    assert streamed.body == b"000001002003004"
    assert after.status == 200


def test_a_long_stream_reaches_a_slow_reader_whole(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/stream?n=2000&size=1000"))
        time.sleep(0.3)  # let the server fill the socket buffers and wait for us
        resp = conn.read_response(timeout=10)
    assert resp.body == b"".join(f"{n:01000d}".encode() for n in range(2000))


def test_a_stream_that_fails_halfway_is_cut_short_and_the_server_goes_on(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/stream/broken"))
        received = conn.read_until_closed(timeout=5)
    assert received.startswith(b"HTTP/1.1 200"), received
    assert b"first" in received
    assert not received.endswith(b"0\r\n\r\n"), "a failed stream must not look complete"
    with pytest.raises(ValueError):
        parse_response(received, eof=True)
    server.wait_for_stderr("the source failed halfway")
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200


def test_an_async_stream_on_the_event_loop(start_server):
    server = start_server(APP)
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/stream/async"))
        resp = conn.read_response()
    assert resp.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert resp.header("Content-Type") == "text/event-stream"


def test_a_switched_protocol_gets_the_connection_after_its_answer(start_server):
    """asyncio: the 101's `takeover` gets the stream's reader and writer, bytes sent right
    behind the request (before the answer arrived) are the new protocol's, not a request, and
    HTTP's idle timeout no longer applies to the connection."""
    server = start_server(APP, "--idle-timeout", "0.3")
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/upgrade") + b"hello\n")
        answer = conn.read_response()
        assert answer.status == 101 and answer.header("Upgrade") == "shout"
        assert answer.header("Content-Length") is None
        deadline = time.monotonic() + 5
        while conn.buffer != b"HELLO\n":
            conn._recv(deadline)
        time.sleep(1.0)  # beyond HTTP's idle timeout: the connection is no longer HTTP's
        conn.send(b"again\n")
        while conn.buffer != b"HELLO\nAGAIN\n":
            conn._recv(deadline)
    with connect(server) as conn:  # the server goes on
        conn.send(request_bytes("GET", "/health"))
        assert conn.read_response().status == 200


def stopping(server, timeout):
    """A thread that sends SIGTERM and waits for the exit (`server.stop` asserts status 0), and
    what it found: `{"seconds": …}`, or `{"error": …}`. Start it when the test is ready."""
    outcome = {}

    def stop():
        try:
            outcome["seconds"] = server.stop(signal.SIGTERM, timeout=timeout)
        except AssertionError as error:
            outcome["error"] = error

    return threading.Thread(target=stop), outcome


def test_a_taken_over_connection_hears_of_the_drain_and_may_finish_within_it(start_server):
    """SIGTERM: the app's `on_draining` hooks run while the connection is open (a WebSocket's
    1001 Close), and the connection is not cut like an idle keep-alive one: its protocol gets
    up to --drain-timeout to end (the closing handshake), then the server exits 0."""
    server = start_server(APP, "--drain-timeout", "5")
    stopper, outcome = stopping(server, timeout=10)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/upgrade"))
        assert conn.read_response().status == 101
        stopper.start()
        deadline = time.monotonic() + 5
        while b"DRAINING\n" not in conn.buffer:
            conn._recv(deadline)
        time.sleep(0.3)  # past the drain's first sweeps of idle connections
        conn.send(b"still here\n")
        while b"STILL HERE\n" not in conn.buffer:
            conn._recv(deadline)
    stopper.join(timeout=15)
    assert "seconds" in outcome, outcome  # exited 0 within server.stop's bound


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_once_draining_new_connections_are_refused_while_in_flight_requests_finish(
        start_server, transport):
    """SIGTERM stops accepting: a new connection is refused at once (a listener left open would
    let the kernel complete handshakes nobody serves), and the request in flight still gets its
    answer."""
    server = start_server(APP, "--server", transport, "--drain-timeout", "10")
    stopper, outcome = stopping(server, timeout=15)
    with RawConnection(server.host, server.port) as slow:
        slow.send(request_bytes("GET", "/sleep?ms=3000"))
        time.sleep(0.2)  # the sleeper's request is read before the signal
        stopper.start()
        deadline = time.monotonic() + 2
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                socket.create_connection((server.host, server.port), timeout=1).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        assert refused, "the listener still completes new connections while draining"
        assert slow.read_response(timeout=10).status == 200
    stopper.join(timeout=20)
    assert "seconds" in outcome, outcome  # exited 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_answer_still_being_sent_when_the_drain_begins_arrives_whole(start_server, transport):
    """The drain closes connections idle between requests, and only those: an answer the
    connection has finished with but the client is still taking (16 MiB, read slowly) is sent
    to its last byte before the connection is closed."""
    server = start_server(APP, "--server", transport, "--drain-timeout", "20")
    stopper, outcome = stopping(server, timeout=30)
    expected = 4 * 1024 * 1024 * 4
    with socket.create_connection((server.host, server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(request_bytes("GET", "/big?times=4"))
        received = sock.recv(65536)
        stopper.start()
        time.sleep(0.5)  # the drain's sweeps (every 20 ms) run while the answer is on its way
        sock.settimeout(10)
        while True:
            piece = sock.recv(1 << 20)
            if not piece:
                break
            received += piece
    stopper.join(timeout=40)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == expected, f"{len(body)} of {expected} bytes arrived"
    assert "seconds" in outcome, outcome


def test_head_of_a_stream_gets_its_access_log_line(start_server):
    """A HEAD answer to a streamed route is sent whole, without its body: the stream's
    end-of-answer work (the access log line) must still happen."""
    server = start_server(APP)
    with connect(server) as conn:
        conn.send(request_bytes("HEAD", "/stream/sized?n=2"))
        assert conn.read_response(head=True).header("Content-Length") == "12"
    server.wait_for_stderr(re.compile(r"HEAD /stream/sized\S* 200"))


def test_a_switched_protocol_on_the_threaded_transport_ends_the_connection(start_server):
    """The hand-over is asyncio's: on threaded the 101 is sent and the connection closed, so
    the new protocol's bytes are never read as HTTP requests."""
    server = start_server(APP, "--server", "threaded")
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("GET", "/upgrade") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 101
        assert conn.read_until_closed() == b""


def test_a_big_answer_to_a_slow_reader_arrives_whole_while_others_are_served(server):
    with connect(server) as slow:
        slow.send(request_bytes("GET", "/big"))
        started = time.monotonic()
        with connect(server) as other:  # the slow reader holds nothing up
            other.send(request_bytes("GET", "/health"))
            assert other.read_response().status == 200
        assert time.monotonic() - started < 1.5
        resp = slow.read_response(timeout=10)
    assert resp.status == 200
    assert hashlib.sha256(resp.body).digest() == hashlib.sha256(bytes(range(256)) * 16 * 1024).digest()


def test_a_client_that_never_reads_a_big_answer_is_dropped(server):
    """32 MiB, more than the kernel's buffers hold on both sides: a server that waited for the
    reader forever would still deliver all of it once the reader reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect((server.host, server.port))
    try:
        sock.sendall(request_bytes("GET", "/big?times=8"))
        time.sleep(3.5)  # --idle-timeout 2, checked by the sweeper a few times a second
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 32 * 1024 * 1024, "the whole answer was kept for a client that never read"
    finally:
        sock.close()


def test_a_half_closed_client_still_gets_its_answer(server):
    with connect(server) as conn:
        conn.send(request_bytes("GET", "/sleep?ms=50"))
        conn.sock.shutdown(socket.SHUT_WR)
        resp = conn.read_response()
        assert resp.status == 200, resp.raw
        assert conn.is_closed(timeout=2)


def test_many_clients_at_once_with_bodies(server):
    failures = []

    def client(number):
        body = f"client {number} ".encode() * 100
        try:
            with connect(server) as conn:
                for _ in range(5):
                    conn.send(request_bytes("POST", "/echo", body=body))
                    resp = conn.read_response()
                    if resp.body != body:
                        failures.append((number, resp.status, resp.body[:80]))
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append((number, repr(error)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
