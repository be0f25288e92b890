"""Notes — each user's own notes, and everything a backend does to own its data.

What it teaches:

- CRUD over HTTP: `POST` → 201 with `Location`; `GET`; `PATCH` changes only the fields sent;
  `PUT` replaces them all (what is left out goes back to its default); `DELETE` → 204.
- Ownership: every row has an `owner`, and every statement says `AND owner = ?`. Another
  user's note answers 404 for every verb, exactly like a note that does not exist, so a client
  cannot even learn that it exists (level02.md).
- Validation at the edge: one 422 naming every bad field at once; text trimmed, tags
  lower-cased and de-duplicated; unknown and server-owned fields refused, so a client cannot
  write `owner` or `version` (mass assignment).
- Optimistic concurrency: each note has a version counter, sent as a strong `ETag: "3"`.
  `If-Match` with a stale tag is a 412 and nothing changes. The check and the write are one
  step: `UPDATE … WHERE id = ? AND owner = ? AND version = ?` in the same transaction, so two
  clients that both saw version 3 cannot both write version 4.
- Lists (common.md "Lists"): filters, a substring search whose `%` and `_` match literally
  (LIKE escaping), and keyset cursors that stay correct while rows come and go.

The user is named by the `X-User-Id` header. That is NOT authentication: anyone can send any
id. It stands in for the identity that level 03 proves (level03/jwt_auth.py, session_auth.py),
so that ownership can be learnt on its own first.

Ids are sqlite `INTEGER PRIMARY KEY AUTOINCREMENT`: small and readable in a walk-through, and
never reused after a delete, so an old link or cursor can never land on somebody's new note.

Standards: RFC 9110 (HTTP semantics: 201 + Location, ETag §8.8.3, If-Match §13.1.1, 412),
RFC 9457 (problem details), RFC 3339 (timestamps).

Left out: real authentication (level 03), sharing a note with another user, full-text search
with ranking (level04/search_api.py), edit history and undo.

    python level02/notes.py [--db PATH] [--trace] [--server threaded]
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, NotFound, PreconditionFailed, Unauthorized, created, json_response, no_content
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, bad_query, utc_timestamp
from lib.routing import PAGE
from lib.validation import Boolean, Invalid, Text, TextList, body_schema, validate
from level01.counter import etag

app = App("notes", "Each user's own notes: CRUD, validation, ownership, ETags and keyset pages.",
          port=8004)

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: ids are never reused
    owner       TEXT    NOT NULL,                    -- the X-User-Id that created it
    title       TEXT    NOT NULL,
    body        TEXT    NOT NULL DEFAULT '',
    tags        TEXT    NOT NULL DEFAULT '[]',       -- a JSON array of lower-case strings
    pinned      INTEGER NOT NULL DEFAULT 0,
    archived    INTEGER NOT NULL DEFAULT 0,
    version     INTEGER NOT NULL DEFAULT 1,          -- +1 on every change; the ETag
    created_at  TEXT    NOT NULL,                    -- RFC 3339 UTC, fixed width: sorts as time
    updated_at  TEXT    NOT NULL
);
-- The default list: one owner's unarchived notes, pinned first, most recently changed first.
CREATE INDEX IF NOT EXISTS notes_by_owner
    ON notes (owner, archived, pinned DESC, updated_at DESC, id DESC);
"""

# --------------------------------------------------------------------------------------------
# Who is asking


USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # level02.md


def require_user(request) -> str:
    """The caller's user id, from the `X-User-Id` header; 401 when it is missing or malformed.

    This is NOT authentication: anyone can send any id. It stands in for the identity that
    level 03 proves (a JWT, a session), so that level 02 can teach ownership on its own. The
    401 says how to authenticate, as RFC 9110 §15.5.2 requires: `WWW-Authenticate: X-User-Id`."""
    user = request.header("X-User-Id")
    if user is None:
        raise Unauthorized("send your user id in the X-User-Id header",
                           www_authenticate="X-User-Id")
    if not USER_ID.fullmatch(user):
        raise Unauthorized("X-User-Id must be 1–64 characters of A–Z, a–z, 0–9, '_' and '-'",
                           www_authenticate="X-User-Id")
    return user


# --------------------------------------------------------------------------------------------
# What a client may send


TAGS = TextList(max_items=10, item_max=30, lower=True, default=list)

# A note's body, checked by `validate` and described in /openapi.json by `body_schema`: one
# declaration, so the documentation cannot drift from what the server accepts.
NOTE_FIELDS = {
    "title": Text(1, 200, required=True),
    "body": Text(0, 100_000, strip=False, default=""),  # white space may be the formatting
    "tags": TAGS,
    "pinned": Boolean(default=False),
}
# Refused in a body with a 422 that says so. `archived` changes through its own endpoints.
SERVER_OWNED = {"id", "owner", "archived", "version", "created_at", "updated_at"}

MAX_SEARCH = 200  # characters of `q`


# --------------------------------------------------------------------------------------------
# A user's stored objects: read, update and delete only your own (todos, expenses and contacts
# import these too)


def timestamp():
    """Now, RFC 3339 in UTC with microseconds (`2026-11-24T06:41:00.123456Z`). Always the same
    width, so comparing the text compares the times; microseconds so that `updated_at` moves on
    every change, even two in one second. (The version, not the clock, is what detects a change:
    a clock can be stepped back.) The ETag is level01/counter.py's: the version, quoted."""
    return utc_timestamp(timespec="microseconds")


SQLITE_MAX_INTEGER = 2**63 - 1


def find_owned(conn, table, owner, object_id):
    """The caller's row, or 404. Somebody else's row is a 404 too: the same answer as for a row
    that does not exist, so ids cannot be probed. `table` comes from the code, never a client."""
    row = None
    if object_id <= SQLITE_MAX_INTEGER:  # a bigger id exists nowhere (and sqlite cannot bind it)
        row = conn.execute(f"SELECT * FROM {table} WHERE id = ? AND owner = ?",
                           (object_id, owner)).fetchone()
    if row is None:
        raise NotFound(f"nothing at /{table}/{object_id}")  # each table is its route too
    return row


def owned_for_update(conn, table, owner, object_id, require_if_match):
    """The caller's row (404), read inside the transaction that will write it, once the client's
    `If-Match` names its current version (412, and the rollback)."""
    row = find_owned(conn, table, owner, object_id)
    require_if_match(etag(row["version"]))
    return row


def write_owned(conn, table, row, changes):
    """Write `changes` (column → value) over `row` with the version bumped and a new
    `updated_at`; returns the row as it now is. `AND version = ?` makes the write conditional
    on nobody having written since the read. sqlite's `BEGIN IMMEDIATE` already keeps other
    writers out of the transaction; the condition is what keeps the code correct on a database
    that does not (Postgres at READ COMMITTED), and costs nothing here."""
    assignments = "".join(f"{column} = ?, " for column in changes)  # names from the code
    done = conn.execute(
        f"UPDATE {table} SET {assignments}version = version + 1, updated_at = ? "
        "WHERE id = ? AND owner = ? AND version = ?",
        (*changes.values(), timestamp(), row["id"], row["owner"], row["version"]))
    if done.rowcount != 1:
        raise PreconditionFailed(f"{row['id']} in {table} was changed by another request")
    return conn.execute(f"SELECT * FROM {table} WHERE id = ?", (row["id"],)).fetchone()


def update_owned(db, table, owner, object_id, require_if_match, changes_for):
    """Every update's read-check-write, in one transaction so nothing slips in between:
    `owned_for_update` (404, 412), then `write_owned` of `changes_for(row)` (column → value).
    Returns the row as it now is. A write that changes nothing is not a change: the row, and so
    its ETag, stays as it was."""
    with db.transaction() as conn:
        row = owned_for_update(conn, table, owner, object_id, require_if_match)
        changes = changes_for(row)
        if all(row[column] == value for column, value in changes.items()):
            return row
        return write_owned(conn, table, row, changes)


def delete_owned(db, table, owner, object_id, require_if_match):
    """Delete the caller's row: 404 if it is not theirs, 412 if `If-Match` is stale."""
    with db.transaction() as conn:
        row = owned_for_update(conn, table, owner, object_id, require_if_match)
        conn.execute(f"DELETE FROM {table} WHERE id = ? AND owner = ? AND version = ?",
                     (object_id, owner, row["version"]))


# --------------------------------------------------------------------------------------------
# List filters (todos imports these too)


def like_pattern(text):
    r"""`text` as a LIKE pattern matching it literally, anywhere: `%` and `_` are LIKE's
    wildcards, so they (and the escape character itself) get a backslash, and the SQL says
    `ESCAPE '\'`. Without this, searching for "100%" finds "1000 things" and "_" finds all."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def text_search(request, columns):
    """`?q=`: a case-insensitive substring of any of `columns`, as [(condition, parameters)]
    ([] without `q`). sqlite's LIKE ignores case for ASCII letters only (`é` ≠ `É`)."""
    q = request.query_param("q", "")
    if not q:
        return []
    if len(q) > MAX_SEARCH:
        raise bad_query("q", f"must be at most {MAX_SEARCH} characters")
    condition = " OR ".join(f"{column} LIKE ? ESCAPE '\\'" for column in columns)
    return [(f"({condition})", [like_pattern(q)] * len(columns))]


def tag_filters(request, table):
    """`?tag=` (repeatable): rows that carry every tag given, as [(condition, parameters)]. A
    tag is cleaned as a stored one was (trimmed, lower-cased), so `?tag=Work` finds `work`."""
    filters = []
    for value in request.query.get("tag", []):
        if value == "":
            continue  # an empty parameter is no filter, as for every other one
        try:
            tag = TAGS.item.clean(value)
        except Invalid as err:
            raise bad_query("tag", str(err)) from None
        filters.append((f"EXISTS (SELECT 1 FROM json_each({table}.tags) WHERE value = ?)", [tag]))
    return filters


# --------------------------------------------------------------------------------------------
# Notes


def note_columns(values):
    """Validated fields → column values (tags as JSON text, booleans as 0/1)."""
    columns = dict(values)
    if "tags" in columns:
        columns["tags"] = json.dumps(columns["tags"], ensure_ascii=False)
    if "pinned" in columns:
        columns["pinned"] = int(columns["pinned"])
    return columns


def render_note(row):
    return {"id": row["id"], "title": row["title"], "body": row["body"],
            "tags": json.loads(row["tags"]), "pinned": bool(row["pinned"]),
            "archived": bool(row["archived"]), "version": row["version"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def insert_note(db, owner, values):
    columns = note_columns(values)
    now = timestamp()
    with db.transaction() as conn:
        done = conn.execute(
            "INSERT INTO notes (owner, title, body, tags, pinned, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (owner, columns["title"], columns["body"], columns["tags"], columns["pinned"],
             now, now))
        return conn.execute("SELECT * FROM notes WHERE id = ?", (done.lastrowid,)).fetchone()


# `sort` → its order. The last key is always the id, so every note has a position of its own.
# The default puts pinned notes first (level02.md), so the pinned flag leads its keys.
SORTS = {
    "-updated_at": Sort("-updated_at", SortKey("pinned", int, descending=True),
                        SortKey("updated_at", str, descending=True),
                        SortKey("id", int, descending=True)),
    "updated_at": Sort("updated_at", SortKey("updated_at", str), SortKey("id", int)),
    "title": Sort("title", SortKey("title", str, collate="NOCASE"), SortKey("id", int)),
    "-created_at": Sort("-created_at", SortKey("created_at", str, descending=True),
                        SortKey("id", int, descending=True)),
    "created_at": Sort("created_at", SortKey("created_at", str), SortKey("id", int)),
}


def one_note(note):
    """A single note, with its ETag, so the client can send it back in `If-Match`."""
    return json_response(render_note(note), headers={"ETag": etag(note["version"])})


# --------------------------------------------------------------------------------------------
# Routes


@app.post("/notes", summary="Create a note", request_schema=body_schema(NOTE_FIELDS), status=201)
def create_note(request):
    owner = require_user(request)
    values = validate(request.json_object(), NOTE_FIELDS, read_only=SERVER_OWNED)
    note = insert_note(app.state.db, owner, values)
    return created(render_note(note), f"/notes/{note['id']}", {"ETag": etag(note["version"])})


SORT = Query("sort", "-updated_at (default, pinned first), updated_at, title, -created_at, created_at",
             tuple(SORTS), "-updated_at")
PINNED = Query("pinned", "true or false", bool)
ARCHIVED = Query("archived", "true: only archived notes; false (default): only the others", bool, False)


@app.get("/notes", summary="List your notes, a page at a time", query=[
    Query("q", "text in the title or body (case-insensitive substring)"),
    Query("tag", "only notes with this tag (repeat for several: all must match)"),
    PINNED, ARCHIVED, SORT, *PAGE])
def list_notes(request):
    owner = require_user(request)
    sort = SORTS[SORT.read(request)]
    limit, cursor = list_params(request, sort.shape)
    archived = ARCHIVED.read(request)
    where, params = ["owner = ?", "archived = ?"], [owner, int(archived)]
    pinned = PINNED.read(request)
    if pinned is not None:
        where.append("pinned = ?")
        params.append(int(pinned))
    filters = tag_filters(request, "notes") + text_search(request, ["title", "body"])
    if cursor:
        filters.append(sort.after(cursor))  # keyset: only the rows after the last page
    for condition, values in filters:
        where.append(condition)
        params += values
    rows = app.state.db.query(
        f"SELECT * FROM notes WHERE {' AND '.join(where)} ORDER BY {sort.order_by} LIMIT ?",
        (*params, limit + 1))
    return page(rows, limit, sort.cursor_values, render_note)


@app.get("/notes/{note_id:int}", summary="Read one note (ETag: its version)")
def read_note(request, note_id):
    owner = require_user(request)
    with app.state.db.reading() as conn:
        return one_note(find_owned(conn, "notes", owner, note_id))


@app.patch("/notes/{note_id:int}", summary="Change the fields sent (If-Match: the ETag)",
           request_schema=body_schema(NOTE_FIELDS, partial=True), if_match=True)
def patch_note(request, note_id):
    owner = require_user(request)
    changes = validate(request.json_object(), NOTE_FIELDS, partial=True, read_only=SERVER_OWNED)
    note = update_owned(app.state.db, "notes", owner, note_id, request.require_if_match,
                        lambda current: note_columns(changes))
    return one_note(note)


@app.put("/notes/{note_id:int}", summary="Replace a note: fields left out get their defaults",
         request_schema=body_schema(NOTE_FIELDS), if_match=True)
def replace_note(request, note_id):
    owner = require_user(request)
    values = validate(request.json_object(), NOTE_FIELDS, read_only=SERVER_OWNED)
    note = update_owned(app.state.db, "notes", owner, note_id, request.require_if_match,
                        lambda current: note_columns(values))
    return one_note(note)


@app.delete("/notes/{note_id:int}", summary="Delete a note", status=204, if_match=True)
def remove_note(request, note_id):
    owner = require_user(request)
    delete_owned(app.state.db, "notes", owner, note_id, request.require_if_match)
    return no_content()


@app.post("/notes/{note_id:int}/archive", summary="Archive a note: out of the default list", if_match=True)
def archive_note(request, note_id):
    owner = require_user(request)
    note = update_owned(app.state.db, "notes", owner, note_id, request.require_if_match,
                        lambda current: {"archived": 1})
    return one_note(note)


@app.post("/notes/{note_id:int}/unarchive", summary="Bring an archived note back", if_match=True)
def unarchive_note(request, note_id):
    owner = require_user(request)
    note = update_owned(app.state.db, "notes", owner, note_id, request.require_if_match,
                        lambda current: {"archived": 0})
    return one_note(note)


def main(argv=None):
    args = app.parse_args(argv, database=True)
    app.state.db = app.open_database(args, SCHEMA)
    app.run(args)


if __name__ == "__main__":
    main()
