"""The threaded transport: `http.server.ThreadingHTTPServer`, one thread per connection.

This is the classic model (CPython's `http.server`, Flask's dev server, most blocking WSGI
servers): simple to reason about, since each connection's code runs top to bottom and may block,
at the price of a thread per open connection and the GIL. Choose it with `--server threaded`.

It keeps `socketserver`'s accept loop and thread per connection, and replaces
`BaseHTTPRequestHandler`'s parsing with `lib.connection`, the machine the asyncio transport
drives too: put `ConnectionHandler.handle` beside `AsyncioServer.serve_connection` and the steps
are the same, without the `await`. The stock server's traps are avoided here:

1. Nagle + delayed ACK: each answer goes to the kernel in one write, and `TCP_NODELAY` is set.
2. Listen backlog 5: the socket listens with `BACKLOG` (128).
3. Tracebacks on disconnect: a client that goes away ends its connection quietly.

Timeouts: the sockets block without a timeout of their own. As on the asyncio transport, each
connection's machine carries a deadline, and one sweeper (the main thread, between its checks
for a stop signal) shuts the connections that passed theirs, which wakes their thread out of
recv() or send(): a client that stops sending or reading frees its thread, and a request costs
no timeout system calls.

Shared state under threads: handlers run in many threads at once, so whatever they share needs
its own locking — the sqlite layer gives each thread its own connection for that reason.
"""
import socket
import socketserver
import threading
import time
from http.server import ThreadingHTTPServer

from lib.connection import (BACKLOG, CLOSE, LINGER_BYTES, LINGER_SECONDS, NEED_DATA, Connection, State,
                            overloaded_answer, report_broken_stream)
from lib.runner import on_stop_signals

READ_SIZE = 64 * 1024


class ConnectionHandler(socketserver.BaseRequestHandler):
    """Serves every request of one connection, in order, in its own thread."""

    def handle(self):
        server, sock = self.server, self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(server.app, self.client_address, server.idle_timeout)
        if not server.track(sock, conn):  # at --max-connections: 503 rather than another thread
            sock.settimeout(LINGER_SECONDS)
            sock.sendall(overloaded_answer(server.app, self.client_address))
            linger(sock)
            return
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    if conn.state == State.IDLE:  # its answers all sent: the drain may close it
                        server.between_requests.add(sock)
                    data = sock.recv(READ_SIZE)
                    server.between_requests.discard(sock)
                    conn.receive_data(data)
                elif event is CLOSE:
                    break
                elif isinstance(event, bytes):
                    sock.sendall(event)
                else:
                    response = server.app.handle(event)
                    if response.streaming and event.method != "HEAD":
                        stream(sock, conn, response)
                    else:
                        sock.sendall(conn.send(response))
                        if response.takeover is not None:
                            break  # a protocol switch is the asyncio transport's (a coroutine)
            if conn.linger:
                linger(sock)
        except OSError:
            pass  # a client that leaves (or times out) is not an error: no traceback for it
        finally:
            conn.release()
            server.untrack(sock)


def stream(sock, conn, response):
    """Each piece as it comes, each taken by the client within the idle timeout."""
    chunks = response.chunks
    try:
        sock.sendall(conn.start_stream(response))
        for piece in chunks:
            if piece:
                sock.sendall(conn.chunk(piece))
                response.sent += len(piece)
        sock.sendall(conn.end_stream())
    except OSError:
        raise
    except Exception:
        report_broken_stream()
        raise ConnectionAbortedError("the stream failed") from None
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        if response.on_close:
            response.on_close()


def linger(sock):
    """See `lib.asyncio_server.linger`: half-close, drop what still arrives, then close."""
    dropped = 0
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        while dropped < LINGER_BYTES:
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            data = sock.recv(READ_SIZE)
            if not data:
                break
            dropped += len(data)
    except OSError:
        pass


class ThreadedServer(ThreadingHTTPServer):
    daemon_threads = True     # a stuck connection never keeps the process alive
    request_queue_size = BACKLOG

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
        self.connections = {}     # socket → its Connection, for the drain
        self.between_requests = set()  # sockets waiting for a next request, nothing in flight
        self.lock = threading.Lock()

    def track(self, sock, conn):
        """Register a new connection, unless the server already holds `--max-connections`."""
        with self.lock:
            if len(self.connections) >= self.max_connections:
                return False
            self.connections[sock] = conn
            return True

    def untrack(self, sock):
        with self.lock:
            self.connections.pop(sock, None)
        self.between_requests.discard(sock)

    def handle_error(self, request, client_address):
        pass  # errors are answered and logged inside the handler; never print a traceback here

    def run(self, announce):
        stop = threading.Event()
        on_stop_signals(stop.set)
        worker = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="accept", daemon=True)
        worker.start()
        announce()
        while not stop.wait(max(0.05, min(0.5, self.idle_timeout / 4))):
            self.close_expired()
        self.app.begin_draining()
        if self.shutdown_delay:
            time.sleep(self.shutdown_delay)
        self.shutdown()  # stop accepting …
        self.socket.close()  # … and refuse: an open listener would complete handshakes unserved
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            with self.lock:
                connections = list(self.connections.items())
            if not connections:
                break
            for sock, conn in connections:
                if sock in self.between_requests:
                    shut(sock)
            time.sleep(0.02)
        self.server_close()

    def close_expired(self):
        """Shut the connections whose client missed its deadline (see the module docstring)."""
        now = time.monotonic()
        with self.lock:
            expired = [sock for sock, conn in self.connections.items()
                       if conn.deadline is not None and now > conn.deadline]
        for sock in expired:
            shut(sock)


def shut(sock):
    """Shut both directions: a thread blocked in this socket's recv() or send() wakes up (with
    end of file, or an error) and ends its connection."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already
