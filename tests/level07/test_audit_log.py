"""level07/audit_log.py, black-box: the service token, appends chained by SHA-256 over the
canonical JSON (recomputed here from the spec, not from the project's code), append-only at the
API (405) and in the database (triggers), no fork under concurrent appends from two processes,
signed checkpoints, filters and the list contract, the NDJSON export checked offline, and
`/audit/verify` finding rows edited, deleted, inserted, reordered or cut off directly in the
sqlite file, at the right seq.
"""
import concurrent.futures
import hashlib
import hmac
import json
import re
import shutil
import sqlite3

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem

SCRIPT = "level07/audit_log.py"
TOKEN = "test-service-token-0123456789"
KEY = "test-checkpoint-key-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 10
GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor", "action", "target", "metadata", "ip")


def start(start_server, *args, db="auto", every=1000):
    return start_server(SCRIPT, "--token", TOKEN, "--key", KEY, "--checkpoint-every", str(every),
                        *args, db=db)


def append(server, **body):
    body = {"actor": "alice", "action": "user.login", "target": "account:1", **body}
    resp = requests.post(f"{server.url}/audit", json=body, headers=AUTH, timeout=TIMEOUT)
    return expect_json(resp, 201)


def get(server, path, **kw):
    return requests.get(f"{server.url}{path}", headers=AUTH, timeout=TIMEOUT, **kw)


def verify(server):
    return expect_json(get(server, "/audit/verify"), 200)


def expected_hash(prev_hash, entry):
    """level07.md: sha256(prev_hash || canonical_json(entry)), sorted keys, no white space,
    UTF-8 unescaped, the seven fields with absent ones null."""
    canonical = json.dumps({name: entry.get(name) for name in FIELDS}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev_hash.encode() + canonical.encode("utf-8")).hexdigest()


def all_pages(server, path, query=""):
    items, cursor = [], None
    while True:
        page = expect_json(get(server, f"{path}?limit=100{query}"
                               + (f"&cursor={cursor}" if cursor else "")), 200)
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def all_entries(server, query=""):
    return all_pages(server, "/audit", query)


# --------------------------------------------------------------------------------------------
# Appending and the chain


def test_appends_chain_from_64_zeros_by_the_documented_hash(start_server):
    server = start(start_server)
    first = append(server, metadata={"zeta": 1, "älpha": ["ü", 2.5, None]}, ip="192.0.2.7")
    assert first["seq"] == 1 and first["prev_hash"] == GENESIS
    second = append(server, actor="bob", action="doc.delete", target="doc:42")
    assert second["seq"] == 2 and second["prev_hash"] == first["hash"]
    one = expect_json(get(server, "/audit/1"), 200)
    assert one["metadata"] == {"zeta": 1, "älpha": ["ü", 2.5, None]} and one["ip"] == "192.0.2.7"
    assert one["ts"] == first["ts"] and one["hash"] == first["hash"]
    assert expected_hash(GENESIS, one) == first["hash"]
    two = expect_json(get(server, "/audit/2"), 200)
    assert two["metadata"] is None and two["ip"] is None
    assert expected_hash(first["hash"], two) == second["hash"]
    resp = requests.post(f"{server.url}/audit", json={"actor": "a", "action": "b", "target": "c"},
                         headers=AUTH, timeout=TIMEOUT)
    assert expect_json(resp, 201)["seq"] == 3 and resp.headers["Location"] == "/audit/3"
    assert verify(server) == {"valid": True, "entries": 3, "head": resp.json()["hash"]}


@pytest.mark.parametrize("body, field", [
    ({"action": "x", "target": "y"}, "actor"),
    ({"actor": "", "action": "x", "target": "y"}, "actor"),
    ({"actor": "a", "action": "x", "target": "y", "seq": 7}, "seq"),
    ({"actor": "a", "action": "x", "target": "y", "hash": GENESIS}, "hash"),
    ({"actor": "a", "action": "x", "target": "y", "colour": "red"}, "colour"),
    ({"actor": "a", "action": "x", "target": "y", "metadata": [1]}, "metadata"),
    ({"actor": "a", "action": "x", "target": "y", "metadata": {"k": "\ud800"}}, "metadata"),
    ({"actor": "a", "action": "x", "target": "y", "ip": "300.1.1.1"}, "ip"),
    ({"actor": "a", "action": "x", "target": "y", "ip": 5}, "ip"),
])
def test_a_bad_entry_is_a_422_naming_the_field_and_appends_nothing(start_server_module, body,
                                                                     field):
    server = start(start_server_module)
    resp = requests.post(f"{server.url}/audit", data=json.dumps(body), headers={
        **AUTH, "Content-Type": "application/json"}, timeout=TIMEOUT)
    problem = expect_problem(resp, 422)
    assert field in {error["field"] for error in problem["errors"]}
    assert verify(server)["entries"] == 0


@pytest.mark.parametrize("method, path", [
    ("POST", "/audit"), ("GET", "/audit"), ("GET", "/audit/1"), ("GET", "/audit/verify"),
    ("GET", "/audit/export"), ("GET", "/audit/checkpoints"), ("POST", "/audit/checkpoints")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_every_audit_route_needs_the_service_token(start_server_module, method, path, headers):
    server = start(start_server_module)
    resp = requests.request(method, f"{server.url}{path}", headers=headers,
                            json={"actor": "a", "action": "b", "target": "c"}, timeout=TIMEOUT)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_without_flags_the_token_and_key_are_made_once_and_kept(start_server, tmp_path):
    db = tmp_path / "audit.sqlite3"
    server = start_server(SCRIPT, db=db)
    token = server.wait_for_stderr(re.compile(r"--token .*database: \S+$")).split()[-1]
    resp = requests.post(f"{server.url}/audit", json={"actor": "a", "action": "b", "target": "c"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
    expect_json(resp, 201)
    server.stop()
    again = start_server(SCRIPT, db=db)
    resp = requests.get(f"{again.url}/audit/1", headers={"Authorization": f"Bearer {token}"},
                        timeout=TIMEOUT)
    expect_json(resp, 200)
    assert token not in again.stderr_text(), "a kept token is not printed again"


# --------------------------------------------------------------------------------------------
# Append-only, twice


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/audit", "/audit/1"])
def test_no_route_updates_or_deletes_an_entry(start_server_module, method, path):
    server = start(start_server_module)
    append(server)
    resp = requests.request(method, f"{server.url}{path}", headers=AUTH,
                            json={"actor": "mallory"}, timeout=TIMEOUT)
    expect_problem(resp, 405)
    assert "GET" in resp.headers["Allow"] and method not in resp.headers["Allow"]
    assert expect_json(get(server, "/audit/1"), 200)["actor"] == "alice"


def test_the_database_itself_refuses_update_and_delete(start_server, tmp_path):
    db = tmp_path / "audit.sqlite3"
    server = start(start_server, db=db, every=1)
    append(server)
    server.stop()
    with sqlite3.connect(db) as conn:
        for statement in ("UPDATE entries SET actor = 'mallory' WHERE seq = 1",
                          "DELETE FROM entries WHERE seq = 1",
                          "UPDATE checkpoints SET hash = 'x'", "DELETE FROM checkpoints"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(statement)
    conn.close()
    again = start(start_server, db=db, every=1)
    assert expect_json(get(again, "/audit/1"), 200)["actor"] == "alice"
    assert verify(again)["valid"] is True


def test_an_acknowledged_entry_and_its_checkpoint_survive_kill_9(start_server, tmp_path):
    db = tmp_path / "audit.sqlite3"
    server = start(start_server, db=db, every=3)
    answers = [append(server, target=f"t{i}") for i in range(3)]
    server.kill9()
    again = start(start_server, db=db, every=3)
    assert verify(again) == {"valid": True, "entries": 3, "head": answers[-1]["hash"]}
    signed = expect_json(get(again, "/audit/checkpoints"), 200)["items"]
    assert [(c["seq"], c["hash"]) for c in signed] == [(3, answers[-1]["hash"])]


# --------------------------------------------------------------------------------------------
# Concurrency: one chain, however many appenders


def test_concurrent_appenders_in_two_processes_never_fork_the_chain(start_server, tmp_path):
    db = tmp_path / "audit.sqlite3"
    servers = [start(start_server, "--server", "threaded", db=db, every=50) for _ in range(2)]
    appenders, each = 32, 33  # 1,056 entries: the export below crosses its 1,000-row batches

    def appender(n):
        with requests.Session() as session:
            return [expect_json(session.post(f"{servers[n % 2].url}/audit", headers=AUTH,
                                             json={"actor": f"worker-{n}", "action": "tick",
                                                   "target": f"t{i}"}, timeout=TIMEOUT), 201)
                    for i in range(each)]

    with concurrent.futures.ThreadPoolExecutor(appenders) as pool:
        answers = [a for batch in pool.map(appender, range(appenders)) for a in batch]
    total = appenders * each
    assert sorted(a["seq"] for a in answers) == list(range(1, total + 1))
    entries = all_entries(servers[0])
    assert [e["seq"] for e in entries] == list(range(1, total + 1))
    prev = GENESIS
    for entry in entries:
        assert entry["prev_hash"] == prev and expected_hash(prev, entry) == entry["hash"]
        prev = entry["hash"]
    for server in servers:
        assert verify(server) == {"valid": True, "entries": total, "head": prev}
    signed = all_pages(servers[1], "/audit/checkpoints")
    assert [c["seq"] for c in signed] == list(range(50, total + 1, 50))
    exported = get(servers[1], "/audit/export").content.decode("utf-8").splitlines()
    assert [json.loads(line) for line in exported] == entries


# --------------------------------------------------------------------------------------------
# Checkpoints


def signature(seq, hash_, key=KEY):
    return hmac.new(key.encode(), f"{seq}:{hash_}".encode(), hashlib.sha256).hexdigest()


def test_the_head_is_signed_every_n_entries_and_on_demand(start_server):
    server = start(start_server, every=5)
    resp = requests.post(f"{server.url}/audit/checkpoints", headers=AUTH, timeout=TIMEOUT)
    expect_problem(resp, 409)  # nothing to sign yet
    answers = [append(server, target=f"t{i}") for i in range(12)]
    items = expect_json(get(server, "/audit/checkpoints"), 200)["items"]
    assert [(c["seq"], c["hash"]) for c in items] == [(5, answers[4]["hash"]),
                                                      (10, answers[9]["hash"])]
    for c in items:
        assert c["signature"] == signature(c["seq"], c["hash"]) and c["ts"].endswith("Z")
    resp = requests.post(f"{server.url}/audit/checkpoints", headers=AUTH, timeout=TIMEOUT)
    made = expect_json(resp, 201)
    assert (made["seq"], made["hash"]) == (12, answers[11]["hash"])
    assert made["signature"] == signature(12, answers[11]["hash"])
    again = expect_json(requests.post(f"{server.url}/audit/checkpoints", headers=AUTH,
                                      timeout=TIMEOUT), 201)
    assert again == made, "signing the same head twice gives the same checkpoint"
    page = expect_json(get(server, "/audit/checkpoints?limit=2"), 200)
    assert [c["seq"] for c in page["items"]] == [5, 10] and page["next_cursor"]
    rest = expect_json(get(server, f"/audit/checkpoints?cursor={page['next_cursor']}"), 200)
    assert [c["seq"] for c in rest["items"]] == [12] and rest["next_cursor"] is None


# --------------------------------------------------------------------------------------------
# Queries and the export


@pytest.fixture(scope="module")
def filled(start_server_module):
    server = start(start_server_module)
    for i in range(25):
        append(server, actor=["alice", "bob"][i % 2], action=["read", "write", "delete"][i % 3],
               target=f"doc:{i % 5}", metadata={"i": i})
    return server


@pytest.mark.parametrize("query, wanted", [
    ("", lambda i: True),
    ("&actor=bob", lambda i: i % 2 == 1),
    ("&action=delete", lambda i: i % 3 == 2),
    ("&target=doc:3&actor=alice", lambda i: i % 5 == 3 and i % 2 == 0),
    ("&since=2000-01-01&until=2999-12-31T23:59:59Z", lambda i: True),
    ("&until=2000-01-01", lambda i: False),
    ("&since=2999-01-01T00:00:00%2B01:00", lambda i: False),
])
def test_filters_and_pages_in_seq_order(filled, query, wanted):
    expected = [i + 1 for i in range(25) if wanted(i)]
    assert [e["seq"] for e in all_entries(filled, query)] == expected
    page = expect_json(get(filled, f"/audit?limit=3{query}"), 200)
    assert [e["seq"] for e in page["items"]] == expected[:3]
    assert (page["next_cursor"] is None) == (len(expected) <= 3)


def test_since_and_until_bound_by_time(filled):
    ts = expect_json(get(filled, "/audit/1"), 200)["ts"]  # …:SS.mmmZ
    second = ts[:19] + "Z"
    assert all_entries(filled, f"&until={second}")[0]["seq"] == 1
    assert all_entries(filled, f"&since={second}")[0]["seq"] == 1


@pytest.mark.parametrize("query, name", [("limit=0", "limit"), ("limit=101", "limit"),
                                         ("cursor=nope", "cursor"), ("since=yesterday", "since"),
                                         ("until=2026-02-30", "until")])
def test_a_bad_query_is_a_400_naming_it(filled, query, name):
    problem = expect_problem(get(filled, f"/audit?{query}"), 400)
    assert name in problem["detail"]


def test_an_unknown_seq_is_a_404(filled):
    expect_problem(get(filled, "/audit/999"), 404)
    expect_problem(get(filled, "/audit/0"), 404)


def test_the_export_is_ndjson_that_verifies_offline(filled):
    resp = get(filled, "/audit/export")
    expect(resp, 200, content_type="application/x-ndjson")
    lines = resp.content.decode("utf-8").splitlines()
    exported = [json.loads(line) for line in lines]
    assert exported == all_entries(filled)
    prev = GENESIS
    for seq, entry in enumerate(exported, start=1):
        assert entry["seq"] == seq and entry["prev_hash"] == prev
        assert expected_hash(prev, entry) == entry["hash"]
        prev = entry["hash"]
    assert verify(filled)["head"] == prev


# --------------------------------------------------------------------------------------------
# Tampering with the sqlite file directly


@pytest.fixture(scope="module")
def pristine(start_server_module, tmp_path_factory):
    """A log of 10 entries with checkpoints at 4 and 8, closed cleanly: (db path, hashes)."""
    db = tmp_path_factory.mktemp("pristine") / "audit.sqlite3"
    server = start(start_server_module, db=db, every=4)
    hashes = [append(server, actor=f"user-{i}", target=f"doc:{i}")["hash"] for i in range(10)]
    server.stop()
    return db, hashes


def rewrite_chain_from(conn, seq):
    """What an attacker without the key can do: recompute every hash from `seq` on."""
    prev = conn.execute("SELECT hash FROM entries WHERE seq = ?", (seq - 1,)).fetchone()[0]
    rows = conn.execute("SELECT seq, ts, actor, action, target, metadata, ip FROM entries "
                        "WHERE seq >= ? ORDER BY seq", (seq,)).fetchall()
    for row in rows:
        entry = dict(zip(FIELDS, row))
        entry["metadata"] = json.loads(entry["metadata"]) if entry["metadata"] else None
        digest = expected_hash(prev, entry)
        conn.execute("UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = ?",
                     (prev, digest, entry["seq"]))
        prev = digest


def shift_up_from(conn, seq):
    for (n,) in conn.execute("SELECT seq FROM entries WHERE seq >= ? ORDER BY seq DESC",
                             (seq,)).fetchall():
        conn.execute("UPDATE entries SET seq = seq + 1 WHERE seq = ?", (n,))


TAMPERING = {
    "edited": (["UPDATE entries SET actor = 'mallory' WHERE seq = 6"], 6, "content"),
    "edited metadata": (["UPDATE entries SET metadata = '{\"x\":1}' WHERE seq = 3"], 3, "content"),
    "metadata no longer JSON": (["UPDATE entries SET metadata = '{oops' WHERE seq = 7"], 7,
                                "content"),
    "deleted": (["DELETE FROM entries WHERE seq = 5"], 5, "missing"),
    "deleted and renumbered": (["DELETE FROM entries WHERE seq = 5",
                                "UPDATE entries SET seq = seq - 1 WHERE seq > 5"], 5, "prev_hash"),
    "inserted": ([lambda conn: shift_up_from(conn, 6),
                  "INSERT INTO entries SELECT 6, ts, 'mallory', action, target, metadata, ip, "
                  "hash, hash FROM entries WHERE seq = 5"], 6, "content"),
    "reordered": (["UPDATE entries SET seq = -6 WHERE seq = 6",
                   "UPDATE entries SET seq = 6 WHERE seq = 7",
                   "UPDATE entries SET seq = 7 WHERE seq = -6"], 6, "reordered"),
    "tail cut before a checkpoint": (["DELETE FROM entries WHERE seq > 6"], 7, "cut off"),
    "first entry deleted": (["DELETE FROM entries WHERE seq = 1"], 1, "missing"),
    "chain rewritten after an edit": (["UPDATE entries SET actor = 'mallory' WHERE seq = 2",
                                       lambda conn: rewrite_chain_from(conn, 2)],
                                      4, "checkpoint 4"),
    "checkpoint forged": (["INSERT INTO checkpoints VALUES (10, (SELECT hash FROM entries "
                           "WHERE seq = 10), 'ab12', '2026-01-01T00:00:00Z')"], 10, "signature"),
}


@pytest.mark.parametrize("steps, first_bad, why", TAMPERING.values(), ids=TAMPERING.keys())
def test_verify_finds_direct_tampering_at_the_right_seq(start_server, pristine, tmp_path,
                                                        steps, first_bad, why):
    source, _ = pristine
    db = tmp_path / "audit.sqlite3"
    shutil.copy(source, db)
    conn = sqlite3.connect(db)
    with conn:
        for trigger in ("entries_refuse_update", "entries_refuse_delete",
                        "checkpoints_refuse_update", "checkpoints_refuse_delete"):
            conn.execute(f"DROP TRIGGER {trigger}")
        for step in steps:
            step(conn) if callable(step) else conn.execute(step)
    conn.close()
    server = start(start_server, db=db, every=4)
    answer = verify(server)
    assert answer["valid"] is False and answer["first_bad_seq"] == first_bad, answer
    assert why in answer["reason"], answer


def test_an_untouched_copy_verifies(start_server, pristine, tmp_path):
    source, hashes = pristine
    db = tmp_path / "audit.sqlite3"
    shutil.copy(source, db)
    server = start(start_server, db=db, every=4)
    assert verify(server) == {"valid": True, "entries": 10, "head": hashes[-1]}


def test_checkpoints_signed_under_another_key_do_not_verify(start_server, pristine, tmp_path):
    source, _ = pristine
    db = tmp_path / "audit.sqlite3"
    shutil.copy(source, db)
    server = start_server(SCRIPT, "--token", TOKEN, "--key", "another-key-0123456789", db=db)
    answer = verify(server)
    assert answer["valid"] is False and answer["first_bad_seq"] == 4, answer
