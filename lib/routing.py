"""Routes: which handler answers a method and a path.

A route is declared once, next to its handler (as bottle does), and that one declaration feeds
three things: the router, the `GET /` index and the `GET /openapi.json` document, so the docs
cannot drift from the code.

Matching a request gives one of three answers (as in Starlette and werkzeug):

- none     — no route has this path: 404;
- partial  — the path exists, but not for this method: 405 with `Allow` listing the methods;
- full     — the handler and its converted path parameters.

Path parameters are written `{name}` (one segment), `{name:int}` or `{name:path}` (the rest of
the path, slashes included). A parameter that fails its conversion is a 400 naming it, not a 404:
the route exists, the value is bad (common.md's table). HEAD is answered by the GET handler, and
OPTIONS by the router itself (204 with `Allow`).
"""
import re

from lib.listing import DEFAULT_LIMIT, MAX_LIMIT
from lib.problems import BadRequest, MethodNotAllowed, NotFound
from lib.request import Query

_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::(int|str|path))?}")
SQLITE_INTEGER_RANGE = range(-2**63, 2**63)


class _OutOfRange(Exception):
    """A well-formed integer no stored row can have: the answer is 404, not 400."""


def _path_int(text):
    """A path integer written plainly: ASCII digits, an optional minus. `int()` alone would
    also take `+5`, `1_0`, ` 5` and non-ASCII digits: several URLs for one resource."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    value = int(text)
    if value not in SQLITE_INTEGER_RANGE:
        raise _OutOfRange(text)
    return value


_CONVERTERS = {  # name: (segment regex, conversion, OpenAPI schema)
    "str": (r"[^/]+", str, {"type": "string"}),
    "int": (r"[^/]+", _path_int, {"type": "integer"}),
    "path": (r".+", str, {"type": "string"}),
}


# The list contract's parameters (common.md "Lists"; lib.listing.list_params reads them), and
# the answer's shape, which a route that takes them documents: `query=[*PAGE, ...]`.
PAGE = (Query("limit", f"page size, 1–{MAX_LIMIT} (default {DEFAULT_LIMIT})", int, DEFAULT_LIMIT,
              1, MAX_LIMIT),
        Query("cursor", "the next_cursor of the page before"))
PAGE_ANSWER = {"type": "object", "required": ["items", "next_cursor"],
               "properties": {"items": {"type": "array"}, "next_cursor": {"type": ["string", "null"]}}}


class Route:
    """One method + path pattern + handler, with what the docs and middleware need to know.

    `blocking` marks a handler that may block for a while (a password hash, an SMTP exchange,
    a sleep): the asyncio transport runs it in the worker pool instead of on the event loop.
    `body_limit` caps the request body in bytes. `body_sink(request)`, for a body too large
    to hold in memory (an upload), makes from the request's head the object that the body is
    written to as it arrives, with `write(piece)`; both may raise an HTTPError to refuse the
    request at once. The handler finds it as `request.body`; its `discard()` is called once the
    request is answered or cut off, to drop what the handler did not keep. `request_schema` is
    the body's schema for the OpenAPI document (`lib.validation.body_schema`), a JSON body's
    unless `request_media_type` says otherwise (`"text/csv"`); `body_required=False` when the
    body may be left out altogether. `query` lists the route's `lib.request.Query` parameters, which the handler
    reads with them. `responses` maps a status to what it means (a 4xx answers a problem+json),
    or to a whole OpenAPI Response Object when it answers otherwise. `status` is the success
    status (default: the 2xx in `responses`, else 200), which a handler returning data is
    answered with; `response_schema` and `media_type` describe that answer. `path_schemas`
    narrows a path parameter's schema (`{"code": {"minimum": 200}}`); `if_match=True` says the
    route honours If-Match. `meta` carries whatever a project's middleware reads from the route
    (a permission, an auth requirement); by convention `public=True` says the route needs no
    credentials (lib's built-in `/`, `/openapi.json` and `/health` carry it)."""

    def __init__(self, method, pattern, handler, *, summary=None, blocking=False,
                 body_limit=None, body_sink=None, request_schema=None,
                 request_media_type="application/json", body_required=True, query=(), responses=None, tags=None, status=None,
                 response_schema=None, media_type="application/json", path_schemas=None,
                 if_match=False, **meta):
        self.method = method.upper()
        self.pattern = pattern
        self.handler = handler
        doc = (handler.__doc__ or "").strip()
        self.summary = summary or (doc.splitlines()[0] if doc else handler.__name__.replace("_", " "))
        self.blocking = blocking
        self.body_limit = body_limit
        self.body_sink = body_sink
        self.request_schema = request_schema
        self.request_media_type = request_media_type
        self.body_required = body_required
        self.query = query
        self.responses = responses or {}
        self.status = status or min((s for s in self.responses if 200 <= s < 300), default=200)
        if response_schema is None:  # a list's shape, else any JSON object, else any body
            response_schema = (PAGE_ANSWER if PAGE[0] in query
                               else {"type": "object"} if media_type.endswith("json") else {})
        self.response_schema = response_schema
        self.media_type = media_type
        self.path_schemas = path_schemas or {}
        self.if_match = if_match
        self.tags = tags
        self.meta = meta
        self.params = [(m.group(1), m.group(2) or "str") for m in _PARAM.finditer(pattern)]
        # As OpenAPI and metrics name it, `/notes/{id}`: the converter (`{id:int}`) is ours alone.
        self.path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", pattern)
        self.regex = None
        if self.params:
            parts, last = [], 0
            for m in _PARAM.finditer(pattern):
                parts.append(re.escape(pattern[last:m.start()]))
                parts.append(f"(?P<{m.group(1)}>{_CONVERTERS[m.group(2) or 'str'][0]})")
                last = m.end()
            parts.append(re.escape(pattern[last:]))
            self.regex = re.compile("".join(parts) + r"\Z")

    def convert(self, raw):
        params = {}
        for name, kind in self.params:
            try:
                params[name] = _CONVERTERS[kind][1](raw[name])
            except _OutOfRange:
                raise NotFound(f"no resource has {name} {raw[name]}") from None
            except ValueError:
                raise BadRequest(f"path parameter '{name}' must be an integer",
                                 errors=[{"field": name, "message": "must be an integer"}]) from None
        return params


class Router:
    def __init__(self):
        self.routes = []
        self._static = {}    # path → {method: route}
        self._dynamic = {}   # pattern → (regex, {method: route}), in declaration order

    def add(self, route):
        table = self._static.setdefault(route.pattern, {}) if route.regex is None else \
            self._dynamic.setdefault(route.pattern, (route.regex, {}))[1]
        if route.method in table:
            raise ValueError(f"duplicate route {route.method} {route.pattern}")
        table[route.method] = route
        self.routes.append(route)

    def match(self, method, path):
        """Return (route, params) or raise NotFound / MethodNotAllowed."""
        methods = self._static.get(path)
        if methods is not None:
            # A path written out in full shadows the patterns: `POST /todos/bulk` exists, so
            # `GET /todos/bulk` is a 405, not a request for the todo with id "bulk".
            route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
            if route is not None:
                return route, {}
            raise MethodNotAllowed(allowed_methods(methods), f"{method} is not allowed on {path}")
        allowed = set()
        for regex, methods in self._dynamic.values():
            found = regex.match(path)
            if found is None:
                continue
            route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
            if route is not None:
                return route, route.convert(found.groupdict())
            allowed |= set(methods)
        if not allowed:
            raise NotFound(f"no route for {path}")
        raise MethodNotAllowed(allowed_methods(allowed), f"{method} is not allowed on {path}")

    # --- documentation generated from the routes --------------------------------------------

    def index(self):
        return [{"method": r.method, "path": r.pattern, "summary": r.summary} for r in self.routes]

    def openapi(self, title, description, version):
        """An OpenAPI 3.1 document of every route (https://spec.openapis.org/oas/v3.1.0)."""
        paths = {}
        for route in self.routes:
            operation = {"summary": route.summary, "operationId": route.handler.__name__}
            if route.tags:
                operation["tags"] = route.tags
            parameters = [{"name": name, "in": "path", "required": True,
                           "schema": {**_CONVERTERS[kind][2], **route.path_schemas.get(name, {})}}
                          for name, kind in route.params]
            # allowEmptyValue: the readers take `?limit=` as the parameter left out
            parameters += [{"name": q.name, "in": "query", "description": q.description,
                            "schema": q.schema, "allowEmptyValue": True} for q in route.query]
            if route.if_match:
                parameters.append({"name": "If-Match", "in": "header", "schema": {"type": "string"},
                                   "description": "the ETag last read; a stale one is a 412"})
            if parameters:
                operation["parameters"] = parameters
            if route.request_schema is not None:
                operation["requestBody"] = {
                    "required": route.body_required,
                    "content": {route.request_media_type: {"schema": route.request_schema}}}
            problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            responses = {}
            for status, text in route.responses.items():  # what it means, or a Response Object
                responses[str(status)] = text if isinstance(text, dict) else {"description": text}
                if status >= 400 and not isinstance(text, dict):  # an error answers a problem
                    responses[str(status)]["content"] = problem
            success = responses.setdefault(str(route.status), {"description": "Success"})
            if route.status != 204:  # unless a Response Object of the route's says it
                success.setdefault("content", {route.media_type: {"schema": route.response_schema}})
            responses["default"] = {"description": "Problem details (RFC 9457)", "content": problem}
            operation["responses"] = responses
            paths.setdefault(route.path, {})[route.method.lower()] = operation
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "description": description, "version": version},
            "paths": paths,
            "components": {"schemas": {"Problem": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                               "status": {"type": "integer"}, "detail": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "object"}}},
                "required": ["type", "title", "status"]}}},
        }


def allowed_methods(methods):
    allowed = set(methods)
    if "GET" in allowed:
        allowed.add("HEAD")
    allowed.add("OPTIONS")
    return sorted(allowed)
