"""Expense tracker — money a backend owns: exact amounts, per-user categories, summaries, CSV.

What it teaches:

- Money is never a float. `0.1 + 0.2` is `0.30000000000000004` in binary floating point, and a
  ledger that rounds on the way in drifts a cent at a time. Amounts arrive as decimal strings
  (`"12.30"`), are read digit by digit into integer minor units (1230 cents) by
  `parse_amount`, stored as sqlite INTEGERs, summed by the database as integers, and written
  back with exactly two decimals by `format_amount`. A JSON number is refused: most clients
  have already turned it into a binary float before it was sent.
- Never adding two currencies. Every expense carries its ISO 4217 currency code; summaries give
  one total per currency, never a grand total of dollars plus euros.
- Data that belongs to someone. Every row has an owner (the `X-User-Id` of level 02, see
  notes.py); another user's expense or category is a 404 for every verb, and a `category_id`
  the caller does not own is a 422 naming the field. Category names are unique per user,
  case-insensitively, enforced by a unique index so two concurrent requests cannot both win.
- A reference that must not dangle: a category still used by expenses cannot be deleted (409),
  unless its expenses are moved to another one (`?reassign_to=`) in the same transaction.
- Lists with filters and keyset pagination (lib/listing.py), sorted by date or amount.
- Exporting data safely: RFC 4180 CSV written by the `csv` module, with every cell that a
  spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR: OWASP "CSV Injection")
  neutralised by a leading `'`. contacts.py imports these CSV functions from here.

Standards: ISO 4217 (currency codes), RFC 4180 (CSV), RFC 6266 (Content-Disposition),
RFC 9110 (ETag / If-Match), RFC 9457 (problem details), RFC 3339 (dates and times).

Left out: currencies whose minor unit is not a hundredth (JPY has none, KWD has thousandths;
every amount here has two decimals), checking codes against the ISO 4217 list (`XYZ` has the
right shape and is accepted), exchange rates, recurring expenses, budgets, attachments
(receipts), and streaming a very large export (it is built in memory; see expenses.md).

    python level02/expenses.py [--currency USD] [--db PATH] [--trace] [--server threaded]
"""
import argparse
import csv
import datetime
import io
import re
import sqlite3
import sys
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, Conflict, ValidationFailed, created, json_response, no_content, text_response
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, bad_query
from lib.routing import PAGE
from lib.validation import Date, Field, Integer, Invalid, Text, body_schema, validate
from level01.counter import etag
from level02.notes import (delete_owned, find_owned, owned_for_update, require_user, timestamp,
                           update_owned)

app = App("expenses", "Expenses in exact money: decimal strings stored as integer minor units, "
                      "per-user categories, summaries per currency, CSV export.", port=8006)

MAX_ID = 2**63 - 1          # sqlite's INTEGER PRIMARY KEY range

# --- schema ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS categories (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a deleted id stays a 404
    owner      TEXT NOT NULL,                      -- the X-User-Id that created it
    name       TEXT NOT NULL,                      -- as the user wrote it
    name_key   TEXT NOT NULL,                      -- category_key(name): what uniqueness compares
    version    INTEGER NOT NULL DEFAULT 1,         -- +1 on every change: the ETag
    created_at TEXT NOT NULL,                      -- RFC 3339 UTC
    updated_at TEXT NOT NULL
);
-- Uniqueness is the database's job: a check in Python followed by an INSERT lets two
-- concurrent requests both pass the check. The index makes the second INSERT fail.
CREATE UNIQUE INDEX IF NOT EXISTS categories_owner_name ON categories (owner, name_key);

CREATE TABLE IF NOT EXISTS expenses (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    owner        TEXT NOT NULL,
    -- Integer minor units (cents). The CHECK is the last line of defence: sqlite would
    -- otherwise store 12.3 as a REAL without complaint.
    amount_minor INTEGER NOT NULL
                 CHECK (typeof(amount_minor) = 'integer' AND amount_minor BETWEEN 1 AND 100000000000),
    currency     TEXT NOT NULL CHECK (currency GLOB '[A-Z][A-Z][A-Z]'),   -- ISO 4217
    category_id  INTEGER REFERENCES categories (id),                      -- NULL: uncategorised
    date         TEXT NOT NULL,                                           -- YYYY-MM-DD
    note         TEXT NOT NULL,
    note_key     TEXT NOT NULL,                                           -- note.casefold(), for q
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
-- One index per sort order, each ending with id: the keyset of lib/listing.py.
CREATE INDEX IF NOT EXISTS expenses_owner_date ON expenses (owner, date, id);
CREATE INDEX IF NOT EXISTS expenses_owner_amount ON expenses (owner, amount_minor, id);
CREATE INDEX IF NOT EXISTS expenses_category ON expenses (category_id);
"""

# --- money: decimal strings ⇄ integer minor units -------------------------------------------

MINOR_PER_UNIT = 100                          # ISO 4217 exponent 2: 100 cents to the dollar
MAX_AMOUNT = 1_000_000_000 * MINOR_PER_UNIT   # 1,000,000,000.00
# [0-9], not \d: \d also matches other scripts' digits ("١٢"), which int() would accept.
DECIMAL_AMOUNT = re.compile(r"(?P<units>[0-9]{1,13})(?:\.(?P<cents>[0-9]{1,2}))?")
# The same rule in /openapi.json. JSON Schema patterns are ECMA-262 regexes and unanchored: so
# anchored here, and without Python's group names (`(?P<name>…)`, which ECMA-262 cannot read).
AMOUNT_PATTERN = "^" + re.sub(r"\(\?P<\w+>", "(", DECIMAL_AMOUNT.pattern) + "$"
# A body's amount is also in range, > 0 and ≤ MAX_AMOUNT; a regex cannot compare numbers, so the
# range is spelled out in digits: at most 13 digits before the point and a value below 10**9 is
# up to 4 leading zeros and 9 digits, or exactly 1000000000; above 0 is some digit from 1 to 9.
AMOUNT_IN_RANGE = [r"^(?:0{0,4}[0-9]{1,9}(?:\.[0-9]{1,2})?|0{0,3}1000000000(?:\.00?)?)$", "[1-9]"]


def parse_amount(text):
    """A decimal string → integer minor units, exactly: "12.30" → 1230, "12.3" → 1230,
    "12" → 1200.

    The digits go straight into an int; no float is ever made, so "0.10" and "0.20" are 10 and
    20 cents and their sum is 30, not 0.30000000000000004. Raises ValueError for anything else:
    a third decimal ("12.345": rounding it would change the amount silently), an exponent
    ("1e3"), a sign, spaces or thousands separators ("1,000")."""
    match = DECIMAL_AMOUNT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError('must be a decimal string with at most two decimals, like "12.30"')
    return int(match["units"]) * MINOR_PER_UNIT + int((match["cents"] or "").ljust(2, "0"))


def format_amount(minor):
    """Integer minor units → a decimal string with exactly two decimals: 1230 → "12.30"."""
    sign = "-" if minor < 0 else ""
    units, cents = divmod(abs(minor), MINOR_PER_UNIT)
    return f"{sign}{units}.{cents:02d}"


class Amount(Field):
    """A positive amount up to 1,000,000,000.00, sent as a decimal string; cleaned to minor
    units."""

    def shape(self):
        most = format_amount(MAX_AMOUNT)
        return {"type": "string", "pattern": AMOUNT_IN_RANGE[0], "allOf": [{"pattern": AMOUNT_IN_RANGE[1]}],
                "description": f'decimal string, > 0 and ≤ {most}, like "12.30"'}

    def clean(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise Invalid('must be a string like "12.30", not a JSON number (most clients '
                          'hold JSON numbers as binary floats)')
        try:
            minor = parse_amount(value)
        except ValueError as err:
            raise Invalid(str(err)) from None
        if not 0 < minor <= MAX_AMOUNT:
            raise Invalid(f"must be more than 0.00 and at most {format_amount(MAX_AMOUNT)}")
        return minor


CURRENCY_CODE = re.compile(r"[A-Z]{3}")   # ISO 4217 alphabetic code: its shape, not the list


def currency_field(**kw):
    return Text(3, 3, strip=False, pattern=CURRENCY_CODE.pattern,
                pattern_text="must be an ISO 4217 code: three capital letters, like USD", **kw)


# --- CSV export, safe to open in a spreadsheet ----------------------------------------------

# OWASP "CSV Injection": a cell that starts with one of these is run as a formula by Excel,
# LibreOffice and Google Sheets (`=HYPERLINK(...)`, `@SUM(...)`, `-2+3+cmd|...`). Tab and CR
# are on the list because some spreadsheets skip them and then see the next character.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(cell):
    """A cell as text that a spreadsheet shows instead of running: a leading `'` makes it a
    literal (and is not displayed). Other cells pass unchanged."""
    text = "" if cell is None else str(cell)
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


def unescape_formula(cell):
    """The inverse of `escape_formula`, for reading back a CSV this server wrote."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_TRIGGERS):
        return cell[1:]
    return cell


def csv_document(header, rows):
    """RFC 4180 text: a header row, then one record per row, CRLF line endings, fields quoted
    when they contain a comma, a quote or a line break (the `csv` module does the quoting; never
    join with commas by hand). Every cell goes through `escape_formula`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")   # RFC 4180 §2.1: records end with CRLF
    writer.writerow(header)
    for row in rows:
        writer.writerow([escape_formula(cell) for cell in row])
    return out.getvalue()


def csv_download(text, filename):
    """A CSV answer that browsers save as a file (RFC 6266) rather than show."""
    return text_response(text, content_type="text/csv; charset=utf-8",
                         headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# --- the domain: categories and expenses ----------------------------------------------------


def tagged(row):
    """The headers of an answer that is one row: its ETag, the row's version."""
    return {"ETag": etag(row["version"])}


def category_key(name):
    """What makes two category names "the same": NFKC folds look-alike forms (`ﬁ` → `fi`,
    full-width letters), casefold() is Unicode's case-insensitive comparison (`Straße` and
    `STRASSE` match, which lower() misses)."""
    return unicodedata.normalize("NFKC", name).casefold()


def category_json(row):
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def expense_json(row):
    return {"id": row["id"], "amount": format_amount(row["amount_minor"]),
            "currency": row["currency"], "category_id": row["category_id"], "date": row["date"],
            "note": row["note"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


# Every lookup by id also matches the owner: another user's row is simply not found, so the
# answer is the same 404 whether it exists or not (level02.md: never reveal it with a 403).
# notes.py's find_owned, update_owned and delete_owned do that for every row read or written
# by id; the check below is the same rule for a reference inside a body.
#
# It reads with `app.state.db.query_one`, inside a transaction or not: lib/storage.py gives each
# thread one connection, so on the thread that runs `with db.transaction()` a query *is* part of
# that transaction and sees (and is protected by) it.


def require_category_reference(owner, category_id, field="category_id"):
    """A body that points at a category must point at one of the caller's own: anything else
    is a 422 naming the field (common.md: "a reference to nothing the caller owns")."""
    if category_id is None:
        return
    found = app.state.db.query_one("SELECT 1 FROM categories WHERE id = ? AND owner = ?",
                                   (category_id, owner))
    if found is None:
        raise ValidationFailed({field: f"{category_id} is not one of your categories"})


def name_taken(owner, name):
    """The 409 for a category name the caller already uses, naming that category."""
    existing = app.state.db.query_one(
        "SELECT id, name FROM categories WHERE owner = ? AND name_key = ?", (owner, category_key(name)))
    return Conflict(f"you already have a category named {existing['name']!r} (id {existing['id']})",
                    category_id=existing["id"])


# --- reading the query string of lists, summaries and exports -------------------------------


def query_amount(request, name):
    text = request.query_param(name)
    if not text:
        return None
    try:
        return parse_amount(text)
    except ValueError as err:
        raise bad_query(name, str(err)) from None


def expense_filter(request, owner):
    """The WHERE clause (and its parameters) of the filters in the query string — one function
    for the list, the summary and the export, so the three always agree. Values are always
    parameters, never pasted into the SQL text."""
    where, params = ["e.owner = ?"], [owner]
    # An impossible date (2026-02-30) is a 400 here: a bad query parameter (common.md).
    start, end = FILTERS["from"].read(request), FILTERS["to"].read(request)
    if start and end and start > end:
        raise bad_query("from", "must not be after 'to'")
    low, high = query_amount(request, "min"), query_amount(request, "max")
    if low is not None and high is not None and low > high:
        raise bad_query("min", "must not be more than 'max'")
    category_id = FILTERS["category_id"].read(request)
    currency = request.query_param("currency")
    if currency and not CURRENCY_CODE.fullmatch(currency):
        raise bad_query("currency", "must be an ISO 4217 code: three capital letters")
    q = (request.query_param("q") or "").strip().casefold()
    start, end = start and start.isoformat(), end and end.isoformat()
    for clause, value in (("e.date >= ?", start), ("e.date <= ?", end),
                          ("e.amount_minor >= ?", low), ("e.amount_minor <= ?", high),
                          ("e.category_id = ?", category_id), ("e.currency = ?", currency or None),
                          # instr, not LIKE: `%` and `_` in q are plain characters
                          ("instr(e.note_key, ?) > 0", q or None)):
        if value is not None:
            where.append(clause)
            params.append(value)
    return " AND ".join(where), params


# `sort` → its order (lib/listing.py writes the ORDER BY and the keyset condition). The id ends
# every order, so expenses on one date or of one amount still have a position each.
SORTS = {
    "-date": Sort("-date", SortKey("date", str, descending=True),
                  SortKey("id", int, descending=True)),
    "date": Sort("date", SortKey("date", str), SortKey("id", int)),
    "-amount": Sort("-amount", SortKey("amount_minor", int, descending=True),
                    SortKey("id", int, descending=True)),
    "amount": Sort("amount", SortKey("amount_minor", int), SortKey("id", int)),
}

# group_by → (the group's key, the order of the groups)
GROUPS = {
    # by name, the uncategorised last
    "category": ("e.category_id", "c.name_key IS NULL, c.name_key, e.category_id"),
    "month": ("substr(e.date, 1, 7)", "substr(e.date, 1, 7)"),
    "day": ("e.date", "e.date"),
}


def summarise(rows, group_by):
    """Rows of (group, currency, count, sum in minor units) → groups with one total per
    currency, and grand totals per currency. Sums of integers are exact; the strings are made
    only at the end. Two currencies are never added together."""
    groups, grand, count = {}, {}, 0
    for row in rows:
        group = groups.get(row["grp"])
        if group is None:
            group = groups[row["grp"]] = {"key": row["grp"]}
            if group_by == "category":
                group["category"] = row["category_name"]   # None: uncategorised
            group.update(count=0, totals={})
        group["count"] += row["n"]
        group["totals"][row["currency"]] = row["total"]
        grand[row["currency"]] = grand.get(row["currency"], 0) + row["total"]
        count += row["n"]
    for group in groups.values():
        group["totals"] = {code: format_amount(minor) for code, minor in sorted(group["totals"].items())}
    return {"groups": list(groups.values()), "count": count,
            "totals": {code: format_amount(total) for code, total in sorted(grand.items())}}


# --- routes: categories ---------------------------------------------------------------------

READ_ONLY = {"id", "owner", "created_at", "updated_at"}
CATEGORIES_BY_NAME = Sort("name", SortKey("name_key", str), SortKey("id", int))
CATEGORY_FIELDS = {"name": Text(1, 100, required=True)}
USER = {401: "no valid X-User-Id header"}
STALE = "If-Match names a version that is no longer current; nothing changed"


@app.post("/categories", request_schema=body_schema(CATEGORY_FIELDS),
          responses={201: "the category (Location, ETag)", 409: "you already have one by that name",
                     422: "bad or unknown fields", **USER})
def create_category(request):
    """Create a category of your own (names unique per user, case-insensitively)"""
    owner = require_user(request)
    values = validate(request.json_object(), CATEGORY_FIELDS, read_only=READ_ONLY)
    now = timestamp()
    with app.state.db.transaction() as conn:
        try:
            # fetchall: step the statement to its end, so it is finished before COMMIT
            row = conn.execute(
                "INSERT INTO categories (owner, name, name_key, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING *",
                (owner, values["name"], category_key(values["name"]), now, now)).fetchall()[0]
        except sqlite3.IntegrityError:
            raise name_taken(owner, values["name"]) from None
    return created(category_json(row), f"/categories/{row['id']}", headers=tagged(row))


@app.get("/categories", query=PAGE, responses={200: '{"items", "next_cursor"}, by name', **USER})
def list_categories(request):
    """Your categories, ordered by name (paginated)"""
    owner = require_user(request)
    limit, cursor = list_params(request, CATEGORIES_BY_NAME.shape)
    after, params = CATEGORIES_BY_NAME.after(cursor) if cursor else ("1", [])
    rows = app.state.db.query(
        f"SELECT * FROM categories WHERE owner = ? AND {after} "
        f"ORDER BY {CATEGORIES_BY_NAME.order_by} LIMIT ?", (owner, *params, limit + 1))
    return page(rows, limit, CATEGORIES_BY_NAME.cursor_values, category_json)


@app.get("/categories/{category_id:int}", responses={404: "no such category of yours", **USER})
def read_category(request, category_id):
    """One of your categories (ETag: its version)"""
    owner = require_user(request)
    with app.state.db.reading() as conn:
        row = find_owned(conn, "categories", owner, category_id)
    return json_response(category_json(row), headers=tagged(row))


@app.patch("/categories/{category_id:int}",
           request_schema=body_schema(CATEGORY_FIELDS, partial=True), if_match=True,
           responses={404: "no such category of yours", 409: "the new name is taken",
                      412: STALE, 422: "bad or unknown fields", **USER})
def rename_category(request, category_id):
    """Rename a category (honours If-Match)"""
    owner = require_user(request)
    values = validate(request.json_object(), CATEGORY_FIELDS, partial=True, read_only=READ_ONLY)
    changes = {"name": values["name"], "name_key": category_key(values["name"])} if values else {}
    try:   # If-Match is checked inside the write's transaction: still current at the write
        row = update_owned(app.state.db, "categories", owner, category_id,
                           request.require_if_match, lambda current: changes)
    except sqlite3.IntegrityError:
        raise name_taken(owner, values["name"]) from None
    return json_response(category_json(row), headers=tagged(row))


REASSIGN_TO = Query("reassign_to", "move this category's expenses to that category of yours first",
                    int, None, 1, MAX_ID)


@app.delete("/categories/{category_id:int}",
            query=[REASSIGN_TO], if_match=True,
            responses={204: "deleted", 404: "no such category of yours",
                       409: "expenses still use it and no reassign_to was given", 412: STALE,
                       422: "reassign_to is not another category of yours", **USER})
def delete_category(request, category_id):
    """Delete a category; 409 while expenses use it, unless ?reassign_to=ID moves them"""
    owner = require_user(request)
    reassign_to = REASSIGN_TO.read(request)
    with app.state.db.transaction() as conn:
        owned_for_update(conn, "categories", owner, category_id, request.require_if_match)
        if reassign_to is not None:
            if reassign_to == category_id:
                raise ValidationFailed({"reassign_to": "must be another category than the one deleted"})
            require_category_reference(owner, reassign_to, field="reassign_to")
            # Moved expenses change, so their versions (ETags) change too.
            conn.execute("UPDATE expenses SET category_id = ?, version = version + 1, updated_at = ? "
                         "WHERE category_id = ? AND owner = ?", (reassign_to, timestamp(), category_id, owner))
        else:
            used = conn.execute("SELECT count(*) FROM expenses WHERE category_id = ?",
                                (category_id,)).fetchone()[0]
            if used:
                raise Conflict(f"{used} expense(s) use category {category_id}; delete them, or move "
                               f"them with ?reassign_to=ID", expenses=used)
        conn.execute("DELETE FROM categories WHERE id = ?", (category_id,))
    return no_content()


# --- routes: expenses -----------------------------------------------------------------------

EXPENSE_FIELDS = {
    "amount": Amount(required=True),
    "currency": currency_field(default=lambda: app.state.currency,
                               description="ISO 4217 code; default: the server's --currency"),
    "category_id": Integer(1, MAX_ID, nullable=True, default=None,
                           description="one of your categories; null: uncategorised"),
    "date": Date(required=True),
    "note": Text(0, 1000, default=""),
}
FILTERS = {q.name: q for q in (
    Query("from", "on or after this date (YYYY-MM-DD)", datetime.date),
    Query("to", "on or before this date", datetime.date),
    Query("category_id", "only this category", int, None, 1, MAX_ID),
    Query("min", 'amount at least, e.g. "10.00"', {"pattern": AMOUNT_PATTERN}),
    Query("max", "amount at most", {"pattern": AMOUNT_PATTERN}),
    Query("currency", "only this ISO 4217 code", {"pattern": f"^{CURRENCY_CODE.pattern}$"}),
    Query("q", "text in the note (case-insensitive)"))}
SORT = Query("sort", "-date (default), date, -amount or amount", tuple(SORTS), "-date")
GROUP_BY = Query("group_by", "category (default), month or day", tuple(GROUPS), "category")
EXPENSE_ERRORS = {404: "no such expense of yours", 412: STALE,
                  422: "bad, unknown or read-only fields; a category_id that is not yours", **USER}


def save_expense(conn, owner, values, now):
    row = conn.execute(
        "INSERT INTO expenses (owner, amount_minor, currency, category_id, date, note, note_key, "
        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        (owner, values["amount"], values["currency"], values["category_id"], values["date"],
         values["note"], values["note"].casefold(), now, now)).fetchall()
    return row[0]


def expense_columns(values):
    """Validated fields → column values: the amount in minor units, the note with its key."""
    columns = {"amount_minor" if name == "amount" else name: value for name, value in values.items()}
    if "note" in values:
        columns["note_key"] = values["note"].casefold()
    return columns


def change_expense(request, owner, expense_id, values):
    """PUT and PATCH: write `values` over the caller's expense with notes' `update_owned` (404,
    If-Match, one transaction), which also holds the check of the category reference. A change
    to nothing (an empty PATCH) is no change, not even of the version."""
    def changes_for(row):
        if "category_id" in values:
            require_category_reference(owner, values["category_id"])
        return expense_columns(values)

    row = update_owned(app.state.db, "expenses", owner, expense_id, request.require_if_match,
                       changes_for)
    return json_response(expense_json(row), headers=tagged(row))


@app.post("/expenses", request_schema=body_schema(EXPENSE_FIELDS),
          responses={201: "the expense (Location, ETag)", **EXPENSE_ERRORS})
def create_expense(request):
    """Record an expense: {"amount": "12.30", "currency", "category_id", "date", "note"}"""
    owner = require_user(request)
    values = validate(request.json_object(), EXPENSE_FIELDS, read_only=READ_ONLY)
    with app.state.db.transaction() as conn:
        # The check and the INSERT share one transaction: the category cannot be deleted
        # between them.
        require_category_reference(owner, values["category_id"])
        row = save_expense(conn, owner, values, timestamp())
    return created(expense_json(row), f"/expenses/{row['id']}", headers=tagged(row))


@app.get("/expenses", query=[*FILTERS.values(), SORT, *PAGE],
         responses={200: '{"items", "next_cursor"}', 400: "a bad filter, sort, limit or cursor", **USER})
def list_expenses(request):
    """Your expenses, filtered and sorted (paginated)"""
    owner = require_user(request)
    sort = SORTS[SORT.read(request)]
    limit, cursor = list_params(request, sort.shape)
    where, params = expense_filter(request, owner)
    if cursor:
        after, after_params = sort.after(cursor)
        where += f" AND {after}"
        params += after_params
    rows = app.state.db.query(
        f"SELECT * FROM expenses e WHERE {where} ORDER BY {sort.order_by} LIMIT ?", (*params, limit + 1))
    return page(rows, limit, sort.cursor_values, expense_json)


@app.get("/expenses/summary", query=[GROUP_BY, *FILTERS.values()],
         responses={200: '{"groups": [{"key", "count", "totals": {"USD": "12.30"}}], "count", '
                         '"totals"}', 400: "a bad filter or group_by", **USER})
def summarise_expenses(request):
    """Totals per group and per currency, exact, never mixing currencies"""
    owner = require_user(request)
    group_by = GROUP_BY.read(request)
    key, order = GROUPS[group_by]
    where, params = expense_filter(request, owner)
    # SUM over INTEGER columns is integer arithmetic in sqlite: exact.
    rows = app.state.db.query(
        f"SELECT {key} AS grp, c.name AS category_name, e.currency, count(*) AS n, "
        f"sum(e.amount_minor) AS total FROM expenses e "
        f"LEFT JOIN categories c ON c.id = e.category_id WHERE {where} "
        f"GROUP BY grp, e.currency ORDER BY {order}, e.currency", params)
    return {"group_by": group_by, "from": request.query_param("from") or None,
            "to": request.query_param("to") or None, **summarise(rows, group_by)}


EXPORT_COLUMNS = ["id", "date", "amount", "currency", "category_id", "category", "note"]


@app.get("/expenses/export.csv", blocking=True, query=[*FILTERS.values(), SORT], media_type="text/csv",
         responses={200: "text/csv (RFC 4180) of every matching expense, header row first",
                    400: "a bad filter or sort", **USER})
def export_expenses(request):
    """Every expense matching the filters (all pages) as a CSV download"""
    owner = require_user(request)
    sort = SORTS[SORT.read(request)]
    where, params = expense_filter(request, owner)
    # The category's name by a subquery rather than a join, so that the sort's unqualified
    # columns (`date`, `id`) can only mean the expense's.
    rows = app.state.db.query(
        f"SELECT *, (SELECT name FROM categories c WHERE c.id = e.category_id) AS category_name "
        f"FROM expenses e WHERE {where} ORDER BY {sort.order_by}", params)
    records = ([row["id"], row["date"], format_amount(row["amount_minor"]), row["currency"],
                row["category_id"], row["category_name"], row["note"]] for row in rows)
    return csv_download(csv_document(EXPORT_COLUMNS, records), "expenses.csv")


@app.get("/expenses/{expense_id:int}", responses={200: "the expense (ETag)", **EXPENSE_ERRORS})
def read_expense(request, expense_id):
    """One of your expenses"""
    owner = require_user(request)
    with app.state.db.reading() as conn:
        row = find_owned(conn, "expenses", owner, expense_id)
    return json_response(expense_json(row), headers=tagged(row))


@app.put("/expenses/{expense_id:int}", request_schema=body_schema(EXPENSE_FIELDS), if_match=True,
         responses={200: "the expense (ETag)", **EXPENSE_ERRORS})
def replace_expense(request, expense_id):
    """Replace an expense: fields left out take their defaults (honours If-Match)"""
    owner = require_user(request)
    values = validate(request.json_object(), EXPENSE_FIELDS, read_only=READ_ONLY)
    return change_expense(request, owner, expense_id, values)


@app.patch("/expenses/{expense_id:int}", request_schema=body_schema(EXPENSE_FIELDS, partial=True),
           if_match=True,
           responses={200: "the expense (ETag)", **EXPENSE_ERRORS})
def update_expense(request, expense_id):
    """Change the fields given (honours If-Match)"""
    owner = require_user(request)
    values = validate(request.json_object(), EXPENSE_FIELDS, partial=True, read_only=READ_ONLY)
    return change_expense(request, owner, expense_id, values)


@app.delete("/expenses/{expense_id:int}", if_match=True, responses={204: "deleted", **EXPENSE_ERRORS})
def delete_expense(request, expense_id):
    """Delete an expense (honours If-Match)"""
    delete_owned(app.state.db, "expenses", require_user(request), expense_id,
                 request.require_if_match)
    return no_content()


# --- running --------------------------------------------------------------------------------


def currency_code(text):
    if not CURRENCY_CODE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 4217 code (three capital letters)")
    return text


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--currency", type=currency_code, default="USD",
                        help="currency of an expense sent without one (ISO 4217, default USD)")
    args = parser.parse_args(argv)
    app.state.currency = args.currency
    app.state.db = app.open_database(args, SCHEMA)
    app.run(args)


if __name__ == "__main__":
    main()
