"""level05/chat.py, black-box: the WebSocket handshake and every frame rule over a raw socket
(RFC 6455), the chat protocol (rooms, presence, typing, history), back-pressure, pings, the
close handshake and SIGTERM, the HTTP lists, and real clients (the `websockets` library and
`websocket-client`, skipped when absent). The browser page is in test_chat_browser.py.

`WebSocket` below is a client written from the RFC for these tests, independent of the
server's code: the handshake by hand, masked frames out, frames in.
"""
import json
import os
import re
import socket
import struct
import threading
import time
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once

SCRIPT = "level05/chat.py"
WAIT = 5.0                       # s for any one frame or answer
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="          # RFC 6455 §1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def fresh_room():
    return "r-" + uuid.uuid4().hex[:12]


class WebSocket:
    """A raw client connection: `status` and `headers` of the handshake's answer, then frames."""

    def __init__(self, server, room=None, name="ada", *, headers=None, rcvbuf=None, path=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect((server.host, server.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fields = {"Host": f"{server.host}:{server.port}", "Upgrade": "websocket",
                  "Connection": "Upgrade", "Sec-WebSocket-Key": RFC_KEY,
                  "Sec-WebSocket-Version": "13"}
        for name_, value in (headers or {}).items():
            if value is None:
                fields.pop(name_, None)
            else:
                fields[name_] = value
        target = path or f"/ws?room={room or fresh_room()}&name={name}"
        head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self.sock.sendall((head + "\r\n").encode("utf-8"))
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in
                        (line.split(":", 1) for line in lines[1:])}
        if self.status != 101:
            length = int(self.headers.get("content-length", 0))
            while len(self.buffer) < length:
                self._fill()
            self.body = json.loads(self.buffer[:length]) if length else None

    def _fill(self, timeout=WAIT):
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buffer += chunk

    def _take(self, size, timeout):
        while len(self.buffer) < size:
            self._fill(timeout)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    # -- frames

    def send_frame(self, opcode, payload=b"", *, fin=True, rsv=0, masked=True):
        mask = os.urandom(4)
        size = len(payload)
        head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
        bit = 0x80 if masked else 0
        if size < 126:
            head += bytes([bit | size])
        elif size < 1 << 16:
            head += bytes([bit | 126]) + struct.pack("!H", size)
        else:
            head += bytes([bit | 127]) + struct.pack("!Q", size)
        if masked:
            payload = mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + payload)

    def send_json(self, message):
        self.send_frame(TEXT, json.dumps(message).encode())

    def recv_frame(self, timeout=WAIT):
        """(fin, opcode, payload) of the next frame; server frames are never masked (§5.1)."""
        first, second = self._take(2, timeout)
        assert not second & 0x80, "the server masked a frame"
        assert not first & 0x70, "the server set reserved bits"
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._take(2, timeout))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._take(8, timeout))[0]
        return bool(first & 0x80), first & 0x0F, self._take(size, timeout)

    def recv_json(self, timeout=WAIT):
        """The next text message (pings and pongs in between are skipped)."""
        while True:
            fin, opcode, payload = self.recv_frame(timeout)
            if opcode in (PING, PONG):
                continue
            assert opcode == TEXT and fin, f"expected a text message, got opcode {opcode}: {payload!r}"
            return json.loads(payload)

    def recv_type(self, kind, timeout=WAIT):
        """The next message of type `kind`, skipping others."""
        while (message := self.recv_json(timeout))["type"] != kind:
            pass
        return message

    def joined(self):
        """Read the presence and history that every join begins with; returns them."""
        presence = self.recv_json()
        assert presence["type"] == "presence", presence
        history = self.recv_json()
        assert history["type"] == "history", history
        return presence, history

    def expect_close(self, code, timeout=WAIT):
        """The next frames end with a Close carrying `code`, then the server closes TCP."""
        while True:
            fin, opcode, payload = self.recv_frame(timeout)
            if opcode == CLOSE:
                break
        got = struct.unpack("!H", payload[:2])[0] if payload else 1005
        assert got == code, f"close code {got} ({payload[2:]!r}), expected {code}"
        assert self.is_closed(timeout), "the server kept the TCP connection open after its Close"
        return payload

    def is_closed(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def server(start_server_module):
    """A server shared by the module's tests (each in a room of its own), with small messages."""
    return start_server_module(SCRIPT, "--max-message", "1024")


@pytest.fixture(scope="module")
def default_server(start_server_module):
    return start_server_module(SCRIPT)


def connect(server, room=None, name="ada", **kw):
    ws = WebSocket(server, room, name, **kw)
    assert ws.status == 101, (ws.status, ws.headers, getattr(ws, "body", None))
    ws.joined()
    return ws


# --------------------------------------------------------------------------------------------
# The opening handshake


def test_the_rfc_accept_vector(server):
    with WebSocket(server) as ws:
        assert ws.status == 101
        assert ws.headers["sec-websocket-accept"] == RFC_ACCEPT
        assert ws.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in ws.headers["connection"].lower()


@pytest.mark.parametrize("headers, status", [
    pytest.param({"Upgrade": None}, 426, id="no-upgrade"),
    pytest.param({"Connection": "keep-alive"}, 426, id="no-connection-upgrade"),
    pytest.param({"Sec-WebSocket-Version": None}, 426, id="no-version"),
    pytest.param({"Sec-WebSocket-Version": "8"}, 426, id="version-8"),
    pytest.param({"Sec-WebSocket-Key": None}, 400, id="no-key"),
    pytest.param({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, id="key-not-16-bytes"),
    pytest.param({"Sec-WebSocket-Key": "not base64 at all!!!!!=="}, 400, id="key-not-base64"),
])
def test_a_bad_handshake_is_refused(server, headers, status):
    with WebSocket(server, headers=headers) as ws:
        assert ws.status == status, (ws.status, ws.body)
        assert ws.headers["content-type"].startswith("application/problem+json")
        assert ws.body["status"] == status
        if status == 426:
            assert ws.headers["sec-websocket-version"] == "13"
            assert ws.headers["upgrade"].lower() == "websocket"
        assert "sec-websocket-accept" not in ws.headers


def test_plain_http_on_ws_is_told_to_upgrade(server):
    resp = requests.get(f"{server.url}/ws?room=lobby&name=ada", timeout=WAIT)
    expect_problem(resp, 426)
    assert resp.headers["Sec-WebSocket-Version"] == "13"


@pytest.mark.parametrize("query, fields", [
    ("", {"room", "name"}),
    ("room=lobby", {"name"}),
    ("name=ada", {"room"}),
    ("room=has%20space&name=ada", {"room"}),
    ("room=" + "x" * 65 + "&name=ada", {"room"}),
    ("room=lobby&name=%20%20", {"name"}),
    ("room=lobby&name=" + "n" * 33, {"name"}),
    ("room=lobby&name=a%07b", {"name"}),
])
def test_room_and_name_are_checked(server, query, fields):
    with WebSocket(server, path=f"/ws?{query}") as ws:
        assert ws.status == 400, ws.status
        assert {e["field"] for e in ws.body["errors"]} == fields, ws.body


def test_origin_check(start_server):
    server = start_server(SCRIPT, "--allowed-origins", "https://chat.example.com")
    own = f"http://{server.host}:{server.port}"
    for origin, status in ((None, 101), (own, 101), ("https://chat.example.com", 101),
                           ("https://evil.example", 403), ("null", 403),
                           (f"https://{server.host}:{server.port}", 403)):
        with WebSocket(server, headers={"Origin": origin}) as ws:
            assert ws.status == status, f"Origin {origin!r} → {ws.status}"
            if status == 403:
                assert ws.body["status"] == 403


def test_threaded_transport_is_refused_at_start():
    done = run_once(SCRIPT, "--port", "0", "--server", "threaded", "--db", ":memory:")
    assert done.returncode == 2, done.stderr
    assert "asyncio" in done.stderr and "Traceback" not in done.stderr
    assert "listening on" not in done.stdout


# --------------------------------------------------------------------------------------------
# Frames (RFC 6455 §5)


@pytest.mark.parametrize("send, code", [
    pytest.param(lambda ws: ws.send_frame(TEXT, b'{"type":"typing"}', masked=False), 1002,
                 id="unmasked"),
    pytest.param(lambda ws: ws.send_frame(TEXT, b"{}", rsv=4), 1002, id="rsv1"),
    pytest.param(lambda ws: ws.send_frame(TEXT, b"{}", rsv=1), 1002, id="rsv3"),
    pytest.param(lambda ws: ws.send_frame(0x3, b"x"), 1002, id="opcode-3"),
    pytest.param(lambda ws: ws.send_frame(0xB, b"x"), 1002, id="opcode-B"),
    pytest.param(lambda ws: ws.send_frame(PING, b"p" * 126), 1002, id="ping-126-bytes"),
    pytest.param(lambda ws: ws.send_frame(PING, b"p", fin=False), 1002, id="fragmented-ping"),
    pytest.param(lambda ws: ws.send_frame(CONTINUATION, b"x"), 1002, id="continuation-first"),
    pytest.param(lambda ws: (ws.send_frame(TEXT, b"a", fin=False), ws.send_frame(TEXT, b"b")),
                 1002, id="new-message-mid-message"),
    pytest.param(lambda ws: ws.send_frame(TEXT, b"\xff"), 1007, id="invalid-utf8"),
    pytest.param(lambda ws: ws.send_frame(TEXT, b"\xed\xa0\x80"), 1007, id="utf8-surrogate"),
    pytest.param(lambda ws: (ws.send_frame(TEXT, b"caf\xc3", fin=False),
                             ws.send_frame(CONTINUATION, b"(")), 1007, id="invalid-utf8-across-fragments"),
    pytest.param(lambda ws: (ws.send_frame(TEXT, b"ok", fin=False),
                             ws.send_frame(CONTINUATION, b"\xc0\xaf")), 1007, id="invalid-utf8-second-fragment"),
    pytest.param(lambda ws: ws.send_frame(TEXT, b"x" * 1025), 1009, id="over-max-message"),
    pytest.param(lambda ws: ws.send_frame(BINARY, b"x" * 1025), 1009, id="binary-over-max"),
    pytest.param(lambda ws: [ws.send_frame(TEXT if n == 0 else CONTINUATION, b"x" * 300, fin=n == 3)
                             for n in range(4)], 1009, id="over-max-from-fragments"),
])
def test_a_broken_frame_rule_closes_with_its_code(server, send, code):
    with connect(server) as ws:
        send(ws)
        ws.expect_close(code)


def test_a_frame_announcing_a_huge_length_is_refused_before_its_payload(server):
    with connect(server) as ws:
        ws.sock.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + os.urandom(4))
        ws.expect_close(1009)


def test_the_default_max_message_is_64_kib(start_server):
    server = start_server(SCRIPT)
    with connect(server) as ws:
        text = json.dumps({"type": "history"}) + " " * (64 * 1024 - 19)
        assert len(text) == 64 * 1024
        ws.send_frame(TEXT, text.encode())   # exactly 64 KiB: taken
        assert ws.recv_type("history")["messages"] == []
        ws.send_frame(BINARY, b"x" * (64 * 1024 + 1))
        ws.expect_close(1009)


def test_fragments_with_a_ping_between_them(server):
    room = fresh_room()
    with connect(server, room) as ws:
        message = json.dumps({"type": "message", "text": "née en fragments"}, ensure_ascii=False).encode()
        cut = message.index(b"\xc3") + 1          # split inside the two bytes of "é"
        ws.send_frame(TEXT, message[:cut], fin=False)
        ws.send_frame(PING, b"between")
        ws.send_frame(CONTINUATION, message[cut:cut + 5], fin=False)
        ws.send_frame(CONTINUATION, message[cut + 5:])
        fin, opcode, payload = ws.recv_frame()
        assert (fin, opcode, payload) == (True, PONG, b"between")
        assert ws.recv_json()["text"] == "née en fragments"


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_ping_is_answered_with_the_same_payload(server, payload):
    with connect(server) as ws:
        ws.send_frame(PING, payload)
        assert ws.recv_frame() == (True, PONG, payload)


def test_a_binary_message_is_an_error_and_the_connection_stays(server):
    with connect(server) as ws:
        ws.send_frame(BINARY, b"\x00\x01")
        assert ws.recv_json()["type"] == "error"
        ws.send_json({"type": "message", "text": "still here"})
        assert ws.recv_type("message")["text"] == "still here"


# --------------------------------------------------------------------------------------------
# The close handshake (§5.5.1, §7.4)


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
def test_close_is_echoed_with_its_code(server, code):
    with connect(server) as ws:
        ws.send_frame(CLOSE, struct.pack("!H", code) + "au revoir".encode())
        ws.expect_close(code)


def test_the_log_says_how_each_session_ended(server):
    room = fresh_room()
    with connect(server, room) as ws:
        ws.send_frame(CLOSE, struct.pack("!H", 4321))
        ws.expect_close(4321)
    with connect(server, room) as ws:
        ws.send_frame(TEXT, b"\xff")
        ws.expect_close(1007)
    connect(server, room).close()   # gone without a Close
    for code in (4321, 1007, 1006):
        server.wait_for_stderr(re.compile(rf"websocket room={room} .*closed {code} "))


def test_a_close_without_a_code_is_answered_without_one(server):
    with connect(server) as ws:
        ws.send_frame(CLOSE, b"")
        payload = ws.expect_close(1005)   # 1005: the answer is empty too, no code on the wire
        assert payload == b""


@pytest.mark.parametrize("payload, code", [
    pytest.param(struct.pack("!H", 1005), 1002, id="1005-on-the-wire"),
    pytest.param(struct.pack("!H", 1006), 1002, id="1006-on-the-wire"),
    pytest.param(struct.pack("!H", 1004), 1002, id="1004-reserved"),
    pytest.param(struct.pack("!H", 999), 1002, id="999"),
    pytest.param(struct.pack("!H", 5000), 1002, id="5000"),
    pytest.param(b"\x03", 1002, id="one-byte"),
    pytest.param(struct.pack("!H", 1000) + b"\xff", 1007, id="reason-not-utf8"),
])
def test_an_invalid_close_payload_is_a_protocol_error(server, payload, code):
    with connect(server) as ws:
        ws.send_frame(CLOSE, payload)
        ws.expect_close(code)


def test_sigterm_closes_every_connection_with_1001_and_exits_0(start_server):
    server = start_server(SCRIPT)
    room = fresh_room()
    first, second = connect(server, room, "ada"), connect(server, room, "bob")
    first.recv_type("join")
    stopping = {}
    stopper = threading.Thread(target=lambda: stopping.update(took=server.stop(timeout=5)))
    stopper.start()   # SIGTERM, then wait for exit status 0
    for ws in (first, second):
        fin, opcode, payload = ws.recv_frame()
        while opcode != CLOSE:
            fin, opcode, payload = ws.recv_frame()
        assert struct.unpack("!H", payload[:2])[0] == 1001, payload
        assert ws.is_closed(), "the server kept the connection"
        ws.close()
    stopper.join(10)
    assert stopping.get("took", 99) < 5, "the server did not exit 0 within 5 s of SIGTERM"


# --------------------------------------------------------------------------------------------
# Liveness: server pings, dead peers


def answer_pings(ws, texts):
    """In a thread: answer every ping, keep the text messages, until the connection ends."""
    def run():
        try:
            while True:
                fin, opcode, payload = ws.recv_frame(timeout=10)
                if opcode == PING:
                    ws.send_frame(PONG, payload)
                elif opcode == TEXT:
                    texts.append(json.loads(payload))
                elif opcode == CLOSE:
                    texts.append({"type": "closed", "payload": payload})
                    return
        except (OSError, EOFError):
            return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_server_pings_and_drops_a_peer_that_does_not_answer(start_server):
    server = start_server(SCRIPT, "--ping-s", "0.2")
    room = fresh_room()
    with connect(server, room, "alive") as alive, connect(server, room, "dead") as dead:
        seen = []
        answer_pings(alive, seen)
        pings = 0
        fin, opcode, payload = dead.recv_frame()
        while opcode != CLOSE:   # it gets pings, answers none
            assert opcode == PING, opcode
            pings += 1
            assert pings <= 3, "still pinging a peer that answered none"
            fin, opcode, payload = dead.recv_frame()
        assert pings == 1, "dropped after one unanswered ping"
        assert struct.unpack("!H", payload[:2])[0] == 1011
        assert dead.is_closed()
        time.sleep(1.0)   # five more ping rounds: the one that answers stays
        alive.send_json({"type": "message", "text": "still here"})
        deadline = time.monotonic() + WAIT
        while not any(m.get("text") == "still here" for m in seen):
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        assert {"type": "leave", "user": "dead"} in [
            {k: m[k] for k in ("type", "user")} for m in seen if m["type"] == "leave"]
        assert not any(m["type"] == "closed" for m in seen), seen


# --------------------------------------------------------------------------------------------
# Rooms, presence, typing, messages, history


def test_presence_join_typing_message_leave(server):
    room = fresh_room()
    ada = WebSocket(server, room, "ada")
    presence, history = ada.joined()
    assert presence == {"type": "presence", "users": ["ada"]}
    assert history == {"type": "history", "messages": []}
    bob = WebSocket(server, room, "bob")
    presence, _ = bob.joined()
    assert presence["users"] == ["ada", "bob"]       # the joiner included
    join = ada.recv_json()
    assert join["type"] == "join" and join["user"] == "bob" and join["ts"].endswith("Z")

    bob.send_json({"type": "typing"})
    typing = ada.recv_json()
    assert typing["type"] == "typing" and typing["user"] == "bob"

    bob.send_json({"type": "message", "text": "hello <b>ada</b>"})
    for ws in (ada, bob):                              # the sender gets it too
        message = ws.recv_json()
        assert message["type"] == "message"
        assert set(message) == {"type", "id", "room", "user", "text", "ts"}
        assert (message["room"], message["user"], message["text"]) == (room, "bob", "hello <b>ada</b>")
    bob.close()
    leave = ada.recv_json()
    assert leave["type"] == "leave" and leave["user"] == "bob"
    ada.close()


def test_a_second_tab_with_the_same_name_is_one_presence(server):
    room = fresh_room()
    with connect(server, room, "ada") as first, connect(server, room, "bob") as bob:
        first.recv_type("join")
        second = WebSocket(server, room, "ada")
        presence, _ = second.joined()
        assert presence["users"] == ["ada", "bob"]
        second.close()                                   # ada is still online in the first tab
        bob.send_json({"type": "message", "text": "ping"})
        assert bob.recv_json()["type"] == "message", "a leave for ada while she is still online"


def test_messages_stay_in_their_room(server):
    with connect(server, fresh_room(), "ada") as ada, connect(server, fresh_room(), "bob") as bob:
        ada.send_json({"type": "message", "text": "only here"})
        assert ada.recv_json()["text"] == "only here"
        bob.send_frame(PING, b"sync")
        assert bob.recv_frame() == (True, PONG, b"sync"), "bob got another room's message"


@pytest.mark.parametrize("message", [
    "not json", "[1, 2]", '{"type": "shout", "text": "x"}', '{"text": "x"}',
    '{"type": "message"}', '{"type": "message", "text": ""}', '{"type": "message", "text": "   "}',
    '{"type": "message", "text": 5}', json.dumps({"type": "message", "text": "x" * 4001}),
    '{"type": "message", "text": "a\\u0000b"}', '{"type": "message", "text": "\\ud800"}',
    '{"type": "message", "text": "x", "user": "mallory"}', '{"type": "history", "before": "3"}',
    '{"type": "history", "before": 0}', '{"type": "history", "before": true}',
])
def test_a_bad_message_is_an_error_and_the_connection_stays_open(default_server, message):
    with connect(default_server) as ws:   # default --max-message: a 4001-character text fits
        ws.send_frame(TEXT, message.encode())
        error = ws.recv_json()
        assert error["type"] == "error" and error["detail"], error
        ws.send_json({"type": "message", "text": "x" * 4000})
        assert ws.recv_type("message")["text"] == "x" * 4000


def test_history_on_join_and_on_request(server):
    room = fresh_room()
    with connect(server, room, "ada") as ada:
        ids = []
        for n in range(60):
            ada.send_json({"type": "message", "text": f"m{n}"})
            ids.append(ada.recv_json()["id"])
    assert ids == sorted(ids)
    with WebSocket(server, room, "bob") as bob:
        _, history = bob.joined()
        assert [m["text"] for m in history["messages"]] == [f"m{n}" for n in range(10, 60)]
        assert set(history["messages"][0]) == {"id", "room", "user", "text", "ts"}
        bob.send_json({"type": "history", "before": ids[10]})
        older = bob.recv_type("history")["messages"]
        assert [m["text"] for m in older] == [f"m{n}" for n in range(10)]
        bob.send_json({"type": "history", "before": ids[55]})
        assert [m["text"] for m in bob.recv_type("history")["messages"]] == \
            [f"m{n}" for n in range(5, 55)]
        bob.send_json({"type": "history"})
        assert len(bob.recv_type("history")["messages"]) == 50


def test_history_survives_a_restart(start_server, tmp_path):
    db = tmp_path / "chat.sqlite3"
    server = start_server(SCRIPT, "--db", db)
    room = fresh_room()
    with connect(server, room) as ws:
        ws.send_json({"type": "message", "text": "kept"})
        ws.recv_json()
    server.stop()
    server = start_server(SCRIPT, "--db", db)
    with WebSocket(server, room, "bob") as ws:
        _, history = ws.joined()
        assert [m["text"] for m in history["messages"]] == ["kept"]


# --------------------------------------------------------------------------------------------
# Back-pressure: a reader that stops reading


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_slow_reader_is_dropped_and_the_others_get_everything_in_order(start_server):
    server = start_server(SCRIPT, "--send-queue", "65536")
    room = fresh_room()
    count, text = 1500, "z" * 3000          # 4.5 MB to each reader
    sender, fast = connect(server, room, "sender"), connect(server, room, "fast")
    slow = WebSocket(server, room, "slow", rcvbuf=4096)
    slow.joined()
    fast.recv_type("join")
    sender.recv_type("join")
    received = {"sender": [], "fast": []}
    leaves = []

    def read(ws, who):
        while len(received[who]) < count:
            message = ws.recv_json(timeout=20)
            if message["type"] == "message":
                received[who].append(message)
            elif message["type"] == "leave":
                leaves.append((who, message["user"]))

    readers = [threading.Thread(target=read, args=(ws, who), daemon=True)
               for ws, who in ((sender, "sender"), (fast, "fast"))]
    for thread in readers:
        thread.start()
    before = rss_kib(server.proc.pid)
    for n in range(count):
        sender.send_json({"type": "message", "text": f"{n} {text}"})
    for thread in readers:
        thread.join(30)
    grown = rss_kib(server.proc.pid) - before
    for who in ("sender", "fast"):
        texts = [m["text"].split()[0] for m in received[who]]
        assert texts == [str(n) for n in range(count)], f"{who} missed or reordered messages"
        ids = [m["id"] for m in received[who]]
        assert ids == sorted(ids)
    assert ("fast", "slow") in leaves, "the slow reader was not dropped"
    # Memory: the slow reader's backlog is bounded by --send-queue, not by what was sent (4.5 MB).
    assert grown < 3 * 1024, f"the server grew by {grown} KiB while a reader stalled"
    # The slow one, reading at last, finds the stream cut: a 1008 Close after its backlog, or
    # a reset once its backlog outlasted the grace period.
    codes = []
    try:
        while True:
            fin, opcode, payload = slow.recv_frame(timeout=5)
            if opcode == CLOSE:
                codes.append(struct.unpack("!H", payload[:2])[0])
    except (EOFError, ConnectionResetError):
        pass
    assert codes in ([], [1008]), codes
    for ws in (sender, fast, slow):
        ws.close()


def test_a_client_that_floods_pings_and_reads_no_pong_is_dropped(start_server):
    server = start_server(SCRIPT, "--send-queue", "65536")
    room = fresh_room()
    with connect(server, room, "watcher") as watcher, \
            WebSocket(server, room, "flooder", rcvbuf=4096) as flooder:
        watcher.recv_type("join")
        mask = os.urandom(4)
        ping = bytes([0x89, 0x80 | 125]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
        try:   # 10 MB of pongs owed, none read: more than the kernel's socket buffers hold
            for _ in range(80):
                flooder.sock.sendall(ping * 1000)
        except OSError:
            pass   # dropped while still sending
        assert watcher.recv_type("leave")["user"] == "flooder"


# --------------------------------------------------------------------------------------------
# HTTP: rooms and messages (the list contract), the page


def test_rooms_and_messages_over_http(server):
    room = fresh_room()
    with connect(server, room, "ada") as ada:
        for n in range(5):
            ada.send_json({"type": "message", "text": f"t{n}"})
            ada.recv_json()
        rooms = []
        url = f"{server.url}/rooms?limit=100"
        while url:
            body = expect_json(requests.get(url, timeout=WAIT), 200)
            rooms += body["items"]
            url = body["next_cursor"] and f"{server.url}/rooms?limit=100&cursor={body['next_cursor']}"
        names = [r["name"] for r in rooms]
        assert names == sorted(names)
        assert {"name": room, "online": 1, "messages": 5} in rooms
    first = expect_json(requests.get(f"{server.url}/rooms/{room}/messages?limit=2", timeout=WAIT), 200)
    assert [m["text"] for m in first["items"]] == ["t4", "t3"]        # newest first
    second = expect_json(requests.get(f"{server.url}/rooms/{room}/messages",
                                      params={"limit": 2, "cursor": first["next_cursor"]},
                                      timeout=WAIT), 200)
    assert [m["text"] for m in second["items"]] == ["t2", "t1"]
    before = first["items"][0]["id"]
    older = expect_json(requests.get(f"{server.url}/rooms/{room}/messages?before={before}",
                                     timeout=WAIT), 200)
    assert [m["text"] for m in older["items"]] == ["t3", "t2", "t1", "t0"]
    assert older["next_cursor"] is None


def test_messages_of_a_room_never_joined_is_a_404(server):
    expect_problem(requests.get(f"{server.url}/rooms/{fresh_room()}/messages", timeout=WAIT), 404)


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "cursor=nope", "before=0", "before=x"])
def test_bad_list_parameters_are_a_400(server, query):
    room = fresh_room()
    with connect(server, room):
        pass
    expect_problem(requests.get(f"{server.url}/rooms/{room}/messages?{query}", timeout=WAIT), 400)


def test_a_bad_room_in_the_path_is_a_400(server):
    expect_problem(requests.get(f"{server.url}/rooms/-bad!/messages", timeout=WAIT), 400)


def test_the_page_has_no_external_assets(server):
    resp = expect(requests.get(f"{server.url}/app", timeout=WAIT), 200)
    assert resp.headers["Content-Type"].startswith("text/html")
    page = resp.text
    assert "new WebSocket(" in page
    for needle in ("src=", "href=", "http://", "https://", "@import"):
        assert needle not in page, f"the page refers to something outside: {needle}"
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    assert expect_json(requests.get(f"{server.url}/", timeout=WAIT), 200)["name"] == "chat"


# --------------------------------------------------------------------------------------------
# Real clients (requirements-interop.txt)


def test_the_websockets_library_client(server):
    client = pytest.importorskip("websockets.sync.client")
    room = fresh_room()
    url = f"ws://{server.host}:{server.port}/ws?room={room}&name="
    with client.connect(url + "ada") as ada, client.connect(url + "bob") as bob:
        assert json.loads(ada.recv(WAIT))["type"] == "presence"
        assert json.loads(ada.recv(WAIT))["type"] == "history"
        assert json.loads(bob.recv(WAIT))["users"] == ["ada", "bob"]
        bob.recv(WAIT)
        join = json.loads(ada.recv(WAIT))
        assert (join["type"], join["user"]) == ("join", "bob")
        ada.send(json.dumps({"type": "message", "text": "é" * 400}, ensure_ascii=False))
        assert json.loads(bob.recv(WAIT))["text"] == "é" * 400
        assert json.loads(ada.recv(WAIT))["text"] == "é" * 400
        assert ada.ping(b"are you there").wait(WAIT)
    with client.connect(url + "carol") as carol:
        carol.recv(WAIT)
        carol.send("x" * 2000)   # over --max-message 1024
        with pytest.raises(Exception) as closed:
            while True:
                carol.recv(WAIT)
        assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1009


def test_websocket_client(server):
    websocket = pytest.importorskip("websocket")
    room = fresh_room()
    url = f"ws://{server.host}:{server.port}/ws?room={room}&name="
    ada = websocket.create_connection(url + "ada", timeout=WAIT)
    bob = websocket.create_connection(url + "bob", timeout=WAIT)
    try:
        assert json.loads(ada.recv())["type"] == "presence"
        ada.recv()
        assert json.loads(ada.recv())["user"] == "bob"
        bob.recv(), bob.recv()
        bob.send(json.dumps({"type": "message", "text": "from websocket-client"}))
        assert json.loads(ada.recv())["text"] == "from websocket-client"
        ada.ping("hi")
        opcode, frame = ada.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"hi")
    finally:
        ada.close()
        bob.close()
