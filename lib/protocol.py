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
MAX_HEAD = 64 * 1024          # a whole head larger → 431 (414 if the request line is the culprit)
MAX_CHUNK_LINE = 1024         # a chunk-size line with extensions
DEFAULT_BODY_LIMIT = 1024 * 1024

CHUNKED = -1  # body_length() result for a chunked body

# RFC 9110 §5.6.2: token = 1*tchar
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version. The target is visible
# ASCII only (RFC 3986: anything else must be percent-encoded).
_REQUEST_LINE = re.compile(rf"({_TCHAR}+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r\n")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, no space before the colon. A
# value holds visible characters, obs-text, spaces and tabs (RFC 9110 §5.5): no other control
# character, no CR or LF, and no line may start with white space (obsolete line folding, §5.2).
# Trailing OWS is stripped after the match.
# The value must start with a visible character, so the leading OWS and the value cannot both
# claim a space: with overlapping classes, a long run of spaces makes the match backtrack
# quadratically (a request head that takes seconds to refuse).
_FIELD_LINE = re.compile(rf"^({_TCHAR}+):[ \t]*((?:[\x21-\x7e\x80-\xff][\t\x20-\x7e\x80-\xff]*)?)\r\n",
                         re.MULTILINE)
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
    """Parse the request line and header fields: `data` is the head up to and including the
    blank line (CRLF CRLF) that ends it.

    Two regular expressions check the whole head in C — one the request line, one every field
    line at once — so the loop in Python only collects the fields: this runs for every request,
    and is most of what a request costs before the handler."""
    text = data.decode("latin-1")
    request_line = _REQUEST_LINE.match(text)
    if request_line is None:
        line_end = text.find("\r\n")
        if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(text) > MAX_REQUEST_LINE):
            raise ProtocolError("request line too long", status=414)
        raise ProtocolError("malformed request line")
    if request_line.end() - 2 > MAX_REQUEST_LINE:
        raise ProtocolError("request line too long", status=414)
    method, target, version = request_line.groups()
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError("only HTTP/1.0 and HTTP/1.1 are supported", status=505)
    # RFC 9112 §3.2: origin-form (/path), asterisk-form (*), absolute-form (http://host/path)
    if target[0] not in "/*" and not target.startswith(("http://", "https://")):
        raise ProtocolError("malformed request target")
    start = request_line.end()
    fields = _FIELD_LINE.findall(text, start)
    lines = text.count("\r\n", start) - 1  # the last CRLF ends the head
    # Every line must be a well-formed field: as many matches as lines, and no LF outside a
    # CRLF (a bare LF would start a line the count does not see: a smuggled header field).
    too_long = len(text) > MAX_HEADER_LINE and any(
        len(line) > MAX_HEADER_LINE for line in text[start:].split("\r\n"))
    if too_long or len(fields) != lines or text.count("\n", start) != lines + 1:
        if lines > MAX_HEADER_COUNT:
            raise ProtocolError(f"more than {MAX_HEADER_COUNT} header fields", status=431)
        if too_long:
            raise ProtocolError("header field too large", status=431)
        raise ProtocolError("malformed header field")
    if lines > MAX_HEADER_COUNT:
        raise ProtocolError(f"more than {MAX_HEADER_COUNT} header fields", status=431)

    headers = {}
    for name, value in fields:
        key = name.lower()
        value = value.rstrip(" \t")
        if key in headers:  # RFC 9110 §5.3: repeated fields join with commas; Cookie with ";"
            if key == "host":  # RFC 9112 §3.2: more than one Host is a 400
                raise ProtocolError("more than one Host header")
            headers[key] += ("; " if key == "cookie" else ", ") + value
        else:
            headers[key] = value
    if version == "HTTP/1.1" and "host" not in headers:
        # RFC 9112 §3.2: a 1.1 request without Host is a 400. curl, browsers and every
        # library send one; only hand-typed requests miss it, and those get a clear answer.
        raise ProtocolError("HTTP/1.1 requests need a Host header")
    return RequestHead(method, target, version, headers)


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
    if content_length.isascii() and content_length.isdigit() and len(content_length) <= 18:
        return int(content_length)  # the usual case, one plain number, without the checks below
    values = {v.strip() for v in content_length.split(",")}  # "5, 5" is allowed (§8.6)
    if len(values) != 1:
        raise ProtocolError("conflicting Content-Length values")
    value = values.pop().encode("latin-1")
    if not _DIGITS.match(value) or len(value) > 18:
        raise ProtocolError("invalid Content-Length")
    return int(value)


class ContentLengthDecoder:
    """A body of `length` bytes (RFC 9112 §6.2), fed as it arrives; read `done`, `body` and
    `unused` (bytes after the body: the next pipelined request), as with `ChunkedDecoder`.
    With `on_data`, each piece of the body goes to it as it is decoded instead (a streamed
    body, never held whole), for both decoders."""

    def __init__(self, length, on_data=None):
        self.missing = length
        self.chunks = []
        self.on_data = on_data or self.chunks.append
        self.unused = b""

    @property
    def done(self):
        return self.missing == 0

    @property
    def body(self):
        return b"".join(self.chunks)

    def feed(self, data):
        piece = data[:self.missing]
        if piece:
            self.on_data(piece)
        self.missing -= len(piece)
        self.unused += data[len(piece):]


class ChunkedDecoder:
    """Decode a chunked body incrementally: feed bytes as they arrive, read `done`, `body`
    and `unused` (bytes after the body: the next pipelined request).

    A small state machine (RFC 9112 §7.1): SIZE line → DATA → CRLF → ... → size 0 → TRAILER
    lines → blank line → DONE. Two bounds make it safe against a hostile client:

    - linear time: each `feed` walks its bytes once with an offset and keeps only the unread
      tail, so a body sent as a million one-byte chunks costs no more per byte than one chunk
      (slicing the buffer after every chunk would copy it again and again: quadratic);
    - everything counts: chunk extensions (`5;name=value`, read and dropped) count against
      `limit` like data, so a small body cannot arrive as megabytes of framing.
    """

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self, limit, on_data=None):
        self.limit = limit
        self.state = self.SIZE
        self.remaining = 0
        self.chunks = []
        self.on_data = on_data or self.chunks.append
        self.size = 0          # data and extension bytes so far, against `limit`
        self.unused = b""      # bytes not yet decoded (after DONE: the next request)
        self.trailer_lines = 0

    @property
    def done(self):
        return self.state == self.DONE

    @property
    def body(self):
        return b"".join(self.chunks)

    def feed(self, data):
        buffer = self.unused + data if self.unused else data
        at, end = 0, len(buffer)
        while self.state != self.DONE and at < end:
            if self.state == self.DATA:
                piece = buffer[at:at + self.remaining]
                self.on_data(piece)
                self.remaining -= len(piece)
                at += len(piece)
                if self.remaining == 0:
                    self.state = self.DATA_END
                continue
            if self.state == self.DATA_END:
                if end - at < 2:
                    break
                if buffer[at:at + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                at += 2
                self.state = self.SIZE
                continue
            line_limit = MAX_CHUNK_LINE if self.state == self.SIZE else MAX_HEADER_LINE
            line_end = buffer.find(b"\r\n", at, at + line_limit + 2)
            if line_end < 0:
                if end - at > line_limit and self.state == self.SIZE:
                    raise ProtocolError("chunk line too long")
                if end - at > line_limit:
                    raise ProtocolError("trailer field too large", status=431)
                break
            line, at = buffer[at:line_end], line_end + 2
            if self.state == self.SIZE:
                self._start_chunk(line)
            elif line:  # a trailer field: read and dropped
                self.trailer_lines += 1
                if self.trailer_lines > MAX_HEADER_COUNT:
                    raise ProtocolError("too many trailer fields", status=431)
            else:
                self.state = self.DONE
        self.unused = buffer[at:]

    def _start_chunk(self, line):
        size_text, _, extensions = line.partition(b";")
        size_text = size_text.strip(b" \t")
        if not _HEX.match(size_text) or len(size_text) > 15:
            raise ProtocolError("invalid chunk size")
        size = int(size_text, 16)
        self.size += size + len(extensions)
        if self.size > self.limit:
            raise ContentTooLarge(f"request body over {self.limit} bytes")
        if size == 0:
            self.state = self.TRAILER
        else:
            self.remaining = size
            self.state = self.DATA


# --- responses ---------------------------------------------------------------------------

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {reason_phrase(s.value)}\r\n" for s in HTTPStatus}
_NO_BODY = frozenset({204, 304}) | frozenset(range(100, 200))  # RFC 9110 §6.4.1, §8.6


def http_date():
    """The `Date` field (RFC 9110 §6.6.1)."""
    return time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT\r\n", time.gmtime())


def status_line(status):
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status {status}\r\n"


def encode_head(status, headers, content_length, *, keep_alive=True):
    """The status line and header fields, as bytes. `content_length` None means the caller
    frames the body itself (chunked, or close-delimited)."""
    if not keep_alive:  # the transport says `close` once, whatever a handler set
        headers = [field for field in headers if field[0].lower() != "connection"]
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    # A CR, LF or NUL inside a value would let it write extra header lines (response
    # splitting); values come from code, but some carry user input (Location, filenames).
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers) or "\0" in fields:
        raise ValueError("line break or NUL in a response header value")
    if content_length is not None and status not in _NO_BODY:
        fields = f"{fields}Content-Length: {content_length}\r\n"
    if not keep_alive:
        fields += "Connection: close\r\n"
    return f"{status_line(status)}{http_date()}{fields}\r\n".encode("latin-1")


def encode_response(status, headers, body, *, head_only=False, keep_alive=True):
    """A whole response in one bytes object, so it goes out in one write: a head and a body
    written apart meet Nagle's algorithm and the client's delayed ACK, ~40 ms per answer. HEAD
    gets GET's Content-Length and no body (RFC 9110 §9.3.2)."""
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
