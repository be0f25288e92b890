"""Contact manager — people's details a backend owns: normalised, searchable, unique, portable.

What it teaches:

- Normalising on the way in, keeping what the user wrote. Emails are checked for a sane syntax
  and their domain lower-cased (lib.validation.Email); phone numbers become E.164 (`+` and 8–15
  digits) so that `+1 (555) 123-4567` and `+1.555.123.4567` are one number, while the text as
  typed is kept as the phone's `label`.
- Uniqueness that holds under concurrency. An email may belong to one contact of a user only.
  A "does it exist?" check followed by an INSERT lets two simultaneous requests both pass the
  check; here the emails live in a child table with a UNIQUE index on (owner, address), so the
  database refuses the second INSERT and the request answers 409 naming the contact that has it.
- Search as people expect it: case- and accent-insensitive (`jose` finds `José`: Unicode NFKD
  splits `é` into `e` + a combining accent, which is dropped), matching the start of any word
  (`ali` finds `Alice Smith` and `Smith, Ali`, not `Natalie`), and digits matching phone numbers
  however they were formatted. The folded words are computed once, on write, into a column.
- Child tables and the N+1 problem: a page of contacts reads its emails, phones and tags in
  three queries for the whole page, not three per contact.
- Moving data in and out: CSV export and import (RFC 4180; formula-injection escaping imported
  from expenses.py), vCard 4.0 export (RFC 6350) for address books, an import that reports each
  bad row and keeps the good ones (each row in its own SAVEPOINT: a row is written whole or not
  at all; rows committed in batches, so an import does not hold the write lock for seconds),
  and finding likely duplicates.

Phone numbers without `+`: refused, unless the server runs with `--default-country-code CC`;
then `CC` is put in front, after dropping one national trunk prefix `0` (`020 7946 0958` with 44
→ `+442079460958`). A leading `00` (the international call prefix of most countries) counts
as `+`.

Standards: RFC 6350 (vCard 4.0), RFC 3966 (tel: URIs), ITU-T E.164 (phone numbers),
RFC 5321 / 5322 (email addresses), RFC 4180 (CSV), RFC 5233 (sub-addresses), RFC 9110, RFC 9457.

Left out: checking that a number exists in its country's numbering plan (libphonenumber does
that), quoted or IP-literal email addresses, vCard import, photos, postal addresses, merging
duplicates, language-aware sorting (names sort by their folded code points, not by a
locale's collation).

    python level02/contacts.py [--default-country-code CC] [--db PATH] [--trace]
"""
import argparse
import csv
import io
import json
import re
import sqlite3
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, Conflict, UnprocessableContent, UnsupportedMediaType,
                 ValidationFailed, created, json_response, no_content, text_response)
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query
from lib.routing import PAGE
from lib.validation import Email, Field, Invalid, Text, TextList, body_schema, validate
from level02.expenses import csv_document, csv_download, unescape_formula
from level01.counter import etag
from level02.notes import (delete_owned, find_owned, owned_for_update, require_user, timestamp,
                           write_owned)

app = App("contacts", "Contacts with normalised emails and phones, accent-insensitive search, "
                      "CSV and vCard export, CSV import, duplicate detection.", port=8007)
app.state.default_country_code = None

IMPORT_BODY_LIMIT = 2 * 1024 * 1024   # bytes of CSV one import may send (413 beyond)
IMPORT_BATCH_ROWS = 200               # rows written per transaction of an import
MAX_EMAILS = MAX_PHONES = 10
LIST_SEPARATOR = ";"                  # between the emails, phones or tags of one CSV cell

# --- schema ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a deleted id stays a 404
    owner        TEXT NOT NULL,                       -- the X-User-Id that created it
    name         TEXT NOT NULL,
    company      TEXT NOT NULL,
    notes        TEXT NOT NULL,
    -- Computed from the fields above on every write, so reads never fold text:
    name_key     TEXT NOT NULL,     -- fold(name): the sort key
    person_key   TEXT NOT NULL,     -- the name's folded words, sorted: "same name" duplicates
    company_key  TEXT NOT NULL,     -- fold(company): the company filter
    search       TEXT NOT NULL,     -- ' alice smith acme alice example com 15551234567 '
    phone_digits TEXT NOT NULL,     -- ' 15551234567 442079460958 '
    version      INTEGER NOT NULL DEFAULT 1,          -- +1 on every change: the ETag
    created_at   TEXT NOT NULL,                       -- RFC 3339 UTC
    updated_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS contacts_owner_name ON contacts (owner, name_key, id);
CREATE INDEX IF NOT EXISTS contacts_owner_created ON contacts (owner, created_at, id);

CREATE TABLE IF NOT EXISTS contact_emails (
    contact_id  INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    owner       TEXT NOT NULL,      -- the contact's owner, copied here for the unique index
    position    INTEGER NOT NULL,
    address     TEXT NOT NULL,      -- as validated: domain lower-cased, local part as given
    address_key TEXT NOT NULL,      -- lower(address): what uniqueness compares
    mailbox_key TEXT NOT NULL,      -- address_key without a +tag: "same email" duplicates
    PRIMARY KEY (contact_id, position)
);
-- The rule "an email belongs to one contact per user", kept by the database itself: of two
-- concurrent requests adding the same address, the second INSERT fails, whatever the timing.
CREATE UNIQUE INDEX IF NOT EXISTS contact_emails_unique ON contact_emails (owner, address_key);
CREATE INDEX IF NOT EXISTS contact_emails_mailbox ON contact_emails (owner, mailbox_key);

CREATE TABLE IF NOT EXISTS contact_phones (
    contact_id  INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    owner       TEXT NOT NULL,
    position    INTEGER NOT NULL,
    number      TEXT NOT NULL,      -- E.164: '+' and 8–15 digits
    label       TEXT NOT NULL,      -- the text as the user typed it
    PRIMARY KEY (contact_id, position)
);
CREATE INDEX IF NOT EXISTS contact_phones_number ON contact_phones (owner, number);

CREATE TABLE IF NOT EXISTS contact_tags (
    contact_id  INTEGER NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    tag         TEXT NOT NULL,      -- lower-cased
    PRIMARY KEY (contact_id, tag)
);
CREATE INDEX IF NOT EXISTS contact_tags_tag ON contact_tags (tag, contact_id);
"""

# --- normalising what people type ----------------------------------------------------------


def fold(text):
    """Text as search and sorting compare it: case folded, then accents removed. NFKD splits
    `é` into `e` and U+0301 COMBINING ACUTE ACCENT (and `ﬁ` into `fi`); dropping the combining
    marks leaves `e`. casefold() comes first: `İ` folds to `i` + a combining dot, dropped too."""
    if text.isascii():   # the common case, and nothing to decompose: skip the per-character work
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


WORD = re.compile(r"[^\W_]+")   # a run of letters or digits, in any script


def words(text):
    """The folded words of `text`: "Smith, Ali" → ["smith", "ali"]."""
    return WORD.findall(fold(text))


# What a written phone number may contain: digits, the usual separators, a leading +.
PHONE_TEXT = re.compile(r"\+?[0-9 ().\-/]+")
# The whole rule of `normalise_phone` as /openapi.json's pattern, for a number written with + or
# 00 and its country code (a --default-country-code also admits national ones): after them 8 to
# 15 digits, the first not 0, with separators anywhere between.
SEPARATORS = r"[ ().\-/]*"
PHONE_PATTERN = rf"^\s*(?:\+|{SEPARATORS}0{SEPARATORS}0){SEPARATORS}[1-9](?:{SEPARATORS}[0-9]){{7,14}}{SEPARATORS}\s*$"


def normalise_phone(text, default_country_code=None):
    """A phone number as typed → E.164 (`+` and 8–15 digits), or Invalid.

    "+1 (555) 123-4567" → "+15551234567"; "0044 20 7946 0958" → "+442079460958"; without + or
    00, only with a default country code, whose national trunk prefix 0 is dropped
    ("020 7946 0958" with 44 → "+442079460958"). Italy keeps its 0 after +39: numbers there
    need the +."""
    text = text.strip()
    if not PHONE_TEXT.fullmatch(text):
        raise Invalid("may contain only digits, spaces, ( ) . - / and a leading +")
    digits = re.sub(r"[^0-9]", "", text)
    if text.startswith("+"):
        pass
    elif digits.startswith("00"):
        digits = digits[2:]
    elif default_country_code:
        digits = default_country_code + digits.removeprefix("0")
    else:
        raise Invalid("must start with + and the country code, like +1 555 123 4567")
    if not 8 <= len(digits) <= 15 or digits.startswith("0"):
        raise Invalid("must be a country code and number of 8 to 15 digits in all (E.164)")
    return "+" + digits


def email_key(address):
    """What email uniqueness compares: the whole address lower-cased. RFC 5321 lets a mail
    server treat `Ann@` and `ann@` as two mailboxes; no contact book should."""
    return address.lower()


def mailbox_key(address):
    """An address without its sub-address tag (RFC 5233): `ann+news@x.org` → `ann@x.org`, to
    find duplicates. Not used for uniqueness: the two may really be different inboxes."""
    local, _, domain = email_key(address).rpartition("@")
    return f"{local.split('+', 1)[0] or local}@{domain}"


class EmailList(Field):
    """Up to 10 email addresses (lib.validation.Email each, so one rule for every address of
    every project), duplicates dropped in order. The limit bounds the list as sent, before any
    address is looked at, as lib.validation.TextList does."""

    item = Email()

    def shape(self):
        # No uniqueItems: a repeat (in any case) is dropped, not refused.
        return {"type": "array", "maxItems": MAX_EMAILS, "items": self.item.shape()}

    def clean(self, value):
        if not isinstance(value, list):
            raise Invalid("must be a list of email addresses")
        if len(value) > MAX_EMAILS:
            raise Invalid(f"must have at most {MAX_EMAILS} addresses")
        addresses = {}
        for index, item in enumerate(value):
            try:
                address = self.item.clean(item)
            except Invalid as err:
                raise Invalid(f"item {index} {err}") from None
            addresses.setdefault(email_key(address), address)
        return list(addresses.values())


class PhoneList(Field):
    """Up to 10 phone numbers, sent as strings, cleaned to `{"number": E.164, "label": the
    text as sent}`; a number given twice is kept once."""

    def shape(self):
        return {"type": "array", "maxItems": MAX_PHONES,
                "items": {"type": "string", "minLength": 1, "maxLength": 50, "pattern": PHONE_PATTERN,
                          "description": 'with + and country code, like "+1 555 123 4567" '
                                         "(digits, spaces and ( ) . - / only); kept as E.164"}}

    def clean(self, value):
        if not isinstance(value, list):
            raise Invalid('must be a list of phone numbers as strings, like ["+1 555 123 4567"]')
        if len(value) > MAX_PHONES:  # the list as sent, before any work on it
            raise Invalid(f"must have at most {MAX_PHONES} numbers")
        phones = {}
        for index, item in enumerate(value):
            if not isinstance(item, str) or not 1 <= len(item) <= 50:  # as sent, as in the schema
                raise Invalid(f"item {index} must be a string of 1 to 50 characters")
            try:
                number = normalise_phone(item, app.state.default_country_code)
            except Invalid as err:
                raise Invalid(f"item {index} {err}") from None
            phones.setdefault(number, {"number": number, "label": item.strip()})
        return list(phones.values())


class Tags(TextList):
    """Tags as in notes (trimmed, lower-cased, de-duplicated), without the CSV list separator."""

    def shape(self):
        schema = super().shape()
        schema["items"]["allOf"] = [{"pattern": f"^[^{re.escape(LIST_SEPARATOR)}]*$"}]  # and the item's
        return schema

    def clean(self, value):
        tags = super().clean(value)
        if any(LIST_SEPARATOR in tag for tag in tags):
            raise Invalid(f"tags may not contain '{LIST_SEPARATOR}'")
        return tags


READ_ONLY = {"id", "owner", "created_at", "updated_at"}
CONTACT_FIELDS = {
    "name": Text(1, 200, required=True),
    "emails": EmailList(default=list),
    "phones": PhoneList(default=list),
    "company": Text(0, 200, default=""),
    "notes": Text(0, 10_000, default=""),
    "tags": Tags(max_items=20, item_max=30, lower=True, default=list),
}

# --- storing contacts -----------------------------------------------------------------------
#
# Reads go through `app.state.db.query`, inside a transaction or not: lib/storage.py gives each
# thread one connection, so on the thread inside `with db.transaction()` a query is part of
# that transaction.


def contact_columns(values):
    """A contact's own columns: its single fields, and those computed from all of its fields
    for sorting, filtering and search."""
    name, company = fold(values["name"]), fold(values["company"])
    name_words = WORD.findall(name)
    found = name_words + WORD.findall(company)
    for address in values["emails"]:
        found += words(address)
    digits = [phone["number"][1:] for phone in values["phones"]]
    return {"name": values["name"], "company": values["company"], "notes": values["notes"],
            "name_key": name,
            "person_key": " ".join(sorted(name_words)),
            "company_key": company,
            # Spaces around every word: `instr(search, ' ali')` is "a word starting with ali".
            "search": " " + " ".join(dict.fromkeys(found + digits)) + " ",
            "phone_digits": " " + " ".join(digits) + " "}


def email_taken(owner, address):
    """The 409 for an address another contact of the caller has, naming that contact."""
    holder = app.state.db.query_one(
        "SELECT c.id, c.name FROM contact_emails e JOIN contacts c ON c.id = e.contact_id "
        "WHERE e.owner = ? AND e.address_key = ?", (owner, email_key(address)))
    message = f"{address} belongs to contact {holder['id']}"
    return Conflict(f"{address} is already an email of contact {holder['id']} ({holder['name']})",
                    errors=[{"field": "emails", "message": message}], contact_id=holder["id"],
                    email=address)


def write_children(conn, owner, contact_id, values):
    """Write the contact's emails, phones and tags. The unique index on emails decides
    conflicts: its IntegrityError becomes the 409 (the caller's transaction is then rolled
    back, so the contact is never left half-written)."""
    for position, address in enumerate(values["emails"]):
        try:
            conn.execute("INSERT INTO contact_emails (contact_id, owner, position, address, "
                         "address_key, mailbox_key) VALUES (?, ?, ?, ?, ?, ?)",
                         (contact_id, owner, position, address, email_key(address),
                          mailbox_key(address)))
        except sqlite3.IntegrityError:
            raise email_taken(owner, address) from None
    conn.executemany("INSERT INTO contact_phones (contact_id, owner, position, number, label) "
                     "VALUES (?, ?, ?, ?, ?)",
                     [(contact_id, owner, position, phone["number"], phone["label"])
                      for position, phone in enumerate(values["phones"])])
    conn.executemany("INSERT INTO contact_tags (contact_id, position, tag) VALUES (?, ?, ?)",
                     [(contact_id, position, tag) for position, tag in enumerate(values["tags"])])


def insert_contact(conn, owner, values):
    """Write a new contact and its child rows inside the caller's transaction; returns its id."""
    now = timestamp()
    columns = {"owner": owner, **contact_columns(values), "created_at": now, "updated_at": now}
    contact_id = conn.execute(
        f"INSERT INTO contacts ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        tuple(columns.values())).lastrowid   # column names from the code, values as parameters
    write_children(conn, owner, contact_id, values)
    return contact_id


def update_contact(conn, owner, row, values):
    """Write `values` over the caller's contact `row`, read by notes' `owned_for_update` in this
    same transaction: its columns by notes' `write_owned` (the version goes up), its lists
    replaced, not merged. A change to nothing is no change: the contact and its ETag stay."""
    contact = contacts_with_details([row])[0]
    merged = {name: values.get(name, contact[name]) for name in CONTACT_FIELDS}
    if all(merged[name] == contact[name] for name in CONTACT_FIELDS):
        return contact
    write_owned(conn, "contacts", row, contact_columns(merged))
    for table in ("contact_emails", "contact_phones", "contact_tags"):
        conn.execute(f"DELETE FROM {table} WHERE contact_id = ?", (row["id"],))
    write_children(conn, owner, row["id"], merged)
    return own_contact(conn, owner, row["id"])


def contacts_with_details(rows):
    """Contact rows → contacts with their emails, phones and tags, read in three queries for
    all the rows (json_each turns one JSON array parameter into the list of ids), instead of
    three queries per contact — the "N+1 queries" that make list pages slow."""
    ids = json.dumps([row["id"] for row in rows])
    emails, phones, tags = defaultdict(list), defaultdict(list), defaultdict(list)
    db = app.state.db
    within = "contact_id IN (SELECT value FROM json_each(?)) ORDER BY contact_id, position"
    for row in db.query(f"SELECT contact_id, address FROM contact_emails WHERE {within}", (ids,)):
        emails[row["contact_id"]].append(row["address"])
    for row in db.query(f"SELECT contact_id, number, label FROM contact_phones WHERE {within}", (ids,)):
        phones[row["contact_id"]].append({"number": row["number"], "label": row["label"]})
    for row in db.query(f"SELECT contact_id, tag FROM contact_tags WHERE {within}", (ids,)):
        tags[row["contact_id"]].append(row["tag"])
    return [{"id": row["id"], "name": row["name"], "emails": emails[row["id"]],
             "phones": phones[row["id"]], "company": row["company"], "notes": row["notes"],
             "tags": tags[row["id"]], "version": row["version"], "created_at": row["created_at"],
             "updated_at": row["updated_at"]} for row in rows]


def own_contact(conn, owner, contact_id):
    """The caller's contact with its details, or 404 — also when it is someone else's."""
    return contacts_with_details([find_owned(conn, "contacts", owner, contact_id)])[0]


def contact_json(contact):
    return {key: value for key, value in contact.items() if key != "version"}


def contact_response(contact, status=200):
    headers = {"ETag": etag(contact["version"])}
    if status == 201:
        return created(contact_json(contact), f"/contacts/{contact['id']}", headers=headers)
    return json_response(contact_json(contact), headers=headers)


# --- searching and listing ------------------------------------------------------------------


def contact_filter(request, owner):
    """The WHERE clause (and its parameters) of `q`, `tag` and `company` — shared by the list
    and the exports, so they always agree."""
    where, params = ["c.owner = ?"], [owner]
    q = (request.query_param("q") or "").strip()
    if PHONE_TEXT.fullmatch(q) and any(char.isdigit() for char in q):
        # Digits (however formatted) search phone numbers: "555 123" finds +1 (555) 123-4567.
        where.append("instr(c.phone_digits, ?) > 0")
        params.append(re.sub(r"[^0-9]", "", q))
    elif q:
        wanted = words(q)
        if not wanted:  # only punctuation: nothing to look for, so nothing is found
            where.append("0")
        for word in wanted:  # every word of q must start some word of the contact
            where.append("instr(c.search, ?) > 0")
            params.append(" " + word)
    for tag in request.query.get("tag", []):
        if tag.strip():
            where.append("EXISTS (SELECT 1 FROM contact_tags t WHERE t.contact_id = c.id AND t.tag = ?)")
            params.append(tag.strip().lower())
    company = (request.query_param("company") or "").strip()
    if company:
        where.append("c.company_key = ?")
        params.append(fold(company))
    return " AND ".join(where), params


# `sort` → its order (lib/listing.py writes the ORDER BY and the keyset condition). Names sort
# by their folded form, so case and accents do not matter; the id breaks ties.
SORTS = {
    "name": Sort("name", SortKey("name_key", str), SortKey("id", int)),
    "-name": Sort("-name", SortKey("name_key", str, descending=True),
                  SortKey("id", int, descending=True)),
    "-created_at": Sort("-created_at", SortKey("created_at", str, descending=True),
                        SortKey("id", int, descending=True)),
}


def matching_contacts(request, owner):
    """Every contact the filters match, in the requested order, with details (the exports)."""
    sort = SORTS[SORT.read(request)]
    where, params = contact_filter(request, owner)
    rows = app.state.db.query(f"SELECT * FROM contacts c WHERE {where} ORDER BY {sort.order_by}", params)
    return contacts_with_details(rows)


def duplicate_groups(owner):
    """Groups of the caller's contacts that look like one person: the same mailbox (ignoring
    +tags and case), the same phone number, or the same name words in any order ("Smith, Ann"
    and "ann smith"). One query: every (reason, key, contact), kept where a key has two or more
    contacts."""
    rows = app.state.db.query(
        """WITH keys (reason, value, contact_id) AS (
               SELECT 'email', mailbox_key, contact_id FROM contact_emails WHERE owner = :owner
               UNION SELECT 'phone', number, contact_id FROM contact_phones WHERE owner = :owner
               UNION SELECT 'name', person_key, id FROM contacts WHERE owner = :owner AND person_key != '')
           SELECT k.reason, k.value, c.id, c.name FROM keys k JOIN contacts c ON c.id = k.contact_id
           WHERE (k.reason, k.value) IN
                 (SELECT reason, value FROM keys GROUP BY reason, value HAVING count(*) > 1)
           ORDER BY k.reason, k.value, c.id""", {"owner": owner})
    groups = {}
    for row in rows:
        group = groups.setdefault((row["reason"], row["value"]),
                                  {"reason": row["reason"], "value": row["value"], "contacts": []})
        group["contacts"].append({"id": row["id"], "name": row["name"]})
    return list(groups.values())


# --- vCard 4.0 (RFC 6350) -------------------------------------------------------------------


def vcard_text(value):
    """RFC 6350 §3.4: in a text value, backslash, comma, semicolon and line breaks are escaped."""
    value = value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
    return value.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def fold_line(line, limit=75):
    """RFC 6350 §3.2: lines longer than 75 octets are folded — CRLF and one space, which counts
    toward the next line's 75 — never inside a multi-octet UTF-8 character."""
    pieces, current, size = [], "", 0
    for char in line:
        width = len(char.encode("utf-8"))
        if size + width > limit:
            pieces.append(current)
            current, size = " ", 1
        current += char
        size += width
    pieces.append(current)
    return "\r\n".join(pieces)


def name_parts(name):
    """The structured N property (family; given) guessed from one name: "Smith, Ann" and
    "Ann Smith" → ("Smith", "Ann"); a single word is a given name."""
    if "," in name:
        family, _, given = name.partition(",")
        return family.strip(), given.strip()
    *given, family = name.split() or [""]
    return (family, " ".join(given)) if given else ("", family)


def vcard(contact):
    family, given = name_parts(contact["name"])
    lines = ["BEGIN:VCARD", "VERSION:4.0", f"FN:{vcard_text(contact['name'])}",
             # N: family;given;additional;prefixes;suffixes (§6.2.2)
             f"N:{vcard_text(family)};{vcard_text(given)};;;"]
    lines += [f"EMAIL:{vcard_text(address)}" for address in contact["emails"]]
    # §6.4.1: in vCard 4.0 a phone number is a tel: URI (RFC 3966)
    lines += [f"TEL;VALUE=uri:tel:{phone['number']}" for phone in contact["phones"]]
    if contact["company"]:
        lines.append(f"ORG:{vcard_text(contact['company'])}")
    if contact["notes"]:
        lines.append(f"NOTE:{vcard_text(contact['notes'])}")
    if contact["tags"]:
        lines.append("CATEGORIES:" + ",".join(vcard_text(tag) for tag in contact["tags"]))
    # REV is a timestamp (§4.3.5): basic format, no fraction of a second
    lines += [f"REV:{re.sub(r'[-:]|[.][0-9]+', '', contact['updated_at'])}", "END:VCARD"]
    return "".join(fold_line(line) + "\r\n" for line in lines)


# --- CSV import -----------------------------------------------------------------------------

CSV_COLUMNS = ["id", "name", "emails", "phones", "company", "notes", "tags", "created_at"]
SERVER_OWNED_COLUMNS = {"id", "created_at"}   # in an export; ignored by an import
LIST_COLUMNS = {"emails", "phones", "tags"}


def csv_row(contact):
    join = f"{LIST_SEPARATOR} ".join
    return [contact["id"], contact["name"], join(contact["emails"]),
            join(phone["number"] for phone in contact["phones"]), contact["company"],
            contact["notes"], join(contact["tags"]), contact["created_at"]]


def read_csv_records(text):
    """CSV text → its header and a list of (line number, {column: value}) for each record.

    The whole file is parsed before anything is written, so a file that is not CSV at all is
    one 400 and changes nothing. The line number is where the record starts (a quoted cell may
    span lines). Cells go through `unescape_formula`, so an export imports back unchanged."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        if "name" not in header:
            raise UnprocessableContent("the first line must be a header naming the columns, "
                                       f"with at least 'name' (the export's: {','.join(CSV_COLUMNS)})")
        unknown = [name for name in header if name not in CSV_COLUMNS]
        if unknown or len(set(header)) != len(header):
            raise UnprocessableContent(f"unknown or repeated columns: {', '.join(unknown) or 'repeated'}; "
                                       f"the columns are {','.join(CSV_COLUMNS)}")
        records, line = [], reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                records.append((line, cells))
            line = reader.line_num + 1
    except csv.Error as err:
        raise BadRequest(f"malformed CSV at line {reader.line_num}: {err}") from None
    return header, records


def row_fields(header, cells):
    """One CSV record as the body `validate` expects (list cells split on the separator)."""
    if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header):]):
        raise ValueError(f"has {len(cells)} cells but the header names {len(header)} columns")
    data = {}
    for name, cell in zip(header, cells):
        cell = unescape_formula(cell)
        if name in SERVER_OWNED_COLUMNS:
            continue
        if name in LIST_COLUMNS:
            data[name] = [item.strip() for item in cell.split(LIST_SEPARATOR) if item.strip()]
        else:
            data[name] = cell
    return data


def import_records(owner, header, records):
    """Create a contact per good record; report each bad one, by line.

    Every row is validated first, exactly as a POST body is. The good ones are then written in
    transactions of IMPORT_BATCH_ROWS rows, each row inside its own SAVEPOINT (a transaction
    inside the transaction): a row that fails half-way (its contact written, then an email
    refused by the unique index) is rolled back to its savepoint alone, and the rows before
    and after it stay. Batches, not one transaction for the whole file, because a transaction
    holds sqlite's write lock: every other writer would wait for the whole import."""
    created_count, skipped, valid = 0, [], []
    for line, cells in records:
        try:
            valid.append((line, validate(row_fields(header, cells), CONTACT_FIELDS)))
        except ValueError as err:
            skipped.append({"line": line, "reason": str(err)})
        except ValidationFailed as err:
            skipped.append({"line": line, "reason": "; ".join(
                f"{e['field']} {e['message']}" for e in err.errors)})
    for start in range(0, len(valid), IMPORT_BATCH_ROWS):
        with app.state.db.transaction() as conn:
            for line, values in valid[start:start + IMPORT_BATCH_ROWS]:
                conn.execute("SAVEPOINT import_row")
                try:
                    insert_contact(conn, owner, values)
                    created_count += 1
                except Conflict as err:   # an email taken by an older contact or an earlier row
                    conn.execute("ROLLBACK TO import_row")
                    skipped.append({"line": line, "reason": err.detail})
                finally:
                    conn.execute("RELEASE import_row")
    return {"created": created_count, "skipped": sorted(skipped, key=lambda s: s["line"])}


# --- routes ---------------------------------------------------------------------------------

USER = {401: "no valid X-User-Id header"}
STALE = "If-Match names a version that is no longer current; nothing changed"
SORT = Query("sort", "name (default), -name or -created_at", tuple(SORTS), "name")
FILTERS = [Query("q", "words (prefixes, any case or accents) of name, company, email; or phone digits"),
           Query("tag", "only contacts with this tag (repeat for several)"),
           Query("company", "only this company (any case or accents)"), SORT]
CONTACT_ERRORS = {404: "no such contact of yours", 409: "an email belongs to another contact",
                  412: STALE, 422: "bad, unknown or read-only fields", **USER}


@app.post("/contacts", request_schema=body_schema(CONTACT_FIELDS),
          responses={201: "the contact (Location, ETag)", **CONTACT_ERRORS})
def create_contact(request):
    """Create a contact: {"name", "emails", "phones", "company", "notes", "tags"}"""
    owner = require_user(request)
    values = validate(request.json_object(), CONTACT_FIELDS, read_only=READ_ONLY)
    with app.state.db.transaction() as conn:
        contact = own_contact(conn, owner, insert_contact(conn, owner, values))
    return contact_response(contact, 201)


@app.get("/contacts", query=[*FILTERS, *PAGE],
         responses={200: '{"items", "next_cursor"}', 400: "a bad sort, limit or cursor", **USER})
def list_contacts(request):
    """Your contacts, searched, filtered and sorted (paginated)"""
    owner = require_user(request)
    sort = SORTS[SORT.read(request)]
    limit, cursor = list_params(request, sort.shape)
    where, params = contact_filter(request, owner)
    if cursor:
        after, after_params = sort.after(cursor)
        where += f" AND {after}"
        params += after_params
    rows = app.state.db.query(
        f"SELECT * FROM contacts c WHERE {where} ORDER BY {sort.order_by} LIMIT ?", (*params, limit + 1))
    result = page(rows, limit, sort.cursor_values)
    result["items"] = [contact_json(c) for c in contacts_with_details(result["items"])]
    return result


@app.get("/contacts/duplicates",
         responses={200: '{"groups": [{"reason": "email"|"phone"|"name", "value", "contacts": '
                         '[{"id", "name"}]}]}', **USER})
def find_duplicates(request):
    """Groups of your contacts that look like the same person"""
    return {"groups": duplicate_groups(require_user(request))}


@app.get("/contacts/export.csv", blocking=True, query=FILTERS, media_type="text/csv",
         responses={200: "text/csv (RFC 4180), header row first; the import's format", **USER})
def export_contacts_csv(request):
    """Every matching contact as CSV (emails, phones and tags separated by ';')"""
    contacts = matching_contacts(request, require_user(request))
    return csv_download(csv_document(CSV_COLUMNS, map(csv_row, contacts)), "contacts.csv")


@app.get("/contacts/export.vcf", blocking=True, query=FILTERS, media_type="text/vcard",
         responses={200: "text/vcard: one vCard 4.0 (RFC 6350) per contact", **USER})
def export_contacts_vcard(request):
    """Every matching contact as vCard 4.0, for address books"""
    contacts = matching_contacts(request, require_user(request))
    return text_response("".join(map(vcard, contacts)), content_type="text/vcard; charset=utf-8",
                         headers={"Content-Disposition": 'attachment; filename="contacts.vcf"'})


@app.post("/contacts/import", blocking=True, body_limit=IMPORT_BODY_LIMIT, request_media_type="text/csv",
          request_schema={"type": "string", "description": "CSV in UTF-8: a header naming the columns, name "
                          f"among them (the export's: {','.join(CSV_COLUMNS)}), then a contact a record"},
          responses={201: '{"created": n ≥ 1, "skipped": [{"line", "reason"}]}',
                     200: "nothing was created (every row skipped, or none)",
                     400: "not CSV, or not UTF-8", 413: "more than 2 MiB",
                     415: "not Content-Type: text/csv", 422: "no header with a name column", **USER})
def import_contacts(request):
    """Import contacts from CSV (the export's columns); bad rows are reported and skipped"""
    owner = require_user(request)
    if request.content_type != "text/csv":
        raise UnsupportedMediaType("send the contacts as Content-Type: text/csv")
    try:
        text = request.body.decode("utf-8-sig")   # -sig: drop the byte-order mark Excel writes
    except UnicodeDecodeError:
        raise BadRequest("the CSV is not valid UTF-8") from None
    header, records = read_csv_records(text)
    result = import_records(owner, header, records)
    return json_response(result, 201 if result["created"] else 200)


@app.get("/contacts/{contact_id:int}", responses={200: "the contact (ETag)", **CONTACT_ERRORS})
def read_contact(request, contact_id):
    """One of your contacts"""
    with app.state.db.reading() as conn:
        row = find_owned(conn, "contacts", require_user(request), contact_id)
    return contact_response(contacts_with_details([row])[0])


def change_contact(request, owner, contact_id, values):
    """PUT and PATCH: check If-Match and write, in one transaction."""
    with app.state.db.transaction() as conn:
        row = owned_for_update(conn, "contacts", owner, contact_id, request.require_if_match)
        contact = update_contact(conn, owner, row, values)
    return contact_response(contact)


@app.put("/contacts/{contact_id:int}", request_schema=body_schema(CONTACT_FIELDS), if_match=True,
         responses={200: "the contact (ETag)", **CONTACT_ERRORS})
def replace_contact(request, contact_id):
    """Replace a contact: fields left out become empty (honours If-Match)"""
    owner = require_user(request)
    values = validate(request.json_object(), CONTACT_FIELDS, read_only=READ_ONLY)
    return change_contact(request, owner, contact_id, values)


@app.patch("/contacts/{contact_id:int}", request_schema=body_schema(CONTACT_FIELDS, partial=True),
           if_match=True,
           responses={200: "the contact (ETag)", **CONTACT_ERRORS})
def update_contact_fields(request, contact_id):
    """Change the fields given; a list given replaces the whole list (honours If-Match)"""
    owner = require_user(request)
    values = validate(request.json_object(), CONTACT_FIELDS, partial=True, read_only=READ_ONLY)
    return change_contact(request, owner, contact_id, values)


@app.delete("/contacts/{contact_id:int}", if_match=True, responses={204: "deleted", **CONTACT_ERRORS})
def delete_contact(request, contact_id):
    """Delete a contact and its emails, phones and tags (honours If-Match)"""
    # The emails, phones and tags go with it: ON DELETE CASCADE.
    delete_owned(app.state.db, "contacts", require_user(request), contact_id,
                 request.require_if_match)
    return no_content()


# --- running --------------------------------------------------------------------------------


def country_code(text):
    if not re.fullmatch(r"[1-9][0-9]{0,2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a country calling code (1–3 digits, like 44)")
    return text


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--default-country-code", type=country_code, default=None, metavar="CC",
                        help="calling code put in front of phone numbers sent without + "
                             "(e.g. 44; default: such numbers are refused)")
    args = parser.parse_args(argv)
    app.state.default_country_code = args.default_country_code
    app.state.db = app.open_database(args, SCHEMA)
    app.run(args)


if __name__ == "__main__":
    main()
