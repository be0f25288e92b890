"""The threaded transport: `http.server.ThreadingHTTPServer`, one thread per connection.

This is the classic model (CPython's `http.server`, Flask's dev server, most blocking WSGI
servers): simple to reason about, since each connection's code runs top to bottom and may block,
at the price of a thread per open connection and the GIL. Choose it with `--server threaded`.

It keeps `socketserver`'s accept loop and thread per connection, and replaces
`BaseHTTPRequestHandler`'s parsing with `lib.protocol`, so both transports parse alike. The
stock server's traps (PERFORMANCE.md) are avoided here:

1. Nagle + delayed ACK: each answer goes to the kernel in one write, and `TCP_NODELAY` is set.
2. Listen backlog 5: the socket listens with `BACKLOG` (128).
3. Tracebacks on disconnect: a client that goes away ends its connection quietly.
4. `settimeout` runs poll(2) before every recv and send: the timeouts are the kernel's instead
   (`ClientSocket`), one system call per read or write.

Shared state under threads: handlers run in many threads at once, so whatever they share needs
its own locking — the sqlite layer gives each thread its own connection for that reason.
"""
import socket
import socketserver
import struct
import threading
import time
from http.server import ThreadingHTTPServer

from lib import middleware, transport
from lib.problems import HTTPError
from lib.protocol import (CHUNKED, CONTINUE, MAX_HEAD, MAX_REQUEST_LINE, ChunkedDecoder, ProtocolError,
                          body_length, parse_head, wants_continue)


class ClientGone(Exception):
    """The peer closed the connection, or a deadline passed."""


class ClientSocket:
    """A client's blocking socket: buffered reads and whole writes, each bounded in time.

    The bounds are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO) on a socket left blocking, not
    Python's `settimeout`: that makes the socket non-blocking and runs poll(2) before every
    recv and send, so each read or write costs two system calls, and the thread gives up and
    takes back the GIL around each. Setting a bound is a system call too, made only when it
    changes by more than the slack: on a keep-alive connection, once or twice in all."""

    TIMEOUT_SLACK = 0.25  # s a wait may overrun its deadline, to spare a system call per read

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""
        self.timeout = None

    def _wait_at_most(self, seconds):
        """Bound each of the socket's next blocking calls (a recv, a send)."""
        if self.timeout is not None and abs(seconds - self.timeout) <= self.TIMEOUT_SLACK:
            return
        self.timeout = seconds
        seconds = max(seconds, 0.001)  # a zero timeval means "wait for ever"
        whole = int(seconds)
        # struct timeval: two C longs (Linux, macOS; the asyncio transport's signal handling
        # already needs a POSIX system)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def send_all(self, data, seconds):
        """All of `data`, taken by the client within `seconds` (as the asyncio transport's
        paused writes are): a client that stops reading, or reads too slowly, is dropped rather
        than holding the thread. Usually one send does it all."""
        deadline = time.monotonic() + seconds
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientGone("the client did not take the answer in time")
            self._wait_at_most(remaining)
            try:
                view = view[self.sock.send(view):]
            except OSError:  # the timeout (EAGAIN), a reset
                raise ClientGone("timed out or reset") from None

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClientGone("timed out")
        self._wait_at_most(remaining)
        try:
            data = self.sock.recv(65536)
        except OSError:  # the timeout (EAGAIN), a reset
            raise ClientGone("timed out or reset") from None
        if not data:
            raise ClientGone("closed")
        self.buffer += data

    def read_head(self, deadline):
        """Bytes up to and including the blank line that ends a request head."""
        start = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
                return head
            if len(self.buffer) > MAX_HEAD:
                status = 431 if b"\r\n" in self.buffer[:MAX_REQUEST_LINE + 2] else 414
                raise ProtocolError("request head too large", status=status)
            start = max(0, len(self.buffer) - 3)
            self._fill(deadline)

    def read_exactly(self, n, idle_timeout):
        while len(self.buffer) < n:
            self._fill(time.monotonic() + idle_timeout)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_chunked(self, limit, idle_timeout):
        decoder = ChunkedDecoder(limit)
        data, self.buffer = self.buffer, b""
        decoder.feed(data)
        while not decoder.done:
            self._fill(time.monotonic() + idle_timeout)
            data, self.buffer = self.buffer, b""
            decoder.feed(data)
        self.buffer = decoder.unused
        return decoder.body


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Serves every request of one connection, in its own thread."""

    def handle(self):
        server = self.server
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = server.track(sock)
        if state is None:  # at --max-connections: answer 503 rather than take another thread
            sock.settimeout(server.idle_timeout)
            sock.sendall(transport.overloaded_answer(server.app, self.client_address))
            self._linger(sock)
            return
        client = ClientSocket(sock)
        first = True
        try:
            while True:
                state["idle"] = True
                if server.app.draining and not first:
                    return
                deadline = time.monotonic() + transport.head_timeout(first, server.idle_timeout)
                try:
                    data = client.read_head(deadline)
                except ProtocolError as error:
                    request = transport.unparsed_request(server.app, self.client_address)
                    self._answer_failure(client, None, request, error)
                    return
                state["idle"] = False
                first = False
                if not self._exchange(client, data):
                    return
        except (ClientGone, ConnectionError, OSError):
            pass  # PERFORMANCE.md trap 3: a client that leaves is not an error
        finally:
            server.untrack(sock)

    def _exchange(self, client, data):
        server = self.server
        app = server.app
        head = None
        try:
            head = parse_head(data)
            request = transport.build_request(app, head, self.client_address)
            limit, _ = app.plan(request)
            length = body_length(head)
            if length is not None:
                transport.check_body_length(length, limit)
                request.has_body = True
                if wants_continue(head):
                    client.send_all(CONTINUE, server.idle_timeout)
                if length == CHUNKED:
                    request.body = client.read_chunked(limit, server.idle_timeout)
                else:
                    request.body = client.read_exactly(length, server.idle_timeout)
        except HTTPError as error:
            if head is None:
                request = transport.unparsed_request(app, self.client_address)
            self._answer_failure(client, head, request, error)
            return False
        response = app.handle(request)
        keep_alive = transport.keeps_alive(app, head, response, None)
        if response.streaming and head.method != "HEAD":
            self._stream(client, head, response, keep_alive)
        else:
            client.send_all(transport.encode_whole(response, head, keep_alive), server.idle_timeout)
        return keep_alive

    def _answer_failure(self, client, head, request, error):
        response = self.server.app.handle(request, error)
        client.send_all(transport.encode_whole(response, head, False), self.server.idle_timeout)
        self._linger(client.sock)

    def _stream(self, client, head, response, keep_alive):
        """Each piece as it comes, each taken by the client within the idle timeout."""
        idle_timeout = self.server.idle_timeout
        client.send_all(transport.encode_stream_head(response, head, keep_alive), idle_timeout)
        chunks = response.chunks
        try:
            for piece in chunks:
                if piece:
                    client.send_all(transport.frame_chunk(head, piece), idle_timeout)
                    response.sent += len(piece)
            client.send_all(transport.frame_chunk(head, b""), idle_timeout)
        except ClientGone:
            raise
        except Exception:
            transport.report_broken_stream()
            raise ClientGone("the stream failed") from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            if response.on_close:
                response.on_close()

    @staticmethod
    def _linger(sock):
        """See `AsyncioServer._linger`: half-close, drop what still arrives, then close."""
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + transport.LINGER_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if not sock.recv(65536):
                    break
        except OSError:
            pass


class ThreadedServer(ThreadingHTTPServer):
    daemon_threads = True     # a stuck connection never keeps the process alive
    request_queue_size = transport.BACKLOG

    def __init__(self, app, sock, args):
        # The socket is made and bound by the runner; skip TCPServer's bind and its
        # getfqdn() lookup, which can stall on a machine without DNS.
        super().__init__(sock.getsockname()[:2], ConnectionHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.app = app
        self.idle_timeout = args.idle_timeout
        self.shutdown_delay = args.shutdown_delay
        self.drain_timeout = args.drain_timeout
        self.max_connections = args.max_connections
        self._connections = {}
        self._lock = threading.Lock()

    def track(self, sock):
        """Register a new connection and return its state, or None when the server already
        holds `--max-connections`."""
        with self._lock:
            if len(self._connections) >= self.max_connections:
                return None
            state = self._connections[sock] = {"idle": True}
            return state

    def untrack(self, sock):
        with self._lock:
            self._connections.pop(sock, None)

    def handle_error(self, request, client_address):
        pass  # errors are answered and logged inside the handler; never print a traceback here

    def run(self, announce):
        stop = threading.Event()
        transport.on_stop_signals(stop.set)
        worker = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="accept", daemon=True)
        if not self.app.tracing:  # a trace block follows its request's access line at once
            middleware.access_log.batch_in_thread()
        worker.start()
        announce()
        while not stop.wait(0.5):
            pass
        self.app.draining = True
        if self.shutdown_delay:
            time.sleep(self.shutdown_delay)
        self.shutdown()  # stop accepting
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            with self._lock:
                connections = list(self._connections.items())
            if not connections:
                break
            for sock, state in connections:
                if state["idle"]:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes its thread out of recv()
                    except OSError:
                        pass
            time.sleep(0.02)
        self.server_close()
        middleware.access_log.batch_off()
