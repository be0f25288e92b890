"""level02/expenses.py, black-box (spec/level02.md §6): exact money, per-user categories,
filters with keyset pagination, summaries per currency, CSV export safe from formula injection.

Most tests share one server; each uses its own X-User-Id, so they cannot see each other's
data. Tests that need a flag, a restart or real parallelism start their own.
"""
import concurrent.futures
import re

import pytest
import requests

from tests.harness import (expect, expect_json, expect_problem, request_schemas, run_once,
                           without_description)
from tests.level02.clients import UserClient, error_fields, read_csv

SCRIPT = "level02/expenses.py"
TIMEOUT = 5  # s, for every single request


class Client(UserClient):
    """Requests as one user, with the expenses shortcuts."""

    timeout = TIMEOUT

    # domain shortcuts

    def category(self, name):
        return expect_json(self.post("/categories", {"name": name}), 201)

    def expense(self, amount="10.00", date="2026-03-01", **fields):
        return expect_json(self.post("/expenses", {"amount": amount, "date": date, **fields}), 201)

    def all_pages(self, path, params=None, limit=2):
        """Every item of a list, following next_cursor, and how many pages it took."""
        bodies = list(self.pages(path, dict(params or {}, limit=limit)))
        return [item for body in bodies for item in body["items"]], len(bodies)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def client(server):
    return Client(server)


# --------------------------------------------------------------------------------------------
# Ownership: X-User-Id


@pytest.mark.parametrize("header", [None, "", "has space", "x" * 65, "semi;colon"])
def test_missing_or_malformed_user_is_a_401_naming_the_header(server, header):
    headers = {} if header is None else {"X-User-Id": header}
    for method, path in [("GET", "/expenses"), ("POST", "/expenses"), ("GET", "/categories"),
                         ("GET", "/expenses/summary"), ("GET", "/expenses/export.csv")]:
        resp = requests.request(method, server.url + path, headers=headers,
                                json={"amount": "1.00", "date": "2026-01-01"}, timeout=TIMEOUT)
        expect_problem(resp, 401)
        assert resp.headers.get("WWW-Authenticate") == "X-User-Id"


def test_another_users_objects_are_404_for_every_verb_and_absent_from_lists(server):
    alice, mallory = Client(server), Client(server)
    category = alice.category("Rent")
    expense = alice.expense("950.00", category_id=category["id"])
    for method, body in [("GET", None), ("PATCH", {"note": "mine now"}),
                         ("PUT", {"amount": "1.00", "date": "2026-01-01"}), ("DELETE", None)]:
        expect_problem(mallory.request(method, f"/expenses/{expense['id']}", json=body), 404)
    for method, body in [("GET", None), ("PATCH", {"name": "Mine"}), ("DELETE", None)]:
        expect_problem(mallory.request(method, f"/categories/{category['id']}", json=body), 404)
    assert expect_json(mallory.get("/expenses"), 200)["items"] == []
    assert expect_json(mallory.get("/categories"), 200)["items"] == []
    assert expect_json(mallory.get("/expenses/summary"), 200)["count"] == 0
    assert expect(mallory.get("/expenses/export.csv"), 200).text.count("\r\n") == 1  # header only
    # and nothing changed for the owner
    assert expect_json(alice.get(f"/expenses/{expense['id']}"), 200) == expense
    assert expect_json(alice.get(f"/categories/{category['id']}"), 200) == category


# --------------------------------------------------------------------------------------------
# Money


@pytest.mark.parametrize("sent, stored", [
    ("12.30", "12.30"), ("12.3", "12.30"), ("12", "12.00"), ("0.01", "0.01"),
    ("007.5", "7.50"), ("1000000000.00", "1000000000.00"), ("999999999.99", "999999999.99"),
])
def test_amounts_are_decimal_strings_written_back_with_two_decimals(client, sent, stored):
    created = client.expense(sent)
    assert created["amount"] == stored
    assert expect_json(client.get(f"/expenses/{created['id']}"), 200)["amount"] == stored


@pytest.mark.parametrize("amount", [
    "12.345", "1e3", "1E3", 12.3, 12, 0.1, "-5.00", "-0.01", "0", "0.00", "1000000000.01",
    "10000000000", "", " 12.30", "12.30 ", "1,000.00", "12.", ".5", "+5", "١٢", "NaN",
    "Infinity", True, None, ["1.00"], {"value": "1.00"},
])
def test_bad_amounts_are_a_422_naming_amount(client, amount):
    resp = client.post("/expenses", {"amount": amount, "date": "2026-01-01"})
    assert error_fields(expect_problem(resp, 422)) == {"amount"}
    assert expect_json(client.get("/expenses"), 200)["items"] == []


def test_a_sum_of_decimal_amounts_is_exact(client):
    client.expense("0.10")
    client.expense("0.20")
    assert expect_json(client.get("/expenses/summary"), 200)["totals"] == {"USD": "0.30"}
    for _ in range(8):
        client.expense("0.10")
    summary = expect_json(client.get("/expenses/summary"), 200)
    assert summary["totals"] == {"USD": "1.10"} and summary["count"] == 10


def test_large_amounts_sum_exactly(client):
    for _ in range(3):
        client.expense("999999999.99")
    client.expense("0.03")
    assert expect_json(client.get("/expenses/summary"), 200)["totals"] == {"USD": "3000000000.00"}


def test_currency_defaults_to_usd_and_must_be_three_capital_letters(client):
    assert client.expense()["currency"] == "USD"
    assert client.expense(currency="EUR")["currency"] == "EUR"
    for bad in ["usd", "US", "USDX", "U$D", 840, "", None]:
        resp = client.post("/expenses", {"amount": "1.00", "date": "2026-01-01", "currency": bad})
        assert error_fields(expect_problem(resp, 422)) == {"currency"}, bad


def test_currency_flag_sets_the_default(start_server):
    server = start_server(SCRIPT, "--currency", "EUR")
    assert Client(server).expense()["currency"] == "EUR"


@pytest.mark.parametrize("flag", ["eur", "EURO", "E1R"])
def test_a_bad_currency_flag_exits_2(flag, tmp_path):
    done = run_once(SCRIPT, "--port", "0", "--db", tmp_path / "db.sqlite3", "--currency", flag)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# Expenses: create, read, update, delete


def test_create_answers_201_with_location_etag_and_the_expense(client):
    category = client.category("Travel")
    resp = client.post("/expenses", {"amount": "42.5", "currency": "GBP", "date": "2026-02-28",
                                     "category_id": category["id"], "note": "  train  "})
    body = expect_json(resp, 201)
    assert resp.headers["Location"] == f"/expenses/{body['id']}"
    assert resp.headers["ETag"].startswith('"') and resp.headers["ETag"].endswith('"')
    assert {k: body[k] for k in ("amount", "currency", "date", "category_id", "note")} == {
        "amount": "42.50", "currency": "GBP", "date": "2026-02-28",
        "category_id": category["id"], "note": "train"}
    assert body["created_at"].endswith("Z") and body["updated_at"] == body["created_at"]
    got = client.get(resp.headers["Location"])
    assert expect_json(got, 200) == body and got.headers["ETag"] == resp.headers["ETag"]


def test_every_bad_field_is_named_at_once(client):
    resp = client.post("/expenses", {"amount": 1.5, "currency": "usd", "date": "2026-02-30",
                                     "category_id": "x", "note": "n" * 1001, "id": 7,
                                     "owner": "someone", "colour": "red"})
    problem = expect_problem(resp, 422)
    assert error_fields(problem) == {"amount", "currency", "date", "category_id", "note", "id",
                                     "owner", "colour"}


@pytest.mark.parametrize("body", [{"date": "2026-01-01"}, {"amount": "1.00"}])
def test_amount_and_date_are_required(client, body):
    problem = expect_problem(client.post("/expenses", body), 422)
    assert error_fields(problem) == {"amount", "date"} - set(body)


@pytest.mark.parametrize("date", ["2026-02-30", "2026-13-01", "26-01-01", "2026/01/01", "today"])
def test_impossible_dates_in_a_body_are_a_422(client, date):
    problem = expect_problem(client.post("/expenses", {"amount": "1.00", "date": date}), 422)
    assert error_fields(problem) == {"date"}


def test_a_category_id_the_caller_does_not_own_is_a_422_naming_it(server):
    alice, bob = Client(server), Client(server)
    theirs = bob.category("Bob's")
    mine = alice.expense()
    for category_id in [theirs["id"], 999_999_999]:
        problem = expect_problem(alice.post("/expenses", {"amount": "1.00", "date": "2026-01-01",
                                                          "category_id": category_id}), 422)
        assert error_fields(problem) == {"category_id"}
        problem = expect_problem(alice.patch(f"/expenses/{mine['id']}",
                                             {"category_id": category_id}), 422)
        assert error_fields(problem) == {"category_id"}
    assert expect_json(alice.get(f"/expenses/{mine['id']}"), 200) == mine


def test_patch_changes_only_the_given_fields_and_the_etag(client):
    category = client.category("Food")
    expense = client.expense("5.00", note="lunch", category_id=category["id"], currency="EUR")
    resp = client.patch(f"/expenses/{expense['id']}", {"amount": "6"})
    patched = expect_json(resp, 200)
    assert patched["amount"] == "6.00"
    assert {k: patched[k] for k in ("note", "category_id", "currency", "date", "created_at")} == \
        {k: expense[k] for k in ("note", "category_id", "currency", "date", "created_at")}
    assert resp.headers["ETag"] != '"1"'
    cleared = expect_json(client.patch(f"/expenses/{expense['id']}", {"category_id": None}), 200)
    assert cleared["category_id"] is None and cleared["amount"] == "6.00"


def test_put_replaces_the_whole_expense(client):
    category = client.category("Books")
    expense = client.expense("5.00", note="novel", category_id=category["id"], currency="EUR")
    replaced = expect_json(client.put(f"/expenses/{expense['id']}",
                                      {"amount": "7.25", "date": "2026-04-04"}), 200)
    assert replaced["amount"] == "7.25" and replaced["date"] == "2026-04-04"
    assert replaced["note"] == "" and replaced["category_id"] is None
    assert replaced["currency"] == "USD"   # the default again
    problem = expect_problem(client.put(f"/expenses/{expense['id']}", {"note": "x"}), 422)
    assert error_fields(problem) == {"amount", "date"}


def test_server_owned_fields_cannot_be_written(client):
    expense = client.expense()
    for field, value in [("id", 99), ("created_at", "2020-01-01T00:00:00Z"),
                         ("updated_at", "2020-01-01T00:00:00Z"), ("owner", "mallory")]:
        problem = expect_problem(client.patch(f"/expenses/{expense['id']}", {field: value}), 422)
        assert error_fields(problem) == {field}
    assert expect_json(client.get(f"/expenses/{expense['id']}"), 200) == expense


def test_if_match_with_a_stale_etag_is_a_412_and_changes_nothing(client):
    expense = client.expense("3.00")
    first = client.get(f"/expenses/{expense['id']}").headers["ETag"]
    resp = client.patch(f"/expenses/{expense['id']}", {"amount": "4.00"}, headers={"If-Match": first})
    second = expect(resp, 200).headers["ETag"]
    assert second != first
    for method, body in [("PATCH", {"amount": "9.00"}), ("PUT", {"amount": "9.00", "date": "2026-01-01"}),
                         ("DELETE", None)]:
        expect_problem(client.request(method, f"/expenses/{expense['id']}", json=body,
                                      headers={"If-Match": first}), 412)
    assert expect_json(client.get(f"/expenses/{expense['id']}"), 200)["amount"] == "4.00"
    expect(client.delete(f"/expenses/{expense['id']}", headers={"If-Match": second}), 204)


def test_delete_answers_204_then_404(client):
    expense = client.expense()
    resp = expect(client.delete(f"/expenses/{expense['id']}"), 204)
    assert resp.content == b""
    expect_problem(client.get(f"/expenses/{expense['id']}"), 404)
    expect_problem(client.delete(f"/expenses/{expense['id']}"), 404)


@pytest.mark.parametrize("body, status", [("[1, 2]", 422), ("{", 400), ("", 422)])
def test_bodies_that_are_not_objects(client, body, status):
    resp = client.request("POST", "/expenses", data=body,
                          headers={"Content-Type": "application/json"})
    expect_problem(resp, status)


def test_a_non_json_body_is_a_415(client):
    resp = client.request("POST", "/expenses", data="amount=1.00",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    expect_problem(resp, 415)


def test_a_bad_path_id_is_a_400(client):
    expect_problem(client.get("/expenses/abc"), 400)
    expect_problem(client.get("/categories/abc"), 400)


# --------------------------------------------------------------------------------------------
# Categories


def test_category_names_are_unique_per_user_case_insensitively(server):
    alice, bob = Client(server), Client(server)
    food = alice.category("Food")
    for clash in ["Food", "food", "FOOD", "  fOoD  "]:
        problem = expect_problem(alice.post("/categories", {"name": clash}), 409)
        assert problem["category_id"] == food["id"]
    assert bob.category("food")["name"] == "food"   # another user's names are their own
    other = alice.category("Groceries")
    expect_problem(alice.patch(f"/categories/{other['id']}", {"name": "FOOD"}), 409)
    renamed = expect_json(alice.patch(f"/categories/{food['id']}", {"name": "FOOD"}), 200)
    assert renamed["name"] == "FOOD"    # a category may change the case of its own name


def test_category_crud_with_etags(client):
    resp = client.post("/categories", {"name": "  Fun  "})
    category = expect_json(resp, 201)
    assert category["name"] == "Fun"
    assert resp.headers["Location"] == f"/categories/{category['id']}"
    got = client.get(f"/categories/{category['id']}")
    assert expect_json(got, 200) == category
    tag = got.headers["ETag"]
    renamed = client.patch(f"/categories/{category['id']}", {"name": "Leisure"}, headers={"If-Match": tag})
    assert expect_json(renamed, 200)["name"] == "Leisure"
    expect_problem(client.patch(f"/categories/{category['id']}", {"name": "X"}, headers={"If-Match": tag}), 412)
    expect_problem(client.delete(f"/categories/{category['id']}", headers={"If-Match": tag}), 412)
    for bad in [{"name": ""}, {"name": "   "}, {"name": "n" * 101}, {"name": 5}, {"title": "x"},
                {"id": 3}]:
        expect_problem(client.patch(f"/categories/{category['id']}", bad), 422)
    expect_problem(client.post("/categories", {}), 422)
    expect(client.delete(f"/categories/{category['id']}"), 204)
    expect_problem(client.get(f"/categories/{category['id']}"), 404)


def test_categories_list_by_name_with_pagination(client):
    for name in ["delta", "Alpha", "charlie", "Bravo", "echo"]:
        client.category(name)
    items, pages = client.all_pages("/categories", limit=2)
    assert [c["name"] for c in items] == ["Alpha", "Bravo", "charlie", "delta", "echo"]
    assert pages == 3


def test_a_category_in_use_cannot_be_deleted(client):
    category = client.category("Used")
    expense = client.expense(category_id=category["id"])
    problem = expect_problem(client.delete(f"/categories/{category['id']}"), 409)
    assert "reassign_to" in problem["detail"]
    assert expect_json(client.get(f"/categories/{category['id']}"), 200) == category
    expect(client.delete(f"/expenses/{expense['id']}"), 204)
    expect(client.delete(f"/categories/{category['id']}"), 204)


def test_delete_with_reassign_to_moves_the_expenses_in_one_go(server):
    client, other = Client(server), Client(server)
    old, new = client.category("Old"), client.category("New")
    expenses = [client.expense(category_id=old["id"]) for _ in range(3)]
    untouched = client.expense(category_id=new["id"])
    etags = {e["id"]: client.get(f"/expenses/{e['id']}").headers["ETag"] for e in expenses}
    theirs = other.category("Theirs")
    for target, status in [(old["id"], 422), (theirs["id"], 422), (999_999_999, 422),
                           ("abc", 400), ("0", 400)]:
        resp = client.delete(f"/categories/{old['id']}", params={"reassign_to": target})
        problem = expect_problem(resp, status)
        assert error_fields(problem) == {"reassign_to"}
    expect_json(client.get(f"/categories/{old['id']}"), 200)   # still there after refusals
    expect(client.delete(f"/categories/{old['id']}", params={"reassign_to": new["id"]}), 204)
    expect_problem(client.get(f"/categories/{old['id']}"), 404)
    for expense in expenses:
        resp = client.get(f"/expenses/{expense['id']}")
        assert expect_json(resp, 200)["category_id"] == new["id"]
        assert resp.headers["ETag"] != etags[expense["id"]]   # it changed, so its version did
    assert expect_json(client.get(f"/expenses/{untouched['id']}"), 200) == untouched
    moved = expect_json(client.get("/expenses", params={"category_id": new["id"]}), 200)["items"]
    assert len(moved) == 4


def test_concurrent_creates_of_one_category_name_give_exactly_one(start_server):
    server = start_server(SCRIPT, "--server", "threaded")
    client = Client(server)
    names = ["Coffee", "coffee", "COFFEE", "CoFfEe"] * 5

    def create(name):
        return requests.post(f"{server.url}/categories", json={"name": name},
                             headers={"X-User-Id": client.user}, timeout=TIMEOUT).status_code

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        statuses = list(pool.map(create, names))
    assert sorted(statuses) == [201] + [409] * (len(names) - 1)
    assert len(expect_json(client.get("/categories"), 200)["items"]) == 1


# --------------------------------------------------------------------------------------------
# Lists: filters, sorts, keyset pagination


@pytest.fixture
def spread(client):
    """Five expenses of one user, varied in every filterable way."""
    food, travel = client.category("Food"), client.category("Travel")
    made = [
        client.expense("12.50", "2026-01-05", category_id=food["id"], note="Lunch with Ana"),
        client.expense("3.20", "2026-01-20", category_id=food["id"], currency="EUR", note="coffee"),
        client.expense("250.00", "2026-02-01", category_id=travel["id"], note="Train to Paris"),
        client.expense("99.99", "2026-02-14", note="Flowers 100% off_season"),
        client.expense("12.50", "2026-03-01", category_id=travel["id"], currency="EUR", note="CAFÉ"),
    ]
    return client, {"food": food, "travel": travel}, made


def ids(items):
    return [item["id"] for item in items]


def test_default_order_is_newest_date_first(spread):
    client, _, made = spread
    items = expect_json(client.get("/expenses"), 200)["items"]
    assert ids(items) == ids(made)[::-1]


@pytest.mark.parametrize("params, expected", [
    ({"from": "2026-01-20"}, [1, 2, 3, 4]),
    ({"to": "2026-01-20"}, [0, 1]),
    ({"from": "2026-01-20", "to": "2026-02-01"}, [1, 2]),
    ({"min": "12.50"}, [0, 2, 3, 4]),
    ({"max": "12.5"}, [0, 1, 4]),
    ({"min": "3.2", "max": "99.99"}, [0, 1, 3, 4]),
    ({"currency": "EUR"}, [1, 4]),
    ({"q": "LUNCH"}, [0]),
    ({"q": "café"}, [4]),
    ({"q": "100%"}, [3]),
    ({"q": "_"}, [3]),
    ({"q": "nothing like this"}, []),
    ({"currency": "EUR", "min": "10"}, [4]),
])
def test_filters(spread, params, expected):
    client, _, made = spread
    items, _ = client.all_pages("/expenses", {**params, "sort": "date"})
    assert ids(items) == [made[i]["id"] for i in expected]


def test_category_filter(spread):
    client, categories, made = spread
    items, _ = client.all_pages("/expenses", {"category_id": categories["travel"]["id"], "sort": "date"})
    assert ids(items) == [made[2]["id"], made[4]["id"]]


@pytest.mark.parametrize("sort, order", [
    ("date", [0, 1, 2, 3, 4]), ("-date", [4, 3, 2, 1, 0]),
    ("amount", [1, 0, 4, 3, 2]), ("-amount", [2, 3, 4, 0, 1]),
])
def test_sorts_paginate_without_gaps_or_repeats(spread, sort, order):
    client, _, made = spread
    items, pages = client.all_pages("/expenses", {"sort": sort}, limit=2)
    assert ids(items) == [made[i]["id"] for i in order]
    assert pages == 3


@pytest.mark.parametrize("params", [
    {"from": "2026-02-30"}, {"to": "2026-13-01"}, {"from": "yesterday"}, {"min": "1e3"},
    {"max": "12.345"}, {"min": "-1"}, {"currency": "eur"}, {"category_id": "food"},
    {"sort": "price"}, {"sort": "-note"}, {"limit": "0"}, {"limit": "101"}, {"limit": "ten"},
    {"cursor": "not-a-cursor"}, {"from": "2026-03-01", "to": "2026-01-01"},
    {"min": "10", "max": "5"},
])
def test_bad_query_parameters_are_a_400_naming_the_parameter(client, params):
    problem = expect_problem(client.get("/expenses", params=params), 400)
    assert error_fields(problem) & set(params)


@pytest.mark.parametrize("made_for, used_for", [("amount", "date"), ("-date", "date"), ("date", "-amount")])
def test_a_cursor_from_another_sort_is_a_400(spread, made_for, used_for):
    client = spread[0]
    cursor = expect_json(client.get("/expenses", params={"limit": 1, "sort": made_for}), 200)["next_cursor"]
    problem = expect_problem(client.get("/expenses", params={"limit": 1, "sort": used_for, "cursor": cursor}), 400)
    assert error_fields(problem) == {"cursor"}


def test_keyset_pages_are_stable_while_rows_are_inserted_and_deleted(client):
    made = [client.expense(f"{n}.00", f"2026-05-{n:02d}") for n in range(1, 9)]
    first = expect_json(client.get("/expenses", params={"limit": 3}), 200)   # -date: 8, 7, 6
    assert ids(first["items"]) == [made[i]["id"] for i in (7, 6, 5)]
    # A new expense lands on the page already read: OFFSET 3 would show the 6th of May again.
    client.expense("1.00", "2026-05-31")
    second = expect_json(client.get("/expenses", params={"limit": 3, "cursor": first["next_cursor"]}), 200)
    assert ids(second["items"]) == [made[i]["id"] for i in (4, 3, 2)]
    # Two expenses already read are deleted: OFFSET 6 would skip the 2nd and 1st of May.
    for i in (7, 6):
        expect(client.delete(f"/expenses/{made[i]['id']}"), 204)
    third = expect_json(client.get("/expenses", params={"limit": 3, "cursor": second["next_cursor"]}), 200)
    assert ids(third["items"]) == [made[i]["id"] for i in (1, 0)]
    assert third["next_cursor"] is None


def test_more_than_a_page_of_amount_sorted_ties(client):
    made = [client.expense("5.00") for _ in range(5)]
    items, pages = client.all_pages("/expenses", {"sort": "-amount"}, limit=2)
    assert ids(items) == ids(made)[::-1] and pages == 3


# --------------------------------------------------------------------------------------------
# Summary


def test_summary_by_category_keeps_currencies_apart(spread):
    client, categories, _ = spread
    summary = expect_json(client.get("/expenses/summary"), 200)
    assert summary["group_by"] == "category"
    assert summary["count"] == 5
    assert summary["totals"] == {"EUR": "15.70", "USD": "362.49"}
    groups = {g["key"]: g for g in summary["groups"]}
    assert groups[categories["food"]["id"]] == {"key": categories["food"]["id"], "category": "Food",
                                                "count": 2, "totals": {"EUR": "3.20", "USD": "12.50"}}
    assert groups[categories["travel"]["id"]]["totals"] == {"EUR": "12.50", "USD": "250.00"}
    assert groups[None] == {"key": None, "category": None, "count": 1, "totals": {"USD": "99.99"}}


@pytest.mark.parametrize("group_by, expected", [
    ("month", {"2026-01": (2, {"EUR": "3.20", "USD": "12.50"}), "2026-02": (2, {"USD": "349.99"}),
               "2026-03": (1, {"EUR": "12.50"})}),
    ("day", {"2026-01-05": (1, {"USD": "12.50"}), "2026-01-20": (1, {"EUR": "3.20"}),
             "2026-02-01": (1, {"USD": "250.00"}), "2026-02-14": (1, {"USD": "99.99"}),
             "2026-03-01": (1, {"EUR": "12.50"})}),
])
def test_summary_by_month_and_day(spread, group_by, expected):
    client = spread[0]
    summary = expect_json(client.get("/expenses/summary", params={"group_by": group_by}), 200)
    assert [g["key"] for g in summary["groups"]] == sorted(expected)   # in date order
    assert {g["key"]: (g["count"], g["totals"]) for g in summary["groups"]} == expected


def test_summary_honours_from_and_to(spread):
    client = spread[0]
    summary = expect_json(client.get("/expenses/summary", params={
        "from": "2026-01-20", "to": "2026-02-14", "group_by": "month"}), 200)
    assert summary["count"] == 3 and summary["totals"] == {"EUR": "3.20", "USD": "349.99"}
    assert (summary["from"], summary["to"]) == ("2026-01-20", "2026-02-14")


@pytest.mark.parametrize("params", [{"group_by": "year"}, {"from": "2026-02-30"}, {"to": "x"}])
def test_summary_bad_parameters_are_a_400(client, params):
    expect_problem(client.get("/expenses/summary", params=params), 400)


def test_an_empty_summary(client):
    assert expect_json(client.get("/expenses/summary"), 200) == {
        "group_by": "category", "from": None, "to": None, "groups": [], "count": 0, "totals": {}}


# --------------------------------------------------------------------------------------------
# CSV export


def test_export_is_rfc4180_with_a_header_row_and_crlf(spread):
    client, categories, made = spread
    text, rows = read_csv(client.get("/expenses/export.csv", params={"sort": "date"}),
                          "expenses.csv")
    assert rows[0] == ["id", "date", "amount", "currency", "category_id", "category", "note"]
    assert text.endswith("\r\n") and text.count("\r\n") == 6 and "\n" not in text.replace("\r\n", "")
    assert rows[1] == [str(made[0]["id"]), "2026-01-05", "12.50", "USD",
                       str(categories["food"]["id"]), "Food", "Lunch with Ana"]
    assert rows[4][2:] == ["99.99", "USD", "", "", "Flowers 100% off_season"]


def test_export_has_every_matching_row_not_just_a_page(client):
    for n in range(120):
        client.expense(f"{n + 1}.01", f"2026-06-{n % 28 + 1:02d}", currency="EUR" if n % 2 else "USD")
    _, rows = read_csv(client.get("/expenses/export.csv"), "expenses.csv")
    assert len(rows) == 1 + 120
    _, rows = read_csv(client.get("/expenses/export.csv", params={"currency": "EUR", "min": "100"}),
                       "expenses.csv")
    assert len(rows) == 1 + 11 and {row[3] for row in rows[1:]} == {"EUR"}
    expect_problem(client.get("/expenses/export.csv", params={"from": "2026-02-30"}), 400)


# OWASP "CSV Injection". (A leading tab or CR is on OWASP's list too, but text fields are
# trimmed on the way in, so no stored value can start with one: "\t=1" is stored as "=1".)
DANGEROUS = ["=HYPERLINK(\"http://evil.example\",\"click\")", "+1+cmd|' /C calc'!A0", "-2+3",
             "@SUM(1,2)", "\t=1+1"]


@pytest.mark.parametrize("text", DANGEROUS)
def test_export_escapes_cells_a_spreadsheet_would_run(client, text):
    category = client.category(text)
    client.expense(note=text, category_id=category["id"])
    _, rows = read_csv(client.get("/expenses/export.csv"), "expenses.csv")
    assert rows[1][5] == "'" + text.strip()   # the category's name
    assert rows[1][6] == "'" + text.strip()   # the note
    for cell in rows[1]:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


def test_export_leaves_ordinary_text_alone(client):
    client.expense(note='He said "hi", then left\nnext line')
    _, rows = read_csv(client.get("/expenses/export.csv"), "expenses.csv")
    assert rows[1][6] == 'He said "hi", then left\nnext line'


# --------------------------------------------------------------------------------------------
# Durability


def test_data_survives_a_restart(start_server, tmp_path):
    db = tmp_path / "expenses.sqlite3"
    first = start_server(SCRIPT, "--db", db)
    client = Client(first)
    expense = client.expense("19.99", category_id=client.category("Kept")["id"])
    first.stop()
    second = start_server(SCRIPT, "--db", db)
    again = Client(second, client.user)
    assert expect_json(again.get(f"/expenses/{expense['id']}"), 200) == expense
    assert expect_json(again.get("/expenses/summary"), 200)["totals"] == {"USD": "19.99"}


# --------------------------------------------------------------------------------------------
# The OpenAPI document: the request bodies it describes are the ones the server checks


AMOUNT_PATTERN = r"^(?:0{0,4}[0-9]{1,9}(?:\.[0-9]{1,2})?|0{0,3}1000000000(?:\.00?)?)$"
NOT_ZERO = "[1-9]"


def amount_schema_accepts(amount):
    return bool(re.search(AMOUNT_PATTERN, amount) and re.search(NOT_ZERO, amount))


def test_openapi_describes_every_category_and_expense_body(server):
    schemas = request_schemas(requests.get, server.url)
    assert set(schemas) == {("POST", "/categories"), ("PATCH", "/categories/{category_id}"),
                            ("POST", "/expenses"), ("PUT", "/expenses/{expense_id}"),
                            ("PATCH", "/expenses/{expense_id}")}, "DELETE takes no body"
    name = {"name": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"\S"}}
    assert schemas["POST", "/categories"] == {"type": "object", "additionalProperties": False,
                                              "properties": name, "required": ["name"]}
    assert schemas["PATCH", "/categories/{category_id}"] == {
        "type": "object", "additionalProperties": False, "properties": name}
    for key in (("POST", "/expenses"), ("PUT", "/expenses/{expense_id}"),
                ("PATCH", "/expenses/{expense_id}")):
        schema = schemas[key]
        assert (schema["type"], schema["additionalProperties"]) == ("object", False), key
        assert set(schema["properties"]) == {"amount", "currency", "category_id", "date", "note"}
        assert schema.get("required") == (None if key[0] == "PATCH" else ["amount", "date"]), key
        properties = schema["properties"]
        filled_in = key[0] != "PATCH"  # POST and PUT fill in what is left out; PATCH keeps it
        assert properties["amount"] == {
            "type": "string", "pattern": AMOUNT_PATTERN, "allOf": [{"pattern": NOT_ZERO}],
            "description": 'decimal string, > 0 and ≤ 1000000000.00, like "12.30"'}
        assert without_description(properties["currency"]) == {
            "type": "string", "minLength": 3, "maxLength": 3, "pattern": "^(?:[A-Z]{3})$"}
        assert "ISO 4217 code" in properties["currency"]["description"]
        assert without_description(properties["category_id"]) == {
            "type": ["integer", "null"], "minimum": 1, "maximum": 2**63 - 1,
            **({"default": None} if filled_in else {})}
        assert "default" not in properties["currency"], "the server's --currency: not fixed"
        assert "one of your categories" in properties["category_id"]["description"]
        assert properties["date"] == {"type": "string", "format": "date"}
        assert properties["note"] == {"type": "string", "minLength": 0, "maxLength": 1000,
                                      **({"default": ""} if filled_in else {})}


@pytest.mark.parametrize("amount, stored", [
    ("12.30", "12.30"), ("12.3", "12.30"), ("12", "12.00"), ("0.01", "0.01"), ("007.5", "7.50"),
    ("1000000000.00", "1000000000.00"), ("0001000000000.0", "1000000000.00"),
    ("0000999999999.99", "999999999.99"), ("0.1", "0.10"), ("0000000000000.01", "0.01"),
])
def test_an_amount_the_pattern_allows_is_accepted(client, amount, stored):
    assert amount_schema_accepts(amount)
    assert client.expense(amount)["amount"] == stored


@pytest.mark.parametrize("amount", ["12.345", "1e3", "-1", "+1", " 1", "12.30 ", "1,000",
                                    "\u0661\u0662", "12.", ".5", "", "12345678901234",
                                    "0", "0.00", "0000000000000", "1000000000.01", "1000000001",
                                    "00000000000001", "00001000000000"])
def test_an_amount_the_pattern_excludes_is_refused(client, amount):
    assert not amount_schema_accepts(amount)  # the range too: a regex can spell it out in digits
    resp = client.post("/expenses", {"amount": amount, "date": "2026-03-01"})
    assert error_fields(expect_problem(resp, 422)) == {"amount"}


def test_the_documented_limits_are_the_enforced_ones(server, client):
    schemas = request_schemas(requests.get, server.url)
    properties = schemas["POST", "/expenses"]["properties"]
    # The range is the description's: "> 0 and ≤ 1000000000.00", and the patterns'.
    for amount in ("0.00", "1000000000.01", 12.3):
        resp = client.post("/expenses", {"amount": amount, "date": "2026-03-01"})
        assert error_fields(expect_problem(resp, 422)) == {"amount"}, amount
    currency = properties["currency"]["pattern"]
    assert re.search(currency, "EUR") and not re.search(currency, "eur") \
        and not re.search(currency, "EURO")
    longest = "n" * properties["note"]["maxLength"]
    expense = client.expense(currency="EUR", category_id=None, note=longest)
    assert (expense["currency"], expense["category_id"], expense["note"]) == ("EUR", None, longest)
    for bad, field in [({"note": longest + "n"}, "note"), ({"currency": "eur"}, "currency"),
                       ({"currency": "EURO"}, "currency"), ({"category_id": 0}, "category_id"),
                       ({"date": "2026-02-30"}, "date")]:
        problem = expect_problem(client.patch(f"/expenses/{expense['id']}", bad), 422)
        assert error_fields(problem) == {field}, bad
    patched = expect_json(client.patch(f"/expenses/{expense['id']}", {"note": "lunch"}), 200)
    assert patched["note"] == "lunch", "PATCH requires nothing, as its schema says"
    name = schemas["POST", "/categories"]["properties"]["name"]["maxLength"]
    category = client.category("c" * name)
    resp = client.patch(f"/categories/{category['id']}", {"name": "c" * (name + 1)})
    assert error_fields(expect_problem(resp, 422)) == {"name"}
    assert expect_json(client.patch(f"/categories/{category['id']}", {}), 200) == category
