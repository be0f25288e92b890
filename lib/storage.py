"""sqlite set-up: durable, correct with many threads, and visible in the trace.

- WAL journal mode with `synchronous=NORMAL`: a commit is one append to the write-ahead log, so
  single-row commits are ~45× faster than the default rollback journal, and every committed
  transaction survives the process being killed (kill -9); only an OS crash or power loss can
  lose the last commits (https://www.sqlite.org/wal.html).
- One connection per thread. A sqlite connection must not be used by two threads at once;
  giving each thread its own (threading.local) avoids a global lock, lets readers run in
  parallel with the writer (WAL), and leaves sqlite to serialise writers. `busy_timeout` makes a
  writer wait for the lock instead of failing at once.
- Writers of this process queue on a lock before they reach sqlite. sqlite lets one writer in
  at a time anyway, and its busy handler waits by sleeping with growing back-off (up to 100 ms
  a try): with 32 threads writing, that showed as a p99 of half a second. A lock hands over the
  moment it is released. Writers in other processes still meet `busy_timeout`.
- Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front, so two
  read-then-write transactions cannot deadlock on upgrading their locks (the classic
  "database is locked" surprise of deferred transactions).
- `:memory:` is one database per connection in sqlite, so for it all threads share a single
  connection behind a lock.
- Each write commits on its own before the call returns, so a handler's answer is sent only
  after what it changed is durable. (Committing many requests' writes together, group commit,
  is faster under load and is the lesson of level07/analytics_collector.)
- With `--trace`, every statement is added to the request's trace, string and blob values
  masked, since sqlite fills the parameters into the text it hands the trace callback.
"""
import contextlib
import re
import sqlite3
import sys
import threading
from pathlib import Path

from lib.problems import HTTPError
from lib.trace import trace_event

REPO_ROOT = Path(__file__).resolve().parent.parent
BUSY_TIMEOUT_S = 10  # how long a writer waits for the write lock before it fails
_LITERAL = re.compile(r"[xX]?'(?:[^']|'')*'")


class StorageError(Exception):
    """The database cannot be opened or set up (bad path, not a database, no permission)."""


class StorageFull(HTTPError):
    """507: a write failed because the disk is full or failing (SQLITE_FULL, SQLITE_IOERR).
    Nothing of the request was stored; it is the machine's trouble, not a bug in the code, so
    the log gets one line for it rather than a traceback."""

    status = 507


def default_db_path(name):
    return str(REPO_ROOT / "data" / f"{name}.sqlite3")


def masked_sql(statement):
    return "SQL " + " ".join(_LITERAL.sub("'…'", statement).split())


class Database:
    """Connections to one sqlite file, one per thread.

    `query` and `query_one` read; `execute` runs one statement in its own transaction;
    `with db.transaction() as conn:` groups statements atomically (commit on success, rollback
    on any exception); `with db.reading() as conn:` lends the connection for plain reads."""

    def __init__(self, path, schema="", *, trace=False):
        self.path = path
        self.trace = trace
        self._local = threading.local()
        self._all = []                 # (thread, connection) of every open one, closed at shutdown
        self._all_lock = threading.Lock()
        self._shared_lock = threading.RLock() if path == ":memory:" else None
        self._writer_lock = self._shared_lock or threading.RLock()
        self._shared = None
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"cannot create the folder for {path}: {err.strerror}") from None
        try:
            conn = self.connection()
            conn.execute("PRAGMA journal_mode=WAL")
            if schema:
                conn.executescript(schema)
        except sqlite3.Error as err:
            self.close()
            raise StorageError(f"cannot open database {path}: {err}") from None

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_S)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        if self.trace:
            conn.set_trace_callback(lambda statement: trace_event(masked_sql(statement)))
        with self._all_lock:
            # A thread per client (--server threaded) would otherwise leave one open connection,
            # two file descriptors, behind each client that has gone: close those of dead threads.
            alive = []
            for thread, other in self._all:
                if thread.is_alive() or other is self._shared:
                    alive.append((thread, other))
                else:
                    with contextlib.suppress(sqlite3.Error):
                        other.close()
            alive.append((threading.current_thread(), conn))
            self._all = alive
        return conn

    def connection(self):
        """This thread's connection (made on first use)."""
        if self._shared_lock is not None:
            if self._shared is None:
                self._shared = self._connect()
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextlib.contextmanager
    def _writing(self):
        """This thread's connection, as the process's one writer (see the module docstring).
        Waiting is bounded like sqlite's own: past `BUSY_TIMEOUT_S` it fails the same way."""
        if not self._writer_lock.acquire(timeout=BUSY_TIMEOUT_S):
            raise sqlite3.OperationalError("database is locked")
        try:
            yield self.connection()
        except sqlite3.OperationalError as error:
            if not getattr(error, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
                raise
            with contextlib.suppress(OSError):  # stderr may be on the full disk too
                sys.stderr.write(f"error: the database could not be written: {error}\n")
            raise StorageFull("the change could not be stored (the server's disk is full or "
                              "failing); nothing of it was saved, retry later") from None
        finally:
            self._writer_lock.release()

    def query(self, sql, params=()):
        with self.reading() as conn:
            return conn.execute(sql, params).fetchall()

    def query_one(self, sql, params=()):
        with self.reading() as conn:
            return conn.execute(sql, params).fetchone()

    def execute(self, sql, params=()):
        """One statement that writes, committed on its own (autocommit). Returns the cursor."""
        with self._writing() as conn:
            return conn.execute(sql, params)

    def execute_returning(self, sql, params=()):
        """One writing statement with `RETURNING`, committed on its own; its rows. They are
        fetched before the writer lock is let go: the statement (and so its commit) only
        finishes when its last row is read."""
        with self._writing() as conn:
            return conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def transaction(self):
        """`BEGIN IMMEDIATE` … `COMMIT` (durable when the block ends), or `ROLLBACK` when the
        block raises."""
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # sqlite may have rolled back already (e.g. on SQLITE_FULL)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def reading(self):
        """This thread's connection for reads outside a transaction (each statement stands
        alone). WAL lets reads run beside the writer, so no lock but `:memory:`'s, whose one
        connection all threads share. For code written against a connection, which then runs
        the same inside `transaction()` and out of it."""
        with self._shared_lock or contextlib.nullcontext():
            yield self.connection()

    def ping(self):
        """A real round trip to the file, for readiness checks."""
        self.query_one("SELECT count(*) FROM sqlite_master")

    def close(self):
        with self._all_lock:
            for _, conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
        self._shared = None
