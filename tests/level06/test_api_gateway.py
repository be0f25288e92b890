"""level06/api_gateway.py, black-box: routing from the config (and a bad config refused),
proxying both ways with bodies streamed and re-framed, hop-by-hop and forwarding fields, one
request id, keep-alive reuse upstream, cut-off bodies, JWT at the edge, rate limits, round-robin,
health checks, 502/503/504 and the circuit breaker.

The upstreams are a scripted HTTP/1.1 server written here (it records every request it reads,
piece by piece, and misbehaves on purpose: slow, dropping the connection before or in the middle
of an answer, answering chunked, holding an answer half-sent), plus real projects
(level01/health_check, stopped and restarted mid-test; level02/notes behind level03/jwt_auth's
tokens). Nothing asserts on speed: waits are for events, bounded generously.
"""
import base64
import hashlib
import hmac
import http.client
import json
import select
import socket
import socketserver
import threading
import time
import uuid

import pytest
import requests

from tests.harness import RawConnection, expect, expect_json, expect_problem, request_bytes, run_once

SCRIPT = "level06/api_gateway.py"
TIMEOUT = 10
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


# --------------------------------------------------------------------------------------------
# A scripted upstream


class ScriptedUpstream:
    """An HTTP/1.1 server on a thread per connection. Every request is recorded as it is read
    (`requests`: dicts with method, target, headers, body, peer_port, complete); the answer
    depends on the path's last segment (see `answer`)."""

    def __init__(self, name="up"):
        self.name = name
        self.records = []
        self.changed = threading.Condition()
        self.health_status = 200
        self.slow_s = 3.0
        self.release = threading.Event()   # /hold sends the rest of its answer once set
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    upstream.serve(self.request)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler,
                                                      bind_and_activate=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- what it saw

    def _note(self, record=None):
        with self.changed:
            if record is not None:
                self.records.append(record)
            self.changed.notify_all()

    def wait_for(self, predicate, timeout=TIMEOUT):
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.records), timeout), \
                f"{self.name}: never saw it; records {self.records}"

    def seen(self, path_part):
        return [r for r in self.records if path_part in r["target"]]

    # -- the wire

    def serve(self, sock):
        reader = sock.makefile("rb")
        while True:
            line = reader.readline()
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers = []
            while (field := reader.readline()) not in (b"\r\n", b""):
                name, _, value = field.decode("latin-1").partition(":")
                headers.append((name.strip().lower(), value.strip()))
            record = {"method": method, "target": target, "headers": headers, "body": b"",
                      "peer_port": sock.getpeername()[1], "complete": False}
            self._note(record)
            fields = dict(headers)
            if not self.read_body(reader, fields, record):
                record["cut"] = True  # an end of stream where the rest of the body should be
                self._note()
                return
            record["complete"] = True
            self._note()
            if not self.answer(sock, record):
                return

    def read_body(self, reader, fields, record):
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = reader.readline()
                if not size_line.endswith(b"\r\n"):
                    return False
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    return reader.readline() == b"\r\n"
                data = reader.read(size + 2)
                if len(data) < size + 2:
                    return False
                record["body"] += data[:-2]
                self._note()
        missing = int(fields.get("content-length", "0"))
        while missing:
            data = reader.read1(min(missing, 4096))
            if not data:
                return False
            record["body"] += data
            missing -= len(data)
            self._note()
        return True

    def answer(self, sock, record):
        """Answer by the path's last segment; False closes the connection."""
        name = record["target"].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if name == "health":
            return send(sock, self.health_status, b'{"status": "ok"}')
        if name == "slow":
            time.sleep(self.slow_s)
        if name == "drop-before-head":
            return False
        if name == "drop-mid-small":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            return False
        if name == "drop-mid-large":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500000\r\n\r\n" + b"x" * 200000)
            return False
        if name == "drop-mid-chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            return False
        if name == "chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n4\r\none \r\n4\r\ntwo \r\n"
                         b"5\r\nthree\r\n0\r\n\r\n")
            return True
        if name == "hold":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\nfirst \r\n")
            self.release.wait(TIMEOUT)
            sock.sendall(b"4\r\nlast\r\n0\r\n\r\n")
            return True
        if name == "then-close":  # keep-alive by its answer, yet it closes: a stale pooled one
            send(sock, 200, b'{"closing": true}')
            return False
        if name == "no-content":
            sock.sendall(b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n")
            return True
        if name == "until-close":  # HTTP/1.0 style: the body ends where the connection does
            sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            return False
        if name == "ambiguous":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            return False
        if name == "fields":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1; Path=/\r\n"
                         b"Set-Cookie: b=2; Expires=Wed, 09 Jun 2038 10:18:14 GMT\r\n"
                         b"Connection: X-Upstream-Secret\r\nX-Upstream-Secret: hop\r\n"
                         b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok")
            return True
        echo = {"name": self.name, "method": record["method"], "target": record["target"],
                "headers": record["headers"], "body": record["body"].decode("latin-1"),
                "peer_port": record["peer_port"]}
        return send(sock, 200, json.dumps(echo).encode())


def send(sock, status, body):
    sock.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return True


def header_values(echo, name):
    return [value for key, value in echo["headers"] if key == name]


@pytest.fixture(scope="module")
def upstreams():
    made = {name: ScriptedUpstream(name) for name in ("a", "b", "c", "slow")}
    yield made
    for upstream in made.values():
        upstream.close()


def write_config(tmp_path, routes):
    path = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps({"routes": routes}))
    return path


@pytest.fixture(scope="module")
def gateway(start_server_module, upstreams, tmp_path_factory):
    up = upstreams
    routes = [
        {"prefix": "/api", "upstreams": [up["a"].url]},
        {"prefix": "/api/v2", "upstreams": [up["b"].url], "strip_prefix": True},
        {"prefix": "/pair", "upstreams": [up["a"].url, up["b"].url], "strip_prefix": True},
        {"prefix": "/private", "upstreams": [up["c"].url], "auth": "jwt", "rate_limit": "4/min"},
        {"prefix": "/limited", "upstreams": [up["c"].url], "rate_limit": "3/hour"},
        {"prefix": "/down", "upstreams": ["http://127.0.0.1:1"]},
        {"prefix": "/slow", "upstreams": [up["slow"].url], "timeout_s": 0.5},
    ]
    config = write_config(tmp_path_factory.mktemp("gateway"), routes)
    return start_server_module(SCRIPT, "--config", config, "--secret", SECRET, "--health-s", "60")


def get(server, path, **kw):
    return requests.get(f"{server.url}{path}", timeout=TIMEOUT, **kw)


# --------------------------------------------------------------------------------------------
# JWTs made here (HS256, RFC 7519), as jwt_auth makes them


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_token(sub, secret=SECRET, issuer="jwt_auth", audience="jwt_auth", ttl=300):
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"iss": issuer, "aud": audience, "sub": sub, "iat": now,
                                "exp": now + ttl}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


def bearer(sub, **kw):
    return {"Authorization": f"Bearer {make_token(sub, **kw)}"}


# --------------------------------------------------------------------------------------------
# The config


@pytest.mark.parametrize("config, reason", [
    ("not json", "not valid JSON"),
    ({"routes": []}, "routes"),
    ({"routes": [{"prefix": "notes", "upstreams": ["http://127.0.0.1:8004"]}]}, "prefix"),
    ({"routes": [{"prefix": "/n", "upstreams": []}]}, "upstreams"),
    ({"routes": [{"prefix": "/n", "upstreams": ["https://127.0.0.1:8004"]}]}, "http://HOST:PORT"),
    ({"routes": [{"prefix": "/n", "upstreams": ["http://h:1"], "rate_limit": "lots"}]}, "rate_limit"),
    ({"routes": [{"prefix": "/n", "upstreams": ["http://h:1"], "auth": "basic"}]}, "auth"),
    ({"routes": [{"prefix": "/n", "upstreams": ["http://h:1"], "timeout_s": 0}]}, "timeout_s"),
    ({"routes": [{"prefix": "/n", "upstreams": ["http://h:1"], "retries": 3}]}, "retries"),
    ({"routes": [{"prefix": "/n", "upstreams": ["http://h:1"]}] * 2}, "already routed"),
    ({"routes": [{"prefix": "/gateway/x", "upstreams": ["http://h:1"]}]}, "/gateway"),
])
def test_a_bad_config_exits_2_naming_the_problem(tmp_path, config, reason):
    path = tmp_path / "bad.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    result = run_once(SCRIPT, "--port", "0", "--config", path)
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_missing_config_file_exits_2(tmp_path):
    result = run_once(SCRIPT, "--port", "0", "--config", tmp_path / "nothing.json")
    assert result.returncode == 2 and "cannot read" in result.stderr, result.stderr


def test_the_default_config_routes_to_levels_01_to_03(start_server):
    server = start_server(SCRIPT)  # level06/api_gateway.json
    routes = expect_json(get(server, "/gateway/routes"), 200)["routes"]
    by_prefix = {route["prefix"]: route for route in routes}
    assert by_prefix["/notes"]["upstreams"] == ["http://127.0.0.1:8004"]
    assert by_prefix["/notes"]["auth"] == "jwt" and by_prefix["/notes"]["rate_limit"] == "100/min"
    assert [r["prefix"] for r in routes] == sorted(by_prefix, key=len, reverse=True)
    assert "no --secret" in server.stderr_text()  # jwt routes cannot admit anyone: it says so


# --------------------------------------------------------------------------------------------
# Routing and proxying


def test_the_longest_prefix_wins_and_strip_prefix_cuts_it(gateway):
    assert expect_json(get(gateway, "/api/items"), 200)["name"] == "a"
    deeper = expect_json(get(gateway, "/api/v2/items?x=1"), 200)
    assert deeper["name"] == "b" and deeper["target"] == "/items?x=1"
    assert expect_json(get(gateway, "/api/v2"), 200)["target"] == "/"
    assert expect_json(get(gateway, "/api/v2x"), 200)["name"] == "a"  # whole segments only
    expect_problem(get(gateway, "/elsewhere"), 404)
    assert expect_json(get(gateway, "/api"), 200)["target"] == "/api"


def test_method_path_query_headers_and_body_reach_the_upstream(gateway, upstreams):
    resp = requests.put(f"{gateway.url}/api/a%20b/c?q=1&r=%2F", data=b"the body",
                        headers={"X-Custom": "kept", "Content-Type": "text/plain"},
                        timeout=TIMEOUT)
    echo = expect_json(resp, 200)
    assert echo["method"] == "PUT" and echo["target"] == "/api/a%20b/c?q=1&r=%2F"
    assert echo["body"] == "the body"
    assert header_values(echo, "x-custom") == ["kept"]
    assert header_values(echo, "content-type") == ["text/plain"]
    assert header_values(echo, "content-length") == ["8"]
    assert header_values(echo, "transfer-encoding") == []
    assert header_values(echo, "host") == [f"127.0.0.1:{upstreams['a'].port}"]


def test_hop_by_hop_fields_are_removed_and_forwarding_fields_added(gateway):
    request_id = f"test-{uuid.uuid4().hex}"
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("GET", "/api/hops", host="public.example", headers=[
            ("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"), ("Keep-Alive", "300"),
            ("TE", "trailers"), ("Upgrade", "websocket"), ("Proxy-Authorization", "Basic x"),
            ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "evil.example"),
            ("X-Request-Id", request_id), ("Via", "1.0 corporate-proxy"),
            ("X-End-To-End", "kept")]))
        resp = conn.read_response(timeout=TIMEOUT)
    echo = resp.json()
    names = {name for name, _ in echo["headers"]}
    for hop in ("connection", "x-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert hop not in names, (hop, echo["headers"])
    assert header_values(echo, "x-end-to-end") == ["kept"]
    assert header_values(echo, "x-forwarded-for") == ["127.0.0.1"]  # the peer, not the claim
    assert header_values(echo, "x-forwarded-proto") == ["http"]
    assert header_values(echo, "x-forwarded-host") == ["public.example"]
    assert header_values(echo, "via") == ["1.0 corporate-proxy, 1.1 api_gateway"]
    # one request id, end to end: the client's reaches the upstream and comes back
    assert header_values(echo, "x-request-id") == [request_id]
    assert resp.header_values("X-Request-Id") == [request_id]


def test_a_request_id_is_made_when_the_client_sends_none(gateway):
    resp = get(gateway, "/api/no-id")
    echo = expect_json(resp, 200)
    assert header_values(echo, "x-request-id") == [resp.headers["X-Request-Id"]]
    assert len(resp.headers["X-Request-Id"]) >= 16


def test_the_answer_loses_its_hop_by_hop_fields_and_keeps_repeated_ones(gateway):
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT)
    conn.request("GET", "/api/fields")
    resp = conn.getresponse()
    assert resp.read() == b"ok"
    fields = resp.getheaders()
    conn.close()
    names = [name.lower() for name, _ in fields]
    assert "x-upstream-secret" not in names and "keep-alive" not in names
    assert [v for n, v in fields if n.lower() == "set-cookie"] == [
        "a=1; Path=/", "b=2; Expires=Wed, 09 Jun 2038 10:18:14 GMT"]  # never joined
    assert ("X-Kept", "yes") in fields
    assert "1.1 api_gateway" in resp.getheader("Via")
    assert names.count("date") == 1 and names.count("x-request-id") == 1


def test_chunked_bodies_cross_both_ways_reframed(gateway, upstreams):
    def pieces():
        yield b"first piece, "
        yield b"second piece"
    echo = expect_json(requests.post(f"{gateway.url}/api/upload", data=pieces(),
                                     timeout=TIMEOUT), 200)
    assert echo["body"] == "first piece, second piece"
    assert header_values(echo, "transfer-encoding") == ["chunked"]
    assert header_values(echo, "content-length") == []
    resp = get(gateway, "/api/chunked")
    assert expect(resp, 200).text == "one two three"


def test_an_answer_is_streamed_as_the_upstream_sends_it(gateway, upstreams):
    upstream = upstreams["a"]
    upstream.release.clear()
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("GET", "/api/hold"))
        deadline = time.monotonic() + TIMEOUT
        while b"first " not in conn.buffer and time.monotonic() < deadline:
            conn._recv(deadline)
        assert b"first " in conn.buffer  # while the upstream still holds the rest back
        assert b"last" not in conn.buffer
        upstream.release.set()
        resp = conn.read_response(timeout=TIMEOUT)
    assert resp.status == 200 and resp.body == b"first last"


def test_a_request_body_is_streamed_as_the_client_sends_it(gateway, upstreams):
    upstream = upstreams["a"]
    target = f"/api/stream-{uuid.uuid4().hex[:8]}"
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("POST", target, headers=[("Content-Length", "20")]) + b"0123456789")
        upstream.wait_for(lambda records: any(r["target"] == target and r["body"] == b"0123456789"
                                              for r in records))
        conn.send(b"abcdefghij")
        echo = conn.read_response(timeout=TIMEOUT).json()
    assert echo["body"] == "0123456789abcdefghij"


def test_upstream_connections_are_kept_alive_and_reused(gateway):
    ports = {expect_json(get(gateway, "/api/reuse"), 200)["peer_port"] for _ in range(6)}
    assert len(ports) == 1, ports
    metrics = expect_json(get(gateway, "/gateway/metrics"), 200)
    assert metrics["connections_reused"] >= 5


def test_a_pooled_connection_the_upstream_closed_is_not_used_again(gateway):
    expect_json(get(gateway, "/api/then-close"), 200)
    for _ in range(3):  # the gateway's kept connection is gone: a fresh one, never a 502
        expect_json(get(gateway, "/api/after-close"), 200)


def test_answers_without_a_body_or_framed_by_the_close_keep_their_meaning(gateway):
    with requests.Session() as session:
        resp = session.get(f"{gateway.url}/api/no-content", timeout=TIMEOUT)
        assert resp.status_code == 204 and resp.content == b"" and resp.headers["X-Done"] == "yes"
        assert "Transfer-Encoding" not in resp.headers and "Content-Length" not in resp.headers
        expect_json(session.get(f"{gateway.url}/api/next", timeout=TIMEOUT), 200)  # still in step
        resp = session.get(f"{gateway.url}/api/until-close", timeout=TIMEOUT)
        assert resp.status_code == 200 and resp.text == "until the end"
        assert resp.headers["Transfer-Encoding"] == "chunked"  # re-framed for the client


def test_an_upstream_answer_with_ambiguous_framing_is_a_502(gateway):
    expect_problem(get(gateway, "/api/ambiguous"), 502)


def test_expect_100_continue_is_answered_by_the_gateway(gateway):
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("POST", "/api/expect", headers=[
            ("Content-Length", "5"), ("Expect", "100-continue")]))
        interim = conn.read_response(timeout=TIMEOUT)
        assert interim.status == 100
        conn.send(b"hello")
        echo = conn.read_response(timeout=TIMEOUT).json()
    assert echo["body"] == "hello" and header_values(echo, "expect") == []


# --------------------------------------------------------------------------------------------
# Framing: smuggling and cut-off bodies


def test_ambiguous_framing_from_a_client_is_refused_not_forwarded(gateway, upstreams):
    target = f"/api/smuggle-{uuid.uuid4().hex[:8]}"
    body = b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("POST", target, body=body, headers=[
            ("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]))
        resp = conn.read_response(timeout=TIMEOUT)
    assert resp.status == 400
    get(gateway, "/api/after-smuggling")  # the upstream has seen what came after, if anything
    assert not upstreams["a"].seen(target) and not upstreams["a"].seen("smuggled")


def test_a_slow_upstream_holds_the_client_body_back_instead_of_buffering_it(start_server, tmp_path):
    """An upstream that takes the request head and then reads nothing: the gateway must stop
    reading the client's body once a little of it waits (back-pressure), not hold the whole
    body up to --max-body in memory. The client's socket then stops taking bytes: what it got
    out is bounded by the kernel's buffers along the way, far below the body's size."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    config = write_config(tmp_path, [{"prefix": "/silent", "timeout_s": 60,
                                      "upstreams": [f"http://127.0.0.1:{silent.getsockname()[1]}"]}])
    server = start_server(SCRIPT, "--config", config, "--max-body", str(512 * 2**20))
    body_size = 256 * 2**20
    client = socket.create_connection((server.host, server.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.sendall(request_bytes("POST", "/silent/upload", headers=[("Content-Length", str(body_size))]))
    client.setblocking(False)
    piece, sent = b"x" * 65536, 0
    while sent < body_size:
        if not select.select([], [client], [], 2.0)[1]:
            break  # two seconds without room: the gateway has stopped reading
        try:
            sent += client.send(piece[:body_size - sent])
        except BlockingIOError:
            pass
    try:
        assert sent < 64 * 2**20, f"the gateway took {sent} of {body_size} bytes for an upstream " \
                                  f"that read none of them"
    finally:
        client.close()
        for conn in held:
            conn.close()
        silent.close()


def test_a_client_body_cut_off_closes_the_upstream_connection(gateway, upstreams):
    upstream = upstreams["a"]
    target = f"/api/cut-{uuid.uuid4().hex[:8]}"
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("POST", target, headers=[("Content-Length", "100000")])
                  + b"x" * 1000)
        upstream.wait_for(lambda records: any(r["target"] == target and r["body"]
                                              for r in records))
    # the upstream reads an end of stream where the rest of the body should be: the request is
    # never complete (a gateway that kept the connection open would leave it waiting instead)
    upstream.wait_for(lambda records: any(r["target"] == target and r.get("cut")
                                          for r in records))
    record = upstream.seen(target)[0]
    assert not record["complete"] and len(record["body"]) < 100000


def test_an_upstream_that_closes_before_answering_is_a_502(gateway):
    expect_problem(get(gateway, "/api/drop-before-head"), 502)
    expect_problem(get(gateway, "/api/drop-mid-small"), 502)  # nothing was sent yet


@pytest.mark.parametrize("path", ["/api/drop-mid-large", "/api/drop-mid-chunked"])
def test_an_answer_cut_off_mid_body_closes_the_client_connection(gateway, path):
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("GET", path))
        data = conn.read_until_closed(TIMEOUT)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"chunked" in head.lower():
        assert not body.endswith(b"0\r\n\r\n")  # never the last chunk
    else:
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        assert len(body) < length


def test_dot_segments_are_refused(gateway):
    with RawConnection(gateway.host, gateway.port, timeout=TIMEOUT) as conn:
        conn.send(request_bytes("GET", "/api/../admin"))
        assert conn.read_response(timeout=TIMEOUT).status == 400


# --------------------------------------------------------------------------------------------
# JWT at the edge, rate limits


def test_jwt_routes_need_a_valid_token_and_pass_its_sub_as_x_user_id(gateway):
    missing = get(gateway, "/private/x")
    expect_problem(missing, 401)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for headers in (bearer("7", secret="another-secret-that-is-long-enough-too!"),
                    bearer("7", ttl=-3600), bearer("7", issuer="someone-else"),
                    {"Authorization": "Bearer not.a.token"}):
        refused = get(gateway, "/private/x", headers=headers)
        expect_problem(refused, 401)
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    echo = expect_json(get(gateway, "/private/x", headers={**bearer("42"), "X-User-Id": "1"}), 200)
    assert header_values(echo, "x-user-id") == ["42"]  # the token's, never the client's


def test_a_client_x_user_id_never_reaches_the_upstream(gateway):
    echo = expect_json(get(gateway, "/api/forged", headers={"X-User-Id": "1"}), 200)
    assert header_values(echo, "x-user-id") == []


def test_rate_limits_per_client_address_with_the_ietf_fields(gateway):
    answers = [get(gateway, "/limited/x", headers={"X-Forwarded-For": f"10.0.0.{n}"})
               for n in range(4)]  # a new X-Forwarded-For each time changes nothing
    for resp in answers[:3]:
        expect(resp, 200)
        assert resp.headers["RateLimit-Policy"] == '"default";q=3;w=3600'
    assert [r.headers["RateLimit"].split(";")[1] for r in answers[:3]] == ["r=2", "r=1", "r=0"]
    expect_problem(answers[3], 429)
    assert int(answers[3].headers["Retry-After"]) >= 1


def test_rate_limits_on_jwt_routes_are_per_user(gateway):
    user, other = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    statuses = [get(gateway, "/private/x", headers=bearer(user)).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    expect(get(gateway, "/private/x", headers=bearer(other)), 200)


def test_without_a_secret_every_token_is_refused(start_server, upstreams, tmp_path):
    config = write_config(tmp_path, [{"prefix": "/private", "upstreams": [upstreams["c"].url],
                                      "auth": "jwt"}])
    server = start_server(SCRIPT, "--config", config)
    resp = get(server, "/private/x", headers=bearer("1"))
    expect_problem(resp, 401)
    assert "secret" in resp.json()["detail"]
    assert "warning" in server.stderr_text() and "--secret" in server.stderr_text()


# --------------------------------------------------------------------------------------------
# Balancing, health, failures, the breaker


def test_round_robin_over_the_upstreams(gateway):
    names = [expect_json(get(gateway, "/pair/rr"), 200)["name"] for _ in range(4)]
    assert names in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_an_upstream_that_is_down_is_a_502_then_taken_out_503(gateway):
    expect_problem(get(gateway, "/down/x"), 502)
    resp = get(gateway, "/down/x")
    expect_problem(resp, 503)
    assert int(resp.headers["Retry-After"]) >= 1
    health = expect_json(get(gateway, "/gateway/health"), 200)["upstreams"]
    assert {"route": "/down", "url": "http://127.0.0.1:1", "healthy": False,
            "breaker": "closed"} in health


def test_an_upstream_too_slow_is_a_504(gateway, upstreams):
    expect_problem(get(gateway, "/slow/slow"), 504)


def test_active_health_checks_take_an_upstream_out_and_put_it_back(start_server, tmp_path):
    upstream, spare = ScriptedUpstream("sick"), ScriptedUpstream("well")
    try:
        config = write_config(tmp_path, [{"prefix": "/x", "upstreams": [upstream.url, spare.url]}])
        server = start_server(SCRIPT, "--config", config, "--health-s", "0.2")
        upstream.health_status = 503
        wait_for_health(server, upstream.url, False)
        assert {expect_json(get(server, "/x/a"), 200)["name"] for _ in range(3)} == {"well"}
        spare.health_status = 500
        wait_for_health(server, spare.url, False)
        expect_problem(get(server, "/x/a"), 503)  # none healthy
        upstream.health_status = 200
        wait_for_health(server, upstream.url, True)
        assert expect_json(get(server, "/x/a"), 200)["name"] == "sick"
    finally:
        upstream.close()
        spare.close()


def test_an_upstream_stopped_and_restarted_is_taken_out_and_put_back(start_server, tmp_path):
    upstream = start_server("level01/health_check.py")
    config = write_config(tmp_path, [{"prefix": "/hc", "upstreams": [upstream.url],
                                      "strip_prefix": True}])
    gateway = start_server(SCRIPT, "--config", config, "--health-s", "0.2")
    assert expect_json(get(gateway, "/hc/health"), 200)["status"] == "ok"
    upstream.stop()
    wait_for_health(gateway, upstream.url, False)
    expect_problem(get(gateway, "/hc/health"), 503)
    start_server("level01/health_check.py", "--port", upstream.port)  # the same address again
    wait_for_health(gateway, upstream.url, True)
    assert expect_json(get(gateway, "/hc/health"), 200)["status"] == "ok"


def wait_for_health(server, url, healthy, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        upstreams = expect_json(get(server, "/gateway/health"), 200)["upstreams"]
        if any(u["url"] == url and u["healthy"] is healthy for u in upstreams):
            return upstreams
        time.sleep(0.05)
    raise AssertionError(f"{url} never became healthy={healthy}: {upstreams}")


def breaker_state(server, url):
    upstreams = expect_json(get(server, "/gateway/health"), 200)["upstreams"]
    return next(u["breaker"] for u in upstreams if u["url"] == url)


def test_the_circuit_breaker_opens_lets_one_trial_through_and_closes(start_server, tmp_path):
    upstream = ScriptedUpstream("flaky")
    upstream.slow_s = 2.0
    try:
        config = write_config(tmp_path, [{"prefix": "/f", "upstreams": [upstream.url],
                                          "timeout_s": 0.3}])
        server = start_server(SCRIPT, "--config", config, "--breaker-failures", "3",
                              "--breaker-open-s", "1.5", "--health-s", "60")
        for _ in range(3):
            expect_problem(get(server, "/f/slow"), 504)
        assert breaker_state(server, upstream.url) == "open"
        received = len(upstream.seen("/f/slow"))
        resp = get(server, "/f/slow")
        expect_problem(resp, 503)  # sent nothing: the upstream saw no new request
        assert len(upstream.seen("/f/slow")) == received and int(resp.headers["Retry-After"]) >= 1

        # half-open: one trial goes through; meanwhile the others are refused
        deadline = time.monotonic() + TIMEOUT
        while breaker_state(server, upstream.url) != "half_open":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        trial = {}
        thread = threading.Thread(target=lambda: trial.update(resp=get(server, "/f/slow")))
        thread.start()
        upstream.wait_for(lambda records: len([r for r in records if "slow" in r["target"]])
                          == received + 1)
        expect_problem(get(server, "/f/slow"), 503)
        thread.join(TIMEOUT)
        expect_problem(trial["resp"], 504)  # the trial failed: open again
        assert breaker_state(server, upstream.url) == "open"

        upstream.slow_s = 0
        while breaker_state(server, upstream.url) != "half_open":
            assert time.monotonic() < deadline + TIMEOUT
            time.sleep(0.05)
        expect_json(get(server, "/f/slow"), 200)  # the trial succeeded: closed
        assert breaker_state(server, upstream.url) == "closed"
        expect_json(get(server, "/f/slow"), 200)
    finally:
        upstream.close()


# --------------------------------------------------------------------------------------------
# With real projects: health_check behind the gateway, jwt_auth's tokens for notes


def test_real_projects_behind_the_gateway(start_server, tmp_path):
    health = start_server("level01/health_check.py")
    auth = start_server("level03/jwt_auth.py", "--secret", SECRET, "--scrypt-n", "1024")
    notes = start_server("level02/notes.py")
    config = write_config(tmp_path, [
        {"prefix": "/hc", "upstreams": [health.url], "strip_prefix": True},
        {"prefix": "/auth", "upstreams": [auth.url]},
        {"prefix": "/notes", "upstreams": [notes.url], "auth": "jwt"}])
    gateway = start_server(SCRIPT, "--config", config, "--secret", SECRET)
    assert expect_json(get(gateway, "/hc/health"), 200)["status"] == "ok"
    head = requests.head(f"{gateway.url}/hc/health", timeout=TIMEOUT)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) > 0

    account = {"email": "gw@example.com", "password": "correct horse battery staple"}
    expect(requests.post(f"{gateway.url}/auth/signup", json=account, timeout=TIMEOUT), 201)
    token = expect_json(requests.post(f"{gateway.url}/auth/login", json=account,
                                      timeout=TIMEOUT), 200)["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    created = requests.post(f"{gateway.url}/notes", json={"title": "via the gateway"},
                            headers=headers, timeout=TIMEOUT)
    note = expect_json(created, 201)
    assert created.headers["Location"].startswith("/notes/")
    listed = expect_json(get(gateway, "/notes", headers=headers), 200)
    assert [n["id"] for n in listed["items"]] == [note["id"]]
    expect_problem(get(gateway, "/notes"), 401)  # the gateway refuses before notes sees it
