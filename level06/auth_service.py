"""Auth service: the one process that owns credentials, asked by the others who a token names.

What it teaches
  - Token introspection (RFC 7662): a resource server (here user_service) does not verify
    tokens itself; it posts the token to `POST /internal/introspect` as a form
    (`token=…&token_type_hint=…`, §2.1) and gets `{"active": true, "sub", "exp", …}` or
    `{"active": false}` and nothing more (§2.2: an inactive token says nothing about why).
    Because the answer is asked for, a token can stop working before it expires: `POST
    /auth/revoke` (RFC 7009) revokes an access token by its `jti`, which a service checking
    JWT signatures locally would never hear of.
  - Service credentials: the internal routes take `Authorization: Bearer <service token>`
    (`--service-token`, else `SERVICE_TOKEN`, else a random one kept in `service-token`
    beside the database: `data/service-token`, mode 0600), compared in constant time, and
    answer 401 to everyone else (§2.1: the endpoint must be protected, or it is an oracle
    for stolen tokens).
  - The transactional outbox: signup writes the user and a `user.created` event in ONE sqlite
    transaction (jwt_auth's `create_account` hook), so there is never a user without its event
    nor an event without its user. A relay thread (`OutboxRelay`) posts each event to
    user_service's `POST /internal/events` until it is accepted, retrying with exponential
    backoff. Delivery is at-least-once: a crash between "accepted" and "marked delivered"
    sends the event again, and the consumer recognises its id.

Signup, login, refresh, logout, passwords and token signing are level03/jwt_auth.py's, imported.

Why a plain outbox table and not level05/job_processor's queue: the queue could carry it (a
job per event, its retries and dead letters), but then the lesson disappears into the
queue's leases and workers. The outbox is the pattern itself, in forty lines: a table written
with the business row, a loop that drains it, a column that says "delivered".

Left out: OAuth 2.0 clients, scopes and grants (RFC 6749), client authentication beyond one
shared service token (mTLS, private_key_jwt), JWKS and asymmetric keys, a dead-letter state
for events user_service keeps refusing (they are retried, at most every `--retry-max-s`).

    python level06/auth_service.py [--user-service-url URL] [--service-token T] [--db PATH]
"""
import hmac
import http.client
import json
import os
import random
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, Unauthorized, created, json_response, trace_event
from lib.app import bounded, exit_usage_error, http_url, positive_seconds
from lib.request import utc_timestamp
from lib.storage import REPO_ROOT
from level03.jwt_auth import (AUTH_BODY_LIMIT, SCHEMA as IDENTITY_SCHEMA, Auth, InvalidToken,
                              add_auth_arguments, add_token_routes, bearer_token, create_account,
                              token_hash, verify_access_token, verify_token)

app = App("auth_service", "Credentials and tokens for the other services: signup, login, RFC 7662 "
          "introspection, and a user.created event through a transactional outbox.", port=8022)

SCHEMA = IDENTITY_SCHEMA + """
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY,    -- the order events were written in
    id              TEXT NOT NULL UNIQUE,   -- the event id, how the consumer recognises a repeat
    payload         TEXT NOT NULL,          -- the event as JSON: {"id", "type", "data"}
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,          -- unix time
    delivered_at    TEXT,                   -- NULL until user_service has accepted it
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (next_attempt_at) WHERE delivered_at IS NULL;

CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,            -- the access token's id; rows go once it has expired
    expires_at REAL NOT NULL
);
"""


# =============================================================================================
# The service credential (shared with user_service, which imports these)
# =============================================================================================

MIN_SERVICE_TOKEN = 16
SERVICE_CHALLENGE = 'Bearer realm="services"'
SERVICE_TIMEOUT_S = 5.0   # a call to the other service: connect and answer


def service_token_file(db_path):
    """`service-token` beside the database: `data/service-token` with the default `--db`, so
    both services find the same one; a test's temporary `--db` gets its own."""
    folder = REPO_ROOT / "data" if db_path == ":memory:" else Path(db_path).parent
    return folder / "service-token"


def load_or_create_token_file(path):
    """The token in `path`, made on first use (256 random bits, mode 0600). Written to a
    private file and linked into place, so a second process starting at the same moment reads
    a whole token or makes the link first itself, never a half-written file."""
    if not path.exists():
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    return path.read_text(encoding="utf-8").strip()


def resolve_service_token(args):
    """`--service-token`, else `SERVICE_TOKEN`, else the token file; a short one exits 2."""
    for source, value in (("--service-token", args.service_token),
                          ("SERVICE_TOKEN", os.environ.get("SERVICE_TOKEN"))):
        if value:
            if len(value) < MIN_SERVICE_TOKEN or not value.isascii() or not value.isprintable():
                exit_usage_error(f"{source} must be at least {MIN_SERVICE_TOKEN} printable "
                                 f"ASCII characters")
            return value
    path = service_token_file(args.db)
    try:
        return load_or_create_token_file(path)
    except OSError as error:
        exit_usage_error(f"cannot keep the service token in {path}: {error.strerror or error}")


def add_service_arguments(parser, peer, default_url):
    """The flags both services take: the service credential and where the other one is."""
    parser.add_argument("--service-token", help="the credential services present to each other "
                        "(default: SERVICE_TOKEN, else a random one kept in service-token beside "
                        "the database, data/service-token by default)")
    parser.add_argument(f"--{peer.replace('_', '-')}-url", type=http_url, default=default_url,
                        help=f"where {peer} listens (default {default_url})")


def is_service(request):
    """Whether the request carries the service credential. Both sides are hashed first, so
    the constant-time compare sees equal lengths and the length of the secret does not leak."""
    token = bearer_token(request)
    return token is not None and hmac.compare_digest(token_hash(token),
                                                     token_hash(request.app.state.service_token))


def require_service(request, call_next):
    """Middleware step: routes declared `service=True` answer only the service credential."""
    if request.route.meta.get("service") and not is_service(request):
        raise Unauthorized("this route is for services: send Authorization: Bearer <service "
                           "token>", www_authenticate=SERVICE_CHALLENGE)
    return call_next(request)


def call_service(base_url, path, body, headers, *, token, timeout=SERVICE_TIMEOUT_S):
    """POST `body` to another service with the service credential: (status, decoded JSON or
    None). Connection errors and timeouts raise OSError (TimeoutError is one)."""
    parts = urlsplit(base_url)
    https = parts.scheme == "https"
    conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
        parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path + path, body,
                     {**headers, "Authorization": f"Bearer {token}", "Accept": "application/json"})
        response = conn.getresponse()
        raw = response.read(64 * 1024)
    except http.client.HTTPException as error:
        raise ConnectionError(f"{type(error).__name__}: {error}") from None
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, None


# =============================================================================================
# Introspection (RFC 7662) and revocation (RFC 7009)
# =============================================================================================

INACTIVE = {"active": False}   # §2.2: for any token that is not active, and nothing else


def introspect(auth, db, token):
    """RFC 7662 §2.2's answer for `token`: active when it is an access token we signed, current,
    not revoked, whose user still exists. No leeway for `exp`: the clock that judges it is the
    one that signed it, so there is no skew to forgive."""
    settings = auth.tokens
    try:
        claims = verify_token(token, settings.secret, issuer=settings.issuer,
                              audience=settings.audience, leeway=0)
    except InvalidToken:
        return INACTIVE
    sub = claims["sub"]
    user = auth.users.by_id(int(sub)) if sub.isascii() and sub.isdigit() and len(sub) < 19 else None
    if user is None or db.query_one("SELECT 1 FROM revoked_tokens WHERE jti = ?",
                                    (str(claims.get("jti")),)):
        return INACTIVE
    return {"active": True, "sub": sub, "username": user["email"], "token_type": "Bearer",
            "exp": claims["exp"], "iat": claims["iat"], "iss": claims["iss"],
            "aud": claims["aud"], "jti": claims["jti"]}


def revoke(auth, db, token):
    """RFC 7009 §2.1: an access token is remembered as revoked until it would have expired
    anyway; a refresh token's family is revoked as by logout. Anything else is ignored."""
    now = time.time()
    try:
        claims = verify_access_token(auth.tokens, token, now=now)
    except InvalidToken:
        auth.refresh_tokens.revoke_family(token)
        return
    with db.transaction() as conn:
        conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now - 3600,))
        conn.execute("INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?, ?)",
                     (str(claims.get("jti")), claims["exp"] + auth.tokens.leeway))
    trace_event("access token revoked")


def token_parameter(request):
    """The `token` of a form (RFC 7662 §2.1, RFC 7009 §2.1) or JSON body. Other parameters
    are ignored (§2.1 lets a server take more); a missing token is RFC 6749's
    invalid_request, a 400."""
    token = request.fields().get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("the body needs a token parameter",
                         errors=[{"field": "token", "message": "is required"}])
    return token


TOKEN_FORM = {"type": "object", "required": ["token"],
              "properties": {"token": {"type": "string", "minLength": 1},
                             "token_type_hint": {
                                 "type": "string", "description": "access_token or "
                                 "refresh_token: a hint, which the server may ignore (§2.1)"}}}
NO_STORE = {"Cache-Control": "no-store"}


@app.post("/internal/introspect", service=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=TOKEN_FORM, request_media_type="application/x-www-form-urlencoded",
          responses={200: '{"active": true, "sub", "username", "exp", …} or {"active": false}',
                     400: "No token parameter", 401: "Not the service credential"})
def introspect_token(request):
    """RFC 7662 token introspection, for services: a form (or JSON) with the token"""
    state = request.app.state
    return json_response(introspect(state.auth, state.db, token_parameter(request)),
                         headers=NO_STORE)


@app.post("/auth/revoke", public=True, body_limit=AUTH_BODY_LIMIT, request_schema=TOKEN_FORM,
          request_media_type="application/x-www-form-urlencoded",
          responses={200: "Revoked, or nothing to revoke (RFC 7009 §2.2 answers both alike)",
                     400: "No token parameter"})
def revoke_token(request):
    """RFC 7009 revocation: whoever holds a token may end it"""
    state = request.app.state
    revoke(state.auth, state.db, token_parameter(request))
    return {}


# =============================================================================================
# The outbox: written with the user, drained by a relay thread
# =============================================================================================

def record_user_created(conn, user):
    """Add the user's `user.created` event to the outbox, on the signup's connection (so in
    its transaction): both are committed together or neither is."""
    event = {"id": str(uuid.uuid4()), "type": "user.created",
             "data": {"id": user["id"], "email": user["email"], "created_at": user["created_at"]}}
    conn.execute("INSERT INTO outbox (id, payload, created_at, next_attempt_at) VALUES "
                 "(?, ?, ?, ?)", (event["id"], json.dumps(event), utc_timestamp(), time.time()))
    trace_event(f"outbox: user.created {event['id']} written with the user")


def sign_up(request):
    """Create an account"""
    state = request.app.state
    user = create_account(state.auth, request.json_object(), in_transaction=record_user_created)
    state.relay.wake()
    return created(user, f"{state.user_service_url}/users/{user['id']}")


add_token_routes(app, sign_up, "The new user; its user.created event is in the outbox, bound for "
                               "user_service (the Location it will have there)")


class DeliveryRefused(Exception):
    """user_service did not accept an event (down, slow, or answered other than 2xx)."""


class ServiceUnreachable(DeliveryRefused):
    """user_service could not be reached or did not answer in time: no event can go now."""


JITTER = 0.2
IDLE_POLL_S = 5.0   # a relay with nothing due still looks now and then (another process's rows)


class OutboxRelay:
    """One thread that posts due events, oldest first, and records each outcome: delivered, or
    the attempt counted and the next one scheduled `retry_s · 2^(attempts−1)` later (±20 %,
    at most `retry_max_s`). `wake()` (after a signup) makes it look at once; `close()` stops
    it. What it has not delivered stays in the table, so a restart carries on."""

    def __init__(self, db, deliver, *, retry_s=1.0, retry_max_s=60.0):
        self.db = db
        self.deliver = deliver
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.paused_until = 0.0   # no attempts before this: user_service could not be reached
        self.woken = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self):
        self.thread.start()

    def wake(self):
        self.woken.set()

    def close(self):
        self.stopping.set()
        self.woken.set()
        self.thread.join(SERVICE_TIMEOUT_S + 1)  # at most one delivery is under way

    def _run(self):
        while not self.stopping.is_set():
            self.woken.clear()  # before looking: a wake during the pass is not lost
            try:
                delay = self.deliver_due()
            except Exception as error:  # the database, briefly: try again shortly
                sys.stderr.write(f"error: outbox relay: {error}\n")
                delay = self.retry_s
            self.woken.wait(delay)

    def deliver_due(self):
        """Attempt every due event once; the seconds until the next one is due."""
        now = time.time()
        if now < self.paused_until:  # user_service was unreachable a moment ago
            return self.paused_until - now
        for row in self.db.query("SELECT id, payload, attempts FROM outbox WHERE delivered_at IS "
                                 "NULL AND next_attempt_at <= ? ORDER BY seq LIMIT 100", (now,)):
            if self.stopping.is_set():
                return 0
            pause = self.attempt(row)
            if pause is not None:  # the events behind it would each wait out the same failure
                self.paused_until = time.time() + pause
                return pause
        due = self.db.query_one("SELECT min(next_attempt_at) AS at FROM outbox "
                                "WHERE delivered_at IS NULL")["at"]
        return IDLE_POLL_S if due is None else min(IDLE_POLL_S, max(0.0, due - time.time()))

    def attempt(self, row):
        """Deliver one event. When user_service cannot be reached at all, the seconds until
        this event is due again: the pass pauses that long (one timeout a pass, not one an
        event, against a hanging service); else None."""
        try:
            self.deliver(row["payload"])
        except DeliveryRefused as error:
            attempts = row["attempts"] + 1
            delay = min(self.retry_max_s, self.retry_s * 2 ** (attempts - 1)
                        * random.uniform(1 - JITTER, 1 + JITTER))
            self.db.execute("UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? "
                            "WHERE id = ?", (attempts, time.time() + delay, str(error), row["id"]))
            return delay if isinstance(error, ServiceUnreachable) else None
        self.db.execute("UPDATE outbox SET attempts = attempts + 1, delivered_at = ?, "
                        "last_error = NULL WHERE id = ?", (utc_timestamp(), row["id"]))


def post_event(state, payload):
    """Deliver one event to user_service; DeliveryRefused unless it answers 2xx."""
    try:
        status, _ = call_service(state.user_service_url, "/internal/events", payload.encode(),
                                 {"Content-Type": "application/json"}, token=state.service_token)
    except OSError as error:
        raise ServiceUnreachable(f"user_service unreachable: {error}") from None
    if not 200 <= status < 300:
        raise DeliveryRefused(f"user_service answered {status}")


def outbox_json(row):
    return {"event": json.loads(row["payload"]), "created_at": row["created_at"],
            "attempts": row["attempts"], "delivered_at": row["delivered_at"],
            "last_error": row["last_error"]}


@app.get("/internal/outbox", service=True,
         responses={200: "How many events wait and the oldest of them", 401: "Not the service "
                                                                             "credential"})
def read_outbox(request):
    """The outbox: events waiting for user_service, oldest first"""
    db = request.app.state.db
    counts = db.query_one("SELECT count(*) FILTER (WHERE delivered_at IS NULL) AS pending, "
                          "count(delivered_at) AS delivered FROM outbox")
    waiting = db.query("SELECT * FROM outbox WHERE delivered_at IS NULL ORDER BY seq LIMIT 20")
    return {"pending": counts["pending"], "delivered": counts["delivered"],
            "oldest_pending": [outbox_json(row) for row in waiting]}


app.use(require_service)


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    add_service_arguments(parser, "user_service", "http://127.0.0.1:8122")
    parser.add_argument("--retry-s", type=positive_seconds, default=1.0,
                        help="the outbox's first retry delay; it doubles per attempt (default 1)")
    parser.add_argument("--retry-max-s", default=60.0,
                        type=bounded(float, "a duration from 0.01 to 86400 s", at_least=0.01,
                                     at_most=86400),
                        help="the longest wait between two attempts of an event (default 60)")
    args = parser.parse_args(argv)
    state = app.state
    state.db = app.open_database(args, SCHEMA)
    state.auth = Auth.from_args(state.db, args)
    state.service_token = resolve_service_token(args)
    state.user_service_url = args.user_service_url
    state.relay = OutboxRelay(state.db, lambda payload: post_event(state, payload),
                              retry_s=args.retry_s, retry_max_s=args.retry_max_s)
    state.relay.start()
    app.shutdown_hooks.append(state.relay.close)   # hooks run in reverse: before db.close
    app.run(args)


if __name__ == "__main__":
    main()
