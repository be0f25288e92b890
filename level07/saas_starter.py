"""SaaS starter — the capstone: accounts, organisations, roles, API keys, billing, an audit trail
and per-plan rate limits, assembled by import from the lessons that teach each of them.

What it teaches
  - Composition over rewriting. Every mechanism here is imported from its own project, and this
    file only wires them together and adds what none of them has:
      level03/jwt_auth.py        accounts, passwords, tokens: signup (here it also makes a
                                 personal organisation, in the same transaction), login,
                                 refresh, logout, the bearer-token middleware
      level07/multi_tenant.py    organisations, invites, members, roles and their permission
                                 table, projects and tasks, quotas by plan, the data-access
                                 layer that adds the tenant condition to every query
      level07/payment_webhooks.py  Stripe's signature scheme, the event's shape, storing each
                                 event once by id and queueing its processing, the job that
                                 processes it once; `--webhook-secret`, `--tolerance`
      level05/job_processor.py   the job queue and its workers, retries with backoff;
                                 `--workers` and the queue's other flags
      level07/audit_log.py       the hash-chained, append-only log and its verification
      level06/rate_limiter.py    the limiter, its policies and the RateLimit headers
  - API keys done the way Stripe and GitHub do them: a secret shown once (`sk_live_…`), stored
    as its SHA-256 and a visible prefix, scoped (`read`, `write`), revocable, and never able to
    manage keys, members or billing — an API key is a narrower credential than its creator.
    It answers multi_tenant's one question, "what may this request do in this org?"
    (`Tenancy.permissions_of`), so every tenant route accepts it with no change.
  - Billing that trusts only the payment provider: a checkout is a pending intent; the plan
    changes when Stripe's signed webhook says it was paid (or a subscription changed), never on
    the client's word. The webhook is acknowledged at once and the event applied by a worker
    of the job queue, as payment_webhooks does; until then the checkout stays pending. An older
    event never overwrites a newer one (`created` per org), and a downgrade limits new rows
    without deleting any.
  - Per-tenant limits: requests a minute by plan, counted per organisation whoever calls (users
    and keys alike), and metered per day for `GET /orgs/{slug}/usage`.

Left out: the Stripe API (a real checkout is a `stripe.checkout.Session.create` call that
returns Stripe's hosted page; here the session is ours and the webhook completes it), proration
and invoices, SSO/SAML, email delivery of invites, and multi_tenant's `--db-per-tenant` (this
file's tables sit beside `orgs` in the one shared schema). saas_starter.md's "In production"
says who does those.

    python level07/saas_starter.py [--webhook-secret whsec_…] [--audit-key K] [--workers N]
        [--db PATH]
"""
import re
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, Forbidden, NotFound, created, json_response, no_content,
                 trace_event)
from lib.listing import list_params, page
from lib.request import Query, utc_timestamp
from lib.routing import PAGE
from lib.validation import Choice, Field, Invalid, Text, body_schema, validate
from level03.jwt_auth import (CREDENTIALS, NO_STORE, Auth, add_auth_arguments, add_token_routes,
                              authenticate_password, bearer_token, create_account, invalid_token,
                              issue_token_pair, read_me, require_user, token_hash)
from level05.job_processor import add_queue_flags
from level06.rate_limiter import Limiter, admit, parse_policy
from level07.audit_log import SCHEMA as AUDIT_SCHEMA
from level07.audit_log import AuditLog, entry_from_row, kept_secret
from level07.multi_tenant import (PLANS, SCHEMA as TENANCY_SCHEMA, SIGNED_IN, TENANT_TABLES,
                                  Tenancy, acting_user_id, add_tenancy_routes,
                                  check_tenancy_routes, create_org, set_plan, tenant_route)
from level07.payment_webhooks import SCHEMA as WEBHOOK_SCHEMA
from level07.payment_webhooks import (ACK_SCHEMA, PROCESS_EVENT, add_webhook_arguments,
                                      parse_event, processing_attempt, queue_event, reference,
                                      resolve_secrets, start_event_queue, store_event,
                                      verify_signature)

app = App("saas_starter", "The capstone SaaS backend: accounts, organisations, roles, API keys, "
          "billing by Stripe webhook, an audit trail and per-plan rate limits, built by import.",
          port=8029)

# =============================================================================================
# Schema: the imported projects' tables, and this one's own (each row belongs to one org)
# =============================================================================================

SAAS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY,
    org_id      INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    prefix      TEXT NOT NULL,           -- the first characters, shown so a key can be told apart
    key_hash    TEXT NOT NULL UNIQUE,    -- SHA-256 of the key (jwt_auth.token_hash), never the key
    scopes      TEXT NOT NULL,           -- "read write"
    created_by  INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_by_org ON api_keys (org_id, id);
CREATE TABLE IF NOT EXISTS checkouts (
    id           TEXT PRIMARY KEY,       -- cs_…: what the webhook's session names
    org_id       INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    plan         TEXT NOT NULL,
    status       TEXT NOT NULL,          -- open, complete, expired (Stripe's words)
    created_by   INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    completed_at TEXT
);
CREATE INDEX IF NOT EXISTS checkouts_by_org ON checkouts (org_id, status);
CREATE TABLE IF NOT EXISTS billing (
    org_id              INTEGER PRIMARY KEY REFERENCES orgs (id) ON DELETE CASCADE,
    subscription        TEXT,            -- sub_…, once Stripe named one
    subscription_status TEXT,            -- Stripe's own: active, past_due, canceled, …
    last_event_id       TEXT NOT NULL,   -- the event that last changed the plan …
    last_event_created  INTEGER NOT NULL -- … and its `created`: an older event changes nothing
);
CREATE TABLE IF NOT EXISTS usage (
    org_id   INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    day      TEXT NOT NULL,              -- YYYY-MM-DD, UTC
    caller   TEXT NOT NULL,              -- user:3 or key:7
    requests INTEGER NOT NULL,
    PRIMARY KEY (org_id, day, caller)
);
"""
SCHEMA = TENANCY_SCHEMA + WEBHOOK_SCHEMA + AUDIT_SCHEMA + SAAS_SCHEMA

# =============================================================================================
# Permissions: multi_tenant's table, plus what an API key may do
# =============================================================================================

# Whoever may manage an org's settings (admins and owners, in multi_tenant's table) manages its
# keys and its billing and reads its audit trail. No key scope grants this permission, so a key
# can never make keys, change members or pay.
MANAGE_ORG = "settings:manage"
READ = "tenant:read"
SCOPES = {"read": frozenset({"tenant:read"}), "write": frozenset({"tenant:write"})}
KEY_PREFIX = "sk_live_"
VISIBLE_PREFIX = len(KEY_PREFIX) + 6


class SaasTenancy(Tenancy):
    """multi_tenant's tenancy, answering for API keys too, recording to the audit log, and
    keeping this project's tenant-owned tables behind the same data-access layer."""

    tables = TENANT_TABLES + ("api_keys", "checkouts", "billing", "usage")

    def __init__(self, db, audit, **options):
        super().__init__(db, **options)
        self.audit = audit

    def permissions_of(self, request, org):
        key = request.context.get("api_key")
        if key is None:
            return super().permissions_of(request, org)
        if key["org_id"] != org["id"]:   # another org's key: it may not know this one exists
            return frozenset()
        return frozenset().union(*(SCOPES[scope] for scope in key["scopes"].split()))

    def record(self, request, org, action, target, details=None):
        record(request, org["id"], action, target, details)

    def org_ids_of(self, user_id):
        return [row["org_id"] for row in self.db.query(
            "SELECT org_id FROM memberships WHERE user_id = ? ORDER BY org_id", (user_id,))]


def caller_of(request):
    """Who a request acts as, in the audit log and the usage meter: `user:3` or `key:7`."""
    key = request.context.get("api_key")
    return f"key:{key['id']}" if key else f"user:{request.context['user']['id']}"


def record(request, org_id, action, target, details=None, actor=None):
    """Append one entry about a request to the audit log."""
    request.app.state.audit.append(org_entry(org_id, action, target, details,
                                             actor or caller_of(request),
                                             request.client[0] if request.client else None))


def org_entry(org_id, action, target, details, actor, ip=None):
    """An audit entry whose target is `org:<id>/<what>`, so an org's trail is the entries under
    its prefix (`GET /orgs/{slug}/audit`)."""
    return {"actor": actor, "action": action, "target": f"org:{org_id}/{target}",
            "metadata": details or None, "ip": ip}


# =============================================================================================
# Who is calling: a user's access token, or an organisation's API key
# =============================================================================================

def new_api_key():
    return KEY_PREFIX + secrets.token_urlsafe(32)   # 256 random bits


def authenticate_key(db, token):
    """The live key row whose hash is `token`'s, else a 401 (unknown and revoked alike)."""
    row = db.query_one("SELECT * FROM api_keys WHERE key_hash = ?", (token_hash(token),))
    if row is None or row["revoked_at"] is not None:
        raise invalid_token("the API key is unknown or revoked")
    trace_event(f"API key {row['prefix']}… of org {row['org_id']} (scopes {row['scopes']})")
    return dict(row)


def require_caller(request, call_next):
    """Middleware step: as jwt_auth's `require_user` (deny by default), but a bearer credential
    that is an API key stands in for a user token, on its organisation's routes only."""
    token = bearer_token(request)
    if request.route.meta.get("public") or not (token and token.startswith(KEY_PREFIX)):
        return require_user(request, call_next)
    request.context["api_key"] = authenticate_key(request.app.state.db, token)
    if "slug" not in request.path_params:
        raise Forbidden("an API key acts only within its organisation (/orgs/{slug}/…); "
                        "this route needs a user's access token")
    return call_next(request)


# =============================================================================================
# Per-org rate limits by plan, and the usage meter
# =============================================================================================

# An exact sliding log: at most the plan's number in any 60 s, whoever of the org calls.
RATE_LIMITS = {"free": parse_policy("120/min", "sliding_window_log"),
               "pro": parse_policy("1200/min", "sliding_window_log")}


def limit_key(org):
    return f"org:{org['id']}:{org['plan']}"   # a new plan starts a fresh window


def limit_per_org(request, call_next):
    """Middleware step: a request on an org's routes by one of its members or keys spends one
    of the org's requests this minute and is metered. Anyone else is left to the handler, whose
    answer is 404: a stranger can neither spend nor probe another org's quota."""
    tenancy, slug = request.app.state.tenancy, request.path_params.get("slug")
    org = tenancy.org_by_slug(slug) if slug is not None else None
    if org is None or not tenancy.permissions_of(request, org):
        return call_next(request)

    def metered(request):   # an upsert, which TenantData has no call for; org is resolved above
        request.app.state.db.execute(
            "INSERT INTO usage (org_id, day, caller, requests) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (org_id, day, caller) DO UPDATE SET requests = requests + 1",
            (org["id"], utc_timestamp()[:10], caller_of(request)))
        return call_next(request)

    return admit(request.app.state.limiter, limit_key(org), RATE_LIMITS[org["plan"]], request,
                 metered)


# =============================================================================================
# Billing: a checkout is an intent; Stripe's signed event changes the plan
# =============================================================================================

BILLING_EVENTS = ("checkout.session.completed", "customer.subscription.created",
                  "customer.subscription.updated", "customer.subscription.deleted")
PAID_STATUSES = ("active", "trialing")                  # Stripe's statuses that grant the plan
ENDED_STATUSES = ("canceled", "unpaid", "incomplete_expired")   # … and those that end it


def org_reference(obj):
    """The org an event's object names: `client_reference_id` (a checkout), else
    `metadata.org_id` (a subscription carries the checkout's metadata)."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    for value in (obj.get("client_reference_id"), metadata.get("org_id")):
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if re.fullmatch(r"[1-9][0-9]{0,17}", text):
            return int(text)
    return None


def subscription_state(event_type, obj):
    """(the subscription's id, its status) as the event tells them: a paid checkout starts an
    active one; a subscription event carries its own status (Stripe's, kept as it is)."""
    if event_type == "checkout.session.completed":
        return reference(obj.get("subscription")), "active"
    if event_type == "customer.subscription.deleted":
        return obj["id"], "canceled"
    return obj["id"], obj.get("status") if isinstance(obj.get("status"), str) else None


def plan_asked(conn, org_id, event_type, obj):
    """The plan an event moves its org to, or (None, why it moves nothing)."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    named = metadata.get("plan") if metadata.get("plan") in PLANS else None
    if event_type == "checkout.session.completed":
        if obj.get("payment_status") not in ("paid", "no_payment_required"):
            return None, "the checkout is not paid"
        row = conn.execute("SELECT plan FROM checkouts WHERE id = ? AND org_id = ?",
                           (obj["id"], org_id)).fetchone()
        plan = row["plan"] if row else named
        return (plan, None) if plan else (None, "the checkout names no plan")
    status = subscription_state(event_type, obj)[1]
    if status in ENDED_STATUSES:
        return "free", None
    if status in PAID_STATUSES:
        return named or "pro", None
    return None, f"a subscription {status!r} keeps the plan it has"


def apply_billing_event(conn, event):
    """Judge one stored event on `conn`: (status, outcome, (org id, old plan, new plan) or
    None). Only the signed event reaches this; nothing a client sends does."""
    obj = event["data"]["object"]
    if event["type"] not in BILLING_EVENTS:
        return "ignored", f"{event['type']} is not a billing event", None
    org_id = org_reference(obj)
    org = conn.execute("SELECT id, plan FROM orgs WHERE id = ?", (org_id,)).fetchone() \
        if org_id else None
    if org is None:
        return "ignored", "it names no organisation (client_reference_id, metadata.org_id)", None
    last = conn.execute("SELECT * FROM billing WHERE org_id = ?", (org["id"],)).fetchone()
    if last is not None and event["created"] < last["last_event_created"]:
        return "ignored", f"{last['last_event_id']} is newer", None
    plan, why_not = plan_asked(conn, org["id"], event["type"], obj)
    if plan is None:
        return "ignored", why_not, None
    subscription, status = subscription_state(event["type"], obj)
    conn.execute(
        "INSERT INTO billing (org_id, subscription, subscription_status, last_event_id, "
        "last_event_created) VALUES (?, ?, ?, ?, ?) ON CONFLICT (org_id) DO UPDATE SET "
        "subscription = coalesce(excluded.subscription, subscription), "
        "subscription_status = coalesce(excluded.subscription_status, subscription_status), "
        "last_event_id = excluded.last_event_id, last_event_created = excluded.last_event_created",
        (org["id"], subscription, status, event["id"], event["created"]))
    conn.execute("UPDATE checkouts SET status = 'complete', completed_at = ? "
                 "WHERE id = ? AND org_id = ? AND status = 'open'",
                 (utc_timestamp(), obj["id"], org["id"]))
    if plan == org["plan"]:
        return "processed", f"org {org['id']} stays on {plan}", None
    set_plan(conn, org["id"], plan)   # a downgrade deletes nothing: quotas refuse new rows
    return "processed", f"org {org['id']}: {org['plan']} → {plan}", (org["id"], org["plan"], plan)


def apply_billing(context):
    """The job: payment_webhooks' processing of one stored event (once however often the job
    runs; an error is recorded on the event and the queue retries it with backoff), judged by
    `apply_billing_event`. A plan change is chained into the audit trail in the same
    transaction (`AuditLog.append_in`): the plan and its `plan.changed` entry commit together,
    so a crash between them cannot leave a change the trail does not show."""

    def judge(conn, event):
        status, outcome, change = apply_billing_event(conn, event)
        if change is not None:
            org_id, old, new = change
            app.state.audit.append_in(conn, org_entry(org_id, "plan.changed", "billing", {
                "from": old, "to": new, "event": context.payload["event"]}, "stripe"))
        return status, outcome

    return processing_attempt(context, judge)


APPLY_BILLING_EVENT = PROCESS_EVENT._replace(run=apply_billing,
                                             description="applies one stored billing event")


def checkout_json(row):
    return {"id": row["id"], "object": "checkout.session",
            "client_reference_id": str(row["org_id"]), "plan": row["plan"],
            "status": row["status"], "mode": "subscription",
            "metadata": {"org_id": str(row["org_id"]), "plan": row["plan"]},
            "created_at": row["created_at"], "completed_at": row["completed_at"]}


# =============================================================================================
# Routes: accounts
# =============================================================================================

def personal_slug(email):
    """A slug for a new user's own org: the address's local part, tidied, and a random tail."""
    local = re.sub(r"[^a-z0-9]+", "-", email.partition("@")[0].lower()).strip("-")[:24]
    return f"{local or 'org'}-{secrets.token_hex(3)}"


def sign_up(request):
    """Create an account and its personal organisation"""

    def make_personal_org(conn, user):   # in the insert's transaction: both, or neither
        org = create_org(conn, user["id"], user["email"], personal_slug(user["email"]))
        user["organization"] = {"id": org["id"], "slug": org["slug"]}

    user = create_account(request.app.state.auth, request.json_object(),
                          in_transaction=make_personal_org)
    return created(user, "/me")


def log_in(request):
    """Exchange email and password for tokens; the login goes to each of the user's orgs' trail"""
    auth = request.app.state.auth
    values = validate(request.json_object(), CREDENTIALS)
    user = authenticate_password(auth, values["email"], values["password"])
    for org_id in request.app.state.tenancy.org_ids_of(user["id"]):
        record(request, org_id, "user.login", f"user:{user['id']}", actor=f"user:{user['id']}")
    return json_response(issue_token_pair(auth, user["id"]), headers=NO_STORE)


add_token_routes(app, sign_up, 'The new user, with its personal organisation: '
                 '"organization": {"id", "slug"}', log_in=log_in)
app.get("/me", permission=SIGNED_IN, responses={200: "The user the token names"})(read_me)

# =============================================================================================
# Routes: API keys
# =============================================================================================

class Scopes(Field):
    """A key's scopes: a non-empty list of `SCOPES` names, each once."""

    def shape(self):
        return {"type": "array", "items": {"enum": list(SCOPES)}, "minItems": 1,
                "maxItems": len(SCOPES), "uniqueItems": True}

    def clean(self, value):
        if (not isinstance(value, list) or not value or len(set(map(str, value))) != len(value)
                or not all(isinstance(scope, str) and scope in SCOPES for scope in value)):
            raise Invalid(f"must be a non-empty list of distinct scopes: {', '.join(SCOPES)}")
        return value


NEW_KEY = {"name": Text(1, 100, required=True),
           "scopes": Scopes(default=["read", "write"],
                            description="read (GETs), write (projects and tasks); default both")}
KEY_SCHEMA = {"type": "object", "required": ["id", "name", "prefix", "scopes", "created_at",
                                             "revoked_at"]}


def key_json(row):
    return {"id": row["id"], "name": row["name"], "prefix": row["prefix"],
            "scopes": row["scopes"].split(), "created_by": row["created_by"],
            "created_at": row["created_at"], "revoked_at": row["revoked_at"]}


def create_api_key(request, org):
    """Make an API key for the org (admins); its secret is in this answer only"""
    values = validate(request.json_object(), NEW_KEY)
    key = new_api_key()
    row = tenancy_of(request).data(org).insert(
        "api_keys", name=values["name"], prefix=key[:VISIBLE_PREFIX], key_hash=token_hash(key),
        scopes=" ".join(values["scopes"]), created_by=acting_user_id(request),
        created_at=utc_timestamp())
    record(request, org["id"], "api_key.created", f"api_key:{row['id']}",
           {"name": row["name"], "prefix": row["prefix"], "scopes": values["scopes"]})
    return created({**key_json(row), "key": key}, f"/orgs/{org['slug']}/api-keys/{row['id']}")


def list_api_keys(request, org):
    """The org's API keys, revoked ones included, oldest first (never their secrets)"""
    limit, cursor = list_params(request, (int,))
    rows = tenancy_of(request).data(org).select("api_keys", "id > ?", (cursor[0] if cursor else 0,),
                                                limit=limit + 1)
    return page(rows, limit, lambda row: [row["id"]], key_json)


def revoke_api_key(request, org, key_id):
    """Revoke an API key (admins): it authenticates nothing from now on"""
    data = tenancy_of(request).data(org)
    with data.transaction():
        key = data.get("api_keys", key_id)
        if key is None:
            raise NotFound(f"no API key {key_id} in this organisation")
        data.update("api_keys", "id = ?", (key_id,),
                    revoked_at=key["revoked_at"] or utc_timestamp())
    record(request, org["id"], "api_key.revoked", f"api_key:{key_id}", {"prefix": key["prefix"]})
    return no_content()


# =============================================================================================
# Routes: billing and the Stripe webhook
# =============================================================================================

CHECKOUT = {"plan": Choice(["pro"], required=True, description="the plan to buy")}


def read_billing(request, org):
    """The org's plan, its limits, a checkout still waiting for payment, the subscription"""
    tenancy = tenancy_of(request)
    data = tenancy.data(org)
    plan, limits = tenancy.plan_of(org["id"])
    pending = data.find("checkouts", "status = 'open'", order_by="created_at DESC, rowid DESC")
    state = data.find("billing", order_by="org_id")
    return {"plan": plan, "limits": limits._asdict(),
            "requests_per_minute": RATE_LIMITS[plan].limit,
            "pending_checkout": checkout_json(pending) if pending else None,
            "subscription": {"id": state["subscription"], "status": state["subscription_status"]}
            if state and state["subscription"] else None}


def start_checkout(request, org):
    """Start a checkout for a plan (admins); nothing changes until Stripe's signed webhook"""
    plan = validate(request.json_object(), CHECKOUT)["plan"]
    tenancy = tenancy_of(request)
    data = tenancy.data(org)
    with data.transaction():
        if tenancy.plan_of(org["id"])[0] == plan:
            raise Conflict(f"the organisation is on {plan} already")
        data.update("checkouts", "status = 'open'", (), status="expired")   # the newest only
        row = data.insert("checkouts", id=f"cs_{secrets.token_hex(16)}", plan=plan,
                          status="open", created_by=acting_user_id(request),
                          created_at=utc_timestamp())
    return created(checkout_json(row), f"/orgs/{org['slug']}/billing")


@app.post("/webhooks/stripe", public=True, body_limit=512 * 1024,
          request_schema={"type": "object", "required": ["id", "type", "created", "data"]},
          response_schema=ACK_SCHEMA,
          responses={200: "Verified and stored (or stored before: a duplicate); applied "
                          "afterwards by a worker",
                     400: "No, a stale or a wrong Stripe-Signature; or not an event. Nothing "
                          "is stored."})
def receive_stripe_event(request):
    """Stripe's webhook: a verified billing event is stored, queued and acknowledged"""
    state = request.app.state
    verify_signature(request.header("Stripe-Signature"), request.body, state.webhook_secrets,
                     state.tolerance)
    event = parse_event(request.body)
    row, first = store_event(state.db, event, request.body)
    if first or row["status"] == "received":   # a redelivery queues what a crash left unqueued
        queue_event(state.queue, row["id"], row["replays"])
    return {"received": True, "id": row["id"], "duplicate": not first}


# =============================================================================================
# Routes: the audit trail and usage
# =============================================================================================

ACTION_FILTER = Query("action", "only this action (e.g. member.role_changed)")


def list_audit(request, org):
    """The org's audit trail in seq order, with the hashes (admins)"""
    limit, cursor = list_params(request, (int,))
    prefix = f"org:{org['id']}/"
    # Every target of this org starts with its prefix: the range from the prefix up to the
    # prefix with its final '/' raised to '0' holds exactly those ('0' follows '/' in ASCII).
    conditions = ["target >= ?", "target < ?", "seq > ?"]
    params = [prefix, prefix[:-1] + "0", cursor[0] if cursor else 0]
    if action := ACTION_FILTER.read(request):
        conditions.append("action = ?")
        params.append(action)
    rows = request.app.state.db.query(
        f"SELECT * FROM entries WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT ?",
        (*params, limit + 1))
    return page(rows, limit, lambda row: [row["seq"]], entry_from_row)


def verify_audit(request, org):
    """Recompute the whole hash chain (one chain for every org) and check its checkpoints"""
    return request.app.state.audit.verify()


def read_usage(request, org):
    """The org's metered requests (today, this month, by caller) beside its plan's limits"""
    tenancy = tenancy_of(request)
    data = tenancy.data(org)
    today = utc_timestamp()[:10]
    month = (today[:8] + "01",)
    plan, limits = tenancy.plan_of(org["id"])
    rows = data.select("usage", "day >= ?", month, order_by="day, caller")
    by_caller = {}
    for row in rows:
        by_caller[row["caller"]] = by_caller.get(row["caller"], 0) + row["requests"]
    inspected = request.app.state.limiter.inspect(limit_key({"id": org["id"], "plan": plan}))
    policy = RATE_LIMITS[plan]
    return {"plan": plan, "month": today[:7],
            "requests": {"today": sum(row["requests"] for row in rows if row["day"] == today),
                         "this_month": sum(by_caller.values()),
                         "by_caller": [{"caller": caller, "requests": count}
                                       for caller, count in sorted(by_caller.items())]},
            "rate_limit": {"limit": policy.limit, "window_s": policy.window_s,
                           "remaining": inspected[1].remaining if inspected else policy.limit},
            "projects": {"used": data.count("projects"), "limit": limits.projects},
            "members": {"used": tenancy.control(org).count("memberships"),
                        "limit": limits.members}}


def tenancy_of(request):
    return request.app.state.tenancy


# Each route under /orgs/{slug} is declared with multi_tenant's tenant_route: the org is resolved
# and the permission checked (404 for strangers, 403 naming the permission) before the handler.
NOT_A_MEMBER = {404: "No such organisation, or you are not a member"}
ADMINS = {403: "Needs settings:manage (admins and owners; never an API key)", **NOT_A_MEMBER}
for method, pattern, permission, handler, options in [
        ("POST", "/orgs/{slug}/api-keys", MANAGE_ORG, create_api_key, {
            "request_schema": body_schema(NEW_KEY), "response_schema": KEY_SCHEMA,
            "responses": {201: "The key, with its secret `key` shown this once", **ADMINS,
                          422: "A bad name or scope"}}),
        ("GET", "/orgs/{slug}/api-keys", MANAGE_ORG, list_api_keys, {
            "query": PAGE, "responses": {200: "The org's keys, never their secrets", **ADMINS}}),
        ("DELETE", "/orgs/{slug}/api-keys/{key_id:int}", MANAGE_ORG, revoke_api_key, {
            "status": 204, "responses": {204: "Revoked", **ADMINS}}),
        ("GET", "/orgs/{slug}/billing", READ, read_billing, {
            "responses": {200: '{"plan", "limits", "pending_checkout", "subscription"}',
                          **NOT_A_MEMBER}}),
        ("POST", "/orgs/{slug}/billing/checkout", MANAGE_ORG, start_checkout, {
            "request_schema": body_schema(CHECKOUT),
            "responses": {201: "A pending checkout: the plan changes when Stripe's webhook says "
                               "it is paid", **ADMINS, 409: "Already on that plan"}}),
        ("GET", "/orgs/{slug}/audit", MANAGE_ORG, list_audit, {
            "query": [*PAGE, ACTION_FILTER],
            "responses": {200: "The org's audit entries, with their hashes", **ADMINS}}),
        ("GET", "/orgs/{slug}/audit/verify", MANAGE_ORG, verify_audit, {
            "blocking": True,
            "responses": {200: '{"valid": true, "entries", "head"} or {"valid": false, '
                               '"first_bad_seq", "reason"}', **ADMINS}}),
        ("GET", "/orgs/{slug}/usage", READ, read_usage, {
            "responses": {200: "Requests this month by caller, the rate limit, the quotas",
                          **NOT_A_MEMBER}})]:
    tenant_route(app, method, pattern, permission, handler, **options)

add_tenancy_routes(app)
app.use(require_caller)
app.use(limit_per_org)


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    add_webhook_arguments(parser)
    parser.add_argument("--audit-key", help="the HMAC key the audit log's checkpoints are signed "
                        "with (default: made once, kept in the database)")
    add_queue_flags(parser, workers_default=2, workers_min=0)
    args = parser.parse_args(argv)
    check_tenancy_routes(app)   # every route declares its permission, or the server won't start
    db = app.open_database(args, SCHEMA)
    key = kept_secret(db, "checkpoint_key", args.audit_key, "--audit-key").encode()
    app.state.db = db
    app.state.auth = Auth.from_args(db, args)
    app.state.audit = AuditLog(db, key, checkpoint_every=1000)
    app.state.tenancy = SaasTenancy(db, app.state.audit, trace=args.trace)
    app.state.limiter = Limiter()
    app.state.webhook_secrets = resolve_secrets(args, db)
    app.state.tolerance = args.tolerance
    app.state.queue = start_event_queue(app, db, args, APPLY_BILLING_EVENT)
    app.run(args)


if __name__ == "__main__":
    main()
