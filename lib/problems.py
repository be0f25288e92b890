"""Errors that know their HTTP status, rendered as RFC 9457 problem details.

Handlers (and the request parser) *raise*; one place, the error middleware, turns the exception
into an `application/problem+json` answer. That keeps every handler free of error formatting and
makes it impossible for a stack trace to reach a client: anything that is not an `HTTPError` is
logged and answered with a bare 500.

Like h11's `ProtocolError.error_status_hint`, each error carries its status, so the code that
finds the problem also decides which 4xx it is.
"""
import math
from http import HTTPStatus


def reason_phrase(status):
    """RFC 9110 §15's names, where Python's `HTTPStatus` still has RFC 2616's."""
    if status in _MODERN_PHRASES:
        return _MODERN_PHRASES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a code without a registered name (299, 599): as lib.protocol's status line
        return f"Status {status}"


_MODERN_PHRASES = {413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
                   422: "Unprocessable Content", 507: "Insufficient Storage"}


class HTTPError(Exception):
    """An error with an HTTP status: raise it anywhere below a handler.

    `errors` is the RFC 9457 extension for validation failures: a list of
    `{"field": ..., "message": ...}` naming every bad field at once. `headers` are added to the
    answer (`Allow` on a 405, `WWW-Authenticate` on a 401, `Retry-After` on 429/503).
    """

    status = 500

    def __init__(self, detail=None, *, status=None, errors=None, headers=None, type="about:blank",
                 title=None, **extra):
        if status is not None:
            self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})
        self.type = type
        self.title = title or reason_phrase(self.status)
        self.extra = extra  # further problem members (RFC 9457 §3.2 extensions)
        super().__init__(detail or self.title)

    def to_problem(self):
        body = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    """401: RFC 9110 §15.5.2 requires `WWW-Authenticate`, so the scheme is a required argument."""

    status = 401

    def __init__(self, detail=None, *, www_authenticate, headers=None, **kw):
        headers = {"WWW-Authenticate": www_authenticate, **(headers or {})}
        super().__init__(detail, headers=headers, **kw)


class Forbidden(HTTPError):
    status = 403


class NotFound(HTTPError):
    status = 404


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, allowed, detail=None):
        super().__init__(detail, headers={"Allow": ", ".join(allowed)})


class Conflict(HTTPError):
    status = 409


class Gone(HTTPError):
    status = 410


class LengthRequired(HTTPError):
    status = 411


class PreconditionFailed(HTTPError):
    status = 412


class ContentTooLarge(HTTPError):
    status = 413


class UnsupportedMediaType(HTTPError):
    status = 415


class UnprocessableContent(HTTPError):
    status = 422


class ValidationFailed(UnprocessableContent):
    """422 naming every bad field: `ValidationFailed({"title": "is required", ...})`."""

    def __init__(self, field_errors, detail=None):
        errors = [{"field": field, "message": message} for field, message in field_errors.items()]
        names = ", ".join(field_errors)
        super().__init__(detail or f"invalid fields: {names}", errors=errors)


class TooManyRequests(HTTPError):
    status = 429

    def __init__(self, detail=None, *, retry_after, headers=None, **kw):
        headers = {"Retry-After": str(max(1, math.ceil(retry_after))), **(headers or {})}
        super().__init__(detail, headers=headers, **kw)


class ServiceUnavailable(HTTPError):
    status = 503

    def __init__(self, detail=None, *, retry_after=1, headers=None, **kw):
        headers = {"Retry-After": str(max(1, math.ceil(retry_after))), **(headers or {})}
        super().__init__(detail, headers=headers, **kw)
