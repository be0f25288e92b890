"""A small server for the transport tests: routes that make a transport do its less common work
(bodies in pieces, streamed answers, big answers to slow readers, blocking handlers), which the
projects do not all exercise yet. Run by tests/lib/test_transports.py on both transports, and by
tests/lib/test_observability.py for lib's logs and metrics (it serves `GET /metrics`).

    python tests/lib/transport_app.py --port 0 [--server threaded]
"""
import asyncio
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from lib import App, Response
from lib.problems import ContentTooLarge, Forbidden
from lib.metrics import add_metrics
from lib.response import StreamingResponse

app = App("transport_app", "Routes that exercise a transport.", port=8999)
BIG = bytes(range(256)) * 16 * 1024  # 4 MiB: far more than a socket buffer holds


@app.post("/echo")
def echo(request):
    """The body back, with its length and digest."""
    return Response(request.body, headers={"X-Length": str(len(request.body)),
                                           "X-Sha256": hashlib.sha256(request.body).hexdigest()})


app.post("/echo/big", summary="The body back, up to 4 MiB", body_limit=4 * 1024 * 1024)(echo)


@app.get("/goodbye")
def goodbye(request):
    """An answer after which the handler wants the connection closed."""
    return Response(b"bye", headers={"Connection": "close"}, content_type="text/plain")


@app.get("/big")
def big(request):
    return Response(BIG * request.query_int("times", 1, low=1, high=16),
                    content_type="application/octet-stream")


@app.get("/stream")
def stream(request):
    """Five pieces from a plain generator (advanced in the worker pool on asyncio)."""
    count = request.query_int("n", 5, low=0, high=10_000)
    size = request.query_int("size", 6, low=1, high=1 << 20)

    def pieces():
        for number in range(count):
            yield f"{number:0{size}d}"[-size:].encode()

    return StreamingResponse(pieces(), content_type="text/plain")


@app.get("/stream/sized")
def stream_sized(request):
    """The same pieces as /stream, with their total length known beforehand (as a file's)."""
    count = request.query_int("n", 5, low=0, high=10_000)
    return StreamingResponse((f"{number:06d}".encode() for number in range(count)),
                             content_type="text/plain", length=6 * count)


@app.get("/stream/async")
def stream_async(request):
    """Pieces from an async generator, paced, the way Server-Sent Events are sent."""
    async def pieces():
        for number in range(3):
            await asyncio.sleep(0.01)
            yield f"data: {number}\n\n".encode()

    return StreamingResponse(pieces(), content_type="text/event-stream")


@app.get("/stream/broken")
def stream_broken(request):
    def pieces():
        yield b"first"
        raise RuntimeError("the source failed halfway")

    return StreamingResponse(pieces(), content_type="text/plain")


@app.get("/sleep", blocking=True)
def sleep(request):
    time.sleep(request.query_int("ms", 100, low=0, high=5000) / 1000)
    return {"slept": True}


class DigestSink:
    """A streamed body's sink: it digests what arrives and keeps none of it, refuses a body over
    `SINK_LIMIT` at the byte that passes it, and counts the sinks left open and discarded, so a
    test can see that a cut-off upload is cleaned up."""
    open = 0
    discarded = 0
    SINK_LIMIT = 1024 * 1024

    def __init__(self, request):
        if request.header("X-Refuse"):
            raise Forbidden("refused from the head, before the body")
        self.size = 0
        self.digest = hashlib.sha256()
        DigestSink.open += 1

    def write(self, piece):
        self.size += len(piece)
        if self.size > self.SINK_LIMIT:
            raise ContentTooLarge(f"over {self.SINK_LIMIT} bytes")
        self.digest.update(piece)

    def discard(self):
        DigestSink.open -= 1
        DigestSink.discarded += 1


@app.post("/sink", body_sink=DigestSink, body_limit=1 << 40)
def sink(request):
    """The size and digest of a body that was streamed, never held whole."""
    return {"size": request.body.size, "sha256": request.body.digest.hexdigest()}


@app.get("/sink")
def sinks(request):
    return {"open": DigestSink.open, "discarded": DigestSink.discarded}


TAKEN_OVER = set()  # the writers of the connections /upgrade took over, told when draining


@app.get("/upgrade")
def upgrade(request):
    """101, then the connection is the handler's (asyncio only): it echoes each line back in
    upper case until the client closes — how a WebSocket or a tunnel takes a connection over.
    When shutdown begins it says DRAINING, and may go on until the client closes (within the
    drain timeout), as a WebSocket's closing handshake does."""
    async def echo_lines(reader, writer, unread):
        TAKEN_OVER.add(writer)
        writer.write(unread.upper())  # the client may not wait for the 101 to start talking
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        TAKEN_OVER.discard(writer)

    response = Response(b"", 101, {"Upgrade": "shout", "Connection": "Upgrade"})
    response.takeover = echo_lines
    return response


app.on_draining.append(lambda: [writer.write(b"DRAINING\n") for writer in TAKEN_OVER])


@app.get("/fail")
def fail(request):
    """A handler that raises: the 500 and its logged traceback."""
    raise RuntimeError("the handler failed on purpose")


add_metrics(app)


def main(argv=None):
    app.run(app.parse_args(argv))


if __name__ == "__main__":
    main()
