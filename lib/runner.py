"""Start a server the way common.md says, and stop it gracefully.

    bind the port (an unusable one: exit 2)  →  serve on the chosen transport
    →  print `listening on http://HOST:PORT` (the one line on stdout, flushed)
    →  SIGTERM / SIGINT: readiness turns 503, optional `--shutdown-delay` of serving on,
       stop accepting, close idle keep-alive connections, let in-flight requests finish
       (at most `--drain-timeout`), run the app's shutdown hooks (close storage), exit 0.
       A second signal exits at once.
"""
import socket
import sys

from lib.app import exit_usage_error
from lib.asyncio_server import AsyncioServer
from lib.threaded_server import ThreadedServer
from lib.transport import BACKLOG

TRANSPORTS = {"asyncio": AsyncioServer, "threaded": ThreadedServer}


def bind(host, port):
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as err:
        exit_usage_error(f"cannot listen on {host}:{port}: {err.strerror or err}")


def serve(app, args):
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    app.port = port  # the one really bound: `--port 0` lets the OS choose
    shown_host = f"[{host}]" if ":" in host else host

    def announce():
        sys.stdout.write(f"listening on http://{shown_host}:{port}\n")
        sys.stdout.flush()

    try:
        TRANSPORTS[args.server](app, sock, args).run(announce)
    finally:
        sock.close()
        for hook in reversed(app.shutdown_hooks):
            hook()
        sys.stderr.flush()
