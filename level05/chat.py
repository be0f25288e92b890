"""Real-time chat — rooms over WebSockets (RFC 6455), written by hand on asyncio streams.

What it teaches
  - The opening handshake is plain HTTP: `GET /ws` with `Upgrade: websocket`, `Connection:
    Upgrade`, `Sec-WebSocket-Version: 13` and a random `Sec-WebSocket-Key`; the server proves it
    read them by answering `101 Switching Protocols` with `Sec-WebSocket-Accept =
    base64(SHA-1(key + GUID))` (§4.2.2), and from then on the connection is not HTTP any more
    (lib's `Response.takeover` hands the socket to `run_session`).
  - Sans-I/O, as the `websockets` library does it: the frame codec (`parse_frame`,
    `encode_frame`), the close payload (`parse_close`, `encode_close`), the handshake
    (`accept_key`, `check_handshake`) and one connection's protocol (`ServerProtocol`: bytes in,
    events and bytes out, a state machine) are pure code, tested with byte literals and
    importable by a later project (a gateway that proxies WebSockets). Sockets stay at the edge.
  - Frames: client frames are always masked (§5.3); messages may come in fragments with control
    frames between them (§5.4); control frames carry ≤ 125 bytes and are never fragmented
    (§5.5); text is UTF-8, checked as the fragments arrive (§8.1). A broken rule ends the
    connection with the close code that names it: 1002, 1007, 1009 (`ProtocolError` and its
    subclasses carry their code, as h11's errors carry their status).
  - Liveness: a ping every `--ping-s`; a peer that has not answered it by the next one is dead
    (a laptop closed, a NAT that forgot the connection) and is dropped with 1011.
  - Back-pressure: a connection's send queue is its transport's write buffer, bounded at
    `--send-queue` bytes. A broadcast that would overflow it disconnects that reader (1008)
    instead of slowing the room or holding an unbounded backlog in memory.
  - Rooms, presence (who is online, each name once however many tabs it has open), typing
    notices, and history kept in sqlite.
  - Cross-site WebSocket hijacking: browsers send cookies with a WebSocket handshake from any
    page, so a browser's `Origin` must be this server's own or one listed in `--allowed-origins`
    (403 otherwise); a client that sends no Origin is not a browser and is let in.

Standards: RFC 6455 (The WebSocket Protocol) and the IANA close code registry, RFC 9110 (101,
426 Upgrade Required), RFC 9457 (problem details), HTML Living Standard (the browser's
WebSocket API, used by `GET /app`).

Left out: extensions (permessage-deflate: a frame with RSV1 set is a 1002), subprotocols, TLS
(wss:// is a proxy's job here), sign-in (a name is whatever the client says), several server
processes sharing rooms, and a per-sender rate limit (level06/rate_limiter teaches that).
chat.md's "In production" says who does those.

Needs the asyncio transport: a thread per connection cannot hand a socket over, so
`--server threaded` is refused at start (exit status 2).

    python level05/chat.py [--ping-s S] [--max-message BYTES] [--send-queue BYTES]
                           [--allowed-origins ORIGIN,...] [--db PATH]
"""
import argparse
import asyncio
import base64
import binascii
import codecs
import enum
import hashlib
import json
import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, Forbidden, HTTPError, NotFound, ServiceUnavailable, html_response
from lib.app import bounded, positive_seconds
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, utc_timestamp
from lib.response import Response
from lib.routing import PAGE
from level03.session_auth import csp_hash

app = App("chat", "Chat rooms over WebSockets (RFC 6455 by hand): presence, typing, history, "
          "back-pressure, and a browser page.", port=8019)

MAX_MESSAGE = 64 * 1024       # bytes of one message, however many frames it came in
SEND_QUEUE = 1024 * 1024      # bytes waiting to be sent to one client before it is dropped
PING_S = 20.0                 # seconds between pings; a ping unanswered by the next is a dead peer
CLOSE_TIMEOUT_S = 2.0         # how long a closing connection may take before it is cut
READ_SIZE = 64 * 1024
HISTORY_SIZE = 50             # messages sent on join and per history request
TEXT_MAX = 4000               # characters of one chat message

SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name        TEXT PRIMARY KEY,          -- created on first join
    messages    INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id    INTEGER PRIMARY KEY,             -- one sequence for all rooms: `before` pages by it
    room  TEXT NOT NULL REFERENCES rooms(name),
    user  TEXT NOT NULL,
    text  TEXT NOT NULL,
    ts    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id);
"""


# =============================================================================================
# RFC 6455, sans-I/O: frames, close payloads, the handshake, one connection's protocol
# =============================================================================================

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 §1.3: the same for every server


class Opcode(enum.IntEnum):
    """RFC 6455 §5.2. 0x3–0x7 and 0xB–0xF are reserved: a frame with one is a 1002."""
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


CONTROL = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})


class CloseCode(enum.IntEnum):
    """RFC 6455 §7.4.1 and the IANA registry."""
    NORMAL = 1000
    GOING_AWAY = 1001            # the server is shutting down
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005             # never on the wire: "the Close frame had no code"
    ABNORMAL = 1006              # never on the wire: "the connection ended with no Close frame"
    INVALID_DATA = 1007          # e.g. a text message that is not UTF-8
    POLICY_VIOLATION = 1008      # here: a reader too slow for its room
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011        # here also: a ping left unanswered
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


# The codes a peer may put in a Close frame (§7.4.1, §7.4.2): the registered ones except those
# reserved for reporting (1005, 1006, 1015), and 3000–4999 for libraries and applications.
SENDABLE_CODES = frozenset(c for c in CloseCode if c not in (CloseCode.NO_STATUS, CloseCode.ABNORMAL)) \
    | frozenset(range(3000, 5000))


class ProtocolError(Exception):
    """The peer broke a rule of RFC 6455; `code` is the close code that says which kind. The
    subclasses are the table that maps each failure to its code."""
    code = CloseCode.PROTOCOL_ERROR


class InvalidData(ProtocolError):
    code = CloseCode.INVALID_DATA      # §8.1: text that is not UTF-8


class MessageTooBig(ProtocolError):
    code = CloseCode.MESSAGE_TOO_BIG


class Frame(NamedTuple):
    opcode: Opcode
    payload: bytes
    fin: bool = True


def apply_mask(data, mask):
    """XOR `data` with the 4-byte `mask` repeated (§5.3); the same call masks and unmasks. Done
    on whole integers: one big XOR instead of a Python loop over every byte."""
    size = len(data)
    if not size:
        return b""
    key = (bytes(mask) * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def parse_frame(buffer, *, max_size=MAX_MESSAGE, masked=True):
    """Parse one frame from the start of `buffer` (RFC 6455 §5.2).

    Returns `(frame, consumed)`, or None when the buffer does not hold a whole frame yet (read
    more and call again). Raises `ProtocolError` for a frame that breaks a rule, as soon as its
    first bytes show it: a data frame announcing more than `max_size` bytes is refused before
    any of its payload is read. `masked`: whether frames must be masked (a server parsing a
    client's frames) or must not be (a client parsing a server's).
    """
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0x70:
        raise ProtocolError("reserved bits set, but no extension was negotiated")   # §5.2
    try:
        opcode = Opcode(first & 0x0F)
    except ValueError:
        raise ProtocolError(f"unknown opcode {first & 0x0F:#x}") from None
    fin = bool(first & 0x80)
    if bool(second & 0x80) != masked:
        raise ProtocolError("a client must mask every frame" if masked       # §5.1
                            else "a server must not mask its frames")
    length, offset = second & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length, offset = int.from_bytes(buffer[2:4], "big"), 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length, offset = int.from_bytes(buffer[2:10], "big"), 10
        if length >> 63:
            raise ProtocolError("the most significant bit of a 64-bit length must be 0")
    if opcode in CONTROL:
        # RFC 6455 §5.5: control frames may be injected between fragments, so they are small
        # and whole.
        if not fin:
            raise ProtocolError("a control frame may not be fragmented")
        if length > 125:
            raise ProtocolError("a control frame carries at most 125 bytes")
    elif length > max_size:
        raise MessageTooBig(f"a message may have at most {max_size} bytes")
    mask_at = offset
    if masked:
        offset += 4
    end = offset + length
    if len(buffer) < end:
        return None
    payload = bytes(buffer[offset:end])
    if masked:
        payload = apply_mask(payload, buffer[mask_at:offset])
    return Frame(opcode, payload, fin), end


def encode_frame(frame, mask=None):
    """The bytes of `frame`: unmasked as a server sends it, or masked with the 4-byte `mask` as
    a client must (§5.3: a fresh random mask per frame, e.g. `os.urandom(4)`)."""
    head = bytes([(0x80 if frame.fin else 0) | frame.opcode])
    size = len(frame.payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if mask is None:
        return head + frame.payload
    return head + bytes(mask) + apply_mask(frame.payload, mask)


def encode_close(code, reason=""):
    """A Close frame's payload (§5.5.1): the code in two bytes, then a UTF-8 reason that keeps
    the frame within 125 bytes. NO_STATUS is the empty payload: "no code" is not sent as one."""
    if code == CloseCode.NO_STATUS:
        return b""
    data = reason.encode("utf-8")[:123]
    return code.to_bytes(2, "big") + data.decode("utf-8", "ignore").encode("utf-8")


def parse_close(payload):
    """`(code, reason)` of a Close frame's payload; an empty one is `NO_STATUS` (§7.1.5)."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("a close payload of one byte: a code needs two")
    code = int.from_bytes(payload[:2], "big")
    if code not in SENDABLE_CODES:
        raise ProtocolError(f"close code {code} is not one a peer may send")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidData("the close reason is not UTF-8") from None


# --- the opening handshake (§4.2) --------------------------------------------------------------


def accept_key(key):
    """§4.2.2: what `Sec-WebSocket-Accept` answers to `Sec-WebSocket-Key`. It proves the server
    read the handshake as WebSocket (a cache or a plain HTTP server would not compute it).

    >>> accept_key("dGhlIHNhbXBsZSBub25jZQ==")     # RFC 6455 §1.3
    's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
    """
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def header_tokens(value):
    """The comma-separated tokens of a header value, lower-cased (`keep-alive, Upgrade`)."""
    return {token.strip().lower() for token in (value or "").split(",")}


def upgrade_required(detail):
    """426 (RFC 9110 §15.5.22: with the protocol to upgrade to; RFC 6455 §4.2.2: with the
    version this server speaks)."""
    return HTTPError(detail, status=426, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                  "Sec-WebSocket-Version": "13"})


def origin_allowed(origin, host, allowed_origins=()):
    """§10.2: a browser names the page that opens a WebSocket in `Origin`. Only this server's own
    pages (`http://` + Host) and the origins configured are let in; no Origin means no browser,
    and nothing a cross-site page could forge."""
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    return origin == f"http://{(host or '').lower()}" or origin in allowed_origins


def check_handshake(method, headers, allowed_origins=()):
    """Check a client's opening handshake (§4.2.1) and return the headers of the 101 that
    accepts it, or raise the HTTPError that refuses it: 426 when it does not ask for WebSocket
    version 13, 400 for a request that cannot be one (a bad key, not GET), 403 for a browser page
    of another origin. `headers`: lower-cased names → values, repeated ones joined by commas."""
    if "websocket" not in header_tokens(headers.get("upgrade")) \
            or "upgrade" not in header_tokens(headers.get("connection")):
        raise upgrade_required("this route speaks WebSocket: send Upgrade: websocket and "
                               "Connection: Upgrade")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise upgrade_required("Sec-WebSocket-Version must be 13")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:   # §4.1: a random 16-byte value, base64-encoded (and sent once)
        raise BadRequest("Sec-WebSocket-Key must be 16 random bytes in base64",
                         errors=[{"field": "Sec-WebSocket-Key", "message": "must be 16 bytes in base64"}])
    if method != "GET":
        raise BadRequest("a WebSocket opens with GET")   # §4.1
    if not origin_allowed(headers.get("origin"), headers.get("host"), allowed_origins):
        raise Forbidden("this Origin may not open a WebSocket here (cross-site WebSocket "
                        "hijacking); see --allowed-origins")
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": accept_key(key)}


# --- one connection's protocol, as a state machine ----------------------------------------------


class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"    # we sent a Close frame and wait for the peer's
    CLOSED = "closed"      # the closing handshake is done, or the connection failed


# RFC 6455 §7: every move a connection can make. A move not in the table is a bug, not a state.
MOVES = {
    (State.OPEN, "close_sent"): State.CLOSING,
    (State.OPEN, "close_received"): State.CLOSED,     # answered at once with the same code
    (State.CLOSING, "close_received"): State.CLOSED,
    (State.OPEN, "failed"): State.CLOSED,
    (State.CLOSING, "failed"): State.CLOSED,
}


class Message(NamedTuple):
    data: object           # str for a text message, bytes for a binary one


class Pong(NamedTuple):
    payload: bytes


class Closed(NamedTuple):
    code: int
    reason: str
    by_peer: bool          # the peer closed (its code), or we failed the connection (ours)


class ServerProtocol:
    """The server side of one WebSocket connection, without I/O.

    The contract, as in h11 and `websockets`: give it what the socket read with
    `receive_data(data)`, which returns the events that data completed (`Message`, `Pong`,
    `Closed`); send whatever `data_to_send()` returns; close the socket once `state` is CLOSED.
    Pings are answered and a peer's Close is echoed here, so the caller only writes bytes.
    Frames for others (a room's broadcast) may be written beside these while `state` is OPEN."""

    def __init__(self, max_message=MAX_MESSAGE):
        self.max_message = max_message
        self.state = State.OPEN
        self.buffer = bytearray()
        self.outgoing = []
        self.message_opcode = None   # TEXT or BINARY while a fragmented message is coming in
        self.parts = []
        self.size = 0
        self.decoder = None
        self.close_code = None       # what ended the connection (sent or received)

    def _move(self, event):
        self.state = MOVES[self.state, event]

    def receive_data(self, data):
        events = []
        if self.state is State.CLOSED:
            return events            # §7.1.7: after a failure nothing more is processed
        self.buffer += data
        try:
            while self.state is not State.CLOSED:
                parsed = parse_frame(self.buffer, max_size=self.max_message - self.size)
                if parsed is None:
                    break
                frame, consumed = parsed
                del self.buffer[:consumed]
                event = self._receive_frame(frame)
                if event is not None:
                    events.append(event)
        except ProtocolError as error:
            self.fail(error.code, str(error))
            events.append(Closed(error.code, str(error), by_peer=False))
        return events

    def _receive_frame(self, frame):
        opcode = frame.opcode
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            if self.message_opcode is not None:
                raise ProtocolError("a new message began before the last one ended")   # §5.4
            self.message_opcode = opcode
            self.decoder = codecs.getincrementaldecoder("utf-8")() if opcode is Opcode.TEXT else None
            return self._add_fragment(frame)
        if opcode is Opcode.CONTINUATION:
            if self.message_opcode is None:
                raise ProtocolError("a continuation frame, but no message to continue")
            return self._add_fragment(frame)
        if opcode is Opcode.PING:
            if self.state is State.OPEN:
                self.send(Frame(Opcode.PONG, frame.payload))   # §5.5.3: the same payload back
            return None
        if opcode is Opcode.PONG:
            return Pong(frame.payload)
        code, reason = parse_close(frame.payload)
        if self.state is State.OPEN:
            self.send(Frame(Opcode.CLOSE, encode_close(code)))   # §5.5.1: echo the code
            self.close_code = code
        self._move("close_received")
        return Closed(code, reason, by_peer=True)

    def _add_fragment(self, frame):
        self.size += len(frame.payload)   # parse_frame kept the total within max_message
        if self.decoder is not None:
            try:   # fragments may split a character: the decoder keeps its first bytes
                self.parts.append(self.decoder.decode(frame.payload, final=frame.fin))
            except UnicodeDecodeError:
                raise InvalidData("a text message that is not UTF-8") from None
        else:
            self.parts.append(frame.payload)
        if not frame.fin:
            return None
        data = "".join(self.parts) if self.message_opcode is Opcode.TEXT else b"".join(self.parts)
        self.message_opcode, self.parts, self.size, self.decoder = None, [], 0, None
        return Message(data)

    def send(self, frame):
        self.outgoing.append(encode_frame(frame))

    def data_to_send(self):
        data = b"".join(self.outgoing)
        self.outgoing.clear()
        return data

    def close(self, code, reason=""):
        """Begin the closing handshake (§7.1.2): our Close, then wait for the peer's."""
        if self.state is State.OPEN:
            self.send(Frame(Opcode.CLOSE, encode_close(code, reason)))
            self.close_code = code
            self._move("close_sent")

    def fail(self, code, reason=""):
        """§7.1.7 Fail the WebSocket Connection: a Close frame if none was sent yet, and the
        server then closes the TCP connection without waiting for the peer's answer."""
        if self.state is State.OPEN:
            self.send(Frame(Opcode.CLOSE, encode_close(code, reason)))
            self.close_code = code
        if self.state is not State.CLOSED:
            self._move("failed")


# =============================================================================================
# The chat: members, rooms, the messages clients send, history in sqlite
# =============================================================================================

ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ROOM_PATTERN = f"^{ROOM.pattern}$"          # the same rule, for the OpenAPI document
NAME_MAX = 32
ROOM_RULE = "1–64 letters, digits, '_', '.' or '-', starting with a letter or digit"
NAME_RULE = f"1–{NAME_MAX} characters, no control characters"


class ChatError(Exception):
    """A client message the chat cannot take: answered `{"type": "error", "detail"}`, and the
    connection stays open."""


def check_room(room):
    return None if room is not None and ROOM.fullmatch(room) else ROOM_RULE


def check_name(name):
    if name is None or not name.strip() or len(name) > NAME_MAX \
            or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in name):
        return NAME_RULE
    return None


def read_client_message(data):
    """A client's message → `(type, value)`: ("message", text), ("typing", None) or ("history",
    before-id or None). Anything else raises ChatError saying what is wrong."""
    if not isinstance(data, str):
        raise ChatError("send JSON text messages, not binary ones")
    try:
        message = json.loads(data)
    except ValueError:
        raise ChatError("a message must be a JSON object") from None
    if not isinstance(message, dict):
        raise ChatError("a message must be a JSON object")
    kind = message.get("type")
    allowed = {"message": {"type", "text"}, "typing": {"type"}, "history": {"type", "before"}}
    if kind not in allowed:
        raise ChatError("type must be message, typing or history")
    unknown = sorted(set(message) - allowed[kind])
    if unknown:
        raise ChatError(f"unknown field {unknown[0]!r} in a {kind}")
    if kind == "message":
        text = message.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > TEXT_MAX:
            raise ChatError(f"text must be 1–{TEXT_MAX} characters, not only spaces")
        if any((ord(c) < 32 and c not in "\n\t") or 0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise ChatError("text may not hold control characters or lone surrogates")
        return kind, text
    before = message.get("before")
    if kind == "history" and before is not None \
            and (not isinstance(before, int) or isinstance(before, bool) or not 1 <= before < 2**63):
        raise ChatError("before must be a message id (a positive integer)")
    return kind, before


def now():
    return utc_timestamp(timespec="milliseconds")


def message_item(row):
    return {"id": row["id"], "room": row["room"], "user": row["user"], "text": row["text"],
            "ts": row["ts"]}


def encode_text(event):
    """A server event as the bytes of one text frame, made once however many receive it."""
    return encode_frame(Frame(Opcode.TEXT, json.dumps(event, ensure_ascii=False).encode("utf-8")))


class Member:
    """One open connection in a room: its protocol, and its transport, whose write buffer is its
    send queue."""

    __slots__ = ("room", "name", "protocol", "transport", "awaiting_pong")

    def __init__(self, room, name, protocol, transport):
        self.room = room
        self.name = name
        self.protocol = protocol
        self.transport = transport
        self.awaiting_pong = None


class Chat:
    """The rooms and who is in them (in memory), their messages (in sqlite)."""

    def __init__(self, db, *, max_message, send_queue, ping_s):
        self.db = db
        self.max_message = max_message
        self.send_queue = send_queue
        self.ping_s = ping_s
        self.rooms = {}          # room name → {Member, ...} online now

    # --- sending ------------------------------------------------------------------------------

    def deliver(self, member, data):
        """Queue `data` for `member`, or drop it if its queue would pass the bound: a reader that
        cannot keep up is disconnected, and the room goes on at its own pace."""
        transport = member.transport
        if member.protocol.state is not State.OPEN or transport.is_closing():
            return   # closing, or the peer is gone and its session not yet ended
        if transport.get_write_buffer_size() + len(data) > self.send_queue:
            self.disconnect(member, CloseCode.POLICY_VIOLATION,
                            f"too slow: more than {self.send_queue} bytes unread")
            return
        transport.write(data)

    def flush(self, member):
        """Write what the protocol itself has to send (pongs, a Close). A Close goes out even to
        a reader that fell behind; pongs count against the bound like everything else, or a
        client could flood pings and never read the answers."""
        data = member.protocol.data_to_send()
        transport = member.transport
        if not data or transport.is_closing():
            return
        transport.write(data)
        if member.protocol.state is State.OPEN and transport.get_write_buffer_size() > self.send_queue:
            self.disconnect(member, CloseCode.POLICY_VIOLATION,
                            f"too slow: more than {self.send_queue} bytes unread")

    def send_event(self, member, event):
        self.deliver(member, encode_text(event))

    def broadcast(self, room, event, *, exclude=None):
        data = encode_text(event)
        for member in list(self.rooms.get(room, ())):
            if member is not exclude:
                self.deliver(member, data)

    def disconnect(self, member, code, reason):
        """Fail the connection (a slow reader, a dead peer): a Close frame, then the TCP
        connection is closed — cut, if the peer will not take what is queued in time."""
        member.protocol.fail(code, reason)
        self.flush(member)
        end_connection(member.transport)
        self.leave(member)

    # --- rooms and presence ---------------------------------------------------------------------

    def online(self, room):
        return sorted({member.name for member in self.rooms.get(room, ())})

    def join(self, member):
        ts = now()
        self.db.execute("INSERT INTO rooms (name, created_at) VALUES (?, ?) "
                        "ON CONFLICT (name) DO NOTHING", [member.room, ts])
        members = self.rooms.setdefault(member.room, set())
        first_tab = member.name not in self.online(member.room)
        members.add(member)
        self.send_event(member, {"type": "presence", "users": self.online(member.room)})
        self.send_event(member, {"type": "history", "messages": self.history(member.room)})
        if first_tab:
            self.broadcast(member.room, {"type": "join", "user": member.name, "ts": ts}, exclude=member)

    def leave(self, member):
        members = self.rooms.get(member.room)
        if not members or member not in members:
            return   # already gone (dropped, then its session ended)
        members.discard(member)
        if not members:
            del self.rooms[member.room]
        if member.name not in self.online(member.room):
            self.broadcast(member.room, {"type": "leave", "user": member.name, "ts": now()})

    def close_all(self, code, reason):
        """Begin the closing handshake on every connection (a shutdown: 1001)."""
        for members in list(self.rooms.values()):
            for member in list(members):
                member.protocol.close(code, reason)
                self.flush(member)
                asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, member.transport.abort)

    # --- what clients say -----------------------------------------------------------------------

    def on_message(self, member, data):
        try:
            kind, value = read_client_message(data)
        except ChatError as error:
            self.send_event(member, {"type": "error", "detail": str(error)})
            return
        if kind == "message":
            self.broadcast(member.room, self.post(member.room, member.name, value))
        elif kind == "typing":
            self.broadcast(member.room, {"type": "typing", "user": member.name, "ts": now()},
                           exclude=member)
        else:
            self.send_event(member, {"type": "history", "messages": self.history(member.room, value)})

    def post(self, room, user, text):
        ts = now()
        with self.db.transaction() as conn:
            cursor = conn.execute("INSERT INTO messages (room, user, text, ts) VALUES (?, ?, ?, ?)",
                                  [room, user, text, ts])
            conn.execute("UPDATE rooms SET messages = messages + 1 WHERE name = ?", [room])
        return {"type": "message", "id": cursor.lastrowid, "room": room, "user": user,
                "text": text, "ts": ts}

    def history(self, room, before=None):
        """The last HISTORY_SIZE messages of `room` (before message `before`), oldest first."""
        rows = self.db.query("SELECT * FROM messages WHERE room = ? AND id < ? ORDER BY id DESC "
                             "LIMIT ?", [room, before or 2**63 - 1, HISTORY_SIZE])
        return [message_item(row) for row in reversed(rows)]


def end_connection(transport):
    """Close the TCP connection once what is queued is sent, and cut it if that takes longer than
    CLOSE_TIMEOUT_S (a peer that stopped reading would otherwise hold it open for ever)."""
    transport.close()
    asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)


# =============================================================================================
# The edge: asyncio streams ⇄ ServerProtocol
# =============================================================================================


async def run_session(chat, room, name, request_id, reader, writer, unread):
    """One WebSocket connection, from the 101 to its end: read, feed the protocol, act on its
    events, write what it answers. lib's transport closes the socket when this returns. The
    access log showed the 101; a line on stderr says how the session ended (1006: no Close)."""
    started = asyncio.get_running_loop().time()
    protocol = ServerProtocol(chat.max_message)
    member = Member(room, name, protocol, writer.transport)
    chat.join(member)
    pinger = asyncio.create_task(keep_alive(chat, member))
    try:
        data = unread
        while True:
            events = protocol.receive_data(data) if data else ()
            chat.flush(member)   # pongs and Closes first: they answer frames read before
            for event in events:
                if isinstance(event, Message):
                    chat.on_message(member, event.data)
                elif isinstance(event, Pong) and event.payload == member.awaiting_pong:
                    member.awaiting_pong = None
            if protocol.state is State.CLOSED:
                break
            data = await reader.read(READ_SIZE)
            if not data:
                break   # the peer went without a Close (1006), or we cut the connection
    except (ConnectionError, OSError):
        pass
    finally:
        pinger.cancel()
        chat.leave(member)
        end_connection(writer.transport)
        took = asyncio.get_running_loop().time() - started
        sys.stderr.write(f"{utc_timestamp()} websocket room={room} user={json.dumps(name)} "
                         f"closed {protocol.close_code or CloseCode.ABNORMAL:d} after {took:.1f}s "
                         f"id={request_id}\n")


async def keep_alive(chat, member):
    """Ping every `ping_s`; a ping still unanswered at the next one means a dead peer."""
    count = 0
    while member.protocol.state is State.OPEN:
        await asyncio.sleep(chat.ping_s)
        if member.protocol.state is not State.OPEN:
            return
        if member.awaiting_pong is not None:
            chat.disconnect(member, CloseCode.INTERNAL_ERROR, "no pong: the connection is dead")
            return
        count += 1
        member.awaiting_pong = count.to_bytes(4, "big")
        member.protocol.send(Frame(Opcode.PING, member.awaiting_pong))
        chat.flush(member)


# =============================================================================================
# Routes
# =============================================================================================

ROOM_QUERY = Query("room", ROOM_RULE, {"pattern": ROOM_PATTERN})
NAME_QUERY = Query("name", NAME_RULE, {"minLength": 1, "maxLength": NAME_MAX})
ROOM_ANSWER = {"type": "object", "properties": {
    "name": {"type": "string"}, "online": {"type": "integer"}, "messages": {"type": "integer"}}}


@app.get("/ws", query=[ROOM_QUERY, NAME_QUERY], status=101, media_type="application/octet-stream",
         responses={101: "Switching Protocols: the connection is a WebSocket from here on",
                    400: "a bad Sec-WebSocket-Key, or a bad room or name",
                    403: "an Origin that is not this server's nor in --allowed-origins",
                    426: "not a WebSocket version 13 handshake",
                    503: "the server is shutting down"})
def open_websocket(request):
    """Join a room over a WebSocket (RFC 6455): JSON messages both ways"""
    headers = check_handshake(request.method, request.headers, app.state.allowed_origins)
    room, name = request.query_param("room"), request.query_param("name")
    errors = [{"field": field, "message": rule}
              for field, rule in (("room", check_room(room)), ("name", check_name(name))) if rule]
    if errors:
        raise BadRequest("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
    if app.draining:
        raise ServiceUnavailable("the server is shutting down")
    response = Response(b"", 101, headers)

    async def takeover(reader, writer, unread):
        await run_session(app.state.chat, room, name.strip(), request.request_id, reader, writer,
                          unread)

    response.takeover = takeover
    return response


ROOMS_BY_NAME = Sort("name", SortKey("name", str))
NEWEST_FIRST = Sort("newest", SortKey("id", int, descending=True))


@app.get("/rooms", query=PAGE)
def list_rooms(request):
    """Rooms, by name: who is online now and how many messages each holds"""
    limit, cursor = list_params(request, ROOMS_BY_NAME.shape)
    where, params = ROOMS_BY_NAME.after(cursor) if cursor else ("1", [])
    rows = app.state.chat.db.query(f"SELECT * FROM rooms WHERE {where} ORDER BY "
                                   f"{ROOMS_BY_NAME.order_by} LIMIT ?", [*params, limit + 1])
    chat = app.state.chat
    return page(rows, limit, ROOMS_BY_NAME.cursor_values,
                lambda row: {"name": row["name"], "online": len(chat.online(row["name"])),
                             "messages": row["messages"]})


@app.get("/rooms/{room}/messages",
         query=[*PAGE, Query("before", "only messages older than this message id", int, None, 1,
                             2**63 - 1)],
         path_schemas={"room": {"pattern": ROOM_PATTERN}},
         responses={400: "a bad room name, limit, cursor or before", 404: "no one ever joined this room"})
def list_messages(request, room):
    """A room's messages, newest first"""
    if check_room(room):
        raise BadRequest(f"room {ROOM_RULE}", errors=[{"field": "room", "message": ROOM_RULE}])
    limit, cursor = list_params(request, NEWEST_FIRST.shape)
    before = request.query_int("before", None, low=1, high=2**63 - 1)
    db = app.state.chat.db
    if db.query_one("SELECT 1 FROM rooms WHERE name = ?", [room]) is None:
        raise NotFound(f"no one has joined room {room!r}")
    where, params = NEWEST_FIRST.after(cursor) if cursor else ("1", [])
    rows = db.query(f"SELECT * FROM messages WHERE room = ? AND id < ? AND {where} "
                    f"ORDER BY {NEWEST_FIRST.order_by} LIMIT ?",
                    [room, before or 2**63 - 1, *params, limit + 1])
    return page(rows, limit, NEWEST_FIRST.cursor_values, message_item)


# --- the browser page ---------------------------------------------------------------------------

PAGE_STYLE = """
body { font: 15px system-ui, sans-serif; margin: 0 auto; max-width: 46rem; padding: 1rem; }
form { display: flex; gap: .5rem; margin: .5rem 0; }
input { flex: 1; padding: .4rem; font: inherit; }
#messages { list-style: none; padding: .5rem; margin: 0; height: 24rem; overflow-y: auto;
            border: 1px solid #bbb; border-radius: 4px; }
#messages li { margin: .15rem 0; overflow-wrap: anywhere; white-space: pre-wrap; }
#messages .notice { color: #666; font-style: italic; }
.user { font-weight: 600; margin-right: .4rem; }
#status, #typing { color: #666; min-height: 1.2em; }
"""

PAGE_SCRIPT = """
const $ = (id) => document.getElementById(id);
let socket = null;
let typingSent = 0;

function show(user, text, notice) {
  const item = document.createElement('li');
  if (notice) item.className = 'notice';
  if (user) {
    const who = document.createElement('span');
    who.className = 'user';
    who.textContent = user;
    item.append(who);
  }
  item.append(document.createTextNode(text));
  $('messages').append(item);
  $('messages').scrollTop = $('messages').scrollHeight;
}

function connect(room, name) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const query = new URLSearchParams({room, name});
  socket = new WebSocket(`${scheme}//${location.host}/ws?${query}`);
  $('status').textContent = 'connecting…';
  socket.onopen = () => {
    $('status').textContent = `in room ${room} as ${name}`;
    $('join').hidden = true;
    $('chat').hidden = false;
    $('text').focus();
  };
  socket.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === 'message') show(m.user, m.text);
    else if (m.type === 'history') m.messages.forEach((h) => show(h.user, h.text));
    else if (m.type === 'presence') $('online').textContent = m.users.join(', ');
    else if (m.type === 'join' || m.type === 'leave') {
      show('', `${m.user} ${m.type === 'join' ? 'joined' : 'left'}`, true);
      const users = new Set($('online').textContent.split(', ').filter(Boolean));
      m.type === 'join' ? users.add(m.user) : users.delete(m.user);
      $('online').textContent = [...users].sort().join(', ');
    } else if (m.type === 'typing') {
      $('typing').textContent = `${m.user} is typing…`;
      setTimeout(() => { $('typing').textContent = ''; }, 3000);
    } else if (m.type === 'error') show('', m.detail, true);
  };
  socket.onclose = (event) => {
    $('status').textContent = `disconnected (${event.code}${event.reason ? ': ' + event.reason : ''})`;
    $('join').hidden = false;
    $('chat').hidden = true;
  };
}

$('join').addEventListener('submit', (event) => {
  event.preventDefault();
  $('messages').replaceChildren();
  connect($('room').value.trim(), $('name').value.trim());
});
$('chat').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value;
  if (!text.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({type: 'message', text}));
  $('text').value = '';
});
$('text').addEventListener('input', () => {
  if (socket && socket.readyState === WebSocket.OPEN && Date.now() - typingSent > 2000) {
    typingSent = Date.now();
    socket.send(JSON.stringify({type: 'typing'}));
  }
});
"""

PAGE_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>chat</h1>
<form id="join">
  <input id="room" placeholder="room" value="lobby" required pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]{{0,63}}">
  <input id="name" placeholder="your name" required maxlength="{NAME_MAX}">
  <button>Join</button>
</form>
<p id="status">not connected</p>
<p>online: <span id="online"></span></p>
<ul id="messages"></ul>
<p id="typing"></p>
<form id="chat" hidden>
  <input id="text" placeholder="say something" maxlength="{TEXT_MAX}" autocomplete="off">
  <button>Send</button>
</form>
<script>{PAGE_SCRIPT}</script>
</body>
</html>
"""

# Only this page's own script and style run, and it talks only to its own origin ('self' covers
# ws: and wss: to the same host, CSP Level 3 §6.7.2.8).
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {csp_hash(PAGE_SCRIPT)}; "
                               f"style-src {csp_hash(PAGE_STYLE)}; connect-src 'self'; "
                               f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@app.get("/app", media_type="text/html", responses={200: "An HTML chat client: no external assets"})
def chat_page(request):
    """A chat page for the browser, using its WebSocket API"""
    return html_response(PAGE_HTML, headers=PAGE_HEADERS)


# =============================================================================================
# A small client: the same codec from the other side (masked frames out, unmasked in)
# =============================================================================================


def say(address, room, name, texts, out=sys.stdout):
    """Join `room` as `name` at `address` (host:port), send each of `texts`, print every event
    that arrives until the last of them comes back, then close (1000) and print the code the
    server echoed. Returns an exit status. Standard library only, as a learner would write it."""
    host, _, port = address.rpartition(":")
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    query = urllib.parse.urlencode({"room": room, "name": name})
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /ws?{query} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     f"Sec-WebSocket-Version: 13\r\n\r\n".encode("ascii"))
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(READ_SIZE)
            if not data:
                raise ConnectionError("the server closed the connection during the handshake")
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
        print(lines[0], file=out)
        if " 101 " not in lines[0] or headers.get("sec-websocket-accept") != accept_key(key):
            print(rest.decode("utf-8", "replace"), file=out)
            return 1
        buffer = bytearray(rest)

        def send(opcode, payload):   # RFC 6455 §5.3: a client masks every frame, afresh
            sock.sendall(encode_frame(Frame(opcode, payload), mask=os.urandom(4)))

        for text in texts:
            send(Opcode.TEXT, json.dumps({"type": "message", "text": text}).encode("utf-8"))
        waiting = list(texts)
        while True:
            parsed = parse_frame(buffer, max_size=1 << 24, masked=False)
            if parsed is None:
                data = sock.recv(READ_SIZE)
                if not data:
                    print("the connection ended without a Close (1006)", file=out)
                    return 1
                buffer += data
                continue
            frame, consumed = parsed
            del buffer[:consumed]
            if frame.opcode is Opcode.PING:
                send(Opcode.PONG, frame.payload)
            elif frame.opcode is Opcode.CLOSE:
                code, reason = parse_close(frame.payload)
                print(f"closed {code}{' ' + reason if reason else ''}", file=out)
                return 0
            elif frame.opcode is Opcode.TEXT:
                event = json.loads(frame.payload)
                print(json.dumps(event, ensure_ascii=False), file=out)
                if event["type"] == "message" and event["user"] == name and waiting \
                        and event["text"] == waiting[0]:
                    waiting.pop(0)
                if not waiting:
                    send(Opcode.CLOSE, encode_close(CloseCode.NORMAL))
                    waiting = None   # sent: now the server's echo


def say_main(argv):
    parser = argparse.ArgumentParser(prog="chat.py say", description="Join a room, say something, "
                                     "print what arrives, leave.")
    parser.add_argument("address", help="the server's host:port, e.g. localhost:8019")
    parser.add_argument("--room", default="lobby", type=lambda t: t if not check_room(t) else
                        _refuse(f"a room is {ROOM_RULE}"))
    parser.add_argument("--name", required=True, type=lambda t: t if not check_name(t) else
                        _refuse(f"a name is {NAME_RULE}"))
    parser.add_argument("texts", nargs="*", help="messages to send, in order")
    args = parser.parse_intermixed_args(argv)
    try:
        return say(args.address, args.room, args.name, args.texts)
    except (OSError, ValueError, ProtocolError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1


def _refuse(message):
    raise argparse.ArgumentTypeError(message)



# =============================================================================================
# Command line
# =============================================================================================

message_size = bounded(int, "a size in bytes (125 to 16 MiB)", at_least=125, at_most=16 * 1024 * 1024)
queue_size = bounded(int, "a size in bytes (1 KiB to 1 GiB)", at_least=1024, at_most=1 << 30)


def origin_list(text):
    """`--allowed-origins`: comma-separated origins (`https://chat.example.com`), as browsers
    send them: scheme, host and port, no path."""
    origins = set()
    for origin in filter(None, (part.strip().lower().rstrip("/") for part in text.split(","))):
        if not re.fullmatch(r"https?://[a-z0-9.\-\[\]:]+", origin):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin like https://chat.example.com")
        origins.add(origin)
    return frozenset(origins)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["say"]:
        return say_main(argv[1:])
    parser = app.arg_parser(database=True)
    parser.epilog = "A small client: chat.py say HOST:PORT --name NAME [--room ROOM] [TEXT ...]"
    parser.add_argument("--ping-s", type=positive_seconds, default=PING_S,
                        help=f"seconds between pings; a peer silent for two is dropped (default {PING_S:g})")
    parser.add_argument("--max-message", type=message_size, default=MAX_MESSAGE,
                        help=f"bytes one message may have; more is a 1009 (default {MAX_MESSAGE})")
    parser.add_argument("--send-queue", type=queue_size, default=SEND_QUEUE,
                        help=f"bytes queued for one client before it is dropped as too slow "
                             f"(default {SEND_QUEUE})")
    parser.add_argument("--allowed-origins", type=origin_list, default=frozenset(),
                        help="comma-separated origins whose pages may connect besides this "
                             "server's own (e.g. https://chat.example.com)")
    args = parser.parse_args(argv)
    if args.server != "asyncio":
        parser.error("chat needs --server asyncio: a WebSocket takes over its connection, "
                     "which only the asyncio transport can hand over")
    state = app.state
    state.allowed_origins = args.allowed_origins
    state.chat = Chat(app.open_database(args, SCHEMA), max_message=args.max_message,
                      send_queue=args.send_queue, ping_s=args.ping_s)
    # A shutdown begins: every WebSocket gets its 1001 Close now; lib leaves the connections
    # open for the closing handshake, within --drain-timeout.
    app.on_draining.append(lambda: state.chat.close_all(CloseCode.GOING_AWAY,
                                                        "the server is shutting down"))
    app.run(args)


if __name__ == "__main__":
    sys.exit(main())
