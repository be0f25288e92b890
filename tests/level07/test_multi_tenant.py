"""level07/multi_tenant.py, black-box: organisations, invites, roles, and isolation between
tenants.

The isolation test is systematic: it reads `/openapi.json` and, for every route that takes an
id, a slug or a token, has the owner of tenant A call it with every method on tenant B's values
(and on mixtures of A's and B's), expecting 404 each time, never 200, 403 or 500; then both
tenants' exports must be unchanged. It runs in both storage models (one shared schema, and
`--db-per-tenant`). Exports and deletes are checked by counting rows in the sqlite files.

Concurrency tests run on `--server threaded`, where handlers really run at once (the asyncio
transport runs a non-blocking handler on the event loop, one at a time, which would hide a
check-then-write race): quotas, the last owner, and invites accepted by racing requests.
"""
import datetime
import itertools
import json
import re
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from tests.harness import (ROOT, RawConnection, clean_env, expect, expect_json, expect_problem,
                           request_bytes, run_once)
from tests.level03.accounts import LOW_COST, PASSWORD, TIMEOUT, fresh_email

SCRIPT = "level07/multi_tenant.py"
SECRET = "multi-tenant-test-secret-0123456789abcdef"
MODES = {"shared": (), "db-per-tenant": ("--db-per-tenant",)}
TENANT_TABLES = ("projects", "tasks", "settings")
CONTROL_TABLES = ("memberships", "invites")


def start(start_server, *args):
    return start_server(SCRIPT, "--secret", SECRET, *LOW_COST, *args)


class User:
    """A signed-in account on one server: `call(method, path, json=...)` sends its token."""

    def __init__(self, server, prefix="u", email=None):
        self.url = server.url
        self.email = email or fresh_email(prefix)
        body = {"email": self.email, "password": PASSWORD}
        self.id = expect_json(requests.post(self.url + "/auth/signup", json=body,
                                            timeout=TIMEOUT), 201)["id"]
        token = expect_json(requests.post(self.url + "/auth/login", json=body, timeout=TIMEOUT),
                            200)["access_token"]
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method, path, **kw):
        kw.setdefault("timeout", TIMEOUT)
        return self.http.request(method, self.url + path, **kw)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, json=body, **kw)

    def patch(self, path, body, **kw):
        return self.call("PATCH", path, json=body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)


def new_org(owner, prefix="org"):
    slug = f"{prefix}-{fresh_email('x')[2:12]}"
    resp = owner.post("/orgs", {"name": f"{prefix} organisation", "slug": slug})
    org = expect_json(resp, 201)
    assert resp.headers["Location"] == f"/orgs/{slug}" and org["role"] == "owner"
    return slug


def invite(inviter, slug, email, role="member"):
    return expect_json(inviter.post(f"/orgs/{slug}/invites", {"email": email, "role": role}), 201)


def join(server, inviter, slug, role="member", prefix="m"):
    """A new user who is a member of `slug` with `role`."""
    user = User(server, prefix)
    expect_json(user.post(f"/invites/{invite(inviter, slug, user.email, role)['token']}/accept"),
                200)
    return user


def new_project(user, slug, name="a project"):
    return expect_json(user.post(f"/orgs/{slug}/projects", {"name": name}), 201)


def new_task(user, slug, project_id, title="a task"):
    return expect_json(user.post(f"/orgs/{slug}/projects/{project_id}/tasks", {"title": title}), 201)


def expect_forbidden(resp, permission):
    problem = expect_problem(resp, 403)
    assert problem.get("missing_permission") == permission and permission in problem["detail"]


PILE_UP_S = 0.5   # how long the racing requests get to reach their first write


def all_at_once(server, calls):
    """Send each `(user, method, path, body)` on a connection of its own, at the same moment,
    while this test holds sqlite's write lock on the server's database file (another process
    may: `BEGIN IMMEDIATE`). Each request runs up to its first write and waits there; when the
    lock is let go, they all go on together. A check made before the write transaction (a
    count, then an insert) would pass for all of them, which is the bug this catches. Their
    status codes, sorted.

    The lock is held for PILE_UP_S. A slow machine may leave some requests short of their write
    by then; that can only make a buggy server look right, never a correct one look wrong."""
    connections, raw_requests = [], []
    lock = sqlite3.connect(server.db_path, isolation_level=None, timeout=TIMEOUT)
    try:
        for user, method, path, body in calls:
            headers = {"Authorization": user.http.headers["Authorization"], "Connection": "close",
                       "Content-Type": "application/json"}
            data = json.dumps(body).encode() if body is not None else b""
            raw_requests.append(request_bytes(method, path, headers, data))
            connections.append(RawConnection(server.host, server.port, timeout=TIMEOUT))
        lock.execute("BEGIN IMMEDIATE")
        for conn, raw in zip(connections, raw_requests):
            conn.send(raw)
        time.sleep(PILE_UP_S)   # nothing to wait on: a request waiting for the lock says nothing
        lock.execute("ROLLBACK")
        return sorted(conn.read_response(timeout=TIMEOUT).status for conn in connections)
    finally:
        lock.close()
        for conn in connections:
            conn.close()


@pytest.fixture(scope="module")
def server(start_server_module):
    return start(start_server_module)


@pytest.fixture(scope="module")
def owner(server):
    return User(server, "owner")


# --------------------------------------------------------------------------------------------
# The systematic isolation test


def tenant_world(server, prefix, ids_after=0):
    """A tenant with one of everything: {param name: value} for the routes' path parameters.
    `ids_after` dummy projects and tasks are made and deleted first, so that (with a database
    per tenant, where ids restart) this tenant's ids differ from another's."""
    owner = User(server, f"{prefix}-owner")
    slug = new_org(owner, prefix)
    dummy = new_project(owner, slug, f"{prefix} dummy")
    for _ in range(ids_after):
        expect(owner.delete(f"/orgs/{slug}/projects/{new_project(owner, slug)['id']}"), 204)
        expect(owner.delete(f"/orgs/{slug}/projects/{dummy['id']}/tasks/"
                            f"{new_task(owner, slug, dummy['id'])['id']}"), 204)
    project = new_project(owner, slug, f"{prefix} secret project")
    task = new_task(owner, slug, project["id"], f"{prefix} secret task")
    pending = invite(owner, slug, fresh_email(f"{prefix}-invitee"))
    expect(owner.patch(f"/orgs/{slug}/settings", {"secret": f"{prefix} secret setting"}), 200)
    values = {"slug": slug, "project_id": project["id"], "task_id": task["id"],
              "invite_id": pending["id"], "user_id": owner.id, "token": pending["token"]}
    return owner, values


# A valid body for every operation that takes one: a tenant check that came after validation,
# or a lookup that ignored the tenant, would show as a 2xx here rather than a 422.
VALID_BODIES = {
    ("POST", "/orgs"): {"name": "n", "slug": "never-made"},
    ("POST", "/orgs/{slug}/invites"): {"email": "intruder@example.com", "role": "viewer"},
    ("PATCH", "/orgs/{slug}/members/{user_id}"): {"role": "viewer"},
    ("POST", "/orgs/{slug}/projects"): {"name": "intruder"},
    ("PATCH", "/orgs/{slug}/projects/{project_id}"): {"name": "intruder"},
    ("POST", "/orgs/{slug}/projects/{project_id}/tasks"): {"title": "intruder"},
    ("PATCH", "/orgs/{slug}/projects/{project_id}/tasks/{task_id}"): {"title": "x", "done": True},
    ("PATCH", "/orgs/{slug}/settings"): {"secret": "overwritten"},
}


def export_without_time(user, slug):
    body = expect_json(user.get(f"/orgs/{slug}/export"), 200)
    del body["exported_at"]
    return body


@pytest.mark.parametrize("mode", MODES)
def test_a_member_of_one_tenant_gets_404_for_everything_of_another(start_server, mode):
    server = start(start_server, *MODES[mode])
    a_owner, a = tenant_world(server, "ta")
    b_owner, b = tenant_world(server, "tb", ids_after=2)
    for name in ("project_id", "task_id"):
        assert a[name] != b[name], "B's ids must not be A's own, or a 200 would be legitimate"
    before = export_without_time(a_owner, a["slug"]), export_without_time(b_owner, b["slug"])
    doc = expect_json(requests.get(server.url + "/openapi.json", timeout=TIMEOUT), 200)
    tried, wrong = 0, []
    for path, operations in doc["paths"].items():
        params = re.findall(r"{(\w+)}", path)
        if not params:
            continue
        for method in operations:
            body = VALID_BODIES.get((method.upper(), path))
            if "requestBody" in operations[method]:
                assert body is not None, f"no valid body for {method.upper()} {path} in the test"
            for owners in itertools.product((a, b), repeat=len(params)):
                if all(values is a for values in owners):
                    continue   # entirely A's own: allowed, not what this test is about
                url = path
                for name, values in zip(params, owners):
                    url = url.replace("{" + name + "}", str(values[name]))
                resp = a_owner.call(method.upper(), url, json=body)
                tried += 1
                if resp.status_code != 404 or resp.headers["Content-Type"] != \
                        "application/problem+json":
                    wrong.append(f"{method.upper()} {url} → {resp.status_code} {resp.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert tried >= 50, tried
    assert (export_without_time(a_owner, a["slug"]), export_without_time(b_owner, b["slug"])) \
        == before, "a refused request changed a tenant's data"


def test_a_slug_that_does_not_exist_and_one_you_are_not_in_answer_alike(server, owner):
    slug = new_org(owner, "private")
    outsider = User(server, "outsider")
    for path in (f"/orgs/{slug}", f"/orgs/{slug}/projects", f"/orgs/{slug}/export"):
        theirs = expect_problem(outsider.get(path), 404)
        nobody = expect_problem(outsider.get(path.replace(slug, slug + "-none")), 404)
        assert theirs["detail"].replace(slug, "S") == nobody["detail"].replace(slug + "-none", "S")


# --------------------------------------------------------------------------------------------
# Export and delete touch exactly one tenant (rows counted in the sqlite files)


def row_counts(server, mode):
    """{(table, org_id): rows} of every tenant-owned and control table, read from the files."""
    counts = {}
    files = [server.db_path]
    if mode == "db-per-tenant":
        folder = server.db_path.with_name(server.db_path.stem + ".tenants")
        files += sorted(folder.glob("org-*.sqlite3"))
    for path in files:
        conn = sqlite3.connect(path)
        try:
            main = path == server.db_path
            for table in TENANT_TABLES + (CONTROL_TABLES if main else ()):
                for org_id, count in conn.execute(
                        f"SELECT org_id, count(*) FROM {table} GROUP BY org_id"):
                    counts[(table, org_id)] = counts.get((table, org_id), 0) + count
            if main:
                for (org_id,) in conn.execute("SELECT id FROM orgs"):
                    counts[("orgs", org_id)] = 1
                counts[("users", None)] = conn.execute("SELECT count(*) FROM users").fetchone()[0]
        finally:
            conn.close()
    return counts


def populated_tenant(server, prefix, projects):
    owner = User(server, f"{prefix}-owner")
    slug = new_org(owner, prefix)
    join(server, owner, slug, "viewer")
    invite(owner, slug, fresh_email(f"{prefix}-pending"))
    for n in range(projects):
        project = new_project(owner, slug, f"{prefix} project {n}")
        for m in range(n + 1):
            new_task(owner, slug, project["id"], f"{prefix} task {n}.{m}")
    expect(owner.patch(f"/orgs/{slug}/settings", {"colour": f"{prefix} colour"}), 200)
    org_id = expect_json(owner.get(f"/orgs/{slug}"), 200)["id"]
    return owner, slug, org_id


@pytest.mark.parametrize("mode", MODES)
def test_export_and_delete_touch_exactly_one_tenant(start_server, mode):
    server = start(start_server, *MODES[mode])
    tenants = [populated_tenant(server, prefix, n) for prefix, n in
               (("exa", 1), ("exb", 3), ("exc", 2))]
    (_, a_slug, a_id), (b_owner, b_slug, b_id), (_, c_slug, c_id) = tenants
    before = row_counts(server, mode)
    assert before[("tasks", b_id)] == 6 and before[("memberships", b_id)] == 2

    export = expect_json(b_owner.get(f"/orgs/{b_slug}/export"), 200)
    assert export["org"]["slug"] == b_slug
    for table in TENANT_TABLES:
        rows = export["tables"][table]
        assert len(rows) == before.get((table, b_id), 0), table
        assert {row["org_id"] for row in rows} == {b_id}, table
    assert len(export["members"]) == before[("memberships", b_id)]
    assert len(export["invites"]) == before[("invites", b_id)]
    text = json.dumps(export)
    for other in (a_slug, c_slug, "exa ", "exc "):
        assert other not in text, f"{other} leaked into {b_slug}'s export"
    assert row_counts(server, mode) == before, "an export changed rows"

    expect(b_owner.delete(f"/orgs/{b_slug}"), 204)
    after = row_counts(server, mode)
    expected = {key: n for key, n in before.items() if key[1] != b_id}
    assert after == expected, "the delete removed other rows, or left some of the tenant's"
    expect_problem(b_owner.get(f"/orgs/{b_slug}"), 404)
    if mode == "db-per-tenant":
        folder = server.db_path.with_name(server.db_path.stem + ".tenants")
        assert sorted(p.name for p in folder.glob("org-*.sqlite3")) == \
            sorted(f"org-{org_id}.sqlite3" for org_id in (a_id, c_id))


def test_db_per_tenant_keeps_each_tenants_rows_in_its_own_file(start_server):
    server = start(start_server, "--db-per-tenant")
    owner = User(server, "files")
    slug = new_org(owner, "files")
    project = new_project(owner, slug, "kept apart")
    new_task(owner, slug, project["id"])
    org_id = expect_json(owner.get(f"/orgs/{slug}"), 200)["id"]
    tenant_file = server.db_path.with_name(server.db_path.stem + ".tenants") / f"org-{org_id}.sqlite3"
    conn = sqlite3.connect(tenant_file)
    try:
        assert conn.execute("SELECT name FROM projects").fetchall() == [("kept apart",)]
    finally:
        conn.close()
    conn = sqlite3.connect(server.db_path)
    try:
        assert conn.execute("SELECT count(*) FROM projects").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM orgs").fetchone()[0] == 1
    finally:
        conn.close()
    server.stop()
    # A file whose organisation is gone (a crash between deleting the org and its file) is
    # removed at the next start; the data of the living ones is still there.
    stray = tenant_file.with_name("org-999.sqlite3")
    stray.write_bytes(tenant_file.read_bytes())
    again = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--db-per-tenant", db=server.db_path)
    assert not stray.exists() and tenant_file.exists()
    owner.url = again.url
    assert [p["name"] for p in expect_json(owner.get(f"/orgs/{slug}/projects"), 200)["items"]] \
        == ["kept apart"]


def test_db_per_tenant_needs_a_database_file():
    done = run_once(SCRIPT, "--port", "0", "--db", ":memory:", "--db-per-tenant")
    assert done.returncode == 2 and "--db-per-tenant" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# Roles and permissions


def test_the_roles_table_is_public_and_ordered(server):
    body = expect_json(requests.get(server.url + "/roles", timeout=TIMEOUT), 200)
    assert [role["name"] for role in body["roles"]] == ["viewer", "member", "admin", "owner"]
    held = [set(role["permissions"]) for role in body["roles"]]
    assert held[0] < held[1] < held[2] < held[3], "each role holds the one before"
    assert held[0] == {"tenant:read"}
    assert held[1] - held[0] == {"tenant:write"}
    assert held[2] - held[1] == {"invites:manage", "members:manage", "settings:manage",
                                 "tenant:export"}
    assert held[3] - held[2] == {"owners:manage", "org:delete"}
    assert set(body["permissions"]) == held[3]
    assert body["plans"] == {"free": {"projects": 3, "members": 5},
                             "pro": {"projects": 100, "members": 50}}


@pytest.fixture(scope="module")
def team(server, owner):
    """An organisation with one member of each role: {role: User}, and its slug."""
    slug = new_org(owner, "team")
    members = {role: join(server, owner, slug, role, role) for role in ("viewer", "member", "admin")}
    project = new_project(owner, slug, "shared")
    return slug, {"owner": owner, **members}, project["id"]


# (method, path, body, the lowest role allowed, the permission a lower role lacks)
ROLE_CASES = [
    ("GET", "/orgs/{s}/projects", None, "viewer", "tenant:read"),
    ("GET", "/orgs/{s}/members", None, "viewer", "tenant:read"),
    ("GET", "/orgs/{s}/settings", None, "viewer", "tenant:read"),
    ("POST", "/orgs/{s}/projects/{p}/tasks", {"title": "t"}, "member", "tenant:write"),
    ("PATCH", "/orgs/{s}/projects/{p}", {"name": "renamed"}, "member", "tenant:write"),
    ("GET", "/orgs/{s}/invites", None, "admin", "invites:manage"),
    ("PATCH", "/orgs/{s}/settings", {"k": 1}, "admin", "settings:manage"),
    ("GET", "/orgs/{s}/export", None, "admin", "tenant:export"),
    ("POST", "/orgs/{s}/invites", {"email": "x@example.com", "role": "viewer"}, "admin",
     "invites:manage"),
]


@pytest.mark.parametrize("method, path, body, lowest, permission", ROLE_CASES,
                         ids=[f"{c[0]} {c[1]}" for c in ROLE_CASES])
def test_each_role_may_do_what_the_table_says(team, method, path, body, lowest, permission):
    slug, users, project_id = team
    path = path.format(s=slug, p=project_id)
    for role in ("viewer", "member", "admin", "owner"):
        resp = users[role].call(method, path, json=body)
        if ROLES_ORDER.index(role) < ROLES_ORDER.index(lowest):
            expect_forbidden(resp, permission)
        else:
            expect(resp, (200, 201))
            if method == "POST" and path.endswith("/invites"):
                expect(users["owner"].delete(f"{path}/{resp.json()['id']}"), 204)


ROLES_ORDER = ["viewer", "member", "admin", "owner"]


def test_only_owners_delete_the_org_and_unauthenticated_calls_are_401(server, team):
    slug, users, _ = team
    for role in ("viewer", "member", "admin"):
        expect_forbidden(users[role].delete(f"/orgs/{slug}"), "org:delete")
    for path in (f"/orgs/{slug}", "/orgs", f"/orgs/{slug}/projects"):
        resp = requests.get(server.url + path, timeout=TIMEOUT)
        expect_problem(resp, 401)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    throwaway_owner = User(server, "thrower")
    throwaway = new_org(throwaway_owner, "throwaway")
    expect(throwaway_owner.delete(f"/orgs/{throwaway}"), 204)
    expect_problem(throwaway_owner.get(f"/orgs/{throwaway}"), 404)


def test_admins_manage_members_below_owner_only(server, owner):
    slug = new_org(owner, "admins")
    admin = join(server, owner, slug, "admin", "adm")
    member = join(server, owner, slug, "member", "mem")
    body = expect_json(admin.patch(f"/orgs/{slug}/members/{member.id}", {"role": "viewer"}), 200)
    assert body["role"] == "viewer" and body["user_id"] == member.id
    expect_forbidden(admin.patch(f"/orgs/{slug}/members/{member.id}", {"role": "owner"}),
                     "owners:manage")
    expect_forbidden(admin.post(f"/orgs/{slug}/invites", {"email": fresh_email(), "role": "owner"}),
                     "owners:manage")
    expect_forbidden(admin.patch(f"/orgs/{slug}/members/{owner.id}", {"role": "viewer"}),
                     "owners:manage")
    expect_forbidden(admin.delete(f"/orgs/{slug}/members/{owner.id}"), "owners:manage")
    expect_forbidden(member.patch(f"/orgs/{slug}/members/{admin.id}", {"role": "viewer"}),
                     "members:manage")
    expect_forbidden(member.delete(f"/orgs/{slug}/members/{admin.id}"), "members:manage")
    expect(admin.delete(f"/orgs/{slug}/members/{member.id}"), 204)
    expect_problem(member.get(f"/orgs/{slug}/projects"), 404)   # no longer a member: at once
    expect_problem(admin.patch(f"/orgs/{slug}/members/{member.id}", {"role": "viewer"}), 404)
    expect_problem(owner.patch(f"/orgs/{slug}/members/{admin.id}", {"role": "boss"}), 422)
    members = expect_json(owner.get(f"/orgs/{slug}/members"), 200)["items"]
    assert {(m["user_id"], m["role"]) for m in members} == {(owner.id, "owner"), (admin.id, "admin")}
    expect(admin.delete(f"/orgs/{slug}/members/{admin.id}"), 204)   # anyone may leave


def test_the_last_owner_stays(server):
    first = User(server, "first")
    slug = new_org(first, "owners")
    assert "owner" in expect_problem(first.patch(f"/orgs/{slug}/members/{first.id}",
                                                 {"role": "admin"}), 409)["detail"]
    expect_problem(first.delete(f"/orgs/{slug}/members/{first.id}"), 409)
    second = join(server, first, slug, "owner", "second")
    expect(second.patch(f"/orgs/{slug}/members/{first.id}", {"role": "admin"}), 200)
    expect_forbidden(first.delete(f"/orgs/{slug}"), "org:delete")   # the very next request
    expect_problem(second.delete(f"/orgs/{slug}/members/{second.id}"), 409)


@pytest.mark.parametrize("action", ["demote", "leave"])
def test_simultaneous_demotions_and_departures_leave_exactly_one_owner(start_server, action):
    server = start(start_server, "--server", "threaded")
    first = User(server, "first")
    slug = new_org(first, action)
    owners = [first] + [join(server, first, slug, "owner", f"o{n}") for n in range(4)]
    if action == "demote":
        calls = [(u, "PATCH", f"/orgs/{slug}/members/{u.id}", {"role": "admin"}) for u in owners]
    else:
        calls = [(u, "DELETE", f"/orgs/{slug}/members/{u.id}", None) for u in owners]
    assert all_at_once(server, calls) == [200 if action == "demote" else 204] * 4 + [409]
    still_in = [u for u in owners if u.get(f"/orgs/{slug}/members").status_code == 200]
    roles = [m["role"] for m in expect_json(still_in[0].get(f"/orgs/{slug}/members"),
                                           200)["items"]]
    assert roles.count("owner") == 1, roles
    assert len(still_in) == (5 if action == "demote" else 1)


# --------------------------------------------------------------------------------------------
# Invites


def test_an_invite_is_single_use_bound_to_its_email_and_revocable(server, owner):
    slug = new_org(owner, "invites")
    guest = User(server, "guest")
    created = invite(owner, slug, guest.email.upper().replace("@EXAMPLE.COM", "@example.com"),
                     "viewer")
    assert set(created) >= {"id", "token", "expires_at", "email", "role"}
    valid_for = (datetime.datetime.fromisoformat(created["expires_at"].replace("Z", "+00:00"))
                 - datetime.datetime.fromisoformat(created["created_at"].replace("Z", "+00:00")))
    assert abs(valid_for.total_seconds() - 7 * 24 * 3600) <= 1, "--invite-ttl defaults to 7 days"
    listed = expect_json(owner.get(f"/orgs/{slug}/invites"), 200)["items"]
    assert [i["id"] for i in listed] == [created["id"]] and "token" not in listed[0]
    stranger = User(server, "stranger")
    accept = f"/invites/{created['token']}/accept"
    expect_problem(stranger.post(accept), 404)          # not their invite: as if unknown
    expect_problem(guest.post(f"/invites/{created['token']}x/accept"), 404)
    joined = expect_json(guest.post(accept), 200)
    assert joined["role"] == "viewer" and joined["org"]["slug"] == slug
    assert "used" in expect_problem(guest.post(accept), 410)["detail"]
    expect(guest.get(f"/orgs/{slug}/projects"), 200)
    expect_problem(owner.post(f"/orgs/{slug}/invites", {"email": guest.email}), 409)
    revoked = invite(owner, slug, stranger.email)
    expect(owner.delete(f"/orgs/{slug}/invites/{revoked['id']}"), 204)
    expect_problem(stranger.post(f"/invites/{revoked['token']}/accept"), 404)
    expect_problem(owner.post(f"/orgs/{slug}/invites", {"email": "not an email"}), 422)


def invited_guest(server, prefix):
    """An organisation's owner, its slug, a user it invited, and the invite's token."""
    owner = User(server, f"{prefix}-owner")
    slug = new_org(owner, prefix)
    guest = User(server, f"{prefix}-guest")
    return owner, slug, guest, invite(owner, slug, guest.email)["token"]


def test_an_expired_invite_is_410(start_server):
    _, slug, guest, token = invited_guest(start(start_server, "--invite-ttl", "1"), "expiry")
    time.sleep(1.2)   # the TTL is wall-clock time; nothing to wait on instead
    assert "expired" in expect_problem(guest.post(f"/invites/{token}/accept"), 410)["detail"]
    expect_problem(guest.get(f"/orgs/{slug}"), 404)


def test_racing_accepts_of_one_invite_let_exactly_one_in(start_server):
    server = start(start_server, "--server", "threaded")
    owner, slug, guest, token = invited_guest(server, "race")
    assert all_at_once(server, [(guest, "POST", f"/invites/{token}/accept", None)] * 8) \
        == [200] + [410] * 7
    members = expect_json(owner.get(f"/orgs/{slug}/members"), 200)["items"]
    assert [m["user_id"] for m in members] == [owner.id, guest.id]


# --------------------------------------------------------------------------------------------
# Quotas and plans


def test_quotas_refuse_with_402_and_the_plan_command_lifts_them(start_server):
    server = start(start_server)
    owner = User(server, "plan-owner")
    slug = new_org(owner, "plans")
    for n in range(3):
        new_project(owner, slug, f"p{n}")
    problem = expect_problem(owner.post(f"/orgs/{slug}/projects", {"name": "fourth"}), 402)
    assert "free" in problem["detail"] and "3" in problem["detail"]
    assert problem["quota"] == "projects" and problem["limit"] == 3

    done = run_once(SCRIPT, "plan", slug, "pro", "--db", server.db_path)
    assert done.returncode == 0, done.stderr
    new_project(owner, slug, "fourth")
    org = expect_json(owner.get(f"/orgs/{slug}"), 200)
    assert org["plan"] == "pro" and org["limits"] == {"projects": 100, "members": 50}
    assert org["usage"] == {"projects": 4, "members": 1}

    assert run_once(SCRIPT, "plan", slug, "free", "--db", server.db_path).returncode == 0
    names = [p["name"] for p in expect_json(owner.get(f"/orgs/{slug}/projects"), 200)["items"]]
    assert len(names) == 4, "a downgrade deletes nothing"
    expect_problem(owner.post(f"/orgs/{slug}/projects", {"name": "fifth"}), 402)

    unknown = run_once(SCRIPT, "plan", "no-such-org", "pro", "--db", server.db_path)
    assert unknown.returncode == 1 and "no-such-org" in unknown.stderr
    bad = run_once(SCRIPT, "plan", slug, "platinum", "--db", server.db_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_members_quota_counts_the_owner(server):
    owner = User(server, "full-owner")
    slug = new_org(owner, "full")
    for n in range(4):
        join(server, owner, slug, "viewer", f"v{n}")
    problem = expect_problem(owner.post(f"/orgs/{slug}/invites", {"email": fresh_email()}), 402)
    assert problem["quota"] == "members" and problem["limit"] == 5


def test_parallel_creates_never_exceed_the_projects_quota(start_server):
    server = start(start_server, "--server", "threaded")
    owner = User(server, "burst")
    slug = new_org(owner, "burst")
    calls = [(owner, "POST", f"/orgs/{slug}/projects", {"name": "p"})] * 12
    assert all_at_once(server, calls) == [201] * 3 + [402] * 9
    assert len(expect_json(owner.get(f"/orgs/{slug}/projects"), 200)["items"]) == 3


def test_parallel_accepts_never_exceed_the_members_quota(start_server):
    server = start(start_server, "--server", "threaded")
    owner = User(server, "crowd")
    guests = [User(server, f"g{n}") for n in range(8)]
    slug = new_org(owner, "crowd")
    calls = [(guest, "POST", f"/invites/{invite(owner, slug, guest.email)['token']}/accept", None)
             for guest in guests]
    assert all_at_once(server, calls) == [200] * 4 + [402] * 4
    assert len(expect_json(owner.get(f"/orgs/{slug}/members"), 200)["items"]) == 5


# --------------------------------------------------------------------------------------------
# Projects, tasks, settings


def test_projects_and_tasks_by_id_with_etags(server, owner):
    slug = new_org(owner, "crud")
    project = new_project(owner, slug, "alpha")
    other = new_project(owner, slug, "beta")
    base = f"/orgs/{slug}/projects/{project['id']}"
    resp = owner.get(base)
    assert expect_json(resp, 200)["name"] == "alpha" and resp.headers["ETag"] == '"1"'
    expect_problem(owner.patch(base, {"name": "x"}, headers={"If-Match": '"9"'}), 412)
    resp = owner.patch(base, {"name": "gamma"}, headers={"If-Match": '"1"'})
    assert expect_json(resp, 200)["name"] == "gamma" and resp.headers["ETag"] == '"2"'
    expect_problem(owner.patch(base, {"org_id": 5}), 422)
    task = new_task(owner, slug, project["id"], "write it")
    done = expect_json(owner.patch(f"{base}/tasks/{task['id']}", {"done": True}), 200)
    assert done["done"] is True and done["title"] == "write it"
    # the task is found only under its own project
    expect_problem(owner.get(f"/orgs/{slug}/projects/{other['id']}/tasks/{task['id']}"), 404)
    expect_problem(owner.delete(f"/orgs/{slug}/projects/{other['id']}/tasks/{task['id']}"), 404)
    second = new_task(owner, slug, project["id"], "test it")
    first_page = expect_json(owner.get(f"{base}/tasks", params={"limit": 1}), 200)
    assert [t["id"] for t in first_page["items"]] == [task["id"]] and first_page["next_cursor"]
    rest = expect_json(owner.get(f"{base}/tasks", params={"cursor": first_page["next_cursor"]}),
                       200)
    assert [t["id"] for t in rest["items"]] == [second["id"]] and rest["next_cursor"] is None
    expect(owner.delete(base), 204)
    expect_problem(owner.get(base), 404)
    expect_problem(owner.get(f"{base}/tasks/{task['id']}"), 404)
    expect_problem(owner.post(f"{base}/tasks", {"title": "orphan"}), 404)


def test_settings_merge_and_stay_within_16_kib(server, owner):
    slug = new_org(owner, "settings")
    path = f"/orgs/{slug}/settings"
    assert expect_json(owner.get(path), 200) == {}
    assert expect_json(owner.patch(path, {"theme": "dark", "seats": {"max": 3}}), 200) == \
        {"theme": "dark", "seats": {"max": 3}}
    resp = owner.patch(path, {"theme": None, "lang": "fr"})
    assert expect_json(resp, 200) == {"seats": {"max": 3}, "lang": "fr"}
    etag = resp.headers["ETag"]
    assert expect_json(owner.get(path), 200) == {"seats": {"max": 3}, "lang": "fr"}
    expect_problem(owner.patch(path, {"x": 1}, headers={"If-Match": '"1"'}), 412)
    expect(owner.patch(path, {"a": "x" * 10_000}, headers={"If-Match": etag}), 200)
    problem = expect_problem(owner.patch(path, {"b": "y" * 10_000}), 422)
    assert "16384" in problem["detail"]
    expect_problem(owner.patch(path, {"c": "z" * 17_000}), 413)
    expect_problem(owner.call("PATCH", path, json=[1, 2]), 422)
    assert set(expect_json(owner.get(path), 200)) == {"seats", "lang", "a"}


def test_my_orgs_list_my_roles(server):
    user = User(server, "lister")
    slugs = [new_org(user, "mine") for _ in range(3)]
    first = expect_json(user.get("/orgs", params={"limit": 2}), 200)
    rest = expect_json(user.get("/orgs", params={"cursor": first["next_cursor"]}), 200)
    assert [o["slug"] for o in first["items"] + rest["items"]] == slugs
    assert {o["role"] for o in first["items"]} == {"owner"}
    expect_problem(user.post("/orgs", {"name": "dup", "slug": slugs[0]}), 409)
    problem = expect_problem(user.post("/orgs", {"name": "bad", "slug": "Has Spaces!"}), 422)
    assert [e["field"] for e in problem["errors"]] == ["slug"]


# --------------------------------------------------------------------------------------------
# Deny by default at start-up


def test_a_tenant_path_not_declared_through_tenant_route_stops_the_server(tmp_path):
    """A handler under /orgs/{slug} that skipped tenant_for would read any tenant's data: the
    server refuses to start (exit 2) and names the route."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv[0] = 'multi_tenant.py'\n"
            "from level07 import multi_tenant as mt\n"
            "@mt.app.get('/orgs/{slug}/leak', permission='tenant:read')\n"
            "def leak(request, slug):\n    return {}\n"
            "mt.main(['--port', '0', '--db', sys.argv[2]])\n")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "db.sqlite3")],
                          capture_output=True, text=True, timeout=30, env=clean_env(),
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "GET /orgs/{slug}/leak" in done.stderr and "tenant_route" in done.stderr
    assert "listening" not in done.stdout
