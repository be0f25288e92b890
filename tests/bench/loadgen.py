"""A closed-loop HTTP/1.1 load generator, for machines without wrk.

N keep-alive connections each send one request, read the whole response (its length comes from
Content-Length), and send the next, for the given duration. The latency of every request is
recorded. When the time is up no new request is sent, but the requests in flight are awaited
(up to DRAIN_TIMEOUT_S), so the count of answered requests is exact: the counter scenario
compares it with the value the server stored.

It is written to stay out of the way of the server it measures: the request bytes are built
once, the sockets are driven by one `selectors` loop with no per-request tasks, and a response
is parsed only as far as its status code and Content-Length.

The loop itself runs *flows*: each connection asks a generator for its next request and sends it
the last answer. A fixed request is the flow `repeat(request)`; tests/bench/flows.py has flows
where a request uses what the previous answer said. On a 2-core machine it
drove the minimal asyncio reference at 60k req/s, on a par with wrk. It does not support chunked
responses (every project server sends Content-Length).

Run: python tests/bench/loadgen.py http://127.0.0.1:8001/health --connections 32 --duration 5
     [--method POST --body '{"by": 1}' --content-type application/json] [--header 'X-User-Id: ann']
     [--expect-status 302] (the status counted as ok instead of any 2xx: a redirect)
Prints one JSON line: requests, ok (2xx, or the expected status), errors (other statuses and
broken connections), duration_s, rps, p50_ms, p95_ms, p99_ms.
"""

import argparse
import json
import selectors
import socket
import time
from collections.abc import Callable, Generator
from urllib.parse import urlsplit

DRAIN_TIMEOUT_S = 5.0
RECV_SIZE = 65536


def build_request(method: str, host: str, target: str, body: bytes, content_type: str | None,
                  headers: list[str] | tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def split_response(buffer: bytes) -> tuple[int, int] | None:
    """(end of the head, end of the whole response) of the response at the start of buffer, or
    None while its head is incomplete. The length comes from Content-Length (no chunked)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    field = head.find(b"\r\ncontent-length:")
    if field < 0:
        return head_end, head_end + 4
    value_end = head.find(b"\r\n", field + 2)
    return head_end, head_end + 4 + int(head[field + 17 : value_end if value_end >= 0 else head_end])


Flow = Generator[tuple[str, bytes], tuple[int, bytes], None]


def repeat(request: bytes) -> Flow:
    """The flow of a fixed request: the same bytes, whatever the answer (what wrk does)."""
    while True:
        yield "request", request


class Connection:
    """One keep-alive socket running one flow, with at most one request in flight."""

    def __init__(self, address: tuple[str, int], flow: Flow):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.flow = flow
        self.buffer = b""
        self.bounds: tuple[int, int] | None = None  # split_response of the answer being read
        self.operation = ""
        self.answer: tuple[int, bytes] | None = None  # (status, body); None before the first
        self.sent_at: float | None = None  # None: no request in flight


def percentile_ms(sorted_seconds: list[float], fraction: float) -> float:
    if not sorted_seconds:
        return 0.0
    index = min(len(sorted_seconds) - 1, int(fraction * len(sorted_seconds)))
    return sorted_seconds[index] * 1000


def summary(latencies: list[float], ok: int, errors: int, elapsed: float) -> dict:
    """The one JSON line every measuring process here prints."""
    latencies.sort()
    return {
        "requests": len(latencies),
        "ok": ok,
        "errors": errors,
        "duration_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile_ms(latencies, 0.50), 3),
        "p95_ms": round(percentile_ms(latencies, 0.95), 3),
        "p99_ms": round(percentile_ms(latencies, 0.99), 3),
    }


def run_closed_loop(address: tuple[str, int], make_flow: Callable[[int], Flow], connections: int,
                    duration: float, drain_timeout: float = DRAIN_TIMEOUT_S,
                    expected_status: int | None = None) -> dict:
    """Run connection i on `make_flow(i)` for `duration` seconds, then wait for the requests in
    flight. The summary of the whole run, with `operations`: a summary per operation name. An
    answer is ok when its status is `expected_status`, or any 2xx when that is None.

    A connection the server closes counts its request in flight as an error and, before the
    deadline, is replaced by a new one running a new flow of the same index."""
    selector = selectors.DefaultSelector()
    latencies: dict[str, list[float]] = {}
    ok: dict[str, int] = {}
    errors: dict[str, int] = {}
    broken = 0

    def open_connection(index: int) -> Connection:
        connection = Connection(address, make_flow(index))
        selector.register(connection.sock, selectors.EVENT_READ, index)
        pool[connection.sock] = connection
        return connection

    def send_next(connection: Connection) -> None:
        connection.operation, data = connection.flow.send(connection.answer)
        connection.sent_at = time.perf_counter()
        try:
            connection.sock.sendall(data)  # a small request into an empty socket buffer: never blocks
        except ConnectionError:
            pass  # the server closed the connection: the next read sees it

    pool: dict[socket.socket, Connection] = {}
    for index in range(connections):
        open_connection(index)
    started = time.perf_counter()
    deadline = started + duration
    for connection in list(pool.values()):
        send_next(connection)
    in_flight = len(pool)

    while in_flight and time.perf_counter() < deadline + drain_timeout:
        for key, _ in selector.select(timeout=0.1):
            connection = pool[key.fileobj]
            try:
                data = connection.sock.recv(RECV_SIZE)
            except ConnectionError:
                data = b""
            now = time.perf_counter()
            if not data:  # the server closed the connection
                selector.unregister(connection.sock)
                connection.sock.close()
                del pool[connection.sock]
                broken += 1
                in_flight -= 1
                if now < deadline:
                    send_next(open_connection(key.data))
                    in_flight += 1
                continue
            connection.buffer += data
            if connection.bounds is None:
                connection.bounds = split_response(connection.buffer)
            if connection.bounds is None or len(connection.buffer) < connection.bounds[1]:
                continue
            head_end, end = connection.bounds
            operation = connection.operation
            status = int(connection.buffer[9:12])  # "HTTP/1.1 200 ..."
            latencies.setdefault(operation, []).append(now - connection.sent_at)
            if status == expected_status or (expected_status is None and 200 <= status < 300):
                ok[operation] = ok.get(operation, 0) + 1
            else:
                errors[operation] = errors.get(operation, 0) + 1
            connection.answer = (status, connection.buffer[head_end + 4:end])
            connection.buffer = connection.buffer[end:]
            connection.bounds = None
            if now < deadline:
                send_next(connection)
            else:
                in_flight -= 1

    elapsed = time.perf_counter() - started
    for connection in pool.values():
        connection.sock.close()
    every = [latency for values in latencies.values() for latency in values]
    # Requests still unanswered after the drain timeout are errors too.
    result = summary(every, sum(ok.values()), sum(errors.values()) + broken + in_flight, elapsed)
    result["operations"] = {operation: summary(values, ok.get(operation, 0), errors.get(operation, 0), elapsed)
                            for operation, values in latencies.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Closed-loop keep-alive HTTP/1.1 load generator.")
    parser.add_argument("url", help="http://HOST:PORT/PATH")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="", help="request body, sent as UTF-8")
    parser.add_argument("--content-type")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--expect-status", type=int, help="the status that counts as ok (default: any 2xx)")
    args = parser.parse_args()
    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        parser.error("the URL must look like http://HOST:PORT/PATH")
    target = url.path or "/"
    if url.query:
        target += "?" + url.query
    if any(":" not in header for header in args.header):
        parser.error("--header must look like 'Name: value'")
    request = build_request(args.method, url.netloc, target, args.body.encode(), args.content_type, args.header)
    result = run_closed_loop((url.hostname, url.port or 80), lambda index: repeat(request),
                             args.connections, args.duration, expected_status=args.expect_status)
    del result["operations"]  # one operation: the same figures as the whole
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
