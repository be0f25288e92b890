"""The list contract of common.md: `?limit=&cursor=` in, `{"items", "next_cursor"}` out.

Keyset ("seek") pagination: the cursor holds the sort key of the last item on the page, and the
next page asks for rows *after* that key (`WHERE (updated_at, id) < (?, ?) ORDER BY updated_at
DESC, id DESC LIMIT ?`). Unlike `OFFSET`, this stays correct while rows are inserted or deleted
between pages — nothing is skipped, nothing shown twice — and costs the same on page 1,000 as on
page 1. The sort key must be unique, so it always ends with the row's id.

Cursors are opaque to clients (base64url of a small JSON array) and checked on the way in: a
cursor that does not decode, or does not have the expected shape, is a 400.
"""
import base64
import binascii
import json

from lib.problems import BadRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def list_params(request, shape, *, default=DEFAULT_LIMIT, maximum=MAX_LIMIT):
    """`limit` (1–maximum) and the decoded `cursor` (None on the first page). `shape` is the
    tuple of types the cursor's values must have, e.g. `(str, int)` for (updated_at, id)."""
    limit = request.query_int("limit", default, low=1, high=maximum)
    text = request.query_param("cursor")
    return limit, (decode_cursor(text, shape) if text else None)


def encode_cursor(values):
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text, shape):
    invalid = BadRequest("query parameter 'cursor' is not a cursor this server issued",
                         errors=[{"field": "cursor", "message": "invalid cursor"}])
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw)
    except (ValueError, binascii.Error):
        raise invalid from None
    if (not isinstance(values, list) or len(values) != len(shape)
            or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(values, shape))):
        raise invalid
    return values


def page(rows, limit, cursor_values, render=lambda row: row):
    """Build the answer from up to `limit + 1` rows fetched in order: the extra row only tells
    whether there is a next page. `cursor_values(row)` gives the sort key of a row."""
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [render(row) for row in rows],
            "next_cursor": encode_cursor(cursor_values(rows[-1])) if more and rows else None}
