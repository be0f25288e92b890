"""lib.storage on a real sqlite file: every write is durable when the call returns, and a
transaction is all or nothing.

The black-box side (a failed commit is never acknowledged, a refused If-Match undoes only
itself) is tested through the counter in tests/level01."""
import sqlite3
import threading

import pytest

from lib.storage import Database

SCHEMA = "CREATE TABLE items (name TEXT PRIMARY KEY)"


@pytest.fixture
def db(tmp_path):
    database = Database(str(tmp_path / "db.sqlite3"), SCHEMA)
    yield database
    database.close()


def names_seen_from_outside(db):
    """What another connection (another process, a restart) finds: the committed rows only."""
    conn = sqlite3.connect(db.path)
    try:
        return sorted(name for (name,) in conn.execute("SELECT name FROM items"))
    finally:
        conn.close()


def test_every_write_is_committed_before_the_call_returns(db):
    db.execute("INSERT INTO items VALUES ('alone')")
    assert names_seen_from_outside(db) == ["alone"]


def test_a_transaction_is_committed_when_its_block_ends(db):
    with db.transaction() as conn:
        conn.execute("INSERT INTO items VALUES ('a')")
        conn.execute("INSERT INTO items VALUES ('b')")
        assert names_seen_from_outside(db) == []
    assert names_seen_from_outside(db) == ["a", "b"]


def test_a_transaction_that_raises_leaves_nothing(db):
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO items VALUES ('a')")
            conn.execute("INSERT INTO items VALUES ('a')")
    assert names_seen_from_outside(db) == []
    db.execute("INSERT INTO items VALUES ('after')")  # the connection is usable again
    assert names_seen_from_outside(db) == ["after"]


def test_writers_of_many_threads_all_commit(db):
    def write(n):
        for i in range(50):
            db.execute("INSERT INTO items VALUES (?)", (f"{n}-{i}",))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(names_seen_from_outside(db)) == 400
