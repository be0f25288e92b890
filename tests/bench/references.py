"""The two standard-library reference servers the benchmark measures the project against.

Both answer every request with the same fixed response (the body and Content-Type that
`level01/health_check.py` gives for `GET /health`, read from `--body-file`), so the only
difference between a reference and the project's server is the work the project does per
request: routing, parsing, headers, logging. They are references, not servers to copy: they
ignore the method, the path and any request body.

- `threaded`: `http.server` as fast as it goes without leaving the standard library — a
  `ThreadingHTTPServer` with the four settings that matter: HTTP/1.1 keep-alive, one write per
  response (`wbufsize = -1`), no Nagle delay, and a listen backlog of 128 instead of 5
  (PERFORMANCE.md: the traps these avoid).
- `asyncio`: the smallest keep-alive server asyncio streams allow: read a request head up to
  the blank line, write the precomputed reply, repeat. This is roughly the ceiling a
  pure-Python asyncio server can reach.

Run: python tests/bench/references.py threaded|asyncio --port 0 --body-file F
Like every project server it prints one line, `listening on http://HOST:PORT`, when ready,
and exits with status 0 on SIGTERM.
"""

import argparse
import asyncio
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_threaded(host: str, port: int, body: bytes, content_type: str) -> None:
    class FixedReplyHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        wbufsize = -1  # buffer the status line, headers and body: one send() per response
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class TunedHTTPServer(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            # A load generator that stops mid-request resets its connections: not worth a traceback.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with TunedHTTPServer((host, port), FixedReplyHandler) as server:
        bound_host, bound_port = server.server_address[:2]
        print(f"listening on http://{bound_host}:{bound_port}", flush=True)
        server.serve_forever()


async def serve_asyncio(host: str, port: int, body: bytes, content_type: str) -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\n"
        + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1")
        + body
    )

    async def answer_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client closed the connection, or sent a head larger than 64 KiB
        finally:
            writer.close()

    server = await asyncio.start_server(answer_connection, host, port, backlog=128)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on http://{bound_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Standard-library reference servers for the benchmark.")
    parser.add_argument("transport", choices=["threaded", "asyncio"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--body-file", required=True, type=argparse.FileType("rb"),
                        help="the response body to send, byte for byte")
    parser.add_argument("--content-type", default="application/json")
    args = parser.parse_args()
    with args.body_file:
        body = args.body_file.read()
    if args.transport == "threaded":
        serve_threaded(args.host, args.port, body, args.content_type)
    else:
        asyncio.run(serve_asyncio(args.host, args.port, body, args.content_type))


if __name__ == "__main__":
    main()
