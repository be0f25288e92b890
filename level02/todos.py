"""Todos — each user's to-do list, with due dates, priorities and bulk changes.

It stands on notes.py, which teaches ownership, validation, ETags and keyset lists; this file
imports those and teaches what a to-do list adds:

- Server-owned state derived from what the client says: `PATCH {"done": true}` sets
  `completed_at` (the server's clock, never the client's), `{"done": false}` clears it. Only
  `completed_at` is stored; `done` is computed from it, so the two can never disagree.
- Dates that belong to the user: a due date is a calendar day (`2026-03-01`), not an instant.
  "Overdue" and "due today" depend on where the user is: at 20:00 in New York it is already
  tomorrow in UTC. Lists and the summary take the user's IANA time zone, `?tz=America/New_York`
  (UTC when absent), and compare due dates with *their* today.
- NULLs in an order: todos without a due date sort last, in `due` and `-due` alike, and the
  keyset cursor must step past them correctly (`NULL > '2026-03-01'` is not true in SQL; see
  lib/listing.py `Sort`).
- Ordering by meaning, not spelling: priority is stored as its rank (low 1, normal 2, high 3),
  so `sort=-priority` puts high first instead of sorting the words alphabetically.
- All or nothing: `POST /todos/bulk` changes many todos in one transaction; one id that is not
  the caller's and nothing changes.
- Aggregates in SQL: `GET /todos/summary` counts in one `GROUP BY` query.

Dates: a date in a JSON body must exist on the calendar (2026-02-30 is a 422, a validation
failure); in a query parameter (`?due_before=2026-02-30`) it is a 400, a bad query parameter,
as common.md's table says.

The user is named by the `X-User-Id` header (notes.py `require_user`): NOT authentication,
which level 03 adds.

Standards: RFC 9110 (HTTP semantics), RFC 9457 (problem details), RFC 3339 (full-date for `due`,
date-time for timestamps), the IANA time zone database (zone names such as Europe/Paris).

Left out: recurring todos, subtasks, reminders (level 04 sends email, level 05 schedules),
sharing a list, deadlines with a time of day.

    python level02/todos.py [--db PATH] [--trace] [--server threaded]
"""
import datetime
import functools
import json
import sys
import zoneinfo
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, NotFound, created, json_response, no_content
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, bad_query
from lib.routing import PAGE
from lib.validation import (Boolean, Choice, Date, Field, Integer, Invalid, Text, body_schema,
                            validate)
from level01.counter import etag
from level02.notes import (TAGS, delete_owned, find_owned, require_user, tag_filters,
                           text_search, timestamp, update_owned)

app = App("todos", "Each user's to-do list: due dates in their time zone, priorities, "
                   "bulk changes.", port=8005)

SCHEMA = """
CREATE TABLE IF NOT EXISTS todos (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused (see notes.py)
    owner        TEXT    NOT NULL,                   -- the X-User-Id that created it
    title        TEXT    NOT NULL,
    notes        TEXT    NOT NULL DEFAULT '',
    due          TEXT,                               -- YYYY-MM-DD, the user's day; NULL: none
    priority     INTEGER NOT NULL DEFAULT 2          -- the rank, so that it sorts:
                 CHECK (priority IN (1, 2, 3)),      --   low 1, normal 2, high 3
    tags         TEXT    NOT NULL DEFAULT '[]',      -- a JSON array of lower-case strings
    completed_at TEXT,                               -- set by the server; NULL: not done
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS todos_by_owner_due ON todos (owner, due, id);
"""

PRIORITY_RANK = {"low": 1, "normal": 2, "high": 3}
PRIORITY_NAME = {rank: name for name, rank in PRIORITY_RANK.items()}

TODO_FIELDS = {
    "title": Text(1, 200, required=True),
    "notes": Text(0, 10_000, strip=False, default=""),
    "due": Date(nullable=True, default=None),
    "priority": Choice(PRIORITY_RANK, default="normal"),
    "tags": TAGS,
    "done": Boolean(default=False, description="true sets completed_at (the server's clock); "
                                               "false clears it"),
}
SERVER_OWNED = {"id", "owner", "completed_at", "version", "created_at", "updated_at"}

MAX_BULK = 100  # ids in one bulk request


# --------------------------------------------------------------------------------------------
# The user's calendar


@functools.cache
def known_time_zones():
    """The IANA names this machine's time zone database knows (read once). Checking a name
    against the list, rather than trying to load it, never touches the file system with a
    client's string."""
    return frozenset(zoneinfo.available_timezones())


def user_today(request):
    """The user's time zone name and today's date there: the IANA zone `?tz=` names
    (`Europe/Paris`), UTC without it. An unknown zone is a 400. UTC needs no time zone
    database, so the default works everywhere; other names need the system's (or, on Windows,
    the `tzdata` package)."""
    name = TZ.read(request) or "UTC"
    if name == "UTC":
        zone = datetime.timezone.utc
    elif name in known_time_zones():
        zone = zoneinfo.ZoneInfo(name)
    else:
        raise bad_query("tz", "must be an IANA time zone name such as Europe/Paris")
    return name, datetime.datetime.now(zone).date()


# --------------------------------------------------------------------------------------------
# Todos


def todo_columns(values, current=None, now=None):
    """Validated fields → column values. `done` is not a column: making a todo done sets
    `completed_at` to `now` (once: completing a done todo keeps its time), and reopening clears
    it. `current` is the stored row, None for a new todo."""
    columns = {name: value for name, value in values.items() if name != "done"}
    if "tags" in columns:
        columns["tags"] = json.dumps(columns["tags"], ensure_ascii=False)
    if "priority" in columns:
        columns["priority"] = PRIORITY_RANK[columns["priority"]]
    if "done" in values:
        was_done = current is not None and current["completed_at"] is not None
        if not values["done"]:
            columns["completed_at"] = None
        elif not was_done:
            columns["completed_at"] = now or timestamp()
    return columns


def render_todo(row):
    return {"id": row["id"], "title": row["title"], "notes": row["notes"], "due": row["due"],
            "priority": PRIORITY_NAME[row["priority"]], "tags": json.loads(row["tags"]),
            "done": row["completed_at"] is not None, "completed_at": row["completed_at"],
            "version": row["version"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def insert_todo(db, owner, values):
    now = timestamp()
    columns = todo_columns(values, now=now)
    with db.transaction() as conn:
        done = conn.execute(
            "INSERT INTO todos (owner, title, notes, due, priority, tags, completed_at, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (owner, columns["title"], columns["notes"], columns["due"], columns["priority"],
             columns["tags"], columns.get("completed_at"), now, now))
        return conn.execute("SELECT * FROM todos WHERE id = ?", (done.lastrowid,)).fetchone()


def one_todo(todo):
    """A single todo, with its ETag. (It carries no "overdue" flag: that depends on the day and
    the reader's time zone, and a strong ETag promises the same bytes until the next change.)"""
    return json_response(render_todo(todo), headers={"ETag": etag(todo["version"])})


# `sort` → its order, ties broken by id. Todos without a due date come last in both `due` and
# `-due`. Priority sorts by its stored rank: `-priority` is high, normal, low.
SORTS = {
    "due": Sort("due", SortKey("due", str, nulls_last=True), SortKey("id", int)),
    "-due": Sort("-due", SortKey("due", str, descending=True, nulls_last=True),
                 SortKey("id", int, descending=True)),
    "priority": Sort("priority", SortKey("priority", int), SortKey("id", int)),
    "-priority": Sort("-priority", SortKey("priority", int, descending=True),
                      SortKey("id", int, descending=True)),
    "created_at": Sort("created_at", SortKey("created_at", str), SortKey("id", int)),
    "-created_at": Sort("-created_at", SortKey("created_at", str, descending=True),
                        SortKey("id", int, descending=True)),
}

STATUS = {"open": "completed_at IS NULL", "done": "completed_at IS NOT NULL"}  # or "all"
TZ = Query("tz", "your IANA time zone, for 'today' (default UTC)",
           {"enum": sorted(known_time_zones() | {"UTC"})})
FILTERS = {q.name: q for q in (
    Query("status", "open, done or all (default)", (*STATUS, "all"), "all"),
    Query("due_before", "YYYY-MM-DD: due strictly before this day", datetime.date),
    Query("due_after", "YYYY-MM-DD: due strictly after this day", datetime.date),
    Query("overdue", "true: open and due before today; false: all the others", bool),
    Query("priority", "low, normal or high", tuple(PRIORITY_RANK)),
    Query("tag", "only todos with this tag (repeat for several: all must match)"),
    Query("q", "text in the title or notes (case-insensitive substring)"), TZ)}
SORT = Query("sort", "due (default), -due, priority, -priority, created_at, -created_at",
             tuple(SORTS), "due")


def list_filters(request):
    """The list's query parameters as [(SQL condition, parameters)]."""
    _, today = user_today(request)
    filters = []
    status = FILTERS["status"].read(request)
    if status != "all":
        filters.append((STATUS[status], []))
    for name, condition in (("due_before", "due < ?"), ("due_after", "due > ?")):
        day = FILTERS[name].read(request)  # an impossible date is a 400
        if day is not None:  # a todo without a due date is neither before nor after a day
            filters.append((condition, [day.isoformat()]))
    overdue = FILTERS["overdue"].read(request)
    if overdue is True:
        filters.append(("(completed_at IS NULL AND due < ?)", [today.isoformat()]))
    elif overdue is False:
        # Spelled out, not `NOT (completed_at IS NULL AND due < ?)`: for a todo without a due
        # date `due < ?` is NULL, NOT NULL is NULL, and the todo would vanish from the list.
        filters.append(("(completed_at IS NOT NULL OR due IS NULL OR due >= ?)",
                        [today.isoformat()]))
    priority = FILTERS["priority"].read(request)
    if priority is not None:
        filters.append(("priority = ?", [PRIORITY_RANK[priority]]))
    return filters + tag_filters(request, "todos") + text_search(request, ["title", "notes"])


class IdList(Field):
    """1 to `MAX_BULK` ids (positive integers), de-duplicated in order."""

    ID = Integer(1, 2**63 - 1)

    def shape(self):
        # No uniqueItems: a repeated id is accepted (and counted once), not refused.
        return {"type": "array", "minItems": 1, "maxItems": MAX_BULK, "items": self.ID.shape()}

    def clean(self, value):
        if not isinstance(value, list) or not value:
            raise Invalid("must be a non-empty list of todo ids")
        if len(value) > MAX_BULK:
            raise Invalid(f"must have at most {MAX_BULK} ids")
        try:
            ids = [self.ID.clean(item) for item in value]  # 4332.0 is the id 4332, as in JSON
        except Invalid:
            raise Invalid("must contain only todo ids (positive integers)") from None
        return list(dict.fromkeys(ids))


BULK_FIELDS = {"ids": IdList(required=True),
               "action": Choice(("complete", "reopen", "delete"), required=True)}


def apply_bulk(db, owner, ids, action):
    """Apply `action` to the caller's todos `ids`, all or nothing: one transaction, and if any
    id is not one of the caller's todos, a 404 naming it before anything is written. Todos that
    already are what the action asks (completing a done one) are left as they are. Returns how
    many todos changed."""
    marks = ", ".join("?" * len(ids))
    now = timestamp()
    with db.transaction() as conn:
        found = {row["id"] for row in conn.execute(
            f"SELECT id FROM todos WHERE owner = ? AND id IN ({marks})", (owner, *ids))}
        missing = [todo_id for todo_id in ids if todo_id not in found]
        if missing:
            raise NotFound(f"no todo {', '.join(map(str, missing))}; nothing was changed",
                           missing_ids=missing)
        if action == "delete":
            done = conn.execute(f"DELETE FROM todos WHERE owner = ? AND id IN ({marks})",
                                (owner, *ids))
        elif action == "complete":
            done = conn.execute(
                "UPDATE todos SET completed_at = ?, version = version + 1, updated_at = ? "
                f"WHERE owner = ? AND id IN ({marks}) AND completed_at IS NULL",
                (now, now, owner, *ids))
        else:
            done = conn.execute(
                "UPDATE todos SET completed_at = NULL, version = version + 1, updated_at = ? "
                f"WHERE owner = ? AND id IN ({marks}) AND completed_at IS NOT NULL",
                (now, owner, *ids))
        return done.rowcount


def count_todos(db, owner, today):
    """Open, done, overdue and due-today counts, in total and per priority, from one query.
    `count(*) FILTER (WHERE …)` (SQL:2003) counts the rows where the condition is true; a
    condition that is NULL (`due < ?` for a todo without a due date) is not true, so it is
    simply not counted, where `sum(condition)` would turn a group of NULLs into NULL."""
    rows = db.query(
        "SELECT priority, "
        "       count(*) FILTER (WHERE completed_at IS NULL)               AS open, "
        "       count(*) FILTER (WHERE completed_at IS NOT NULL)           AS done, "
        "       count(*) FILTER (WHERE completed_at IS NULL AND due < ?)   AS overdue, "
        "       count(*) FILTER (WHERE completed_at IS NULL AND due = ?)   AS due_today "
        "FROM todos WHERE owner = ? GROUP BY priority",
        (today.isoformat(), today.isoformat(), owner))
    kinds = ("open", "done", "overdue", "due_today")
    by_priority = {name: dict.fromkeys(kinds, 0) for name in ("high", "normal", "low")}
    for row in rows:
        by_priority[PRIORITY_NAME[row["priority"]]] = {kind: row[kind] for kind in kinds}
    totals = {kind: sum(counts[kind] for counts in by_priority.values()) for kind in kinds}
    return totals, by_priority


# --------------------------------------------------------------------------------------------
# Routes


@app.post("/todos", summary="Create a todo", request_schema=body_schema(TODO_FIELDS), status=201)
def create_todo(request):
    owner = require_user(request)
    values = validate(request.json_object(), TODO_FIELDS, read_only=SERVER_OWNED)
    todo = insert_todo(app.state.db, owner, values)
    return created(render_todo(todo), f"/todos/{todo['id']}", {"ETag": etag(todo["version"])})


@app.get("/todos", summary="List your todos, a page at a time",
         query=[*FILTERS.values(), SORT, *PAGE])
def list_todos(request):
    owner = require_user(request)
    sort = SORTS[SORT.read(request)]
    limit, cursor = list_params(request, sort.shape)
    filters = list_filters(request)
    if cursor:
        filters.append(sort.after(cursor))  # keyset: only the rows after the last page
    where, params = ["owner = ?"], [owner]
    for condition, values in filters:
        where.append(condition)
        params += values
    rows = app.state.db.query(
        f"SELECT * FROM todos WHERE {' AND '.join(where)} ORDER BY {sort.order_by} LIMIT ?",
        (*params, limit + 1))
    return page(rows, limit, sort.cursor_values, render_todo)


@app.get("/todos/summary", summary="Count open, done, overdue and due-today todos, by priority",
         query=[TZ])
def summarise_todos(request):
    owner = require_user(request)
    zone, today = user_today(request)
    totals, by_priority = count_todos(app.state.db, owner, today)
    return {"time_zone": zone, "today": today.isoformat(), **totals, "by_priority": by_priority}


@app.post("/todos/bulk", summary="Complete, reopen or delete many todos at once, all or nothing",
          request_schema=body_schema(BULK_FIELDS))
def bulk_change(request):
    owner = require_user(request)
    values = validate(request.json_object(), BULK_FIELDS)
    changed = apply_bulk(app.state.db, owner, values["ids"], values["action"])
    return {"action": values["action"], "ids": values["ids"], "changed": changed}


@app.get("/todos/{todo_id:int}", summary="Read one todo (ETag: its version)")
def read_todo(request, todo_id):
    owner = require_user(request)
    with app.state.db.reading() as conn:
        return one_todo(find_owned(conn, "todos", owner, todo_id))


@app.patch("/todos/{todo_id:int}", summary="Change the fields sent; done sets completed_at",
           request_schema=body_schema(TODO_FIELDS, partial=True), if_match=True)
def patch_todo(request, todo_id):
    owner = require_user(request)
    changes = validate(request.json_object(), TODO_FIELDS, partial=True, read_only=SERVER_OWNED)
    todo = update_owned(app.state.db, "todos", owner, todo_id, request.require_if_match,
                        lambda current: todo_columns(changes, current))
    return one_todo(todo)


@app.put("/todos/{todo_id:int}", summary="Replace a todo: fields left out get their defaults",
         request_schema=body_schema(TODO_FIELDS), if_match=True)
def replace_todo(request, todo_id):
    owner = require_user(request)
    values = validate(request.json_object(), TODO_FIELDS, read_only=SERVER_OWNED)
    todo = update_owned(app.state.db, "todos", owner, todo_id, request.require_if_match,
                        lambda current: todo_columns(values, current))
    return one_todo(todo)


@app.delete("/todos/{todo_id:int}", summary="Delete a todo", status=204, if_match=True)
def remove_todo(request, todo_id):
    owner = require_user(request)
    delete_owned(app.state.db, "todos", owner, todo_id, request.require_if_match)
    return no_content()


def main(argv=None):
    args = app.parse_args(argv, database=True)
    app.state.db = app.open_database(args, SCHEMA)
    app.run(args)


if __name__ == "__main__":
    main()
