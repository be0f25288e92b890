"""Audit log — a tamper-evident, append-only record of who did what.

What it teaches
  - Append-only, locked twice: the API has no way to change or remove an entry (PUT, PATCH and
    DELETE are 405), and sqlite triggers refuse UPDATE and DELETE on the table, so a bug or a
    stray `sqlite3` session cannot rewrite history either.
  - A hash chain: every entry's hash covers the hash before it and the entry's own fields in
    one canonical JSON form, so changing, removing, inserting or reordering any row breaks the
    chain from that row on, and `GET /audit/verify` names the first bad seq. Anyone can check
    an export offline with a few lines of Python (audit_log.md has them).
  - Serialised appends: reading the head and writing the next entry happen in one
    `BEGIN IMMEDIATE` transaction (sqlite's write lock), and `seq` is the primary key, so two
    appenders, even in two processes, can never chain from the same head (no fork).
  - Signed checkpoints: every `--checkpoint-every` entries and on demand the head is signed with
    HMAC-SHA256 under `--key`. A hash chain alone cannot show that its tail was cut off (the
    shorter chain is still a valid chain); a signed checkpoint beyond the end can.

Standards: RFC 8785's idea of a canonical JSON (here: Python's sorted keys, no white space,
UTF-8), FIPS 180-4 SHA-256, RFC 2104 HMAC, NDJSON for the export, RFC 6750 bearer tokens.

Left out: Merkle trees with inclusion and consistency proofs (Trillian, Certificate
Transparency), publishing checkpoints to a witness outside this machine, retention and
redaction (an append-only log cannot forget: GDPR's answer is to keep personal data out of it).

    python level07/audit_log.py [--token T] [--key K] [--checkpoint-every 1000] [--db PATH]
"""
import hashlib
import hmac
import ipaddress
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, Conflict, NotFound, Unauthorized, created
from lib.app import bounded, exit_usage_error
from lib.listing import list_params, page
from lib.request import Query, utc_timestamp
from lib.response import StreamingResponse
from lib.routing import PAGE
from lib.trace import trace_event
from lib.validation import Field, Invalid, Text, body_schema, validate
from level03.jwt_auth import SECRETS_SCHEMA, bearer_token, load_or_create_secret, token_hash
from level04.search_api import TIME_OR_DATE, query_time

app = App("audit_log", "A tamper-evident, append-only record of who did what: a hash chain, "
          "signed checkpoints, offline-verifiable export.", port=8025)

GENESIS_HASH = "0" * 64          # what the first entry chains from
ENTRY_FIELDS = ("seq", "ts", "actor", "action", "target", "metadata", "ip")  # what the hash covers
MAX_METADATA_BYTES = 16 * 1024   # an entry's metadata as canonical JSON
MIN_SECRET_CHARS = 16            # --token and --key
EXPORT_BATCH = 1000              # rows read per query while streaming the export
CHALLENGE = 'Bearer realm="audit"'

# =============================================================================================
# Schema: the entries, their checkpoints, and the triggers that make both append-only
# =============================================================================================

SCHEMA = SECRETS_SCHEMA + """
CREATE TABLE IF NOT EXISTS entries (
    seq       INTEGER PRIMARY KEY,   -- 1, 2, 3 … ; unique, so two appends cannot share a head
    ts        TEXT NOT NULL,         -- RFC 3339 UTC, milliseconds, set by the server
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    metadata  TEXT,                  -- canonical JSON of an object, or NULL
    ip        TEXT,
    prev_hash TEXT NOT NULL,         -- the hash of entry seq - 1 (64 zeros for seq 1)
    hash      TEXT NOT NULL          -- sha256(prev_hash || canonical_json(entry)), hex
);
CREATE INDEX IF NOT EXISTS entries_by_actor ON entries (actor, seq);
CREATE INDEX IF NOT EXISTS entries_by_action ON entries (action, seq);
CREATE INDEX IF NOT EXISTS entries_by_target ON entries (target, seq);
CREATE INDEX IF NOT EXISTS entries_by_ts ON entries (ts);

CREATE TABLE IF NOT EXISTS checkpoints (
    seq       INTEGER PRIMARY KEY,   -- the head that was signed
    hash      TEXT NOT NULL,
    signature TEXT NOT NULL,         -- hex HMAC-SHA256 under --key of "{seq}:{hash}"
    ts        TEXT NOT NULL
);

-- The second lock: whatever the API offers, the database itself refuses to rewrite history.
-- (Whoever can drop these triggers can rewrite the file: that is what the chain is for.)
CREATE TRIGGER IF NOT EXISTS entries_refuse_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_refuse_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: DELETE refused'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_refuse_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_refuse_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only: DELETE refused'); END;
"""

# =============================================================================================
# The chain: canonical JSON, entry hashes, checkpoint signatures (pure functions)
# =============================================================================================


def canonical_json(value):
    """The one byte form the hash is taken over: keys sorted, no white space, non-ASCII
    characters as themselves in UTF-8 (not `\\u` escapes). Python's `json.dumps` with these
    arguments is the reference; audit_log.md spells the rules out for other languages."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(prev_hash, entry):
    """sha256(prev_hash || canonical_json(entry)) in lower-case hex: `prev_hash` enters as its
    64 ASCII hex characters, `entry` is the seven ENTRY_FIELDS (absent ones null)."""
    hashed = {name: entry.get(name) for name in ENTRY_FIELDS}
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(hashed)).hexdigest()


def checkpoint_signature(key, seq, hash_):
    """Hex HMAC-SHA256 under `key` (bytes) of the text "{seq}:{hash}"."""
    return hmac.new(key, f"{seq}:{hash_}".encode("ascii"), hashlib.sha256).hexdigest()


def stored_metadata(text):
    """The metadata column as JSON again. Only a hand-edited file holds text that is not JSON:
    it is returned as the text, which hashes differently, so verify names the row."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def entry_from_row(row):
    entry = {name: row[name] for name in ENTRY_FIELDS}
    entry["metadata"] = stored_metadata(row["metadata"])
    entry["prev_hash"] = row["prev_hash"]
    entry["hash"] = row["hash"]
    return entry


class ChainBreak(Exception):
    """Where a verification found the chain broken: the first bad seq and why."""

    def __init__(self, seq, reason):
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def check_chain(entries, checkpoints, key):
    """Walk `entries` (dicts with hashes, in stored seq order) and check every link, then every
    checkpoint against them. Returns (count, head hash); raises ChainBreak at the first bad seq.

    - a seq that is not the one expected: the expected one is missing (deleted), or an extra
      row was inserted before it;
    - a prev_hash that is not the hash before it: rows were moved or inserted;
    - a hash that does not match the row's own content: the row was edited;
    - a checkpoint whose signature is wrong, whose seq holds another hash, or whose seq lies
      beyond the end: the checkpoint was forged, the signed head rewritten, or the tail cut."""
    expected_seq, head = 1, GENESIS_HASH
    hashes = {}
    wanted = {checkpoint["seq"] for checkpoint in checkpoints}
    for entry in entries:
        seq = entry["seq"]
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                raise ChainBreak(expected_seq, f"entry {expected_seq} is missing: the next "
                                               f"stored entry is {seq}")
            raise ChainBreak(expected_seq, f"entry {expected_seq} is stored as seq {seq!r}")
        if entry["prev_hash"] != head:
            raise ChainBreak(seq, f"entry {seq}'s prev_hash is not the hash of entry {seq - 1}: "
                                  f"entries were inserted, removed or reordered")
        if entry_hash(head, entry) != entry["hash"]:
            raise ChainBreak(seq, f"entry {seq}'s hash does not match its content: it was "
                                  f"edited, or written there by hand")
        head = entry["hash"]
        if seq in wanted:
            hashes[seq] = head
        expected_seq += 1
    count = expected_seq - 1
    for checkpoint in sorted(checkpoints, key=lambda c: c["seq"]):
        seq = checkpoint["seq"]
        if not hmac.compare_digest(checkpoint_signature(key, seq, checkpoint["hash"]),
                                   checkpoint["signature"]):
            raise ChainBreak(seq, f"checkpoint {seq}'s signature is not valid under the key")
        if seq > count:
            raise ChainBreak(count + 1, f"the log ends at entry {count}, but checkpoint {seq} "
                                        f"signed it longer: its tail was cut off")
        if hashes[seq] != checkpoint["hash"]:
            raise ChainBreak(seq, f"entry {seq}'s hash is not the one checkpoint {seq} signed")
    return count, head


# =============================================================================================
# The store
# =============================================================================================

class AuditLog:
    """The entries and checkpoints in sqlite. `append` is the only write of an entry."""

    def __init__(self, db, key, checkpoint_every):
        self.db = db
        self.key = key
        self.checkpoint_every = checkpoint_every

    def append(self, fields):
        """Chain and store one entry; committed on return."""
        with self.db.transaction() as conn:
            return self.append_in(conn, fields)

    def append_in(self, conn, fields):
        """Chain one entry inside the caller's `BEGIN IMMEDIATE` transaction on this log's
        database, so the entry commits with the change it records, or neither does. The head
        is read inside that transaction: sqlite's write lock is held from the read to the
        commit, so no other appender, in this process or another, can read the same head in
        between (and if one somehow did, the seq primary key would refuse its row)."""
        row = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev_hash = (row["seq"] + 1, row["hash"]) if row else (1, GENESIS_HASH)
        entry = {**fields, "seq": seq, "ts": utc_timestamp(timespec="milliseconds")}
        entry["hash"] = entry_hash(prev_hash, entry)
        metadata = entry.get("metadata")
        conn.execute("INSERT INTO entries (seq, ts, actor, action, target, metadata, ip, "
                     "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (seq, entry["ts"], entry["actor"], entry["action"], entry["target"],
                      canonical_json(metadata).decode() if metadata is not None else None,
                      entry.get("ip"), prev_hash, entry["hash"]))
        if seq % self.checkpoint_every == 0:
            self._sign(conn, seq, entry["hash"])
        return {"seq": seq, "ts": entry["ts"], "hash": entry["hash"], "prev_hash": prev_hash}

    def checkpoint(self):
        """Sign the current head now (None on an empty log). Signing the same head twice gives
        the same checkpoint, so it is stored once."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            if row is None:
                return None
            return self._sign(conn, row["seq"], row["hash"])

    def _sign(self, conn, seq, hash_):
        signature = checkpoint_signature(self.key, seq, hash_)
        conn.execute("INSERT OR IGNORE INTO checkpoints (seq, hash, signature, ts) "
                     "VALUES (?, ?, ?, ?)", (seq, hash_, signature, utc_timestamp()))
        trace_event(f"checkpoint: signed the head at seq {seq}")
        return dict(conn.execute("SELECT seq, hash, signature, ts FROM checkpoints WHERE seq = ?",
                                 (seq,)).fetchone())

    def get(self, seq):
        row = self.db.query_one("SELECT * FROM entries WHERE seq = ?", (seq,))
        return entry_from_row(row) if row else None

    def head_seq(self):
        return self.db.query_one("SELECT coalesce(max(seq), 0) FROM entries")[0]

    def rows_after(self, seq, last, batch=EXPORT_BATCH):
        """The entries after `seq` up to `last`, at most `batch`: read batch after batch, they
        are one consistent history (keyset on seq, and the table only grows)."""
        return self.db.query("SELECT * FROM entries WHERE seq > ? AND seq <= ? ORDER BY seq "
                             "LIMIT ?", (seq, last, batch))

    def verify(self):
        # Checkpoints first, entries after: any entry a checkpoint signed is already committed,
        # so an append landing between the two reads cannot look like a cut tail.
        checkpoints = [dict(row) for row in self.db.query("SELECT * FROM checkpoints")]
        with self.db.reading() as conn:
            # One statement reads one snapshot (WAL), however long the walk takes.
            cursor = conn.execute("SELECT * FROM entries ORDER BY seq")
            entries = (entry_from_row(row) for row in cursor)
            try:
                count, head = check_chain(entries, checkpoints, self.key)
            except ChainBreak as broken:
                return {"valid": False, "first_bad_seq": broken.seq, "reason": broken.reason}
            finally:
                cursor.close()
        return {"valid": True, "entries": count, "head": head}


# =============================================================================================
# Requests: the service token, the body, the filters
# =============================================================================================

def require_token(request, call_next):
    """Middleware step: every /audit… route needs `Authorization: Bearer <--token>`. Both sides
    are hashed first, so the constant-time compare sees equal lengths (as auth_service does)."""
    if request.path == "/audit" or request.path.startswith("/audit/"):
        token = bearer_token(request)
        if token is None or not hmac.compare_digest(token_hash(token),
                                                    request.app.state.token_hash):
            raise Unauthorized("send the service token: Authorization: Bearer <token>",
                               www_authenticate=CHALLENGE)
    return call_next(request)


class Metadata(Field):
    """Any JSON object, kept as its canonical JSON (so it hashes the same after a round trip)."""

    def shape(self):
        return {"type": "object"}

    def clean(self, value):
        if not isinstance(value, dict):
            raise Invalid("must be an object")
        try:
            size = len(canonical_json(value))
        except UnicodeEncodeError:
            raise Invalid("must be Unicode text throughout (a lone surrogate such as \\ud800 "
                          "is not)") from None
        if size > MAX_METADATA_BYTES:
            raise Invalid(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value


class IPAddress(Field):
    def shape(self):
        return {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}

    def clean(self, value):
        if not isinstance(value, str):  # ip_address(5) would be 0.0.0.5
            raise Invalid("must be an IPv4 or IPv6 address")
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise Invalid("must be an IPv4 or IPv6 address") from None


ENTRY = {"actor": Text(1, 200, required=True, description="who did it: a user or service id"),
         "action": Text(1, 200, required=True, description="what they did, e.g. user.login"),
         "target": Text(1, 200, required=True, description="what they did it to"),
         "metadata": Metadata(nullable=True, description=f"any JSON object, at most "
                                                         f"{MAX_METADATA_BYTES} bytes"),
         "ip": IPAddress(nullable=True, description="where the request came from")}
SERVER_OWNED = {"seq", "ts", "hash", "prev_hash"}

FILTERS = (Query("actor", "only this actor"), Query("action", "only this action"),
           Query("target", "only this target"),
           Query("since", "from this RFC 3339 time or date (inclusive)", TIME_OR_DATE),
           Query("until", "up to this RFC 3339 time or date (inclusive, to the second)",
                 TIME_OR_DATE))


def entry_filters(request):
    """The query string's filters as SQL conditions and parameters. Stored times carry
    milliseconds; the bounds are whole seconds, widened to cover their whole second."""
    conditions, params = [], []
    for name in ("actor", "action", "target"):
        if value := request.query_param(name):
            conditions.append(f"{name} = ?")
            params.append(value)
    if since := query_time(request, "since", end_of_day=False):
        conditions.append("ts >= ?")
        params.append(since[:-1] + ".000Z")
    if until := query_time(request, "until", end_of_day=True):
        conditions.append("ts <= ?")
        params.append(until[:-1] + ".999Z")
    return conditions, params


# =============================================================================================
# Routes
# =============================================================================================

NO_TOKEN = "no or a wrong service token"
APPENDED = {"type": "object", "required": ["seq", "ts", "hash", "prev_hash"]}
ENTRY_ITEM = {"type": "object", "required": [*ENTRY_FIELDS, "prev_hash", "hash"]}
CHECKPOINT = {"type": "object", "required": ["seq", "hash", "signature", "ts"]}


@app.post("/audit", request_schema=body_schema(ENTRY), response_schema=APPENDED,
          responses={201: "appended: its seq, time, hash and the hash it chains from",
                     401: NO_TOKEN, 422: "a missing or bad field"})
def append_entry(request):
    """Append an entry: {"actor", "action", "target", "metadata"?, "ip"?}"""
    fields = validate(request.json_object(), ENTRY, read_only=SERVER_OWNED)
    appended = request.app.state.log.append(fields)
    return created(appended, f"/audit/{appended['seq']}")


@app.get("/audit", query=[*PAGE, *FILTERS],
         responses={200: "entries in seq order, filtered", 400: "a bad filter or cursor",
                    401: NO_TOKEN},
         response_schema={"type": "object", "required": ["items", "next_cursor"],
                          "properties": {"items": {"type": "array", "items": ENTRY_ITEM},
                                         "next_cursor": {"type": ["string", "null"]}}})
def list_entries(request):
    """Entries in seq order, filtered by actor, action, target, since, until"""
    limit, cursor = list_params(request, (int,))
    conditions, params = entry_filters(request)
    conditions.append("seq > ?")
    params.append(cursor[0] if cursor else 0)
    rows = request.app.state.log.db.query(
        f"SELECT * FROM entries WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT ?",
        (*params, limit + 1))
    return page(rows, limit, lambda row: [row["seq"]], entry_from_row)


@app.get("/audit/verify", blocking=True,
         responses={200: '{"valid": true, "entries", "head"} or {"valid": false, '
                         '"first_bad_seq", "reason"}', 401: NO_TOKEN})
def verify_log(request):
    """Recompute the whole chain and check every checkpoint"""
    return request.app.state.log.verify()


@app.get("/audit/export", responses={
    200: {"description": "every entry with its hashes, one JSON object a line, in seq order",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
    401: NO_TOKEN})
def export_entries(request):
    """Every entry as NDJSON, to verify offline (audit_log.md has the recipe)"""
    log = request.app.state.log
    head = log.head_seq()  # the export ends where the log ended when it was asked for

    def batches():  # one chunk a batch: a chunk per line would cost a write (and, on the
        after = 0      # asyncio transport, a hop to the worker pool) per entry
        while rows := log.rows_after(after, head):
            yield b"".join(canonical_json(entry_from_row(row)) + b"\n" for row in rows)
            after = rows[-1]["seq"]

    return StreamingResponse(batches(), content_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store"})


@app.post("/audit/checkpoints", response_schema=CHECKPOINT,
          responses={201: "the head, signed", 401: NO_TOKEN, 409: "the log is empty"})
def sign_checkpoint(request):
    """Sign the current head now (no body)"""
    checkpoint = request.app.state.log.checkpoint()
    if checkpoint is None:
        raise Conflict("the log is empty: there is no head to sign yet")
    return created(checkpoint, "/audit/checkpoints")


@app.get("/audit/checkpoints", query=PAGE,
         responses={200: "signed heads in seq order", 400: "a bad cursor", 401: NO_TOKEN},
         response_schema={"type": "object", "required": ["items", "next_cursor"],
                          "properties": {"items": {"type": "array", "items": CHECKPOINT},
                                         "next_cursor": {"type": ["string", "null"]}}})
def list_checkpoints(request):
    """Signed checkpoints in seq order"""
    limit, cursor = list_params(request, (int,))
    rows = request.app.state.log.db.query(
        "SELECT seq, hash, signature, ts FROM checkpoints WHERE seq > ? ORDER BY seq LIMIT ?",
        (cursor[0] if cursor else 0, limit + 1))
    return page(rows, limit, lambda row: [row["seq"]], dict)


@app.get("/audit/{seq:int}", response_schema=ENTRY_ITEM,
         responses={200: "the entry with its hashes", 401: NO_TOKEN, 404: "no such entry"})
def read_entry(request, seq):
    """One entry by seq"""
    entry = request.app.state.log.get(seq)
    if entry is None:
        raise NotFound(f"no entry has seq {seq}")
    return entry


# =============================================================================================
# Running
# =============================================================================================

def kept_secret(db, name, given, flag):
    """`--token` / `--key` as given, else the one made at first start and kept in the
    database, printed to stderr when it is made (level07.md)."""
    if given is not None:
        if len(given) < MIN_SECRET_CHARS or not given.isascii() or not given.isprintable():
            exit_usage_error(f"{flag} must be at least {MIN_SECRET_CHARS} printable ASCII "
                             f"characters")
        return given
    made = db.query_one("SELECT 1 FROM server_secrets WHERE name = ?", (name,)) is None
    value = load_or_create_secret(db, name).decode()
    if made:
        sys.stderr.write(f"{flag} not given: made one and kept it in the database: {value}\n")
    return value


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--token", help="the service token every /audit route needs as "
                        "Authorization: Bearer (default: made once, kept in the database)")
    parser.add_argument("--key", help="the HMAC key checkpoints are signed with (default: "
                        "made once, kept in the database)")
    parser.add_argument("--checkpoint-every", type=bounded(int, "a number of entries (1 or "
                        "more)", at_least=1, at_most=10**9), default=1000,
                        help="sign the head every this many entries (default 1000)")
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    token = kept_secret(db, "audit_token", args.token, "--token")
    key = kept_secret(db, "checkpoint_key", args.key, "--key").encode()
    app.state.token_hash = token_hash(token)
    app.state.log = AuditLog(db, key, args.checkpoint_every)
    app.use(require_token)
    app.run(args)


if __name__ == "__main__":
    main()
