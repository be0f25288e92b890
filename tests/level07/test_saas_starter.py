"""level07/saas_starter.py, black-box: signup makes a personal org; login, refresh, logout; the
tenancy of multi_tenant served as it is; API keys shown once, stored as a hash and a prefix,
scoped, revocable, never managing keys, members or billing, usable instead of a user token;
billing where only the signed Stripe webhook changes the plan (acknowledged at once, applied
afterwards by a worker of the job queue, in event order, once per event, after a kill -9 too),
and a downgrade limits without deleting; the audit trail of every security-relevant action,
readable by admins only, whose hash chain verifies and shows tampering; per-org rate limits by
plan, shared by users and keys; usage metering; another org's slugs and ids are 404 on every
/orgs/{slug} route with every method; an org's export and deletion cover this project's tables
and no other org's rows; and the whole journey end to end, signed with Stripe's own library when
it is installed.
"""
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import sqlite3
import threading
import time
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once

SCRIPT = "level07/saas_starter.py"
TIMEOUT = 10
SECRET = "whsec_" + "s" * 32
PASSWORD = "correct horse battery staple"
FLAGS = ["--scrypt-n", "1024", "--webhook-secret", SECRET, "--audit-key", "k" * 32,
         "--poll-s", "0.02", "--backoff-s", "0.05"]
SAAS_TABLES = ("api_keys", "checkouts", "billing", "usage")   # this project's tenant tables


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *FLAGS)


# --------------------------------------------------------------------------------------------
# Helpers: accounts, calls, signed events


class Account:
    """A signed-up user: its email, access token and personal org ({"id", "slug"})."""

    def __init__(self, server, email=None):
        self.server = server
        self.email = email or f"u{uuid.uuid4().hex[:10]}@example.com"
        body = expect_json(requests.post(server.url + "/auth/signup", timeout=TIMEOUT,
                                         json={"email": self.email, "password": PASSWORD}), 201)
        self.id = body["id"]
        self.org = body["organization"]
        self.signup = body
        self.login()

    def login(self):
        self.tokens = expect_json(requests.post(
            self.server.url + "/auth/login", json={"email": self.email, "password": PASSWORD},
            timeout=TIMEOUT), 200)
        self.token = self.tokens["access_token"]
        return self.tokens

    def call(self, method, path, token=None, **kw):
        return call(self.server, method, path, token or self.token, **kw)


def call(server, method, path, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, server.url + path, headers=headers, timeout=TIMEOUT, **kw)


def join(owner, member, role, slug=None):
    """`owner` invites `member` to an org (the owner's own by default) with `role`; accepted."""
    slug = slug or owner.org["slug"]
    invite = expect_json(owner.call("POST", f"/orgs/{slug}/invites",
                                    json={"email": member.email, "role": role}), 201)
    expect_json(member.call("POST", f"/invites/{invite['token']}/accept"), 200)


def make_key(account, scopes=None, slug=None):
    body = {"name": "ci"} if scopes is None else {"name": "ci", "scopes": scopes}
    return expect_json(account.call("POST", f"/orgs/{slug or account.org['slug']}/api-keys",
                                    json=body), 201)


def audit(account, slug=None, action=None):
    query = f"?limit=100&action={action}" if action else "?limit=100"
    return expect_json(account.call("GET", f"/orgs/{slug or account.org['slug']}/audit{query}"),
                       200)["items"]


def plan_of(account, slug=None):
    return expect_json(account.call("GET", f"/orgs/{slug or account.org['slug']}/billing"),
                       200)["plan"]


def sign(body, secret=SECRET, timestamp=None):
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def event(event_type, obj, *, created=None):
    return {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": event_type,
            "created": int(time.time()) if created is None else created,
            "api_version": "2024-06-20", "livemode": False, "data": {"object": obj}}


def deliver(server, evt, header=None):
    body = json.dumps(evt, indent=2).encode()
    return requests.post(server.url + "/webhooks/stripe", data=body, timeout=TIMEOUT, headers={
        "Content-Type": "application/json", "Stripe-Signature": header or sign(body)})


def completed(checkout, **changes):
    """The checkout.session.completed event Stripe sends once `checkout` is paid."""
    return event("checkout.session.completed", {
        "id": checkout["id"], "object": "checkout.session", "mode": "subscription",
        "client_reference_id": checkout["client_reference_id"], "payment_status": "paid",
        "subscription": f"sub_{uuid.uuid4().hex[:14]}", "metadata": checkout["metadata"],
        **changes})


def subscription(org_id, status, event_type="customer.subscription.updated", **kw):
    return event(event_type, {"id": f"sub_{uuid.uuid4().hex[:14]}", "object": "subscription",
                              "status": status, "metadata": {"org_id": str(org_id)}}, **kw)


def wait_until(check, what):
    """`check()` once it is truthy; a worker applies an event after the webhook's 200. The
    pause doubles up to half a second: a poll of an org's route spends its rate limit."""
    deadline, pause = time.monotonic() + TIMEOUT, 0.01
    while not (found := check()):
        assert time.monotonic() < deadline, f"still not {what}"
        time.sleep(pause)
        pause = min(2 * pause, 0.5)
    return found


def billing_on(account, plan, slug=None):
    """The org's billing once its plan is `plan`."""
    def billing():
        found = expect_json(account.call("GET", f"/orgs/{slug or account.org['slug']}/billing"),
                            200)
        return found if found["plan"] == plan else None
    return wait_until(billing, f"on {plan}")


def stored_event(server, event_id):
    """The event's row and its job's status, read from the database file (this server serves
    no event list): {"status", "times_applied", "deliveries", "jobs": [statuses]}."""
    with contextlib.closing(sqlite3.connect(server.db_path)) as db:
        row = db.execute("SELECT status, times_applied, deliveries FROM webhook_events "
                         "WHERE id = ?", (event_id,)).fetchone()
        jobs = [status for status, in db.execute(
            "SELECT status FROM jobs WHERE json_extract(payload, '$.event') = ?", (event_id,))]
    return row and {"status": row[0], "times_applied": row[1], "deliveries": row[2],
                    "jobs": jobs}


def job_done(server, event_id):
    """The stored event once the job that applies it has finished (its audit entry written)."""
    return wait_until(lambda: (found := stored_event(server, event_id)) and found["jobs"] and
                      all(status == "succeeded" for status in found["jobs"]) and found,
                      f"applied: {event_id}")


def deliver_applied(server, evt):
    """Deliver `evt` (a 200) and wait until a worker has applied it."""
    answer = expect_json(deliver(server, evt), 200)
    job_done(server, evt["id"])
    return answer


def upgrade(account, slug=None):
    """Check out pro and deliver the paid checkout: the org is on pro once it is applied."""
    slug = slug or account.org["slug"]
    checkout = expect_json(account.call("POST", f"/orgs/{slug}/billing/checkout",
                                        json={"plan": "pro"}), 201)
    deliver_applied(account.server, completed(checkout))
    assert plan_of(account, slug) == "pro"
    return checkout


def new_project(account, name="p", slug=None, token=None):
    return account.call("POST", f"/orgs/{slug or account.org['slug']}/projects", token,
                        json={"name": name})


def entry_hash(prev_hash, entry):
    """audit_log.md's recipe: sha256(prev_hash || canonical JSON of the seven fields)."""
    fields = {name: entry[name] for name in ("seq", "ts", "actor", "action", "target",
                                            "metadata", "ip")}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev_hash.encode() + canonical.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Accounts: signup makes a personal org; login, refresh, logout


def test_signup_makes_a_personal_org_owned_by_the_new_user(server):
    ann = Account(server)
    assert set(ann.org) >= {"id", "slug"} and isinstance(ann.org["id"], int)
    assert "password_hash" not in ann.signup
    members = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/members"), 200)["items"]
    assert [(m["user_id"], m["role"]) for m in members] == [(ann.id, "owner")]
    assert plan_of(ann) == "free"
    bob = Account(server)
    assert bob.org["id"] != ann.org["id"] and bob.org["slug"] != ann.org["slug"]


def test_a_taken_email_makes_no_org_either(server):
    ann = Account(server)
    expect_problem(requests.post(server.url + "/auth/signup", timeout=TIMEOUT,
                                 json={"email": ann.email, "password": PASSWORD}), 409)
    orgs = expect_json(ann.call("GET", "/orgs"), 200)["items"]
    assert [org["id"] for org in orgs] == [ann.org["id"]]


def test_login_refresh_and_logout(server):
    ann = Account(server)
    refreshed = expect_json(requests.post(server.url + "/auth/refresh", timeout=TIMEOUT,
                                          json={"refresh_token": ann.tokens["refresh_token"]}), 200)
    expect_json(ann.call("GET", "/me", refreshed["access_token"]), 200)
    expect(requests.post(server.url + "/auth/logout", timeout=TIMEOUT,
                         json={"refresh_token": refreshed["refresh_token"]}), 204)
    expect_problem(requests.post(server.url + "/auth/refresh", timeout=TIMEOUT,
                                 json={"refresh_token": refreshed["refresh_token"]}), 401)
    expect_problem(requests.post(server.url + "/auth/login", timeout=TIMEOUT,
                                 json={"email": ann.email, "password": "wrong password!"}), 401)
    expect_problem(call(server, "GET", f"/orgs/{ann.org['slug']}/projects"), 401)


# --------------------------------------------------------------------------------------------
# Tenancy as multi_tenant serves it: invites, roles, quotas


def test_invites_roles_and_the_free_quota(server):
    owner, viewer = Account(server), Account(server)
    join(owner, viewer, "viewer")
    slug = owner.org["slug"]
    expect_json(new_project(owner, "one"), 201)
    assert len(expect_json(viewer.call("GET", f"/orgs/{slug}/projects"), 200)["items"]) == 1
    expect_problem(new_project(viewer, "two", slug=slug), 403)
    expect_json(new_project(owner, "two"), 201)
    expect_json(new_project(owner, "three"), 201)
    assert "3" in expect_problem(new_project(owner, "four"), 402)["detail"]


# --------------------------------------------------------------------------------------------
# API keys


def test_a_key_is_shown_once_and_stored_as_a_hash_and_a_prefix(server):
    ann = Account(server)
    made = make_key(ann)
    key = made["key"]
    assert key.startswith("sk_live_") and len(key) >= 40
    assert key.startswith(made["prefix"]) and len(made["prefix"]) < len(key) - 20
    assert made["scopes"] == ["read", "write"]
    listed = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/api-keys"), 200)["items"]
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
    assert key not in json.dumps(listed)
    with sqlite3.connect(server.db_path) as db:
        stored = db.execute("SELECT * FROM api_keys WHERE id = ?", (made["id"],)).fetchone()
    assert key not in [str(value) for value in stored]
    assert hashlib.sha256(key.encode()).hexdigest() in stored


def test_a_key_stands_in_for_a_user_token_within_its_scopes(server):
    ann = Account(server)
    slug = ann.org["slug"]
    both, read, write = make_key(ann)["key"], make_key(ann, ["read"])["key"], \
        make_key(ann, ["write"])["key"]
    project = expect_json(new_project(ann, "by key", token=both), 201)
    expect_json(ann.call("GET", f"/orgs/{slug}/projects/{project['id']}", both), 200)
    expect_json(ann.call("GET", f"/orgs/{slug}/projects", read), 200)
    assert "tenant:write" in expect_problem(new_project(ann, "no", token=read), 403)["detail"]
    expect_json(new_project(ann, "write only", token=write), 201)
    expect_problem(ann.call("GET", f"/orgs/{slug}/projects", write), 403)


def test_a_key_never_manages_keys_members_invites_or_billing(server):
    ann, bob = Account(server), Account(server)
    join(ann, bob, "member")
    slug = ann.org["slug"]
    key = make_key(ann)["key"]
    for method, path, body in [
            ("POST", f"/orgs/{slug}/api-keys", {"name": "more"}),
            ("GET", f"/orgs/{slug}/api-keys", None),
            ("DELETE", f"/orgs/{slug}/api-keys/1", None),
            ("PATCH", f"/orgs/{slug}/members/{bob.id}", {"role": "admin"}),
            ("DELETE", f"/orgs/{slug}/members/{bob.id}", None),
            ("POST", f"/orgs/{slug}/invites", {"email": "x@example.com", "role": "member"}),
            ("POST", f"/orgs/{slug}/billing/checkout", {"plan": "pro"}),
            ("GET", f"/orgs/{slug}/audit", None)]:
        expect_problem(ann.call(method, path, key, json=body), 403)
    # … nor acts outside its org: routes without one need a user, another org is unknown.
    expect_problem(ann.call("GET", "/me", key), 403)
    expect_problem(ann.call("POST", "/orgs", key, json={"name": "x", "slug": "key-made"}), 403)
    expect_problem(ann.call("GET", f"/orgs/{bob.org['slug']}/projects", key), 404)


def test_only_admins_make_keys_and_bad_scopes_are_422(server):
    ann, bob = Account(server), Account(server)
    join(ann, bob, "member")
    slug = ann.org["slug"]
    expect_problem(bob.call("POST", f"/orgs/{slug}/api-keys", json={"name": "x"}), 403)
    problem = expect_problem(ann.call("POST", f"/orgs/{slug}/api-keys",
                                      json={"name": "x", "scopes": ["admin"]}), 422)
    assert "scopes" in json.dumps(problem)
    expect_problem(ann.call("POST", f"/orgs/{slug}/api-keys", json={"name": "x", "scopes": []}),
                   422)
    expect_problem(ann.call("POST", f"/orgs/{slug}/api-keys",
                            json={"name": "x", "key": "sk_live_x"}), 422)


def test_a_revoked_or_unknown_key_is_a_401(server):
    ann = Account(server)
    slug = ann.org["slug"]
    made = make_key(ann)
    expect_json(ann.call("GET", f"/orgs/{slug}/projects", made["key"]), 200)
    expect(ann.call("DELETE", f"/orgs/{slug}/api-keys/{made['id']}"), 204)
    resp = ann.call("GET", f"/orgs/{slug}/projects", made["key"])
    expect_problem(resp, 401)
    assert "invalid_token" in resp.headers["WWW-Authenticate"]
    expect_problem(ann.call("GET", f"/orgs/{slug}/projects", "sk_live_" + "x" * 43), 401)
    listed = expect_json(ann.call("GET", f"/orgs/{slug}/api-keys"), 200)["items"]
    assert listed[0]["revoked_at"] is not None
    expect_problem(ann.call("DELETE", f"/orgs/{slug}/api-keys/999999"), 404)


# --------------------------------------------------------------------------------------------
# Billing: the plan changes only on the signed webhook


def test_a_checkout_is_pending_until_the_signed_webhook_arrives(server):
    ann = Account(server)
    slug = ann.org["slug"]
    billing = expect_json(ann.call("GET", f"/orgs/{slug}/billing"), 200)
    assert billing["plan"] == "free" and billing["pending_checkout"] is None
    assert billing["limits"] == {"projects": 3, "members": 5}
    checkout = expect_json(ann.call("POST", f"/orgs/{slug}/billing/checkout",
                                    json={"plan": "pro"}), 201)
    assert checkout["id"].startswith("cs_")
    assert checkout["client_reference_id"] == str(ann.org["id"])
    billing = expect_json(ann.call("GET", f"/orgs/{slug}/billing"), 200)
    assert billing["plan"] == "free" and billing["pending_checkout"]["id"] == checkout["id"]
    # The client's word changes nothing: no route sets a plan, an unsigned event is refused.
    expect_problem(ann.call("PATCH", f"/orgs/{slug}/billing", json={"plan": "pro"}), 405)
    body = json.dumps(completed(checkout)).encode()
    expect_problem(requests.post(server.url + "/webhooks/stripe", data=body, timeout=TIMEOUT),
                   400)
    expect_problem(deliver(server, completed(checkout), sign(body, "whsec_" + "x" * 32)), 400)
    stale = sign(body, timestamp=int(time.time()) - 301)
    expect_problem(deliver(server, completed(checkout), stale), 400)
    unpaid = completed(checkout, payment_status="unpaid")
    deliver_applied(server, unpaid)
    assert plan_of(ann) == "free"
    expect_json(deliver(server, completed(checkout)), 200)
    billing = billing_on(ann, "pro")
    assert billing["pending_checkout"] is None
    assert billing["limits"] == {"projects": 100, "members": 50}
    assert billing["subscription"]["id"].startswith("sub_")
    expect_problem(ann.call("POST", f"/orgs/{slug}/billing/checkout", json={"plan": "pro"}), 409)


def test_only_admins_check_out(server):
    ann, bob = Account(server), Account(server)
    join(ann, bob, "member")
    expect_problem(bob.call("POST", f"/orgs/{ann.org['slug']}/billing/checkout",
                            json={"plan": "pro"}), 403)
    expect_problem(ann.call("POST", f"/orgs/{ann.org['slug']}/billing/checkout",
                            json={"plan": "gold"}), 422)


def test_subscriptions_find_their_org_by_metadata_and_downgrade_without_deleting(server):
    ann = Account(server)
    org_id = ann.org["id"]
    expect_json(deliver(server, subscription(org_id, "active", "customer.subscription.created")),
                200)
    billing_on(ann, "pro")
    for i in range(5):                                      # more than free's 3
        expect_json(new_project(ann, f"p{i}"), 201)
    deliver_applied(server, subscription(org_id, "past_due"))
    assert plan_of(ann) == "pro"                            # Stripe is still retrying the card
    expect_json(deliver(server, subscription(org_id, "canceled",
                                             "customer.subscription.deleted")), 200)
    billing_on(ann, "free")
    projects = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/projects"), 200)["items"]
    assert len(projects) == 5                               # nothing deleted …
    expect_problem(new_project(ann, "sixth"), 402)          # … but no new row over the quota
    expect(ann.call("DELETE", f"/orgs/{ann.org['slug']}/projects/{projects[0]['id']}"), 204)


def test_an_older_event_never_overwrites_a_newer_plan(server):
    ann = Account(server)
    now = int(time.time())
    deliver_applied(server, subscription(ann.org["id"], "canceled", created=now))
    deliver_applied(server, subscription(ann.org["id"], "active", created=now - 60))
    assert plan_of(ann) == "free"
    expect_json(deliver(server, subscription(ann.org["id"], "active", created=now + 1)), 200)
    billing_on(ann, "pro")


def test_an_event_delivered_twice_is_applied_once(server):
    ann = Account(server)
    now = int(time.time())
    up = subscription(ann.org["id"], "active", created=now)
    down = subscription(ann.org["id"], "canceled", created=now)   # the same second
    assert deliver_applied(server, up)["duplicate"] is False
    deliver_applied(server, down)
    assert expect_json(deliver(server, up), 200)["duplicate"] is True   # Stripe retries it
    assert stored_event(server, up["id"]) == {"status": "processed", "times_applied": 1,
                                              "deliveries": 2, "jobs": ["succeeded"]}
    assert plan_of(ann) == "free"
    assert [e["metadata"]["to"] for e in audit(ann, action="plan.changed")] == ["pro", "free"]


def test_sixteen_simultaneous_deliveries_of_one_event_change_the_plan_once(server):
    ann = Account(server)
    checkout = expect_json(ann.call("POST", f"/orgs/{ann.org['slug']}/billing/checkout",
                                    json={"plan": "pro"}), 201)
    evt = completed(checkout)
    barrier = threading.Barrier(16)

    def send(_):
        barrier.wait()
        return expect_json(deliver(server, evt), 200)["duplicate"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        duplicates = list(pool.map(send, range(16)))
    assert sorted(duplicates) == [False] + [True] * 15
    assert job_done(server, evt["id"]) == {"status": "processed", "times_applied": 1,
                                           "deliveries": 16, "jobs": ["succeeded"]}
    assert plan_of(ann) == "pro"
    assert len(audit(ann, action="plan.changed")) == 1


def check_out(account):
    return expect_json(account.call("POST", f"/orgs/{account.org['slug']}/billing/checkout",
                                    json={"plan": "pro"}), 201)


def restarted(start_server, account, db):
    """A new server on `db` (with its workers), `account` signed in to it."""
    account.server = start_server(SCRIPT, *FLAGS, db=db)
    account.login()
    return account.server


def test_the_webhook_answers_before_applying_and_a_kill_9_then_loses_nothing(
        start_server, tmp_path):
    """With no worker, the 200 comes back and nothing is applied yet: the checkout is still
    pending, the event waits with its job queued. Killed (-9) there, the next start's workers
    apply it, once."""
    db = tmp_path / "saas.sqlite3"
    server = start_server(SCRIPT, *FLAGS, "--workers", "0", db=db)
    ann = Account(server)
    checkout = check_out(ann)
    evt = completed(checkout)
    assert expect_json(deliver(server, evt), 200) == {"received": True, "id": evt["id"],
                                                      "duplicate": False}
    billing = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/billing"), 200)
    assert billing["plan"] == "free" and billing["pending_checkout"]["id"] == checkout["id"]
    assert stored_event(server, evt["id"]) == {"status": "received", "times_applied": 0,
                                               "deliveries": 1, "jobs": ["queued"]}
    server.kill9()
    server = restarted(start_server, ann, db)
    assert billing_on(ann, "pro")["pending_checkout"] is None
    assert expect_json(deliver(server, evt), 200)["duplicate"] is True   # Stripe's retry
    assert job_done(server, evt["id"]) == {"status": "processed", "times_applied": 1,
                                           "deliveries": 2, "jobs": ["succeeded"]}
    assert [e["metadata"]["to"] for e in audit(ann, action="plan.changed")] == ["pro"]


def test_an_event_stored_but_never_queued_is_queued_at_the_next_start(start_server, tmp_path):
    db = tmp_path / "outbox.sqlite3"
    server = start_server(SCRIPT, *FLAGS, "--workers", "0", db=db)
    ann = Account(server)
    evt = completed(check_out(ann))
    expect_json(deliver(server, evt), 200)
    server.kill9()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM jobs")   # as if the process had died between store and queue
    server = restarted(start_server, ann, db)
    billing_on(ann, "pro")
    assert job_done(server, evt["id"])["times_applied"] == 1
    assert len(audit(ann, action="plan.changed")) == 1


def test_a_failure_to_apply_is_retried_and_the_checkout_stays_pending_meanwhile(
        start_server, tmp_path):
    db = tmp_path / "failing.sqlite3"
    server = start_server(SCRIPT, *FLAGS, "--backoff-s", "0.5", db=db)
    ann = Account(server)
    checkout = check_out(ann)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:   # a fault, injected
        conn.execute("CREATE TRIGGER broken BEFORE INSERT ON billing "
                     "BEGIN SELECT RAISE(ABORT, 'the disk is on fire'); END")
    evt = completed(checkout)
    expect_json(deliver(server, evt), 200)
    wait_until(lambda: stored_event(server, evt["id"])["status"] == "failed", "failed")
    billing = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/billing"), 200)
    assert billing["plan"] == "free" and billing["pending_checkout"]["id"] == checkout["id"]
    assert expect_json(deliver(server, evt), 200)["duplicate"] is True   # still 200
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER broken")
    assert billing_on(ann, "pro")["pending_checkout"] is None   # the queue's retry
    assert job_done(server, evt["id"])["times_applied"] == 1
    assert len(audit(ann, action="plan.changed")) == 1


def test_a_plan_change_and_its_audit_entry_commit_together(start_server, tmp_path):
    """When the plan.changed entry cannot be written, the plan does not change either: the two
    are one transaction, and the queue's retry later stores both, once."""
    db = tmp_path / "audit-fails.sqlite3"
    server = start_server(SCRIPT, *FLAGS, "--backoff-s", "0.5", db=db)
    ann = Account(server)
    checkout = check_out(ann)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:   # the audit write fails
        conn.execute("CREATE TRIGGER audit_broken BEFORE INSERT ON entries "
                     "WHEN NEW.action = 'plan.changed' "
                     "BEGIN SELECT RAISE(ABORT, 'the audit disk is on fire'); END")
    evt = completed(checkout)
    expect_json(deliver(server, evt), 200)
    wait_until(lambda: stored_event(server, evt["id"])["status"] == "failed", "failed")
    assert plan_of(ann) == "free"
    assert audit(ann, action="plan.changed") == []
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER audit_broken")
    assert billing_on(ann, "pro")["pending_checkout"] is None
    assert job_done(server, evt["id"])["times_applied"] == 1
    assert len(audit(ann, action="plan.changed")) == 1


def test_events_naming_no_org_or_another_type_are_acknowledged_and_ignored(server):
    ann = Account(server)
    for evt in (subscription(999999, "active"), event("invoice.paid", {"id": "in_1"}),
                event("customer.subscription.updated", {"id": "sub_x", "status": "active"})):
        deliver_applied(server, evt)
        assert stored_event(server, evt["id"])["status"] == "ignored"
    assert plan_of(ann) == "free"


# --------------------------------------------------------------------------------------------
# The audit trail


def test_every_security_relevant_action_is_audited_for_admins_only(server):
    ann, bob, cid = Account(server), Account(server), Account(server)
    join(ann, bob, "member")
    join(ann, cid, "member")
    slug = ann.org["slug"]
    expect_json(ann.call("PATCH", f"/orgs/{slug}/members/{bob.id}", json={"role": "admin"}), 200)
    expect(ann.call("DELETE", f"/orgs/{slug}/members/{cid.id}"), 204)
    made = make_key(ann)
    expect(ann.call("DELETE", f"/orgs/{slug}/api-keys/{made['id']}"), 204)
    upgrade(ann)
    bob.login()
    entries = audit(ann)
    actions = [e["action"] for e in entries]
    for action in ("member.role_changed", "member.removed", "api_key.created", "api_key.revoked",
                   "plan.changed", "user.login"):
        assert action in actions, (action, actions)
    by_action = {e["action"]: e for e in entries}
    assert by_action["member.role_changed"]["actor"] == f"user:{ann.id}"
    assert by_action["plan.changed"]["actor"] == "stripe"
    assert by_action["plan.changed"]["metadata"]["to"] == "pro"
    assert f"user:{bob.id}" in [e["actor"] for e in entries if e["action"] == "user.login"]
    assert all(e["target"].startswith(f"org:{ann.org['id']}/") for e in entries)
    expect_json(bob.call("GET", f"/orgs/{slug}/audit"), 200)          # bob is an admin now
    dan = Account(server)
    join(ann, dan, "member")
    expect_problem(dan.call("GET", f"/orgs/{slug}/audit"), 403)
    expect_problem(cid.call("GET", f"/orgs/{slug}/audit"), 404)       # removed: a stranger
    # Another org's trail holds none of this.
    assert not [e for e in audit(cid) if e["target"].startswith(f"org:{ann.org['id']}/")]


def test_the_chain_verifies_and_shows_tampering(start_server, tmp_path):
    db = tmp_path / "saas.sqlite3"
    server = start_server(SCRIPT, *FLAGS, "--db", db)
    ann = Account(server)
    make_key(ann)
    entries = audit(ann)
    for entry in entries:
        assert entry_hash(entry["prev_hash"], entry) == entry["hash"]
    assert expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/audit/verify"), 200)["valid"]
    server.stop()
    with sqlite3.connect(db) as conn:   # a stray session drops the trigger and rewrites history
        conn.execute("DROP TRIGGER entries_refuse_update")
        conn.execute("UPDATE entries SET actor = 'nobody' WHERE seq = ?", (entries[-1]["seq"],))
    server = start_server(SCRIPT, *FLAGS, "--db", db)
    ann.server = server
    ann.login()
    verdict = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/audit/verify"), 200)
    assert verdict["valid"] is False and verdict["first_bad_seq"] == entries[-1]["seq"]


# --------------------------------------------------------------------------------------------
# Rate limits by plan, and usage


def test_a_free_org_has_120_requests_a_minute_for_users_and_keys_together(server):
    ann, bob = Account(server), Account(server)
    slug = ann.org["slug"]
    key = make_key(ann)["key"]                              # the org's first request
    path = f"/orgs/{slug}/projects"
    with requests.Session() as session:
        for i in range(119):
            token = (ann.token, key)[i % 2]
            resp = session.get(server.url + path, headers={"Authorization": f"Bearer {token}"},
                               timeout=TIMEOUT)
            expect(resp, 200)
        assert resp.headers["RateLimit-Policy"] == '"default";q=120;w=60'
        for token in (ann.token, key):
            refused = session.get(server.url + path, timeout=TIMEOUT,
                                  headers={"Authorization": f"Bearer {token}"})
            expect_problem(refused, 429)
            assert int(refused.headers["Retry-After"]) >= 1
    expect_json(bob.call("GET", f"/orgs/{bob.org['slug']}/projects"), 200)   # another org
    expect_problem(ann.call("GET", f"/orgs/{ann.org['slug']}/projects", bob.token), 404)  # not his


def test_a_pro_org_has_1200(server):
    ann = Account(server)
    upgrade(ann)
    path = f"/orgs/{ann.org['slug']}/projects"
    with requests.Session() as session:
        for _ in range(125):
            resp = session.get(server.url + path, headers={"Authorization": f"Bearer {ann.token}"},
                               timeout=TIMEOUT)
            expect(resp, 200)
    assert resp.headers["RateLimit-Policy"] == '"default";q=1200;w=60'


def test_usage_is_metered_per_caller(server):
    ann = Account(server)
    slug = ann.org["slug"]
    key = make_key(ann)
    for _ in range(3):
        expect_json(ann.call("GET", f"/orgs/{slug}/projects", key["key"]), 200)
    expect_json(new_project(ann), 201)
    usage = expect_json(ann.call("GET", f"/orgs/{slug}/usage"), 200)
    callers = {c["caller"]: c["requests"] for c in usage["requests"]["by_caller"]}
    assert callers[f"key:{key['id']}"] == 3
    assert callers[f"user:{ann.id}"] >= 3           # the key's creation, the project, this read
    assert usage["requests"]["today"] == sum(callers.values())
    assert usage["plan"] == "free" and usage["rate_limit"]["limit"] == 120
    assert usage["projects"] == {"used": 1, "limit": 3}


# --------------------------------------------------------------------------------------------
# Isolation: this project's own routes, with another org's slug and ids


def valid_body(path):
    """A body the route would take, so that only the ids can be why it answers 404."""
    last = [part for part in path.split("/") if not part.startswith("{")][-1]
    return {"members": {"role": "member"}, "tasks": {"title": "t"}, "projects": {"name": "p"},
            "api-keys": {"name": "k"}, "checkout": {"plan": "pro"}, "settings": {"a": 1},
            "invites": {"email": "x@example.com", "role": "member"}}.get(last, {})


def test_another_orgs_slugs_and_ids_are_404_on_every_route_with_every_method(server):
    """Every route of /openapi.json under /orgs/{slug} (this project's and multi_tenant's as
    served here), every method it has: Ann and her key, with Eve's slug, or with Ann's slug and
    Eve's ids, get 404 — never a 200, a 403 that confirms the org exists, or a 500."""
    ann, eve, eve_teammate = Account(server), Account(server), Account(server)
    ann_key = make_key(ann)["key"]
    theirs = eve.org["slug"]
    project = expect_json(new_project(eve, "secret"), 201)
    task = expect_json(eve.call("POST", f"/orgs/{theirs}/projects/{project['id']}/tasks",
                                json={"title": "t"}), 201)
    invite = expect_json(eve.call("POST", f"/orgs/{theirs}/invites",
                                  json={"email": "someone@example.com", "role": "member"}), 201)
    join(eve, eve_teammate, "member")
    ids = {"key_id": make_key(eve)["id"], "project_id": project["id"], "task_id": task["id"],
           "invite_id": invite["id"], "user_id": eve_teammate.id}
    paths = expect_json(requests.get(server.url + "/openapi.json", timeout=TIMEOUT), 200)["paths"]
    scoped = [path for path in paths if path.startswith("/orgs/{slug}")]
    for required in ("/orgs/{slug}/api-keys/{key_id}", "/orgs/{slug}/billing/checkout",
                     "/orgs/{slug}/audit", "/orgs/{slug}/audit/verify", "/orgs/{slug}/usage",
                     "/orgs/{slug}/projects/{project_id}/tasks/{task_id}"):
        assert required in scoped
    tried = 0
    for path in scoped:
        for method in paths[path]:
            if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                continue
            # Eve's slug, as Ann and as Ann's key; Eve's ids under Ann's slug, as Ann (an owner:
            # her key would be refused first, 403, for what its scopes lack in her own org).
            targets = [(path.format(slug=theirs, **ids), (ann.token, ann_key))]
            if "{" in path.removeprefix("/orgs/{slug}"):
                targets.append((path.format(slug=ann.org["slug"], **ids), (ann.token,)))
            for target, tokens in targets:
                for token in tokens:
                    body = valid_body(path) if method.upper() in ("POST", "PATCH") else None
                    resp = ann.call(method.upper(), target, token, json=body)
                    problem = expect_problem(resp, 404)
                    assert theirs not in problem.get("detail", "") or target.startswith(
                        f"/orgs/{theirs}"), problem
                    tried += 1
    assert tried > 50
    expect_problem(ann.call("POST", f"/invites/{invite['token']}/accept"), 404)   # not for her
    # Eve's rows are all still there.
    expect_json(eve.call("GET", f"/orgs/{theirs}/projects/{project['id']}/tasks/{task['id']}"), 200)
    expect_json(eve.call("GET", f"/orgs/{theirs}/invites/{invite['id']}"), 200)


def test_the_export_holds_the_orgs_keys_and_billing_and_no_secret(server):
    ann, eve = Account(server), Account(server)
    made = make_key(ann)
    make_key(eve)
    upgrade(ann)
    export = expect_json(ann.call("GET", f"/orgs/{ann.org['slug']}/export"), 200)
    tables = export["tables"]
    assert [k["id"] for k in tables["api_keys"]] == [made["id"]]
    rows = [row for table in SAAS_TABLES for row in tables[table]]
    assert rows and {row["org_id"] for row in rows} == {ann.org["id"]}
    assert made["key"] not in json.dumps(export)


def test_deleting_an_org_removes_its_keys_checkouts_billing_and_usage_and_nothing_else(server):
    ann, eve = Account(server), Account(server)
    for account in (ann, eve):
        make_key(account)
        upgrade(account)
    key = make_key(ann)["key"]

    def rows(org_id):
        with sqlite3.connect(server.db_path) as db:
            return {table: db.execute(f"SELECT count(*) FROM {table} WHERE org_id = ?",
                                      (org_id,)).fetchone()[0] for table in SAAS_TABLES}

    eve_before = rows(eve.org["id"])
    assert all(rows(ann.org["id"]).values()) and all(eve_before.values())
    expect(ann.call("DELETE", f"/orgs/{ann.org['slug']}"), 204)
    assert rows(ann.org["id"]) == dict.fromkeys(SAAS_TABLES, 0)
    assert rows(eve.org["id"]) == eve_before
    expect_problem(ann.call("GET", f"/orgs/{ann.org['slug']}/projects", key), 401)


# --------------------------------------------------------------------------------------------
# The whole journey


def stripe_header(payload):
    """Signed by Stripe's own library when it is installed, else by `sign`."""
    try:
        import stripe
    except ImportError:
        return sign(payload.encode())
    signature = stripe.WebhookSignature
    if hasattr(signature, "generate_signature_header"):
        return signature.generate_signature_header(payload, SECRET)
    timestamp = int(time.time())
    return f"t={timestamp},v1={signature._compute_signature(f'{timestamp}.{payload}', SECRET)}"


def test_end_to_end(start_server):
    server = start_server(SCRIPT, *FLAGS)
    owner, teammate = Account(server), Account(server)
    slug = owner.org["slug"]
    join(owner, teammate, "member")
    key = make_key(owner)
    project = expect_json(new_project(owner, "launch", token=key["key"]), 201)
    expect_json(teammate.call("GET", f"/orgs/{slug}/projects/{project['id']}"), 200)
    for name in ("two", "three"):
        expect_json(new_project(teammate, name, slug=slug), 201)
    expect_problem(new_project(owner, "four"), 402)

    checkout = expect_json(owner.call("POST", f"/orgs/{slug}/billing/checkout",
                                      json={"plan": "pro"}), 201)
    assert plan_of(owner) == "free"
    payload = json.dumps(completed(checkout), indent=2)
    resp = requests.post(server.url + "/webhooks/stripe", data=payload.encode(), timeout=TIMEOUT,
                         headers={"Content-Type": "application/json",
                                  "Stripe-Signature": stripe_header(payload)})
    expect_json(resp, 200)
    billing_on(owner, "pro")                        # applied by a worker, after the 200
    expect_json(new_project(owner, "four"), 201)

    downgrade = json.dumps(subscription(owner.org["id"], "canceled",
                                        "customer.subscription.deleted"))
    expect_json(requests.post(server.url + "/webhooks/stripe", data=downgrade.encode(),
                              timeout=TIMEOUT, headers={"Stripe-Signature":
                                                        stripe_header(downgrade)}), 200)
    billing_on(owner, "free")
    # The audit entry follows the plan's commit: wait for it before auditing anything else.
    wait_until(lambda: len(audit(owner, action="plan.changed")) == 2, "audited: two plan changes")
    assert len(expect_json(owner.call("GET", f"/orgs/{slug}/projects"), 200)["items"]) == 4
    expect_problem(new_project(owner, "five"), 402)

    expect_json(owner.call("PATCH", f"/orgs/{slug}/members/{teammate.id}",
                           json={"role": "viewer"}), 200)
    expect(owner.call("DELETE", f"/orgs/{slug}/api-keys/{key['id']}"), 204)
    entries = audit(owner)
    actions = [e["action"] for e in entries]
    assert [a for a in actions if a in ("api_key.created", "plan.changed", "member.role_changed",
                                        "api_key.revoked")] == [
        "api_key.created", "plan.changed", "plan.changed", "member.role_changed",
        "api_key.revoked"]
    assert "user.login" in actions
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs)
    for entry in entries:
        assert entry_hash(entry["prev_hash"], entry) == entry["hash"]
    verdict = expect_json(owner.call("GET", f"/orgs/{slug}/audit/verify"), 200)
    assert verdict["valid"] is True and verdict["entries"] >= len(entries)


@pytest.mark.parametrize("flags", [["--webhook-secret", ""], ["--tolerance", "0"],
                                   ["--audit-key", "short"], ["--port", "70000"]])
def test_bad_flags_exit_2(flags):
    result = run_once(SCRIPT, *flags, "--db", ":memory:")
    assert result.returncode == 2 and "Traceback" not in result.stderr
