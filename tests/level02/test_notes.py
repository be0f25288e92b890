"""level02/notes.py, black-box: CRUD, validation, ownership, ETag/If-Match, filters, keyset pages.

One server serves the whole module (and one more with `--server threaded` for the race): every
test works as users of its own (a fresh `X-User-Id`), so tests cannot see each other's notes.
"""
import base64
import json
import re
import threading

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, request_schemas
from tests.level02.clients import CollectionClient, error_fields, fresh_user

SCRIPT = "level02/notes.py"
TIMEOUT = 10
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
SORTS = ["-updated_at", "updated_at", "title", "-created_at", "created_at"]


class Api(CollectionClient):
    """One user's keep-alive session on the server, with the notes shortcuts."""

    collection = "/notes"
    defaults = {"title": "a note"}
    note = CollectionClient.read   # alice.note(id)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def alice(server):
    return Api(server, fresh_user("alice"))


@pytest.fixture
def bob(server):
    return Api(server, fresh_user("bob"))


# --------------------------------------------------------------------------------------------
# Creating


def test_create_is_201_with_location_etag_and_the_note(alice):
    resp = alice.post("/notes", json={"title": "  Groceries \n", "body": "  eggs\n  milk ",
                                      "tags": ["Home", "home", " Errands ", "HOME"],
                                      "pinned": True})
    note = expect_json(resp, 201)
    assert note["title"] == "Groceries", "the title is trimmed"
    assert note["body"] == "  eggs\n  milk ", "the body is kept as written"
    assert note["tags"] == ["home", "errands"], "tags are trimmed, lower-cased, de-duplicated"
    assert note["pinned"] is True and note["archived"] is False
    assert note["version"] == 1 and isinstance(note["id"], int)
    assert RFC3339_UTC.fullmatch(note["created_at"]) and note["updated_at"] == note["created_at"]
    assert resp.headers["Location"] == f"/notes/{note['id']}"
    assert resp.headers["ETag"] == '"1"'
    again = alice.get(resp.headers["Location"])
    assert expect_json(again, 200) == note
    assert again.headers["ETag"] == '"1"'


def test_defaults_fill_what_is_not_sent(alice):
    note = alice.create(title="just a title")
    assert (note["body"], note["tags"], note["pinned"], note["archived"]) == ("", [], False, False)


def test_validation_names_every_bad_field_at_once(alice):
    problem = expect_problem(alice.post("/notes", json={
        "title": "   ", "body": 5, "tags": ["ok", ""], "pinned": "yes"}), 422)
    assert error_fields(problem) == {"title", "body", "tags", "pinned"}
    problem = expect_problem(alice.post("/notes", json={"body": "no title"}), 422)
    assert error_fields(problem) == {"title"}


@pytest.mark.parametrize("fields, bad", [
    ({"title": "x" * 201}, "title"),
    ({"title": "t", "body": "b" * 100_001}, "body"),
    ({"title": "t", "tags": [f"t{i}" for i in range(11)]}, "tags"),
    ({"title": "t", "tags": ["x" * 31]}, "tags"),
    ({"title": "t", "tags": "work"}, "tags"),
    ({"title": "t", "pinned": 1}, "pinned"),
    ({"title": None}, "title"),
])
def test_limits_and_types(alice, fields, bad):
    assert error_fields(expect_problem(alice.post("/notes", json=fields), 422)) == {bad}


def test_limits_are_inclusive(alice):
    note = alice.create(title="x" * 200, body="b" * 100_000,
                        tags=["y" * 30] + [f"t{i}" for i in range(9)])
    assert len(note["title"]) == 200 and len(note["tags"]) == 10
    assert alice.create(tags=["a", "A", "b"])["tags"] == ["a", "b"]


@pytest.mark.parametrize("tags", [
    pytest.param([f"t{i}" for i in range(10)] + ["T0"], id="eleven-ten-once-de-duplicated"),
    pytest.param(["home"] * 100_000, id="one-tag-100000-times"),
])
def test_the_tag_limit_bounds_the_list_as_sent(alice, tags):
    """At most 10 tags as sent, duplicates included: the raw list is bounded before any work
    is done on it (a body of 100,000 copies of one tag is refused, not de-duplicated)."""
    assert error_fields(expect_problem(alice.post("/notes", json={"title": "t", "tags": tags}),
                                       422)) == {"tags"}


@pytest.mark.parametrize("field", ["id", "owner", "version", "created_at", "updated_at",
                                   "archived", "colour"])
def test_server_owned_and_unknown_fields_are_refused(alice, field):
    """Mass assignment: a client must not be able to set the owner, the id, the version…"""
    problem = expect_problem(alice.post("/notes", json={"title": "t", field: "x"}), 422)
    assert error_fields(problem) == {field}
    note = alice.create()
    for method in ("PATCH", "PUT"):
        problem = expect_problem(alice.request(method, f"/notes/{note['id']}",
                                            json={"title": "t", field: "x"}), 422)
        assert error_fields(problem) == {field}
    assert alice.note(note["id"]) == note, "a refused write changed nothing"


def test_a_body_that_is_not_a_json_object(alice):
    expect_problem(alice.post("/notes", json=["title"]), 422)
    expect_problem(alice.post("/notes", data=b"{nope",
                              headers={"Content-Type": "application/json"}), 400)
    expect_problem(alice.post("/notes", data=b"title=x",
                              headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)


# --------------------------------------------------------------------------------------------
# Who is asking


@pytest.mark.parametrize("user", [None, "", "has space", "x" * 65, "émile", "a/b", "a.b"])
@pytest.mark.parametrize("method, path", [("GET", "/notes"), ("POST", "/notes"),
                                          ("GET", "/notes/1"), ("DELETE", "/notes/1")])
def test_missing_or_malformed_user_is_a_401_naming_the_scheme(server, user, method, path):
    headers = {} if user is None else {"X-User-Id": user.encode("utf-8")}
    resp = requests.request(method, server.url + path, headers=headers, json={"title": "t"},
                            timeout=TIMEOUT)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"] == "X-User-Id"


def test_user_ids_of_64_characters_are_fine(server):
    api = Api(server, "A-z_09" + "x" * 58)
    assert api.create()["title"] == "a note"


def test_another_users_note_is_a_404_for_every_verb(alice, bob):
    note = alice.create(title="private", tags=["secret"])
    path = f"/notes/{note['id']}"
    missing = expect_problem(bob.get("/notes/999999999"), 404)
    for method, suffix, body in [("GET", "", None), ("HEAD", "", None),
                                 ("PATCH", "", {"title": "mine"}), ("PUT", "", {"title": "mine"}),
                                 ("DELETE", "", None), ("POST", "/archive", None),
                                 ("POST", "/unarchive", None)]:
        resp = bob.request(method, path + suffix, json=body)
        assert resp.status_code == 404, f"{method} {path + suffix} as another user"
        if method != "HEAD":
            problem = expect_problem(resp, 404)
            assert problem["title"] == missing["title"] and "private" not in resp.text
    # With a matching If-Match too: the tag is no key to somebody else's note.
    expect_problem(bob.patch(path, json={"title": "mine"}, headers={"If-Match": '"1"'}), 404)
    assert bob.list()["items"] == [] and bob.list(tag="secret", archived="true")["items"] == []
    assert alice.note(note["id"]) == note, "nothing another user did changed the note"


def test_the_same_id_space_is_not_shared_knowledge(alice, bob):
    """Each user sees only their own notes, whoever created more."""
    mine = {alice.create(title=f"a{i}")["id"] for i in range(3)}
    theirs = {bob.create(title=f"b{i}")["id"] for i in range(2)}
    assert {n["id"] for n in alice.all_pages()} == mine
    assert {n["id"] for n in bob.all_pages()} == theirs


# --------------------------------------------------------------------------------------------
# Reading, changing, deleting one note


def test_patch_changes_only_the_fields_sent(alice):
    note = alice.create(title="Title", body="Body", tags=["a"], pinned=True)
    resp = alice.patch(f"/notes/{note['id']}", json={"body": "New body"})
    changed = expect_json(resp, 200)
    assert changed["body"] == "New body"
    assert (changed["title"], changed["tags"], changed["pinned"]) == ("Title", ["a"], True)
    assert changed["version"] == 2 and resp.headers["ETag"] == '"2"'
    assert changed["created_at"] == note["created_at"]
    assert changed["updated_at"] > note["updated_at"]
    assert alice.note(note["id"]) == changed


def test_patch_validates_what_it_is_given(alice):
    note = alice.create()
    resp = alice.patch(f"/notes/{note['id']}", json={"title": " ", "tags": [1]})
    problem = expect_problem(resp, 422)
    assert error_fields(problem) == {"title", "tags"}
    problem = expect_problem(alice.patch(f"/notes/{note['id']}", json={"title": None}), 422)
    assert error_fields(problem) == {"title"}
    assert alice.note(note["id"]) == note


def test_updated_at_and_version_move_on_every_change(alice):
    note = alice.create(title="v1")
    seen = [note["updated_at"]]
    for i in range(2, 7):  # back to back, many within one second
        note = expect_json(alice.patch(f"/notes/{note['id']}", json={"title": f"v{i}"}), 200)
        assert note["version"] == i
        seen.append(note["updated_at"])
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_a_write_that_changes_nothing_keeps_the_version(alice):
    note = alice.create(title="same", tags=["x"])
    resp = alice.patch(f"/notes/{note['id']}", json={"title": " same ", "tags": ["X"]})
    assert expect_json(resp, 200) == note and resp.headers["ETag"] == '"1"'


def test_put_replaces_and_what_is_left_out_gets_its_default(alice):
    note = alice.create(title="Old", body="old body", tags=["a", "b"], pinned=True)
    resp = alice.put(f"/notes/{note['id']}", json={"title": "  New  "})
    replaced = expect_json(resp, 200)
    assert (replaced["title"], replaced["body"], replaced["tags"], replaced["pinned"]) == \
        ("New", "", [], False)
    assert replaced["id"] == note["id"] and replaced["created_at"] == note["created_at"]
    assert replaced["version"] == 2 and resp.headers["ETag"] == '"2"'
    problem = expect_problem(alice.put(f"/notes/{note['id']}", json={"body": "no title"}), 422)
    assert error_fields(problem) == {"title"}


def test_delete_is_204_then_the_note_is_gone(alice):
    note = alice.create()
    resp = alice.delete(f"/notes/{note['id']}")
    expect(resp, 204)
    assert resp.content == b""
    expect_problem(alice.get(f"/notes/{note['id']}"), 404)
    expect_problem(alice.delete(f"/notes/{note['id']}"), 404)
    assert note["id"] not in {n["id"] for n in alice.all_pages()}


def test_ids_are_not_reused_after_a_delete(alice):
    first = alice.create()
    expect(alice.delete(f"/notes/{first['id']}"), 204)
    assert alice.create()["id"] > first["id"]


@pytest.mark.parametrize("path, status", [("/notes/abc", 400), ("/notes/1.5", 400),
                                          ("/notes/0", 404), ("/notes/-1", 404),
                                          ("/notes/99999999999999999999999", 404)])
def test_ids_that_cannot_be_a_note(alice, path, status):
    expect_problem(alice.get(path), status)
    expect_problem(alice.patch(path, json={"title": "x"}), status)


# --------------------------------------------------------------------------------------------
# ETag and If-Match


@pytest.mark.parametrize("method, suffix, body", [
    ("PATCH", "", {"title": "changed"}), ("PUT", "", {"title": "changed"}),
    ("DELETE", "", None), ("POST", "/archive", None)])
def test_a_stale_if_match_is_a_412_and_nothing_changes(alice, method, suffix, body):
    note = alice.create(title="original")
    current = expect_json(alice.patch(f"/notes/{note['id']}", json={"title": "second"}), 200)
    for stale in ('"1"', 'W/"2"', '"2x"', '"1", "3"'):
        resp = alice.request(method, f"/notes/{note['id']}{suffix}", json=body,
                          headers={"If-Match": stale})
        expect_problem(resp, 412)
    assert alice.note(note["id"]) == current, "a 412 changed nothing"
    resp = alice.request(method, f"/notes/{note['id']}{suffix}", json=body,
                      headers={"If-Match": '"2"'})
    expect(resp, 204 if method == "DELETE" else 200)


def test_if_match_star_and_a_list_with_the_current_tag_go_through(alice):
    note = alice.create()
    expect_json(alice.patch(f"/notes/{note['id']}", json={"pinned": True},
                            headers={"If-Match": "*"}), 200)
    changed = expect_json(alice.patch(f"/notes/{note['id']}", json={"pinned": False},
                                      headers={"If-Match": '"7", "2"'}), 200)
    assert changed["version"] == 3


@pytest.fixture(scope="module")
def threaded(start_server_module):
    return start_server_module(SCRIPT, "--server", "threaded")


def test_two_writers_with_the_same_if_match_exactly_one_wins(threaded):
    """The lost-update race, for real: handlers on many threads at once, all holding the same
    ETag. The version check is inside the write, so one wins and the others get a 412."""
    owner = Api(threaded)
    for round_ in range(5):
        note = owner.create(title="race")
        writers = 8
        barrier = threading.Barrier(writers)
        results = [None] * writers

        def write(i):
            api = Api(threaded, owner.user)  # a connection of its own
            barrier.wait()
            results[i] = api.patch(f"/notes/{note['id']}", json={"title": f"writer {i}"},
                                   headers={"If-Match": '"1"'})

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] + [412] * (writers - 1), f"round {round_}: {statuses}"
        winner = next(r.json() for r in results if r.status_code == 200)
        final = owner.note(note["id"])
        assert final["version"] == 2 and final["title"] == winner["title"]


# --------------------------------------------------------------------------------------------
# Archive


def test_archived_notes_leave_the_list_and_come_back(alice):
    kept = alice.create(title="kept")
    old = alice.create(title="old")
    resp = alice.post(f"/notes/{old['id']}/archive")
    archived = expect_json(resp, 200)
    assert archived["archived"] is True and archived["version"] == 2
    assert resp.headers["ETag"] == '"2"' and archived["updated_at"] > old["updated_at"]
    assert [n["id"] for n in alice.all_pages()] == [kept["id"]]
    assert [n["id"] for n in alice.all_pages(archived="true")] == [old["id"]]
    assert [n["id"] for n in alice.all_pages(archived="false")] == [kept["id"]]
    assert alice.note(old["id"])["archived"] is True, "an archived note can still be read"
    # Archiving again changes nothing.
    assert expect_json(alice.post(f"/notes/{old['id']}/archive"), 200)["version"] == 2
    back = expect_json(alice.post(f"/notes/{old['id']}/unarchive"), 200)
    assert back["archived"] is False and back["version"] == 3
    assert {n["id"] for n in alice.all_pages()} == {kept["id"], old["id"]}


def test_put_leaves_the_archived_flag_alone(alice):
    note = alice.create()
    expect_json(alice.post(f"/notes/{note['id']}/archive"), 200)
    replaced = expect_json(alice.put(f"/notes/{note['id']}", json={"title": "t"}), 200)
    assert replaced["archived"] is True


# --------------------------------------------------------------------------------------------
# Filters


def titles(items):
    return [item["title"] for item in items]


def test_q_finds_a_case_insensitive_substring_of_title_or_body(alice):
    alice.create(title="Shopping LIST", body="")
    alice.create(title="Ideas", body="a long list of things")
    alice.create(title="Other", body="nothing")
    assert sorted(titles(alice.all_pages(q="list"))) == ["Ideas", "Shopping LIST"]
    assert titles(alice.all_pages(q="OTHER")) == ["Other"]
    assert alice.all_pages(q="absent") == []


@pytest.mark.parametrize("q, expected", [
    ("%", ["100% sure"]),
    ("100%", ["100% sure"]),
    ("_", ["snake_case"]),
    ("e_c", ["snake_case"]),
    ("\\", ["back\\slash"]),
    ("%_%", []),
])
def test_like_wildcards_in_q_match_literally(server, q, expected):
    """`%` and `_` are LIKE's wildcards: unescaped, "%" would match every note."""
    api = Api(server)
    for title in ("100% sure", "1000 things", "snake_case", "snakeXcase", "back\\slash", "plain"):
        api.create(title=title)
    assert sorted(titles(api.all_pages(q=q))) == expected


def test_tag_filter(alice):
    alice.create(title="both", tags=["work", "urgent"])
    alice.create(title="work only", tags=["Work"])
    alice.create(title="none")
    assert sorted(titles(alice.all_pages(tag="work"))) == ["both", "work only"]
    assert titles(alice.all_pages(tag=" WORK ", q="only")) == ["work only"]
    assert titles(alice.all_pages(tag=["work", "urgent"])) == ["both"], "several tags: all of them"
    assert alice.all_pages(tag="wor") == [], "a tag matches whole, not as a substring"


def test_pinned_filter(alice):
    alice.create(title="p", pinned=True)
    alice.create(title="n")
    assert titles(alice.all_pages(pinned="true")) == ["p"]
    assert titles(alice.all_pages(pinned="false")) == ["n"]


@pytest.mark.parametrize("params, field", [
    ({"sort": "newest"}, "sort"), ({"sort": "TITLE"}, "sort"),
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"pinned": "yes"}, "pinned"), ({"pinned": "1"}, "pinned"), ({"archived": "True"}, "archived"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "W10"}, "cursor"),
    ({"tag": "x" * 31}, "tag"), ({"q": "x" * 201}, "q"),
])
def test_bad_query_parameters_are_a_400_naming_them(alice, params, field):
    problem = expect_problem(alice.get("/notes", params=params), 400)
    assert error_fields(problem) == {field}


def crafted_cursor(values):
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


@pytest.mark.parametrize("values", [
    ["created_at", "2026-01-01T00:00:00.000000Z"],             # one value short
    ["created_at", "2026-01-01T00:00:00.000000Z", "7"],        # an id that is text
    ["created_at", "2026-01-01T00:00:00.000000Z", 2**70],      # beyond sqlite's integers
    ["created_at", "\ud800", 7],                               # a lone surrogate
    {"sort": "created_at"},
])
def test_a_crafted_cursor_is_a_400_not_a_500(alice, values):
    """A cursor is opaque, but it is still client input."""
    resp = alice.get("/notes", params={"sort": "created_at", "cursor": crafted_cursor(values)})
    assert error_fields(expect_problem(resp, 400)) == {"cursor"}


def test_text_that_is_not_unicode_is_a_422_not_a_500(alice):
    """JSON can spell a lone surrogate ("\\ud800"), which no database can store as text."""
    resp = alice.post("/notes", json={"title": "a\ud800b", "tags": ["\udfff"]})
    assert error_fields(expect_problem(resp, 422)) == {"title", "tags"}


def test_a_cursor_from_another_sort_is_a_400(alice):
    for i in range(3):
        alice.create(title=f"n{i}")
    cursor = alice.list(sort="created_at", limit=1)["next_cursor"]
    assert cursor
    assert len(alice.list(sort="created_at", limit=1, cursor=cursor)["items"]) == 1
    problem = expect_problem(alice.get("/notes", params={"sort": "title", "cursor": cursor}), 400)
    assert error_fields(problem) == {"cursor"}


# --------------------------------------------------------------------------------------------
# Order and pages


def test_the_default_order_is_pinned_first_then_most_recently_changed(alice):
    a = alice.create(title="a")
    b = alice.create(title="b", pinned=True)
    c = alice.create(title="c")
    d = alice.create(title="d", pinned=True)
    expect_json(alice.patch(f"/notes/{a['id']}", json={"body": "touched"}), 200)
    assert titles(alice.all_pages()) == ["d", "b", "a", "c"]
    assert titles(alice.all_pages(sort="-updated_at")) == ["d", "b", "a", "c"]
    assert titles(alice.all_pages(sort="updated_at")) == ["b", "c", "d", "a"]
    assert titles(alice.all_pages(sort="created_at")) == ["a", "b", "c", "d"]
    assert titles(alice.all_pages(sort="-created_at")) == ["d", "c", "b", "a"]
    assert [n["id"] for n in alice.all_pages(sort="created_at")] == \
        [a["id"], b["id"], c["id"], d["id"]]


def test_title_order_ignores_case_and_breaks_ties_by_id(alice):
    for title in ("banana", "Apple", "cherry", "apple"):
        alice.create(title=title)
    assert titles(alice.all_pages(sort="title", limit=1)) == ["Apple", "apple", "banana", "cherry"]


def test_limit_default_and_maximum(server):
    api = Api(server)
    for i in range(25):
        api.create(title=f"n{i}")
    first = api.list()
    assert len(first["items"]) == 20 and first["next_cursor"]
    rest = api.list(cursor=first["next_cursor"])
    assert len(rest["items"]) == 5 and rest["next_cursor"] is None
    assert len(api.list(limit=100)["items"]) == 25
    assert api.list(limit=25)["next_cursor"] is None, "no cursor when nothing is left"


def sort_key(sort, note):
    name = sort.lstrip("-")
    if name == "title":
        return (note["title"].lower(), note["id"])
    if sort == "-updated_at":
        return (note["pinned"], note["updated_at"], note["id"])
    return (note[name], note["id"])


@pytest.mark.parametrize("sort", SORTS)
def test_pages_stay_correct_while_notes_are_added_and_deleted(server, sort):
    """Keyset pagination: between two pages, notes are created and deleted. Nothing is shown
    twice, nothing that was there all along is skipped, and the filters still apply."""
    api = Api(server)
    names = ["kiwi", "Fig", "apple", "date", "Banana", "lime", "grape", "cherry", "Elder",
             "honeydew", "jackfruit", "Mango"]
    start = [api.create(title=name, tags=["fruit"], pinned=(i % 3 == 0))
             for i, name in enumerate(names)]
    api.create(title="not fruit")                    # filtered out throughout
    filters = {"sort": sort, "tag": "fruit", "limit": 3}

    body = api.list(**filters)
    seen = body["items"]
    seen_ids = {n["id"] for n in seen}
    unseen = [n for n in start if n["id"] not in seen_ids]
    cursor_row = seen[-1]["id"]  # the row the cursor was made from: deleted too
    deleted = {cursor_row, unseen[0]["id"], unseen[-1]["id"]}
    for note_id in deleted:
        expect(api.delete(f"/notes/{note_id}"), 204)
    added = [api.create(title=name, tags=["fruit"], pinned=(i == 0))
             for i, name in enumerate(["aaa", "zzz", "nectarine"])]

    cursor = body["next_cursor"]
    while cursor:
        body = api.list(**filters, cursor=cursor)
        seen += body["items"]
        cursor = body["next_cursor"]

    ids = [n["id"] for n in seen]
    assert len(ids) == len(set(ids)), f"shown twice: {ids}"
    survivors = {n["id"] for n in start} - deleted
    assert survivors <= set(ids), f"skipped: {survivors - set(ids)}"
    assert not (deleted - {cursor_row}) & set(ids), "a deleted note was shown"
    assert set(ids) <= survivors | {cursor_row} | {n["id"] for n in added}
    keys = [sort_key(sort, n) for n in seen]
    assert keys == sorted(keys, reverse=sort.startswith("-")), f"{sort}: out of order"


# --------------------------------------------------------------------------------------------
# Durability


def test_notes_survive_a_restart(start_server):
    first = start_server(SCRIPT)
    api = Api(first)
    note = api.create(title="kept", tags=["x"])
    first.stop()
    second = start_server(SCRIPT, db=first.db_path)
    assert Api(second, api.user).note(note["id"]) == note


# --------------------------------------------------------------------------------------------
# The OpenAPI document: the request bodies it describes are the ones the server checks


NOTE_PROPERTIES = {  # as a PATCH sees them; POST and PUT also show the defaults they fill in
    "title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},
    "body": {"type": "string", "minLength": 0, "maxLength": 100_000},
    "tags": {"type": "array", "maxItems": 10,
             "items": {"type": "string", "minLength": 1, "maxLength": 30, "pattern": r"\S"}},
    "pinned": {"type": "boolean"},
}
NOTE_DEFAULTS = {"body": "", "tags": [], "pinned": False}


def test_openapi_describes_every_note_body(server):
    schemas = request_schemas(requests.get, server.url)
    assert set(schemas) == {("POST", "/notes"), ("PUT", "/notes/{note_id}"),
                            ("PATCH", "/notes/{note_id}")}, "archive and unarchive take no body"
    for key in (("POST", "/notes"), ("PUT", "/notes/{note_id}")):
        properties = {name: {**schema, **({"default": NOTE_DEFAULTS[name]} if name in NOTE_DEFAULTS else {})}
                      for name, schema in NOTE_PROPERTIES.items()}
        assert schemas[key] == {"type": "object", "additionalProperties": False,
                                "properties": properties, "required": ["title"]}, key
    # PATCH: the same fields, none required; server-owned ones (archived, version…) are absent.
    assert schemas["PATCH", "/notes/{note_id}"] == {"type": "object", "additionalProperties": False,
                                                    "properties": NOTE_PROPERTIES}


def test_the_documented_limits_are_the_enforced_ones(server, alice):
    fields = request_schemas(requests.get, server.url)["POST", "/notes"]["properties"]
    title, tags = fields["title"]["maxLength"], fields["tags"]
    note = alice.create(title="t" * title, tags=[f"{i:0{tags['items']['maxLength']}d}"
                                                   for i in range(tags["maxItems"])])
    assert len(note["title"]) == title and len(note["tags"]) == tags["maxItems"]
    for bad, field in [({"title": "t" * (title + 1)}, "title"),
                       ({"tags": [f"t{i}" for i in range(tags["maxItems"] + 1)]}, "tags"),
                       ({"tags": ["t" * (tags["items"]["maxLength"] + 1)]}, "tags"),
                       ({"pinned": "true"}, "pinned")]:
        problem = expect_problem(alice.patch(f"/notes/{note['id']}", json=bad), 422)
        assert error_fields(problem) == {field}
    patched = expect_json(alice.patch(f"/notes/{note['id']}", json={"pinned": True}), 200)
    assert patched["pinned"] is True, "PATCH requires nothing, as its schema says"
