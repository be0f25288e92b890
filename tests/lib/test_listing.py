"""lib/listing.py: opaque cursors (round trip, and a 400 for anything this server did not issue),
`page()`, and `Sort.after()` run against a real sqlite table: walking the pages of every declared
order visits every row exactly once, in order — NULLs, ties, mixed directions, collations, and
rows inserted or deleted between pages included."""
import base64
import random
import sqlite3

import pytest

from lib.problems import BadRequest
from lib.listing import (DEFAULT_LIMIT, MAX_LIMIT, Sort, SortKey, decode_cursor, encode_cursor,
                         list_params, page)
from lib.request import Request


def raw_cursor(data):
    """A cursor made by hand: base64url of arbitrary bytes, unpadded like the real ones."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cursor_refusal(text, shape):
    with pytest.raises(BadRequest) as caught:
        decode_cursor(text, shape)
    error = caught.value
    assert error.status == 400
    assert error.errors == [{"field": "cursor", "message": "is not a cursor this server issued"}]
    return error


# --- cursors -------------------------------------------------------------------------------


@pytest.mark.parametrize("values, shape", [
    (["2026-03-01T10:00:00Z", 17], (str, int)),
    (["due", None, 3], (str, (str, type(None)), int)),
    (["due", "2026-03-01", 3], (str, (str, type(None)), int)),
    (["é 🎉 \"quoted\"", -5], (str, int)),
    ([1.5, 2**63 - 1], (float, int)),
    ([-2**63], (int,)),
])
def test_cursor_round_trip(values, shape):
    text = encode_cursor(values)
    assert decode_cursor(text, shape) == values


def test_cursor_is_url_safe_without_padding():
    for n in range(1, 40):
        text = encode_cursor(["x" * n, n, "?/+"])
        assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize("text", [
    pytest.param("!!!!", id="not-base64"),
    pytest.param("a", id="impossible-length"),
    pytest.param("é", id="non-ascii"),
    pytest.param(raw_cursor(b"\xff\xfe\xfd"), id="not-utf8"),
    pytest.param(raw_cursor(b"not json"), id="not-json"),
    pytest.param(raw_cursor(b'{"a": 1}'), id="object-not-list"),
    pytest.param(raw_cursor(b'"x"'), id="string"),
    pytest.param(raw_cursor(b"null"), id="null"),
    pytest.param(encode_cursor(["x", 1])[:-2], id="truncated"),
    pytest.param(encode_cursor(["x", 1]) + "AAAA", id="extra-bytes"),
])
def test_garbage_cursor_is_400(text):
    cursor_refusal(text, (str, int))


@pytest.mark.parametrize("values", [
    pytest.param(["x"], id="too-short"),
    pytest.param(["x", 1, 2], id="too-long"),
    pytest.param([], id="empty"),
    pytest.param([1, "x"], id="types-swapped"),
    pytest.param(["x", "1"], id="int-as-string"),
    pytest.param(["x", 1.0], id="int-as-float"),
    pytest.param(["x", True], id="bool-for-int"),
    pytest.param(["x", None], id="null-where-not-nullable"),
    pytest.param(["x", [1]], id="nested"),
    pytest.param(["x", 2**63], id="int-past-64-bits"),
    pytest.param(["x", -2**63 - 1], id="int-below-64-bits"),
    pytest.param(["\ud800", 1], id="lone-surrogate"),
])
def test_cursor_of_the_wrong_shape_is_400(values):
    cursor_refusal(encode_cursor(values), (str, int))


def test_tampered_cursor_is_400():
    text = encode_cursor(["2026-03-01", 17])
    flipped = text[:3] + ("A" if text[3] != "A" else "B") + text[4:]
    cursor_refusal(flipped, (str, int))


def test_deeply_nested_cursor_is_400():
    cursor_refusal(raw_cursor(b"[" * 5000), (str, int))


def test_list_params_defaults():
    assert list_params(Request("GET", "/", ""), (str, int)) == (DEFAULT_LIMIT, None)


def test_list_params_reads_limit_and_cursor():
    cursor = encode_cursor(["a", 3])
    request = Request("GET", "/", f"limit=5&cursor={cursor}")
    assert list_params(request, (str, int)) == (5, ["a", 3])


def test_empty_cursor_means_first_page():
    assert list_params(Request("GET", "/", "cursor="), (str, int)) == (DEFAULT_LIMIT, None)


@pytest.mark.parametrize("query", ["limit=0", f"limit={MAX_LIMIT + 1}", "limit=x", "cursor=@@@@"])
def test_list_params_refuses_with_400(query):
    with pytest.raises(BadRequest):
        list_params(Request("GET", "/", query), (str, int))


# --- page ----------------------------------------------------------------------------------


def test_page_with_more_rows_than_the_limit():
    rows = [{"id": 1}, {"id": 2}, {"id": 3}]
    result = page(rows, 2, lambda row: [row["id"]], render=lambda row: row["id"] * 10)
    assert result["items"] == [10, 20]
    assert decode_cursor(result["next_cursor"], (int,)) == [2]   # the last row shown


@pytest.mark.parametrize("count", [0, 1, 2])
def test_page_without_more_rows_has_no_next_cursor(count):
    rows = [{"id": i} for i in range(count)]
    assert page(rows, 2, lambda row: [row["id"]]) == {"items": rows, "next_cursor": None}


# --- Sort: the SQL it writes -----------------------------------------------------------------

BY_ID = Sort("id", SortKey("id", int))
NEWEST = Sort("-updated", SortKey("updated", str, descending=True), SortKey("id", int, descending=True))
BY_TITLE = Sort("title", SortKey("title", str, collate="NOCASE"), SortKey("id", int))
BY_DUE = Sort("due", SortKey("due", str, nulls_last=True), SortKey("id", int))
LATEST_DUE = Sort("-due", SortKey("due", str, descending=True, nulls_last=True), SortKey("id", int))
PRIORITY_THEN_DUE = Sort("-priority,due", SortKey("priority", int, descending=True),
                         SortKey("due", str, nulls_last=True), SortKey("id", int))
TITLE_DESC_NOCASE = Sort("-title", SortKey("title", str, descending=True, collate="NOCASE"),
                         SortKey("id", int))
ALL_SORTS = [BY_ID, NEWEST, BY_TITLE, BY_DUE, LATEST_DUE, PRIORITY_THEN_DUE, TITLE_DESC_NOCASE]


def test_order_by():
    assert NEWEST.order_by == "updated DESC, id DESC"
    assert BY_TITLE.order_by == "title COLLATE NOCASE ASC, id ASC"
    assert LATEST_DUE.order_by == "due DESC NULLS LAST, id ASC"


def test_shape_starts_with_the_sort_name_and_allows_null_for_nulls_last_keys():
    assert NEWEST.shape == (str, str, int)
    assert BY_DUE.shape == (str, (str, type(None)), int)


def test_same_direction_without_nulls_uses_a_row_value():
    assert NEWEST.after(["-updated", "2026-03-01", 7]) == ("(updated, id) < (?, ?)", ["2026-03-01", 7])
    assert BY_TITLE.after(["title", "a", 1]) == ("(title COLLATE NOCASE, id) > (?, ?)", ["a", 1])


def rows_after(sort, cursor, rows):
    """The ids `sort.after(cursor)` selects from `rows` of (id, due), in the sort's order."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, due TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", rows)
    where, params = sort.after(cursor)
    found = conn.execute(f"SELECT id FROM t WHERE {where} ORDER BY {sort.order_by}", params)
    return [row[0] for row in found]


DUE_ROWS = [(1, "2026-02-28"), (5, "2026-03-01"), (8, "2026-03-01"), (2, "2026-03-02"),
            (3, None), (9, None)]


def test_nulls_last_is_not_a_row_value():
    # In SQL `NULL > '2026-03-01'` is NULL, not true: a row value would drop every NULL row.
    where, params = BY_DUE.after(["due", "2026-03-01", 7])
    assert "(due, id)" not in where
    assert rows_after(BY_DUE, ["due", "2026-03-01", 7], DUE_ROWS) == [8, 2, 3, 9]


def test_after_a_null_only_ties_broken_by_later_keys_follow():
    assert rows_after(BY_DUE, ["due", None, 3], DUE_ROWS) == [9]
    assert rows_after(LATEST_DUE, ["-due", None, 3], DUE_ROWS) == [9]


def test_descending_with_nulls_last():
    assert rows_after(LATEST_DUE, ["-due", "2026-03-01", 5], DUE_ROWS) == [8, 1, 3, 9]


def test_cursor_of_another_sort_is_400():
    cursor = decode_cursor(encode_cursor(["-updated", "2026-03-01", 7]), BY_DUE.shape)
    with pytest.raises(BadRequest) as caught:
        BY_DUE.after(cursor)
    assert caught.value.errors == [{"field": "cursor", "message": "is not a cursor this server issued"}]


def test_cursor_of_another_shape_is_400():
    cursor_refusal(encode_cursor(["due", None, 7]), NEWEST.shape)


# --- Sort: paging through a real table -------------------------------------------------------

SCHEMA = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    updated TEXT NOT NULL,
    due TEXT,
    priority INTEGER NOT NULL
)"""
TITLES = ["apple", "Apple", "APPLE", "banana", "Banana", "cherry", "_under", "Zed", "zed", "é"]
DATES = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-04-10"]


@pytest.fixture
def db():
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    conn.execute(SCHEMA.format(name="items"))
    conn.execute(SCHEMA.format(name="archive"))   # every row ever inserted, for the expected order
    rng = random.Random(20260301)
    for _ in range(60):
        insert_random(conn, rng)
    yield conn
    conn.close()


def insert_random(conn, rng):
    """A row with many ties (few titles, dates and priorities) and NULL dates."""
    values = (rng.choice(TITLES), rng.choice(DATES),
              rng.choice(DATES + [None, None]), rng.randint(1, 3))
    row_id = conn.execute("INSERT INTO items (title, updated, due, priority) VALUES (?, ?, ?, ?)",
                          values).lastrowid
    conn.execute("INSERT INTO archive (id, title, updated, due, priority) VALUES (?, ?, ?, ?, ?)",
                 (row_id, *values))


def read_page(conn, sort, limit, cursor_text):
    """One page, the way a handler reads it: decode the cursor, ask for limit + 1 rows."""
    cursor = decode_cursor(cursor_text, sort.shape) if cursor_text else None
    where, params = sort.after(cursor) if cursor else ("1", [])
    rows = conn.execute(f"SELECT * FROM items WHERE {where} ORDER BY {sort.order_by} LIMIT ?",
                        [*params, limit + 1]).fetchall()
    return page(rows, limit, sort.cursor_values, render=lambda row: row["id"])


def walk(conn, sort, limit, between_pages=lambda: None):
    """The ids of every page, in order, following next_cursor to the end."""
    seen, cursor = [], None
    for _ in range(1000):
        result = read_page(conn, sort, limit, cursor)
        seen += result["items"]
        cursor = result["next_cursor"]
        if cursor is None:
            return seen
        between_pages()
    raise AssertionError("the pages never ended")


def ordered_ids(conn, sort, table="items", among=None):
    rows = conn.execute(f"SELECT id FROM {table} ORDER BY {sort.order_by}").fetchall()
    return [row["id"] for row in rows if among is None or row["id"] in among]


@pytest.mark.parametrize("sort", ALL_SORTS, ids=lambda sort: sort.name)
@pytest.mark.parametrize("limit", [1, 7, 60, 100])
def test_pages_visit_every_row_once_in_order(db, sort, limit):
    assert walk(db, sort, limit) == ordered_ids(db, sort)


@pytest.mark.parametrize("sort", ALL_SORTS, ids=lambda sort: sort.name)
def test_only_null_keys_left(db, sort):
    db.execute("UPDATE items SET due = NULL")
    db.execute("UPDATE archive SET due = NULL")
    assert walk(db, sort, 4) == ordered_ids(db, sort)


@pytest.mark.parametrize("sort", ALL_SORTS, ids=lambda sort: sort.name)
def test_empty_table(db, sort):
    db.execute("DELETE FROM items")
    assert read_page(db, sort, 5, None) == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("sort", ALL_SORTS, ids=lambda sort: sort.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pages_stay_correct_while_rows_come_and_go(db, sort, seed):
    """Between pages, rows are inserted and deleted (some before the cursor, some after it).
    No row is shown twice, the pages stay in order, and every row that was there from the first
    page to the last is shown."""
    rng = random.Random(seed)
    present_at_start = {row["id"] for row in db.execute("SELECT id FROM items")}
    deleted = set()

    def churn():
        for _ in range(2):
            insert_random(db, rng)
        ids = sorted(row["id"] for row in db.execute("SELECT id FROM items"))
        for victim in rng.sample(ids, 2):
            db.execute("DELETE FROM items WHERE id = ?", (victim,))
            deleted.add(victim)

    seen = walk(db, sort, 5, churn)
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert seen == ordered_ids(db, sort, "archive", among=set(seen)), "pages out of order"
    assert present_at_start - deleted <= set(seen), "a row that stayed was skipped"
