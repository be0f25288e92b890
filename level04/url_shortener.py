"""URL shortener — short links that redirect, count their clicks, and belong to whoever made them.

What it teaches
  - Redirects (RFC 9110 §15.4): `302 Found` with `Cache-Control: no-store`, so every click
    reaches the server and is counted; or, with `--permanent`, `301 Moved Permanently` with
    `Cache-Control: public, max-age=86400`, which browsers and CDNs keep: faster for the visitor,
    but clicks served from a cache are never seen and a changed target takes a day to show.
  - Codes nobody can guess or enumerate: 7 random base62 characters from `secrets` (62**7, about
    3.5 * 10**12 codes), never a counter. A custom alias is 3–32 of `[A-Za-z0-9_-]`, unique (409),
    and may not be the path of one of this server's own routes (`/health`, `/links`), which it
    would shadow: the router itself is asked.
  - Links are user input that other people will open: only absolute `http`/`https` URLs (no
    `javascript:`, `data:`, `file:`), at most 2048 characters, with a host and no user:password
    part (`https://bank.example@evil.example` is a phishing classic), IDNs normalised to their
    ASCII form (IDNA, RFC 3490, the stdlib `idna` codec), control characters refused (a CR/LF
    in a `Location` header would split the response), and nothing that points back at this
    shortener's own `--public-url` origin (loops and chains of short links).
  - A secret shown once: creating a link answers a `manage_token` (256 random bits). Only its
    SHA-256 is stored (level03/jwt_auth.py's `token_hash`), compared in constant time; it is the
    `Authorization: Bearer …` for the link's stats, PATCH and DELETE (401 without it, 403 when
    it is not this link's).
  - The hot path: the redirect reads from an in-memory cache of recent links (bounded, LRU,
    invalidated on PATCH and DELETE) and does no SQL. Clicks are appended to an in-memory buffer
    and written in batches by one background thread, every `--flush-interval` seconds or sooner
    when a batch is full; a clean exit writes what is left (a shutdown hook), so no click that
    was answered is lost to SIGTERM. (A kill -9 loses at most the last interval's clicks.)
  - Privacy by construction: a unique visitor is an HMAC-SHA256 of IP + user agent under a
    random salt kept in the database; the raw IP is never stored, not even in the buffer.
    Referrers are kept as their host only.

Standards: RFC 9110 (redirects, caching, 401/403), RFC 9111 (Cache-Control), RFC 3986 (URIs),
RFC 3490/5891 (IDNA), RFC 6750 (bearer tokens), RFC 9457 (problem details), RFC 3339 (times).

Left out: accounts owning many links (a link's token is its only credential), QR codes, link
previews and malware scanning of targets, geo/device breakdowns, custom domains.
url_shortener.md's "In production" says who does those.

    python level04/url_shortener.py [--public-url URL] [--permanent] [--flush-interval S] [--db PATH]
"""
import collections
import datetime
import hashlib
import hmac
import html
import ipaddress
import re
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, Forbidden, Gone, MethodNotAllowed, NotFound, Unauthorized, created,
                 json_response, no_content, trace_event)
from lib.app import bounded, http_url
from lib.request import utc_timestamp
from lib.response import Response
from lib.validation import Boolean, Field, Invalid, Text, body_schema, validate
from level01.counter import etag
from level03.jwt_auth import SECRETS_SCHEMA, bearer_token, load_or_create_secret, token_hash
from level03.password_reset import site_url

app = App("url_shortener", "Short links: random codes or aliases, 302 redirects, click stats "
          "counted off the hot path, a manage token per link.", port=8014)

SCHEMA = SECRETS_SCHEMA + """
CREATE TABLE IF NOT EXISTS links (
    code        TEXT PRIMARY KEY,          -- 7 random base62 characters, or the alias chosen
    url         TEXT NOT NULL,             -- the target, normalised ('' once deleted)
    token_hash  TEXT NOT NULL,             -- SHA-256 of the manage token, shown only once
    expires_at  TEXT,                      -- RFC 3339 UTC; NULL: never
    disabled    INTEGER NOT NULL DEFAULT 0,
    deleted     INTEGER NOT NULL DEFAULT 0, -- kept as a tombstone: a code is never given again
    version     INTEGER NOT NULL DEFAULT 1, -- the ETag
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clicks (
    id            INTEGER PRIMARY KEY,
    code          TEXT NOT NULL REFERENCES links (code),
    day           TEXT NOT NULL,           -- YYYY-MM-DD, UTC
    clicked_at    TEXT NOT NULL,           -- RFC 3339 UTC
    visitor       TEXT NOT NULL,           -- HMAC of IP + user agent: never the IP itself
    referrer_host TEXT                     -- the Referer's host, NULL without one
);
CREATE INDEX IF NOT EXISTS clicks_by_code ON clicks (code, day);
"""

# =============================================================================================
# Codes and aliases
# =============================================================================================

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CODE_LENGTH = 7
ALIAS = r"[A-Za-z0-9_-]{3,32}"
CODE_PATTERN = re.compile(ALIAS)      # every code is a possible alias: the redirect's first check
NEW_CODE_ATTEMPTS = 5                 # a collision in 3.5e12 codes is rare; five in a row is a bug


def random_code():
    """7 characters from `secrets` (the OS's CSPRNG): unguessable, so nobody can walk the
    links by counting (`/a1`, `/a2`, …) as with sequential ids."""
    return "".join(secrets.choice(BASE62) for _ in range(CODE_LENGTH))


def shadows_a_route(alias):
    """True when `/alias` is already a path of this server (`/health`, `/links`): the router
    answers it with another route, or a 405, so the short link could never be reached."""
    try:
        route, _ = app.router.match("GET", "/" + alias)
    except MethodNotAllowed:  # the path exists, for other methods
        return True
    return route.handler is not follow_link


# =============================================================================================
# Validating a target URL
# =============================================================================================

MAX_URL = 2048
MAX_HOST = 253                                # RFC 1035 §2.3.4: a referrer's host is cut there
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")  # controls, space, backslash (browsers read it as /)
# What /openapi.json promises is accepted (a contract tester sends such URLs); the check below
# also takes IDNs and IPv6 literals, which a pattern cannot describe well.
URL_SCHEMA_PATTERN = (r"^https?://[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                      r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[1-9][0-9]{0,3})?"
                      r"(?:[/?#][!-\[\]-~]*)?$")


def ascii_host(host):
    """The host as it goes on the wire: an IP literal as written, a name lower-cased and IDNA
    encoded (`Bücher.example` → `xn--bcher-kva.example`); None when it is not a valid host."""
    try:
        return f"[{ipaddress.IPv6Address(host.strip('[]'))}]" if ":" in host else \
            str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        name = host.lower().rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def percent_encode(text):
    """Non-ASCII characters of a path, query or fragment as UTF-8 %-escapes (RFC 3986 §2.5):
    a `Location` header carries ASCII."""
    return quote(text, safe="".join(chr(c) for c in range(0x21, 0x7f)))


def origin(parts):
    """(scheme, host, port) of a split URL, with the scheme's default port filled in."""
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}[parts.scheme]


def normalise_url(text, own_origin):
    """`text` as a safe redirect target, normalised; raises `Invalid` saying why not."""
    if len(text) > MAX_URL:
        raise Invalid(f"must be at most {MAX_URL} characters")
    if _FORBIDDEN.search(text):
        raise Invalid("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a bracketed host that is no IPv6 address, a port out of range
        raise Invalid("must name a valid host and port") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Invalid("must be an absolute http or https URL, like https://example.com/page")
    if "@" in parts.netloc:
        raise Invalid("must not carry a user name or password")
    host = ascii_host(parts.hostname or "")
    if host is None or port == 0:
        raise Invalid("must name a valid host and port")
    url = f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{percent_encode(parts.path)}"
    if parts.query:
        url += "?" + percent_encode(parts.query)
    if parts.fragment:
        url += "#" + percent_encode(parts.fragment)
    if len(url) > MAX_URL:
        raise Invalid(f"must be at most {MAX_URL} characters once normalised")
    if origin(urlsplit(url)) == own_origin:
        raise Invalid("must not point at this shortener itself")
    return url


class TargetUrl(Field):
    """A link's target, checked by `normalise_url` against this server's own origin."""

    def shape(self):
        return {"type": "string", "minLength": 1, "maxLength": MAX_URL,
                "pattern": URL_SCHEMA_PATTERN,
                "description": "an absolute http(s) URL; IDNs are normalised"}

    def clean(self, value):
        if not isinstance(value, str):
            raise Invalid("must be a string")
        return normalise_url(value.strip(), own_origin())


_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)")


class Instant(Field):
    """An RFC 3339 date-time with its offset, returned as UTC text (`2026-11-24T06:41:00Z`);
    with `future=True` it must not have passed yet."""

    def __init__(self, *, future=False, **kw):
        super().__init__(**kw)
        self.future = future

    def shape(self):
        return {"type": "string", "format": "date-time"}

    def clean(self, value):
        try:
            if not isinstance(value, str) or not _RFC3339.fullmatch(value):
                raise ValueError
            moment = datetime.datetime.fromisoformat(value.upper().replace(" ", "T"))
            moment = moment.astimezone(datetime.timezone.utc)
        except (ValueError, OverflowError):
            raise Invalid("must be an RFC 3339 time with an offset, e.g. 2026-11-24T06:41:00Z") \
                from None
        if self.future and moment.timestamp() <= time.time():
            raise Invalid("must be in the future")
        return utc_timestamp(moment)


NEW_LINK = {
    "url": TargetUrl(required=True),
    "alias": Text(3, 32, pattern=ALIAS, pattern_text="must be 3–32 of A–Z, a–z, 0–9, '_', '-'"),
    "expires_at": Instant(future=True, nullable=True,
                          description="when the link stops working, in the future; null: never"),
}
LINK_CHANGES = {
    "url": TargetUrl(),
    "expires_at": Instant(nullable=True, description="null: never; a past time expires it now"),
    "disabled": Boolean(description="true: the link answers 410 until enabled again"),
}
SERVER_OWNED = {"code", "short_url", "manage_token", "created_at", "updated_at", "version"}


# =============================================================================================
# Links: store, cache, render
# =============================================================================================

class Settings(NamedTuple):
    public_url: str | None   # `--public-url`; None: http://localhost:PORT (password_reset's site_url)
    host: str
    permanent: bool


def base_url():
    return site_url(app.state.settings, app.port)


def own_origin():
    return origin(urlsplit(base_url()))


class Target(NamedTuple):
    """What the redirect needs to know about a link: what the cache holds."""
    url: str
    expires_at: float | None   # unix time
    disabled: bool
    deleted: bool


def load_target(code):
    row = app.state.db.query_one(
        "SELECT url, expires_at, disabled, deleted FROM links WHERE code = ?", (code,))
    if row is None:
        return None
    expires = row["expires_at"]
    return Target(row["url"], None if expires is None else
                  datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp(),
                  bool(row["disabled"]), bool(row["deleted"]))


class LinkCache:
    """The most recently used links, at most `size`, in memory: a redirect of a cached code
    runs no SQL. A change is written to sqlite first, then `invalidate`d here. A generation
    counter closes the race where a redirect read the old row just before the change and would
    put it back after the invalidation: a load started before any invalidation is not kept."""

    def __init__(self, size):
        self.size = size
        self.entries = collections.OrderedDict()
        self.generation = 0
        self.lock = threading.Lock()

    def lookup(self, code, load):
        with self.lock:
            target = self.entries.get(code)
            if target is not None:
                self.entries.move_to_end(code)
                return target
            generation = self.generation
        target = load(code)
        if target is not None:
            with self.lock:
                if generation == self.generation:
                    self.entries[code] = target
                    if len(self.entries) > self.size:
                        self.entries.popitem(last=False)
        return target

    def invalidate(self, code):
        with self.lock:
            self.generation += 1
            self.entries.pop(code, None)


def render_link(row):
    return {"code": row["code"], "short_url": f"{base_url()}/{row['code']}", "url": row["url"],
            "expires_at": row["expires_at"], "disabled": bool(row["disabled"]),
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def insert_link(db, url, alias, expires_at, token):
    """Store a new link under `alias`, or under a fresh random code (retried on a collision)."""
    now = utc_timestamp()
    for code in [alias] if alias else (random_code() for _ in range(NEW_CODE_ATTEMPTS)):
        try:
            with db.transaction() as conn:
                conn.execute("INSERT INTO links (code, url, token_hash, expires_at, created_at, "
                             "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (code, url, token_hash(token), expires_at, now, now))
                return conn.execute("SELECT * FROM links WHERE code = ?", (code,)).fetchone()
        except sqlite3.IntegrityError:
            trace_event(f"code {code} is taken")
    if alias:
        raise Conflict(f"the alias {alias!r} is taken", errors=[{"field": "alias", "message": "is taken"}])
    raise RuntimeError("no free random code after several attempts")


def authorised_link(conn, request, code):
    """The live link `code` if the request carries its manage token: 401 without a bearer
    token, 404 for no (or a deleted) link, 403 for another link's token."""
    token = bearer_token(request)
    if not token:
        raise Unauthorized("send the link's manage_token: Authorization: Bearer <token>",
                           www_authenticate="Bearer")
    row = conn.execute("SELECT * FROM links WHERE code = ? AND NOT deleted", (code,)).fetchone()
    if row is None:
        raise NotFound(f"no link /{code}")
    # Constant time: how long the comparison takes tells nothing about how much of a guess matched.
    if not hmac.compare_digest(token_hash(token), row["token_hash"]):
        raise Forbidden("this token does not manage this link")
    return row


# =============================================================================================
# Clicks: counted off the redirect path, written in batches
# =============================================================================================

BATCH_SIZE = 500          # a full batch wakes the writer before its interval is up
MAX_PENDING = 100_000     # clicks in memory at most; past it a redirect waits for the writer
DEFAULT_FLUSH_S = 0.5


class Click(NamedTuple):
    code: str
    day: str
    clicked_at: str
    visitor: str
    referrer_host: str | None


def visitor_id(salt, request):
    """One visitor, without keeping who it is: HMAC-SHA256 of IP and user agent under the
    database's salt. Without the salt (never shown) nobody can test a guessed IP against it."""
    seen = f"{request.client[0]}\n{request.header('User-Agent', '')}".encode("utf-8", "replace")
    return hmac.new(salt, seen, hashlib.sha256).hexdigest()[:32]


def referrer_host(request):
    referer = request.header("Referer")
    try:
        host = urlsplit(referer).hostname if referer else None
    except ValueError:
        return None
    return host[:MAX_HOST] if host else None


class ClickRecorder:
    """Clicks in memory, written to sqlite in batches by one thread: a redirect appends to a
    list (no SQL, no fsync), and one transaction stores hundreds of clicks. `close()` at
    shutdown stops the thread and writes what is left."""

    def __init__(self, db, interval):
        self.db = db
        self.interval = interval
        self.pending = []
        self.lock = threading.Condition()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="click-writer", daemon=True)
        self.thread.start()

    def record(self, click):
        with self.lock:
            while len(self.pending) >= MAX_PENDING and not self.stopping:
                self.wake.set()
                self.lock.wait(1)   # backpressure: the writer is behind; never drop a click
            self.pending.append(click)
            if len(self.pending) >= BATCH_SIZE:
                self.wake.set()

    def flush(self):
        with self.lock:
            batch, self.pending = self.pending, []
            self.lock.notify_all()
        if not batch:
            return
        try:
            with self.db.transaction() as conn:
                # A link deleted while its clicks waited here: its clicks are deleted too.
                conn.executemany("INSERT INTO clicks (code, day, clicked_at, visitor, "
                                 "referrer_host) SELECT ?1, ?2, ?3, ?4, ?5 FROM links "
                                 "WHERE code = ?1 AND NOT deleted", batch)
        except Exception as error:  # disk full, locked: keep them for the next attempt
            sys.stderr.write(f"error: {len(batch)} clicks not written yet: {error}\n")
            with self.lock:
                self.pending[:0] = batch

    def _run(self):
        while not self.stopping:
            self.wake.wait(self.interval)
            self.wake.clear()
            self.flush()

    def close(self):
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.wake.set()
        self.thread.join()
        self.flush()


def click_stats(conn, code):
    (total, unique), = conn.execute(
        "SELECT count(*), count(DISTINCT visitor) FROM clicks WHERE code = ?", (code,))
    per_day = conn.execute("SELECT day, count(*) FROM clicks WHERE code = ? GROUP BY day "
                           "ORDER BY day", (code,))
    referrers = conn.execute(
        "SELECT referrer_host, count(*) AS n FROM clicks WHERE code = ? AND referrer_host "
        "IS NOT NULL GROUP BY referrer_host ORDER BY n DESC, referrer_host LIMIT 10", (code,))
    return {"total_clicks": total, "unique_visitors": unique,
            "clicks_per_day": {day: n for day, n in per_day},
            "top_referrers": [{"host": host, "clicks": n} for host, n in referrers]}


# =============================================================================================
# Routes
# =============================================================================================

MANAGED = {401: "No manage token", 403: "Not this link's manage token", 404: "No such link"}
ALIAS_SCHEMA = {"code": {"pattern": f"^{ALIAS}$"}}


@app.post("/links", request_schema=body_schema(NEW_LINK), status=201, body_limit=16 * 1024,
          responses={201: "The link, with its manage_token (shown this once)",
                     409: "The alias is taken, or is a path of this server"})
def create_link(request):
    """Shorten a URL: a random code, or the alias asked for"""
    values = validate(request.json_object(), NEW_LINK, read_only=SERVER_OWNED)
    alias, expires_at = values.get("alias"), values.get("expires_at")
    if alias and shadows_a_route(alias):
        raise Conflict(f"/{alias} is a path of this server",
                       errors=[{"field": "alias", "message": "is a path of this server"}])
    token = secrets.token_urlsafe(32)
    row = insert_link(app.state.db, values["url"], alias, expires_at, token)
    return created({**render_link(row), "manage_token": token}, f"/links/{row['code']}",
                   {"ETag": etag(row["version"]), "Cache-Control": "no-store"})


def one_link(row):
    return json_response(render_link(row), headers={"ETag": etag(row["version"])})


@app.get("/links/{code}", path_schemas=ALIAS_SCHEMA, responses={200: "The link", **MANAGED})
def read_link(request, code):
    """Read a link (manage token)"""
    with app.state.db.reading() as conn:
        return one_link(authorised_link(conn, request, code))


@app.patch("/links/{code}", path_schemas=ALIAS_SCHEMA, if_match=True,
           request_schema=body_schema(LINK_CHANGES, partial=True),
           responses={200: "The changed link", **MANAGED})
def change_link(request, code):
    """Change a link's url, expires_at or disabled (manage token; If-Match: its ETag)"""
    changes = validate(request.json_object(), LINK_CHANGES, partial=True, read_only=SERVER_OWNED)
    if "disabled" in changes:
        changes["disabled"] = int(changes["disabled"])
    with app.state.db.transaction() as conn:
        row = authorised_link(conn, request, code)
        request.require_if_match(etag(row["version"]))
        if any(row[column] != value for column, value in changes.items()):
            assignments = "".join(f"{column} = ?, " for column in changes)  # names from the code
            conn.execute(f"UPDATE links SET {assignments}version = version + 1, updated_at = ? "
                         "WHERE code = ?", (*changes.values(), utc_timestamp(), code))
            row = conn.execute("SELECT * FROM links WHERE code = ?", (code,)).fetchone()
    app.state.cache.invalidate(code)
    return one_link(row)


@app.delete("/links/{code}", path_schemas=ALIAS_SCHEMA, if_match=True, status=204,
            responses={204: "Deleted: the code answers 404 from now on", **MANAGED})
def delete_link(request, code):
    """Delete a link and its clicks (manage token); its code is never given out again"""
    with app.state.db.transaction() as conn:
        row = authorised_link(conn, request, code)
        request.require_if_match(etag(row["version"]))
        conn.execute("UPDATE links SET deleted = 1, url = '', version = version + 1, "
                     "updated_at = ? WHERE code = ?", (utc_timestamp(), code))
        conn.execute("DELETE FROM clicks WHERE code = ?", (code,))
    app.state.cache.invalidate(code)
    return no_content()


@app.get("/links/{code}/stats", path_schemas=ALIAS_SCHEMA,
         responses={200: "Clicks: total, unique visitors, per UTC day, top 10 referrer hosts",
                    **MANAGED})
def link_stats(request, code):
    """Click statistics of a link (manage token)"""
    with app.state.db.reading() as conn:
        authorised_link(conn, request, code)
        return click_stats(conn, code)


REDIRECT_PAGE = {"description": "A short HTML note with the link (RFC 9110 §15.4)",
                 "content": {"text/html": {"schema": {"type": "string"}}}}


@app.get("/{code}", path_schemas=ALIAS_SCHEMA, status=302, media_type="text/html",
         response_schema={"type": "string"},
         responses={302: "To the target; Cache-Control: no-store (every click is counted)",
                    301: {**REDIRECT_PAGE, "description": "With --permanent: cacheable a day"},
                    404: "No such link, or deleted", 410: "Expired or disabled"})
def follow_link(request, code):
    """Redirect to the link's target (HEAD: not counted as a click)"""
    target = app.state.cache.lookup(code, load_target) if CODE_PATTERN.fullmatch(code) else None
    if target is None or target.deleted:
        raise NotFound(f"no link /{code}")
    now = time.time()
    if target.disabled or (target.expires_at is not None and target.expires_at <= now):
        raise Gone(f"the link /{code} is {'disabled' if target.disabled else 'expired'}")
    if request.method == "GET":
        state = app.state
        state.clicks.record(Click(code, utc_timestamp(now)[:10], utc_timestamp(now),
                                  visitor_id(state.salt, request), referrer_host(request)))
    status, cache = (301, "public, max-age=86400") if app.state.settings.permanent else \
        (302, "no-store")
    page = f'<a href="{html.escape(target.url)}">moved here</a>\n'
    return Response(page.encode(), status, {"Location": target.url, "Cache-Control": cache},
                    "text/html; charset=utf-8")


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--public-url", type=http_url,
                        help="where users reach this server; short links are built on it "
                             "(default http://localhost:PORT, the port really listened on)")
    parser.add_argument("--permanent", action="store_true",
                        help="answer 301, cacheable for a day, instead of 302 no-store "
                             "(faster for visitors; cached clicks are not counted)")
    parser.add_argument("--flush-interval", default=DEFAULT_FLUSH_S,
                        type=bounded(float, "a duration from 0.01 to 3600 s", at_least=0.01,
                                     at_most=3600),
                        help=f"seconds clicks wait in memory before a batch is written "
                             f"(default {DEFAULT_FLUSH_S})")
    parser.add_argument("--cache-size", default=10_000,
                        type=bounded(int, "a number from 1 to 10000000", at_least=1,
                                     at_most=10_000_000),
                        help="links kept in memory for redirects (default 10000)")
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    state = app.state
    state.db = db
    state.settings = Settings(args.public_url, args.host, args.permanent)
    state.salt = load_or_create_secret(db, "visitor_salt")
    state.cache = LinkCache(args.cache_size)
    state.clicks = ClickRecorder(db, args.flush_interval)
    app.shutdown_hooks.append(state.clicks.close)   # hooks run in reverse: before db.close
    app.run(args)


if __name__ == "__main__":
    main()
