"""level04/search_api.py, black-box (spec/level04.md §15): documents indexed with FTS5, a query
language that no input can turn into raw FTS5 syntax, bm25 ranking, safe highlighted snippets,
facets over the whole result set, filters, keyset pages over ranked hits, bulk NDJSON in one
transaction, and a trigram "did you mean".

The tests share one server. The index is global, so each test puts a word of its own (`tag`)
in its documents and searches with it: no test sees another's documents.
"""
import json
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem

SCRIPT = "level04/search_api.py"
TIMEOUT = 10
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def word():
    """A word no other test's documents hold (letters only, so FTS5 indexes it as one word)."""
    return "zz" + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def document(word, **fields):
    return {"title": f"{word} title", "body": "plain body", "category": "misc",
            "published_at": "2026-03-01T12:00:00Z", **fields}


def create(server, **fields):
    return expect_json(requests.post(f"{server.url}/documents", json=fields, timeout=TIMEOUT), 201)


def search(server, **params):
    return expect_json(requests.get(f"{server.url}/search", params=params, timeout=TIMEOUT), 200)


def ids(answer):
    return [hit["id"] for hit in answer["items"]]


def bulk(server, lines, headers=NDJSON):
    body = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    return requests.post(f"{server.url}/documents/bulk", data=body.encode(), headers=headers,
                         timeout=60)


def every_page(server, **params):
    pages, cursor = [], None
    while True:
        answer = search(server, **params, **({"cursor": cursor} if cursor else {}))
        pages.append(answer)
        cursor = answer["next_cursor"]
        if cursor is None:
            return [hit for answer in pages for hit in answer["items"]], len(pages)


# --------------------------------------------------------------------------------------------
# Documents: CRUD with the index kept in step


def test_create_read_replace_delete_keep_the_index_in_step(server, word):
    doc = create(server, **document(word, id=f"{word}-1", title=f"{word} apples", price="12.5",
                                    tags=["Fruit", "fruit", "Red"],
                                    published_at="2026-03-01T09:30:00+01:00"))
    assert doc["price"] == "12.50" and doc["tags"] == ["fruit", "red"]
    assert doc["published_at"] == "2026-03-01T08:30:00Z" and doc["version"] == 1
    resp = requests.get(f"{server.url}/documents/{word}-1", timeout=TIMEOUT)
    assert expect_json(resp, 200) == doc and resp.headers["ETag"] == '"1"'
    assert ids(search(server, q=f"{word} apples")) == [f"{word}-1"]

    replacement = document(word, title=f"{word} pears")
    stale = requests.put(f"{server.url}/documents/{word}-1", json=replacement,
                         headers={"If-Match": '"7"'}, timeout=TIMEOUT)
    expect_problem(stale, 412)
    resp = requests.put(f"{server.url}/documents/{word}-1", json=replacement,
                        headers={"If-Match": '"1"'}, timeout=TIMEOUT)
    assert expect_json(resp, 200)["version"] == 2 and resp.headers["ETag"] == '"2"'
    assert ids(search(server, q=f"{word} apples")) == []
    assert ids(search(server, q=f"{word} pears")) == [f"{word}-1"]

    expect(requests.delete(f"{server.url}/documents/{word}-1", timeout=TIMEOUT), 204)
    assert search(server, q=word)["total"] == 0
    expect_problem(requests.get(f"{server.url}/documents/{word}-1", timeout=TIMEOUT), 404)


def test_the_tag_filter_and_facet_follow_a_replaced_and_a_deleted_document(server, word):
    url = f"{server.url}/documents/{word}-1"
    create(server, **document(word, id=f"{word}-1", tags=[word, "old"]))
    assert search(server, tag=word)["facets"]["tags"] == {word: 1, "old": 1}
    resp = requests.put(url, json=document(word, tags=[word, "new"]), headers={"If-Match": '"1"'},
                        timeout=TIMEOUT)
    expect_json(resp, 200)
    assert ids(search(server, q=word, tag="old")) == []
    assert ids(search(server, q=word, tag="new")) == [f"{word}-1"]
    assert search(server, tag=word)["facets"]["tags"] == {word: 1, "new": 1}
    expect(requests.delete(url, headers={"If-Match": '"2"'}, timeout=TIMEOUT), 204)
    answer = search(server, tag=word)
    assert answer["total"] == 0 and answer["facets"] == {"category": {}, "tags": {}}


def test_a_document_without_id_gets_one_and_a_taken_id_is_a_409(server, word):
    doc = create(server, **document(word))
    resp = requests.get(f"{server.url}/documents/{doc['id']}", timeout=TIMEOUT)
    assert expect_json(resp, 200)["id"] == doc["id"]
    again = requests.post(f"{server.url}/documents", json=document(word, id=doc["id"]),
                          timeout=TIMEOUT)
    expect_problem(again, 409)


def test_a_bad_document_is_one_422_naming_every_field(server, word):
    resp = requests.post(f"{server.url}/documents", timeout=TIMEOUT, json={
        "title": "", "body": "b", "category": "c", "price": 12.5,
        "published_at": "2026-02-30T00:00:00Z", "score": 3, "id": "no spaces"})
    problem = expect_problem(resp, 422)
    assert {e["field"] for e in problem["errors"]} == {"title", "price", "published_at",
                                                       "score", "id"}


# --------------------------------------------------------------------------------------------
# Bulk NDJSON: one transaction, every bad line named


def test_bulk_import_stores_every_line(server, word):
    lines = [document(word, id=f"{word}-{n}", body=f"line {n}") for n in range(1, 51)]
    answer = expect_json(bulk(server, lines), 200)
    assert answer["created"] == 50 and answer["ids"][0] == f"{word}-1"
    assert search(server, q=word)["total"] == 50


def test_a_batch_with_bad_lines_stores_nothing_and_names_each_line(server, word):
    lines = [document(word, id=f"{word}-a"), "not json\n", document(word, price="1.234"),
             "\n", "[1, 2]\n", document(word, id=f"{word}-a")]
    problem = expect_problem(bulk(server, lines), 422)
    by_line = {(e["line"], e.get("field")) for e in problem["errors"]}
    assert by_line == {(2, None), (3, "price"), (5, None), (6, "id")}, problem
    assert search(server, q=word)["total"] == 0


def test_a_batch_that_reuses_a_stored_id_stores_nothing(server, word):
    create(server, **document(word, id=f"{word}-taken"))
    lines = [document(word, id=f"{word}-new"), document(word, id=f"{word}-taken")]
    problem = expect_problem(bulk(server, lines), 422)
    assert [(e["line"], e["field"]) for e in problem["errors"]] == [(2, "id")]
    assert ids(search(server, q=word)) == [f"{word}-taken"]


def test_bulk_limits_and_media_type(server, word):
    expect_problem(bulk(server, ["{}\n"] * 10_001), 413)
    too_big = requests.post(f"{server.url}/documents/bulk", data=b" " * (16 * 1024 * 1024 + 1),
                            headers=NDJSON, timeout=60)
    expect_problem(too_big, 413)
    expect_problem(bulk(server, [document(word)], headers={"Content-Type": "application/json"}),
                   415)
    assert search(server, q=word)["total"] == 0


# --------------------------------------------------------------------------------------------
# The query language


@pytest.fixture
def library(server, word):
    docs = {
        "tea": (f"{word} Green tea guide", "How to brew green tea without boiling it"),
        "cake": (f"{word} Lemon cake", "A cake with a green glaze, served with tea"),
        "coffee": (f"{word} Coffee brewing", "Espresso and filter coffee"),
        "bread": (f"{word} Sourdough", "Bread from a starter"),
    }
    lines = [document(word, id=f"{word}-{key}", title=title, body=body)
             for key, (title, body) in docs.items()]
    expect_json(bulk(server, lines), 200)
    return lambda q, **params: {i.removeprefix(f"{word}-")
                                for i in ids(search(server, q=f"{word} {q}", **params))}


def test_words_phrases_prefixes_exclusions_and_or(library):
    assert library("green tea") == {"tea", "cake"}          # every word, anywhere
    assert library('"green tea"') == {"tea"}                 # the words in this order
    assert library("brew*") == {"tea", "coffee"}             # brew, brewing
    assert library("tea -cake") == {"tea"}
    assert library('green -"lemon cake"') == {"tea"}
    assert library("coffee OR sourdough") == {"coffee", "bread"}
    assert library("or coffee") == set()                     # lower-case `or` is a word


def test_only_exclusions_search_everything_else(server, word, library):
    answer = search(server, q=f"-{word}")
    assert not any(hit["id"].startswith(word) for hit in answer["items"])
    assert answer["total"] >= 0


HOSTILE = ['"', '""', "NEAR(", "NEAR(a b)", "*", "**", "AND(", "a AND", "NOT", "OR", "OR OR",
           "(", ")", "{a b}", "title:tea", "^tea", "tea:", '"unbalanced tea', "- -- ---",
           "-*", "a*b*", "\x00", "'; DROP TABLE documents; --", "ü*", "🍵", "+tea", "tea)",
           'col:"x"', "NEAR(tea cake, 2)", "tea NOT cake", "a" * 500]


@pytest.mark.parametrize("q", HOSTILE)
def test_no_query_is_raw_fts5_syntax_or_a_server_error(server, q):
    answer = search(server, q=q)
    assert set(answer) == {"items", "next_cursor", "total", "facets", "did_you_mean"}


def test_fts5_operators_are_searched_as_words(library):
    assert library("AND(") == {"coffee"}                    # the word "and", as a word
    assert library("NEAR(green tea)") == set()              # three words: near is in none
    assert library('"green tea') == {"tea"}                  # an open quote runs to the end
    assert library("*") == {"tea", "cake", "coffee", "bread"}  # a lone * means nothing


def test_a_query_too_long_is_a_400(server):
    problem = expect_problem(requests.get(f"{server.url}/search", params={"q": "a" * 501},
                                          timeout=TIMEOUT), 400)
    assert problem["errors"][0]["field"] == "q"


# --------------------------------------------------------------------------------------------
# Ranking, snippets, facets


def test_score_is_higher_for_better_matches_and_orders_the_hits(server, word):
    create(server, **document(word, id=f"{word}-body", title="unrelated",
                              body=f"{word} mentioned once in a long body " + "filler " * 50))
    create(server, **document(word, id=f"{word}-title", title=f"{word} {word}"))
    answer = search(server, q=word)
    assert ids(answer) == [f"{word}-title", f"{word}-body"]
    assert answer["items"][0]["score"] > answer["items"][1]["score"]


def test_snippets_escape_the_text_and_mark_only_the_matches(server, word):
    create(server, **document(word, id=f"{word}-html", title="markup",
                              body=f"<script>x</script> \x02fake\x03 <mark>{word}</mark> & more"))
    snippet = search(server, q=word)["items"][0]["snippet"]
    assert "<script>" not in snippet and "&lt;script&gt;" in snippet
    assert f"&lt;mark&gt;<mark>{word}</mark>&lt;/mark&gt;" in snippet
    assert snippet.count("<mark>") == 1 and "&amp;" in snippet


def test_facets_count_the_whole_result_set_not_the_page(server, word):
    lines = [document(word, category="books" if n % 3 else "films", tags=["a", f"t{n % 2}"])
             for n in range(7)]
    expect_json(bulk(server, lines), 200)
    answer = search(server, q=word, limit=2)
    assert len(answer["items"]) == 2 and answer["total"] == 7
    assert answer["facets"] == {"category": {"books": 4, "films": 3},
                                "tags": {"a": 7, "t0": 4, "t1": 3}}


def test_a_facet_lists_its_20_most_frequent_values_first_ties_by_name(server, word):
    # 24 tags on 5 documents: 6 tags on four, 10 on three, 8 on two, so the 20 listed end in a
    # tie. The tags are first stored in the reverse of their names' order: a tie must still
    # come out by name.
    counts = {f"t{k:02d}": 4 if k < 6 else 3 if k < 16 else 2 for k in range(24)}
    tags_of = [[] for _ in range(5)]
    for i, (name, count) in enumerate(sorted(counts.items(), reverse=True)):
        for j in range(count):
            tags_of[(i + j) % 5].append(name)
    expect_json(bulk(server, [document(word, tags=tags) for tags in tags_of]), 200)
    listed = search(server, q=word)["facets"]["tags"]
    assert list(listed.items()) == sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))[:20]


# --------------------------------------------------------------------------------------------
# Filters and sorts


@pytest.fixture
def priced(server, word):
    rows = [("a", "10.00", "2026-03-01T00:00:00Z", "x"), ("b", "12.50", "2026-03-01T23:59:59Z", "y"),
            ("c", "9.99", "2026-03-02T00:00:00Z", "x"), ("d", None, "2026-02-28T23:59:59Z", "y")]
    expect_json(bulk(server, [document(word, id=f"{word}-{key}", price=price, published_at=at,
                                       category=cat, tags=[cat.upper()])
                              for key, price, at, cat in rows]), 200)
    return lambda **params: [i.removeprefix(f"{word}-")
                             for i in ids(search(server, q=word, **params))]


def test_filters(priced):
    assert sorted(priced(category="x")) == ["a", "c"]
    assert sorted(priced(tag="Y")) == ["b", "d"]                       # tags compare lower-cased
    assert sorted(priced(min_price="10", max_price="12.50")) == ["a", "b"]
    assert sorted(priced(**{"from": "2026-03-01", "to": "2026-03-01"})) == ["a", "b"]  # whole day
    assert sorted(priced(to="2026-03-01T01:00:00+01:00")) == ["a", "d"]
    assert priced(min_price="13", max_price="1") == []


@pytest.mark.parametrize("params", [{"min_price": "1.234"}, {"max_price": "1e3"},
                                    {"from": "2026-02-30"}, {"to": "yesterday"},
                                    {"sort": "score"}, {"limit": "0"}, {"cursor": "garbage"}])
def test_bad_filters_are_a_400_naming_the_parameter(server, params):
    problem = expect_problem(requests.get(f"{server.url}/search", params=params,
                                          timeout=TIMEOUT), 400)
    assert problem["errors"][0]["field"] == next(iter(params))


def test_sorts(priced):
    assert priced(sort="price") == ["c", "a", "b", "d"]               # no price: last
    assert priced(sort="-price") == ["b", "a", "c", "d"]
    assert priced(sort="-published_at") == ["c", "b", "a", "d"]


@pytest.mark.parametrize("sort", ["relevance", "price", "-price", "-published_at"])
def test_pages_of_ranked_hits_miss_nothing_and_repeat_nothing(server, word, sort):
    expect_json(bulk(server, [document(word, body=("same " * (n % 3)), price=f"{n % 4}.00")
                              for n in range(23)]), 200)
    hits, pages = every_page(server, q=word, sort=sort, limit=5)
    assert pages == 5 and len({hit["id"] for hit in hits}) == 23
    if sort == "relevance":
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)


def test_a_cursor_of_another_sort_is_a_400(server, word):
    expect_json(bulk(server, [document(word) for _ in range(3)]), 200)
    cursor = search(server, q=word, limit=1, sort="price")["next_cursor"]
    resp = requests.get(f"{server.url}/search", params={"q": word, "cursor": cursor},
                        timeout=TIMEOUT)
    expect_problem(resp, 400)


# --------------------------------------------------------------------------------------------
# Did you mean


def test_a_typo_gets_a_suggestion_only_when_nothing_matches(server, word):
    create(server, **document(word, body="chrysanthemum tea, steeped"))
    answer = search(server, q="chrysanthenum")
    assert answer["total"] == 0 and answer["did_you_mean"] == "chrysanthemum"
    assert search(server, q=f"{word} chrysanthemum")["did_you_mean"] is None
    assert search(server, q="qqqqqqqq")["did_you_mean"] is None


def test_the_index_survives_a_restart(start_server, tmp_path, word):
    db = str(tmp_path / "search.sqlite3")
    first = start_server(SCRIPT, db=db)
    create(first, **document(word, id=f"{word}-kept"))
    first.stop()
    second = start_server(SCRIPT, db=db)
    assert ids(search(second, q=word)) == [f"{word}-kept"]
