"""Counter — named counters whose value the server owns: the backend version of `useState`.

What it teaches:

- State that lives on the server and survives the client, the process, and a crash: every
  change is committed to sqlite before the answer is sent, so an acknowledged increment is never
  lost, even to `kill -9` (WAL journal, `synchronous=NORMAL`; see lib/storage.py).
- Concurrent writes without lost updates. Reading a value into Python, adding one and writing it
  back loses increments when two requests interleave. Here the database does the arithmetic in
  one statement (`INSERT … ON CONFLICT DO UPDATE SET value = value + :delta … RETURNING`), which
  sqlite runs as a transaction of its own, so 50 clients × 200 increments always give 10,000.
- Guarding an invariant where the data lives: the 64-bit range check is a `WHERE` clause of that
  same statement, so a check and its write cannot be separated by another request.
- Optimistic concurrency with `ETag` / `If-Match` (RFC 9110 §8.8.3, §13.1.1): the version is the
  ETag; a write carrying a stale one is refused with 412 and changes nothing. Check-then-write
  is two statements, so it runs inside `BEGIN IMMEDIATE`, which takes the write lock first.
- Two storage modes side by side: sqlite (durable) and `--memory` (a dict behind a lock: faster,
  gone when the process ends, and only correct within one process).

Standards: RFC 9110 (HTTP semantics: ETag, If-Match, If-None-Match, 204/304/409/412),
RFC 9457 (problem details), RFC 3339 (timestamps).

Left out: counters shared between server processes in `--memory` mode (that needs Redis or the
database), access control, a history of changes, idempotency keys for retried increments, and
tombstones: a deleted counter's version starts again from 0 (the ABA caveat in counter.md).

    python level01/counter.py [--db PATH | --memory] [--trace] [--server threaded]
"""
import heapq
import re
import sqlite3
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, Conflict, Response, json_response, no_content
from lib.listing import list_params, page
from lib.routing import PAGE
from lib.request import utc_timestamp
from lib.trace import trace_event
from lib.validation import Integer, body_schema, validate

app = App("counter", "Named counters whose value the server owns: durable, exact under "
                     "concurrency, with ETag / If-Match.", port=8002)

INT64_MIN = -2**63          # values stay within a signed 64-bit integer, like sqlite's INTEGER,
INT64_MAX = 2**63 - 1       # Redis INCR and Postgres bigint
MAX_STEP = 1_000_000_000    # the largest `by` of one increment or decrement
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

# --- schema ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name       TEXT PRIMARY KEY,                -- 1–64 of [A-Za-z0-9_.-], checked before SQL
    -- On overflow sqlite silently turns an integer sum into a float; the WHERE clause of
    -- ADD_TO_COUNTER prevents that, and this CHECK makes sure nothing else can.
    value      INTEGER NOT NULL CHECK (typeof(value) = 'integer'),
    version    INTEGER NOT NULL,                -- +1 on every change: the ETag
    updated_at TEXT NOT NULL                    -- RFC 3339 UTC
) WITHOUT ROWID;
"""

# One statement creates the counter or changes it, and answers with the new state (RETURNING,
# sqlite ≥ 3.35). sqlite runs a statement atomically and holds the write lock throughout, so no
# other writer can come between the read of `value` and the write of `value + :delta`. When the
# WHERE clause is false (the result would leave the 64-bit range) the row is left alone and
# RETURNING gives no row at all.
ADD_TO_COUNTER = """
INSERT INTO counters (name, value, version, updated_at) VALUES (:name, :delta, 1, :now)
ON CONFLICT (name) DO UPDATE SET value = value + :delta, version = version + 1, updated_at = :now
    WHERE value BETWEEN :low AND :high
RETURNING value, version, updated_at
"""

SET_COUNTER = """
INSERT INTO counters (name, value, version, updated_at) VALUES (:name, :value, 1, :now)
ON CONFLICT (name) DO UPDATE SET value = :value, version = version + 1, updated_at = :now
RETURNING value, version, updated_at
"""


# --- the domain: counters and their two stores ----------------------------------------------


def counter_state(name, value=0, version=0, updated_at=None):
    """What a counter looks like to a client. Never touched (or deleted): 0, version 0."""
    return {"name": name, "value": value, "version": version, "updated_at": updated_at}


def start_values_allowing(delta):
    """The values `v` for which `v + delta` stays within the signed 64-bit range. Written this
    way round so that the check itself cannot overflow."""
    return INT64_MIN - min(delta, 0), INT64_MAX - max(delta, 0)


def refuse_overflow(name, delta):
    raise Conflict(f"counter '{name}' would leave the signed 64-bit range "
                   f"({INT64_MIN} … {INT64_MAX}) by {'+' if delta > 0 else ''}{delta}; "
                   f"it was not changed")


class SqliteCounters:
    """Counters in sqlite: every change is committed before the method returns.

    `check` is an optional function of the counter's current version that raises to refuse the
    change (an If-Match precondition); it runs inside the transaction, so the version it saw is
    still the current one when the write happens."""

    storage = "sqlite"

    def __init__(self, db):
        self.db = db

    def get(self, name):
        row = self.db.query_one("SELECT value, version, updated_at FROM counters WHERE name = ?",
                                (name,))
        return counter_state(name, *row) if row else counter_state(name)

    def list(self, after, limit):
        rows = self.db.query("SELECT name, value, version, updated_at FROM counters "
                             "WHERE name > ? ORDER BY name LIMIT ?", (after, limit))
        return [counter_state(*row) for row in rows]

    def add(self, name, delta, check=None):
        low, high = start_values_allowing(delta)
        rows = self._write(name, check, ADD_TO_COUNTER, {"name": name, "delta": delta, "low": low,
                                                         "high": high, "now": utc_timestamp()})
        if not rows:
            refuse_overflow(name, delta)
        return counter_state(name, *rows[0])

    def set(self, name, value, check=None):
        rows = self._write(name, check, SET_COUNTER,
                           {"name": name, "value": value, "now": utc_timestamp()})
        return counter_state(name, *rows[0])

    def delete(self, name, check=None):
        self._write(name, check, "DELETE FROM counters WHERE name = :name", {"name": name})

    def _write(self, name, check, sql, params):
        """Run one writing statement and return its rows (RETURNING); committed on return."""
        if check is None:
            # One statement: no BEGIN or COMMIT of its own, this is the hot path of every
            # increment. sqlite runs it atomically and commits it on its own (autocommit)
            # before `execute_returning` returns, so before the answer goes out.
            return self.db.execute_returning(sql, params)
        # Check, then write: two statements, so they need a transaction around them, and an
        # IMMEDIATE one, which takes the write lock first; no other writer can change the
        # version between the check and the write.
        with self.db.transaction() as conn:
            row = conn.execute("SELECT version FROM counters WHERE name = ?", (name,)).fetchone()
            check(row[0] if row else 0)
            # fetchall: step the statement to its end, so it is finished before COMMIT.
            return conn.execute(sql, params).fetchall()


class MemoryCounters:
    """Counters in a dict, for `--memory`: the same operations, one lock instead of a database.

    The lock is what makes `value + delta` exact when handlers run in many threads
    (`--server threaded`): without it, two threads can read the same old value and both write
    old + 1. Nothing is written anywhere: the counters die with the process, and two processes
    each have their own."""

    storage = "memory"

    def __init__(self):
        self._lock = threading.Lock()
        self._rows = {}  # name → (value, version, updated_at)

    def get(self, name):
        row = self._rows.get(name)  # one lookup of an immutable tuple: no lock needed to read
        return counter_state(name, *row) if row else counter_state(name)

    def list(self, after, limit):
        with self._lock:  # iterating a dict that another thread resizes would raise
            names = heapq.nsmallest(limit, (name for name in self._rows if name > after))
            return [counter_state(name, *self._rows[name]) for name in names]

    def add(self, name, delta, check=None):
        with self._lock:
            value, version, _ = self._rows.get(name, (0, 0, None))
            if check:
                check(version)
            if not INT64_MIN <= value + delta <= INT64_MAX:
                refuse_overflow(name, delta)
            row = self._rows[name] = (value + delta, version + 1, utc_timestamp())
        trace_event(f"memory: {'+' if delta > 0 else ''}{delta} under the lock")
        return counter_state(name, *row)

    def set(self, name, value, check=None):
        with self._lock:
            _, version, _ = self._rows.get(name, (0, 0, None))
            if check:
                check(version)
            row = self._rows[name] = (value, version + 1, utc_timestamp())
        trace_event(f"memory: set to {value} under the lock")
        return counter_state(name, *row)

    def delete(self, name, check=None):
        with self._lock:
            if check:
                check(self._rows.get(name, (0, 0, None))[1])
            self._rows.pop(name, None)
        trace_event("memory: deleted under the lock")


# --- reading requests -----------------------------------------------------------------------


def counter_name(name):
    """A path's counter name, or 400 (a bad path parameter). `.` and `..` are refused too:
    clients remove them from paths (RFC 3986 §5.2.4), so such a counter could not be reached."""
    if not NAME.match(name) or name in (".", ".."):
        raise BadRequest("a counter name is 1–64 characters of A–Z, a–z, 0–9, '_', '.', '-'",
                         errors=[{"field": "name", "message": "must be 1–64 characters of "
                                                         "[A-Za-z0-9_.-], not '.' or '..'"}])
    return name


# The request bodies. `validate` (lib/validation.py) refuses unknown fields and the server's own
# ones, and names every bad field in one 422. Its Integer refuses JSON `true` and `1.5`: Python
# would take `True == 1`, but a step is an integer (`5.0` is one: JSON has a single number type,
# and JSON Schema counts it as the integer 5). `body_schema` turns the same declarations
# into the routes' request schemas in /openapi.json, so the documentation cannot drift.
SERVER_OWNED = {"name", "version", "updated_at"}
STEP = {"by": Integer(1, MAX_STEP, default=1, description="how much to add or subtract; default 1")}
NEW_VALUE = {"value": Integer(INT64_MIN, INT64_MAX, required=True)}


def step_size(request):
    """`{"by": n}` of an increment or decrement: an integer 1 … 1,000,000,000; no body: 1."""
    return validate(request.json_object(required=False), STEP, read_only=SERVER_OWNED)["by"]


def new_value(request):
    """`{"value": n}` of a PUT: any signed 64-bit integer. One outside that range is invalid
    input (422) whatever the counter holds, unlike an increment that would overflow (409)."""
    return validate(request.json_object(), NEW_VALUE, read_only=SERVER_OWNED)["value"]


def etag(version):
    """A strong entity tag (RFC 9110 §8.8.3): the version counter, quoted: it changes with every
    write, so a client's tag that still matches means nobody wrote since it read. Level 02
    imports it from here."""
    return f'"{version}"'


def precondition(request):
    """`If-Match` as a check on the current version, run by the store inside its transaction;
    None when the request has none (RFC 9110 §13.1.1). Every write honours it."""
    if request.header("if-match") is None:
        return None
    return lambda version: request.require_if_match(etag(version))


def counter_response(state):
    return json_response(state, headers=[("ETag", etag(state["version"]))])


# --- routes ---------------------------------------------------------------------------------

STATE = "the counter's new state (ETag: its version)"
STALE = "If-Match names a version that is no longer current; nothing changed"
BAD_NAME = "the name is not 1–64 characters of [A-Za-z0-9_.-]"
NAME_SCHEMA = {"name": {"pattern": "^[A-Za-z0-9_.-]{1,64}$", "not": {"enum": [".", ".."]}}}


@app.get("/counters", query=PAGE,
         responses={200: '{"items": [...], "next_cursor": "..." | null}, ordered by name'})
def list_counters(request):
    """Every counter that has been touched, ordered by name (paginated)"""
    limit, cursor = list_params(request, (str,))
    after = cursor[0] if cursor else ""
    rows = app.state.counters.list(after, limit + 1)
    return page(rows, limit, lambda state: [state["name"]])


@app.get("/counters/{name}", path_schemas=NAME_SCHEMA, responses={200: "the counter; a never-touched one reads as 0",
                                        304: "If-None-Match names the current version",
                                        400: BAD_NAME})
def read_counter(request, name):
    """A counter's value, version and last change"""
    state = app.state.counters.get(counter_name(name))
    tag = etag(state["version"])
    if request.if_none_match(tag):
        return Response(b"", 304, {"ETag": tag})
    return counter_response(state)


@app.post("/counters/{name}/increment", request_schema=body_schema(STEP), body_required=False,
          path_schemas=NAME_SCHEMA, if_match=True, responses={200: STATE, 400: BAD_NAME, 409: "would overflow", 412: STALE,
                     422: 'bad "by"'})
def increment_counter(request, name):
    """Add `by` (optional JSON body {"by": 1…1000000000}, default 1)"""
    name = counter_name(name)
    return counter_response(app.state.counters.add(name, step_size(request), precondition(request)))


@app.post("/counters/{name}/decrement", request_schema=body_schema(STEP), body_required=False,
          path_schemas=NAME_SCHEMA, if_match=True, responses={200: STATE, 400: BAD_NAME, 409: "would overflow", 412: STALE,
                     422: 'bad "by"'})
def decrement_counter(request, name):
    """Subtract `by` (optional JSON body {"by": 1…1000000000}, default 1)"""
    name = counter_name(name)
    return counter_response(app.state.counters.add(name, -step_size(request), precondition(request)))


@app.post("/counters/{name}/reset", path_schemas=NAME_SCHEMA, if_match=True, responses={200: STATE, 400: BAD_NAME, 412: STALE})
def reset_counter(request, name):
    """Set the value to 0 (honours If-Match)"""
    name = counter_name(name)
    return counter_response(app.state.counters.set(name, 0, precondition(request)))


@app.put("/counters/{name}", request_schema=body_schema(NEW_VALUE), path_schemas=NAME_SCHEMA, if_match=True,
         responses={200: STATE, 400: BAD_NAME, 412: STALE, 422: 'bad or missing "value"'})
def set_counter(request, name):
    """Set the value (JSON body {"value": n}; honours If-Match)"""
    name = counter_name(name)
    return counter_response(app.state.counters.set(name, new_value(request), precondition(request)))


@app.delete("/counters/{name}", path_schemas=NAME_SCHEMA, if_match=True, responses={204: "deleted (also when it did not exist)",
                                           400: BAD_NAME, 412: STALE})
def delete_counter(request, name):
    """Forget a counter: it reads as 0 again (idempotent; honours If-Match)"""
    app.state.counters.delete(counter_name(name), precondition(request))
    return no_content()


@app.get("/health", responses={200: '{"status": "ok", "storage": "sqlite" | "memory"}'})
def health(request):
    """Liveness, and which store this process uses"""
    return {"status": "ok", "storage": app.state.counters.storage}


# --- running --------------------------------------------------------------------------------


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--memory", action="store_true",
                        help="keep counters in this process only (a dict behind a lock): faster, "
                             "lost on exit, not shared between processes; --db is ignored")
    args = parser.parse_args(argv)
    if args.memory:
        app.state.counters = MemoryCounters()
    else:
        if sqlite3.sqlite_version_info < (3, 35):  # RETURNING; Python 3.11 may link an older one
            parser.error(f"this Python's sqlite is {sqlite3.sqlite_version}; counter.py needs "
                         f"3.35 or newer (or run it with --memory)")
        app.state.counters = SqliteCounters(app.open_database(args, SCHEMA))
    app.run(args)


if __name__ == "__main__":
    main()
