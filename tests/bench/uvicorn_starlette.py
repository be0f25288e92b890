"""The third-party reference: uvicorn with its httptools parser, serving a Starlette app.

This is the stack a Python developer would most likely pick for a small JSON service, so the
project's asyncio transport is measured against it (issue 10: health_check with its full
default chain ≥ 1.5× this, in the same run). It is optional, like wrk: its packages are in
requirements-bench.txt (`pip install -r requirements-bench.txt`), and run.py measures it only
when they are installed. Nothing outside tests/bench/ imports it.

The app is what a Starlette user would write: one route, `GET /health`, answering the JSON value
of `--body-file` (the body health_check gives for `GET /health`) with a `JSONResponse`, which
serializes it on every request as health_check does. uvicorn runs with its defaults but two,
both said out loud so the comparison does not depend on what else is installed:
`http="httptools"` (the C parser, not h11) and `loop="asyncio"` (the standard event loop that
the project's servers run on, not uvloop). Its access log stays on, as health_check's does, and
goes to stderr as health_check's does (uvicorn sends it to stdout, which the runner stops
reading after the first line: a full pipe would stall the server).

Run: python tests/bench/uvicorn_starlette.py --port 0 --body-file F
Like every project server it prints one line, `listening on http://HOST:PORT`, when it accepts
connections, and exits with status 0 on SIGTERM (uvicorn's graceful shutdown).
"""

import argparse
import copy
import json
import signal
import socket
import sys

import uvicorn
import uvicorn.config
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

def health_app(payload: object) -> Starlette:
    async def health(request) -> JSONResponse:
        return JSONResponse(payload)

    return Starlette(routes=[Route("/health", health)])


class AnnouncedServer(uvicorn.Server):
    """Prints the line the benchmark waits for, with the port uvicorn bound, once it accepts
    connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"listening on http://{host}:{port}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="uvicorn + httptools + Starlette, the benchmark's reference.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--body-file", required=True, type=argparse.FileType("rb"),
                        help="a JSON document: the value GET /health answers")
    args = parser.parse_args()
    with args.body_file:
        payload = json.load(args.body_file)

    # uvicorn binds the socket itself, as it does when run from its command line. (A socket bound
    # here and handed over with `sockets=` would lack TCP_NODELAY: asyncio sets it on accepted
    # sockets only when the listening one was made with proto IPPROTO_TCP, which
    # socket.create_server does not do, and every answer would wait ~40 ms for a delayed ACK.)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(health_app(payload), host=args.host, port=args.port, http="httptools",
                            loop="asyncio", lifespan="off", log_config=log_config)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it
    # found installed: this one makes that an exit with status 0, as the runner expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    AnnouncedServer(config).run()


if __name__ == "__main__":
    main()
