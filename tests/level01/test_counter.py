"""level01/counter.py, black-box: named counters, exact under concurrency, durable, ETag/If-Match.

Most rules run against both stores (sqlite and `--memory`) through the `counters` fixture, each
test on counter names of its own, so one server per store serves the whole module. Tests whose
point is a fresh server (listing, durability, tracing, the exactness runs) start their own.
"""
import http.client
import json
import re
import resource
import threading
import uuid

import pytest
import requests

from tests.harness import (RawConnection, expect, expect_json, expect_problem, request_bytes,
                           request_schemas, run_once, without_description)

SCRIPT = "level01/counter.py"
TIMEOUT = 10
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
JSON = {"Content-Type": "application/json"}


def fresh(prefix="c"):
    """A counter name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Client:
    """A keep-alive session on one server, with the counter calls spelled out."""

    def __init__(self, server):
        self.server = server
        self.url = server.url
        self.session = requests.Session()

    def get(self, name, **kw):
        return self.session.get(f"{self.url}/counters/{name}", timeout=TIMEOUT, **kw)

    def post(self, name, action, body=None, **kw):
        if body is not None:
            kw["json"] = body
        return self.session.post(f"{self.url}/counters/{name}/{action}", timeout=TIMEOUT, **kw)

    def put(self, name, body, **kw):
        return self.session.put(f"{self.url}/counters/{name}", json=body, timeout=TIMEOUT, **kw)

    def delete(self, name, **kw):
        return self.session.delete(f"{self.url}/counters/{name}", timeout=TIMEOUT, **kw)

    def list(self, **params):
        return self.session.get(f"{self.url}/counters", params=params, timeout=TIMEOUT)

    def state(self, name):
        return expect_json(self.get(name), 200)


@pytest.fixture(scope="module", params=["sqlite", "memory"])
def counters(request, start_server_module):
    args = ("--memory",) if request.param == "memory" else ()
    return Client(start_server_module(SCRIPT, *args))


# --------------------------------------------------------------------------------------------
# Reading


def test_a_never_touched_counter_reads_as_zero(counters):
    name = fresh()
    resp = counters.get(name)
    assert expect_json(resp, 200) == {"name": name, "value": 0, "version": 0, "updated_at": None}
    assert resp.headers["ETag"] == '"0"'


def test_head_answers_like_get_without_a_body(counters):
    name = fresh()
    expect_json(counters.post(name, "increment"), 200)
    resp = counters.session.head(f"{counters.url}/counters/{name}", timeout=TIMEOUT)
    expect(resp, 200)
    assert resp.content == b""
    assert resp.headers["ETag"] == '"1"'
    assert int(resp.headers["Content-Length"]) == len(counters.get(name).content)


def test_if_none_match_with_the_current_version_is_304(counters):
    name = fresh()
    expect_json(counters.post(name, "increment"), 200)
    resp = counters.get(name, headers={"If-None-Match": '"1"'})
    expect(resp, 304)
    assert resp.content == b"" and resp.headers["ETag"] == '"1"'
    expect_json(counters.get(name, headers={"If-None-Match": '"0"'}), 200)


# --------------------------------------------------------------------------------------------
# Increment and decrement


def test_increment_by_default_one_answers_the_new_state(counters):
    name = fresh()
    resp = counters.post(name, "increment")
    state = expect_json(resp, 200)
    assert state["name"] == name and state["value"] == 1 and state["version"] == 1
    assert RFC3339_UTC.fullmatch(state["updated_at"]), state
    assert resp.headers["ETag"] == '"1"'
    state = expect_json(counters.post(name, "increment"), 200)
    assert (state["value"], state["version"]) == (2, 2)
    assert counters.state(name) == state


def test_increment_and_decrement_by_n(counters):
    name = fresh()
    assert expect_json(counters.post(name, "increment", {"by": 1_000_000_000}), 200)["value"] == 10**9
    assert expect_json(counters.post(name, "decrement", {"by": 7}), 200)["value"] == 10**9 - 7
    state = expect_json(counters.post(name, "decrement", {"by": 10**9}), 200)
    assert (state["value"], state["version"]) == (-7, 3)  # below zero is a value like any other
    assert expect_json(counters.post(name, "decrement"), 200)["value"] == -8


def test_a_whole_number_written_with_a_fraction_is_that_integer(counters):
    name = fresh()  # JSON has one number type; JSON Schema, and so /openapi.json, counts 910.0 as 910
    assert expect_json(counters.put(name, {"value": 910.0}), 200)["value"] == 910
    assert expect_json(counters.post(name, "increment", {"by": 5.0}), 200)["value"] == 915
    value = counters.state(name)["value"]
    assert value == 915 and type(value) is int  # stored as the integer, not as 915.0


def test_an_empty_json_body_means_by_one(counters):
    name = fresh()
    assert expect_json(counters.post(name, "increment", {}), 200)["value"] == 1
    resp = counters.post(name, "increment", data=b"", headers=JSON)
    assert expect_json(resp, 200)["value"] == 2


@pytest.mark.parametrize("by", [0, -1, 1_000_000_001, 10**30, True, 1.5, 0.0, 1e10, "3", None, [1], {}])
def test_by_outside_1_to_a_billion_is_422_and_changes_nothing(counters, by):
    name = fresh()
    expect_json(counters.post(name, "increment"), 200)
    for action in ("increment", "decrement"):
        problem = expect_problem(counters.post(name, action, {"by": by}), 422)
        assert [e["field"] for e in problem["errors"]] == ["by"], problem
    assert counters.state(name)["value"] == 1


def test_unknown_fields_are_422_naming_every_bad_field(counters):
    name = fresh()
    problem = expect_problem(counters.post(name, "increment", {"by": 0, "step": 2, "value": 9}), 422)
    assert {e["field"] for e in problem["errors"]} == {"by", "step", "value"}
    assert counters.state(name)["version"] == 0


@pytest.mark.parametrize("body, headers, status", [
    (b'{"by": ', JSON, 400),                              # malformed JSON
    (b"[1]", JSON, 422),                                  # JSON, but not an object
    (b'{"by": 2}', {"Content-Type": "text/plain"}, 415),  # not JSON at all
])
def test_a_body_that_is_not_a_json_object(counters, body, headers, status):
    name = fresh()
    expect_problem(counters.post(name, "increment", data=body, headers=headers), status)
    assert counters.state(name)["version"] == 0


# --------------------------------------------------------------------------------------------
# The signed 64-bit range: 409, nothing changed


def test_reaching_the_limits_exactly_is_allowed(counters):
    name = fresh()
    expect_json(counters.put(name, {"value": INT64_MAX - 10**9}), 200)
    assert expect_json(counters.post(name, "increment", {"by": 10**9}), 200)["value"] == INT64_MAX
    expect_json(counters.put(name, {"value": INT64_MIN + 5}), 200)
    assert expect_json(counters.post(name, "decrement", {"by": 5}), 200)["value"] == INT64_MIN


@pytest.mark.parametrize("start, action, by", [
    (INT64_MAX, "increment", 1),
    (INT64_MAX - 999_999_999, "increment", 1_000_000_000),
    (INT64_MIN, "decrement", 1),
    (INT64_MIN + 5, "decrement", 6),
])
def test_leaving_the_range_is_409_and_changes_nothing(counters, start, action, by):
    name = fresh()
    before = expect_json(counters.put(name, {"value": start}), 200)
    problem = expect_problem(counters.post(name, action, {"by": by}), 409)
    assert "64-bit" in problem["detail"]
    after = counters.state(name)
    assert after == before  # same value (still an integer), same version, same time
    assert isinstance(after["value"], int)


# --------------------------------------------------------------------------------------------
# PUT, reset and DELETE


def test_put_sets_the_value(counters):
    name = fresh()
    resp = counters.put(name, {"value": 42})
    state = expect_json(resp, 200)
    assert (state["value"], state["version"]) == (42, 1) and resp.headers["ETag"] == '"1"'
    state = expect_json(counters.put(name, {"value": -3}), 200)
    assert (state["value"], state["version"]) == (-3, 2)
    assert counters.state(name) == state


@pytest.mark.parametrize("body, field", [
    ({}, "value"),
    ({"value": INT64_MAX + 1}, "value"),
    ({"value": INT64_MIN - 1}, "value"),
    ({"value": True}, "value"),
    ({"value": 1.5}, "value"),
    ({"value": "5"}, "value"),
    ({"value": 5, "version": 9}, "version"),       # server-owned fields are read-only
    ({"value": 5, "name": "other"}, "name"),
    ({"value": 5, "colour": "red"}, "colour"),
])
def test_put_with_a_bad_body_is_422(counters, body, field):
    name = fresh()
    problem = expect_problem(counters.put(name, body), 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert counters.state(name)["version"] == 0


def test_put_without_a_body(counters):
    name = fresh()
    resp = counters.session.put(f"{counters.url}/counters/{name}", headers=JSON, timeout=TIMEOUT)
    expect_problem(resp, (411, 422))


def test_reset_sets_zero_and_counts_as_a_change(counters):
    name = fresh()
    expect_json(counters.post(name, "increment", {"by": 5}), 200)
    resp = counters.post(name, "reset")
    state = expect_json(resp, 200)
    assert (state["value"], state["version"]) == (0, 2) and resp.headers["ETag"] == '"2"'
    assert counters.state(name) == state


def test_delete_is_204_and_forgets_the_counter(counters):
    name = fresh()
    expect_json(counters.post(name, "increment", {"by": 3}), 200)
    resp = counters.delete(name)
    expect(resp, 204)
    assert resp.content == b"" and "Content-Length" not in resp.headers
    assert counters.state(name) == {"name": name, "value": 0, "version": 0, "updated_at": None}
    expect(counters.delete(name), 204)        # idempotent: deleting it again is fine
    expect(counters.delete(fresh()), 204)     # so is deleting one that never existed
    assert expect_json(counters.post(name, "increment"), 200)["value"] == 1


# --------------------------------------------------------------------------------------------
# If-Match: optimistic concurrency (412, nothing changed)


def test_if_match_with_the_current_version_goes_ahead(counters):
    name = fresh()
    expect_json(counters.post(name, "increment", {"by": 4}), 200)
    state = expect_json(counters.post(name, "reset", headers={"If-Match": '"1"'}), 200)
    assert (state["value"], state["version"]) == (0, 2)
    state = expect_json(counters.put(name, {"value": 9}, headers={"If-Match": '"7", "2"'}), 200)
    assert (state["value"], state["version"]) == (9, 3)
    expect(counters.delete(name, headers={"If-Match": "*"}), 204)


def test_a_never_created_counter_has_the_etag_0(counters):
    name = fresh()
    expect_problem(counters.put(name, {"value": 1}, headers={"If-Match": '"1"'}), 412)
    state = expect_json(counters.put(name, {"value": 1}, headers={"If-Match": '"0"'}), 200)
    assert (state["value"], state["version"]) == (1, 1)


@pytest.mark.parametrize("if_match", ['"1"', '"3"', 'W/"2"', '2', '"x"'])
def test_a_stale_or_weak_if_match_is_412_and_changes_nothing(counters, if_match):
    name = fresh()
    expect_json(counters.post(name, "increment"), 200)
    before = expect_json(counters.post(name, "increment"), 200)  # version 2
    headers = {"If-Match": if_match}
    problem = expect_problem(counters.post(name, "reset", headers=headers), 412)
    assert '"2"' in problem["detail"]
    expect_problem(counters.put(name, {"value": 100}, headers=headers), 412)
    expect_problem(counters.post(name, "increment", headers=headers), 412)
    expect_problem(counters.delete(name, headers=headers), 412)
    assert counters.state(name) == before


# --------------------------------------------------------------------------------------------
# Names: 1–64 of [A-Za-z0-9_.-], else 400 (a bad path parameter)


def test_every_allowed_character_and_64_of_them(counters):
    for name in ["A-Za-z0-9_.-", "x" * 64, "1", "-", "...", ".hidden"]:
        state = expect_json(counters.post(name, "increment"), 200)
        assert state["name"] == name
        assert counters.state(name)["value"] >= 1


@pytest.mark.parametrize("target", [
    "/counters/" + "x" * 65,
    "/counters/a%20b",
    "/counters/caf%C3%A9",
    "/counters/a*b",
    "/counters/a%2Cb",
    "/counters/%00",
])
def test_a_bad_name_is_400_on_every_route(counters, target):
    for method, suffix, body in [("GET", "", None), ("PUT", "", {"value": 1}), ("DELETE", "", None),
                                 ("POST", "/increment", None), ("POST", "/decrement", None),
                                 ("POST", "/reset", None)]:
        resp = counters.session.request(method, counters.url + target + suffix, json=body,
                                        timeout=TIMEOUT)
        problem = expect_problem(resp, 400)
        assert [e["field"] for e in problem["errors"]] == ["name"], problem


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_segments_are_not_counter_names(counters, name):
    # Sent raw: HTTP libraries remove dot segments from paths (RFC 3986 §5.2.4), which is why
    # a counter with such a name could never be reached by a normal client.
    server = counters.server
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", f"/counters/{name}/increment"))
        response = conn.read_response()
    assert response.status == 400, response.raw


def test_the_wrong_method_is_405_with_allow(counters):
    resp = counters.session.get(f"{counters.url}/counters/{fresh()}/increment", timeout=TIMEOUT)
    expect_problem(resp, 405)
    assert "POST" in resp.headers["Allow"]


# --------------------------------------------------------------------------------------------
# GET /counters: the list contract


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_the_list_pages_through_every_counter_in_name_order(start_server, store):
    client = Client(start_server(SCRIPT, *(["--memory"] if store == "memory" else [])))
    assert expect_json(client.list(), 200) == {"items": [], "next_cursor": None}
    names = [f"n{i:02d}" for i in range(1, 12)]
    for i, name in enumerate(reversed(names)):
        expect_json(client.post(name, "increment", {"by": i + 1}), 200)

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        body = expect_json(client.list(**params), 200)
        assert set(body) == {"items", "next_cursor"}
        assert len(body["items"]) <= 4
        for item in body["items"]:
            assert item == client.state(item["name"])
        seen += [item["name"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if pages == 1:  # changes between pages: a name before the cursor, one after, a delete
            expect_json(client.post("a-before", "increment"), 200)
            expect_json(client.post("n05x", "increment"), 200)
            expect(client.delete("n06"), 204)
        if cursor is None:
            break
    assert pages == 3
    assert seen == ["n01", "n02", "n03", "n04", "n05", "n05x", "n07", "n08", "n09", "n10", "n11"]

    default = expect_json(client.list(), 200)  # default limit 20: everything, no next page
    assert [i["name"] for i in default["items"]] == sorted(seen + ["a-before"])
    assert default["next_cursor"] is None
    exact = expect_json(client.list(limit=12), 200)  # exactly `limit` left: no empty last page
    assert len(exact["items"]) == 12 and exact["next_cursor"] is None


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "ten"},
                                    {"cursor": "not-a-cursor"}, {"cursor": "WzFd"}])
def test_bad_list_parameters_are_400(counters, params):
    expect_problem(counters.list(**params), 400)


# --------------------------------------------------------------------------------------------
# Exactness: no lost updates under concurrency


def hammer(server, name, clients=50, each=200):
    """`clients` threads, each with its own keep-alive connection, POST `each` increments at
    once. Returns every value the server answered, and the failures.

    Each client is an `http.client.HTTPConnection`: the same one-connection-per-client model as
    a `requests.Session` per thread, at about a third of the client's CPU per request, which is
    what this test spends its time on (the client threads share one GIL)."""
    values, failures = [], []
    start = threading.Barrier(clients)

    def client():
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        start.wait()
        try:
            for _ in range(each):
                conn.request("POST", f"/counters/{name}/increment")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    failures.append(f"{resp.status} {body[:200]!r}")
                    return
                values.append(json.loads(body)["value"])
        except (OSError, http.client.HTTPException) as err:
            failures.append(repr(err))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return values, failures


# asyncio with --memory is left out: one event loop runs the handlers one at a time, so it
# cannot interleave them; the threaded transport is where the dict's lock has work to do.
@pytest.mark.parametrize("args", [
    pytest.param(("--server", "asyncio"), id="sqlite-asyncio"),
    pytest.param(("--server", "threaded"), id="sqlite-threaded"),
    pytest.param(("--memory", "--server", "threaded"), id="memory-threaded"),
])
def test_50_clients_times_200_increments_are_exactly_10000(start_server, args):
    server = start_server(SCRIPT, *args)
    values, failures = hammer(server, "hits")
    assert not failures, failures[:5]
    # Every increment saw a value of its own: no two read the same old value.
    assert sorted(values) == list(range(1, 10_001))
    state = Client(server).state("hits")
    assert (state["value"], state["version"]) == (10_000, 10_000)


@pytest.mark.parametrize("args", [pytest.param((), id="sqlite"),
                                  pytest.param(("--memory",), id="memory")])
def test_concurrent_writers_with_the_same_if_match_only_one_wins(start_server, args):
    server = start_server(SCRIPT, "--server", "threaded", *args)
    client = Client(server)
    expect_json(client.put("shared", {"value": 5}), 200)  # version 1
    statuses = []
    start = threading.Barrier(20)

    def writer(i):
        with requests.Session() as session:
            start.wait()
            resp = session.put(f"{server.url}/counters/shared", json={"value": 100 + i},
                               headers={"If-Match": '"1"'}, timeout=TIMEOUT)
            statuses.append(resp.status_code)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] + [412] * 19
    state = client.state("shared")
    assert state["version"] == 2 and 100 <= state["value"] < 120


def test_a_refused_conditional_write_undoes_only_itself(start_server):
    # Concurrent increments and stale If-Match writes: each refused write must undo only its
    # own transaction, never the increments of the other requests, which were answered 200.
    server = start_server(SCRIPT)
    expect_json(Client(server).put("mixed", {"value": 0}), 200)  # version 1: "0" is stale forever
    statuses = []

    def send(method, path, times, **kw):
        with requests.Session() as session:
            for _ in range(times):
                resp = session.request(method, f"{server.url}/counters/mixed{path}", timeout=TIMEOUT, **kw)
                statuses.append((method, resp.status_code))

    threads = ([threading.Thread(target=send, args=("POST", "/increment", 100)) for _ in range(6)]
               + [threading.Thread(target=send, args=("PUT", "", 100),
                                   kwargs={"json": {"value": -1}, "headers": {"If-Match": '"0"'}})
                  for _ in range(4)])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(set(statuses)) == [("POST", 200), ("PUT", 412)]
    assert len(statuses) == 1000
    state = Client(server).state("mixed")
    assert (state["value"], state["version"]) == (600, 601)


# --------------------------------------------------------------------------------------------
# Durability, and what --memory does not promise


def test_kill_9_loses_no_acknowledged_increment(start_server):
    server = start_server(SCRIPT)
    acknowledged = []

    def client():
        with requests.Session() as session:
            for _ in range(50):
                resp = session.post(f"{server.url}/counters/durable/increment", timeout=TIMEOUT)
                expect(resp, 200)
                acknowledged.append(resp.json()["value"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(acknowledged) == 200
    put = expect_json(Client(server).put("durable-set", {"value": -77}), 200)
    assert server.kill9() == -9  # no shutdown hook runs: nothing flushed or closed

    again = Client(start_server(SCRIPT, db=server.db_path))
    assert again.state("durable")["value"] == 200
    assert again.state("durable-set") == put


def limit_file_size(size):
    """For `preexec_fn`: files of the server may not grow past `size` bytes, as on a full disk.
    A write past it fails with EFBIG (Python ignores SIGXFSZ), so sqlite's commits start to fail."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_an_increment_whose_commit_fails_is_never_acknowledged(start_server, transport):
    # A full disk (RLIMIT_FSIZE) makes commits fail: every increment whose commit failed must be
    # answered with an error, and the value on disk must be exactly the increments answered 200.
    server = start_server(SCRIPT, "--server", transport, preexec_fn=limit_file_size(192 * 1024))
    answered = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client():
        with requests.Session() as session:
            for _ in range(1000):
                resp = session.post(f"{server.url}/counters/full/increment", timeout=TIMEOUT)
                with lock:
                    if resp.status_code == 200:
                        answered["ok"] += 1
                        continue
                    answered["failed"] += 1
                expect_problem(resp, 507)  # Insufficient Storage: nothing of it was stored
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answered["failed"] == 8, answered  # every client met the full disk
    assert answered["ok"] > 0, answered
    assert "Traceback" not in server.stderr_text()  # a full disk is one line, not a traceback
    server.stop()

    again = Client(start_server(SCRIPT, db=server.db_path))
    assert again.state("full")["value"] == answered["ok"]


def test_sigterm_and_restart_keep_the_counters(start_server):
    server = start_server(SCRIPT)
    expect_json(Client(server).post("kept", "increment", {"by": 41}), 200)
    server.stop()
    assert Client(start_server(SCRIPT, db=server.db_path)).state("kept")["value"] == 41


def test_memory_mode_keeps_nothing_on_disk_and_nothing_across_restarts(start_server):
    server = start_server(SCRIPT, "--memory")
    client = Client(server)
    health = client.session.get(server.url + "/health", timeout=TIMEOUT)
    assert expect_json(health, 200)["storage"] == "memory"
    expect_json(client.post("volatile", "increment", {"by": 3}), 200)
    server.stop()
    assert not server.db_path.exists()  # --db is ignored with --memory
    assert Client(start_server(SCRIPT, "--memory")).state("volatile")["value"] == 0


def test_health_names_the_store(start_server):
    server = start_server(SCRIPT)
    body = expect_json(requests.get(server.url + "/health", timeout=TIMEOUT), 200)
    assert body == {"status": "ok", "storage": "sqlite"}


def test_an_unusable_db_path_exits_2_without_a_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_once(SCRIPT, "--port", "0", "--db", str(blocker / "db.sqlite3"))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and done.stderr.strip()
    assert "listening on" not in done.stdout


# --------------------------------------------------------------------------------------------
# --trace and the documentation routes


def trace_block(server, request_id):
    """The lines `--trace` printed for one request, found by its X-Request-Id."""
    server.wait_for_stderr(f"trace {request_id} ")
    block = server.stderr_text().split(f"trace {request_id} ", 1)[1].split("\ntrace ", 1)[0]
    return block.splitlines()


def assert_in_order(lines, steps):
    positions = []
    for step in steps:
        found = [i for i, line in enumerate(lines) if step in line]
        assert found, f"{step!r} missing from the trace:\n" + "\n".join(lines)
        positions.append(found[0])
    assert positions == sorted(positions), "steps out of order:\n" + "\n".join(lines)


def test_trace_shows_the_middleware_the_handler_and_the_sql_of_one_increment(start_server):
    server = start_server(SCRIPT, "--trace")
    resp = requests.post(f"{server.url}/counters/traced/increment", json={"by": 2},
                         headers={"X-Request-Id": "trace-me-1"}, timeout=TIMEOUT)
    expect_json(resp, 200)
    lines = trace_block(server, "trace-me-1")
    assert lines[0] == "POST /counters/traced/increment"
    assert_in_order(lines, ["→ assign_request_id", "→ log_access", "→ render_errors",
                            "→ match_route", "→ handler increment_counter",
                            "SQL INSERT INTO counters", "← handler increment_counter 200",
                            "← assign_request_id 200"])
    sql = [line for line in lines if "SQL " in line]
    assert len(sql) == 1 and "RETURNING" in sql[0], sql  # one statement, its own transaction
    assert all(re.match(r"\s*\+\s*\d+\.\d+ ms ", line) for line in lines[1:]), lines
    assert re.search(r"← handler increment_counter 200 \(\d+\.\d+ ms\)", "\n".join(lines))
    assert "'traced'" not in "\n".join(lines)  # string values in SQL are masked


def test_trace_of_a_conditional_write_shows_its_transaction(start_server):
    server = start_server(SCRIPT, "--trace")
    resp = requests.post(f"{server.url}/counters/traced/reset",
                         headers={"X-Request-Id": "trace-me-2", "If-Match": '"0"'}, timeout=TIMEOUT)
    expect_json(resp, 200)
    assert_in_order(trace_block(server, "trace-me-2"), [
        "→ handler reset_counter", "SQL BEGIN IMMEDIATE", "SQL SELECT version FROM counters",
        "SQL INSERT INTO counters", "SQL COMMIT", "← handler reset_counter 200"])


def test_openapi_documents_every_counter_route(counters):
    doc = expect_json(counters.session.get(counters.url + "/openapi.json", timeout=TIMEOUT), 200)
    paths = doc["paths"]
    assert set(paths["/counters/{name}"]) == {"get", "put", "delete"}
    for action in ("increment", "decrement", "reset"):
        operation = paths[f"/counters/{{name}}/{action}"]["post"]
        assert "200" in operation["responses"] and "201" not in operation["responses"]
    assert "204" in paths["/counters/{name}"]["delete"]["responses"]
    assert "counters" in doc["info"]["description"].lower()


def test_openapi_request_bodies_are_the_ones_the_server_checks(counters):
    schemas = request_schemas(counters.session.get, counters.url)
    assert set(schemas) == {("PUT", "/counters/{name}"), ("POST", "/counters/{name}/increment"),
                            ("POST", "/counters/{name}/decrement")}, "reset and GET take no body"
    assert schemas["PUT", "/counters/{name}"] == {
        "type": "object", "additionalProperties": False, "required": ["value"],
        "properties": {"value": {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}}}
    for action in ("increment", "decrement"):
        step = schemas["POST", f"/counters/{{name}}/{action}"]
        assert (step["type"], step["additionalProperties"]) == ("object", False)
        assert "required" not in step, "the body, and `by` in it, are optional"
        assert list(step["properties"]) == ["by"]
        assert without_description(step["properties"]["by"]) == {
            "type": "integer", "minimum": 1, "maximum": 1_000_000_000, "default": 1}


def test_openapi_says_which_bodies_may_be_left_out(counters):
    document = counters.session.get(counters.url + "/openapi.json", timeout=TIMEOUT)
    paths = expect_json(document, 200)["paths"]
    assert paths["/counters/{name}"]["put"]["requestBody"]["required"] is True
    for action in ("increment", "decrement"):
        assert paths[f"/counters/{{name}}/{action}"]["post"]["requestBody"]["required"] is False
        # and indeed: no body at all is a step of 1
        assert expect_json(counters.session.post(f"{counters.url}/counters/{fresh()}/{action}",
                                                 timeout=TIMEOUT), 200)["value"] in (1, -1)


def test_the_documented_limits_are_the_enforced_ones(counters):
    schemas = request_schemas(counters.session.get, counters.url)
    by = schemas["POST", "/counters/{name}/increment"]["properties"]["by"]
    name = fresh()
    assert expect_json(counters.post(name, "increment", {"by": by["maximum"]}), 200)["value"] == \
        by["maximum"]
    assert expect_json(counters.post(name, "decrement", {"by": by["minimum"]}), 200)["value"] == \
        by["maximum"] - by["minimum"]
    for bad in (by["maximum"] + 1, by["minimum"] - 1):
        expect_problem(counters.post(name, "increment", {"by": bad}), 422)
    expect_problem(counters.post(name, "increment", {"by": 1, "extra": 1}), 422)  # no additional
    value = schemas["PUT", "/counters/{name}"]["properties"]["value"]
    for edge in (value["maximum"], value["minimum"]):
        assert expect_json(counters.put(name, {"value": edge}), 200)["value"] == edge
    for bad in (value["maximum"] + 1, value["minimum"] - 1):
        expect_problem(counters.put(name, {"value": bad}), 422)
    expect_problem(counters.put(name, {}), 422)  # `value` is required
    assert counters.state(name)["value"] == value["minimum"], "nothing refused was written"
