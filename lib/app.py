"""The application: routes, the middleware chain, the command line, and `run()`.

A project file makes one `App`, declares its routes on it with decorators, and calls
`app.run(args)` from `main()`:

    app = App("counter", "Named counters whose value the server owns.", port=8002)

    @app.get("/counters/{name}")
    def read_counter(request, name):
        return {"name": name, "value": ...}      # a dict is answered as JSON, 200

    def main(argv=None):
        args = app.parse_args(argv, database=True)
        ...
        app.run(args)

`App.handle(request)` is the whole server in one call — request in, response out, no sockets —
which is what the transports call and what makes the app testable without a network.
Every app gets `GET /` (its index), `GET /openapi.json`, and `GET /health` unless it declares
its own. These built-ins are declared `public=True` (in `route.meta`): the convention by which a
route says "no credentials needed", so that auth middleware can deny by default and still let
them through (level03/jwt_auth.py, level03/rbac.py). A project marks its own open routes the
same way: `@app.post("/auth/login", public=True)`.
"""
import argparse
import math
import sys
import time
import types
from pathlib import Path
from urllib.parse import urlsplit

from lib import logs, middleware, trace
from lib.problems import HTTPError, MethodNotAllowed
from lib.protocol import DEFAULT_BODY_LIMIT
from lib.response import Response, json_response, no_content
from lib.routing import Route, Router
from lib.storage import Database, StorageError, default_db_path


class App:
    def __init__(self, name, description, *, port, version="1.0.0"):
        self.name = name
        self.description = description
        self.default_port = port
        self.port = None              # the port listened on, once the server has started
        self.version = version
        self.router = Router()
        self.middleware = []          # the project's own steps, run after the built-in ones
        self.middleware_before_routing = []  # … or before the route match (see `use`)
        self.state = types.SimpleNamespace()  # what handlers share: stores, settings
        self.draining = False         # set when shutdown begins: readiness turns 503
        self.tracing = False
        self.body_limit = DEFAULT_BODY_LIMIT
        self.started_at = time.time()
        self.shutdown_hooks = []      # called once the server has drained (close storage, …)
        self.on_listening = []        # called once it listens, after its line (a second server)
        self.on_draining = []         # called when shutdown begins (a WebSocket's 1001 Close)
        self.transports = {}          # a project's own transports by --server name (a proxy's)
        self.log_shipper = None       # --log-to: the access log shipped to a collector
        self.log_json = False         # --log-format json: every stderr line one JSON object
        self.log_threshold = logs.LEVELS["info"]  # --log-level: lines below it are dropped
        self._chain = None
        # The built-ins are `public=True`: auth middleware lets them through without credentials.
        self.get("/", summary="This server's name, description and routes", public=True)(self._index)
        self.get("/openapi.json", summary="OpenAPI 3.1 description of every route",
                 public=True)(self._openapi)

    # --- declaring routes and middleware --------------------------------------------------

    def route(self, method, pattern, **options):
        """Declare a handler: `@app.route("POST", "/counters/{name}/increment")`."""

        def register(handler):
            self.router.add(Route(method, pattern, handler, **options))
            return handler

        return register

    def get(self, pattern, **options):
        return self.route("GET", pattern, **options)

    def post(self, pattern, **options):
        return self.route("POST", pattern, **options)

    def put(self, pattern, **options):
        return self.route("PUT", pattern, **options)

    def patch(self, pattern, **options):
        return self.route("PATCH", pattern, **options)

    def delete(self, pattern, **options):
        return self.route("DELETE", pattern, **options)

    def use(self, step, *, before_routing=False):
        """Add a middleware step `(request, call_next) -> Response` after the built-in ones.

        By default it runs after the route match, so it sees only requests that found a route
        and may read `request.route`. With `before_routing=True` it runs before the match, so
        it also sees the requests answered 404 / 405 or refused by the transport (400, 413…):
        for those, `call_next` raises the `HTTPError` (a request logger renders it with
        `lib.middleware.error_response` to learn the status)."""
        (self.middleware_before_routing if before_routing else self.middleware).append(step)
        self._chain = None
        return step

    # --- handling a request ---------------------------------------------------------------

    def _build_chain(self):
        if not any(r.pattern == "/health" and r.method == "GET" for r in self.router.routes):
            self.get("/health", summary="Liveness: the server answers", public=True)(_health)
        steps = middleware.BUILT_IN + self.middleware_before_routing + [match_route] + self.middleware
        if not self.tracing:
            return middleware.compose(steps, call_handler)
        steps = [trace.traced_step(step.__name__, step) for step in steps]
        return middleware.compose(steps + [traced_handler], call_handler)

    def handle(self, request, failure=None):
        """Run one request through the chain and return the response. `failure` is an error
        the transport found while reading the request (a 413, a malformed body): the chain
        still runs, so it gets a request id, an access log line and a problem answer."""
        if self._chain is None:
            self._chain = self._build_chain()
        if failure is not None:
            request.context["failure"] = failure
        if not self.tracing:
            return self._chain(request)
        recorded, token = trace.start(f"{request.method} {request.path}")
        try:
            return self._chain(request)
        finally:
            trace.finish(recorded, token, request.request_id)

    def plan(self, request):
        """Match the route once, as soon as the head is read, and tell the transport what it
        must know before reading the body: the body's limit, and whether the handler may block
        (then the asyncio transport runs the request off the event loop). A routing error
        (404, 405, a bad path parameter) is kept and answered later, inside the chain."""
        try:
            request.route, request.path_params = self.router.match(request.method, request.path)
        except HTTPError as error:
            request.context["routing_error"] = error
            return self.body_limit, False
        route = request.route
        return (route.body_limit if route.body_limit is not None else self.body_limit), route.blocking

    def begin_draining(self):
        """Shutdown begins (the transports call this first): readiness turns 503, and the
        `on_draining` hooks run while every connection is still open."""
        self.draining = True
        for hook in self.on_draining:
            hook()

    def log(self, level, message, **fields):
        """A line on stderr in the server's log format (lib/logs.py): `app.log("info", "config",
        port=8030)` is `config port=8030` as text, `{"ts": …, "level": "info", "msg": "config",
        "port": 8030}` as JSON."""
        logs.write(self, level, message, fields)

    # --- built-in routes --------------------------------------------------------------------

    def _index(self, request):
        return {"name": self.name, "description": self.description, "version": self.version,
                "routes": self.router.index()}

    def _openapi(self, request):
        return self.router.openapi(self.name, self.description, self.version)

    # --- command line and running -------------------------------------------------------------

    def arg_parser(self, *, database=False):
        """The flags every server takes (common.md "Running"); a project adds its own."""
        script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else f"{self.name}.py"
        parser = argparse.ArgumentParser(prog=script, description=self.description)
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=port_number, default=self.default_port,
                            help=f"port to listen on, 0 for any free one (default {self.default_port})")
        if database:
            parser.add_argument("--db", default=default_db_path(self.name),
                                help="sqlite file, or :memory: (default data/%(prog)s.sqlite3 under the repository)"
                                .replace("%(prog)s", self.name))
        parser.add_argument("--trace", action="store_true",
                            help="print each request's flow (middleware, handler, SQL, timings) to stderr")
        parser.add_argument("--server", choices=("asyncio", "threaded"), default="asyncio",
                            help="transport: asyncio, one event loop (default), or threaded, "
                                 "http.server with a thread per connection")
        parser.add_argument("--idle-timeout", type=positive_seconds, default=15.0,
                            help="close a keep-alive connection idle this long (default 15 s)")
        parser.add_argument("--shutdown-delay", type=seconds, default=0.0,
                            help="on SIGTERM, answer not-ready but keep serving this long before "
                                 "stopping (lets a load balancer notice; default 0)")
        parser.add_argument("--max-connections", type=connection_count, default=1000,
                            help="open connections at most; one more gets 503 (default 1000)")
        parser.add_argument("--drain-timeout", type=seconds, default=10.0,
                            help="on SIGTERM, wait at most this long for in-flight requests (default 10 s)")
        parser.add_argument("--log-format", choices=("text", "json"), default="text",
                            help="stderr lines as text (default) or one JSON object each")
        parser.add_argument("--log-level", choices=tuple(logs.LEVELS), default="info",
                            help="drop log lines below this level (default info; a 4xx is a "
                                 "warning, a 5xx an error)")
        parser.add_argument("--log-to", type=http_url, default=None,
                            help="ship the access log to this log collector too (its base URL: "
                                 "NDJSON to URL/logs, as level06/central_logging.py takes it)")
        return parser

    def parse_args(self, argv=None, *, database=False):
        return self.arg_parser(database=database).parse_args(argv)

    def open_database(self, args, schema):
        """Open `args.db` with `schema`, closed at shutdown. An unusable path exits with 2."""
        try:
            db = Database(args.db, schema, trace=getattr(args, "trace", False))
        except StorageError as err:
            exit_usage_error(str(err))
        self.shutdown_hooks.append(db.close)
        return db

    def run(self, args):
        from lib.runner import serve  # the runner imports both transports; only run() needs them
        self.tracing = args.trace
        self._chain = self._build_chain()
        self.log_json = args.log_format == "json"
        self.log_threshold = logs.LEVELS[args.log_level]
        if args.log_to:
            self.log_shipper = logs.LogShipper(args.log_to)
            self.on_listening.append(self.log_shipper.thread.start)
            self.shutdown_hooks.insert(0, self.log_shipper.stop)  # the last hook to run
        serve(self, args)


def match_route(request, call_next):
    """Find the route (404 / 405 / the handler) before the project's middleware runs, so that
    middleware can read the route's metadata (a permission, an auth requirement). The
    transport has usually matched it already (`App.plan`); this step answers the outcome."""
    context = request.context
    error = context.get("failure") or context.get("routing_error")
    if error is None and request.route is None:
        try:
            request.route, request.path_params = request.app.router.match(request.method, request.path)
        except HTTPError as routing_error:
            error = routing_error
    if error is not None:
        if request.method == "OPTIONS" and isinstance(error, MethodNotAllowed):
            return Response(b"", 204, error.headers)  # RFC 9110 §9.3.7: which methods it takes
        raise error
    return call_next(request)


def call_handler(request):
    """The innermost link: call the handler and turn what it returns into a Response. Errors
    become their answers here, so the project's middleware sees a response either way."""
    route = request.route
    try:
        result = route.handler(request, **request.path_params)
    except Exception as error:
        return middleware.error_response(request, error)
    if isinstance(result, Response):
        return result
    if result is None:
        return no_content()
    return json_response(result, route.status)  # the status the route declares


def traced_handler(request, call_next):
    """With --trace: the handler's own line, named after its function."""
    return trace.traced_step(f"handler {request.route.handler.__name__}", lambda r, c: c(r))(request, call_next)


def _health(request):
    return {"status": "ok"}


def bounded(convert, what, *, at_least=None, above=None, at_most=None, below=None):
    """An argparse `type` for a number: `text` converted with `convert` (`int`, `float`) and
    within the bounds given, else `'<text>' is not <what>`. Flags are checked as they are
    parsed, at start, so a bad one ends the program with exit status 2 and a message naming the
    flag (common.md "Running"), never a traceback or a surprise in the middle of serving (a
    negative timeout, a port of 70000). NaN and infinity are never in range.

        port_number = bounded(int, "a port number (0–65535)", at_least=0, at_most=65535)
    """

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if ((isinstance(value, float) and not math.isfinite(value))
                or (at_least is not None and value < at_least)
                or (above is not None and value <= above)
                or (at_most is not None and value > at_most)
                or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


port_number = bounded(int, "a port number (0–65535)", at_least=0, at_most=65535)
seconds = bounded(float, "a duration in seconds", at_least=0, below=10**6)
positive_seconds = bounded(float, "a duration in seconds above 0", above=0, below=10**6)
connection_count = bounded(int, "a number of connections (1–100000)", at_least=1, at_most=100_000)


def http_url(text):
    """An argparse `type` for the URL users reach a server at (`--public-url`, e.g. behind a
    proxy): http or https, a host, a valid port, no query or fragment, since links are built on
    it and its origin is compared. Returned without a trailing `/`."""
    try:
        parts = urlsplit(text)
        parts.port  # a port out of range or not a number raises ValueError
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or "?" in text or "#" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL like "
                                         f"https://app.example.com (no query or fragment)")
    return text.rstrip("/")


def exit_usage_error(message):
    """common.md: an unusable flag, port or path is a short error on stderr and exit status 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)
