"""The request a handler sees: method, path, headers, query, body, and typed readers for them.

Readers raise the right 4xx themselves, so a handler reads `request.json()` and never parses or
checks a content type by hand: a wrong `Content-Type` is a 415, malformed JSON a 400, a missing
body where one is required a 411 (no length at all) or 422 (empty), a body that is not a JSON
object a 422 (common.md's table). A project that reads a query parameter of its own refuses a
bad one with `bad_query`, so every such 400 names its parameter the same way.

`utc_timestamp` writes the other direction's times: RFC 3339 UTC text, as common.md wants.
"""
import datetime
import json
import math
import re
import time
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote

from lib.problems import (BadRequest, LengthRequired, PreconditionFailed, UnprocessableContent,
                          UnsupportedMediaType)

_FULL_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # RFC 3339 full-date: exactly this shape


_FRACTION_DIGITS = {"seconds": 0, "milliseconds": 3, "microseconds": 6}


def utc_timestamp(when=None, *, timespec="seconds"):
    """`when` (an aware datetime, or seconds since the epoch; default now) as RFC 3339 UTC text,
    to the `timespec` of `datetime.isoformat`: 2026-11-24T06:41:00Z, …00.123Z ("milliseconds"),
    …00.123456Z ("microseconds"). Fixed width, so comparing two such texts compares the times.
    (`time.strftime` rather than a datetime: this runs for every access log line.)"""
    if isinstance(when, datetime.datetime):
        when = when.timestamp()
    seconds = time.time() if when is None else when
    whole = math.floor(seconds)
    micro = round((seconds - whole) * 1_000_000)  # to the microsecond, as a datetime would be
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    digits = _FRACTION_DIGITS[timespec]
    if digits:  # then truncated, as isoformat does
        text += ".%0*d" % (digits, micro // 10 ** (6 - digits))
    return text + "Z"


def bad_query(name, message):
    """The 400 for query parameter `name` (common.md): `message` says what a good value is."""
    return BadRequest(f"query parameter '{name}' {message}",
                      errors=[{"field": name, "message": message}])



class Query(NamedTuple):
    """A query parameter a route declares (`query=[...]`): `/openapi.json` shows its `schema`
    and the handler reads it with `read(request)`, so the document says what is enforced.
    `kind`: str, int (from `low` to `high`), bool, datetime.date, a tuple of the choices, or the
    JSON Schema of a text the handler checks itself (`{"pattern": ...}`)."""
    name: str
    description: str
    kind: object = str
    default: object = None
    low: int = None
    high: int = None

    @property
    def schema(self):
        if self.kind is int:
            return {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.kind is bool:
            return {"type": "boolean"}
        if self.kind is datetime.date:
            return {"type": "string", "format": "date"}
        if isinstance(self.kind, tuple):
            return {"type": "string", "enum": list(self.kind)}
        return {"type": "string", **(self.kind if isinstance(self.kind, dict) else {})}

    def read(self, request):
        if self.kind is int:
            return request.query_int(self.name, self.default, low=self.low, high=self.high)
        if self.kind is bool:
            return request.query_bool(self.name, self.default)
        if self.kind is datetime.date:
            return request.query_date(self.name, self.default)
        if isinstance(self.kind, tuple):
            return request.query_choice(self.name, self.kind, self.default)
        return request.query_param(self.name, self.default)


def _is_plain_integer(text):
    """ASCII digits with an optional minus: what `int()` takes besides (`+5`, `1_0`, ` 5`,
    Arabic-Indic digits) would give one value several spellings."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _refuse_constant(name):
    # NaN and Infinity are not JSON (RFC 8259 §6), though Python's parser takes them.
    raise ValueError(f"{name} is not a JSON value")


# One decoder, made once: `json.loads(..., parse_constant=...)` builds a new one per call.
_decode_json = json.JSONDecoder(parse_constant=_refuse_constant).decode


class Request:
    __slots__ = ("method", "path", "query_string", "headers", "body", "has_body", "client",
                 "path_params", "route", "request_id", "app", "context", "_query")

    def __init__(self, method, path, query_string="", headers=None, body=b"", *, has_body=False,
                 client=("", 0), app=None):
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers or {}   # lower-cased names
        self.body = body
        self.has_body = has_body       # the request framed a body (Content-Length or chunked)
        self.client = client           # (ip, port) of the peer
        self.path_params = {}
        self.route = None              # the matched Route, for middleware that reads its metadata
        self.request_id = ""
        self.app = app
        self.context = {}              # what middleware learns about the request (e.g. the user)
        self._query = None

    @classmethod
    def from_head(cls, head, body, has_body, client, app):
        return cls(head.method, unquote(head.path), head.query_string, head.headers, body,
                   has_body=has_body, client=client, app=app)

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    # --- query string -------------------------------------------------------------------

    @property
    def query(self):
        """Query parameters as a dict of lists (`?tag=a&tag=b` → {"tag": ["a", "b"]})."""
        if self._query is None:
            query = {}
            try:
                pairs = parse_qsl(self.query_string, keep_blank_values=True, max_num_fields=200,
                                  errors="strict")
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("malformed query string") from None
            for name, value in pairs:
                query.setdefault(name, []).append(value)
            self._query = query
        return self._query

    def query_param(self, name, default=None):
        """The last value of one query parameter, or `default`."""
        values = self.query.get(name)
        return values[-1] if values else default

    def query_int(self, name, default, *, low, high):
        """An integer query parameter within [low, high]; anything else is a 400 naming it."""
        text = self.query_param(name)
        if text is None or text == "":
            return default
        try:
            value = int(text) if _is_plain_integer(text) else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise bad_query(name, f"must be an integer from {low} to {high}")
        return value

    def query_choice(self, name, choices, default=None):
        """A query parameter that must be one of `choices` (e.g. a `sort`): else a 400."""
        value = self.query_param(name)
        if value is None or value == "":
            return default
        if value not in choices:
            raise bad_query(name, "must be one of: " + ", ".join(choices))
        return value

    def query_bool(self, name, default=None):
        """A boolean query parameter, written `true` or `false` as in JSON: else a 400 naming it
        (`1`, `yes` and `True` are refused, not guessed at)."""
        value = self.query_param(name)
        if value is None or value == "":
            return default
        if value not in ("true", "false"):
            raise bad_query(name, "must be true or false")
        return value == "true"

    def query_date(self, name, default=None):
        """A calendar date query parameter written YYYY-MM-DD (RFC 3339 full-date), as a
        `datetime.date`. A malformed or impossible date (2026-02-30) is a 400 naming it."""
        value = self.query_param(name)
        if value is None or value == "":
            return default
        try:  # fromisoformat alone would also take 20260101 and 2026-W01-1
            date = datetime.date.fromisoformat(value) if _FULL_DATE.fullmatch(value) else None
        except ValueError:
            date = None
        if date is None:
            raise bad_query(name, "must be a real date written YYYY-MM-DD")
        return date

    # --- body ---------------------------------------------------------------------------

    @property
    def content_type(self):
        """The media type without parameters, lower-cased (`application/json`)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def _require_body(self, required):
        if self.body:
            return True
        if not required:
            return False
        if not self.has_body:
            raise LengthRequired("this request needs a body with Content-Length or chunked encoding")
        raise UnprocessableContent("the request body is empty")

    def json(self, *, required=True):
        """The body as JSON. With `required=False` an absent or empty body gives None."""
        if not self._require_body(required):
            return None
        media = self.content_type
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType("send the body as Content-Type: application/json")
        try:
            # RFC 8259 §8.1: JSON between systems is UTF-8. Decoding first refuses UTF-16/32
            # (which json.loads would guess at) and encoded surrogates.
            text = self.body.decode("utf-8")
            # A leading byte order mark may be ignored (§8.1).
            return _decode_json(text[1:] if text.startswith("\ufeff") else text)
        except UnicodeDecodeError:
            raise BadRequest("the body is not valid UTF-8") from None
        except RecursionError:
            raise BadRequest("the JSON body is nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, and ints past the digit limit
            raise BadRequest(f"malformed JSON: {err}") from None

    def json_object(self, *, required=True):
        """The body as a JSON object (dict): an array, a scalar or `null` is a 422. An absent
        optional body reads as {}."""
        data = self.json(required=required)
        if data is None and not self.body:
            return {}
        if not isinstance(data, dict):
            raise UnprocessableContent("the JSON body must be an object")
        return data

    def form(self):
        """An `application/x-www-form-urlencoded` body as a dict (last value wins)."""
        if self.content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType("send the form as application/x-www-form-urlencoded")
        try:
            text = self.body.decode("utf-8")
            return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=200, errors="strict"))
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("malformed form body") from None

    def fields(self):
        """The body as a dict, from JSON or from an HTML form: for endpoints that browsers post
        to directly as well as API clients."""
        if self.content_type == "application/x-www-form-urlencoded":
            return self.form()
        return self.json_object()

    @property
    def cookies(self):
        """The `Cookie` header as a dict (RFC 6265 §5.4: `name=value; name2=value2`)."""
        cookies = {}
        for pair in self.headers.get("cookie", "").split(";"):
            name, eq, value = pair.partition("=")
            name = name.strip()
            if eq and name and name not in cookies:  # the first one is the most specific path
                cookies[name] = value.strip().strip('"')
        return cookies

    # --- conditional requests (RFC 9110 §13) ----------------------------------------------

    def require_if_match(self, current_etag):
        """Optimistic concurrency: with `If-Match`, go on only if the client saw the current
        version; a stale tag is a 412 and nothing changes. Without `If-Match`, go on."""
        header = self.headers.get("if-match")
        if header is None:
            return
        if header.strip() == "*" and current_etag is not None:
            return
        tags = [tag.strip() for tag in header.split(",")]
        # Strong comparison (§8.8.3.2): weak tags (W/"…") never match.
        if current_etag is None or current_etag not in tags:
            raise PreconditionFailed(f"the resource has changed; its current ETag is {current_etag}")

    def if_none_match(self, current_etag):
        """True when the client's cached copy is current (answer 304). Weak comparison."""
        header = self.headers.get("if-none-match")
        if header is None or current_etag is None:
            return False
        if header.strip() == "*":
            return True
        bare = current_etag.removeprefix("W/")
        return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))
