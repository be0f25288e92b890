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

The flows run in loadgen.py's closed loop (`run_closed_loop`): N keep-alive sockets in one
`selectors` loop; when the time is up it sends nothing new but waits for the requests in flight
(up to --drain-timeout). A flow parses the JSON body of an answer only where it needs it.

Run: python tests/bench/flows.py http://127.0.0.1:8004 notes --connections 32 --duration 5
Prints one JSON line: requests, ok (2xx), errors, duration_s, rps, p50_ms, p95_ms, p99_ms for the whole
mix, and `operations`: the same figures for each operation.
"""

import argparse
import itertools
import json
from collections.abc import Callable
from urllib.parse import urlsplit

from documents import search_queries
from loadgen import Flow, build_request, run_closed_loop

LOGIN_PASSWORD = "bench password, long enough"


def notes_user(index: int) -> str:
    return f"bench-user-{index:02d}"


def login_email(index: int) -> str:
    return f"bench-{index:02d}@example.com"


def request_bytes(method: str, host: str, target: str, headers: dict[str, str], body: object = None) -> bytes:
    """An HTTP/1.1 request; a body is sent as JSON."""
    return build_request(method, host, target, b"" if body is None else json.dumps(body).encode(),
                         None if body is None else "application/json",
                         [f"{name}: {value}" for name, value in headers.items()])


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


def search_flow(host: str, index: int) -> Flow:
    queries = [(name, request_bytes("GET", host, target, {})) for name, target in search_queries().items()]
    for n in itertools.count(index):
        yield queries[n % len(queries)]


FLOWS: dict[str, Callable[[str, int], Flow]] = {"notes": notes_flow, "login": login_flow, "search": search_flow}


def run_flows(url: str, flow_name: str, connections: int, duration: float, drain_timeout: float) -> dict:
    parts = urlsplit(url)
    make_flow = FLOWS[flow_name]
    return run_closed_loop((parts.hostname, parts.port or 80), lambda index: make_flow(parts.netloc, index),
                           connections, duration, drain_timeout)


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
