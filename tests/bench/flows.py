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
- `analytics-batch`: level07/analytics_collector.py. Each connection loops POST /v1/batch with
  EVENTS_PER_BATCH track events, the write key `ANALYTICS_WRITE_KEY` as the Basic username.
  Every event has a messageId of its own, `<batch id>:<k>`, where the batch id is
  `bench-<flow token>-<connection>-<round>`: the runner can then check, batch by batch, that
  each acknowledged batch is stored whole and once (analytics.py).
- `webhooks`: level07/payment_webhooks.py. Each connection loops POST /webhooks/stripe with a
  `payment_intent.succeeded` event of its own (ids `evt_bench<token>_<connection>_<round>`,
  a PaymentIntent `pi_…` of its own too), signed as Stripe signs: `Stripe-Signature:
  t=<now>,v1=<hex HMAC-SHA256 of "{t}.{body}" under WEBHOOK_SECRET>`, computed here from
  Stripe's documentation, not with the server's code.

A flow's token (random, made when the flow starts) keeps the ids of the warm-up's flows apart
from the measurement's.

The flows run in loadgen.py's closed loop (`run_closed_loop`): N keep-alive sockets in one
`selectors` loop; when the time is up it sends nothing new but waits for the requests in flight
(up to --drain-timeout). A flow parses the JSON body of an answer only where it needs it.

Run: python tests/bench/flows.py http://127.0.0.1:8004 notes --connections 32 --duration 5
Prints one JSON line: requests, ok (2xx), errors, duration_s, rps, p50_ms, p95_ms, p99_ms for the whole
mix, and `operations`: the same figures for each operation.
"""

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from documents import search_queries
from loadgen import Flow, build_request, run_closed_loop

LOGIN_PASSWORD = "bench password, long enough"
ANALYTICS_WRITE_KEY = "bench-write-key"
EVENTS_PER_BATCH = 100
BATCH_EVENT = "Bench Batch"   # the batch flow's track event, counted apart from anything else
WEBHOOK_SECRET = "whsec_bench_0123456789abcdefghij"


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


def basic_auth(username: str) -> str:
    """Authorization with `username` and an empty password (RFC 7617), as Segment's SDKs send it."""
    return "Basic " + base64.b64encode(f"{username}:".encode()).decode()


def analytics_batch_flow(host: str, index: int) -> Flow:
    headers = [f"Authorization: {basic_auth(ANALYTICS_WRITE_KEY)}"]
    prefix = f"bench-{secrets.token_hex(4)}-{index}"
    for round_ in itertools.count():
        batch = f"{prefix}-{round_}"
        events = ",".join(
            f'{{"type":"track","userId":"bench-user-{index}-{k % 10}","event":"{BATCH_EVENT}",'
            f'"messageId":"{batch}:{k}","timestamp":"2026-12-06T10:00:00.000Z","properties":{{"k":{k}}}}}'
            for k in range(EVENTS_PER_BATCH))
        body = f'{{"batch":[{events}]}}'.encode()
        yield "POST /v1/batch", build_request("POST", host, "/v1/batch", body, "application/json", headers)


def stripe_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Stripe's scheme: v1 is hex HMAC-SHA256, keyed with the whole whsec_ secret, of "{t}.{body}"."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def webhooks_flow(host: str, index: int) -> Flow:
    token = secrets.token_hex(4)
    for round_ in itertools.count():
        now = int(time.time())
        event = {"id": f"evt_bench{token}_{index}_{round_}", "object": "event", "api_version": "2024-06-20",
                 "type": "payment_intent.succeeded", "created": now, "livemode": False,
                 "data": {"object": {"id": f"pi_bench{token}_{index}_{round_}", "object": "payment_intent",
                                     "amount": 2000, "currency": "usd", "status": "succeeded",
                                     "metadata": {}}}}
        body = json.dumps(event).encode()
        headers = [f"Stripe-Signature: {stripe_signature(WEBHOOK_SECRET, now, body)}"]
        yield "POST /webhooks/stripe", build_request("POST", host, "/webhooks/stripe", body,
                                                     "application/json", headers)


FLOWS: dict[str, Callable[[str, int], Flow]] = {"notes": notes_flow, "login": login_flow, "search": search_flow,
                                                "analytics-batch": analytics_batch_flow, "webhooks": webhooks_flow}


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
