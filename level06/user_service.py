"""User service: profiles, owned here, for users whose credentials auth_service owns.

What it teaches
  - A service that owns its data and no one else's: profiles live in this database, accounts
    in auth_service's, and neither process ever opens the other's file. They meet over HTTP.
  - Authentication as a resource server (RFC 7662): every caller's bearer token is posted to
    auth_service's `/internal/introspect`, as an OAuth resource server does, and the answer is
    kept for `--introspect-cache-s` seconds (never past the token's `exp`), so a busy client
    costs one introspection per cache period, not one per request. The price is the cache's
    length: a revoked token keeps working here at most that long.
  - Depending on a service that may be down: the introspection call has a timeout
    (`--auth-timeout`); when auth_service does not answer in time, or cannot be reached, the
    answer is 503 with `Retry-After`, promptly, never a 500 and never a hang.
  - An idempotent consumer: `POST /internal/events` takes auth_service's `user.created`
    events (service credential, else 401) and records each event id in the same transaction
    as its effect, so a repeated delivery (at-least-once) is answered 204 and changes nothing.
    A profile appears when its event arrives: eventually, not at signup (the README shows it).

Built on level03/jwt_auth.py (the bearer token, RFC 6750's challenges, token hashes) and
level06/auth_service.py (the service credential, the call to another service).

Left out: caching introspection across processes (Redis), verifying JWTs locally with a
JWKS as a faster alternative to introspection, pushing revocations to resource servers,
profile deletion (a `user.deleted` event), avatars.

    python level06/user_service.py [--auth-service-url URL] [--introspect-cache-s S] [--db PATH]
"""
import collections
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, NotFound, ServiceUnavailable, Unauthorized, ValidationFailed,
                 json_response, no_content, trace_event)
from lib.app import bounded, seconds
from lib.listing import list_params, page
from lib.request import Query, utc_timestamp
from lib.routing import PAGE
from lib.validation import Email, Field, Integer, Text, body_schema, validate
from level01.counter import etag
from level03.jwt_auth import bearer_token, invalid_token, token_hash
from level06.auth_service import (add_service_arguments, call_service, require_service,
                                  resolve_service_token)

app = App("user_service", "Profiles of the users auth_service knows: callers authenticated by "
          "introspection, new users heard of through auth_service's outbox.", port=8122)

SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    id           INTEGER PRIMARY KEY,       -- auth_service's user id
    email        TEXT NOT NULL,             -- from the user.created event; shown only to its owner
    display_name TEXT NOT NULL DEFAULT '',
    name_key     TEXT NOT NULL DEFAULT '',  -- display_name case-folded: what ?q= searches
    bio          TEXT NOT NULL DEFAULT '',
    version      INTEGER NOT NULL DEFAULT 1, -- the ETag
    created_at   TEXT NOT NULL              -- the account's, from the event
);

CREATE TABLE IF NOT EXISTS seen_events (
    id          TEXT PRIMARY KEY,           -- an event id once applied: a repeat changes nothing
    type        TEXT NOT NULL,
    received_at TEXT NOT NULL
);
"""


# =============================================================================================
# Who is calling: introspection at auth_service, with a short cache
# =============================================================================================

class Introspector:
    """Asks auth_service what a token is (RFC 7662 §2.1, a form post with the service
    credential) and remembers each answer, active or not, for `cache_s` seconds, an active one
    never past its `exp`. At most `max_entries` answers are kept (the oldest go first); keys
    are token hashes, so the cache holds no usable token."""

    def __init__(self, auth_url, service_token, *, cache_s, timeout, max_entries=10_000):
        self.auth_url = auth_url
        self.service_token = service_token
        self.cache_s = cache_s
        self.timeout = timeout
        self.max_entries = max_entries
        self.answers = collections.OrderedDict()   # token hash → (monotonic expiry, answer)
        self.lock = threading.Lock()

    def lookup(self, token):
        key = token_hash(token)
        with self.lock:
            kept = self.answers.get(key)
            if kept is not None and kept[0] > time.monotonic():
                trace_event("introspection answer from the cache")
                return kept[1]
        answer = self.ask(token)
        keep_s = self.cache_s
        if answer["active"]:
            keep_s = min(keep_s, answer.get("exp", 0) - time.time())
        if keep_s > 0:
            with self.lock:
                self.answers[key] = (time.monotonic() + keep_s, answer)
                self.answers.move_to_end(key)
                while len(self.answers) > self.max_entries:
                    self.answers.popitem(last=False)
        return answer

    def ask(self, token):
        form = urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        try:
            status, answer = call_service(
                self.auth_url, "/internal/introspect", form,
                {"Content-Type": "application/x-www-form-urlencoded"},
                token=self.service_token, timeout=self.timeout)
        except OSError as error:
            raise auth_unavailable(f"cannot be reached ({error})") from None
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("active"),
                                                                           bool):
            raise auth_unavailable(f"answered {status} to introspection")
        trace_event(f"introspected at auth_service: active={answer['active']}")
        return answer


def auth_unavailable(why):
    """503: we cannot tell who the caller is. Logged, since it is an operator's problem."""
    sys.stderr.write(f"error: auth_service {why}\n")
    return ServiceUnavailable("auth_service, which checks tokens, is not answering; try again "
                              "shortly", retry_after=5)


def require_caller(request, call_next):
    """Middleware step: deny by default. A route not `public` nor `service` needs a bearer
    token that auth_service says is active; its user id lands in `request.context`."""
    meta = request.route.meta
    if meta.get("public") or meta.get("service"):
        return call_next(request)
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("this route needs a bearer token from auth_service: Authorization: "
                           "Bearer <token>", www_authenticate="Bearer")
    answer = request.app.state.introspector.lookup(token)
    sub = answer.get("sub")
    if not answer["active"] or not (isinstance(sub, str) and sub.isascii() and sub.isdigit()):
        raise invalid_token("the token is not active (unknown, expired or revoked)")
    request.context["user_id"] = int(sub)
    return call_next(request)


# =============================================================================================
# Events from auth_service
# =============================================================================================

EVENT = {"id": Text(1, 100, strip=False, required=True), "type": Text(1, 100, required=True),
         "data": Field(required=True, description="what happened; user.created: {id, email, "
                                                  "created_at}")}
USER_CREATED = {"id": Integer(1, 2**63 - 1, required=True), "email": Email(required=True),
                "created_at": Text(1, 40, required=True)}


def apply_event(db, event):
    """Apply `event` once: its id is recorded in the transaction that applies it, so a repeat
    finds it and changes nothing. True when it was new. An unknown type is recorded and
    ignored: a newer producer must not be stuck retrying what this version cannot use."""
    data = None
    if event["type"] == "user.created":
        if not isinstance(event["data"], dict):
            raise ValidationFailed({"data": "must be an object for user.created"})
        data = validate(event["data"], USER_CREATED)
    with db.transaction() as conn:
        fresh = conn.execute("INSERT OR IGNORE INTO seen_events (id, type, received_at) "
                             "VALUES (?, ?, ?)", (event["id"], event["type"], utc_timestamp()))
        if not fresh.rowcount:
            trace_event(f"event {event['id']} seen before: nothing to do")
            return False
        if data is not None:
            conn.execute("INSERT OR IGNORE INTO profiles (id, email, created_at) VALUES (?, ?, ?)",
                         (data["id"], data["email"], data["created_at"]))
    return True


@app.post("/internal/events", service=True, request_schema=body_schema(EVENT),
          responses={204: "Applied, or seen before", 401: "Not the service credential",
                     422: "Not an event"})
def receive_event(request):
    """Take an event from auth_service (at-least-once; repeats are recognised by id)"""
    apply_event(request.app.state.db, validate(request.json_object(), EVENT))
    return no_content()


# =============================================================================================
# Profiles
# =============================================================================================

PROFILE = {"display_name": Text(0, 100), "bio": Text(0, 2000)}
READ_ONLY = ("id", "email", "created_at")
PROFILE_SCHEMA = {"type": "object", "required": ["id", "display_name", "bio", "created_at"],
                  "properties": {"id": {"type": "integer"}, "display_name": {"type": "string"},
                                 "bio": {"type": "string"}, "created_at": {"type": "string"},
                                 "email": {"type": "string"}}}


def profile_json(row, *, with_email=False):
    profile = {"id": row["id"], "display_name": row["display_name"], "bio": row["bio"],
               "created_at": row["created_at"]}
    if with_email:
        profile["email"] = row["email"]
    return profile


def my_profile(db, user_id):
    row = db.query_one("SELECT * FROM profiles WHERE id = ?", (user_id,))
    if row is None:
        raise NotFound("no profile for you yet: user_service hears of a new account through "
                       "auth_service's outbox, usually within a second; try again shortly")
    return row


def own_profile_answer(row):
    return json_response(profile_json(row, with_email=True), headers={"ETag": etag(row["version"])})


@app.get("/users/me", response_schema=PROFILE_SCHEMA,
         responses={200: "Your profile, with your email", 401: "No active token",
                    404: "Not here yet (the account's event has not arrived)",
                    503: "auth_service is not answering"})
def read_my_profile(request):
    """Your profile"""
    return own_profile_answer(my_profile(request.app.state.db, request.context["user_id"]))


@app.patch("/users/me", if_match=True, request_schema=body_schema(PROFILE, partial=True),
           response_schema=PROFILE_SCHEMA,
           responses={200: "The profile as changed", 401: "No active token", 404: "Not here yet",
                      412: "If-Match is stale", 422: "A bad or read-only field",
                      503: "auth_service is not answering"})
def update_my_profile(request):
    """Change your display_name and bio"""
    values = validate(request.json_object(), PROFILE, partial=True, read_only=READ_ONLY)
    db, user_id = request.app.state.db, request.context["user_id"]
    with db.transaction():
        request.require_if_match(etag(my_profile(db, user_id)["version"]))
        if "display_name" in values:
            values["name_key"] = values["display_name"].casefold()
        assignments = "".join(f"{column} = ?, " for column in values)  # names from PROFILE only
        db.execute(f"UPDATE profiles SET {assignments}version = version + 1 WHERE id = ?",
                   (*values.values(), user_id))
        row = my_profile(db, user_id)
    return own_profile_answer(row)


@app.get("/users/{user_id:int}", response_schema=PROFILE_SCHEMA,
         responses={200: "The profile", 401: "No active token", 404: "No such profile",
                    503: "auth_service is not answering"})
def read_profile(request, user_id):
    """A user's public profile"""
    row = request.app.state.db.query_one("SELECT * FROM profiles WHERE id = ?", (user_id,))
    if row is None:
        raise NotFound(f"no profile {user_id}")
    return profile_json(row)


SEARCH = Query("q", "display names containing this, in any case")


@app.get("/users", query=(SEARCH, *PAGE),
         responses={200: "Profiles by id", 401: "No active token",
                    503: "auth_service is not answering"})
def list_profiles(request):
    """Profiles, optionally those whose display_name contains q"""
    limit, cursor = list_params(request, (int,))
    q = SEARCH.read(request) or ""
    # case-folded on both sides in Python: SQL's LIKE and NOCASE fold ASCII letters only
    rows = request.app.state.db.query(
        "SELECT * FROM profiles WHERE id > ? AND instr(name_key, ?) > 0 ORDER BY id LIMIT ?",
        (cursor[0] if cursor else 0, q.casefold(), limit + 1))
    return page(rows, limit, lambda row: [row["id"]], profile_json)


app.use(require_service)
app.use(require_caller)


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    add_service_arguments(parser, "auth_service", "http://127.0.0.1:8022")
    parser.add_argument("--introspect-cache-s", type=seconds, default=10.0,
                        help="how long an introspection answer is reused (default 10; 0: ask "
                             "every time); a revoked token works here at most this long")
    parser.add_argument("--auth-timeout", default=2.0,
                        type=bounded(float, "a duration from 0.05 to 60 s", at_least=0.05,
                                     at_most=60),
                        help="seconds to wait for auth_service before answering 503 (default 2)")
    args = parser.parse_args(argv)
    state = app.state
    state.db = app.open_database(args, SCHEMA)
    state.service_token = resolve_service_token(args)   # what require_service expects
    state.introspector = Introspector(args.auth_service_url, state.service_token,
                                      cache_s=args.introspect_cache_s, timeout=args.auth_timeout)
    app.run(args)


if __name__ == "__main__":
    main()
