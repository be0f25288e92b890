"""level02/todos.py, black-box: done/completed_at, dates in the user's time zone, filters,
NULL-aware keyset pages, priority by rank, all-or-nothing bulk changes, the summary.

One server serves the whole module: every test works as users of its own (a fresh
`X-User-Id`), so tests cannot see each other's todos. Dates are computed here from the real
clock, the same way the server does, in UTC and in a zone whose date differs from UTC's now.
"""
import datetime
import re
import zoneinfo

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, request_schemas
from tests.level02.clients import CollectionClient, error_fields, fresh_user

SCRIPT = "level02/todos.py"
TIMEOUT = 10
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
SORTS = ["due", "-due", "priority", "-priority", "created_at", "-created_at"]
RANK = {"low": 1, "normal": 2, "high": 3}
DAY = datetime.timedelta(days=1)


class Api(CollectionClient):
    """One user's keep-alive session on the server, with the todos shortcuts."""

    collection = "/todos"
    defaults = {"title": "a todo"}
    todo = CollectionClient.read   # alice.todo(id)

    def bulk(self, ids, action):
        return self.post("/todos/bulk", json={"ids": ids, "action": action})

    def summary(self, **params):
        return expect_json(self.get("/todos/summary", params=params), 200)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def alice(server):
    return Api(server, fresh_user("alice"))


@pytest.fixture
def bob(server):
    return Api(server, fresh_user("bob"))


def titles(items):
    return [item["title"] for item in items]


def utc_today():
    return datetime.datetime.now(datetime.timezone.utc).date()


# --------------------------------------------------------------------------------------------
# Creating and validating


def test_create_is_201_with_location_etag_and_defaults(alice):
    resp = alice.post("/todos", json={"title": "  Buy milk  "})
    todo = expect_json(resp, 201)
    assert todo["title"] == "Buy milk"
    assert (todo["notes"], todo["due"], todo["priority"], todo["tags"]) == ("", None, "normal", [])
    assert todo["done"] is False and todo["completed_at"] is None and todo["version"] == 1
    assert RFC3339_UTC.fullmatch(todo["created_at"]) and todo["updated_at"] == todo["created_at"]
    assert resp.headers["Location"] == f"/todos/{todo['id']}" and resp.headers["ETag"] == '"1"'
    again = alice.get(resp.headers["Location"])
    assert expect_json(again, 200) == todo and again.headers["ETag"] == '"1"'


def test_create_with_every_field(alice):
    todo = alice.create(title="Taxes", notes=" form 1040 ", due="2027-04-15", priority="high",
                        tags=["Money", "money", "admin"])
    assert (todo["notes"], todo["due"], todo["priority"], todo["tags"]) == \
        (" form 1040 ", "2027-04-15", "high", ["money", "admin"])


def test_validation_names_every_bad_field_at_once(alice):
    problem = expect_problem(alice.post("/todos", json={
        "title": "", "notes": "n" * 10_001, "due": "2026-02-30", "priority": "urgent",
        "tags": ["x" * 31], "done": "yes"}), 422)
    assert error_fields(problem) == {"title", "notes", "due", "priority", "tags", "done"}


@pytest.mark.parametrize("due", ["2026-02-30", "2025-02-29", "2026-13-01", "2026-00-10",
                                 "26-01-01", "2026-1-1", "20260101", "2026-01-01T00:00:00Z",
                                 "tomorrow", 20260101])
def test_impossible_or_malformed_due_dates_are_a_422(alice, due):
    problem = expect_problem(alice.post("/todos", json={"title": "t", "due": due}), 422)
    assert error_fields(problem) == {"due"}


def test_leap_day_and_null_due_are_fine(alice):
    assert alice.create(due="2028-02-29")["due"] == "2028-02-29"
    todo = alice.create(due="2028-03-01")
    assert expect_json(alice.patch(f"/todos/{todo['id']}", json={"due": None}), 200)["due"] is None


@pytest.mark.parametrize("field", ["id", "owner", "completed_at", "version", "created_at",
                                   "updated_at", "overdue", "colour"])
def test_server_owned_and_unknown_fields_are_refused(alice, field):
    problem = expect_problem(alice.post("/todos", json={"title": "t", field: None}), 422)
    assert error_fields(problem) == {field}
    todo = alice.create()
    for method in ("PATCH", "PUT"):
        resp = alice.request(method, f"/todos/{todo['id']}", json={"title": "t", field: None})
        assert error_fields(expect_problem(resp, 422)) == {field}
    assert alice.todo(todo["id"]) == todo


# --------------------------------------------------------------------------------------------
# done and completed_at


def test_done_sets_and_clears_completed_at(alice):
    todo = alice.create()
    done = expect_json(alice.patch(f"/todos/{todo['id']}", json={"done": True}), 200)
    assert done["done"] is True and RFC3339_UTC.fullmatch(done["completed_at"])
    assert done["version"] == 2 and done["updated_at"] > todo["updated_at"]
    # Done again: nothing changes, the completion time stays the first one.
    again = expect_json(alice.patch(f"/todos/{todo['id']}", json={"done": True}), 200)
    assert again == done
    # Done again along with another change: still the first completion time.
    resp = alice.patch(f"/todos/{todo['id']}", json={"done": True, "title": "x"})
    renamed = expect_json(resp, 200)
    assert renamed["completed_at"] == done["completed_at"] and renamed["version"] == 3
    reopened = expect_json(alice.patch(f"/todos/{todo['id']}", json={"done": False}), 200)
    assert reopened["done"] is False and reopened["completed_at"] is None
    assert reopened["version"] == 4


def test_a_todo_may_be_created_done(alice):
    todo = alice.create(done=True)
    assert todo["done"] is True and todo["completed_at"] == todo["created_at"]


def test_patch_changes_only_the_fields_sent(alice):
    todo = alice.create(title="t", notes="n", due="2027-01-01", priority="high", tags=["a"])
    changed = expect_json(alice.patch(f"/todos/{todo['id']}", json={"priority": "low"}), 200)
    assert changed == {**todo, "priority": "low", "version": 2,
                       "updated_at": changed["updated_at"]}
    assert changed["updated_at"] > todo["updated_at"]


def test_put_replaces_and_what_is_left_out_gets_its_default(alice):
    todo = alice.create(title="t", notes="n", due="2027-01-01", priority="high", tags=["a"],
                        done=True)
    resp = alice.put(f"/todos/{todo['id']}", json={"title": "new"})
    replaced = expect_json(resp, 200)
    assert (replaced["title"], replaced["notes"], replaced["due"], replaced["priority"],
            replaced["tags"], replaced["done"], replaced["completed_at"]) == \
        ("new", "", None, "normal", [], False, None)
    assert replaced["created_at"] == todo["created_at"] and resp.headers["ETag"] == '"2"'
    problem = expect_problem(alice.put(f"/todos/{todo['id']}", json={"priority": "low"}), 422)
    assert error_fields(problem) == {"title"}


def test_delete_is_204_then_gone(alice):
    todo = alice.create()
    expect(alice.delete(f"/todos/{todo['id']}"), 204)
    expect_problem(alice.get(f"/todos/{todo['id']}"), 404)


@pytest.mark.parametrize("method, body", [("PATCH", {"done": True}), ("PUT", {"title": "x"}),
                                          ("DELETE", None)])
def test_a_stale_if_match_is_a_412_and_nothing_changes(alice, method, body):
    todo = alice.create()
    current = expect_json(alice.patch(f"/todos/{todo['id']}", json={"notes": "v2"}), 200)
    expect_problem(alice.request(method, f"/todos/{todo['id']}", json=body,
                              headers={"If-Match": '"1"'}), 412)
    assert alice.todo(todo["id"]) == current
    resp = alice.request(method, f"/todos/{todo['id']}", json=body, headers={"If-Match": '"2"'})
    expect(resp, 204 if method == "DELETE" else 200)


# --------------------------------------------------------------------------------------------
# Ownership


@pytest.mark.parametrize("user", [None, "", "no spaces", "x" * 65])
def test_missing_or_malformed_user_is_a_401(server, user):
    headers = {} if user is None else {"X-User-Id": user}
    for method, path in [("GET", "/todos"), ("POST", "/todos"), ("GET", "/todos/summary"),
                         ("POST", "/todos/bulk"), ("PATCH", "/todos/1")]:
        resp = requests.request(method, server.url + path, headers=headers,
                                json={"title": "t"}, timeout=TIMEOUT)
        expect_problem(resp, 401)
        assert resp.headers["WWW-Authenticate"] == "X-User-Id"


def test_another_users_todo_is_a_404_and_never_listed_or_counted(alice, bob):
    todo = alice.create(title="private", due="2000-01-01", tags=["secret"])
    path = f"/todos/{todo['id']}"
    for method, body in [("GET", None), ("PATCH", {"done": True}), ("PUT", {"title": "x"}),
                         ("DELETE", None)]:
        expect_problem(bob.request(method, path, json=body), 404)
    assert bob.all_pages(status="all") == [] and bob.all_pages(tag="secret") == []
    assert bob.summary()["overdue"] == 0
    assert alice.todo(todo["id"]) == todo


# --------------------------------------------------------------------------------------------
# Filters


def test_status_filter(alice):
    open_ = alice.create(title="open")
    done = alice.create(title="done", done=True)
    assert titles(alice.all_pages(status="open")) == ["open"]
    assert titles(alice.all_pages(status="done")) == ["done"]
    assert sorted(titles(alice.all_pages(status="all"))) == ["done", "open"]
    assert sorted(titles(alice.all_pages())) == ["done", "open"], "the default is all"
    assert {open_["id"], done["id"]} == {t["id"] for t in alice.all_pages()}


def test_due_before_and_after_are_exclusive_and_leave_out_undated_todos(alice):
    for day in ("2027-01-01", "2027-01-02", "2027-01-03"):
        alice.create(title=day, due=day)
    alice.create(title="undated")
    assert titles(alice.all_pages(due_before="2027-01-02")) == ["2027-01-01"]
    assert titles(alice.all_pages(due_after="2027-01-02")) == ["2027-01-03"]
    between = alice.all_pages(due_after="2027-01-01", due_before="2027-01-03")
    assert titles(between) == ["2027-01-02"]


def test_priority_tag_and_q_filters(alice):
    alice.create(title="Call the bank", priority="high", tags=["money"])
    alice.create(title="Pay rent", priority="high", notes="before the 5th", tags=["Money", "home"])
    alice.create(title="Water plants", priority="low", tags=["home"])
    assert sorted(titles(alice.all_pages(priority="high"))) == ["Call the bank", "Pay rent"]
    assert titles(alice.all_pages(priority="high", tag="home")) == ["Pay rent"]
    assert titles(alice.all_pages(tag=["money", "home"])) == ["Pay rent"]
    assert titles(alice.all_pages(q="5TH")) == ["Pay rent"], "q searches the notes too"
    assert titles(alice.all_pages(q="BANK")) == ["Call the bank"]
    assert alice.all_pages(q="%") == [], "% is literal"


def test_overdue_filter_and_its_opposite(alice):
    today = utc_today()
    alice.create(title="late", due=(today - DAY).isoformat())
    alice.create(title="late but done", due=(today - DAY).isoformat(), done=True)
    alice.create(title="today", due=today.isoformat())
    alice.create(title="later", due=(today + DAY).isoformat())
    alice.create(title="undated")
    assert titles(alice.all_pages(overdue="true")) == ["late"]
    # Not overdue includes the undated todo: a NULL due date must not make it vanish.
    assert sorted(titles(alice.all_pages(overdue="false"))) == \
        ["late but done", "later", "today", "undated"]
    assert titles(alice.all_pages(overdue="true", status="done")) == []


@pytest.mark.parametrize("params, field", [
    ({"status": "closed"}, "status"), ({"priority": "urgent"}, "priority"),
    ({"priority": "HIGH"}, "priority"), ({"overdue": "yes"}, "overdue"),
    ({"overdue": "1"}, "overdue"),
    ({"due_before": "2026-02-30"}, "due_before"), ({"due_after": "2026-13-01"}, "due_after"),
    ({"due_before": "tomorrow"}, "due_before"), ({"due_after": "20260101"}, "due_after"),
    ({"sort": "due_date"}, "sort"), ({"sort": "-title"}, "sort"),
    ({"tz": "Mars/Olympus_Mons"}, "tz"), ({"tz": "../../etc/passwd"}, "tz"),
    ({"tz": "europe/paris"}, "tz"), ({"tz": "+02:00"}, "tz"),
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
    ({"cursor": "%%%"}, "cursor"), ({"cursor": "WyJkdWUiLDEsMl0"}, "cursor"),
    ({"q": "x" * 201}, "q"), ({"tag": ""}, None),
])
def test_bad_query_parameters_are_a_400_naming_them(alice, params, field):
    resp = alice.get("/todos", params=params)
    if field is None:  # an empty value is no filter at all
        expect_json(resp, 200)
        return
    assert error_fields(expect_problem(resp, 400)) == {field}


def test_an_impossible_date_in_the_summary_zone_or_list_is_a_400_not_a_500(alice):
    expect_problem(alice.get("/todos/summary", params={"tz": "Nowhere/City"}), 400)
    expect_problem(alice.get("/todos", params={"due_before": "2026-02-29"}), 400)


# --------------------------------------------------------------------------------------------
# The user's today


def zone_where_the_date_is_not_utcs():
    """A zone whose date differs from UTC's right now. Kiritimati (UTC+14) is a day ahead from
    10:00 UTC on, Etc/GMT+12 (UTC−12) a day behind until 12:00 UTC: one of them always is."""
    now = datetime.datetime.now(datetime.timezone.utc)
    for name in ("Pacific/Kiritimati", "Etc/GMT+12"):
        local = now.astimezone(zoneinfo.ZoneInfo(name)).date()
        if local != now.date():
            return name, now.date(), local
    raise AssertionError("unreachable: one of the two zones always differs from UTC")


def test_overdue_and_due_today_are_in_the_users_time_zone(alice):
    zone, utc, local = zone_where_the_date_is_not_utcs()
    days = {"utc today": utc, "local today": local, "long ago": min(utc, local) - 2 * DAY,
            "far ahead": max(utc, local) + 2 * DAY}
    for title, day in days.items():
        alice.create(title=title, due=day.isoformat(),
                     priority="high" if title == "long ago" else "low")
    alice.create(title="done long ago", due=days["long ago"].isoformat(), done=True)
    alice.create(title="undated")

    for params, today in (({}, utc), ({"tz": "UTC"}, utc), ({"tz": zone}, local)):
        overdue = sorted(t for t, d in days.items() if d < today)
        due_today = [t for t, d in days.items() if d == today]
        assert sorted(titles(alice.all_pages(overdue="true", **params))) == overdue, params
        summary = alice.summary(**params)
        assert summary["today"] == today.isoformat()
        assert summary["time_zone"] == params.get("tz", "UTC")
        assert (summary["open"], summary["done"]) == (5, 1)
        assert summary["overdue"] == len(overdue) and summary["due_today"] == len(due_today)
        assert summary["by_priority"]["high"] == {"open": 1, "done": 0, "overdue": 1,
                                                  "due_today": 0}
        low = summary["by_priority"]["low"]
        assert low["overdue"] == len(overdue) - 1 and low["due_today"] == len(due_today)
        assert summary["by_priority"]["normal"] == {"open": 1, "done": 1, "overdue": 0,
                                                    "due_today": 0}


def test_the_summary_of_a_new_user_is_all_zeros(server):
    summary = Api(server).summary()
    zeros = {"open": 0, "done": 0, "overdue": 0, "due_today": 0}
    assert {k: summary[k] for k in zeros} == zeros
    assert summary["by_priority"] == {"high": zeros, "normal": zeros, "low": zeros}


# --------------------------------------------------------------------------------------------
# Order and pages


def test_todos_without_a_due_date_sort_last_both_ways(alice):
    alice.create(title="none 1")
    alice.create(title="b", due="2027-02-01")
    alice.create(title="none 2")
    alice.create(title="a", due="2027-01-01")
    alice.create(title="c", due="2027-03-01")
    assert titles(alice.all_pages()) == ["a", "b", "c", "none 1", "none 2"], "default: due"
    assert titles(alice.all_pages(sort="due")) == ["a", "b", "c", "none 1", "none 2"]
    assert titles(alice.all_pages(sort="-due")) == ["c", "b", "a", "none 2", "none 1"]


@pytest.mark.parametrize("sort", ["due", "-due"])
@pytest.mark.parametrize("limit", [1, 2, 3])
def test_pages_step_across_undated_todos(alice, sort, limit):
    """The classic keyset bug: `WHERE (due, id) > (?, ?)` is never true for a NULL due date,
    so the undated todos vanish from page two on, or a cursor on one of them stops the list."""
    for i, due in enumerate([None, "2027-01-02", None, "2027-01-01", None, "2027-01-02", None]):
        alice.create(title=f"t{i}", due=due)
    everything = alice.list(sort=sort, limit=100)["items"]
    paged = alice.all_pages(sort=sort, limit=limit)
    assert [t["id"] for t in paged] == [t["id"] for t in everything]
    assert len(paged) == 7


def test_priority_sorts_by_rank_not_alphabetically(alice):
    for priority in ("normal", "low", "high", "low", "high"):
        alice.create(title=priority, priority=priority)
    assert titles(alice.all_pages(sort="priority", limit=2)) == \
        ["low", "low", "normal", "high", "high"]
    assert titles(alice.all_pages(sort="-priority", limit=2)) == \
        ["high", "high", "normal", "low", "low"]


def order_key(sort, todo):
    name = sort.lstrip("-")
    if name == "due":  # undated last either way
        return (todo["due"] is None, todo["due"] or "", todo["id"])
    if name == "priority":
        return (RANK[todo["priority"]], todo["id"])
    return (todo["created_at"], todo["id"])


def in_order(sort, todos):
    if sort == "-due":
        dated = [t for t in todos if t["due"] is not None]
        undated = [t for t in todos if t["due"] is None]
        return sorted(dated, key=lambda t: (t["due"], t["id"]), reverse=True) + \
            sorted(undated, key=lambda t: t["id"], reverse=True)
    return sorted(todos, key=lambda t: order_key(sort, t), reverse=sort.startswith("-"))


@pytest.mark.parametrize("sort", SORTS)
def test_pages_stay_correct_while_todos_are_added_and_deleted(server, sort):
    """Between two pages todos are created and deleted; with filters and every sort, nothing is
    shown twice and nothing that was there all along is skipped."""
    api = Api(server)
    dues = [None, "2027-05-01", "2027-01-01", None, "2027-03-01", "2027-01-01", None,
            "2027-02-01", "2027-04-01", None, "2027-02-01", "2027-06-01"]
    start = [api.create(title=f"t{i}", due=due, priority=("low", "normal", "high")[i % 3],
                        tags=["keep"]) for i, due in enumerate(dues)]
    api.create(title="filtered out: no tag")
    expect_json(api.patch(f"/todos/{start[5]['id']}", json={"done": True}), 200)
    filters = {"sort": sort, "tag": "keep", "status": "open", "limit": 3}
    wanted = [t for i, t in enumerate(start) if i != 5]

    body = api.list(**filters)
    seen = body["items"]
    seen_ids = {t["id"] for t in seen}
    unseen = [t for t in wanted if t["id"] not in seen_ids]
    cursor_row = seen[-1]["id"]  # the row the cursor was made from: deleted too
    deleted = {cursor_row, unseen[0]["id"], unseen[-1]["id"]}
    for todo_id in deleted:
        expect(api.delete(f"/todos/{todo_id}"), 204)
    added = [api.create(title=f"new{i}", due=due, priority=p, tags=["keep"])
             for i, (due, p) in enumerate([(None, "high"), ("2026-12-31", "low"),
                                           ("2027-03-01", "normal")])]
    cursor = body["next_cursor"]
    while cursor:
        body = api.list(**filters, cursor=cursor)
        seen += body["items"]
        cursor = body["next_cursor"]

    ids = [t["id"] for t in seen]
    assert len(ids) == len(set(ids)), f"shown twice: {ids}"
    survivors = {t["id"] for t in wanted} - deleted
    assert survivors <= set(ids), f"{sort}: skipped {survivors - set(ids)}"
    assert not (deleted - {cursor_row}) & set(ids), "a deleted todo was shown"
    assert set(ids) <= survivors | {cursor_row} | {t["id"] for t in added}
    assert [t["id"] for t in in_order(sort, seen)] == ids, f"{sort}: out of order"


# --------------------------------------------------------------------------------------------
# Bulk


def test_bulk_complete_reopen_delete(alice):
    a, b, c = (alice.create(title=t) for t in "abc")
    expect_json(alice.patch(f"/todos/{b['id']}", json={"done": True}), 200)
    completed_b = alice.todo(b["id"])["completed_at"]
    result = expect_json(alice.bulk([a["id"], b["id"], a["id"]], "complete"), 200)
    assert result == {"action": "complete", "ids": [a["id"], b["id"]], "changed": 1}
    assert alice.todo(a["id"])["done"] is True
    assert alice.todo(b["id"])["completed_at"] == completed_b, "already done: left alone"
    assert alice.todo(c["id"])["done"] is False
    assert alice.todo(a["id"])["version"] == 2

    result = expect_json(alice.bulk([a["id"], b["id"], c["id"]], "reopen"), 200)
    assert result["changed"] == 2
    assert [alice.todo(t["id"])["done"] for t in (a, b, c)] == [False, False, False]

    result = expect_json(alice.bulk([a["id"], c["id"]], "delete"), 200)
    assert result["changed"] == 2
    assert [t["id"] for t in alice.all_pages()] == [b["id"]]


@pytest.mark.parametrize("action", ["complete", "reopen", "delete"])
def test_bulk_is_all_or_nothing(alice, bob, action):
    mine = [alice.create(title=f"m{i}", done=(action == "reopen")) for i in range(3)]
    theirs = bob.create(title="theirs", done=(action == "reopen"))
    before = [alice.todo(t["id"]) for t in mine]
    for stranger in (theirs["id"], 987654321):
        ids = [t["id"] for t in mine] + [stranger]
        problem = expect_problem(alice.bulk(ids, action), 404)
        assert str(stranger) in problem["detail"]
        assert [alice.todo(t["id"]) for t in mine] == before, "nothing changed"
    assert bob.todo(theirs["id"]) == theirs, "another user's todo was never touched"


@pytest.mark.parametrize("body, fields", [
    ({"ids": [], "action": "complete"}, {"ids"}),
    ({"ids": list(range(1, 102)), "action": "complete"}, {"ids"}),
    ({"ids": ["1"], "action": "complete"}, {"ids"}),
    ({"ids": [True], "action": "complete"}, {"ids"}),
    ({"ids": [0], "action": "complete"}, {"ids"}),
    ({"ids": [1.5], "action": "complete"}, {"ids"}),
    ({"ids": [2**63], "action": "complete"}, {"ids"}),
    ({"ids": 1, "action": "complete"}, {"ids"}),
    ({"ids": [1], "action": "archive"}, {"action"}),
    ({"ids": [1]}, {"action"}),
    ({"action": "delete"}, {"ids"}),
    ({"ids": [1], "action": "delete", "dry_run": True}, {"dry_run"}),
])
def test_bulk_validation(alice, body, fields):
    assert error_fields(expect_problem(alice.post("/todos/bulk", json=body), 422)) == fields


def test_bulk_takes_an_integral_number_as_the_id_it_is(alice):
    """JSON has one number type: 4.0 is the id 4, as the OpenAPI document's integer says."""
    todo = alice.create(title="as a float")
    expect_json(alice.post("/todos/bulk", json={"ids": [float(todo["id"])], "action": "complete"}), 200)
    assert expect_json(alice.get(f"/todos/{todo['id']}"), 200)["done"] is True


def test_bulk_takes_a_hundred_ids(alice):
    ids = [alice.create(title=f"t{i}")["id"] for i in range(100)]
    assert expect_json(alice.bulk(ids, "complete"), 200)["changed"] == 100
    assert alice.summary()["done"] == 100


# --------------------------------------------------------------------------------------------
# The OpenAPI document: the request bodies it describes are the ones the server checks


def test_openapi_describes_every_todo_body(server):
    schemas = request_schemas(requests.get, server.url)
    assert set(schemas) == {("POST", "/todos"), ("PUT", "/todos/{todo_id}"),
                            ("PATCH", "/todos/{todo_id}"), ("POST", "/todos/bulk")}
    for key in (("POST", "/todos"), ("PUT", "/todos/{todo_id}"), ("PATCH", "/todos/{todo_id}")):
        schema = schemas[key]
        assert (schema["type"], schema["additionalProperties"]) == ("object", False), key
        # `done` is the client's side of completed_at, which is the server's (not a property).
        assert set(schema["properties"]) == {"title", "notes", "due", "priority", "tags", "done"}
        assert schema.get("required") == (None if key[0] == "PATCH" else ["title"]), key
        properties = schema["properties"]
        # POST and PUT fill in what is left out, and say with what; a PATCH leaves it as it is
        default = (lambda value: {}) if key[0] == "PATCH" else (lambda value: {"default": value})
        assert properties["title"] == {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}
        assert properties["notes"] == {"type": "string", "minLength": 0, "maxLength": 10_000, **default("")}
        assert properties["due"] == {"type": ["string", "null"], "format": "date", **default(None)}
        assert properties["priority"] == {"enum": ["low", "normal", "high"], **default("normal")}
        assert properties["tags"] == {"type": "array", "maxItems": 10, **default([]),
                                      "items": {"type": "string", "minLength": 1, "maxLength": 30, "pattern": r"\S"}}
        assert (properties["done"]["type"], properties["done"].get("default")) == \
            ("boolean", None if key[0] == "PATCH" else False)
    bulk = schemas["POST", "/todos/bulk"]
    assert bulk == {"type": "object", "additionalProperties": False, "required": ["ids", "action"],
                    "properties": {
                        "ids": {"type": "array", "minItems": 1, "maxItems": 100,
                                "items": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}},
                        "action": {"enum": ["complete", "reopen", "delete"]}}}


def test_the_documented_limits_are_the_enforced_ones(server, alice):
    schemas = request_schemas(requests.get, server.url)
    todo = schemas["POST", "/todos"]["properties"]
    for priority in todo["priority"]["enum"]:
        assert alice.create(priority=priority)["priority"] == priority
    assert alice.create(due=None)["due"] is None, "due is nullable"
    for bad, field in [({"priority": "urgent"}, "priority"), ({"due": "2026-02-30"}, "due"),
                       ({"title": "t" * (todo["title"]["maxLength"] + 1)}, "title")]:
        problem = expect_problem(alice.post("/todos", json={"title": "t", **bad}), 422)
        assert error_fields(problem) == {field}
    ids = schemas["POST", "/todos/bulk"]["properties"]["ids"]
    one = alice.create()["id"]
    # maxItems counts the ids as sent: a repeated id is accepted (counted once), not refused.
    changed = expect_json(alice.bulk([one] * ids["maxItems"], "complete"), 200)
    assert (changed["ids"], changed["changed"]) == ([one], 1)
    for bad in ([one] * (ids["maxItems"] + 1), [], [ids["items"]["minimum"] - 1],
                [ids["items"]["maximum"] + 1]):
        assert error_fields(expect_problem(alice.bulk(bad, "reopen"), 422)) == {"ids"}
    for action in schemas["POST", "/todos/bulk"]["properties"]["action"]["enum"]:
        assert expect_json(alice.bulk([one], action), 200)["action"] == action
