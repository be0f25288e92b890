"""The asyncio transport (the default): one event loop, and one `asyncio.Protocol` per connection.

Why it is the default: a threaded server is bound by the GIL and by thread switches, while one
event loop does the same work 3–4× faster on one core (PERFORMANCE.md trap 4), and long-lived
connections — Server-Sent Events, WebSockets, the gateway's proxied streams — cost a coroutine
each instead of a thread each.

Why a `Protocol` and not asyncio's streams: streams are built on a protocol like this one, and
every `await reader.readuntil()` costs a future, a task wake-up and a trip through the loop —
about as much as parsing the request. Here the loop hands each connection's bytes to
`data_received`, which parses them with `lib.protocol` (sans-I/O, as h11 is used under uvicorn)
and answers every complete request at once, so a plain request costs no coroutine at all.
Coroutines appear only where something waits: a handler in the worker pool, a streamed body.

Blocking work and the event loop. Handlers are plain functions, called on the loop: a short
sqlite query or a JSON build takes microseconds, less than a hop to a thread would. A handler
that may block for long (a password hash, an SMTP exchange, a sleep) is declared with
`blocking=True` on its route, and this transport runs that request's whole chain in a bounded
worker pool (`WORKER_THREADS`) instead, so the loop keeps serving everybody else meanwhile. A
streamed body given as a plain iterator is advanced in the pool too; an async iterator is
awaited on the loop.

Order and back-pressure: a connection answers its requests one at a time, in order (pipelining,
RFC 9112 §9.3.2). While an answer is pending (in the pool, streaming, or queued faster than the
client reads it) later bytes wait in the buffer, and reading pauses once they exceed a head's
worth — a client cannot make the server buffer without bound. An answer made while writes of
this turn of the loop await their group commit (`lib.storage.GroupCommit`) waits for it too.

Timeouts: each connection carries a deadline (see `lib.transport`), and one sweeper task closes
the connections that passed theirs — cheaper than a timer per read.
"""
import asyncio
import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from lib import middleware, transport
from lib.problems import HTTPError
from lib.protocol import (CHUNKED, CONTINUE, MAX_HEAD, MAX_REQUEST_LINE, ChunkedDecoder,
                          ContentLengthDecoder, ProtocolError, body_length, parse_head, wants_continue)
from lib.response import problem_response
from lib.storage import group_commit

WORKER_THREADS = 32
_END = object()


class AsyncioServer:
    def __init__(self, app, sock, args):
        self.app = app
        self.sock = sock
        self.idle_timeout = args.idle_timeout
        self.shutdown_delay = args.shutdown_delay
        self.drain_timeout = args.drain_timeout
        self.max_connections = args.max_connections
        self.connections = set()
        self.pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="handler")
        self.loop = None

    def run(self, announce):
        asyncio.run(self._main(announce))

    async def _main(self, announce):
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal():
            if stop.is_set():
                transport.exit_now()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, on_signal)
        server = await self.loop.create_server(lambda: HTTPConnection(self), sock=self.sock,
                                               backlog=transport.BACKLOG)
        if not self.app.tracing:  # with --trace, each request's log line and commit come with its trace
            middleware.access_log.batch_on_loop(self.loop)
            group_commit.start(self.loop)
        sweeper = asyncio.create_task(self._close_expired())
        announce()
        await stop.wait()
        # Shutdown: not ready at once, keep serving during the delay, then stop accepting,
        # close idle connections, give in-flight requests a bounded time to finish.
        self.app.draining = True
        if self.shutdown_delay:
            await asyncio.sleep(self.shutdown_delay)
        server.close()
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.transport.abort()
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()
        sweeper.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.sleep(0)  # let the aborted connections run their clean-up
        group_commit.stop()
        middleware.access_log.batch_off()

    async def _close_expired(self):
        interval = max(0.05, min(0.5, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.deadline is not None and now > conn.deadline:
                    conn.transport.abort()


class HTTPConnection(asyncio.Protocol):
    """One client connection: bytes in through `data_received`, answers out through
    `transport.write`, one request at a time.

    Its states, by what it waits for: a request head (`idle` when nothing is under way), the
    rest of a body (`decoder`), an answer in the making (`busy`: a handler in the pool or a
    stream), the client to read what was written (`write_paused`), and, after an error answer,
    the end (`lingering`: input is dropped until the connection closes)."""

    def __init__(self, server):
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport = None
        self.client = ("", 0)
        self.buffer = b""          # bytes received and not yet parsed
        self.first = True          # no request has started yet (the first head timeout applies)
        self.idle = True           # waiting for a request head (may be closed when draining)
        self.deadline = None       # time.monotonic() by which the client must send or read
        self.head = None           # the request whose body is being read, and its parts
        self.request = None
        self.decoder = None
        self.blocking = False
        self.busy = False
        self.write_paused = False
        self.reading_paused = False
        self.eof = False           # the client sent FIN: answer what is pending, then close
        self.lingering = False
        self.closed = False        # no more requests: closed, or closing once the answer is sent
        self.stream = None         # the task sending a streamed body
        self.writable = None       # a future the stream waits on while writing is paused

    # --- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport_):
        self.transport = transport_
        self.client = transport_.get_extra_info("peername") or ("", 0)
        server = self.server
        if len(server.connections) >= server.max_connections:
            transport_.write(transport.overloaded_answer(self.app, self.client))
            self._linger()
            return
        server.connections.add(self)
        self._await_head()

    def data_received(self, data):
        if self.lingering:
            return  # after an error answer: read and drop until closing
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy or self.write_paused:
            if len(self.buffer) > MAX_HEAD and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self):
        if self.busy or self.write_paused:
            self.eof = True
            return True  # keep the socket open to write the pending answer
        return False     # nothing pending: the transport closes

    def pause_writing(self):
        self.write_paused = True
        self.deadline = time.monotonic() + self.server.idle_timeout  # the client must read

    def resume_writing(self):
        self.write_paused = False
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        elif not (self.busy or self.lingering or self.closed):
            self._await_head()
            self._process()

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ConnectionResetError("client went away"))
        if self.stream is not None:
            self.stream.cancel()

    # --- reading requests -------------------------------------------------------------------

    def _process(self):
        """Answer every complete request in the buffer, in order, until one has to wait."""
        while not (self.busy or self.write_paused or self.lingering or self.closed):
            if self.decoder is not None:
                if not self._read_body():
                    return
                continue
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._refuse_oversized_head()
                elif self.eof:
                    self._close()
                return
            data, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
            self.idle = self.first = False
            self._start_request(data)
        if self.reading_paused and not (self.busy or self.write_paused):
            self.reading_paused = False
            self.transport.resume_reading()

    def _start_request(self, data):
        app = self.app
        head = request = None
        try:
            head = parse_head(data)
            request = transport.build_request(app, head, self.client)
            limit, self.blocking = app.plan(request)
            length = body_length(head)
            if length is not None:
                transport.check_body_length(length, limit)
        except HTTPError as error:
            self._respond(request or transport.unparsed_request(app, self.client), head, error)
            return
        if length is None:
            self._respond(request, head, None)
            return
        request.has_body = True
        self.head, self.request = head, request
        self.decoder = ChunkedDecoder(limit) if length == CHUNKED else ContentLengthDecoder(length)
        if not self.buffer and wants_continue(head):
            self.transport.write(CONTINUE)

    def _read_body(self):
        """Feed the buffer to the body's decoder; answer once the body is whole. Returns
        whether the request was answered (else more bytes are needed)."""
        decoder, head, request = self.decoder, self.head, self.request
        data, self.buffer = self.buffer, b""
        try:
            decoder.feed(data)
        except HTTPError as error:
            self.decoder = None
            self._respond(request, head, error)
            return True
        if not decoder.done:
            self.deadline = time.monotonic() + self.server.idle_timeout
            if self.eof:
                self._close()  # the client closed before sending the whole body
            return False
        self.buffer = decoder.unused
        self.decoder = self.head = self.request = None
        request.body = decoder.body
        self._respond(request, head, None)
        return True

    def _refuse_oversized_head(self):
        status = 431 if b"\r\n" in self.buffer[:MAX_REQUEST_LINE + 2] else 414
        error = ProtocolError("request head too large", status=status)
        self._respond(transport.unparsed_request(self.app, self.client), None, error)

    # --- answering --------------------------------------------------------------------------

    def _respond(self, request, head, failure):
        self.deadline = None  # the server's turn: no client deadline while the handler runs
        if self.blocking and failure is None:
            self.busy = True
            future = self.loop.run_in_executor(self.server.pool, self.app.handle, request)
            future.add_done_callback(lambda done: self._handled(request, head, done))
        else:
            self._send(request, head, self.app.handle(request, failure), failure)

    def _handled(self, request, head, done):
        """A blocking handler finished in the pool (called on the loop)."""
        self.busy = False
        if self.closed or done.cancelled():
            return
        try:
            response = done.result()
        except Exception:
            self.transport.abort()
            raise  # the loop logs it with its traceback
        self._send(request, head, response, None)
        self._process()

    def _send(self, request, head, response, failure):
        if group_commit.open:
            # Writes of this turn are not committed yet, and the answer may rest on them: it
            # waits for the group's commit (lib.storage.GroupCommit).
            self.busy = True
            group_commit.after_commit(
                lambda error: self._committed(error, request, head, response, failure))
            return
        self._write_answer(head, response, failure)

    def _write_answer(self, head, response, failure):
        keep_alive = transport.keeps_alive(self.app, head, response, failure)
        if response.streaming and head is not None and head.method != "HEAD":
            self.busy = True
            self.stream = self.loop.create_task(self._stream(head, response, keep_alive))
            return
        self.transport.write(transport.encode_whole(response, head, keep_alive))
        self._answered(keep_alive, failure)

    def _committed(self, error, request, head, response, failure):
        """The group commit an answer waited for is done; `error` if it failed."""
        self.busy = False
        if self.closed:
            return
        if error is not None:  # nothing the answer rests on was saved: say so instead
            response = problem_response(error)
            response.headers.append(("X-Request-Id", request.request_id))
            self.transport.write(transport.encode_whole(response, head, False))
            self._close()
            return
        # Written at once, even if the callbacks before this one began the next group: the
        # answer was made before it, so it cannot rest on that group's writes.
        self._write_answer(head, response, failure)
        self._process()

    def _answered(self, keep_alive, failure):
        if failure is not None:
            self._linger()
        elif not keep_alive:
            self._close()
        elif not self.write_paused:
            self._await_head()

    def _close(self):
        """No more requests on this connection: close it once what is queued has been sent."""
        self.closed = True
        self.transport.close()

    def _await_head(self):
        self.idle = True
        self.deadline = time.monotonic() + transport.head_timeout(self.first, self.server.idle_timeout)

    def _linger(self):
        """After an error answer to a request whose body was not read: stop writing, then read
        and drop what the client still sends for a moment before closing. Closing with unread
        data would make the kernel send a reset, which can destroy the error answer before the
        client reads it."""
        self.lingering = True
        self.buffer = b""
        if self.transport.can_write_eof():
            self.transport.write_eof()  # sent once the answer is
        self.loop.call_later(transport.LINGER_SECONDS, self.transport.abort)

    async def _stream(self, head, response, keep_alive):
        write = self.transport.write
        write(transport.encode_stream_head(response, head, keep_alive))
        chunks = response.chunks
        try:
            if hasattr(chunks, "__aiter__"):
                async for piece in chunks:
                    await self._send_chunk(head, response, piece)
            else:
                iterator = iter(chunks)
                pool = self.server.pool
                while (piece := await self.loop.run_in_executor(pool, next, iterator, _END)) is not _END:
                    await self._send_chunk(head, response, piece)
            write(transport.frame_chunk(head, b""))
            await self._until_writable()
        except (ConnectionError, asyncio.CancelledError):
            self.transport.abort()  # the client went away (or the server is closing)
            return
        except Exception:
            transport.report_broken_stream()
            self.transport.abort()
            return
        finally:
            self.stream = None
            close = getattr(chunks, "aclose", None) or getattr(chunks, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
            if response.on_close:
                response.on_close()
        self.busy = False
        self._answered(keep_alive, None)
        self._process()

    async def _send_chunk(self, head, response, piece):
        if not piece:
            return
        if self.closed or self.transport.is_closing():
            raise ConnectionResetError("client went away")
        self.transport.write(transport.frame_chunk(head, piece))
        response.sent += len(piece)
        await self._until_writable()

    async def _until_writable(self):
        """Wait until the client has read enough of what was queued for it (pause_writing /
        resume_writing), within the idle timeout the sweeper enforces."""
        if self.write_paused:
            self.writable = self.loop.create_future()
            try:
                await self.writable
            finally:
                self.writable = None
        self.deadline = None
