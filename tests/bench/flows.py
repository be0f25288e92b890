"""A closed-loop load generator for request *sequences*, where one request depends on the last.

tests/bench/loadgen.py (and wrk) send one fixed request over and over. Some scenarios need more:
each connection acts as one user, and a request uses what the previous answer said (the id of
the note just created). Here every connection runs a *flow*: a generator that yields
`(operation, request bytes)` and is sent back `(status, body)` of the answer. Latencies are
recorded per operation, so the report can give p50/p99 for each step as well as for the mix.

Flows:

- `notes`: level02/notes.py. Connection i is user `bench-user-<i>` (its `X-User-Id`); it loops
  POST /notes → GET /notes?limit=20 → GET /notes/{id} → PATCH /notes/{id} (with `If-Match` of
  the version the POST returned), the id taken from the POST's answer.
- `login`: level03/jwt_auth.py. Connection i logs in as `login_email(i)` with `LOGIN_PASSWORD`,
  over and over; the runner signs these users up first. One user per connection keeps each
  email at one attempt in flight, so the login lockout (5 failures per email, counted before
  the password is checked) never trips.

Like loadgen.py it runs N keep-alive sockets in one `selectors` loop and, when the time is up,
sends nothing new but waits for the requests in flight (up to --drain-timeout). It parses each
answer only as far as the status, Content-Length and, where the flow needs it, the JSON body.

Run: python tests/bench/flows.py http://127.0.0.1:8004 notes --connections 32 --duration 5
Prints one JSON line: requests, ok (2xx), errors, duration_s, rps, p50_ms, p99_ms for the whole
mix, and `operations`: the same figures for each operation.
"""

import argparse
import json
import selectors
import time
from collections.abc import Callable, Generator
from urllib.parse import urlsplit

from loadgen import RECV_SIZE, Connection, summary

LOGIN_PASSWORD = "bench password, long enough"
Flow = Generator[tuple[str, bytes], tuple[int, bytes], None]


def notes_user(index: int) -> str:
    return f"bench-user-{index:02d}"


def login_email(index: int) -> str:
    return f"bench-{index:02d}@example.com"


def request_bytes(method: str, host: str, target: str, headers: dict[str, str], body: object = None) -> bytes:
    """An HTTP/1.1 request; a body is sent as JSON."""
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def notes_flow(host: str, index: int) -> Flow:
    user = {"X-User-Id": notes_user(index)}
    list_request = request_bytes("GET", host, "/notes?limit=20", user)
    n = 0
    while True:
        n += 1
        status, body = yield "POST /notes", request_bytes(
            "POST", host, "/notes", user, {"title": f"note {n}", "body": "some text " * 10, "tags": ["bench"]})
        note = json.loads(body) if status == 201 else None
        yield "GET /notes?limit=20", list_request
        if note is None:
            continue  # counted as an error already; start the next round with a new note
        path = f"/notes/{note['id']}"
        yield "GET /notes/{id}", request_bytes("GET", host, path, user)
        yield "PATCH /notes/{id}", request_bytes(
            "PATCH", host, path, {**user, "If-Match": f'"{note["version"]}"'}, {"body": f"edited {n}"})


def login_flow(host: str, index: int) -> Flow:
    login = request_bytes("POST", host, "/auth/login", {},
                          {"email": login_email(index), "password": LOGIN_PASSWORD})
    while True:
        yield "POST /auth/login", login


FLOWS: dict[str, Callable[[str, int], Flow]] = {"notes": notes_flow, "login": login_flow}


class FlowConnection(Connection):
    """A keep-alive socket that runs one flow: the operation in flight and the last answer."""

    def __init__(self, address: tuple[str, int], flow: Flow):
        super().__init__(address)
        self.flow = flow
        self.operation = ""
        self.answer: tuple[int, bytes] | None = None  # None before the first request


def split_response(buffer: bytes) -> tuple[int, int] | None:
    """(end of the head, end of the whole response) of the response at the start of buffer, or
    None while its head is incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    field = head.find(b"\r\ncontent-length:")
    if field < 0:
        return head_end, head_end + 4
    value_end = head.find(b"\r\n", field + 2)
    return head_end, head_end + 4 + int(head[field + 17 : value_end if value_end >= 0 else head_end])


def run_flows(url: str, flow_name: str, connections: int, duration: float, drain_timeout: float) -> dict:
    parts = urlsplit(url)
    address = (parts.hostname, parts.port or 80)
    make_flow = FLOWS[flow_name]
    selector = selectors.DefaultSelector()
    latencies: dict[str, list[float]] = {}
    ok: dict[str, int] = {}
    errors: dict[str, int] = {}
    broken = 0

    def send_next(connection: FlowConnection) -> None:
        connection.operation, data = connection.flow.send(connection.answer)
        connection.sent_at = time.perf_counter()
        connection.sock.sendall(data)  # a small request into an empty socket buffer: never blocks

    pool = []
    for index in range(connections):
        connection = FlowConnection(address, make_flow(parts.netloc, index))
        selector.register(connection.sock, selectors.EVENT_READ, connection)
        pool.append(connection)
    started = time.perf_counter()
    deadline = started + duration
    for connection in pool:
        send_next(connection)
    in_flight = len(pool)

    while in_flight and time.perf_counter() < deadline + drain_timeout:
        for key, _ in selector.select(timeout=0.1):
            connection = key.data
            try:
                data = connection.sock.recv(RECV_SIZE)
            except ConnectionError:
                data = b""
            now = time.perf_counter()
            if not data:  # the server closed the connection: this connection's flow ends
                selector.unregister(connection.sock)
                broken += 1
                in_flight -= 1
                continue
            connection.buffer += data
            bounds = split_response(connection.buffer)
            if bounds is None or len(connection.buffer) < bounds[1]:
                continue
            head_end, end = bounds
            operation = connection.operation
            status = int(connection.buffer[9:12])
            latencies.setdefault(operation, []).append(now - connection.sent_at)
            if 200 <= status < 300:
                ok[operation] = ok.get(operation, 0) + 1
            else:
                errors[operation] = errors.get(operation, 0) + 1
            connection.answer = (status, connection.buffer[head_end + 4 : end])
            connection.buffer = connection.buffer[end:]
            if now < deadline:
                send_next(connection)
            else:
                in_flight -= 1

    elapsed = time.perf_counter() - started
    for connection in pool:
        connection.sock.close()
    every = [latency for values in latencies.values() for latency in values]
    result = summary(every, sum(ok.values()), sum(errors.values()) + broken + in_flight, elapsed)
    result["operations"] = {operation: summary(values, ok.get(operation, 0), errors.get(operation, 0), elapsed)
                            for operation, values in latencies.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Closed-loop load generator for request sequences.")
    parser.add_argument("url", help="http://HOST:PORT of the server")
    parser.add_argument("flow", choices=list(FLOWS))
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to wait for the requests in flight when the time is up")
    args = parser.parse_args()
    result = run_flows(args.url, args.flow, args.connections, args.duration, args.drain_timeout)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
