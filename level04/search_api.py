"""Search API — documents in, ranked and highlighted hits out: a small Elasticsearch on sqlite.

What it teaches:

- Full-text search with an inverted index: sqlite's FTS5 keeps, for every word, the documents
  that hold it, and ranks hits with bm25 (term frequency against how rare a word is, scaled by
  the length of the text). Triggers on the documents table update the index (and the tags
  table) inside the same transaction as the document, so a search never sees one without the
  other.
- A query language parsed by hand and rebuilt: words (all must match), `"exact phrase"`,
  `prefix*`, `-excluded`, `OR`. Every user word reaches FTS5 inside double quotes, so no input
  (`NEAR(`, `AND(`, a lone `*` or `"`) can be FTS5 syntax: any string is a search, never a 500.
- Highlighted snippets that are safe HTML: FTS5 marks the matches with two control characters
  (which the index never holds), the text is HTML-escaped, and only then do the marks become
  `<mark>…</mark>`; a document cannot smuggle markup into a results page.
- Facets (counts per category and per tag) over the whole result set, not just the page.
- Keyset pages over ranked results: the cursor holds (score, position), not an offset.
- Bulk import of NDJSON in one transaction: a batch with one bad line stores nothing, and the
  422 names every bad line.
- "Did you mean": when nothing matches, each unknown word is compared with the indexed words by
  trigram similarity (the sets of three-letter pieces two words share).

Standards: RFC 9110, RFC 9457 (problem details), RFC 3339 (times), NDJSON
(https://github.com/ndjson/ndjson-spec), FTS5 (https://www.sqlite.org/fts5.html).

Left out: stemming and synonyms, per-field boosts chosen by the client, aggregations beyond
counts, sharding and replicas (what Elasticsearch or OpenSearch add; the README says more).

    python level04/search_api.py [--db PATH] [--trace] [--server threaded]
"""
import datetime
import html
import json
import re
import secrets
import sqlite3
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, ContentTooLarge, NotFound, UnprocessableContent,
                 UnsupportedMediaType, ValidationFailed, created, json_response, no_content)
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, bad_query
from lib.routing import PAGE
from lib.validation import Field, Invalid, Text, TextList, body_schema, validate
from level01.counter import etag
from level02.expenses import AMOUNT_IN_RANGE, AMOUNT_PATTERN, MAX_AMOUNT, format_amount, parse_amount, query_amount
from level02.notes import timestamp

app = App("search_api", "Full-text search over documents: a query language, bm25 ranking, "
          "highlighted snippets, facets, filters, bulk NDJSON import.", port=8015)

# The two characters FTS5 puts around each match in a snippet. The index holds the text with
# them replaced by spaces, so every mark in a snippet is one FTS5 made, never a document's own.
MARK_OPEN, MARK_CLOSE = "\x02", "\x03"

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- the index's rowid; never reused
    id            TEXT    NOT NULL UNIQUE,            -- the client's (or a generated) id
    title         TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    category      TEXT    NOT NULL,
    tags          TEXT    NOT NULL DEFAULT '[]',      -- a JSON array of lower-case strings
    price_minor   INTEGER,                            -- cents; NULL: no price
    published_at  TEXT    NOT NULL,                   -- RFC 3339 UTC to the second: sorts as time
    version       INTEGER NOT NULL DEFAULT 1,         -- +1 on every change; the ETag
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_published ON documents (published_at, seq);
CREATE INDEX IF NOT EXISTS documents_by_price ON documents (price_minor, seq);
CREATE INDEX IF NOT EXISTS documents_by_category ON documents (category);
-- What a search reads of every hit, ~40 bytes an entry instead of a whole ~800-byte row: a
-- search names it (INDEXED BY) to filter and sort its hits without reading their text. A prefix
-- query's 28,968 hits on 100,000 documents: 57 ms for the ranked page through the rows, 35 here.
CREATE INDEX IF NOT EXISTS documents_filtered ON documents (seq, category, price_minor, published_at);

-- The tags, a row each, for the tag filter and facet, kept by triggers in the document's
-- transaction. The prefix query's tags facet off the JSON (json_each over every hit's `tags`)
-- took 63 ms; joined with this table, 46. Each distinct tag is numbered once in `tags`, and a
-- document's rows hold the numbers: the facet groups its matches' ~72,000 (document, tag)
-- pairs by an integer and names only the groups, 24 ms where grouping by the names took 33.
CREATE TABLE IF NOT EXISTS tags (
    id    INTEGER PRIMARY KEY,
    name  TEXT    NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS document_tags (
    seq     INTEGER NOT NULL REFERENCES documents (seq) ON DELETE CASCADE,
    tag_id  INTEGER NOT NULL REFERENCES tags (id),
    PRIMARY KEY (seq, tag_id)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS documents_tagged AFTER INSERT ON documents BEGIN
    INSERT OR IGNORE INTO tags (name) SELECT value FROM json_each(new.tags);
    INSERT INTO document_tags (seq, tag_id)
        SELECT new.seq, id FROM tags WHERE name IN (SELECT value FROM json_each(new.tags));
END;
CREATE TRIGGER IF NOT EXISTS documents_retagged AFTER UPDATE OF tags ON documents BEGIN
    DELETE FROM document_tags WHERE seq = old.seq;
    INSERT OR IGNORE INTO tags (name) SELECT value FROM json_each(new.tags);
    INSERT INTO document_tags (seq, tag_id)
        SELECT new.seq, id FROM tags WHERE name IN (SELECT value FROM json_each(new.tags));
END;

-- The inverted index: title and body, words folded to lower case without accents. `prefix`
-- also indexes every word's first two and three characters, so `lam*` reads one list instead
-- of merging those of every word starting with it: its ranked page took 39 ms, now 22.
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
    title, body, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3');

-- The index follows the table in the same transaction: it cannot drift from the documents.
CREATE TRIGGER IF NOT EXISTS documents_indexed AFTER INSERT ON documents BEGIN
    INSERT INTO documents_fts (rowid, title, body) VALUES (new.seq,
        replace(replace(new.title, char(2), ' '), char(3), ' '),
        replace(replace(new.body, char(2), ' '), char(3), ' '));
END;
CREATE TRIGGER IF NOT EXISTS documents_reindexed AFTER UPDATE OF title, body ON documents BEGIN
    DELETE FROM documents_fts WHERE rowid = old.seq;
    INSERT INTO documents_fts (rowid, title, body) VALUES (new.seq,
        replace(replace(new.title, char(2), ' '), char(3), ' '),
        replace(replace(new.body, char(2), ' '), char(3), ' '));
END;
CREATE TRIGGER IF NOT EXISTS documents_unindexed AFTER DELETE ON documents BEGIN
    DELETE FROM documents_fts WHERE rowid = old.seq;
END;

-- Every word ever indexed, and its trigrams, for "did you mean" (a word may outlive its last
-- document here; a suggestion is checked against the index before it is made).
CREATE TABLE IF NOT EXISTS vocabulary (word TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS word_trigrams (
    trigram TEXT NOT NULL,
    word    TEXT NOT NULL,
    PRIMARY KEY (trigram, word)
) WITHOUT ROWID;
"""

# --------------------------------------------------------------------------------------------
# Times: RFC 3339 in, UTC to the second out

RFC3339_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                          r"(?:\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")
FULL_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_time(text):
    """An RFC 3339 date-time → `YYYY-MM-DDTHH:MM:SSZ` in UTC, or None. Fractions of a second
    are dropped; a leap second (`:60`, which RFC 3339 allows and Python cannot hold) is :59."""
    match = RFC3339_TIME.fullmatch(text)
    if match is None:
        return None
    day, hour, minute, second, zone = match.groups()
    try:
        offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])) if len(zone) > 1 \
            else datetime.timedelta(0)
        moment = datetime.datetime.combine(
            datetime.date.fromisoformat(day),
            datetime.time(int(hour), int(minute), min(int(second), 59)),
            datetime.timezone(-offset if zone[0] == "-" else offset))
        utc = moment.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):  # 2026-02-30, 25:00, a zone past ±24 h, year 0
        return None
    return utc.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


class Timestamp(Field):
    def shape(self):
        return {"type": "string", "format": "date-time"}

    def clean(self, value):
        normalised = parse_time(value) if isinstance(value, str) else None
        if normalised is None:
            raise Invalid("must be an RFC 3339 time like 2026-03-01T09:30:00Z")
        return normalised


class Price(Field):
    """A price from 0.00 to 1,000,000,000.00 as a decimal string, cleaned to cents with
    expenses' exact parser (level02/expenses.py: money is never a float)."""

    def shape(self):
        return {"type": "string", "pattern": AMOUNT_IN_RANGE[0],
                "description": f'decimal string, 0.00 to {format_amount(MAX_AMOUNT)}, like "12.50"'}

    def clean(self, value):
        try:
            minor = parse_amount(value)
        except ValueError as err:
            raise Invalid(str(err)) from None
        if minor > MAX_AMOUNT:
            raise Invalid(f"must be at most {format_amount(MAX_AMOUNT)}")
        return minor


# --------------------------------------------------------------------------------------------
# What a client may send

# Letters, digits, `_` and `-`: safe in a URL path as it is. `bulk` is the bulk route's.
DOCUMENT_ID = Text(1, 64, strip=False, pattern=r"[A-Za-z0-9_-]{1,64}",
                   pattern_text="must be 1–64 characters of A–Z, a–z, 0–9, '_' and '-'")
DOCUMENT_FIELDS = {
    "title": Text(1, 500, required=True),
    "body": Text(0, 100_000, strip=False, required=True),
    "category": Text(1, 100, required=True),
    "tags": TextList(max_items=20, item_max=50, lower=True, default=list),
    "price": Price(nullable=True, default=None),
    "published_at": Timestamp(required=True),
}
NEW_DOCUMENT_FIELDS = {"id": DOCUMENT_ID, **DOCUMENT_FIELDS}
SERVER_OWNED = {"version", "created_at", "updated_at", "score", "snippet"}

BULK_BODY_LIMIT = 16 * 1024 * 1024    # level04.md: the bulk route's own limit
MAX_BULK_LINES = 10_000
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl")
MAX_QUERY = 500                        # characters of `q`
FACET_VALUES = 20                      # the most frequent values each facet lists


# --------------------------------------------------------------------------------------------
# Documents


def render_document(row):
    return {"id": row["id"], "title": row["title"], "body": row["body"],
            "category": row["category"], "tags": json.loads(row["tags"]),
            "price": None if row["price_minor"] is None else format_amount(row["price_minor"]),
            "published_at": row["published_at"], "version": row["version"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def one_document(row, status=200):
    headers = {"ETag": etag(row["version"])}
    if status == 201:
        return created(render_document(row), f"/documents/{row['id']}", headers)
    return json_response(render_document(row), headers=headers)


def document_columns(values):
    return (values["title"], values["body"], values["category"],
            json.dumps(values["tags"], ensure_ascii=False), values["price"], values["published_at"])


def find_document(conn, doc_id):
    row = conn.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
    if row is None:
        raise NotFound(f"no document {doc_id}")
    return row


def insert_document(conn, values, now):
    """Store one document (the triggers index it); raises sqlite3.IntegrityError on a taken id."""
    doc_id = values.get("id") or secrets.token_hex(8)
    conn.execute(
        "INSERT INTO documents (id, title, body, category, tags, price_minor, published_at, "
        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (doc_id, *document_columns(values), now, now))
    remember_words(conn, values)
    return doc_id


# --------------------------------------------------------------------------------------------
# Did you mean: trigram similarity against the indexed words

WORD = re.compile(r"[^\W_]{3,40}")  # what the vocabulary keeps: words of 3–40 letters or digits
SIMILAR_ENOUGH = 0.3                # Jaccard similarity of the trigram sets


def trigrams(word):
    """The three-character pieces of a word padded with spaces: `cat` → `  c`, ` ca`, `cat`,
    `at `. The padding weighs the start of a word, where typos are rarer."""
    padded = f"  {word} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


def remember_words(conn, values):
    """Add the document's new words, and their trigrams, to the vocabulary. One statement asks
    which of its words are new (past the first documents, almost none): an INSERT OR IGNORE
    per word made storing a generated document cost 2.0 M instructions instead of 1.6 M."""
    words = set(WORD.findall(f"{values['title']} {values['body']}".casefold()))
    new_words = [row[0] for row in conn.execute(
        "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT word FROM vocabulary)",
        (json.dumps(list(words)),))]
    conn.executemany("INSERT INTO vocabulary (word) VALUES (?)", [(word,) for word in new_words])
    conn.executemany("INSERT INTO word_trigrams (trigram, word) VALUES (?, ?)",
                     [(gram, word) for word in new_words for gram in trigrams(word)])


def matches_anything(conn, fts_query):
    return conn.execute("SELECT 1 FROM documents_fts WHERE documents_fts MATCH ? LIMIT 1",
                        (fts_query,)).fetchone() is not None


def closest_word(conn, word):
    """The indexed word most like `word` (by shared trigrams), that some document still holds."""
    grams = trigrams(word)
    marks = ", ".join("?" * len(grams))
    rows = conn.execute(
        f"SELECT word, count(*) AS shared FROM word_trigrams WHERE trigram IN ({marks}) "
        "GROUP BY word ORDER BY shared DESC, word LIMIT 50", tuple(grams)).fetchall()
    scored = sorted(((row["shared"] / (len(grams) + len(trigrams(row["word"])) - row["shared"]),
                      row["word"]) for row in rows if row["word"] != word),
                    key=lambda pair: (-pair[0], pair[1]))
    for similarity, candidate in scored:
        if similarity < SIMILAR_ENOUGH:
            break
        if matches_anything(conn, quoted(candidate)):
            return candidate
    return None


def suggestion(conn, q, parsed):
    """`q` with each word that matches nothing replaced by its closest indexed word, or None."""
    suggested = q
    for term in (term for group in parsed.groups for term in group if not term.prefix):
        for word in WORD.findall(term.text.casefold()):
            if matches_anything(conn, quoted(word)):
                continue
            better = closest_word(conn, word)
            if better:
                suggested = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", better, suggested,
                                   flags=re.IGNORECASE)
    return suggested if suggested != q else None


# --------------------------------------------------------------------------------------------
# The query language, parsed by hand and rebuilt as FTS5 syntax


class Term(NamedTuple):
    text: str        # a word or a phrase, as the user wrote it
    prefix: bool     # `word*`


class ParsedQuery(NamedTuple):
    groups: list     # [[Term]]: every group must match, any term of a group (`a OR b`)
    excluded: list   # [Term]: none may match

    def fts(self):
        """The FTS5 expression of the positive terms (and the exclusions), or None."""
        if not self.groups:
            return None
        expression = " AND ".join("(" + " OR ".join(map(fts_term, group)) + ")"
                                  for group in self.groups)
        if self.excluded:
            expression = f"({expression}) NOT ({self.excluded_fts()})"
        return expression

    def excluded_fts(self):
        return " OR ".join(map(fts_term, self.excluded))


# One token: an optional `-`, then a "phrase" (its closing quote optional: an unbalanced quote
# runs to the end) or a run of anything but space and quotes.
QUERY_TOKEN = re.compile(r'(-?)(?:"([^"]*)"?|([^\s"]+))')
TOKEN_CHARACTER = re.compile(r"[^\W_]")  # a letter or digit: FTS5's unicode61 indexes only these


def parse_query(q):
    """Words, "phrases", prefix*, -excluded and OR, as a ParsedQuery. Never fails: what means
    nothing (a lone `*`, `-`, `(`, a dangling OR) is dropped, and what is left is searched."""
    groups, excluded, or_pending, after_positive = [], [], False, False
    for match in QUERY_TOKEN.finditer(q):
        minus, phrase, word = match.groups()
        if phrase is None and word == "OR" and not minus:
            or_pending = after_positive
            continue
        text = phrase if phrase is not None else word
        prefix = phrase is None and text.endswith("*")
        text = text.rstrip("*") if phrase is None else text
        if not TOKEN_CHARACTER.search(text):
            continue
        term = Term(text, prefix)
        if minus:
            excluded.append(term)
            after_positive = or_pending = False
        elif or_pending:
            groups[-1].append(term)
        else:
            groups.append([term])
        if not minus:
            after_positive, or_pending = True, False
    return ParsedQuery(groups, excluded)


def quoted(text):
    """`text` as an FTS5 string: inside double quotes, a quote doubled. FTS5 reads a string as
    words only (a phrase), never as an operator, a column filter or a bracket."""
    return '"' + text.replace('"', '""') + '"'


def fts_term(term):
    return quoted(term.text) + (" *" if term.prefix else "")


# --------------------------------------------------------------------------------------------
# Searching

SORTS = {
    "relevance": Sort("relevance", SortKey("score", float, descending=True), SortKey("seq", int)),
    "-published_at": Sort("-published_at", SortKey("published_at", str, descending=True),
                          SortKey("seq", int, descending=True)),
    "price": Sort("price", SortKey("price_minor", int, nulls_last=True), SortKey("seq", int)),
    "-price": Sort("-price", SortKey("price_minor", int, descending=True, nulls_last=True),
                   SortKey("seq", int)),
}
TIME_OR_DATE = {"anyOf": [{"format": "date"}, {"format": "date-time"}]}
SEARCH_QUERY = {q.name: q for q in (
    Query("q", 'words (all must match), "a phrase", prefix*, -excluded, a OR b',
          {"maxLength": MAX_QUERY}),
    Query("category", "only this category (exact)"),
    Query("tag", "only documents with this tag (repeat: all must match)"),
    Query("min_price", 'price at least, e.g. "10.00"', {"pattern": AMOUNT_PATTERN}),
    Query("max_price", "price at most", {"pattern": AMOUNT_PATTERN}),
    Query("from", "published at or after: a date (YYYY-MM-DD) or an RFC 3339 time", TIME_OR_DATE),
    Query("to", "published at or before: a date (its whole day) or an RFC 3339 time", TIME_OR_DATE),
    Query("sort", "relevance (default), -published_at, price or -price", tuple(SORTS), "relevance"),
)}


def query_time(request, name, *, end_of_day):
    text = request.query_param(name)
    if not text:
        return None
    if FULL_DATE.fullmatch(text):
        normalised = parse_time(f"{text}T{'23:59:59' if end_of_day else '00:00:00'}Z")
    else:
        normalised = parse_time(text)
    if normalised is None:
        raise bad_query(name, "must be a real date (YYYY-MM-DD) or an RFC 3339 time")
    return normalised


def document_filters(request):
    """The filters of the query string as (conditions on `d`, parameters). Values are always
    parameters. Contradictory ones (min above max) simply match nothing."""
    where, params = [], []
    for condition, value in (
            ("d.category = ?", request.query_param("category") or None),
            ("d.price_minor >= ?", query_amount(request, "min_price")),
            ("d.price_minor <= ?", query_amount(request, "max_price")),
            ("d.published_at >= ?", query_time(request, "from", end_of_day=False)),
            # stored times are whole seconds, so a date's 23:59:59 covers its whole day
            ("d.published_at <= ?", query_time(request, "to", end_of_day=True))):
        if value is not None:
            where.append(condition)
            params.append(value)
    for tag in request.query.get("tag", []):
        if tag.strip():
            where.append("EXISTS (SELECT 1 FROM document_tags t WHERE t.seq = d.seq "
                         "AND t.tag_id = (SELECT id FROM tags WHERE name = ?))")
            params.append(tag.strip().lower())
    return where, params


def matching_documents(parsed, filters):
    """(source, condition, parameters, score expression) of the documents that match."""
    where, params = list(filters[0]), list(filters[1])
    expression = parsed.fts()
    if expression is None:
        # Without words, the matches are found by scanning the narrow index whole: through the
        # category index, reading each match's sort columns from its row took 42 ms for a
        # category of 15,429 documents (of 100,000), scanning documents_filtered 30.
        source, score = "documents d INDEXED BY documents_filtered", "0.0"
        if parsed.excluded:  # only exclusions: every document but those
            where.append("d.seq NOT IN (SELECT rowid FROM documents_fts WHERE documents_fts MATCH ?)")
            params.append(parsed.excluded_fts())
    else:
        # bm25 is lower-is-better; its negation is the score, higher is better. A title
        # match weighs ten times a body match. CROSS JOIN keeps the full-text index first:
        # given the choice, sqlite may walk a filter's index (a whole category) and look each
        # row up in the full-text index, 720 ms instead of 21 on 100,000 documents. What the
        # search reads of each hit is in the narrow documents_filtered index (see SCHEMA).
        source = ("documents_fts CROSS JOIN documents d INDEXED BY documents_filtered "
                  "ON d.seq = documents_fts.rowid")
        score = "-bm25(documents_fts, 10.0, 1.0)"
        where.insert(0, "documents_fts MATCH ?")
        params.insert(0, expression)
    return source, " AND ".join(where) or "1", params, score


def search_pass(conn, source, where, params, score, sort, cursor, limit):
    """(the page's documents, how many documents match, the facets) from one pass over the
    matches. The page is limit + 1 documents (the extra one tells whether another page
    follows), each with its score. The facets, {"category": {name: count}, "tags": {name:
    count}}, count every match, not just the page: the most frequent values first, at most
    FACET_VALUES of each.

    The full-text search runs once, into a materialised CTE of each match's seq, sort columns,
    category and score (read from the narrow documents_filtered index, not the ~800-byte rows),
    which is then ranked for the page, counted, and grouped by category and by tag: one row
    per part of the answer. Run as two statements (the page, then the counts), the search and
    its join ran twice: a phrase of two common words cost 268 M instructions, 195 M in one pass;
    the prefix query's 28,968 hits on 100,000 documents, 768 M and 734 M. Only the page's rows
    are then read whole."""
    after, after_params = sort.after(cursor) if cursor else ("1", [])
    rows = conn.execute(
        f"WITH hit AS MATERIALIZED (SELECT d.seq, d.published_at, d.price_minor, d.category, "
        f"                                 {score} AS score FROM {source} WHERE {where}) "
        f"SELECT * FROM (SELECT 'page' AS part, seq AS value, score AS n FROM hit "
        f"               WHERE {after} ORDER BY {sort.order_by} LIMIT ?) "
        "UNION ALL SELECT 'total', NULL, count(*) FROM hit "
        "UNION ALL SELECT * FROM (SELECT 'category', category, count(*) AS n FROM hit "
        "                         GROUP BY category ORDER BY n DESC, category LIMIT ?) "
        "UNION ALL SELECT * FROM (SELECT 'tags', tags.name, counted.n FROM ("
        "                             SELECT t.tag_id, count(*) AS n "
        "                             FROM hit CROSS JOIN document_tags t ON t.seq = hit.seq "
        "                             GROUP BY t.tag_id) counted "
        "                         CROSS JOIN tags ON tags.id = counted.tag_id "
        "                         ORDER BY counted.n DESC, tags.name LIMIT ?)",
        (*params, *after_params, limit + 1, FACET_VALUES, FACET_VALUES)).fetchall()
    ranked, total, facets = [], 0, {"category": {}, "tags": {}}
    for row in rows:
        if row["part"] == "page":
            ranked.append((row["value"], row["n"]))
        elif row["part"] == "total":
            total = row["n"]
        else:
            facets[row["part"]][row["value"]] = row["n"]
    whole = {row["seq"]: row for row in conn.execute(
        f"SELECT * FROM documents WHERE seq IN ({', '.join('?' * len(ranked))})",
        [seq for seq, _ in ranked])}
    return [{**whole[seq], "score": score} for seq, score in ranked], total, facets


def snippets(conn, expression, rows):
    """{seq: HTML snippet} for the rows of a page: FTS5 cuts the text around the matches and
    marks them with control characters; the text is escaped, then the marks become <mark>."""
    if expression is None:
        return {row["seq"]: plain_snippet(row["body"]) for row in rows}
    seqs = [row["seq"] for row in rows]
    found = conn.execute(
        f"SELECT rowid, snippet(documents_fts, -1, char(2), char(3), '…', 24) AS text "
        f"FROM documents_fts WHERE documents_fts MATCH ? AND rowid IN ({', '.join('?' * len(seqs))})",
        (expression, *seqs)).fetchall()
    return {row["rowid"]: html.escape(row["text"]).replace(MARK_OPEN, "<mark>")
            .replace(MARK_CLOSE, "</mark>") for row in found}


def plain_snippet(body, length=200):
    return html.escape(body[:length] + ("…" if len(body) > length else ""))


def render_hit(row, snippet):
    return {"id": row["id"], "title": row["title"], "category": row["category"],
            "tags": json.loads(row["tags"]),
            "price": None if row["price_minor"] is None else format_amount(row["price_minor"]),
            "published_at": row["published_at"], "score": row["score"],
            "snippet": snippet}


SEARCH_ANSWER = {
    "type": "object", "required": ["items", "next_cursor", "total", "facets", "did_you_mean"],
    "properties": {
        "items": {"type": "array", "items": {"type": "object", "required": ["id", "score", "snippet"]}},
        "next_cursor": {"type": ["string", "null"]}, "total": {"type": "integer"},
        "facets": {"type": "object", "required": ["category", "tags"]},
        "did_you_mean": {"type": ["string", "null"]}}}


# --------------------------------------------------------------------------------------------
# Routes

DOCUMENT_ERRORS = {404: "no such document", 412: "If-Match names an older version",
                   422: "bad, unknown or server-owned fields"}


@app.post("/documents", request_schema=body_schema(NEW_DOCUMENT_FIELDS),
          responses={201: "the document (Location, ETag)", 409: "that id is taken",
                     422: DOCUMENT_ERRORS[422]})
def create_document(request):
    """Index a document: {"id"?, "title", "body", "category", "tags", "price"?, "published_at"}"""
    values = validate(request.json_object(), NEW_DOCUMENT_FIELDS, read_only=SERVER_OWNED)
    if values.get("id") == "bulk":
        raise ValidationFailed({"id": "is the name of the bulk route"})
    with app.state.db.transaction() as conn:
        try:
            doc_id = insert_document(conn, values, timestamp())
        except sqlite3.IntegrityError:
            raise Conflict(f"there is already a document {values['id']}") from None
        row = find_document(conn, doc_id)
    return one_document(row, 201)


@app.post("/documents/bulk", blocking=True, body_limit=BULK_BODY_LIMIT,
          request_media_type="application/x-ndjson",
          request_schema={"type": "string", "description": "NDJSON: one document (as POST "
                          f"/documents takes it) a line, at most {MAX_BULK_LINES:,} lines"},
          responses={200: '{"created": n, "ids": [...]}', 413: "more than 10,000 lines or 16 MiB",
                     415: "not Content-Type: application/x-ndjson",
                     422: 'a bad line; nothing stored: errors [{"line", "field"?, "message"}]'})
def import_documents(request):
    """Index many documents in one transaction: all of them, or none"""
    if request.content_type not in NDJSON_TYPES:
        raise UnsupportedMediaType("send the documents as Content-Type: application/x-ndjson")
    lines = [(number, line) for number, line in enumerate(request.body.split(b"\n"), 1)
             if line.strip()]
    if len(lines) > MAX_BULK_LINES:
        raise ContentTooLarge(f"{len(lines)} lines: at most {MAX_BULK_LINES:,} a batch")
    if not lines:
        raise UnprocessableContent("the body holds no documents")
    documents, errors, first_line_of = [], [], {}
    for number, line in lines:
        try:
            values = validate(parse_line(line), NEW_DOCUMENT_FIELDS, read_only=SERVER_OWNED)
        except ValidationFailed as failure:
            errors += [{"line": number, **error} for error in failure.errors]
            continue
        except ValueError as err:
            errors.append({"line": number, "message": str(err)})
            continue
        doc_id = values.get("id")
        if doc_id == "bulk" or doc_id in first_line_of:
            errors.append({"line": number, "field": "id", "message": "is the bulk route's name"
                           if doc_id == "bulk" else f"repeats line {first_line_of.get(doc_id)}"})
            continue
        if doc_id:
            first_line_of[doc_id] = number
        documents.append((number, values))
    if not errors:
        with app.state.db.transaction() as conn:
            ids, now = [], timestamp()
            for number, values in documents:
                try:
                    ids.append(insert_document(conn, values, now))
                except sqlite3.IntegrityError:
                    errors.append({"line": number, "field": "id",
                                   "message": f"there is already a document {values['id']}"})
            if errors:
                raise bulk_refused(errors, len(lines))  # inside the transaction: rolled back
        return {"created": len(ids), "ids": ids}
    raise bulk_refused(errors, len(lines))


def parse_line(line):
    """One NDJSON line → a dict, or ValueError saying why not."""
    try:
        data = json.loads(line.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise ValueError("is not valid UTF-8") from None
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    return data


def refuse_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def bulk_refused(errors, count):
    bad = len({error["line"] for error in errors})
    return UnprocessableContent(f"{bad} of {count} lines are bad; nothing was stored",
                                errors=errors)


@app.get("/documents/{doc_id}", responses={200: "the document (ETag)", 404: DOCUMENT_ERRORS[404]})
def read_document(request, doc_id):
    """One document"""
    with app.state.db.reading() as conn:
        return one_document(find_document(conn, doc_id))


@app.put("/documents/{doc_id}", request_schema=body_schema(DOCUMENT_FIELDS), if_match=True,
         responses={200: "the document as it now is (ETag)", **DOCUMENT_ERRORS})
def replace_document(request, doc_id):
    """Replace a document, and its place in the index, in one transaction"""
    values = validate(request.json_object(), DOCUMENT_FIELDS, read_only=SERVER_OWNED | {"id"})
    with app.state.db.transaction() as conn:
        row = find_document(conn, doc_id)
        request.require_if_match(etag(row["version"]))
        conn.execute(
            "UPDATE documents SET title = ?, body = ?, category = ?, tags = ?, price_minor = ?, "
            "published_at = ?, version = version + 1, updated_at = ? WHERE seq = ?",
            (*document_columns(values), timestamp(), row["seq"]))
        remember_words(conn, values)
        row = find_document(conn, doc_id)
    return one_document(row)


@app.delete("/documents/{doc_id}", status=204, if_match=True,
            responses={204: "deleted, and gone from the index",
                       404: DOCUMENT_ERRORS[404], 412: DOCUMENT_ERRORS[412]})
def delete_document(request, doc_id):
    """Delete a document (and its index entries)"""
    with app.state.db.transaction() as conn:
        row = find_document(conn, doc_id)
        request.require_if_match(etag(row["version"]))
        conn.execute("DELETE FROM documents WHERE seq = ?", (row["seq"],))
    return no_content()


@app.get("/search", blocking=True, query=[*SEARCH_QUERY.values(), *PAGE],
         response_schema=SEARCH_ANSWER,
         responses={200: '{"items": [hits], "next_cursor", "total", "facets", "did_you_mean"}',
                     400: "a bad filter, sort, limit or cursor"})
def search(request):
    """Search: ranked hits with highlighted snippets, facets over all of them"""
    q = request.query_param("q", "")
    if len(q) > MAX_QUERY:
        raise bad_query("q", f"must be at most {MAX_QUERY} characters")
    sort = SORTS[SEARCH_QUERY["sort"].read(request)]
    limit, cursor = list_params(request, sort.shape)
    parsed = parse_query(q)
    matching = matching_documents(parsed, document_filters(request))
    with app.state.db.reading() as conn:
        rows, total, facets = search_pass(conn, *matching, sort, cursor, limit)
        answer = page(rows, limit, sort.cursor_values)
        marked = snippets(conn, parsed.fts(), answer["items"])
        answer["items"] = [render_hit(row, marked.get(row["seq"], "")) for row in answer["items"]]
        answer["total"], answer["facets"] = total, facets
        answer["did_you_mean"] = suggestion(conn, q, parsed) if answer["total"] == 0 else None
    return answer


def main(argv=None):
    args = app.parse_args(argv, database=True)
    app.state.db = app.open_database(args, SCHEMA)
    app.run(args)


if __name__ == "__main__":
    main()
