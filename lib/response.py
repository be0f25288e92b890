"""Responses: a status, header fields and a body of bytes — or an iterator of chunks.

Handlers return one of these (or a plain dict/list, which becomes JSON with status 200). The
transport encodes it with `lib.protocol`; `Content-Length` is always computed there, never
written by hand, so it cannot be wrong.
"""
import json

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"


class Response:
    __slots__ = ("status", "headers", "body", "takeover")

    def __init__(self, body=b"", status=200, headers=None, content_type=None):
        self.status = status
        self.body = body
        # asyncio only: `async takeover(reader, writer, unread)` gets the connection once this
        # answer is sent (a protocol switch: a WebSocket, a tunnel); see lib/asyncio_server.py.
        self.takeover = None
        self.headers = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
        if content_type:
            self.headers.append(("Content-Type", content_type))

    def header(self, name):
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    def set_header(self, name, value):
        lower = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != lower]
        self.headers.append((name, value))

    streaming = False

    @property
    def size(self):
        return len(self.body)


class StreamingResponse(Response):
    """A body produced piece by piece (a download, Server-Sent Events). `chunks` is an iterator
    of bytes, or an async iterator on the asyncio transport; it is sent with chunked transfer
    coding, each piece as soon as it is produced — or, when its `length` is known beforehand (a
    file), framed by that Content-Length, which a HEAD answer reports too; the pieces must then
    add up to exactly `length` bytes.

    On the asyncio transport a plain (blocking) iterator is advanced in the worker pool, so a
    generator that waits for events does not stall the event loop."""

    __slots__ = ("chunks", "length", "sent", "on_close")

    def __init__(self, chunks, status=200, headers=None, content_type="application/octet-stream",
                 length=None):
        super().__init__(b"", status, headers, content_type)
        self.chunks = chunks
        self.length = length
        self.sent = 0         # bytes written so far, for the access log
        self.on_close = None  # called by the transport when the stream has ended

    streaming = True

    @property
    def size(self):
        return self.sent


# NaN and Infinity are refused: they are not JSON (RFC 8259 §6).
_encode_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_encode_json_ascii = json.JSONEncoder(allow_nan=False).encode


def json_body(data):
    """`data` as UTF-8 JSON. A string may hold a lone surrogate (JSON can spell one, `"\\ud800"`,
    and Python decodes it, say into a field name a 422 then quotes): it has no UTF-8 form, so
    such a body is written with every non-ASCII character escaped, which JSON allows."""
    try:
        return _encode_json(data).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_json_ascii(data).encode("ascii")


def json_response(data, status=200, headers=None):
    return Response(json_body(data), status, headers, JSON)


def problem_response(error):
    """RFC 9457: the problem object of an `HTTPError`, with its extra headers."""
    response = Response(json_body(error.to_problem()), error.status, error.headers, PROBLEM_JSON)
    return response


def html_response(text, status=200, headers=None):
    return Response(text.encode("utf-8"), status, headers, "text/html; charset=utf-8")


def text_response(text, status=200, headers=None, content_type="text/plain; charset=utf-8"):
    return Response(text.encode("utf-8"), status, headers, content_type)


def no_content(headers=None):
    return Response(b"", 204, headers)


def created(data, location, headers=None):
    """201 with the new object and where it lives (RFC 9110 §15.3.2)."""
    return json_response(data, 201, {"Location": location, **(headers or {})})


def redirect(location, status=302, headers=None):
    return Response(b"", status, {"Location": location, **(headers or {})})
