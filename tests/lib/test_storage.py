"""lib.storage's group commit, on a real event loop and a real sqlite file.

The black-box side (answers wait for the commit, a failed commit is never acknowledged, a
refused If-Match undoes only itself) is tested through the counter in tests/level01; here the
rules are pinned down one at a time."""
import asyncio
import sqlite3
import threading

import pytest

from lib.storage import CommitFailed, Database, group_commit

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


def run_one_turn(turn):
    """Call `turn()` in one callback of an event loop that groups its commits; return what
    the answers waiting for that group were told (None: committed) and what another
    connection saw at that moment."""

    async def main():
        loop = asyncio.get_running_loop()
        told = loop.create_future()

        def guarded():
            try:
                turn(told)
            except BaseException as error:  # an assertion that fails on the loop fails the test
                told.set_exception(error)

        group_commit.start(loop)
        try:
            loop.call_soon(guarded)
            return await asyncio.wait_for(told, 10)
        finally:
            group_commit.stop()

    return asyncio.run(main())


def test_the_writes_of_one_turn_are_committed_together_before_the_answers_go(db):
    def turn(told):
        for name in ("a", "b", "c"):
            db.execute("INSERT INTO items VALUES (?)", (name,))
        assert db.query("SELECT count(*) FROM items")[0][0] == 3  # the loop reads its own writes
        assert names_seen_from_outside(db) == []  # … nobody else does, before the commit
        group_commit.after_commit(lambda error: told.set_result((error, names_seen_from_outside(db))))

    assert run_one_turn(turn) == (None, ["a", "b", "c"])


def test_a_transaction_that_raises_undoes_only_itself(db):
    def turn(told):
        db.execute("INSERT INTO items VALUES ('before')")
        with pytest.raises(ZeroDivisionError):
            with db.transaction() as conn:
                conn.execute("INSERT INTO items VALUES ('inside')")
                1 / 0
        with pytest.raises(sqlite3.IntegrityError):  # a failing statement undoes only itself too
            db.execute("INSERT INTO items VALUES ('before')")
        with db.transaction() as conn:
            conn.execute("INSERT INTO items VALUES ('after')")
        group_commit.after_commit(lambda error: told.set_result((error, names_seen_from_outside(db))))

    assert run_one_turn(turn) == (None, ["after", "before"])


def test_when_sqlite_drops_the_group_every_waiting_answer_fails(db):
    def turn(told):
        db.execute("INSERT INTO items VALUES ('lost')")
        db.connection().execute("ROLLBACK")  # what sqlite itself does on SQLITE_FULL or IOERR
        with pytest.raises(sqlite3.OperationalError):  # later writes of the turn fail too
            db.execute("INSERT INTO items VALUES ('also lost')")
        group_commit.after_commit(lambda error: told.set_result((error, names_seen_from_outside(db))))

    error, seen = run_one_turn(turn)
    assert isinstance(error, CommitFailed) and error.status == 500
    assert seen == []


def test_other_threads_commit_on_their_own_once_the_group_is_done(db):
    def write_from_a_worker():  # a blocking handler in the pool: not part of the group
        db.execute("INSERT INTO items VALUES ('worker')")

    def turn(told):
        db.execute("INSERT INTO items VALUES ('loop')")
        worker = threading.Thread(target=write_from_a_worker)
        worker.start()
        worker.join(0.2)
        assert worker.is_alive()  # it waits for the group's write lock …

        def committed(error):
            worker.join(5)  # … and gets it once the group has committed
            told.set_result((error, names_seen_from_outside(db)))

        group_commit.after_commit(committed)

    assert run_one_turn(turn) == (None, ["loop", "worker"])


def test_without_an_event_loop_every_write_commits_at_once(db):
    db.execute("INSERT INTO items VALUES ('alone')")
    assert names_seen_from_outside(db) == ["alone"]
    assert not group_commit.open
