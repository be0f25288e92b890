"""The asyncio-streams transport (the default): one event loop, one coroutine per connection.

Why it is the default: a threaded server is bound by the GIL and by thread switches, while one
event loop does the same work 3–4× faster on one core (PERFORMANCE.md trap 4), and long-lived
connections — Server-Sent Events, WebSockets, the gateway's proxied streams — cost a coroutine
each instead of a thread each.

Blocking work and the event loop. Handlers are plain functions, called on the loop: a short
sqlite query or a JSON build takes microseconds, less than a hop to a thread would. A handler
that may block for long (a password hash, an SMTP exchange, a sleep) is declared with
`blocking=True` on its route, and this transport runs that request's whole chain in a bounded
worker pool (`WORKER_THREADS`) instead, so the loop keeps serving everybody else meanwhile. A
streamed body given as a plain iterator is advanced in the pool too; an async iterator is
awaited on the loop.

Timeouts: each connection carries a deadline (see `lib.transport`), and one sweeper task closes
the connections that passed theirs — cheaper than a timer per read.
"""
import asyncio
import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from lib import transport
from lib.problems import HTTPError
from lib.protocol import (CHUNKED, CONTINUE, MAX_HEAD, MAX_REQUEST_LINE, ChunkedDecoder, ProtocolError,
                          body_length, parse_head, wants_continue)

WORKER_THREADS = 32
HIGH_WATER = 64 * 1024  # wait for the client to read once this much is queued to it
_END = object()


class Connection:
    __slots__ = ("writer", "idle", "deadline")

    def __init__(self, writer):
        self.writer = writer
        self.idle = True       # waiting for a request head (may be closed when draining)
        self.deadline = None   # time.monotonic() by which the next read or write must happen


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
        signals = []

        def on_signal():
            if stop.is_set():
                transport.exit_now()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, on_signal)
            signals.append(sig)
        server = await asyncio.start_server(self._serve_connection, sock=self.sock,
                                            limit=MAX_HEAD, backlog=transport.BACKLOG)
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
                    conn.writer.transport.abort()
            if not self.connections:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.writer.transport.abort()
        sweeper.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.sleep(0)  # let the aborted connections run their clean-up

    async def _close_expired(self):
        interval = max(0.05, min(0.5, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.deadline is not None and now > conn.deadline:
                    conn.writer.transport.abort()

    async def _serve_connection(self, reader, writer):
        client = writer.get_extra_info("peername") or ("", 0)
        if len(self.connections) >= self.max_connections:
            writer.write(transport.overloaded_answer(self.app, client))
            await self._linger(reader, writer)
            writer.transport.abort()
            return
        conn = Connection(writer)
        self.connections.add(conn)
        first = True
        try:
            while True:
                conn.idle = True
                conn.deadline = time.monotonic() + transport.head_timeout(first, self.idle_timeout)
                try:
                    data = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed (or the sweeper did)
                except asyncio.LimitOverrunError:
                    await self._refuse_oversized_head(reader, writer, client)
                    return
                conn.idle = False
                first = False
                if not await self._exchange(reader, writer, conn, data, client):
                    return
        except (ConnectionError, OSError):
            pass  # the client went away mid-answer: nothing to tell anyone (trap 3)
        finally:
            self.connections.discard(conn)
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _refuse_oversized_head(self, reader, writer, client):
        start = await reader.read(MAX_REQUEST_LINE + 2)
        status = 431 if b"\r\n" in start else 414
        error = ProtocolError("request head too large", status=status)
        response = self.app.handle(transport.unparsed_request(self.app, client), error)
        writer.write(transport.encode_whole(response, None, False))
        await self._linger(reader, writer)

    async def _exchange(self, reader, writer, conn, data, client):
        """One request and its answer. Returns whether the connection stays open."""
        app = self.app
        head = failure = None
        blocking = False
        try:
            head = parse_head(data)
            request = transport.build_request(app, head, client)
            limit, blocking = app.plan(request)
            length = body_length(head)
            if length is not None:
                transport.check_body_length(length, limit)
                request.has_body = True
                if wants_continue(head):
                    writer.write(CONTINUE)
                request.body = await self._read_body(reader, conn, length, limit)
        except HTTPError as error:
            failure = error
            if head is None:
                request = transport.unparsed_request(app, client)
        except asyncio.IncompleteReadError:
            return False  # the client closed before sending the whole body
        if blocking and failure is None:
            response = await self.loop.run_in_executor(self.pool, app.handle, request)
        else:
            response = app.handle(request, failure)
        keep_alive = transport.keeps_alive(app, head, response, failure)
        if response.streaming and head is not None and head.method != "HEAD":
            await self._stream(writer, conn, head, response, keep_alive)
        else:
            writer.write(transport.encode_whole(response, head, keep_alive))
            if writer.transport.get_write_buffer_size() > HIGH_WATER:
                await self._drain(writer, conn)
        if failure is not None:
            await self._linger(reader, writer)
        return keep_alive

    async def _read_body(self, reader, conn, length, limit):
        conn.deadline = time.monotonic() + self.idle_timeout
        if length != CHUNKED:
            return await reader.readexactly(length) if length else b""
        decoder = ChunkedDecoder(limit)
        while not decoder.done:
            # Read exactly what the decoder expects next, so no byte of a pipelined next
            # request is taken from the stream.
            wanted = decoder.wanted()
            try:
                data = await (reader.readexactly(wanted) if wanted else reader.readuntil(b"\r\n"))
            except asyncio.LimitOverrunError:
                raise ProtocolError("chunk line too long") from None
            conn.deadline = time.monotonic() + self.idle_timeout
            decoder.feed(data)
        return decoder.body

    async def _drain(self, writer, conn):
        """Wait until the client has read what was queued for it, within the idle timeout."""
        conn.deadline = time.monotonic() + self.idle_timeout
        await writer.drain()

    async def _stream(self, writer, conn, head, response, keep_alive):
        writer.write(transport.encode_stream_head(response, head, keep_alive))
        chunks = response.chunks
        try:
            if hasattr(chunks, "__aiter__"):
                async for piece in chunks:
                    await self._send_chunk(writer, conn, head, response, piece)
            else:
                iterator = iter(chunks)
                while (piece := await self.loop.run_in_executor(self.pool, next, iterator, _END)) is not _END:
                    await self._send_chunk(writer, conn, head, response, piece)
            writer.write(transport.frame_chunk(head, b""))
            await self._drain(writer, conn)
            conn.deadline = None
        finally:
            close = getattr(chunks, "aclose", None) or getattr(chunks, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
            if response.on_close:
                response.on_close()

    async def _send_chunk(self, writer, conn, head, response, piece):
        if not piece:
            return
        if writer.transport.is_closing():
            raise ConnectionResetError("client went away")
        writer.write(transport.frame_chunk(head, piece))
        response.sent += len(piece)
        conn.deadline = time.monotonic() + self.idle_timeout
        await writer.drain()
        conn.deadline = None

    async def _linger(self, reader, writer):
        """After an error answer to a request whose body was not read: stop writing, then
        read and drop what the client still sends for a moment before closing. Closing with
        unread data would make the kernel send a reset, which can destroy the error answer
        before the client reads it."""
        with contextlib.suppress(Exception):
            await self._drain(writer, Connection(writer))
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(transport.LINGER_SECONDS):
                while await reader.read(65536):
                    pass
