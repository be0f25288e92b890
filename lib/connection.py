"""One HTTP/1.1 server connection as a state machine, with no sockets (sans-I/O, as h11 does it).

Bytes go in, requests come out, and the answers come back as the bytes to send. Both transports
drive this same machine, each with a thin loop of socket code, so they cannot disagree about
HTTP — framing, limits, keep-alive, timeouts — and the machine can be tested with byte literals:

    conn = Connection(app, client, idle_timeout)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:         read, waiting at most until conn.deadline; then
                                       conn.receive_data(data)        (b"": the client closed)
        elif event is CLOSE:           close the socket (after lingering, if conn.linger)
        elif isinstance(event, bytes): write it (an interim `100 Continue`)
        else:                          a whole Request: response = app.handle(event), then
                                       write conn.send(response), or for a streamed answer
                                       conn.start_stream(response), conn.chunk(piece) …,
                                       conn.end_stream()

The states, by what the connection waits for, and the one table of their transitions:

    IDLE       a request head            (between keep-alive requests, and at the start)
    BODY       the rest of a request body
    HANDLING   the application's answer  (later input waits unread: requests are answered in
                                          order, RFC 9112 §9.3.2)
    STREAMING  the end of a streamed answer
    CLOSED     nothing more: close once the last answer is out

Timeouts (common.md): a fresh connection must send a complete request head within
`HEAD_TIMEOUT` (10 s), a keep-alive one within `--idle-timeout` (15 s) of its last answer, which
it must also take (read) within that span. A body may pause at most the idle timeout between
bytes, and must arrive as a whole within the idle timeout plus a second per `MIN_BODY_RATE`
bytes (Apache's mod_reqtimeout rule), so a client that drips a byte at a time cannot hold its
connection for ever. `deadline` is when the current wait ends; the transport enforces it.

After a request the server cannot accept (a malformed head, a body over its limit) the answer
is the last one: the rest of the byte stream cannot be trusted (request smuggling starts there).

Streamed bodies: a route with a `body_sink` (an upload) gets a sink made from the head, and the
decoded body goes to it piece by piece as it is received, inside `next_event`, instead of being
collected here; the sink may refuse at any piece. Once the request is answered, refused or cut
off, `release` discards the sink (the transports call it when a connection ends, however).
A sink that passes the body on (a proxy's) holds the reading back while its next hop is slow:
on the threaded transport its `write` simply blocks; on asyncio, the transport awaits the sink's
`wait_for_room()`, if it has one, before it reads more, so the client's body stays in the
kernel's buffers (and the client's TCP window closes) instead of piling up in memory.
"""
import enum
import sys
import time
import traceback

from lib.problems import ContentTooLarge, HTTPError, ServiceUnavailable
from lib.protocol import (CHUNKED, CONTINUE, MAX_HEAD, MAX_REQUEST_LINE, ChunkedDecoder,
                          ContentLengthDecoder, ProtocolError, body_length, encode_chunk,
                          encode_head, encode_response, parse_head, wants_continue)
from lib.request import Request

HEAD_TIMEOUT = 10.0
MIN_BODY_RATE = 500    # bytes/s a body must keep up on average, beyond its first idle timeout
BACKLOG = 128          # socketserver's default listen backlog, 5, drops bursts of connections
LINGER_SECONDS = 1.0   # how long, and how much, to read and drop of a refused request's
LINGER_BYTES = 1024 * 1024  # bytes before closing

NEED_DATA = "need data"
CLOSE = "close"


class State(enum.IntEnum):
    IDLE = 0
    BODY = 1
    HANDLING = 2
    STREAMING = 3
    CLOSED = 4


class Event(enum.IntEnum):
    HEAD = 0             # a head that frames no body
    HEAD_WITH_BODY = 1
    BODY_END = 2
    REFUSED = 3          # a request the server cannot accept: answered, then closed
    ANSWER = 4           # the answer is out and the connection stays open
    LAST_ANSWER = 5      # the answer is out and the connection closes
    STREAM = 6           # a streamed answer begins
    PEER_CLOSED = 7      # the client closed its side between requests or mid-body


S, E = State, Event
TRANSITIONS = {
    (S.IDLE, E.HEAD): S.HANDLING,
    (S.IDLE, E.HEAD_WITH_BODY): S.BODY,
    (S.IDLE, E.REFUSED): S.HANDLING,
    (S.IDLE, E.PEER_CLOSED): S.CLOSED,
    (S.BODY, E.BODY_END): S.HANDLING,
    (S.BODY, E.REFUSED): S.HANDLING,
    (S.BODY, E.PEER_CLOSED): S.CLOSED,
    (S.HANDLING, E.ANSWER): S.IDLE,
    (S.HANDLING, E.LAST_ANSWER): S.CLOSED,
    (S.HANDLING, E.STREAM): S.STREAMING,
    (S.STREAMING, E.ANSWER): S.IDLE,
    (S.STREAMING, E.LAST_ANSWER): S.CLOSED,
}


class Connection:
    """The HTTP state of one client connection (see the module docstring for its use)."""

    def __init__(self, app, client, idle_timeout, clock=time.monotonic):
        self.app = app
        self.client = client
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.state = State.IDLE
        self.buffer = bytearray()   # received, not yet parsed (a bytearray: appends stay cheap)
        self.scanned = 0            # how far the buffer is known to hold no end of head
        self.peer_closed = False
        self.keep_alive = True      # False once the connection must close after this answer
        self.linger = False         # the client may still be sending a refused request's bytes
        self.request = None         # the request being read or answered
        self.head = None
        self.decoder = None
        self.sink = None            # where a streamed body goes (Route's body_sink), if anywhere
        self.chunked = False        # the streamed answer under way has chunked framing
        self.blocking = False       # the request's handler may block: run it off the event loop
        self.body_started = 0.0
        self.received = 0
        self.deadline = clock() + min(HEAD_TIMEOUT, idle_timeout)

    def _move(self, event):
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise RuntimeError(f"{event.name} cannot happen in state {self.state.name}") from None

    # --- bytes in, requests out ------------------------------------------------------------

    def receive_data(self, data):
        """Bytes from the client; b"" means it closed its side (or its connection)."""
        if not data:
            self.peer_closed = True
            return
        self.buffer += data
        if self.state == State.BODY:
            self.received += len(data)
            now = self.clock()
            self.deadline = min(now + self.idle_timeout,
                                self.body_started + self.idle_timeout + self.received / MIN_BODY_RATE)

    def next_event(self):
        """What the transport must do next: NEED_DATA, CLOSE, bytes to write, or a Request."""
        if self.state == State.IDLE:
            return self._next_head()
        if self.state == State.BODY:
            return self._next_body()
        if self.state == State.CLOSED:
            return CLOSE
        raise RuntimeError(f"answer the request first (state {self.state.name})")

    def _next_head(self):
        crlf = self.buffer.find(b"\r\n\r\n", self.scanned)
        # Lines ended by a bare LF (RFC 9112 §2.2 lets a server refuse them): the head ends at
        # its blank line all the same, and parse_head answers 400 rather than wait for ever.
        lf = self.buffer.find(b"\n\n", self.scanned, None if crlf < 0 else crlf)
        head_end = lf + 2 if lf >= 0 else crlf + 4 if crlf >= 0 else -1
        if head_end < 0:
            if len(self.buffer) > MAX_HEAD:
                return self._refuse(oversized_head(self.buffer))
            if self.peer_closed:
                self._move(Event.PEER_CLOSED)
                return CLOSE
            self.scanned = max(0, len(self.buffer) - 3)
            return NEED_DATA
        if head_end > MAX_HEAD:  # the same answer however the head was split into packets
            return self._refuse(oversized_head(self.buffer))
        data = bytes(self.buffer[:head_end])
        del self.buffer[:head_end]
        self.scanned = 0
        return self._start_request(data)

    def _start_request(self, data):
        request = None
        try:
            head = parse_head(data)
            request = Request.from_head(head, b"", False, self.client, self.app)
            limit, self.blocking = self.app.plan(request)
            length = body_length(head)
            if length is not None and length != CHUNKED and length > limit:
                # refused before reading any of it (common.md: read no more than the limit)
                raise ContentTooLarge(f"request body over the limit of {limit} bytes")
            if length is not None and request.route and request.route.body_sink:
                self.sink = request.route.body_sink(request)  # it may refuse before the body
        except HTTPError as error:
            return self._refuse(error, request)
        self.head, self.request = head, request
        if length is None:
            self._move(Event.HEAD)
            self.deadline = None  # the server's turn
            return request
        request.has_body = True
        on_data = self.sink.write if self.sink else None
        self.decoder = (ChunkedDecoder(limit, on_data) if length == CHUNKED
                        else ContentLengthDecoder(length, on_data))
        self._move(Event.HEAD_WITH_BODY)
        self.body_started = self.clock()
        self.received = len(self.buffer)
        self.deadline = self.body_started + self.idle_timeout
        if not self.buffer and wants_continue(head):
            return CONTINUE
        return self._next_body()

    def _next_body(self):
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            try:
                self.decoder.feed(data)
            except HTTPError as error:
                return self._refuse(error, self.request)
        if self.decoder.done:
            self.buffer += self.decoder.unused
            self.request.body = self.decoder.body if self.sink is None else self.sink
            self.decoder = None
            self._move(Event.BODY_END)
            self.deadline = None
            return self.request
        if self.peer_closed:  # the client left before sending the whole body
            self._move(Event.PEER_CLOSED)
            self.release()
            return CLOSE
        return NEED_DATA

    def _refuse(self, error, request=None):
        """A request the server cannot accept: it is still answered through the application
        (so it gets a request id, an access log line and its problem), and is the last one."""
        request = request or unparsed_request(self.app, self.client)
        request.context["failure"] = error
        self.request, self.head, self.decoder = request, None, None
        self.keep_alive = False
        self.linger = True
        self.blocking = False
        self.buffer.clear()
        self._move(Event.REFUSED)
        self.deadline = None
        return request

    def release(self):
        """Discard a streamed body's sink once its request is answered, refused or cut off
        (transports call this when a connection ends, however it ends): what the handler did
        not keep of it is dropped, and nothing half-received outlives its connection."""
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.discard()

    # --- answers out -------------------------------------------------------------------------

    def _keeps_alive(self, response):
        head = self.head
        if not self.keep_alive or head is None or self.app.draining:
            return False
        if response.streaming and head.version != "HTTP/1.1":
            return False  # a 1.0 client reads a stream until the connection closes
        connection = response.header("Connection")
        if connection is not None and "close" in connection.lower():  # a handler asked to close
            return False
        return head.keep_alive

    def _answered(self, keep_alive):
        self._move(Event.ANSWER if keep_alive else Event.LAST_ANSWER)
        self.request = self.head = None
        self.release()
        # The client must take this answer, and send its next head, within the idle timeout.
        self.deadline = self.clock() + self.idle_timeout

    def send(self, response):
        """The bytes of a whole answer to the current request."""
        keep_alive = self.keep_alive = self._keeps_alive(response)
        data = encode_whole(response, self.head, keep_alive)
        if response.streaming and response.on_close:  # a HEAD answer: the stream ends unread
            response.on_close()
        self._answered(keep_alive)
        return data

    def start_stream(self, response):
        """The head of a streamed answer: framed by its length when it has one, else chunked
        for HTTP/1.1 and close-delimited for 1.0."""
        self.keep_alive = self._keeps_alive(response)
        headers = list(response.headers)
        self.chunked = response.length is None and self.head.version == "HTTP/1.1"
        if self.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        self._move(Event.STREAM)
        self.deadline = self.clock() + self.idle_timeout
        return encode_head(response.status, headers, response.length, keep_alive=self.keep_alive)

    def chunk(self, piece):
        """One piece of a streamed answer, framed; the client must take it within the idle
        timeout."""
        self.deadline = self.clock() + self.idle_timeout
        return encode_chunk(piece) if self.chunked else piece

    def end_stream(self):
        chunked = self.state == State.STREAMING and self.chunked
        self._answered(self.keep_alive)  # first: it refuses a stream that never began
        return encode_chunk(b"") if chunked else b""


def oversized_head(buffer):
    status = 431 if b"\r\n" in buffer[:MAX_REQUEST_LINE + 2] else 414
    return ProtocolError("request head too large", status=status)


def unparsed_request(app, client):
    """A stand-in request for a head that could not be parsed, so the error still gets a
    request id, an access log line and a problem answer."""
    return Request("-", "-", client=client, app=app)


def encode_whole(response, head, keep_alive):
    head_only = head is not None and head.method == "HEAD"
    try:
        if head_only and response.streaming:  # a HEAD answer to a stream: its length, if known
            return encode_head(response.status, response.headers, response.length,
                               keep_alive=keep_alive)
        return encode_response(response.status, response.headers, response.body,
                               head_only=head_only, keep_alive=keep_alive)
    except (ValueError, UnicodeEncodeError) as error:
        # A handler put a line break or a non-Latin-1 character in a header value: answer
        # 500 (logged), never send the broken head or drop the connection without an answer.
        sys.stderr.write(f"error: cannot encode the response head: {error!r}\n")
        body = b'{"type": "about:blank", "title": "Internal Server Error", "status": 500}'
        return encode_response(500, [("Content-Type", "application/problem+json")], body,
                               head_only=head_only, keep_alive=False)


def overloaded_answer(app, client):
    """The bytes of a 503 for a connection over `--max-connections`, sent before reading its
    request (common.md: overloaded → 503 with Retry-After). It still passes through the chain,
    so it has a request id and an access log line."""
    error = ServiceUnavailable("the server is at its connection limit; retry shortly", retry_after=1)
    response = app.handle(unparsed_request(app, client), error)
    return encode_whole(response, None, False)


def report_broken_stream():
    """A streamed body failed halfway (call from its `except`): the status is long sent, so all
    the client can learn is that the answer is cut short, by the connection closing without
    the last chunk. The traceback goes to the log."""
    sys.stderr.write(f"error while streaming a response\n{traceback.format_exc()}")
