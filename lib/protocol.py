"""HTTP/1.1 on the wire, as pure functions over bytes (RFC 9110, RFC 9112).

Nothing here touches a socket. A transport reads bytes, hands them to these functions and
writes back the bytes `encode_response` builds, so both transports (threaded and asyncio) share
one parser and the parser can be tested with byte literals, the way h11 is.

The steps of one exchange:

    head bytes  --parse_head-->  RequestHead        (request line + header fields)
    RequestHead --body_length--> int or CHUNKED     (how the body is framed, RFC 9112 §6)
    chunked bytes --ChunkedDecoder--> body bytes    (RFC 9112 §7.1)
    Response    --encode_response--> bytes          (status line, headers, body: one write)

Every failure is an `HTTPError` carrying the status to answer (400, 411, 413, 414, 431, 501,
505). What this leaves out: HTTP/2, `Expect` values other than `100-continue`, transfer codings
other than `chunked`, trailer fields (read and dropped).
"""
import re
import time
from http import HTTPStatus

from lib.problems import ContentTooLarge, HTTPError, reason_phrase

MAX_REQUEST_LINE = 8 * 1024   # longer → 414 URI Too Long
MAX_HEADER_LINE = 8 * 1024    # longer → 431 Request Header Fields Too Large
MAX_HEADER_COUNT = 100        # more → 431
MAX_HEAD = MAX_REQUEST_LINE + MAX_HEADER_COUNT * 256 + 4  # a bound for the reader's buffer
MAX_CHUNK_LINE = 1024         # a chunk-size line with extensions
DEFAULT_BODY_LIMIT = 1024 * 1024

CHUNKED = -1  # body_length() result for a chunked body

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110 §5.5: field values are visible characters, spaces and tabs (obs-text allowed)
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")


class RequestHead:
    """The parsed request line and header fields. Field names are lower-cased; a field sent
    several times is joined with ", " (RFC 9110 §5.3), `Cookie` with "; " (RFC 6265 §5.4)."""

    __slots__ = ("method", "target", "path", "query_string", "version", "headers")

    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        path, _, self.query_string = target.partition("?")
        if not path.startswith("/"):  # absolute-form (RFC 9112 §3.2.2) or asterisk-form
            path = "/" + path.split("://", 1)[-1].partition("/")[2] if "://" in path else path
        self.path = path

    @property
    def keep_alive(self):
        """RFC 9112 §9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection


class ProtocolError(HTTPError):
    """A request the parser cannot accept; after it the connection is closed."""

    status = 400


def parse_head(data):
    """Parse the request line and header fields: `data` is the head up to (and maybe
    including) the blank line that ends it."""
    lines = data.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise ProtocolError("request line too long", status=414)
    # RFC 9112 §3: method SP request-target SP HTTP-version
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise ProtocolError("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or target[0:1] not in b"/*h":
        raise ProtocolError("malformed request line")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/") and len(version) == 8:
            raise ProtocolError("only HTTP/1.0 and HTTP/1.1 are supported", status=505)
        raise ProtocolError("malformed request line")
    if _BAD_FIELD_VALUE.search(target) or b"\t" in target:
        raise ProtocolError("control characters in the request target")

    headers = {}
    count = 0
    for line in lines[1:]:
        if not line:
            continue  # the terminating blank line(s)
        count += 1
        if count > MAX_HEADER_COUNT:
            raise ProtocolError(f"more than {MAX_HEADER_COUNT} header fields", status=431)
        if len(line) > MAX_HEADER_LINE:
            raise ProtocolError("header field too large", status=431)
        if line[0] in b" \t":  # RFC 9112 §5.2: obsolete line folding
            raise ProtocolError("obsolete line folding in header field")
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no white space between field name and colon
        if not colon or not _TOKEN.match(name):
            raise ProtocolError("malformed header field")
        value = value.strip(b" \t")
        if _BAD_FIELD_VALUE.search(value):
            raise ProtocolError("control characters in a header field")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            headers[key] += ("; " if key == "cookie" else ", ") + text
        else:
            headers[key] = text
    if version == b"HTTP/1.1" and "host" not in headers:
        # RFC 9112 §3.2: a 1.1 request without Host is a 400. curl, browsers and every
        # library send one; only hand-typed requests miss it, and those get a clear answer.
        raise ProtocolError("HTTP/1.1 requests need a Host header")
    return RequestHead(method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), headers)


def body_length(head):
    """How the request body is framed (RFC 9112 §6.3): a byte count, CHUNKED, or None when the
    request declares no body at all."""
    headers = head.headers
    transfer_encoding = headers.get("transfer-encoding")
    content_length = headers.get("content-length")
    if transfer_encoding is not None:
        # RFC 9112 §6.3 rule 3: both framings at once is how request smuggling starts.
        if content_length is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        if head.version == "HTTP/1.0":
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if transfer_encoding.strip().lower() != "chunked":
            raise ProtocolError("only the chunked transfer coding is supported", status=501)
        return CHUNKED
    if content_length is None:
        return None
    values = {v.strip() for v in content_length.split(",")}  # "5, 5" is allowed (§8.6)
    if len(values) != 1:
        raise ProtocolError("conflicting Content-Length values")
    value = values.pop().encode("latin-1")
    if not _DIGITS.match(value) or len(value) > 18:
        raise ProtocolError("invalid Content-Length")
    return int(value)


class ChunkedDecoder:
    """Decode a chunked body incrementally: feed bytes as they arrive, read `done`, `body`
    and `unused` (bytes after the body: the next pipelined request).

    A small state machine (RFC 9112 §7.1): SIZE line → DATA → CRLF → ... → size 0 → TRAILER
    lines → blank line → DONE. It keeps at most `limit` body bytes, so a client cannot make the
    server buffer more than the route allows.
    """

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self, limit):
        self.limit = limit
        self.state = self.SIZE
        self.remaining = 0
        self.chunks = []
        self.size = 0
        self.buffer = b""
        self.trailer_lines = 0

    @property
    def done(self):
        return self.state == self.DONE

    @property
    def body(self):
        return b"".join(self.chunks)

    @property
    def unused(self):
        return self.buffer

    def wanted(self):
        """What to read next to feed the decoder no more than it needs: a byte count, or 0
        for "one line" (up to CRLF). Lets a stream reader avoid consuming a pipelined request."""
        if self.state == self.DATA:
            return min(self.remaining, 65536)
        if self.state == self.DATA_END:
            return 2
        return 0

    def feed(self, data):
        self.buffer += data
        while self.state != self.DONE:
            if self.state == self.DATA:
                if not self.buffer:
                    return
                piece = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(piece):]
                self.chunks.append(piece)
                self.remaining -= len(piece)
                if self.remaining == 0:
                    self.state = self.DATA_END
                continue
            if self.state == self.DATA_END:
                if len(self.buffer) < 2:
                    return
                if self.buffer[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                self.buffer = self.buffer[2:]
                self.state = self.SIZE
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                if len(self.buffer) > MAX_CHUNK_LINE:
                    raise ProtocolError("chunk line too long")
                return
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2:]
            if self.state == self.SIZE:
                size_text = line.split(b";", 1)[0].strip(b" \t")  # chunk extensions ignored
                if not _HEX.match(size_text) or len(size_text) > 15:
                    raise ProtocolError("invalid chunk size")
                size = int(size_text, 16)
                self.size += size
                if self.size > self.limit:
                    raise ContentTooLarge(f"request body over {self.limit} bytes")
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.remaining = size
                    self.state = self.DATA
            elif line:  # a trailer field: read and dropped
                self.trailer_lines += 1
                if self.trailer_lines > MAX_HEADER_COUNT:
                    raise ProtocolError("too many trailer fields", status=431)
            else:
                self.state = self.DONE


# --- responses ---------------------------------------------------------------------------

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {reason_phrase(s.value)}\r\n".encode() for s in HTTPStatus}
_NO_BODY = frozenset({204, 304}) | frozenset(range(100, 200))  # RFC 9110 §6.4.1, §8.6

_date_cache = [0, b""]


def http_date():
    """The `Date` field (RFC 9110 §6.6.1), formatted once a second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT\r\n", time.gmtime(now)).encode()
    return _date_cache[1]


def status_line(status):
    line = _STATUS_LINES.get(status)
    return line if line else f"HTTP/1.1 {status} Status {status}\r\n".encode()


def encode_head(status, headers, content_length, *, keep_alive=True):
    """The status line and header fields. `content_length` None means the caller frames the
    body itself (chunked, or close-delimited)."""
    parts = [status_line(status), http_date()]
    for name, value in headers:
        # A CR or LF in a value would let the value write extra header lines (response
        # splitting); values come from code, but some carry user input (Location, filenames).
        if "\n" in value or "\r" in value:
            raise ValueError(f"line break in response header {name}")
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    if content_length is not None and status not in _NO_BODY:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_response(status, headers, body, *, head_only=False, keep_alive=True):
    """A whole response in one bytes object, so it goes out in one write (Nagle trap 1 of
    PERFORMANCE.md). HEAD gets GET's Content-Length and no body (RFC 9110 §9.3.2)."""
    head = encode_head(status, headers, len(body), keep_alive=keep_alive)
    if head_only or status in _NO_BODY:
        return head
    return head + body


def encode_chunk(data):
    """One chunk of a chunked response body; b"" ends the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def wants_continue(head):
    """RFC 9110 §10.1.1: a client that sent `Expect: 100-continue` waits for this before
    sending the body (curl does for bodies over 1 KiB)."""
    return head.version == "HTTP/1.1" and head.headers.get("expect", "").lower() == "100-continue"
