"""The list contract of common.md: `?limit=&cursor=` in, `{"items", "next_cursor"}` out.

Keyset ("seek") pagination: the cursor holds the sort key of the last item on the page, and the
next page asks for rows *after* that key (`WHERE (updated_at, id) < (?, ?) ORDER BY updated_at
DESC, id DESC LIMIT ?`). Unlike `OFFSET`, this stays correct while rows are inserted or deleted
between pages — nothing is skipped, nothing shown twice — and costs the same on page 1,000 as on
page 1. The sort key must be unique, so it always ends with the row's id.

Cursors are opaque to clients (base64url of a small JSON array) and checked on the way in: a
cursor that does not decode, or does not have the expected shape, is a 400.

`Sort` declares one order a list can be read in (`?sort=-due`) and writes its `ORDER BY` and
the "rows after this cursor" condition: the short row-value form above where it is right, the
condition spelled out key by key where keys run different ways or may be NULL.
"""
import base64
import binascii
import json
from typing import NamedTuple

from lib.request import bad_query
from lib.validation import is_unicode_text

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


def invalid_cursor():
    return bad_query("cursor", "is not a cursor this server issued")


def decode_cursor(text, shape):
    invalid = invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        raise invalid from None
    if (not isinstance(values, list) or len(values) != len(shape)
            or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(values, shape))
            or not all(map(_bindable, values))):
        raise invalid
    return values


def _bindable(value):
    """A cursor is client input: its values go into SQL as parameters, which sqlite refuses
    (with an exception, a 500) for integers beyond 64 bits and for text with lone surrogates
    (JSON's "\\ud800"). No cursor this server issued holds either."""
    if isinstance(value, int):
        return -2**63 <= value < 2**63
    if isinstance(value, str):
        return is_unicode_text(value)
    return True


def page(rows, limit, cursor_values, render=lambda row: row):
    """Build the answer from up to `limit + 1` rows fetched in order: the extra row only tells
    whether there is a next page. `cursor_values(row)` gives the sort key of a row."""
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [render(row) for row in rows],
            "next_cursor": encode_cursor(cursor_values(rows[-1])) if more and rows else None}


class SortKey(NamedTuple):
    """One column of a list's order. `column` is written into the SQL, so it comes from the
    project's code, never from a client; `value_type` is what a cursor must hold for it."""

    column: str
    value_type: type = str
    descending: bool = False
    nulls_last: bool = False   # the column may be NULL, and NULLs come after every value
    collate: str = ""          # e.g. "NOCASE": text compared case-insensitively (ASCII letters)

    @property
    def sql(self):
        return f"{self.column} COLLATE {self.collate}" if self.collate else self.column


class Sort:
    """A named order a list can be read in, with its keyset pagination:

        DUE = Sort("due", SortKey("due", str, nulls_last=True), SortKey("id", int))

        limit, cursor = list_params(request, DUE.shape)
        where, params = DUE.after(cursor) if cursor else ("1", [])
        rows = db.query(f"SELECT * FROM todos WHERE owner = ? AND {where} "
                        f"ORDER BY {DUE.order_by} LIMIT ?", [owner, *params, limit + 1])
        return page(rows, limit, DUE.cursor_values, render)

    The last key must be unique (the id), so that every row has a position of its own. A cursor
    names the sort it was made for, so one from another sort is a 400, not a wrong page.

    When every key runs the same way and none can be NULL, `after` is the row-value comparison
    `(updated_at, id) < (?, ?)`, which an index on those columns answers by seeking straight to
    the cursor. Otherwise that form is wrong: in SQL `NULL > '2026-03-01'` is NULL, not true, so
    it would drop every undated row from page two on. Then the condition is spelled out: for
    keys k1, k2, … and the cursor's values v1, v2, …, a row comes after the cursor when

        k1 beyond v1  OR  (k1 = v1 AND k2 beyond v2)  OR  (k1 = v1 AND k2 = v2 AND k3 beyond v3) …

    where "beyond" is `>` (`<` for a descending key); with NULLs last, a NULL is beyond every
    value, nothing is beyond a NULL, and "equal to NULL" is `IS NULL`. (Correct for any order,
    but the database filters rows with it rather than seeking, so deep pages cost more.)
    """

    def __init__(self, name, *keys):
        self.name = name
        self.keys = keys
        # What list_params checks a cursor against: this sort's name, then one value per key.
        self.shape = (str,) + tuple((k.value_type, type(None)) if k.nulls_last else k.value_type
                                    for k in keys)
        self.order_by = ", ".join(
            f"{k.sql} {'DESC' if k.descending else 'ASC'}{' NULLS LAST' if k.nulls_last else ''}"
            for k in keys)
        self.row_value = (len({k.descending for k in keys}) == 1
                          and not any(k.nulls_last for k in keys))

    def cursor_values(self, row):
        """The cursor of a row: `page()` encodes it for the last row of a page."""
        return [self.name] + [row[key.column] for key in self.keys]

    def after(self, cursor):
        """The SQL condition and its parameters for the rows strictly after `cursor` (the list
        `list_params` decoded with this sort's `shape`)."""
        name, *values = cursor
        if name != self.name:
            raise invalid_cursor()
        if self.row_value:
            columns = ", ".join(key.sql for key in self.keys)
            marks = ", ".join("?" * len(values))
            return f"({columns}) {'<' if self.keys[0].descending else '>'} ({marks})", values
        terms, params = [], []
        for i, (key, value) in enumerate(zip(self.keys, values)):
            if value is None:
                continue  # nothing comes after NULL in this key: only ties, decided by later keys
            same, same_params = [], []
            for earlier, earlier_value in zip(self.keys[:i], values[:i]):
                if earlier_value is None:
                    same.append(f"{earlier.column} IS NULL")
                else:
                    same.append(f"{earlier.sql} = ?")
                    same_params.append(earlier_value)
            beyond = f"{key.sql} {'<' if key.descending else '>'} ?"
            if key.nulls_last:
                beyond = f"({beyond} OR {key.column} IS NULL)"
            terms.append("(" + " AND ".join(same + [beyond]) + ")")
            params += same_params + [value]
        return "(" + " OR ".join(terms) + ")", params
