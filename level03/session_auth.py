"""Session-based authentication: log in once, and a cookie carries the session from then on.

What it teaches
  - Server-side sessions: the server keeps the session (who, since when, last seen, from where)
    in sqlite, and the browser holds only a random id in a cookie. The id is 256 random bits and
    is stored as its SHA-256 only, so a leaked table holds no usable session.
  - Cookies (RFC 6265): `Set-Cookie: sid=…; HttpOnly; SameSite=Lax; Path=/` (`Secure` with
    `--secure-cookies`), how a browser sends them back, and how a server deletes one
    (`Max-Age=0`).
  - Timeouts: an idle timeout that slides with every request (30 min) and an absolute one that
    does not (12 h), checked by the server, which is the only clock that counts.
  - Session fixation: every login issues a new id, and the id the client had before dies.
  - CSRF (cross-site request forgery): a browser attaches cookies to requests that another site
    makes it send, so every state-changing request with a session must also carry a token that
    only our own pages can read (`X-CSRF-Token`, the synchronizer token pattern), and must not
    come from another origin (`Origin`, else `Referer`).
  - A small HTML page (`GET /app`) that uses all of it from a real browser, under a strict
    Content-Security-Policy that allows exactly its own inline script and style (by hash).
  Standards: RFC 6265 (cookies), RFC 6454 (origins), RFC 9110 (401 and WWW-Authenticate), the
  OWASP Session Management and Cross-Site Request Forgery Prevention cheat sheets.

Identity is imported from level03/jwt_auth.py: the user store, the password policy and scrypt,
email normalisation, the login lockout and `authenticate_password` (one 401 for an unknown
email and a wrong password, in comparable time). This file adds the session around them.

What other projects import from here (names are stable):
  storage     SESSIONS_SCHEMA, SessionStore, public_session_id (the id itself is stored as
              jwt_auth's token_hash)
  cookies     COOKIE_NAME, session_cookie, cleared_cookie
  the flow    refuse_cross_site (a middleware step), check_same_origin, origin_of,
              require_session (a middleware step), authenticate_session, check_csrf_token,
              current_session, SESSION_CHALLENGE

What it leaves out: "remember me" cookies that outlive the browser, sessions shared by several
servers (Redis), re-authentication before sensitive actions, a password change (jwt_auth has
one), binding a session to a device. session_auth.md's "In production" says who does those.
"""
import base64
import hashlib
import hmac
import re
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, Forbidden, NotFound, Unauthorized, html_response,
                 json_response, no_content, trace_event)
from lib.app import http_url
from lib.listing import list_params, page
from lib.request import utc_timestamp
from lib.routing import PAGE
from lib.validation import body_schema, validate
from level03.jwt_auth import (AUTH_BODY_LIMIT, CREDENTIALS, LOGIN_FAILURES_SCHEMA, SIGN_UP,
                              USERS_SCHEMA, Credentials, add_password_arguments,
                              at_least_a_second, authenticate_password, create_account,
                              current_user, token_hash, user_json)

app = App("session_auth", "Log in once; a cookie carries a server-side session, guarded "
          "against fixation and CSRF.", port=8009)


# =============================================================================================
# Schema (beside jwt_auth's users and login failures)
# =============================================================================================

SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id           INTEGER PRIMARY KEY,      -- the row's number: internal, never the session id
    id_hash      TEXT NOT NULL UNIQUE,     -- SHA-256 (hex) of the session id; the id is not stored
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token   TEXT NOT NULL,            -- the session's synchronizer token
    created_at   REAL NOT NULL,            -- unix time: the absolute timeout counts from here
    last_seen_at REAL NOT NULL,            -- unix time: the idle timeout counts from here
    user_agent   TEXT NOT NULL,
    ip           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id);
CREATE INDEX IF NOT EXISTS sessions_by_last_seen ON sessions (last_seen_at);
CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at);
"""

SCHEMA = USERS_SCHEMA + LOGIN_FAILURES_SCHEMA + SESSIONS_SCHEMA


# =============================================================================================
# Cookies (RFC 6265)
# =============================================================================================

COOKIE_NAME = "sid"
# HttpOnly: no script can read the id (an XSS bug cannot steal the session).
# SameSite=Lax: the browser leaves the cookie off cross-site subrequests and cross-site POSTs,
# and sends it on top-level navigations (following a link to us keeps you signed in).
# Path=/: one cookie for the whole site. No Domain: only this exact host gets it back.
# No Max-Age or Expires: a "session cookie" the browser forgets when it closes; the server's
# timeouts decide how long the session really lives.
COOKIE_ATTRIBUTES = "HttpOnly; SameSite=Lax; Path=/"


def session_cookie(session_id, secure):
    """The `Set-Cookie` value that gives the browser its session id. `Secure` (only ever sent
    over HTTPS) belongs on every deployment that has TLS: `--secure-cookies`."""
    return f"{COOKIE_NAME}={session_id}; {COOKIE_ATTRIBUTES}" + ("; Secure" if secure else "")


def cleared_cookie(secure):
    """RFC 6265 §3.1: a server deletes a cookie by setting it again, with the same name, path
    and flags, already expired (`Max-Age=0`)."""
    return f"{COOKIE_NAME}=; Max-Age=0; {COOKIE_ATTRIBUTES}" + ("; Secure" if secure else "")


# =============================================================================================
# Sessions: random ids, stored hashed, with an idle and an absolute timeout
# =============================================================================================

SESSION_ID_BYTES = 32      # 256 bits; OWASP asks for at least 64 bits of entropy
CSRF_TOKEN_BYTES = 32
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")   # what secrets.token_urlsafe(32) makes
PUBLIC_ID_CHARS = 16       # hex digits of the id's hash that name a session in lists and URLs
MAX_USER_AGENT = 256       # characters kept of a User-Agent: a label, not evidence
TOUCH_AT_MOST_EVERY = 60.0 # seconds: see SessionStore.find


def public_session_id(id_hash):
    """How a session is named in `GET /auth/sessions` and `DELETE /auth/sessions/{id}`: the
    first 16 hex digits of its hash. Anyone who sees it (the user, a log line) learns nothing
    that leads back to the secret id."""
    return id_hash[:PUBLIC_ID_CHARS]


class SessionStore:
    """The `sessions` table. A session ends when it has been idle for `idle_ttl` seconds
    (sliding: each request moves it on) or `absolute_ttl` seconds after it began, whichever
    comes first. Both come from the flags at every check, so shortening them on a restart
    applies to the sessions that already exist."""

    def __init__(self, db, idle_ttl=1800.0, absolute_ttl=12 * 3600.0):
        self.db = db
        self.idle_ttl = idle_ttl
        self.absolute_ttl = absolute_ttl
        # Refreshing last_seen_at is a write, and sqlite has one writer: doing it on every
        # request would queue every request behind it. Once in a tenth of the idle time (at
        # most a minute) is enough; a session may then end that much early, never late.
        self.touch_every = min(TOUCH_AT_MOST_EVERY, idle_ttl / 10)

    def _live(self, now):
        """The SQL condition and parameters for "neither timeout has passed"."""
        return "last_seen_at > ? AND created_at > ?", (now - self.idle_ttl, now - self.absolute_ttl)

    def create(self, user_id, user_agent, ip, replacing=None, now=None):
        """Start a session: (the new id, its row). The id is always made here, never taken
        from the client (session fixation); `replacing`, the id the client had before, is
        deleted in the same transaction, so it cannot outlive the login."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        row = {"id_hash": token_hash(session_id), "user_id": user_id,
               "csrf_token": secrets.token_urlsafe(CSRF_TOKEN_BYTES), "created_at": now,
               "last_seen_at": now, "user_agent": user_agent[:MAX_USER_AGENT], "ip": ip}
        with self.db.transaction() as conn:
            live, params = self._live(now)
            conn.execute(f"DELETE FROM sessions WHERE NOT ({live})", params)  # expired ones
            if replacing and _SESSION_ID.fullmatch(replacing):
                conn.execute("DELETE FROM sessions WHERE id_hash = ?",
                             (token_hash(replacing),))
            conn.execute("INSERT INTO sessions (id_hash, user_id, csrf_token, created_at, "
                         "last_seen_at, user_agent, ip) VALUES (:id_hash, :user_id, :csrf_token, "
                         ":created_at, :last_seen_at, :user_agent, :ip)", row)
        return session_id, row

    def find(self, session_id, now=None):
        """The live session this id names (a row), or None: unknown, malformed or expired.
        An expired session is deleted on sight; a live one is marked as seen now."""
        if not _SESSION_ID.fullmatch(session_id):
            return None
        now = time.time() if now is None else now
        row = self.db.query_one("SELECT * FROM sessions WHERE id_hash = ?",
                                (token_hash(session_id),))
        if row is None:
            trace_event("session cookie names no session")
            return None
        public_id = public_session_id(row["id_hash"])
        if (now >= row["created_at"] + self.absolute_ttl
                or now >= row["last_seen_at"] + self.idle_ttl):
            self.db.execute("DELETE FROM sessions WHERE id = ?", (row["id"],))
            trace_event(f"session {public_id} expired: deleted")
            return None
        row = dict(row)
        if now - row["last_seen_at"] >= self.touch_every:
            self.db.execute("UPDATE sessions SET last_seen_at = ? WHERE id = ?", (now, row["id"]))
            row["last_seen_at"] = now
        trace_event(f"session {public_id} of user {row['user_id']}")
        return row

    def list_for_user(self, user_id, limit, after_row=None, now=None):
        """Up to `limit + 1` live sessions of a user, newest first, after the row `after_row`."""
        now = time.time() if now is None else now
        live, params = self._live(now)
        return self.db.query(
            f"SELECT * FROM sessions WHERE user_id = ? AND {live} AND id < ? "
            f"ORDER BY id DESC LIMIT ?",
            (user_id, *params, 2**63 - 1 if after_row is None else after_row, limit + 1))

    def revoke(self, row_id):
        self.db.execute("DELETE FROM sessions WHERE id = ?", (row_id,))

    def revoke_by_public_id(self, user_id, public_id, now=None):
        """Delete the user's live session with this public id; False when there is none (it
        is someone else's, expired, or never was)."""
        now = time.time() if now is None else now
        live, params = self._live(now)
        cursor = self.db.execute(
            f"DELETE FROM sessions WHERE user_id = ? AND substr(id_hash, 1, ?) = ? AND {live}",
            (user_id, PUBLIC_ID_CHARS, public_id, *params))
        return cursor.rowcount > 0

    def revoke_all(self, user_id):
        """Log out everywhere: every session of the user, this one included."""
        return self.db.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,)).rowcount

    def describe(self, row, current_hash=None):
        """What a client may see of a session: never its id, its hash or its CSRF token."""
        return {"id": public_session_id(row["id_hash"]),
                "created_at": utc_timestamp(row["created_at"]),
                "last_seen_at": utc_timestamp(row["last_seen_at"]),
                "idle_expires_at": utc_timestamp(min(row["last_seen_at"] + self.idle_ttl,
                                                    row["created_at"] + self.absolute_ttl)),
                "expires_at": utc_timestamp(row["created_at"] + self.absolute_ttl),
                "user_agent": row["user_agent"], "ip": row["ip"],
                "current": row["id_hash"] == current_hash}


# =============================================================================================
# CSRF, part one: refuse requests that another site's page made the browser send
# =============================================================================================

# RFC 9110 §9.2.1: these methods only read, so a forged one changes nothing. Every other
# method (POST, PUT, PATCH, DELETE, and any extension method) is "unsafe" here.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# A Host header (RFC 9110 §7.2): a name or an IPv6 literal, and an optional port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def origin_of(url):
    """The origin of an absolute http(s) URL as (scheme, host, port), RFC 6454 §4: the port
    made explicit, so `http://a.example` and `http://a.example:80` are one origin. None for
    anything else, including the opaque origin `null` that sandboxed pages send."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of range, a malformed IPv6 literal
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def origin_text(origin):
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port == DEFAULT_PORTS[scheme] else f":{port}")


def server_origin(request):
    """Our own origin, which a same-origin request names. With `--public-url`, that URL's (the
    one way to be right behind a proxy that changes the host). Without it, the request's
    `Host` header: the name the browser used to reach us. The scheme is `https` with
    `--secure-cookies` (a browser sends Secure cookies over HTTPS only, so it reaches us
    through TLS), else `http`, which is what this server itself speaks."""
    state = request.app.state
    if state.public_origin is not None:
        return state.public_origin
    host = request.headers.get("host", "")
    if not _HOST.fullmatch(host):
        return None
    return origin_of(("https" if state.secure_cookies else "http") + "://" + host)


def check_same_origin(request):
    """403 unless the request's `Origin` header (or, without one, its `Referer`) names our
    origin. Browsers send `Origin` with every POST, PUT, PATCH and DELETE, and a page cannot
    forge it. A request with neither header did not come from a browser page that says where
    it was (curl, a server, a privacy proxy that strips both): it goes on, and the CSRF token
    still guards every request that uses a session (OWASP CSRF cheat sheet: verifying origin
    with standard headers)."""
    origin = request.headers.get("origin")
    if origin is not None:
        header, value = "Origin", origin
    else:
        header, value = "Referer", request.headers.get("referer")
    if value is None:
        return
    ours = server_origin(request)
    if ours is None or origin_of(value) != ours:
        expected = origin_text(ours) if ours else "unknown: the request has no usable Host"
        trace_event(f"cross-site request refused: {header} is not our origin")
        raise Forbidden(f"cross-site request refused: the {header} header does not name this "
                        f"server's origin ({expected})")


def refuse_cross_site(request, call_next):
    """Middleware step: every unsafe request must come from our own origin, whether or not it
    carries a cookie and whether or not the route is public. A forged login ("login CSRF",
    which signs the victim in to the attacker's account) is refused here too."""
    if request.method not in SAFE_METHODS:
        check_same_origin(request)
    return call_next(request)


# =============================================================================================
# The session: who is calling, and CSRF, part two: the token
# =============================================================================================

# There is no registered HTTP authentication scheme for cookies (IANA's registry has Basic,
# Bearer, Digest, …). RFC 9110 §15.5.2 still requires a challenge on every 401, so this names
# the `Cookie` scheme of an expired Internet-Draft (draft-broyer-http-cookie-auth, 2009): where
# to log in, and which cookie carries the session. Browsers ignore schemes they do not know, so
# unlike `Basic` it never pops up a password dialog.
SESSION_CHALLENGE = (f'Cookie realm="{app.name}", form-action="/auth/login", '
                     f'cookie-name={COOKIE_NAME}')
CSRF_HEADER = "X-CSRF-Token"


def authenticate_session(request):
    """The live session (a row) the request's `sid` cookie names. No cookie → 401; a cookie
    that names no live session → 401 that also deletes the cookie, so the browser stops
    sending it."""
    session_id = request.cookies.get(COOKIE_NAME)
    if not session_id:
        raise Unauthorized("this route needs a session: log in with POST /auth/login",
                           www_authenticate=SESSION_CHALLENGE)
    row = request.app.state.sessions.find(session_id)
    if row is None:
        raise Unauthorized("the session has expired or was ended; log in again",
                           www_authenticate=SESSION_CHALLENGE,
                           headers={"Set-Cookie": cleared_cookie(request.app.state.secure_cookies)})
    return row


def check_csrf_token(request, session):
    """403 unless `X-CSRF-Token` equals the session's token. Another site can make a browser
    send our cookie, but cannot read the token (the same-origin policy keeps our answers from
    its scripts), and cannot add a custom header to a cross-origin request without our
    permission (CORS, which this server never grants). Compared in constant time."""
    given = request.headers.get(CSRF_HEADER.lower())
    if given is None:
        raise Forbidden(f"this request uses a session and needs the {CSRF_HEADER} header: the "
                        f"csrf_token of the login answer or of GET /auth/session")
    if not hmac.compare_digest(given.encode(), session["csrf_token"].encode()):
        raise Forbidden(f"the {CSRF_HEADER} header does not match this session's token")
    trace_event("CSRF token matches the session's")


def require_session(request, call_next):
    """Middleware step after `refuse_cross_site`: deny by default. Every route not declared
    `public=True` needs a live session (401); an unsafe one also needs its CSRF token (403).
    The session and its user land in `request.context` (read them with `current_session`
    and jwt_auth's `current_user`). What these routes answer is personal: never cached."""
    if request.route.meta.get("public"):
        return call_next(request)
    session = authenticate_session(request)
    if request.method not in SAFE_METHODS:
        check_csrf_token(request, session)
    user = request.app.state.auth.users.by_id(session["user_id"])
    request.context["session"], request.context["user"] = session, user_json(user)
    response = call_next(request)
    response.set_header("Cache-Control", "no-store")
    return response


def current_session(request):
    """The session row `require_session` found for this request."""
    return request.context["session"]


# =============================================================================================
# Routes: signing in and out
# =============================================================================================

NO_STORE = ("Cache-Control", "no-store")  # an answer that sets a session must never be cached


def start_session(request, user, status):
    """Answer a signup or a login: a new session in a new cookie, and its CSRF token in the
    body, the one place a page's script can read it from."""
    state = request.app.state
    session_id, row = state.sessions.create(
        user["id"], request.headers.get("user-agent", ""), request.client[0],
        replacing=request.cookies.get(COOKIE_NAME))
    trace_event(f"session {public_session_id(row['id_hash'])} started; any earlier one ended")
    body = {"user": user_json(user), "session": state.sessions.describe(row, row["id_hash"]),
            "csrf_token": row["csrf_token"]}
    headers = [("Set-Cookie", session_cookie(session_id, state.secure_cookies)), NO_STORE]
    if status == 201:
        headers.append(("Location", "/me"))
    return json_response(body, status, headers)


def signed_out(request):
    """204 that deletes the cookie."""
    return no_content({"Set-Cookie": cleared_cookie(request.app.state.secure_cookies)})


SIGNED_IN = "The user, the session, and its csrf_token; Set-Cookie: sid"
# Signup and login take JSON or an HTML form post with the same fields (`request.fields()`);
# the request schema (in /openapi.json) describes the JSON body.


@app.post("/auth/signup", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=body_schema(SIGN_UP), responses={201: SIGNED_IN})
def sign_up(request):
    """Create an account and sign in (JSON or an HTML form)"""
    user = create_account(request.app.state.auth, request.fields())
    return start_session(request, user, 201)


@app.post("/auth/login", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=body_schema(CREDENTIALS), responses={200: SIGNED_IN})
def log_in(request):
    """Check email and password (JSON or an HTML form); start a new session"""
    values = validate(request.fields(), CREDENTIALS)
    user = authenticate_password(request.app.state.auth, values["email"], values["password"],
                                 www_authenticate=SESSION_CHALLENGE)
    return start_session(request, user, 200)


@app.get("/auth/session", responses={200: "The user, this session, and its csrf_token"})
def read_session(request):
    """This session and its CSRF token (how a reloaded page gets the token back)"""
    session = current_session(request)
    return {"user": current_user(request),
            "session": request.app.state.sessions.describe(session, session["id_hash"]),
            "csrf_token": session["csrf_token"]}


@app.get("/me", responses={200: "The signed-in user"})
def read_me(request):
    """The signed-in user"""
    return current_user(request)


@app.post("/auth/logout", responses={204: "Session deleted; the cookie is cleared"})
def log_out(request):
    """End this session"""
    request.app.state.sessions.revoke(current_session(request)["id"])
    return signed_out(request)


@app.get("/auth/sessions", query=PAGE,
         responses={200: "The user's live sessions, newest first"})
def list_sessions(request):
    """Your live sessions: where and when, and which one is this"""
    sessions = request.app.state.sessions
    current = current_session(request)
    limit, cursor = list_params(request, (int,))
    rows = sessions.list_for_user(current["user_id"], limit, cursor[0] if cursor else None)
    return page(rows, limit, lambda row: [row["id"]],
                lambda row: sessions.describe(row, current["id_hash"]))


_PUBLIC_ID = re.compile(rf"[0-9a-f]{{{PUBLIC_ID_CHARS}}}")


@app.delete("/auth/sessions/{session_id}",
            responses={204: "Revoked", 404: "No such session of yours"})
def revoke_session(request, session_id):
    """Revoke one of your sessions, by the id GET /auth/sessions shows"""
    if not _PUBLIC_ID.fullmatch(session_id):
        raise BadRequest(f"path parameter 'session_id' must be {PUBLIC_ID_CHARS} hex digits",
                         errors=[{"field": "session_id", "message": "must be 16 hex digits"}])
    current = current_session(request)
    if not request.app.state.sessions.revoke_by_public_id(current["user_id"], session_id):
        raise NotFound("you have no live session with this id")
    if session_id == public_session_id(current["id_hash"]):
        return signed_out(request)  # that was this one
    return no_content()


@app.post("/auth/logout-all", responses={204: "Every session of yours deleted, this one too"})
def log_out_everywhere(request):
    """End every session of yours, this one included"""
    count = request.app.state.sessions.revoke_all(current_user(request)["id"])
    trace_event(f"{count} sessions ended")
    return signed_out(request)


app.use(refuse_cross_site)
app.use(require_session)


# =============================================================================================
# The page: GET /app
# =============================================================================================

PAGE_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 56rem; padding: 0 1rem; }
label { display: block; margin: .5rem 0; }
input { display: block; font: inherit; padding: .25rem; width: 20rem; max-width: 100%; }
button { font: inherit; margin: .5rem .5rem 0 0; }
table { border-collapse: collapse; font-size: .875rem; margin-top: 1rem; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: .25rem .5rem; text-align: left; }
tr.current { background: #eef6ee; }
#message { color: #a00; min-height: 1.5em; }
"""

# Everything the page shows comes from the server as data and goes in with textContent, never
# as HTML: a User-Agent of "<script>…" is displayed, not run. The CSRF token lives in a
# variable, not in localStorage, and comes from the login answer or GET /auth/session.
PAGE_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
let csrfToken = null;

async function call(method, path, body) {
  const headers = {};
  if (csrfToken !== null && method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  const response = await fetch(path, {method, headers, body, credentials: "same-origin"});
  const data = response.status === 204 ? null : await response.json();
  return {status: response.status, data};
}

function say(text) { $("message").textContent = text; }

function problemText(problem) {
  const fields = (problem.errors || []).map((e) => `${e.field} ${e.message}`);
  return [problem.detail || problem.title, ...fields].join("; ");
}

function showSignedOut(text) {
  csrfToken = null;
  $("email").textContent = "";
  $("sessions").replaceChildren();
  $("signed-in").hidden = true;
  $("signed-out").hidden = false;
  say(text);
}

async function showSignedIn(answer) {
  csrfToken = answer.csrf_token;
  $("email").textContent = answer.user.email;
  $("signed-out").hidden = true;
  $("signed-in").hidden = false;
  say("");
  await loadSessions();
}

function failed({status, data}) {
  if (status === 401) showSignedOut(problemText(data));
  else say(problemText(data));
}

async function loadSessions() {
  const answer = await call("GET", "/auth/sessions?limit=100");
  if (answer.status !== 200) return failed(answer);
  const rows = answer.data.items.map((session) => {
    const row = document.createElement("tr");
    if (session.current) row.className = "current";
    const cells = [session.id + (session.current ? " (this one)" : ""), session.created_at,
                   session.last_seen_at, session.user_agent, session.ip];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const button = document.createElement("button");
    button.textContent = session.current ? "Log out" : "Revoke";
    button.addEventListener("click", () => revoke(session));
    const cell = document.createElement("td");
    cell.append(button);
    row.append(cell);
    return row;
  });
  $("sessions").replaceChildren(...rows);
}

async function revoke(session) {
  const answer = await call("DELETE", "/auth/sessions/" + session.id);
  if (answer.status !== 204) return failed(answer);
  if (session.current) showSignedOut("Logged out.");
  else await loadSessions();
}

async function logOut(path, text) {
  const answer = await call("POST", path);
  if (answer.status === 204) showSignedOut(text);
  else failed(answer);
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const path = event.submitter && event.submitter.id === "signup" ? "/auth/signup" : "/auth/login";
  const answer = await call("POST", path, new URLSearchParams(new FormData(form)));
  if (answer.status === 200 || answer.status === 201) {
    form.reset();
    await showSignedIn(answer.data);
  } else {
    say(problemText(answer.data));
  }
});
$("logout").addEventListener("click", () => logOut("/auth/logout", "Logged out."));
$("logout-all").addEventListener("click",
                                () => logOut("/auth/logout-all", "Logged out everywhere."));
$("refresh").addEventListener("click", () => loadSessions());

if (document.body.hasAttribute("data-signed-out")) {
  showSignedOut("");
} else {
  call("GET", "/auth/session").then((answer) => {
    if (answer.status === 200) return showSignedIn(answer.data);
    showSignedOut("");
  });
}
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>session_auth</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>session_auth</h1>
<p id="message" role="status"></p>
<section id="signed-out" hidden>
  <h2>Log in</h2>
  <form id="login-form" method="post" action="/auth/login">
    <label>Email <input name="email" type="email" autocomplete="username" required></label>
    <label>Password
      <input name="password" type="password" autocomplete="current-password" required></label>
    <button type="submit" id="login">Log in</button>
    <button type="submit" id="signup" formaction="/auth/signup">Sign up</button>
  </form>
</section>
<section id="signed-in" hidden>
  <p>Signed in as <strong id="email"></strong></p>
  <button type="button" id="logout">Log out</button>
  <button type="button" id="logout-all">Log out everywhere</button>
  <h2>Your sessions</h2>
  <button type="button" id="refresh">Refresh</button>
  <table>
    <thead><tr><th>id</th><th>created</th><th>last seen</th><th>user agent</th><th>IP</th>
      <th></th></tr></thead>
    <tbody id="sessions"></tbody>
  </table>
</section>
<script>{PAGE_SCRIPT}</script>
</body>
</html>
"""


def csp_hash(text):
    """CSP Level 3 §8.3: `'sha256-<base64 of the SHA-256 of the element's text>'` allows that
    one inline script or style, byte for byte, and nothing else."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


# No 'unsafe-inline', no other source: an injected <script> or style="" does not run, and the
# page can only talk to its own origin (connect-src, form-action) and cannot be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {csp_hash(PAGE_SCRIPT)}; "
                               f"style-src {csp_hash(PAGE_STYLE)}; connect-src 'self'; "
                               f"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Vary": "Cookie",   # the page says whether the request had a session cookie
}
# Without a sid cookie there is no session to ask for, and asking would cost a 401 that the
# browser's console reports as an error on every signed-out visit: the page tells its script.
SIGNED_OUT_PAGE = PAGE.replace("<body>", "<body data-signed-out>", 1)


@app.get("/app", public=True, media_type="text/html", responses={200: "An HTML page: log in, your sessions, log out"})
def serve_page(request):
    """A small page that signs in with the cookie and sends the CSRF header"""
    signed_out = COOKIE_NAME not in request.cookies
    return html_response(SIGNED_OUT_PAGE if signed_out else PAGE, headers=PAGE_HEADERS)


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--idle-ttl", type=at_least_a_second, default=1800.0,
                        help="end a session unused this many seconds (default 1800)")
    parser.add_argument("--absolute-ttl", type=at_least_a_second, default=12 * 3600.0,
                        help="end any session this many seconds after login (default 43200)")
    parser.add_argument("--secure-cookies", action="store_true",
                        help="mark the cookie Secure (HTTPS only); use it behind TLS")
    parser.add_argument("--public-url", type=http_url,
                        help="the URL browsers use to reach this server (e.g. behind a proxy); "
                             "its origin is the only one allowed to send unsafe requests "
                             "(default: the request's Host)")
    add_password_arguments(parser)   # jwt_auth's --scrypt-n and --lockout-s
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    # jwt_auth's Credentials: what authenticate_password and create_account need (the user
    # store, the lockout, the scrypt cost, the dummy hash for unknown emails). No tokens here.
    app.state.auth = Credentials.from_args(db, args)
    app.state.sessions = SessionStore(db, args.idle_ttl, args.absolute_ttl)
    app.state.secure_cookies = args.secure_cookies
    app.state.public_origin = origin_of(args.public_url) if args.public_url else None
    app.run(args)


if __name__ == "__main__":
    main()
