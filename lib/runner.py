"""Start a server the way common.md says, and stop it gracefully.

    bind the port (an unusable one: exit 2)  →  serve on the chosen transport
    →  print `listening on http://HOST:PORT` (the one line on stdout, flushed)
    →  SIGTERM / SIGINT: readiness turns 503, optional `--shutdown-delay` of serving on,
       stop accepting, close idle keep-alive connections, let in-flight requests finish
       (at most `--drain-timeout`), run the app's shutdown hooks (close storage), exit 0.
       A second signal exits at once.
"""
import os
import signal
import socket
import sys

from lib.app import exit_usage_error
from lib.connection import BACKLOG


def bind(host, port):
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as err:
        exit_usage_error(f"cannot listen on {host}:{port}: {err.strerror or err}")


def serve(app, args):
    # The transports import this module for the signal handling: import them here, not above.
    from lib.asyncio_server import AsyncioServer
    from lib.threaded_server import ThreadedServer

    sock = bind(args.host, args.port)
    app.port = sock.getsockname()[1]  # the one really bound: `--port 0` lets the OS choose

    def announce():
        url = announce_listening("http", sock)
        app.log("info", f"try: curl -i {url}/ (its routes), or open /openapi.json; Ctrl-C stops it")
        for hook in app.on_listening:  # e.g. a mail catcher beside the HTTP server
            hook()

    transports = {"asyncio": AsyncioServer, "threaded": ThreadedServer, **app.transports}
    transport = transports[args.server]
    try:
        transport(app, sock, args).run(announce)
    finally:
        sock.close()
        for hook in reversed(app.shutdown_hooks):
            hook()
        sys.stderr.flush()


def announce_listening(scheme, sock):
    """The `listening on SCHEME://HOST:PORT` line on stdout, flushed (common.md: a client waits
    for it); returns the URL."""
    host, port = sock.getsockname()[:2]
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    sys.stdout.write(f"listening on {url}\n")
    sys.stdout.flush()
    return url


def exit_now():
    """A second SIGTERM/SIGINT: stop at once, without draining (common.md)."""
    sys.stderr.write("second signal: exiting at once\n")
    sys.stderr.flush()
    os._exit(1)


def on_stop_signals(begin_shutdown):
    """SIGTERM and SIGINT begin a graceful shutdown; a second one exits at once."""
    received = []

    def handler(signum, frame):
        if received:
            exit_now()
        received.append(signum)
        begin_shutdown()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
