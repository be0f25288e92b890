"""level02/contacts.py, black-box (spec/level02.md §7): normalised emails and phones, email
uniqueness that holds under concurrency, accent-insensitive word-prefix search, CSV and vCard
export, CSV import with per-row reports, duplicate detection.

Most tests share one server; each uses its own X-User-Id, so they cannot see each other's
data. Tests that need a flag or real parallelism start their own.
"""
import concurrent.futures
import re
import uuid

import pytest
import requests

from tests.harness import (RawConnection, expect, expect_json, expect_problem, request_bytes,
                           request_schemas, run_once)
from tests.level02.clients import UserClient, error_fields, read_csv

SCRIPT = "level02/contacts.py"
TIMEOUT = 10  # s, for every single request


class Client(UserClient):
    """Requests as one user, with the contacts shortcuts."""

    def contact(self, name, **fields):
        return expect_json(self.post("/contacts", {"name": name, **fields}), 201)

    def names(self, **params):
        """The names of every contact the query matches, in order (all pages)."""
        return [c["name"] for c in self.all_pages(params)]

    def all_pages(self, params=None, limit=100):
        return self.all_items("/contacts", dict(params or {}, limit=limit))

    def import_csv(self, text, status=(200, 201)):
        resp = self.request("POST", "/contacts/import", data=text.encode("utf-8"),
                            headers={"Content-Type": "text/csv"})
        return expect_json(resp, status)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def client(server):
    return Client(server)


# --------------------------------------------------------------------------------------------
# Ownership


@pytest.mark.parametrize("header", [None, "", "bad id", "é"])
def test_missing_or_malformed_user_is_a_401(server, header):
    headers = {} if header is None else {"X-User-Id": header.encode("utf-8")}
    for method, path in [("GET", "/contacts"), ("POST", "/contacts"), ("GET", "/contacts/1"),
                         ("GET", "/contacts/duplicates"), ("GET", "/contacts/export.csv"),
                         ("GET", "/contacts/export.vcf"), ("POST", "/contacts/import")]:
        resp = requests.request(method, server.url + path, headers=headers, json={"name": "x"},
                                timeout=TIMEOUT)
        expect_problem(resp, 401)
        assert resp.headers.get("WWW-Authenticate") == "X-User-Id"


def test_another_users_contact_is_404_for_every_verb_and_invisible(server):
    alice, mallory = Client(server), Client(server)
    contact = alice.contact("Alice Private", emails=["alice@private.example"], tags=["secret"])
    for method, body in [("GET", None), ("PATCH", {"name": "x"}), ("PUT", {"name": "x"}),
                         ("DELETE", None)]:
        expect_problem(mallory.request(method, f"/contacts/{contact['id']}", json=body), 404)
    assert mallory.all_pages() == []
    assert mallory.all_pages({"q": "alice"}) == []
    assert expect_json(mallory.get("/contacts/duplicates"), 200) == {"groups": []}
    assert expect(mallory.get("/contacts/export.csv"), 200).text.count("\r\n") == 1
    assert expect(mallory.get("/contacts/export.vcf"), 200).text == ""
    # the same email is free for another user: uniqueness is per user
    mallory.contact("Mallory", emails=["alice@private.example"])
    assert expect_json(alice.get(f"/contacts/{contact['id']}"), 200) == contact


# --------------------------------------------------------------------------------------------
# Creating: validation and normalisation


def test_create_answers_201_with_location_etag_and_the_contact(client):
    resp = client.post("/contacts", {"name": "  Ann Lee  ", "emails": ["Ann.Lee@Example.COM"],
                                     "phones": ["+1 (555) 010-4477"], "company": "Acme",
                                     "notes": "met at PyCon", "tags": ["Work", "work", " vip "]})
    body = expect_json(resp, 201)
    assert resp.headers["Location"] == f"/contacts/{body['id']}"
    assert re.fullmatch(r'"[^"]+"', resp.headers["ETag"])
    assert body["name"] == "Ann Lee"
    assert body["emails"] == ["Ann.Lee@example.com"]          # domain lower-cased, local part kept
    assert body["phones"] == [{"number": "+15550104477", "label": "+1 (555) 010-4477"}]
    assert body["tags"] == ["work", "vip"]
    assert (body["company"], body["notes"]) == ("Acme", "met at PyCon")
    assert body["created_at"].endswith("Z")
    got = client.get(resp.headers["Location"])
    assert expect_json(got, 200) == body and got.headers["ETag"] == resp.headers["ETag"]


def test_only_a_name_is_required(client):
    body = client.contact("Solo")
    assert (body["emails"], body["phones"], body["tags"], body["company"], body["notes"]) == \
        ([], [], [], "", "")


@pytest.mark.parametrize("body, field", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": "   "}, "name"), ({"name": "n" * 201}, "name"),
    ({"name": 5}, "name"), ({"name": "x", "emails": "a@b.example"}, "emails"),
    ({"name": "x", "emails": ["not-an-email"]}, "emails"),
    ({"name": "x", "emails": ["a@b"]}, "emails"),
    ({"name": "x", "emails": ["a@@b.example"]}, "emails"),
    ({"name": "x", "emails": ["a b@c.example"]}, "emails"),
    ({"name": "x", "emails": ["a@-bad-.example"]}, "emails"),
    ({"name": "x", "emails": [f"a{n}@b.example" for n in range(11)]}, "emails"),
    # List limits bound the list as sent, before any work on it (duplicates count).
    ({"name": "x", "emails": ["a@b.example"] * 50_000}, "emails"),
    ({"name": "x", "phones": ["+1 555 010 4477"] * 11}, "phones"),
    ({"name": "x", "tags": ["t"] * 21}, "tags"),
    ({"name": "x", "emails": ["\uff4a\uff4f\uff45@example.com"]}, "emails"),   # fullwidth ｊｏｅ
    ({"name": "x", "phones": ["555 0104"]}, "phones"),          # no + and no default country code
    ({"name": "x", "phones": ["+1 555"]}, "phones"),            # too short
    ({"name": "x", "phones": ["+1234567890123456"]}, "phones"),  # 16 digits: longer than E.164
    ({"name": "x", "phones": ["+1 555 CALL NOW"]}, "phones"),
    ({"name": "x", "phones": [15550104477]}, "phones"),
    ({"name": "x", "phones": ["+0 555 010 4477"]}, "phones"),   # no country code starts with 0
    ({"name": "x", "tags": ["a;b"]}, "tags"),
    ({"name": "x", "tags": ["t" * 31]}, "tags"),
    ({"name": "x", "company": "c" * 201}, "company"),
    ({"name": "x", "notes": "n" * 10_001}, "notes"),
    ({"name": "x", "id": 1}, "id"), ({"name": "x", "created_at": "2020-01-01T00:00:00Z"}, "created_at"),
    ({"name": "x", "owner": "mallory"}, "owner"), ({"name": "x", "email": "a@b.example"}, "email"),
])
def test_invalid_bodies_are_a_422_naming_the_field(client, body, field):
    problem = expect_problem(client.post("/contacts", body), 422)
    assert error_fields(problem) == {field}


def test_every_bad_field_is_named_at_once(client):
    problem = expect_problem(client.post("/contacts", {"emails": ["x"], "phones": ["1"], "id": 3}), 422)
    assert error_fields(problem) == {"name", "emails", "phones", "id"}


@pytest.mark.parametrize("typed, number", [
    ("+1 (555) 010-4477", "+15550104477"), ("+1.555.010.4477", "+15550104477"),
    ("+44 20 7946 0958", "+442079460958"), ("0044 20 7946 0958", "+442079460958"),
    ("+49 151/1234-5678", "+4915112345678"), ("+12345678", "+12345678"),
    ("+123456789012345", "+123456789012345"),
])
def test_phones_are_normalised_to_e164_keeping_the_text_as_label(client, typed, number):
    body = client.contact("Phone", phones=[typed])
    assert body["phones"] == [{"number": number, "label": typed}]


def test_a_number_given_twice_is_kept_once(client):
    body = client.contact("Twice", phones=["+1 555 010 4477", "+1-555-010-4477", "+44 20 7946 0958"])
    assert [p["number"] for p in body["phones"]] == ["+15550104477", "+442079460958"]


def test_default_country_code_completes_national_numbers(start_server):
    server = start_server(SCRIPT, "--default-country-code", "44")
    body = Client(server).contact("UK", phones=["020 7946 0958", "+1 555 010 4477"])
    assert [p["number"] for p in body["phones"]] == ["+442079460958", "+15550104477"]
    assert body["phones"][0]["label"] == "020 7946 0958"


@pytest.mark.parametrize("flag", ["0", "+44", "1234", "uk"])
def test_a_bad_country_code_flag_exits_2(flag, tmp_path):
    done = run_once(SCRIPT, "--port", "0", "--db", tmp_path / "db.sqlite3",
                    "--default-country-code", flag)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# Email uniqueness


def test_an_email_belongs_to_one_contact_per_user(client):
    first = client.contact("First", emails=["shared@example.com"])
    for taken in ["shared@example.com", "SHARED@EXAMPLE.COM", "Shared@example.com"]:
        resp = client.post("/contacts", {"name": "Second", "emails": ["new@example.com", taken]})
        problem = expect_problem(resp, 409)
        assert problem["contact_id"] == first["id"]
        assert str(first["id"]) in problem["detail"] and "First" in problem["detail"]
    # nothing of the refused contact was written: its other address is still free
    client.contact("Third", emails=["new@example.com"])
    assert client.names(sort="name") == ["First", "Third"]


def test_an_email_is_one_address_however_its_unicode_is_composed(client):
    """`josé` typed with é (NFC) or with e + a combining accent (NFD) is one address."""
    first = client.contact("First", emails=["jos\u00e9@example.com"])
    problem = expect_problem(client.post("/contacts", {"name": "Second",
                                                       "emails": ["jose\u0301@example.com"]}), 409)
    assert problem["contact_id"] == first["id"]
    one = client.contact("Fourth", emails=["bo\u0301@example.com", "b\u00f3@example.com"])
    assert one["emails"] == ["b\u00f3@example.com"], "one address, in NFC, given twice"


def test_updates_keep_emails_unique_too(client):
    first = client.contact("First", emails=["one@example.com"])
    second = client.contact("Second", emails=["two@example.com"])
    problem = expect_problem(client.patch(f"/contacts/{second['id']}", {"emails": ["ONE@example.com"]}), 409)
    assert problem["contact_id"] == first["id"]
    problem = expect_problem(client.put(f"/contacts/{second['id']}",
                                        {"name": "Second", "emails": ["one@example.com"]}), 409)
    assert problem["contact_id"] == first["id"]
    assert expect_json(client.get(f"/contacts/{second['id']}"), 200) == second
    # a contact keeps its own address across updates, and a freed address can be reused
    expect_json(client.patch(f"/contacts/{first['id']}", {"emails": ["one@example.com", "uno@example.com"]}), 200)
    expect_json(client.patch(f"/contacts/{first['id']}", {"emails": []}), 200)
    assert expect_json(client.patch(f"/contacts/{second['id']}", {"emails": ["one@example.com"]}), 200)["emails"] \
        == ["one@example.com"]


@pytest.mark.parametrize("transport", ["threaded", "asyncio"])
def test_concurrent_creates_with_one_email_give_exactly_one_contact(start_server, transport):
    server = start_server(SCRIPT, "--server", transport)
    user = f"race-{uuid.uuid4().hex[:8]}"
    barrier_size = 24

    def create(n):
        return requests.post(f"{server.url}/contacts",
                             json={"name": f"Racer {n}", "emails": [f"racer{n}@example.com",
                                                                    "same@example.com"]},
                             headers={"X-User-Id": user}, timeout=TIMEOUT).status_code

    with concurrent.futures.ThreadPoolExecutor(barrier_size) as pool:
        statuses = list(pool.map(create, range(barrier_size)))
    assert sorted(statuses) == [201] + [409] * (barrier_size - 1)
    contacts = Client(server, user).all_pages()
    assert len(contacts) == 1
    # the losers wrote nothing: their own addresses are all still free
    for n in range(barrier_size):
        if f"racer{n}@example.com" not in contacts[0]["emails"]:
            Client(server, user).contact(f"Later {n}", emails=[f"racer{n}@example.com"])


# --------------------------------------------------------------------------------------------
# Reading, updating, deleting


def test_patch_changes_only_the_given_fields(client):
    contact = client.contact("Pat", emails=["pat@example.com"], phones=["+1 555 010 0001"],
                             company="Acme", tags=["a"])
    patched = expect_json(client.patch(f"/contacts/{contact['id']}", {"company": "Globex"}), 200)
    assert patched["company"] == "Globex"
    assert {k: patched[k] for k in ("name", "emails", "phones", "tags", "notes", "created_at")} == \
        {k: contact[k] for k in ("name", "emails", "phones", "tags", "notes", "created_at")}


def test_put_replaces_the_whole_contact(client):
    contact = client.contact("Put", emails=["put@example.com"], company="Acme", tags=["a"])
    replaced = expect_json(client.put(f"/contacts/{contact['id']}", {"name": "Put Again"}), 200)
    assert (replaced["name"], replaced["emails"], replaced["company"], replaced["tags"]) == \
        ("Put Again", [], "", [])
    expect_problem(client.put(f"/contacts/{contact['id']}", {"company": "x"}), 422)


def test_if_match_with_a_stale_etag_is_a_412(client):
    contact = client.contact("Versioned")
    old = client.get(f"/contacts/{contact['id']}").headers["ETag"]
    new = expect(client.patch(f"/contacts/{contact['id']}", {"notes": "v2"}, headers={"If-Match": old}),
                 200).headers["ETag"]
    assert new != old
    for method, body in [("PATCH", {"notes": "v3"}), ("PUT", {"name": "v3"}), ("DELETE", None)]:
        expect_problem(client.request(method, f"/contacts/{contact['id']}", json=body,
                                      headers={"If-Match": old}), 412)
    assert expect_json(client.get(f"/contacts/{contact['id']}"), 200)["notes"] == "v2"
    expect(client.delete(f"/contacts/{contact['id']}", headers={"If-Match": new}), 204)


def test_delete_answers_204_then_404_and_frees_the_emails(client):
    contact = client.contact("Gone", emails=["gone@example.com"], phones=["+1 555 010 9999"])
    assert expect(client.delete(f"/contacts/{contact['id']}"), 204).content == b""
    expect_problem(client.get(f"/contacts/{contact['id']}"), 404)
    expect_problem(client.delete(f"/contacts/{contact['id']}"), 404)
    client.contact("Back", emails=["gone@example.com"])
    assert client.names(q="5550109999") == []


# --------------------------------------------------------------------------------------------
# Search, filters, sorting


@pytest.fixture
def people(client):
    for name, fields in [
        ("Alice Smith", {"emails": ["alice.smith@example.com"], "company": "Acme"}),
        ("Smith, Ali", {"phones": ["+1 (555) 123-4567"], "company": "Globex"}),
        ("José Álvarez", {"emails": ["jose@correo.example"], "company": "Señor Café", "tags": ["Friends"]}),
        ("Natalie Wood", {"emails": ["nat@example.org"], "tags": ["friends", "film"]}),
        ("Émile Zola", {"phones": ["+33 1 23 45 67 89"], "company": "acme"}),
        ("bob jones", {"emails": ["bob@bobs.example"], "phones": ["+44 20 7946 0958"]}),
    ]:
        client.contact(name, **fields)
    return client


@pytest.mark.parametrize("q, expected", [
    ("ali", ["Alice Smith", "Smith, Ali"]),             # word prefixes, any word
    ("ALI", ["Alice Smith", "Smith, Ali"]),
    ("lie", []),                                         # not the middle of a word ("Natalie")
    ("jose", ["José Álvarez"]),                          # accents ignored
    ("JOSÉ álv", ["José Álvarez"]),                      # every word must match
    ("emile", ["Émile Zola"]),
    ("smith ali", ["Alice Smith", "Smith, Ali"]),
    ("smith alice", ["Alice Smith"]),
    ("cafe", ["José Álvarez"]),                          # company, accents ignored
    ("senor", ["José Álvarez"]),
    ("globex", ["Smith, Ali"]),
    ("alice.smith@example.com", ["Alice Smith"]),        # email
    ("bobs", ["bob jones"]),                             # a word of the email's domain
    ("nat@", ["Natalie Wood"]),
    ("555 123 4567", ["Smith, Ali"]),                    # phone digits, any formatting
    ("(555) 123-4567", ["Smith, Ali"]),
    ("+15551234567", ["Smith, Ali"]),
    ("5551234567", ["Smith, Ali"]),
    ("123-45", ["Émile Zola", "Smith, Ali"]),            # +33 1 23 45 67 89 has 12345 too
    ("20 7946", ["bob jones"]),
    ("+33 1 23", ["Émile Zola"]),
    ("999", []),
    ("zzz", []),
    # Nothing to look for is no match, not every contact: punctuation alone, or a + or ( )
    # without a digit. Only an empty (or blank) q is no filter at all.
    ("!!!", []), ("-", []), ("+", []), ("()", []), ("@.", []), ("_", []),
    ("   ", ["Alice Smith", "bob jones", "Émile Zola", "José Álvarez", "Natalie Wood",
            "Smith, Ali"]),
])
def test_search(people, q, expected):
    assert people.names(q=q) == expected


def test_tag_and_company_filters(people):
    assert people.names(tag="friends") == ["José Álvarez", "Natalie Wood"]
    assert people.names(tag="FILM") == ["Natalie Wood"]
    assert people.get("/contacts", params=[("tag", "friends"), ("tag", "film")]).json()["items"][0]["name"] \
        == "Natalie Wood"
    assert people.names(company="acme") == ["Alice Smith", "Émile Zola"]
    assert people.names(company="SENOR CAFE") == ["José Álvarez"]
    assert people.names(company="acm") == []          # the company filter is exact
    assert people.names(company="acme", q="emile") == ["Émile Zola"]


def test_sort_by_name_ignores_case_and_accents(people):
    expected = ["Alice Smith", "bob jones", "Émile Zola", "José Álvarez", "Natalie Wood", "Smith, Ali"]
    assert people.names() == expected                  # name is the default
    assert people.names(sort="name") == expected
    assert people.names(sort="-name") == expected[::-1]
    assert people.names(sort="-created_at") == ["bob jones", "Émile Zola", "Natalie Wood",
                                                 "José Álvarez", "Smith, Ali", "Alice Smith"]


@pytest.mark.parametrize("sort", ["name", "-name", "-created_at"])
def test_every_sort_paginates_without_gaps_or_repeats(people, sort):
    whole = people.names(sort=sort)
    assert [c["name"] for c in people.all_pages({"sort": sort}, limit=2)] == whole


def test_keyset_pages_are_stable_while_contacts_are_added_and_removed(client):
    made = {name: client.contact(name) for name in ["b", "d", "f", "h", "j", "l"]}
    first = expect_json(client.get("/contacts", params={"limit": 2}), 200)
    assert [c["name"] for c in first["items"]] == ["b", "d"]
    client.contact("a")                                  # lands on the page already read
    expect(client.delete(f"/contacts/{made['b']['id']}"), 204)   # and one already read goes
    client.contact("g")                                  # lands ahead: will be seen
    rest = client.all_pages({"cursor": first["next_cursor"]}, limit=2)
    assert [c["name"] for c in rest] == ["f", "g", "h", "j", "l"]


@pytest.mark.parametrize("params", [{"sort": "email"}, {"sort": "created_at"}, {"limit": "0"},
                                    {"limit": "101"}, {"cursor": "garbage"}])
def test_bad_list_parameters_are_a_400_naming_them(client, params):
    problem = expect_problem(client.get("/contacts", params=params), 400)
    assert error_fields(problem) == set(params)


def test_a_cursor_from_another_sort_is_a_400(people):
    cursor = expect_json(people.get("/contacts", params={"limit": 1, "sort": "-name"}), 200)["next_cursor"]
    problem = expect_problem(people.get("/contacts", params={"limit": 1, "sort": "name", "cursor": cursor}), 400)
    assert error_fields(problem) == {"cursor"}


def test_a_bad_path_id_is_a_400(client):
    expect_problem(client.get("/contacts/abc"), 400)


# --------------------------------------------------------------------------------------------
# Duplicates


def test_duplicates_groups_contacts_that_look_like_one_person(client):
    ann = client.contact("Ann Lee", emails=["ann@example.com"], phones=["+1 555 010 1111"])
    lee = client.contact("Lee, Ann")                                       # same name words
    ann2 = client.contact("ANN LEE", emails=["Ann+work@example.com"])       # same name, +tag
    phone = client.contact("Reception", phones=["+1 (555) 010-1111"])       # same number
    client.contact("Someone Else", emails=["else@example.com"], phones=["+1 555 010 2222"])
    groups = expect_json(client.get("/contacts/duplicates"), 200)["groups"]
    found = {(g["reason"], g["value"]): sorted(c["id"] for c in g["contacts"]) for g in groups}
    assert found == {
        ("email", "ann@example.com"): sorted([ann["id"], ann2["id"]]),
        ("phone", "+15550101111"): sorted([ann["id"], phone["id"]]),
        ("name", "ann lee"): sorted([ann["id"], lee["id"], ann2["id"]]),
    }
    for group in groups:
        assert all(set(c) == {"id", "name"} for c in group["contacts"])


def test_no_duplicates_when_everyone_is_distinct(client):
    client.contact("One", emails=["one@example.com"])
    client.contact("Two", emails=["two@example.com"])
    assert expect_json(client.get("/contacts/duplicates"), 200) == {"groups": []}


# --------------------------------------------------------------------------------------------
# CSV export and import


def test_csv_export(people):
    text, rows = read_csv(people.get("/contacts/export.csv"), "contacts.csv")
    assert rows[0] == ["id", "name", "emails", "phones", "company", "notes", "tags", "created_at"]
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    assert [row[1] for row in rows[1:]] == people.names()
    jose = rows[4]
    assert jose[1:7] == ["José Álvarez", "jose@correo.example", "", "Señor Café", "", "friends"]
    smith = rows[6]
    assert smith[3] == "'+15551234567"   # starts with +: escaped like any formula trigger
    _, rows = read_csv(people.get("/contacts/export.csv", params={"tag": "friends"}),
                       "contacts.csv")
    assert [row[1] for row in rows[1:]] == ["José Álvarez", "Natalie Wood"]


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://e.x\",\"x\")", "+1+1", "-1+1",
                                  "@SUM(A1)", "\t=1+1"])
def test_csv_export_escapes_formulas(client, text):
    client.contact(text, company=text, notes=text, tags=[text.strip()])
    _, rows = read_csv(client.get("/contacts/export.csv"), "contacts.csv")
    safe = "'" + text.strip()
    assert [rows[1][1], rows[1][4], rows[1][5], rows[1][6]] == [safe, safe, safe, safe.lower()]


def test_an_export_imports_back_unchanged(people, server):
    other = Client(server)
    result = other.import_csv(people.get("/contacts/export.csv").text, status=201)
    assert result == {"created": 6, "skipped": []}
    strip = lambda c: {k: v for k, v in c.items() if k not in ("id", "created_at", "updated_at")}
    theirs = [strip(c) for c in people.all_pages()]
    mine = [strip(c) for c in other.all_pages()]
    for contact in theirs + mine:   # labels are not exported: the number is
        contact["phones"] = [p["number"] for p in contact["phones"]]
    assert mine == theirs


def test_import_reports_bad_rows_and_keeps_good_ones(client):
    client.contact("Existing", emails=["taken@example.com"])
    text = ("name,emails,phones,company,tags\r\n"
            "Good One,good1@example.com,+1 555 010 0001,Acme,a; b\r\n"      # line 2
            ",nameless@example.com,,,\r\n"                                 # line 3: no name
            "Bad Email,not-an-email,,,\r\n"                                # line 4
            "Bad Phone,,555,,\r\n"                                         # line 5: no +
            "Clash,fresh@example.com; TAKEN@example.com,,,\r\n"            # line 6: existing
            "\r\n"                                                         # line 7: blank
            "\"Multi\r\nLine\",multi@example.com,,,\r\n"                   # lines 8-9
            "Twin A,twin@example.com,,,\r\n"                               # line 10
            "Twin B,twin@example.com,,,\r\n"                               # line 11: in-file dup
            "Too,many,cells,,,,extra\r\n")                                 # line 12
    result = client.import_csv(text, status=201)
    assert result["created"] == 3
    assert [s["line"] for s in result["skipped"]] == [3, 4, 5, 6, 11, 12]
    reasons = {s["line"]: s["reason"] for s in result["skipped"]}
    assert "name" in reasons[3] and "emails" in reasons[4] and "phones" in reasons[5]
    assert "taken@example.com" in reasons[6].lower() and "Existing" in reasons[6]
    assert "twin@example.com" in reasons[11] and "Twin A" in reasons[11]
    assert client.names() == ["Existing", "Good One", "Multi\r\nLine", "Twin A"]
    good = client.all_pages({"q": "good"})[0]
    assert (good["emails"], good["company"], good["tags"]) == (["good1@example.com"], "Acme", ["a", "b"])
    assert good["phones"][0]["number"] == "+15550100001"
    # The clashing row was not half-written: its first address is still free.
    client.contact("Fresh", emails=["fresh@example.com"])


def test_a_large_import_keeps_every_good_row_and_finds_duplicates_across_it(client):
    rows = [f"Person {n},person{n}@example.com,+1 555 010 {n:04d}" for n in range(450)]
    rows[300] = "Copycat,PERSON10@example.com,"          # the address of row 10, 290 rows earlier
    result = client.import_csv("name,emails,phones\r\n" + "\r\n".join(rows) + "\r\n", status=201)
    assert result["created"] == 449
    assert [s["line"] for s in result["skipped"]] == [302]   # line 1 is the header
    assert "Person 10" in result["skipped"][0]["reason"]
    assert len(client.all_pages()) == 449


def test_import_with_nothing_created_is_a_200(client):
    assert client.import_csv("name\r\n", status=200) == {"created": 0, "skipped": []}
    result = client.import_csv("name,emails\r\n,x@example.com\r\n", status=200)
    assert result["created"] == 0 and result["skipped"][0]["line"] == 2


def test_import_accepts_a_bom_and_lf_line_endings(client):
    result = client.import_csv("\ufeffname,emails\nBom Person,bom@example.com\n", status=201)
    assert result == {"created": 1, "skipped": []}
    assert client.names() == ["Bom Person"]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_import_needs_text_csv(client, content_type):
    resp = client.request("POST", "/contacts/import", data=b"name\r\nX\r\n",
                          headers={"Content-Type": content_type})
    expect_problem(resp, 415)
    assert client.names() == []


@pytest.mark.parametrize("text, status", [
    ("nickname\r\nX\r\n", 422),                    # no name column
    ("name,shoe_size\r\nX,42\r\n", 422),           # a column that is not the export's
    ("name,name\r\nX,Y\r\n", 422),
    ("name\r\n\"unterminated\r\n", 400),           # not CSV
])
def test_import_refuses_files_it_cannot_read_and_writes_nothing(client, text, status):
    resp = client.request("POST", "/contacts/import", data=text.encode(),
                          headers={"Content-Type": "text/csv"})
    expect_problem(resp, status)
    assert client.names() == []


def test_import_refuses_invalid_utf8(client):
    resp = client.request("POST", "/contacts/import", data=b"name\r\nJos\xe9\r\n",
                          headers={"Content-Type": "text/csv; charset=utf-8"})
    expect_problem(resp, 400)


def test_import_body_is_limited(server, client):
    # A declared length over the limit is refused before a byte of the body is read.
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/contacts/import", {
            "X-User-Id": client.user, "Content-Type": "text/csv",
            "Content-Length": str(2 * 1024 * 1024 + 1)}))
        resp = conn.read_response()
    assert resp.status == 413 and resp.header("Content-Type") == "application/problem+json"
    assert client.names() == []


# --------------------------------------------------------------------------------------------
# vCard export (RFC 6350)


def unfold(text):
    """RFC 6350 §3.2: a CRLF followed by one space or tab continues the line."""
    return re.sub(r"\r\n[ \t]", "", text)


def vcard_unescape(value):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def test_vcard_export(client):
    client.contact("Smith, Ann", emails=["ann@example.com", "ann@work.example"],
                   phones=["+1 (555) 010-4477"], company="Acme, Inc.",
                   notes="Likes tea; not coffee.\nBack\\slash", tags=["work", "a,b"])
    client.contact("Bo")
    resp = client.get("/contacts/export.vcf")
    expect(resp, 200, content_type="text/vcard")
    assert resp.headers["Content-Type"].replace(" ", "").lower() == "text/vcard;charset=utf-8"
    assert resp.headers["Content-Disposition"].startswith("attachment")
    raw = resp.content.decode("utf-8")
    assert raw.endswith("\r\n") and "\n" not in raw.replace("\r\n", "")
    cards = unfold(raw).split("\r\n")[:-1]
    first = cards[:cards.index("END:VCARD") + 1]
    assert first[:2] == ["BEGIN:VCARD", "VERSION:4.0"] and first[-1] == "END:VCARD"
    props = {}
    for line in first[2:-1]:
        name, _, value = line.partition(":")
        props.setdefault(name, []).append(value)
    # sorted by name: "Bo" first
    assert props["FN"] == ["Bo"] and props["N"] == [";Bo;;;"]
    second = cards[cards.index("END:VCARD") + 1:]
    props = {}
    for line in second[2:-1]:
        name, _, value = line.partition(":")
        props.setdefault(name, []).append(value)
    assert second[:2] == ["BEGIN:VCARD", "VERSION:4.0"] and second[-1] == "END:VCARD"
    assert props["FN"] == ["Smith\\, Ann"]
    assert props["N"] == ["Smith;Ann;;;"]
    assert props["EMAIL"] == ["ann@example.com", "ann@work.example"]
    assert props["TEL;VALUE=uri"] == ["tel:+15550104477"]
    assert props["ORG"] == ["Acme\\, Inc."]
    assert props["NOTE"] == ["Likes tea\\; not coffee.\\nBack\\\\slash"]
    assert vcard_unescape(props["NOTE"][0]) == "Likes tea; not coffee.\nBack\\slash"
    assert props["CATEGORIES"] == ["work,a\\,b"]


def test_vcard_lines_are_folded_at_75_octets_without_splitting_characters(client):
    name = "Zoë " + "Ångström-Øster " * 8
    notes = "日本語のメモ" * 30
    client.contact(name, notes=notes)
    raw = client.get("/contacts/export.vcf").content
    for line in raw.split(b"\r\n"):
        assert len(line) <= 75, line
        line.decode("utf-8")        # no multi-octet character was cut in two
    text = unfold(raw.decode("utf-8"))
    assert f"FN:{name.strip()}" in text.split("\r\n")
    assert f"NOTE:{notes}" in text.split("\r\n")
    assert any(line.startswith(b" ") for line in raw.split(b"\r\n"))   # it did fold


# --------------------------------------------------------------------------------------------
# The OpenAPI document: the request bodies it describes are the ones the server checks


def test_openapi_describes_every_contact_body(server):
    schemas = request_schemas(requests.get, server.url)
    assert set(schemas) == {("POST", "/contacts"), ("PUT", "/contacts/{contact_id}"),
                            ("PATCH", "/contacts/{contact_id}")}
    for key, schema in schemas.items():
        assert (schema["type"], schema["additionalProperties"]) == ("object", False), key
        assert set(schema["properties"]) == {"name", "emails", "phones", "company", "notes",
                                             "tags"}, "id, owner, created_at… are not properties"
        assert schema.get("required") == (None if key[0] == "PATCH" else ["name"]), key
        properties = schema["properties"]
        # POST and PUT fill in what is left out; a PATCH leaves it as it is
        empty_text, no_items = ({}, {}) if key[0] == "PATCH" else ({"default": ""}, {"default": []})
        assert properties["name"] == {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}
        assert properties["company"] == {"type": "string", "minLength": 0, "maxLength": 200, **empty_text}
        assert properties["notes"] == {"type": "string", "minLength": 0, "maxLength": 10_000, **empty_text}
        assert properties["emails"] == {"type": "array", "maxItems": 10, "items": {
            "type": "string", "format": "email", "maxLength": 254}, **no_items}
        phones = properties["phones"]
        assert (phones["type"], phones["maxItems"], phones.get("default")) == \
            ("array", 10, no_items.get("default"))
        assert {k: v for k, v in phones["items"].items() if k not in ("description", "pattern")} == {
            "type": "string", "minLength": 1, "maxLength": 50}
        assert "with + and country code" in phones["items"]["description"]
        assert properties["tags"] == {"type": "array", "maxItems": 20, "items": {
            "type": "string", "minLength": 1, "maxLength": 30, "pattern": r"\S",
            "allOf": [{"pattern": "^[^;]*$"}]}, **no_items}


@pytest.mark.parametrize("phone", ["+1 (555) 123-4567", "0044 20 7946 0958", "(00) 44 2079460958",
                                   " +15551234567 ", "+12345678", "+123456789012345", "+1-5-5-5/1.2.3.4",
                                   "+1234567", "+1234567890123456", "+0123456789", "0012345678901234567",
                                   "555 123 4567", "00 0 1234567", "+1 555 CALL NOW", "++15551234567",
                                   "+", "", "  ", "+1 555 123 4567 ext 2"])
def test_the_phone_pattern_accepts_what_the_server_does(server, client, phone):
    pattern = request_schemas(requests.get, server.url)["POST", "/contacts"]["properties"]["phones"]["items"]["pattern"]
    resp = client.post("/contacts", {"name": "Phone", "phones": [phone]})
    assert bool(re.search(pattern, phone)) == (resp.status_code == 201), (phone, resp.status_code)


def test_openapi_says_an_import_is_a_csv_body(server):
    doc = expect_json(requests.get(f"{server.url}/openapi.json", timeout=10), 200)
    body = doc["paths"]["/contacts/import"]["post"]["requestBody"]
    assert body["required"] is True and list(body["content"]) == ["text/csv"]
    assert body["content"]["text/csv"]["schema"]["type"] == "string"
    assert "header" in body["content"]["text/csv"]["schema"]["description"]


def test_the_documented_limits_are_the_enforced_ones(server, client):
    properties = request_schemas(requests.get, server.url)["POST", "/contacts"]["properties"]
    phone_max = properties["phones"]["items"]["maxLength"]
    longest_phone = "+1" + " " * (phone_max - 12) + "5550104477"   # spaces are allowed
    tags = properties["tags"]
    contact = client.contact("n" * properties["name"]["maxLength"], phones=[longest_phone],
                             tags=[f"t{i}" for i in range(tags["maxItems"])])
    assert contact["phones"] == [{"number": "+15550104477", "label": longest_phone}]
    assert len(contact["tags"]) == tags["maxItems"]
    assert re.search(tags["items"]["allOf"][0]["pattern"], "work") and \
        not re.search(tags["items"]["allOf"][0]["pattern"], "a;b")
    for bad, field in [({"name": "n" * (properties["name"]["maxLength"] + 1)}, "name"),
                       ({"phones": [longest_phone + "4"]}, "phones"),
                       ({"tags": ["a;b"]}, "tags"),   # the CSV list separator: the pattern
                       ({"tags": [f"t{i}" for i in range(tags["maxItems"] + 1)]}, "tags"),
                       ({"emails": [f"e{i}@example.com"
                                    for i in range(properties["emails"]["maxItems"] + 1)]},
                        "emails")]:
        problem = expect_problem(client.patch(f"/contacts/{contact['id']}", bad), 422)
        assert error_fields(problem) == {field}, bad
    patched = expect_json(client.patch(f"/contacts/{contact['id']}", {"company": "Acme"}), 200)
    assert patched["company"] == "Acme", "PATCH requires nothing, as its schema says"
