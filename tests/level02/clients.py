"""What the level02 test files share: a client that acts as one user, reading problems and CSV.

Every level02 server knows its caller by the `X-User-Id` header (spec/level02.md), and every
list answers `{"items", "next_cursor"}` (common.md "Lists"). A test file subclasses `UserClient`
(or `CollectionClient`) with the shortcuts of its own project (`contact`, `expense`, `bulk`, …).
"""
import csv
import io
import uuid

import requests

from tests.harness import expect, expect_json


def fresh_user(prefix="u"):
    """A user id no other test uses, so tests sharing one server cannot see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_fields(problem):
    """The fields a validation problem names (RFC 9457 body with `errors`, common.md)."""
    return {error["field"] for error in problem.get("errors", [])}


def read_csv(resp, filename):
    """(text, rows) of a CSV export: RFC 4180, UTF-8, offered as a download named `filename`."""
    expect(resp, 200, content_type="text/csv")
    assert resp.headers["Content-Type"].replace(" ", "").lower() == "text/csv;charset=utf-8"
    disposition = resp.headers.get("Content-Disposition", "")
    assert disposition.startswith("attachment") and f'filename="{filename}"' in disposition
    text = resp.content.decode("utf-8")
    return text, list(csv.reader(io.StringIO(text, newline="")))


class UserClient:
    """Requests as one user (the `X-User-Id` header) on a keep-alive session, each with a
    timeout (`timeout`, seconds: a subclass may set its own)."""

    timeout = 10

    def __init__(self, server, user=None):
        self.url = server.url
        self.user = user or fresh_user()
        self.session = requests.Session()

    def request(self, method, path, *, headers=None, **kw):
        kw.setdefault("timeout", self.timeout)
        headers = {"X-User-Id": self.user, **(headers or {})}
        return self.session.request(method, self.url + path, headers=headers, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):
        return self.request("POST", path, json=json, **kw)

    def patch(self, path, json=None, **kw):
        return self.request("PATCH", path, json=json, **kw)

    def put(self, path, json=None, **kw):
        return self.request("PUT", path, json=json, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def pages(self, path, params=None):
        """Each page (the answer's body) of a list, following `next_cursor` to the end."""
        params = dict(params or {})
        while True:
            body = expect_json(self.get(path, params=params), 200)
            yield body
            if body["next_cursor"] is None:
                return
            params["cursor"] = body["next_cursor"]

    def all_items(self, path, params=None):
        """Every item of a list, over all its pages."""
        return [item for body in self.pages(path, params) for item in body["items"]]


class CollectionClient(UserClient):
    """A `UserClient` for a project built around one collection (`collection`, e.g. "/notes"):
    create, read one, list a page, list every item. `defaults` fill in what `create` omits."""

    collection = None
    defaults = {}

    def create(self, **fields):
        return expect_json(self.post(self.collection, json={**self.defaults, **fields}), 201)

    def read(self, item_id):
        return expect_json(self.get(f"{self.collection}/{item_id}"), 200)

    def list(self, **params):
        return expect_json(self.get(self.collection, params=params), 200)

    def all_pages(self, **params):
        return self.all_items(self.collection, params)
