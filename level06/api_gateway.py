"""API gateway — one entry point in front of the other services, on asyncio streams.

What it teaches
  - Routing by the longest matching path prefix, from a JSON file (`--config`), checked at
    start: a bad file stops the gateway (exit 2) with the reason, never a surprise at request
    time.
  - A reverse proxy (RFC 9110 §7.6, RFC 9112): the method, path, query, headers and body go
    upstream and the answer comes back, both bodies streamed piece by piece (a body never has
    to fit in memory), each message re-framed by the gateway rather than its framing headers
    copied (that copying is how request smuggling passes a proxy). Hop-by-hop fields are
    removed, including those `Connection` names (RFC 9110 §7.6.1); `X-Forwarded-For`,
    `-Proto`, `-Host` and `Via` say who really asked; one `X-Request-Id` follows the request
    from the client to the upstream and back. Upstream connections are kept alive and reused.
  - A body cut off mid-way is never passed on as complete: a client's cut-off body closes the
    upstream connection; an upstream's cut-off answer is a 502 if nothing was sent yet, else
    the client's connection closes short of the answer's end, so the client sees it broken.
  - Identity at the edge: `auth: "jwt"` routes verify the bearer token with level03/jwt_auth
    (imported) and send its `sub` upstream as `X-User-Id`; a client's own `X-User-Id` is always
    dropped, so it cannot be forged.
  - Limits per client with level06/rate_limiter (imported): per user on jwt routes, else per
    peer address (never a client's `X-Forwarded-For`), with the IETF `RateLimit` headers.
  - Failure as the normal case: round-robin over the healthy upstreams; active health checks
    (`GET /health` every `--health-s`) and passive ones (a refused connection) take an
    upstream out and put it back; down → 502, too slow → 504, none healthy → 503; a circuit
    breaker per upstream (closed → open → half-open → closed) stops hammering one that fails.

Left out: HTTPS (upstream and client), HTTP/2, WebSocket and other `Upgrade` tunnels,
retries of requests that reached an upstream, weighted or least-connections balancing,
response caching, config reload. api_gateway.md's "In production" says who does those.

    python level06/api_gateway.py [--config level06/api_gateway.json] [--health-s 5]
                                  [--secret S] [--breaker-failures 5] [--breaker-open-s 5]
"""
import asyncio
import enum
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from level03.jwt_auth import (MIN_SECRET_BYTES, InvalidToken, TokenSettings, bearer_token,
                              invalid_token, verify_access_token)
from level06.rate_limiter import ALGORITHMS, Limiter, log_limit_problem, parse_policy, rate_limit
from lib import (App, BadRequest, HTTPError, ServiceUnavailable, StreamingResponse,
                 Unauthorized, trace_event)
from lib.app import bounded, exit_usage_error
from lib.asyncio_server import AsyncioServer
from lib.protocol import CHUNKED, ChunkedDecoder, ContentLengthDecoder, encode_chunk
from lib.response import Response, problem_response
from lib.routing import Route


DEFAULT_CONFIG = Path(__file__).resolve().with_suffix(".json")
VIA = "1.1 api_gateway"           # RFC 9110 §7.6.3: protocol and a pseudonym for this hop
OWN_PATHS = ("/", "/health", "/openapi.json")  # the gateway's own, whatever the config says
POOL_IDLE_MAX = 64                # idle keep-alive connections kept per upstream
POOL_IDLE_S = 10.0                # … for at most this long (lib's servers close theirs at 15 s)
MAX_RESPONSE_HEAD = 64 * 1024
WHOLE_ANSWER_MAX = 64 * 1024      # a complete answer this small is sent in one write
READ_SIZE = 64 * 1024
PIECES_WAITING = 16                # pieces of a request body held for a slow upstream (≤ 1 MiB)
NO_LIMIT = 1 << 62                # an upstream's chunked answer is relayed, never held: no cap


class Gateway(App):
    """lib's App, with the proxied paths taken before its router sees them."""

    def plan(self, request):
        """Proxied paths are matched here, before lib's router (which knows only the gateway's
        own routes, those of its OpenAPI document): the proxy's body limit and body sink then
        apply from the head on."""
        path = request.path
        if path not in OWN_PATHS and path != "/gateway" and not path.startswith("/gateway/"):
            route = route_for(self.state.routes, path)
            if route is not None:
                request.route, request.path_params = self.state.proxy, {}
                request.context["gateway_route"] = route
                return self.state.proxy.body_limit, False
        return super().plan(request)


app = Gateway("api_gateway", "One entry point in front of the other services: routes, "
              "streamed proxying, JWT at the edge, rate limits, health checks and circuit "
              "breakers.", port=8021)


# =============================================================================================
# The config: routes, checked at start
# =============================================================================================

class ConfigError(Exception):
    """What is wrong with the config file, said so that a person can fix it."""


class Upstream:
    """One upstream of one route, with what the gateway knows about it."""

    def __init__(self, url, host, port, breaker):
        self.url, self.host, self.port = url, host, port
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.healthy = True       # until a check says otherwise
        self.breaker = breaker
        self.idle = []            # kept-alive connections: (reader, writer, idle since)


class GatewayRoute:
    """A prefix, its upstreams, and how requests to it are treated."""

    def __init__(self, prefix, upstreams, strip_prefix, auth, rate_limit, policy, timeout_s):
        self.prefix = prefix
        self.upstreams = upstreams
        self.strip_prefix = strip_prefix
        self.auth = auth
        self.rate_limit = rate_limit  # as the config says it ("100/min"), or None
        self.policy = policy      # … as a rate_limiter Policy
        self.timeout_s = timeout_s
        self.enforce_limit = None  # the rate limiter's middleware for this route, if limited
        self.turn = 0             # round-robin position

    def matches(self, path):
        """Whole segments only: `/notes` takes `/notes` and `/notes/7`, never `/notesx`."""
        return path == self.prefix or path.startswith(self.prefix.rstrip("/") + "/")

    def upstream_path(self, path):
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix.rstrip("/")):]
        return rest if rest.startswith("/") else "/" + rest

    def describe(self):
        return {"prefix": self.prefix, "upstreams": [u.url for u in self.upstreams],
                "strip_prefix": self.strip_prefix, "auth": self.auth,
                "rate_limit": self.rate_limit, "timeout_s": self.timeout_s}


ROUTE_FIELDS = {"prefix", "upstreams", "strip_prefix", "auth", "rate_limit", "timeout_s"}


def load_config(path, *, algorithm, breaker):
    """The routes of the JSON file at `path`, longest prefix first; ConfigError naming the
    first problem (its route and field) otherwise. `breaker()` makes each upstream's breaker."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("routes"), list) \
            or not config["routes"]:
        raise ConfigError(f'{path}: expected {{"routes": [ ...at least one route... ]}}')
    routes, prefixes = [], set()
    for number, entry in enumerate(config["routes"], 1):
        where = f"{path}: route {number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object")
        where = f"{path}: route {number} ({entry.get('prefix')!r})"
        if unknown := set(entry) - ROUTE_FIELDS:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} "
                              f"(fields: {', '.join(sorted(ROUTE_FIELDS))})")
        prefix = entry.get("prefix")
        if not isinstance(prefix, str) or not re.fullmatch(r"/[\x21-\x7e]*", prefix) \
                or "?" in prefix or "#" in prefix:
            raise ConfigError(f"{where}: prefix must be a path starting with / (like /notes)")
        if prefix == "/gateway" or prefix.startswith("/gateway/"):
            raise ConfigError(f"{where}: prefix /gateway is the gateway's own")
        if prefix in prefixes:
            raise ConfigError(f"{where}: prefix {prefix} is already routed")
        prefixes.add(prefix)
        urls = entry.get("upstreams")
        if not isinstance(urls, list) or not urls:
            raise ConfigError(f"{where}: upstreams must be a list of at least one URL")
        upstreams = [parse_upstream(url, f"{where}: upstream {url!r}", breaker) for url in urls]
        strip_prefix = entry.get("strip_prefix", False)
        if not isinstance(strip_prefix, bool):
            raise ConfigError(f"{where}: strip_prefix must be true or false")
        auth = entry.get("auth", "none")
        if auth not in ("none", "jwt"):
            raise ConfigError(f'{where}: auth must be "none" or "jwt"')
        rate_limit, policy = entry.get("rate_limit"), None
        if rate_limit is not None:
            if not isinstance(rate_limit, str):
                raise ConfigError(f'{where}: rate_limit must be null or a string like "100/min"')
            try:
                policy = parse_policy(rate_limit, algorithm)
            except ValueError as error:
                raise ConfigError(f"{where}: rate_limit {error}") from None
            if problem := log_limit_problem(policy):
                raise ConfigError(f"{where}: rate_limit: {problem}")
        timeout_s = entry.get("timeout_s", 5)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not 0 < timeout_s <= 3600:
            raise ConfigError(f"{where}: timeout_s must be a number of seconds, above 0 and "
                              f"at most 3600")
        routes.append(GatewayRoute(prefix, upstreams, strip_prefix, auth, rate_limit, policy,
                                   float(timeout_s)))
    return sorted(routes, key=lambda route: len(route.prefix), reverse=True)


def parse_upstream(url, where, breaker):
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port = parts and (parts.port or 80)
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "http" or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{where} must be http://HOST:PORT (no path, query or user; the "
                          f"gateway speaks plain HTTP/1.1 upstream)")
    return Upstream(url.rstrip("/"), parts.hostname, port, breaker())


def route_for(routes, path):
    """The longest prefix that matches (the routes are sorted longest first)."""
    for route in routes:
        if route.matches(path):
            return route
    return None


# =============================================================================================
# The circuit breaker: a state per upstream and one table of its transitions
# =============================================================================================

class BreakerState(enum.Enum):
    CLOSED = "closed"          # requests flow; consecutive failures are counted
    OPEN = "open"              # nothing is sent, for --breaker-open-s
    HALF_OPEN = "half_open"    # one trial request is let through


class Outcome(enum.Enum):
    TRIPPED = 0      # the failures reached --breaker-failures
    COOLED = 1       # --breaker-open-s passed
    SUCCEEDED = 2    # the trial got a valid answer in time
    FAILED = 3       # the trial did not


B, O = BreakerState, Outcome
BREAKER_TRANSITIONS = {
    (B.CLOSED, O.TRIPPED): B.OPEN,
    (B.OPEN, O.COOLED): B.HALF_OPEN,
    (B.HALF_OPEN, O.SUCCEEDED): B.CLOSED,
    (B.HALF_OPEN, O.FAILED): B.OPEN,
}


class Breaker:
    """Counts consecutive failures (no valid answer in time) of one upstream; at `threshold`
    it opens and the upstream gets nothing for `open_s`; then one trial request decides."""

    def __init__(self, threshold, open_s, clock=time.monotonic):
        self.threshold, self.open_s, self.clock = threshold, open_s, clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.trial_out = False    # half-open: the one trial request is under way

    def _move(self, outcome):
        self.state = BREAKER_TRANSITIONS[self.state, outcome]
        if self.state is BreakerState.OPEN:
            self.opened_at = self.clock()
        self.trial_out = False

    def current(self):
        """The state now (an open breaker whose time is up is half-open)."""
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.open_s:
            self._move(Outcome.COOLED)
        return self.state

    def take(self):
        """May a request go to this upstream now? In half-open, only the first may (the trial)."""
        state = self.current()
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.trial_out:
            self.trial_out = True
            return True
        return False

    def reopens_in(self):
        return max(0.0, self.opened_at + self.open_s - self.clock())

    def succeeded(self):
        self.failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self._move(Outcome.SUCCEEDED)

    def failed(self):
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._move(Outcome.FAILED)
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._move(Outcome.TRIPPED)

    def abandoned(self):
        """The request ended with no verdict (its client left): a trial may be made again."""
        if self.state is BreakerState.HALF_OPEN:
            self.trial_out = False


def choose_upstream(route):
    """Round-robin over the upstreams that are healthy and whose breaker lets a request
    through; none → 503, with Retry-After when a breaker will let one through soon."""
    upstreams = route.upstreams
    for step in range(len(upstreams)):
        upstream = upstreams[(route.turn + step) % len(upstreams)]
        if upstream.healthy and upstream.breaker.take():
            route.turn = (route.turn + step + 1) % len(upstreams)
            return upstream
    healthy = [u for u in upstreams if u.healthy]
    if not healthy:
        raise ServiceUnavailable(f"no healthy upstream for {route.prefix}", retry_after=1)
    raise ServiceUnavailable(f"every healthy upstream of {route.prefix} has its circuit open",
                             retry_after=min(u.breaker.reopens_in() for u in healthy))


# =============================================================================================
# Headers: what crosses the gateway, in each direction
# =============================================================================================

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded (plus any that
# `Connection` names). Keep-Alive, Proxy-Connection and TE/Trailer/Upgrade by RFC 9112 and
# common practice; Content-Length and Transfer-Encoding because the gateway frames each
# message itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate",
                        "proxy-authorization", "content-length"})
# Set by the gateway alone: a client's own would be believed upstream. `Expect` is answered
# here (lib sends 100 Continue), so the upstream must not wait to say it again.
SET_BY_GATEWAY = frozenset({"host", "x-user-id", "x-request-id", "x-forwarded-for",
                            "x-forwarded-proto", "x-forwarded-host", "forwarded", "expect", "via"})
# An answer's fields that lib writes itself for the client (its own Date and request id).
SET_FOR_CLIENT = frozenset({"date", "x-request-id", "via"})
_SUB_AS_HEADER = re.compile(r"[\x20-\x7e]{1,256}\Z")


def connection_named(value):
    return {name.strip().lower() for name in (value or "").split(",") if name.strip()}


def upstream_request_head(request, route, upstream, framing):
    """The request head sent upstream: re-framed by the gateway (`framing` is the body's
    length, CHUNKED or None), hop-by-hop fields out, the forwarding fields in."""
    dropped = HOP_BY_HOP | SET_BY_GATEWAY | connection_named(request.headers.get("connection"))
    fields = [(name, value) for name, value in request.headers.items() if name not in dropped]
    fields.append(("Host", upstream.authority))
    if framing == CHUNKED:
        fields.append(("Transfer-Encoding", "chunked"))
    elif framing is not None:
        fields.append(("Content-Length", str(framing)))
    # The gateway is the edge: it trusts no proxy in front of it, so the peer's address is the
    # whole X-Forwarded-For, and what a client wrote there is dropped, never passed on.
    fields += [("X-Forwarded-For", request.client[0]), ("X-Forwarded-Proto", "http"),
               ("X-Request-Id", request.request_id)]
    if "host" in request.headers:
        fields.append(("X-Forwarded-Host", request.headers["host"]))
    via = request.headers.get("via")
    fields.append(("Via", f"{via}, {VIA}" if via else VIA))
    if "user_id" in request.context:
        fields.append(("X-User-Id", request.context["user_id"]))
    # The path the gateway routed on, %-encoded again: what the upstream sees is what was checked
    target = quote(route.upstream_path(request.path), safe="/:@!$&'()*+,;=")
    if request.query_string:
        target += "?" + request.query_string
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return f"{request.method} {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1")


def client_answer_headers(fields):
    """An upstream answer's fields as they go to the client: hop-by-hop ones out, Via in."""
    named = set()
    for name, value in fields:
        if name.lower() == "connection":
            named |= connection_named(value)
    dropped = HOP_BY_HOP | SET_FOR_CLIENT | named
    kept = [(name, value) for name, value in fields if name.lower() not in dropped]
    via = ", ".join(value for name, value in fields if name.lower() == "via")
    kept.append(("Via", f"{via}, {VIA}" if via else VIA))
    return kept


# =============================================================================================
# Upstream answers on the wire: the status line, the fields, the framing (RFC 9112)
# =============================================================================================

class BadAnswer(Exception):
    """An upstream answer the gateway cannot pass on as it came."""


# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-9][0-9]{2}) ?[\t\x20-\x7e\x80-\xff]*\r\n")
# As lib.protocol's: the value starts with a visible character, so no run of spaces can be
# claimed two ways (which would make a long one backtrack quadratically); trailing OWS is
# stripped after the match.
_FIELD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
                         r"((?:[\x21-\x7e\x80-\xff][\t\x20-\x7e\x80-\xff]*)?)\r\n")


def parse_answer_head(data):
    """(version minor, status, [(name, value)]) of an upstream answer's head, fields in order
    and repeated ones kept apart (joining two Set-Cookie fields with a comma would break them)."""
    text = data.decode("latin-1")
    status_line = _STATUS_LINE.match(text)
    if status_line is None:
        raise BadAnswer("malformed status line")
    fields, at = [], status_line.end()
    while at < len(text) - 2:
        field = _FIELD_LINE.match(text, at)
        if field is None:
            raise BadAnswer("malformed header field")
        fields.append((field.group(1), field.group(2).rstrip(" \t")))
        at = field.end()
    return int(status_line.group(1)), int(status_line.group(2)), fields


def answer_framing(method, status, fields):
    """How the answer's body is framed (RFC 9112 §6.3): 0 (none), a length, CHUNKED, or None
    (until the upstream closes). Both Content-Length and Transfer-Encoding is refused, as from
    a client: it is how a smuggled answer would pass."""
    if method == "HEAD" or status in (204, 304) or status < 200:
        return 0
    lengths = {value.strip() for name, value in fields if name.lower() == "content-length"}
    codings = [value for name, value in fields if name.lower() == "transfer-encoding"]
    if codings and lengths:
        raise BadAnswer("both Content-Length and Transfer-Encoding")
    if codings:
        return CHUNKED if ", ".join(codings).lower().replace(" ", "").endswith("chunked") else None
    if not lengths:
        return None
    if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(lengths))):
        raise BadAnswer("invalid Content-Length")
    return int(lengths.pop())


# =============================================================================================
# Upstream connections: a keep-alive pool per upstream
# =============================================================================================

async def open_upstream(upstream, metrics):
    """A connection to `upstream`: an idle kept-alive one if it still looks open, else a new
    one. Returns (reader, writer, reused)."""
    now = time.monotonic()
    while upstream.idle:
        reader, writer, since = upstream.idle.pop()  # the most recent: the least likely stale
        if now - since < POOL_IDLE_S and not reader.at_eof() and not writer.is_closing():
            metrics["connections_reused"] += 1
            return reader, writer, True
        writer.transport.abort()
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port,
                                                   limit=MAX_RESPONSE_HEAD)
    metrics["connections_opened"] += 1
    return reader, writer, False


def keep_upstream(upstream, reader, writer):
    if len(upstream.idle) < POOL_IDLE_MAX and not writer.is_closing():
        upstream.idle.append((reader, writer, time.monotonic()))
    else:
        writer.transport.abort()


async def read_answer_head(reader):
    """The next final answer's head: 1xx interim answers are read and dropped (the gateway
    answered the client's `Expect` itself)."""
    while True:
        try:
            data = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise BadAnswer("answer head too large") from None
        minor, status, fields = parse_answer_head(data)
        if status >= 200:
            return minor, status, fields
        if status == 101:
            raise BadAnswer("the upstream switched protocols, which the gateway does not proxy")


class UpstreamFailure(Exception):
    """No valid answer from an upstream; `error` is what the client is answered."""

    def __init__(self, error):
        super().__init__(error.detail)
        self.error = error


# =============================================================================================
# One proxied exchange: the request out, the answer back
# =============================================================================================

class ProxiedResponse(StreamingResponse):
    """The answer of a proxied request, known once the upstream's head arrives: the handler
    returns it at once (lib's middleware adds its fields: request id, RateLimit …), the
    gateway's transport awaits `settle()` before sending anything, and the body is relayed
    from the upstream as lib sends `chunks`.

    A request with a body starts at once, while the body still arrives: its pieces go upstream
    as lib hands them over (`RequestBodyPipe`)."""

    def __init__(self, request, route, upstream, framing):
        super().__init__(None, status=502, content_type=None)
        self.request, self.route, self.upstream, self.framing = request, route, upstream, framing
        self.metrics = request.app.state.metrics
        self.head = upstream_request_head(request, route, upstream, framing)
        self.chunks = self._relay()
        self.reader = self.writer = None
        self.answer_fields = []
        self.answer_framing = None
        self.reusable = False
        self.verdict_given = False
        self.pieces = asyncio.Queue() if framing is not None else None
        self.piece_taken = asyncio.Event()  # the upstream took a piece, or the exchange ended
        self.exchange = asyncio.ensure_future(self._exchange()) if framing is not None else None
        if self.exchange is not None:
            self.exchange.add_done_callback(lambda _: self.piece_taken.set())

    # --- the request -------------------------------------------------------------------------

    async def _exchange(self):
        """Send the request, read the answer's head (and a small answer whole) within the
        route's `timeout_s`; an UpstreamFailure when there is no valid answer."""
        timeout, url = self.route.timeout_s, self.upstream.url
        phase = "connect"
        try:
            async with asyncio.timeout(timeout) as deadline:
                for attempt in (1, 2):
                    phase = "connect"
                    self.reader, self.writer, reused = await open_upstream(self.upstream,
                                                                           self.metrics)
                    phase = "answer"
                    try:
                        self.writer.write(self.head)
                        if self.pieces is not None:
                            await self._send_body(deadline, timeout)
                        minor, status, fields = await read_answer_head(self.reader)
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        # A kept-alive connection the upstream closed as it was reused: nothing
                        # reached it, so a request without a body may go again on a fresh one.
                        if not (reused and self.pieces is None and attempt == 1):
                            raise
                        self.writer.transport.abort()
                self.answer_framing = length = answer_framing(self.request.method, status, fields)
                if length != CHUNKED and length is not None and length <= WHOLE_ANSWER_MAX \
                        and self.request.method != "HEAD":
                    # Small and framed: read whole, so a cut-off one is still a clean 502, and
                    # the answer goes out in one write.
                    phase = "body"
                    self.body = await self.reader.readexactly(length)
        except TimeoutError:
            raise self._failure("timeout", 504, f"upstream {url} did not "
                                f"{'accept a connection' if phase == 'connect' else 'answer'} "
                                f"within {timeout:g} s") from None
        except OSError as error:
            if phase == "connect":
                self.upstream.healthy = False  # passive health check: it refuses connections
                raise self._failure("connect", 502, f"upstream {url} is unreachable "
                                                    f"({error.__class__.__name__})") from None
            raise self._failure("bad_answer" if phase == "answer" else "cut_off", 502,
                                f"upstream {url} closed the connection "
                                f"{'before answering' if phase == 'answer' else 'mid-answer'}"
                                ) from None
        except asyncio.IncompleteReadError:
            raise self._failure("bad_answer" if phase == "answer" else "cut_off", 502,
                                f"upstream {url} closed the connection "
                                f"{'before answering' if phase == 'answer' else 'mid-answer'}"
                                ) from None
        except BadAnswer as error:
            raise self._failure("bad_answer", 502, f"upstream {url} sent a bad answer: "
                                                   f"{error}") from None
        connection = connection_named(", ".join(v for n, v in fields if n.lower() == "connection"))
        self.reusable = minor == 1 and "close" not in connection and self.answer_framing is not None
        self.status, self.answer_fields = status, fields
        self.upstream.breaker.succeeded()
        self.verdict_given = True

    async def _send_body(self, deadline, timeout):
        """The body's pieces as lib hands them over. Waiting for the client is not the
        upstream's time (lib bounds the client); each write must be taken within `timeout`,
        and the answer must begin within `timeout` of the body's end."""
        loop, chunked = asyncio.get_running_loop(), self.framing == CHUNKED
        while True:
            deadline.reschedule(None)
            piece = await self.pieces.get()
            self.piece_taken.set()
            deadline.reschedule(loop.time() + timeout)
            if piece is None:
                break
            self.writer.write(encode_chunk(piece) if chunked else piece)
            await self.writer.drain()
        if chunked:
            self.writer.write(encode_chunk(b""))

    async def wait_for_room(self):
        """Back-pressure: while PIECES_WAITING pieces of the body wait for a slow upstream,
        lib reads no more of the client's (a body costs at most that much memory here, never
        `--max-body`). Once the exchange is over, the rest is read and dropped."""
        while self.pieces.qsize() >= PIECES_WAITING and not self.exchange.done():
            self.piece_taken.clear()
            await self.piece_taken.wait()

    def _failure(self, kind, status, detail):
        failures = self.metrics["upstream_failures"]
        failures[kind] = failures.get(kind, 0) + 1
        self.upstream.breaker.failed()
        self.verdict_given = True
        self.close_upstream()
        return UpstreamFailure(HTTPError(detail, status=status))

    def close_upstream(self):
        if self.writer is not None:
            self.writer.transport.abort()
            self.reader = self.writer = None

    def abandon(self):
        """The client went away, or its request was refused mid-body: the upstream must not
        take what it got for a whole request, so its connection is closed."""
        exchange = self.exchange
        if exchange is not None and not exchange.done():
            exchange.cancel()
        elif exchange is not None and not exchange.cancelled():
            exchange.exception()  # seen: a failure nobody awaits is no "never retrieved" warning
        if not self.verdict_given:
            self.upstream.breaker.abandoned()
            self.verdict_given = True
        self.close_upstream()

    # --- the answer --------------------------------------------------------------------------

    async def settle(self):
        """The Response to send: this one, streamed; a whole one when the answer is small (one
        write); or the problem for an upstream that gave no valid answer."""
        try:
            # a body-less request starts here, on the connection's own coroutine (no task)
            await (self._exchange() if self.exchange is None else self.exchange)
        except UpstreamFailure as failure:
            return self._finish(problem_response(failure.error))
        except asyncio.CancelledError:
            self.abandon()
            raise
        answer_headers = client_answer_headers(self.answer_fields)
        head_only = self.request.method == "HEAD"
        if not head_only and (self.answer_framing == 0 or self.body):
            self._give_back()
            return self._finish(Response(self.body, self.status, answer_headers))
        self.headers = answer_headers + self.headers
        if head_only:  # lib writes the head alone, with GET's length when the upstream said it
            self.length = next((int(v) for n, v in self.answer_fields
                                if n.lower() == "content-length" and v.isdigit()), None)
            self._give_back()
            return self._finish(self)
        self._count(self.status)
        return self

    def _finish(self, answer):
        """`answer` goes out whole instead of a stream: it takes the fields lib's middleware gave
        this one, and this one's access log line is written now, with its status and size."""
        if answer is not self:
            answer.headers = answer.headers + self.headers
            self.status, self.sent = answer.status, len(answer.body)
        self._count(answer.status)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        return answer

    def _count(self, status):
        counts = self.metrics["answers"].setdefault(self.route.prefix, {})
        family = f"{status // 100}xx"
        counts[family] = counts.get(family, 0) + 1

    def _give_back(self):
        if self.reusable and self.writer is not None:
            keep_upstream(self.upstream, self.reader, self.writer)
            self.reader = self.writer = None
        else:
            self.close_upstream()

    async def _relay(self):
        """The answer's body, piece by piece as the upstream sends it, decoded from its framing
        (lib frames it again for the client). Cut off → an error: lib then closes the client's
        connection short of the end, so the client cannot take it for whole."""
        reader, pieces = self.reader, []
        framing, timeout = self.answer_framing, self.route.timeout_s
        decoder = (ChunkedDecoder(NO_LIMIT, pieces.append) if framing == CHUNKED
                   else ContentLengthDecoder(framing, pieces.append) if framing is not None
                   else None)
        try:
            while decoder is None or not decoder.done:
                async with asyncio.timeout(timeout):
                    data = await reader.read(READ_SIZE)
                if not data:
                    if decoder is None:  # framed by the close itself
                        break
                    raise ConnectionResetError("closed mid-body")
                if decoder is None:
                    yield data
                    continue
                decoder.feed(data)
                for piece in pieces:
                    yield piece
                pieces.clear()
            if decoder is not None and decoder.unused:
                self.reusable = False  # bytes after the answer: nothing there to trust
            self._give_back()
        except (TimeoutError, ConnectionError, HTTPError) as error:
            self.upstream.breaker.failed()
            sys.stderr.write(f"warning: upstream {self.upstream.url} broke off its answer to "
                             f"request {self.request.request_id} ({error!r}): the client's "
                             f"connection is closed short of the end\n")
            raise ConnectionAbortedError("the upstream's answer broke off") from None
        finally:
            self.close_upstream()  # whatever was not given back is never reused half-read


class RequestBodyPipe:
    """lib's body sink for a proxied request: each piece of the body goes upstream as it
    arrives. The edge (route, token, rate limit) is decided first, on the head alone."""

    def __init__(self, request):
        self.response = request.app.handle(request)
        self.proxied = isinstance(self.response, ProxiedResponse)

    def write(self, piece):
        if self.proxied:  # a refused request's body is read and dropped (bounded by the limit)
            self.response.pieces.put_nowait(piece)

    async def wait_for_room(self):
        if self.proxied and self.response.pieces is not None:
            await self.response.wait_for_room()

    def finish(self):
        if self.proxied:
            self.response.pieces.put_nowait(None)

    def discard(self):
        if self.proxied:
            self.response.abandon()


class GatewayServer(AsyncioServer):
    """lib's asyncio transport, with one await added: a proxied answer is sent once the
    upstream's head is in (lib's handlers are plain functions, called on the loop)."""

    async def _handle(self, conn, request):
        body = request.body
        if isinstance(body, RequestBodyPipe):  # the chain already ran, on the head
            body.finish()
            response = body.response
        else:
            response = await super()._handle(conn, request)
        if isinstance(response, ProxiedResponse):
            response = await response.settle()
        return response


# =============================================================================================
# The edge: route, token, limit — then the proxy
# =============================================================================================

def authenticate(request):
    """The `sub` of the request's bearer token, verified with jwt_auth's rules."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("this route needs a bearer token: Authorization: Bearer <token>",
                           www_authenticate="Bearer")
    settings = request.app.state.tokens
    if settings is None:
        raise invalid_token("the gateway has no secret to verify tokens with (start it with "
                            "--secret or JWT_SECRET)")
    try:
        claims = verify_access_token(settings, token)
    except InvalidToken as error:
        raise invalid_token(str(error)) from None
    if not _SUB_AS_HEADER.match(claims["sub"]):
        raise invalid_token("the token sub cannot be passed on as a header")
    return claims["sub"]


@app.use
def guard_edge(request, call_next):
    """For a proxied request: a sane path, the token on jwt routes, then the route's limit
    (rate_limiter's middleware, keyed per user or per peer address)."""
    route = request.context.get("gateway_route")
    if route is None:
        return call_next(request)
    if any(segment in (".", "..") for segment in request.path.split("/")):
        # RFC 3986 §5.2.4: the upstream would resolve them, past the prefix that was checked
        raise BadRequest("dot segments (. or ..) are not allowed in a proxied path")
    request.app.state.metrics["requests"] += 1
    if route.auth == "jwt":
        request.context["user_id"] = authenticate(request)
    if route.enforce_limit is not None:
        return route.enforce_limit(request, call_next)
    return call_next(request)


def limit_key(route):
    def key_of(request):
        user = request.context.get("user_id")
        return f"{route.prefix} user:{user}" if user is not None else \
            f"{route.prefix} ip:{request.client[0]}"
    return key_of


def proxy(request):
    """Forward the request to one of its route's upstreams (the answer follows in settle())."""
    route = request.context["gateway_route"]
    upstream = choose_upstream(route)
    trace_event(f"to {upstream.url}: the status below stands in until its answer's head")
    return ProxiedResponse(request, route, upstream, body_framing(request))


def body_framing(request):
    """The request body's framing: CHUNKED, a length, or None. lib's parser has checked the
    fields already (both at once was refused: ambiguous framing is never forwarded)."""
    headers = request.headers
    if "transfer-encoding" in headers:
        return CHUNKED
    if "content-length" in headers:
        return int(headers["content-length"].split(",")[0])  # "5, 5" is one length (§8.6)
    return None


PROXY = Route("*", "/{path:path}", proxy, body_sink=RequestBodyPipe, rate_limited=True)


# =============================================================================================
# Health: active checks, and what the gateway knows
# =============================================================================================

async def check_upstreams(routes, interval_s):
    """Every `interval_s`: `GET /health` on each upstream; a 2xx puts it in, anything else
    (or nothing in time) takes it out."""
    while True:
        await asyncio.sleep(interval_s)
        checks = [check_health(u, min(r.timeout_s, interval_s)) for r in routes
                  for u in r.upstreams]
        await asyncio.gather(*checks)


async def check_health(upstream, timeout_s):
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {upstream.authority}\r\n"
                         f"Connection: close\r\nVia: {VIA}\r\n\r\n".encode("latin-1"))
            _, status, _ = await read_answer_head(reader)
            upstream.healthy = 200 <= status < 300
    except (OSError, TimeoutError, EOFError, BadAnswer, asyncio.IncompleteReadError):
        upstream.healthy = False
    finally:
        if writer is not None:
            writer.transport.abort()


@app.get("/health", public=True, summary="Liveness, and how many upstreams are healthy")
def health(request):
    upstreams = [u for route in request.app.state.routes for u in route.upstreams]
    return {"status": "ok", "upstreams": len(upstreams),
            "healthy_upstreams": sum(u.healthy for u in upstreams)}


@app.get("/gateway/routes", public=True, response_schema={"type": "object", "required": ["routes"]})
def list_routes(request):
    """The routes, longest prefix first (the order they are matched in)"""
    return {"routes": [route.describe() for route in request.app.state.routes]}


@app.get("/gateway/health", public=True,
         response_schema={"type": "object", "required": ["upstreams"]})
def upstream_health(request):
    """Each route's upstreams: healthy or not, and their circuit breaker's state"""
    return {"upstreams": [{"route": route.prefix, "url": u.url, "healthy": u.healthy,
                           "breaker": u.breaker.current().value}
                          for route in request.app.state.routes for u in route.upstreams]}


@app.get("/gateway/metrics", public=True)
def metrics(request):
    """Counters since start: requests, answers per route, upstream connections, failures"""
    state = request.app.state
    return {**state.metrics, "idle_connections": sum(len(u.idle) for r in state.routes
                                                     for u in r.upstreams)}


# =============================================================================================
# Running
# =============================================================================================

def start_health_checks():
    """Once the gateway listens, on its event loop: the active health checks (the task is kept:
    the loop holds only a weak reference to it)."""
    app.state.checker = asyncio.ensure_future(check_upstreams(app.state.routes,
                                                              app.state.health_s))


def main(argv=None):
    parser = app.arg_parser()
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="the routes, a JSON file (default level06/api_gateway.json)")
    parser.add_argument("--secret", help="HMAC secret that jwt routes verify tokens with, at "
                        "least 32 bytes (default: the JWT_SECRET environment variable; without "
                        "either, jwt routes refuse every token)")
    parser.add_argument("--issuer", default="jwt_auth", help="the tokens' iss (default jwt_auth)")
    parser.add_argument("--audience", default="jwt_auth",
                        help="the tokens' aud (default jwt_auth)")
    parser.add_argument("--health-s", type=bounded(float, "a duration in seconds of at least "
                        "0.1", at_least=0.1, below=10**6), default=5.0,
                        help="seconds between active health checks (default 5)")
    parser.add_argument("--breaker-failures", type=bounded(int, "a count from 1", at_least=1),
                        default=5, help="consecutive failures that open an upstream's circuit "
                                        "(default 5)")
    parser.add_argument("--breaker-open-s", type=bounded(float, "a duration in seconds",
                        above=0, below=10**6), default=5.0,
                        help="seconds an open circuit sends nothing before a trial (default 5)")
    parser.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="gcra",
                        help="the rate limit algorithm of the routes' rate_limit (default gcra)")
    parser.add_argument("--max-body", type=bounded(int, "a size in bytes from 1", at_least=1),
                        default=10 * 1024 * 1024,
                        help="largest proxied request body in bytes (default 10 MiB)")
    args = parser.parse_args(argv)
    if args.server != "asyncio":
        parser.error("--server: the gateway runs on the asyncio transport only")
    try:
        routes = load_config(args.config, algorithm=args.algorithm,
                             breaker=lambda: Breaker(args.breaker_failures, args.breaker_open_s))
    except ConfigError as error:
        exit_usage_error(f"--config: {error}")
    secret = args.secret if args.secret is not None else os.environ.get("JWT_SECRET")
    if secret is not None and len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        exit_usage_error(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    if secret is None:
        sys.stderr.write("warning: no --secret or JWT_SECRET: routes with auth \"jwt\" refuse "
                         "every token (401)\n")
    app.state.tokens = None if secret is None else TokenSettings(
        secret.encode("utf-8"), args.issuer, args.audience)
    app.state.routes = routes
    app.state.proxy = PROXY
    PROXY.body_limit = args.max_body
    limiter = Limiter()
    for route in routes:
        if route.policy is not None:
            route.enforce_limit = rate_limit(limiter, route.policy, limit_key(route))
    app.state.metrics = {"requests": 0, "answers": {}, "connections_opened": 0,
                         "connections_reused": 0, "upstream_failures": {}}
    app.state.health_s = args.health_s
    app.transports["asyncio"] = GatewayServer   # lib's, with the wait for the upstream
    app.on_listening.append(start_health_checks)
    app.run(args)


if __name__ == "__main__":
    main()
