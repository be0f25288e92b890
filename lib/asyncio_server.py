"""The asyncio transport (the default): one event loop, asyncio streams, a coroutine per connection.

Why it is the default: a threaded server is bound by the GIL and by thread switches, while one
event loop does the same work several times faster on one core (tests/bench/README.md), and
long-lived connections — Server-Sent Events, WebSockets, a gateway's proxied streams — cost a
coroutine each instead of a thread each.

`serve_connection` is the whole of it: the loop of `lib.connection` with `await` where it
waits. Put it beside `lib.threaded_server.ConnectionHandler.handle`: the same steps.

Blocking work and the event loop. Handlers are plain functions, called on the loop: a short
sqlite query or a JSON build takes microseconds, less than a hop to a thread would. A handler
that may block for long (a password hash, an SMTP exchange, a sleep) is declared with
`blocking=True` on its route, and its request runs in a bounded worker pool (`WORKER_THREADS`)
instead, so the loop keeps serving everybody else meanwhile. A streamed body given as a plain
iterator is advanced in the pool too; an async iterator is awaited on the loop.

Taking the connection over: a handler that switches protocols (a WebSocket upgrade, a proxied
tunnel) needs the raw stream after its answer. `serve_connection` hands the reader and writer
to the answer's `takeover(reader, writer, unread)` coroutine (`Response.takeover`) once the
answer's bytes are written, with `unread` the bytes already read past the request (what the
client sent right behind it, as h11's `trailing_data`), and the connection is that coroutine's
until it returns; the transport then closes it.

Timeouts: each connection's machine carries a deadline, and one sweeper task aborts the
connections that passed theirs — one timer for all, rather than one per read.
"""
import asyncio
import contextlib
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from lib.connection import (BACKLOG, CLOSE, LINGER_BYTES, LINGER_SECONDS, NEED_DATA, Connection, State,
                            overloaded_answer, report_broken_stream)
from lib.runner import exit_now

WORKER_THREADS = 32
READ_SIZE = 64 * 1024
_END = object()


class AsyncioServer:
    def __init__(self, app, sock, args):
        self.app = app
        self.sock = sock
        self.idle_timeout = args.idle_timeout
        self.shutdown_delay = args.shutdown_delay
        self.drain_timeout = args.drain_timeout
        self.max_connections = args.max_connections
        self.connections = {}   # Connection → its StreamWriter, for the sweeper and the drain
        self.pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="handler")

    def run(self, announce):
        asyncio.run(self._main(announce))

    async def _main(self, announce):
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal():
            if stop.is_set():
                exit_now()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        server = await asyncio.start_server(self.serve_connection, sock=self.sock, backlog=BACKLOG)
        sweeper = asyncio.create_task(self._close_expired())
        announce()
        await stop.wait()
        # Shutdown: not ready at once, keep serving during the delay, then stop accepting,
        # close idle connections, give in-flight requests a bounded time to finish.
        self.app.begin_draining()
        if self.shutdown_delay:
            await asyncio.sleep(self.shutdown_delay)
        server.close()
        deadline = time.monotonic() + self.drain_timeout
        while self.connections and time.monotonic() < deadline:
            for conn, writer in list(self.connections.items()):
                # idle between requests, its last answer all sent; one a protocol took over
                # has no deadline: it closes itself (a WebSocket's closing handshake)
                if conn.state == State.IDLE and conn.deadline is not None \
                        and not writer.transport.get_write_buffer_size():
                    writer.transport.abort()
            await asyncio.sleep(0.02)
        for writer in list(self.connections.values()):
            writer.transport.abort()
        sweeper.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.sleep(0)  # let the aborted connections end their coroutines

    async def _close_expired(self):
        interval = max(0.05, min(0.5, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn, writer in list(self.connections.items()):
                if conn.deadline is not None and now > conn.deadline:
                    writer.transport.abort()

    async def serve_connection(self, reader, writer):
        """Serve every request of one connection, in order, until it closes."""
        client = writer.get_extra_info("peername") or ("", 0)
        # No Nagle delay, as on the threaded transport: asyncio sets TCP_NODELAY only when the
        # listening socket was made with IPPROTO_TCP, which socket.create_server does not do,
        # and a streamed answer's pieces would then wait for the client's delayed ACKs.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) >= self.max_connections:
            writer.write(overloaded_answer(self.app, client))
            await linger(reader, writer)
            writer.close()
            return
        conn = Connection(self.app, client, self.idle_timeout)
        self.connections[conn] = writer
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    if conn.state == State.BODY and hasattr(conn.sink, "wait_for_room"):
                        await conn.sink.wait_for_room()  # back-pressure (connection.py)
                    conn.receive_data(await reader.read(READ_SIZE))
                elif event is CLOSE:
                    break
                elif isinstance(event, bytes):
                    writer.write(event)
                else:
                    response = await self._handle(conn, event)
                    if response.streaming and event.method != "HEAD":
                        await self._stream(conn, writer, response)
                    else:
                        writer.write(conn.send(response))
                        await writer.drain()  # the client must take it: the deadline holds
                        if response.takeover is not None and conn.state != State.CLOSED:
                            conn.deadline = None  # the new protocol keeps its own time
                            await response.takeover(reader, writer, bytes(conn.buffer))
                            break
            if conn.linger:
                await linger(reader, writer)
        except (ConnectionError, OSError):
            pass  # a client that leaves is not an error: no traceback for it
        finally:
            conn.release()
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()  # what is queued goes out, within the deadline
            del self.connections[conn]

    async def _handle(self, conn, request):
        if conn.blocking:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.app.handle, request)
        return self.app.handle(request)

    async def _stream(self, conn, writer, response):
        writer.write(conn.start_stream(response))
        chunks = response.chunks
        try:
            if hasattr(chunks, "__aiter__"):
                async for piece in chunks:
                    await send_chunk(conn, writer, response, piece)
            else:
                iterator = iter(chunks)
                loop = asyncio.get_running_loop()
                while (piece := await loop.run_in_executor(self.pool, next, iterator, _END)) is not _END:
                    await send_chunk(conn, writer, response, piece)
            writer.write(conn.end_stream())
            await writer.drain()
        except (ConnectionError, OSError):
            raise
        except Exception:
            report_broken_stream()
            raise ConnectionAbortedError("the stream failed") from None
        finally:
            close = getattr(chunks, "aclose", None) or getattr(chunks, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
            if response.on_close:
                response.on_close()


async def send_chunk(conn, writer, response, piece):
    if piece:
        writer.write(conn.chunk(piece))
        response.sent += len(piece)
        await writer.drain()


async def linger(reader, writer):
    """After an answer to a request whose bytes were not all read: stop writing, then read and
    drop what the client still sends, for a moment and up to a bound, before closing. Closing
    with unread data would make the kernel send a reset, which can destroy the answer before
    the client reads it."""
    dropped = 0
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while dropped < LINGER_BYTES and (data := await reader.read(READ_SIZE)):
                dropped += len(data)
