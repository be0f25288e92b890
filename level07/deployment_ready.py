"""Deployment-ready API — level 02's notes, made ready to be run by somebody else's machinery.

The API is small on purpose (`POST /notes`, `GET /notes`, `GET|PATCH|DELETE /notes/{id}`);
the lesson is everything around it that an orchestrator (Kubernetes, systemd, Docker) and an
on-call engineer rely on:

- Configuration from the environment (the Twelve-Factor App, factor III): PORT, HOST,
  DATABASE_PATH, LOG_LEVEL, LOG_FORMAT, APP_ENV, SECRET_KEY, SHUTDOWN_GRACE_S,
  REQUEST_TIMEOUT_S. A flag overrides its variable. Every setting is checked before the port
  opens, and every problem is reported at once, one line each, exit status 2: a deployment
  with a typo fails at once and says where, instead of at 3 a.m. on the first request that
  needs the setting. `--check-config` runs the checks alone (exit 0 when valid). The effective
  configuration is logged once at start, with the secret redacted.
- Probes: `/livez` (the process answers: restart it if not), `/readyz` (the database answers,
  every migration is applied, the server is not draining: send it traffic if so), `/health`
  (both, with the details). The checks are level01/health_check.py's.
- Schema migrations: numbered SQL files beside this one, applied in order at start, each in a
  transaction of its own that also records it in `schema_migrations` with its checksum. The
  check "is it applied?" and the apply share one `BEGIN IMMEDIATE` transaction, so of two
  processes starting on one database at once, exactly one applies each migration. A migration
  edited after it ran somewhere is refused (its checksum differs).
- Logs as JSON lines on stderr (`LOG_FORMAT=json`) and Prometheus metrics at `/metrics`: lib's
  `--log-format`, which every server has, and `lib.metrics`' `add_metrics(app)`, which any
  server can call; this one turns both on.
- Graceful shutdown on SIGTERM (lib's runner): readiness turns 503 at once, the listener stops,
  the requests in flight finish within SHUTDOWN_GRACE_S, exit 0. REQUEST_TIMEOUT_S may not
  exceed the grace, so every request in flight gets its answer.
- A deadline on every request, as Go's `http.TimeoutHandler`: when the time is up the client
  gets a 503 at once, while the handler runs on in the background and its answer is dropped;
  a read, which runs inline, has its query interrupted by sqlite at the same deadline.
- Security headers on every answer (OWASP's for APIs), body limits (lib's 1 MiB).
- SECRET_KEY signs the list cursors: a client cannot forge a position, and every replica
  behind a load balancer must share the key, or a cursor made by one is refused by the next —
  which is why production requires it, and development makes one per process.

Standards: the Twelve-Factor App (config, logs, disposability), Kubernetes' probe semantics,
Prometheus' text exposition format 0.0.4, RFC 9110 (503 + Retry-After), RFC 9457, RFC 3339,
OWASP's REST Security Cheat Sheet (headers).

Left out: secrets from files or a vault (`SECRET_KEY_FILE`, Docker and Kubernetes secrets),
down-migrations, TLS (a proxy or the platform terminates it), tracing across services
(OpenTelemetry), config reloading on SIGHUP.

    python level07/deployment_ready.py [--check-config] [--port P] [--host H] [--db PATH]
        [--app-env development|production] [--log-format json] [--log-level debug]
        [--drain-timeout S] [--request-timeout S] [--trace] [--server threaded]
"""
import argparse
import base64
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import os
import queue
import re
import secrets
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, NotFound, ServiceUnavailable, created, no_content
from lib.app import exit_usage_error, port_number, positive_seconds, seconds
from lib.listing import DEFAULT_LIMIT, MAX_LIMIT, decode_cursor, invalid_cursor, page
from lib.metrics import add_metrics
from lib.middleware import error_response
from lib.request import Query
from lib.routing import PAGE
from lib.storage import default_db_path
from lib.validation import body_schema, validate
from level01.counter import etag
from level01.health_check import (DEFAULT_CHECK_TIMEOUT, DEFAULT_MIN_FREE_MB, Check, CheckFailed,
                                  check_readiness, readiness_checks, run_checks)
from level02.notes import (NOTE_FIELDS, PINNED, SERVER_OWNED, SORT, SORTS, SQLITE_MAX_INTEGER,
                           note_columns, one_note, render_note, tag_filters, text_search,
                           timestamp)

app = App("deployment_ready", "Level 02's notes, made ready for production: validated config, "
          "probes, migrations, JSON logs, metrics, graceful shutdown.", port=8030)
add_metrics(app)  # GET /metrics, and every request counted and timed

MIGRATIONS = Path(__file__).resolve().parent / "deployment_ready_migrations"

# --------------------------------------------------------------------------------------------
# Configuration: the environment, overridden by flags, all checked before the port opens


def one_of(*choices):
    def parse(text):
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def host_address(text):
    """An IP address or a host name (RFC 1123), checked without asking DNS."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not HOSTNAME.match(text):
            raise ValueError(f"{text!r} is not an IP address or a host name") from None
    return text


def database_path(text):
    """`:memory:` or a file whose folder exists, or can be made, and can be written. Opening
    it for real comes later (lib's `open_database`); this catches the usual mistakes first,
    together with every other setting's."""
    if text == ":memory:":
        return text
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text!r} is a folder, not a database file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {str(folder)!r}")
    return text


MIN_SECRET_LENGTH = 32


def secret_key(text):
    """Never quoted in a message: the problem line must not leak what it refuses."""
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters (it has {len(text)}); "
                         "make one with: python3 -c 'import secrets; print(secrets.token_hex(32))'")
    return text


class Setting(NamedTuple):
    """One setting: its variable, the flag's `args` attribute that overrides it (None: no flag),
    how its text is checked and converted, its default (None: unset), whether it is secret."""
    variable: str
    dest: str | None
    parse: Callable
    default: object
    secret: bool = False


SETTINGS = (
    Setting("PORT", "port", port_number, app.default_port),
    Setting("HOST", "host", host_address, "127.0.0.1"),
    Setting("DATABASE_PATH", "db", database_path, default_db_path(app.name)),
    Setting("LOG_LEVEL", "log_level", one_of("debug", "info", "warning", "error"), "info"),
    Setting("LOG_FORMAT", "log_format", one_of("text", "json"), "text"),
    Setting("APP_ENV", "app_env", one_of("development", "production"), "development"),
    # No flag on purpose: a command line is readable by every user of the machine (ps, /proc).
    Setting("SECRET_KEY", None, secret_key, None, secret=True),
    Setting("SHUTDOWN_GRACE_S", "drain_timeout", seconds, 10.0),
    Setting("REQUEST_TIMEOUT_S", "request_timeout", positive_seconds, 5.0),
)


def read_settings(args, environ):
    """{variable: value} from the flags given, else the environment, else the defaults, and
    the list of problems, one line each naming the variable. An empty variable counts as
    unset (`SECRET_KEY=` in an env file). A setting that fails is left out of `values`."""
    values, problems = {}, []
    for setting in SETTINGS:
        flag_value = getattr(args, setting.dest) if setting.dest else None
        text = flag_value if flag_value is not None else environ.get(setting.variable) or None
        if text is None:
            values[setting.variable] = setting.default
            continue
        try:
            values[setting.variable] = setting.parse(text)
        except (ValueError, argparse.ArgumentTypeError) as err:
            source = " (from its flag)" if flag_value is not None else ""
            problems.append(f"{setting.variable}{source}: {err}")
    return values, problems + related_problems(values)


def related_problems(values):
    """What no single setting shows: the rules that tie two of them together (each checked
    when the settings it ties are valid on their own)."""
    problems = []
    if values.get("APP_ENV") == "production" and "SECRET_KEY" in values \
            and values["SECRET_KEY"] is None:
        problems.append("SECRET_KEY: required when APP_ENV=production (every replica must "
                        "share it); make one with: "
                        "python3 -c 'import secrets; print(secrets.token_hex(32))'")
    if values.get("REQUEST_TIMEOUT_S", 0) > values.get("SHUTDOWN_GRACE_S", float("inf")):
        problems.append(f"REQUEST_TIMEOUT_S: {values['REQUEST_TIMEOUT_S']:g} s is longer than "
                        f"SHUTDOWN_GRACE_S ({values['SHUTDOWN_GRACE_S']:g} s): a request in "
                        "flight at SIGTERM could be cut off without an answer")
    return problems


def redacted(values):
    """The effective configuration as it may be logged: a secret is `[redacted]` when set."""
    shown = {}
    for setting in SETTINGS:
        value = values[setting.variable]
        if setting.secret:
            value = "[redacted]" if value is not None else "[unset: random for this process]"
        shown[setting.variable] = value
    return shown


# --------------------------------------------------------------------------------------------
# Migrations: numbered SQL files, each applied once, in order, in its own transaction

MIGRATION_NAME = re.compile(r"(?P<version>[0-9]{4})_[a-z0-9_]+\.sql\Z")
MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    checksum    TEXT NOT NULL,      -- SHA-256 of the file as it was applied
    applied_at  TEXT NOT NULL
);
"""


class Migration(NamedTuple):
    version: int
    name: str
    sql: str

    @property
    def checksum(self):
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def read_migrations(folder):
    """The migrations in version order, and the problems with the folder (a `.sql` file with
    no version, two files with one version)."""
    found, problems = {}, []
    for path in sorted(folder.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if match is None:
            problems.append(f"migrations: {path.name} is not named NNNN_words.sql")
            continue
        version = int(match["version"])
        if version in found:
            problems.append(f"migrations: {found[version].name} and {path.name} "
                            f"share version {version}")
            continue
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)], problems


def statements(sql):
    """The statements of a script, one by one: `executescript` would commit the transaction
    the migration must run in. sqlite decides where each ends (a trigger's body has `;`s)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending  # comments (a no-op), or an unterminated statement sqlite will refuse



class MigrationError(Exception):
    """A migration that failed (and was rolled back), or whose file changed after it ran."""

def apply_migrations(db, migrations):
    """Apply each migration not yet recorded; returns the names applied. `BEGIN IMMEDIATE`
    takes the write lock before the check, so a second process starting at the same moment
    waits, then finds the migration recorded and skips it. A failing one rolls back whole."""
    applied = []
    for migration in migrations:
        with db.transaction() as conn:
            row = conn.execute("SELECT name, checksum FROM schema_migrations WHERE version = ?",
                               (migration.version,)).fetchone()
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(f"{migration.name} was changed after it was applied "
                                         f"(as {row['name']}); add a new migration instead")
                continue
            try:
                for statement in statements(migration.sql):
                    conn.execute(statement)
            except sqlite3.Error as error:
                raise MigrationError(f"{migration.name} failed, nothing of it was applied: "
                                     f"{error}") from None
            conn.execute("INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                         "VALUES (?, ?, ?, ?)", (migration.version, migration.name,
                                                 migration.checksum, timestamp()))
        applied.append(migration.name)
    return applied


def pending_migrations(db, migrations):
    recorded = {row["version"] for row in db.query("SELECT version FROM schema_migrations")}
    return [m.name for m in migrations if m.version not in recorded]


# --------------------------------------------------------------------------------------------
# Probes


def require_migrated():
    pending = pending_migrations(app.state.db, app.state.migrations)
    if pending:
        raise CheckFailed(f"pending: {', '.join(pending)}")


@app.get("/livez", public=True, probe=True, summary="Liveness: 200 while the process answers")
def liveness(request):
    # Nothing is checked on purpose, draining included: a process that is shutting down must
    # not be restarted, and a database outage is not cured by restarting every replica.
    return {"status": "alive"}


@app.get("/readyz", public=True, probe=True, blocking=True,
         responses={503: "Not ready: the database, a migration, or draining"},
         summary="Readiness: 200 when the db answers and every migration is applied, not draining")
def readiness(request):
    return check_readiness(app.state.checks, DEFAULT_CHECK_TIMEOUT, draining=app.draining)


@app.get("/health", public=True, probe=True, blocking=True,
         responses={503: "Alive but not ready (the details say why)"},
         summary="Liveness and readiness together, with the details")
def health(request):
    results = run_checks(app.state.checks, DEFAULT_CHECK_TIMEOUT)
    ready = not app.draining and all(result == "ok" for result in results.values())
    details = {"status": "ok" if ready else "unavailable", "live": True, "ready": ready,
               "draining": app.draining, "checks": results, "version": app.version,
               "app_env": app.state.app_env,
               "uptime_s": round(time.time() - app.started_at, 3),
               "migrations": {"known": [m.name for m in app.state.migrations],
                              "pending": pending_migrations(app.state.db, app.state.migrations)}}
    if not ready:
        raise ServiceUnavailable("not ready", **{k: v for k, v in details.items() if k != "status"})
    return details


@app.use
def no_store_on_probes(request, call_next):
    """RFC 9111 §5.2.2.5: no cache may keep a probe's answer (a cached 200 hides an outage)."""
    response = call_next(request)
    if request.route.meta.get("probe"):
        response.headers.append(("Cache-Control", "no-store"))
    return response


# --------------------------------------------------------------------------------------------
# What every answer gets: security headers, and a deadline


# OWASP REST Security Cheat Sheet: an API answers JSON, so its pages may run nothing, load
# nothing and be framed by nobody; a browser must not guess a type (and run a "JSON" as HTML).
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)


def add_security_headers(request, call_next):
    """On every answer, the refusals (404, 405, 413 …) included: runs before routing."""
    try:
        response = call_next(request)
    except Exception as error:
        response = error_response(request, error)
    response.headers.extend(SECURITY_HEADERS)
    return response


app.use(add_security_headers, before_routing=True)


class RequestDeadline:
    """A time limit on every request that can take long, in one of two ways.

    A route that may wait (`blocking=True`: a write, which can queue for sqlite's write lock
    behind another process; the readiness checks; the debug sleep) is run as by Go's
    `http.TimeoutHandler`: the handler runs on one of `workers` threads while the request's
    own thread waits at most `seconds`; when the time is up the client gets a 503 at once, and
    the handler, which Python cannot stop from outside, runs on and its answer is dropped. The
    workers are daemon threads, so a runaway handler never holds up the exit. At most `workers`
    handlers run at once; beyond that requests wait, and time out, in the queue: the bound that
    keeps a pile-up of slow requests from becoming a pile-up of threads.

    A read runs inline instead, through `reading`: in WAL mode it never waits for a lock, so
    its only way to be slow is work, which sqlite can stop. A worker would cost every read two
    thread hops (half the throughput of `GET /notes/{id}`, measured). Routes that do no I/O
    (`/`, `/openapi.json`, `/livez`, `/metrics`) need neither."""

    PROGRESS_STEPS = 10_000  # sqlite VM instructions between two looks at the clock

    def __init__(self, seconds, workers=32):
        self.seconds = seconds
        self.jobs = queue.SimpleQueue()
        for n in range(workers):
            threading.Thread(target=self._work, name=f"deadline-{n}", daemon=True).start()

    def _work(self):
        while True:
            future, call, request, context = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # its request timed out while it waited: nobody wants the answer
            try:
                future.set_result(context.run(call, request))
            except BaseException as error:
                future.set_exception(error)

    def enforce(self, request, call_next):
        if not request.route.blocking:
            return call_next(request)
        future = Future()
        # The copy carries the request's trace (a context variable) into the worker.
        self.jobs.put((future, call_next, request, contextvars.copy_context()))
        try:
            return future.result(self.seconds)
        except TimeoutError:
            future.cancel()
            raise self.timed_out("the request may still complete") from None

    @contextlib.contextmanager
    def reading(self, db):
        """`db.reading()` with the deadline as a statement timeout, as Postgres'
        `statement_timeout`: sqlite calls the progress handler every `PROGRESS_STEPS`
        instructions, and a true answer interrupts the statement."""
        deadline = time.monotonic() + self.seconds
        with db.reading() as conn:
            conn.set_progress_handler(lambda: time.monotonic() > deadline, self.PROGRESS_STEPS)
            try:
                yield conn
            except sqlite3.OperationalError as error:
                if str(error) != "interrupted":
                    raise
                raise self.timed_out("the query was stopped") from None
            finally:
                conn.set_progress_handler(None, 0)

    def timed_out(self, what_happened):
        return ServiceUnavailable(f"no answer within {self.seconds:g} s (REQUEST_TIMEOUT_S); "
                                  f"{what_happened}")


SLEEP = Query("s", "seconds to sleep (0–60)", int, 1, low=0, high=60)


def debug_sleep(request):
    """Sleep `s` seconds, then answer: shows the request deadline (development only)."""
    duration = SLEEP.read(request)
    app.log("debug", "debug sleep", seconds=duration, request_id=request.request_id)
    time.sleep(duration)
    app.log("debug", "debug sleep done", seconds=duration, request_id=request.request_id)
    return {"slept_s": duration}


# --------------------------------------------------------------------------------------------
# Cursors signed with SECRET_KEY


def cursor_tag(cursor):
    digest = hmac.new(app.state.secret_key, cursor.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")  # 128 bits


def signed_cursor(cursor):
    return None if cursor is None else f"{cursor}.{cursor_tag(cursor)}"


def verified_cursor(text, shape):
    """The cursor inside `text` if this deployment's key signed it, else a 400. Base64url has
    no `.`, so the last one separates the tag."""
    cursor, dot, tag = text.rpartition(".")
    if not dot or not cursor.isascii() or not hmac.compare_digest(tag, cursor_tag(cursor)):
        raise invalid_cursor()
    return decode_cursor(cursor, shape)


# --------------------------------------------------------------------------------------------
# Notes (level02/notes.py's fields, rendering, sorts and filters; not its owner-bound queries)


def find_note(conn, note_id):
    row = None
    if note_id <= SQLITE_MAX_INTEGER:  # a bigger id exists nowhere (and sqlite cannot bind it)
        row = conn.execute("SELECT * FROM notes WHERE id = ?", (note_id,)).fetchone()
    if row is None:
        raise NotFound(f"nothing at /notes/{note_id}")
    return row


@app.post("/notes", summary="Create a note", request_schema=body_schema(NOTE_FIELDS), status=201,
          blocking=True)
def create_note(request):
    columns = note_columns(validate(request.json_object(), NOTE_FIELDS, read_only=SERVER_OWNED))
    now = timestamp()
    with app.state.db.transaction() as conn:
        done = conn.execute("INSERT INTO notes (title, body, tags, pinned, created_at, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (columns["title"], columns["body"], columns["tags"], columns["pinned"],
                             now, now))
        note = find_note(conn, done.lastrowid)
    return created(render_note(note), f"/notes/{note['id']}", {"ETag": etag(note["version"])})


@app.get("/notes", summary="List the notes, a page at a time (signed cursors)",
         responses={503: "No answer within REQUEST_TIMEOUT_S"},
         query=[Query("q", "text in the title or body (case-insensitive substring)"),
                Query("tag", "only notes with this tag (repeat for several: all must match)"),
                PINNED, SORT, *PAGE])
def list_notes(request):
    sort = SORTS[SORT.read(request)]
    limit = request.query_int("limit", DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    text = request.query_param("cursor")
    where, params = ["1"], []
    pinned = PINNED.read(request)
    if pinned is not None:
        where.append("pinned = ?")
        params.append(int(pinned))
    filters = tag_filters(request, "notes") + text_search(request, ["title", "body"])
    if text:
        filters.append(sort.after(verified_cursor(text, sort.shape)))
    for condition, values in filters:
        where.append(condition)
        params += values
    with app.state.deadline.reading(app.state.db) as conn:
        rows = conn.execute(
            f"SELECT * FROM notes WHERE {' AND '.join(where)} ORDER BY {sort.order_by} LIMIT ?",
            (*params, limit + 1)).fetchall()
    answer = page(rows, limit, sort.cursor_values, render_note)
    answer["next_cursor"] = signed_cursor(answer["next_cursor"])
    return answer


@app.get("/notes/{note_id:int}", summary="Read one note (ETag: its version)")
def read_note(request, note_id):
    with app.state.deadline.reading(app.state.db) as conn:
        return one_note(find_note(conn, note_id))


@app.patch("/notes/{note_id:int}", summary="Change the fields sent (If-Match: the ETag)",
           request_schema=body_schema(NOTE_FIELDS, partial=True), if_match=True, blocking=True)
def patch_note(request, note_id):
    changes = note_columns(validate(request.json_object(), NOTE_FIELDS, partial=True,
                                    read_only=SERVER_OWNED))
    with app.state.db.transaction() as conn:
        note = find_note(conn, note_id)
        request.require_if_match(etag(note["version"]))
        if any(note[column] != value for column, value in changes.items()):
            assignments = "".join(f"{column} = ?, " for column in changes)  # names from the code
            conn.execute(f"UPDATE notes SET {assignments}version = version + 1, updated_at = ? "
                         "WHERE id = ? AND version = ?",
                         (*changes.values(), timestamp(), note_id, note["version"]))
            note = find_note(conn, note_id)
    return one_note(note)


@app.delete("/notes/{note_id:int}", summary="Delete a note", status=204, if_match=True,
            blocking=True)
def remove_note(request, note_id):
    with app.state.db.transaction() as conn:
        note = find_note(conn, note_id)
        request.require_if_match(etag(note["version"]))
        conn.execute("DELETE FROM notes WHERE id = ?", (note_id,))
    return no_content()


# --------------------------------------------------------------------------------------------
# Start-up: check everything, migrate, then listen


def arg_parser():
    parser = app.arg_parser(database=True)
    parser.add_argument("--app-env", choices=("development", "production"),
                        help="overrides APP_ENV (default development)")
    parser.add_argument("--request-timeout", type=positive_seconds,
                        help="overrides REQUEST_TIMEOUT_S: a request not answered within it "
                             "gets a 503 (seconds, default 5)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration (environment and flags) and the "
                             "migrations folder, print it redacted, exit 0 if valid, else 2")
    # A flag left out must not hide its variable: unset, so read_settings can tell.
    parser.set_defaults(**{s.dest: None for s in SETTINGS if s.dest})
    parser.epilog = ("Settings come from the environment: "
                     + ", ".join(s.variable for s in SETTINGS)
                     + "; a flag overrides its variable (level07/deployment_ready.md).")
    return parser


def main(argv=None):
    args = arg_parser().parse_args(argv)
    values, problems = read_settings(args, os.environ)
    migrations, migration_problems = read_migrations(MIGRATIONS)
    problems += migration_problems
    if problems:
        sys.stderr.write("".join(f"config error: {problem}\n" for problem in problems))
        raise SystemExit(2)
    if args.check_config:
        sys.stdout.write("".join(f"{name}={value}\n" for name, value in redacted(values).items()))
        sys.stdout.write(f"configuration valid; {len(migrations)} migrations\n")
        return

    args.port, args.host = values["PORT"], values["HOST"]
    args.db = values["DATABASE_PATH"]
    args.log_level, args.log_format = values["LOG_LEVEL"], values["LOG_FORMAT"]
    args.drain_timeout = values["SHUTDOWN_GRACE_S"]
    app.state.app_env = values["APP_ENV"]
    app.state.secret_key = (values["SECRET_KEY"] or secrets.token_hex(32)).encode("utf-8")

    db = app.open_database(args, MIGRATIONS_TABLE)
    try:
        applied = apply_migrations(db, migrations)
    except (MigrationError, sqlite3.Error) as err:  # sqlite3.Error: the lock never came
        exit_usage_error(f"migrations: {err}")
    app.state.db, app.state.migrations = db, migrations
    app.state.checks = [*readiness_checks(db, DEFAULT_MIN_FREE_MB),
                        Check("migrations", require_migrated)]

    app.state.deadline = RequestDeadline(values["REQUEST_TIMEOUT_S"])
    app.use(app.state.deadline.enforce)
    if values["APP_ENV"] == "development":
        app.get("/debug/sleep", summary="Sleep ?s= seconds (0–60): shows the request deadline",
                blocking=True, query=[SLEEP],
                responses={503: "No answer within REQUEST_TIMEOUT_S"})(debug_sleep)

    def log_start():
        settings = {name.lower(): value for name, value in redacted(values).items()}
        app.log("info", "config", **settings, listening_port=app.port)
        app.log("info", "migrations", applied=applied, known=len(migrations))

    app.on_listening.append(log_start)
    app.run(args)


if __name__ == "__main__":
    main()
