"""multipart/form-data (RFC 7578), parsed as it arrives, with no I/O.

A form is a sequence of parts between lines made of a boundary the client chose (and named in
the Content-Type): each part is a small head, whose Content-Disposition names the form field
(and, for a file, its file name), then a blank line, then its content:

    --BOUNDARY\r\n
    Content-Disposition: form-data; name="file"; filename="cat.png"\r\n
    Content-Type: image/png\r\n
    \r\n
    <the bytes of cat.png>\r\n
    --BOUNDARY--\r\n

Feed the body in pieces as they arrive; `feed` returns what they completed, as events: a `Part`
when a head is read, `bytes` of its content (in as many pieces as the content arrived in), and
`PART_END`. A file is never held whole: the parser keeps back only the last bytes of a piece
that may be the start of a boundary, so it can stream any size to disk in constant memory.
The client's file name is returned as sent: it is data, never a path (the caller decides).
"""
import re
from typing import NamedTuple
from urllib.parse import unquote

from lib.problems import BadRequest, UnsupportedMediaType

PART_END = "part end"
MAX_PART_HEAD = 8 * 1024   # the head of one part, in bytes
MAX_PARTS = 100
MAX_LINE = 1000            # a boundary line with its transport padding (RFC 2046 §5.1.1)

# `; name=value` or `; name="quoted \"value\""` (RFC 9110 §5.6.6), as in Content-Type and
# Content-Disposition.
_PARAM = re.compile(r';[ \t]*([^\s=;"]+)[ \t]*=[ \t]*("(?:[^"\\\r\n]|\\.)*"|[^\s;"]*)[ \t]*')
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046


class Part(NamedTuple):
    name: str
    filename: str | None  # None for a plain form field
    content_type: str     # the client's claim, lower-cased ("text/plain" when it made none)
    headers: dict


def parameters(value):
    """The `(value, {name: parameter})` of a header such as `form-data; name="file"`."""
    main, _, rest = value.partition(";")
    params, at = {}, 0
    rest = ";" + rest if rest else ""
    while at < len(rest):
        match = _PARAM.match(rest, at)
        if not match:
            raise BadRequest(f"malformed header parameters: {value!r}")
        name, text = match.group(1).lower(), match.group(2)
        params[name] = re.sub(r"\\(.)", r"\1", text[1:-1]) if text.startswith('"') else text
        at = match.end()
    return main.strip().lower(), params


def boundary(content_type):
    """The boundary of a `multipart/form-data` Content-Type, as bytes (415 for another type)."""
    media, params = parameters(content_type)
    if media != "multipart/form-data":
        raise UnsupportedMediaType("send files as multipart/form-data")
    value = params.get("boundary", "")
    if not _BOUNDARY.fullmatch(value):
        raise BadRequest("multipart/form-data needs a boundary of 1 to 70 allowed characters")
    return value.encode("ascii")


class MultipartParser:
    """The parts of one multipart body, as a state machine over its bytes (see the module
    docstring): PREAMBLE (before the first boundary) → BOUNDARY (the rest of a boundary line)
    → HEAD → CONTENT → BOUNDARY → … → DONE, after `--BOUNDARY--`."""

    PREAMBLE, BOUNDARY, HEAD, CONTENT, DONE = range(5)

    def __init__(self, boundary):
        self.delimiter = b"\r\n--" + boundary
        # The first boundary need not follow a line break: begin with one, and every boundary
        # is the same delimiter.
        self.buffer = bytearray(b"\r\n")
        self.state = self.PREAMBLE
        self.parts = 0

    @property
    def done(self):
        return self.state == self.DONE

    def feed(self, data):
        """The events that `data` completes: Part, bytes of its content, PART_END."""
        self.buffer += data
        events = []
        while self.state != self.DONE and self._step(events):
            pass
        return events

    def close(self):
        """The body has ended: it must have ended the form too."""
        if self.state != self.DONE:
            raise BadRequest("the multipart body ends before its closing boundary")

    def _step(self, events):
        """One step of the machine; False when it needs more bytes."""
        buffer = self.buffer
        if self.state in (self.PREAMBLE, self.CONTENT):
            at = buffer.find(self.delimiter)
            keep = len(self.delimiter) - 1 if at < 0 else 0  # may be a boundary's beginning
            end = at if at >= 0 else max(0, len(buffer) - keep)
            if self.state == self.CONTENT and end:
                events.append(bytes(buffer[:end]))
            if at < 0:
                del buffer[:end]
                return False
            if self.state == self.CONTENT:
                events.append(PART_END)
            del buffer[:at + len(self.delimiter)]
            self.state = self.BOUNDARY
            return True
        if self.state == self.BOUNDARY:
            if buffer[:2] == b"--":
                self.state = self.DONE  # what follows is the epilogue, ignored
                return True
            line_end = buffer.find(b"\r\n", 0, MAX_LINE)
            if line_end < 0:
                if len(buffer) >= MAX_LINE:
                    raise BadRequest("malformed multipart boundary line")
                return False
            if buffer[:line_end].strip(b" \t"):
                raise BadRequest("malformed multipart boundary line")
            del buffer[:line_end]  # keep the CRLF: a head with no fields is then CRLF CRLF
            self.state = self.HEAD
            return True
        head_end = buffer.find(b"\r\n\r\n", 0, MAX_PART_HEAD)
        if head_end < 0:
            if len(buffer) >= MAX_PART_HEAD:
                raise BadRequest(f"a multipart part's head is over {MAX_PART_HEAD} bytes")
            return False
        events.append(self._part(bytes(buffer[2:head_end])))
        del buffer[:head_end + 4]
        self.state = self.CONTENT
        return True

    def _part(self, head):
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"a form of more than {MAX_PARTS} parts")
        headers = {}
        try:
            for line in head.decode("utf-8").split("\r\n") if head else ():
                name, colon, value = line.partition(":")
                if not colon or not name or name != name.strip():
                    raise BadRequest(f"malformed multipart header line: {line!r}")
                headers[name.lower()] = value.strip(" \t")
            disposition, params = parameters(headers.get("content-disposition", ""))
            filename = params.get("filename")
            encoded = params.get("filename*", "")  # RFC 5987's form: utf-8''caf%C3%A9.txt
            if encoded.lower().startswith("utf-8''"):
                filename = unquote(encoded[7:], errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("a multipart part's head is not valid UTF-8") from None
        if disposition != "form-data" or "name" not in params:
            raise BadRequest('each part needs "Content-Disposition: form-data; name=…"')
        content_type = parameters(headers.get("content-type", "text/plain"))[0]
        return Part(params["name"], filename, content_type, headers)
