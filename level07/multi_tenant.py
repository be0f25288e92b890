"""A multi-tenant backend: one server, many organisations, and no row crosses between them.

What it teaches
  - The tenant of a request comes from its URL (`/orgs/{slug}/...`) and is checked against the
    caller's membership on every request, in one function (`tenant_for`). A caller who is not a
    member gets 404, the same answer as for a slug that does not exist, so nobody can probe
    which organisations there are; a member who lacks a permission gets 403 naming it.
  - Isolation by construction: every read and write of tenant-owned rows goes through one
    data-access layer (`TenantData`), which is bound to one organisation and adds the tenant
    condition to every statement. No handler writes `org_id = ?`; the schema adds a second
    lock (a task's project must be of the same organisation: a composite foreign key).
  - Roles in one permission table (`ROLE_PERMISSIONS`, as level03/rbac.py's, served at
    `GET /roles`), ordered viewer < member < admin < owner, and deny by default: a route that
    declares no permission stops the server from starting (rbac's `route_permission_problems`).
  - Invites as single-use bearer tokens: stored hashed (jwt_auth's `token_hash`), valid
    `--invite-ttl` seconds, accepted once even when many accepts race (410 after the first).
  - Invariants kept under concurrency, each checked and written in one `BEGIN IMMEDIATE`
    transaction: an organisation keeps at least one owner (409), and plan quotas (projects,
    members) are never exceeded by parallel creates (402 Payment Required).
  - Two storage models: every tenant in one shared schema (the default), or `--db-per-tenant`,
    each tenant's rows in a sqlite file of its own. multi_tenant.md compares them.

Identity (signup, login, bearer tokens) is imported from level03/jwt_auth.py, the deny-by-default
route check from level03/rbac.py.

What other projects import from here (saas_starter does; names are stable):
  the table   ROLES, PERMISSIONS, ROLE_PERMISSIONS, SIGNED_IN (a route for any signed-in user),
              ROUTE_PERMISSIONS, Plan, PLANS
  storage     TENANCY_SCHEMA, SCHEMA, TENANT_DATA_SCHEMA, TENANT_TABLES, CONTROL_TABLES,
              TenantData (the data-access layer), create_org, set_plan
  requests    Tenancy (on app.state.tenancy; subclass permissions_of, record, tables,
              tenant_schema), tenant_for, tenant_route, acting_user_id, add_tenancy_routes,
              tenancy_route_problems, check_tenancy_routes

What it leaves out: custom roles, per-resource sharing, SSO and SCIM provisioning, moving a tenant
between storage models, row-level security in the database itself (Postgres RLS), regions.
multi_tenant.md's "In production" says who does those.
"""
import argparse
import functools
import json
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, Database, Forbidden, Gone, HTTPError, NotFound,
                 UnprocessableContent, created, json_response, no_content, trace_event)
from lib.app import exit_usage_error
from lib.listing import list_params, page
from lib.request import utc_timestamp
from lib.routing import PAGE
from lib.storage import StorageError, default_db_path
from lib.validation import Boolean, Choice, Email, Text, body_schema, is_unicode_text, validate
from level01.counter import etag
from level03.jwt_auth import (SCHEMA as IDENTITY_SCHEMA, Auth, add_auth_arguments,
                              add_token_routes, at_least_a_second, current_user, email_key,
                              require_user, token_hash)
from level03.rbac import route_permission_problems

app = App("multi_tenant", "Organisations, members and roles over tenant-isolated projects and "
          "tasks.", port=8027)


# =============================================================================================
# The permission table
# =============================================================================================

ROLES = ("viewer", "member", "admin", "owner")   # in order: each holds the permissions before it

PERMISSIONS = {
    "tenant:read": "read the organisation, its projects, tasks, members and settings",
    "tenant:write": "create, change and delete projects and tasks",
    "invites:manage": "invite people, list and revoke invites",
    "members:manage": "change the role of members below owner, remove them",
    "settings:manage": "change the organisation's settings",
    "tenant:export": "export all of the organisation's data",
    "owners:manage": "make and unmake owners, invite owners",
    "org:delete": "delete the organisation and all of its data",
}

_VIEWER = {"tenant:read"}
_MEMBER = _VIEWER | {"tenant:write"}
_ADMIN = _MEMBER | {"invites:manage", "members:manage", "settings:manage", "tenant:export"}
_OWNER = _ADMIN | {"owners:manage", "org:delete"}
ROLE_PERMISSIONS = {"viewer": frozenset(_VIEWER), "member": frozenset(_MEMBER),
                    "admin": frozenset(_ADMIN), "owner": frozenset(_OWNER)}

# Routes outside any tenant (create an organisation, list yours, accept an invite) need a
# signed-in user and no role: they declare this instead of a tenant permission.
SIGNED_IN = "account"
ROUTE_PERMISSIONS = {**PERMISSIONS, SIGNED_IN: "any signed-in user"}


class Plan(NamedTuple):
    """What a plan allows an organisation: projects, and members counting the owners."""
    projects: int
    members: int


PLANS = {"free": Plan(projects=3, members=5), "pro": Plan(projects=100, members=50)}


# =============================================================================================
# Schema: the control plane (who belongs where) and the tenant-owned data
# =============================================================================================

CONTROL_SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    id         INTEGER PRIMARY KEY,
    slug       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    plan       TEXT NOT NULL DEFAULT 'free',   -- a key of PLANS; set by the operator or billing
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS memberships (
    org_id     INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    created_at TEXT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX IF NOT EXISTS memberships_by_user ON memberships (user_id);

CREATE TABLE IF NOT EXISTS invites (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id      INTEGER NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email       TEXT NOT NULL,
    email_key   TEXT NOT NULL,            -- jwt_auth's email_key: only that account may accept
    role        TEXT NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    token_hash  TEXT NOT NULL UNIQUE,     -- SHA-256 of the token: the token itself is never stored
    invited_by  INTEGER REFERENCES users (id) ON DELETE SET NULL,
    created_at  TEXT NOT NULL,
    expires_at  REAL NOT NULL,            -- unix time
    accepted_at TEXT,
    accepted_by INTEGER REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX IF NOT EXISTS invites_by_org ON invites (org_id, id);
"""

# Every tenant-owned table has an org_id column, which only TenantData writes and reads. With
# --db-per-tenant this schema is each tenant's own file (and org_id is the same in every row).
TENANT_DATA_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id     INTEGER NOT NULL,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,     -- the ETag: bumped by every change
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (org_id, id)
);

CREATE TABLE IF NOT EXISTS tasks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id     INTEGER NOT NULL,
    project_id INTEGER NOT NULL,
    title      TEXT NOT NULL,
    done       INTEGER NOT NULL DEFAULT 0,
    version    INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    -- a task belongs to a project of its own organisation: the database refuses any other
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS tasks_by_project ON tasks (org_id, project_id, id);

CREATE TABLE IF NOT EXISTS settings (
    org_id  INTEGER PRIMARY KEY,
    value   TEXT NOT NULL,                     -- a JSON object, at most SETTINGS_LIMIT bytes
    version INTEGER NOT NULL
);
"""

TENANCY_SCHEMA = CONTROL_SCHEMA + TENANT_DATA_SCHEMA
SCHEMA = IDENTITY_SCHEMA + TENANCY_SCHEMA
CONTROL_TABLES = ("memberships", "invites")
TENANT_TABLES = ("projects", "tasks", "settings")   # in the order an export lists them


# =============================================================================================
# The data-access layer: the one place that writes the tenant condition
# =============================================================================================

class TenantData:
    """The rows of one organisation in `tables` of `db`, and nothing else.

    Every statement it runs carries `<table>.org_id = ?` bound to its organisation, and every
    row it inserts gets that org_id: a caller can narrow a query (`where`, written in code,
    never from a client) but cannot widen it. Tables outside `tables` are refused, so a typo
    cannot reach a table without an org_id. Inside `with data.transaction():` the calls join
    one `BEGIN IMMEDIATE` transaction (check-then-write invariants: quotas, the last owner)."""

    def __init__(self, db, org_id, tables):
        self.db = db
        self.org_id = org_id
        self.tables = frozenset(tables)

    def _table(self, table):
        if table not in self.tables:
            raise ValueError(f"{table} is not a tenant-owned table here")
        return table

    def transaction(self):
        return self.db.transaction()

    def select(self, table, where="1", params=(), *, columns="*", join="", order_by=None,
               limit=-1):
        """Rows of this organisation that also meet `where`, in `order_by` order (default:
        as inserted)."""
        table = self._table(table)
        return self.db.query(f"SELECT {columns} FROM {table} {join} WHERE {table}.org_id = ? "
                             f"AND ({where}) ORDER BY {order_by or table + '.rowid'} LIMIT ?",
                             (self.org_id, *params, limit))

    def find(self, table, where="1", params=(), **options):
        rows = self.select(table, where, params, limit=1, **options)
        return rows[0] if rows else None

    def get(self, table, row_id):
        return self.find(table, "id = ?", (row_id,))

    def count(self, table, where="1", params=()):
        table = self._table(table)
        return self.db.query_one(f"SELECT count(*) FROM {table} WHERE org_id = ? AND ({where})",
                                 (self.org_id, *params))[0]

    def insert(self, table, **values):
        """Insert a row of this organisation; returns it."""
        table = self._table(table)
        columns = ", ".join(["org_id", *values])
        marks = ", ".join("?" * (len(values) + 1))
        return self.db.execute_returning(
            f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING *",
            (self.org_id, *values.values()))[0]

    def update(self, table, where, params, **values):
        """Set `values` on this organisation's rows that meet `where`; returns them."""
        table = self._table(table)
        assignments = ", ".join(f"{column} = ?" for column in values)
        return self.db.execute_returning(
            f"UPDATE {table} SET {assignments} WHERE org_id = ? AND ({where}) RETURNING *",
            (*values.values(), self.org_id, *params))

    def delete(self, table, where="1", params=()):
        """Delete this organisation's rows that meet `where`; returns how many."""
        table = self._table(table)
        return self.db.execute(f"DELETE FROM {table} WHERE org_id = ? AND ({where})",
                               (self.org_id, *params)).rowcount

    def delete_everything(self):
        """Every row of this organisation in every table here (an organisation's deletion)."""
        return {table: self.delete(table) for table in sorted(self.tables)}

    def export(self):
        """Every row of this organisation, by table (in the declared order)."""
        return {table: [dict(row) for row in self.select(table)]
                for table in sorted(self.tables)}


# =============================================================================================
# Tenancy: which organisation a request is about, and where its rows live
# =============================================================================================

INVITE_TTL_S = 7 * 24 * 3600


class Tenancy:
    """Made once in `main()`, kept in `app.state.tenancy`. It answers who may do what in an
    organisation (`permissions_of`), hands out the data-access layers (`data`, `control`),
    keeps the per-tenant files of `--db-per-tenant`, and hears every security-relevant change
    (`record`). A project that authenticates otherwise (saas_starter's API keys) or keeps more
    tenant-owned tables subclasses it: `tables` and `tenant_schema` grow, `permissions_of` and
    `record` are overridden."""

    tables = TENANT_TABLES
    tenant_schema = TENANT_DATA_SCHEMA

    def __init__(self, db, *, invite_ttl=INVITE_TTL_S, tenant_folder=None, trace=False):
        self.db = db
        self.invite_ttl = invite_ttl
        self.tenant_folder = Path(tenant_folder) if tenant_folder else None
        self.trace = trace
        self._tenant_dbs = {}
        self._tenant_dbs_lock = threading.Lock()
        if self.tenant_folder is not None:
            self._remove_orphan_files()

    # --- who may do what ----------------------------------------------------------------

    def org_by_slug(self, slug):
        row = self.db.query_one("SELECT * FROM orgs WHERE slug = ?", (slug,))
        return dict(row) if row else None

    def role_of(self, org_id, user_id):
        row = self.db.query_one("SELECT role FROM memberships WHERE org_id = ? AND user_id = ?",
                                (org_id, user_id))
        return row["role"] if row else None

    def permissions_of(self, request, org):
        """What this request may do in `org`: the signed-in user's role's permissions, read
        now (never from the token), or none when the user is not a member."""
        return ROLE_PERMISSIONS.get(self.role_of(org["id"], current_user(request)["id"]),
                                    frozenset())

    def record(self, request, org, action, target, details=None):
        """A security-relevant change happened (`member.role_changed`, `invite.accepted`, …).
        Nothing here; saas_starter appends it to its audit log."""

    def plan_of(self, org_id):
        """The organisation's plan now (a change by the operator counts at once)."""
        row = self.db.query_one("SELECT plan FROM orgs WHERE id = ?", (org_id,))
        return row["plan"], PLANS[row["plan"]]

    # --- where the rows are ---------------------------------------------------------------

    def control(self, org):
        """Memberships and invites of `org` (always in the main database)."""
        return TenantData(self.db, org["id"], CONTROL_TABLES)

    def data(self, org):
        """The tenant-owned rows of `org`: in the main database, or in its own file."""
        return TenantData(self.database_of(org["id"]), org["id"], self.tables)

    def tenant_file(self, org_id):
        return self.tenant_folder / f"org-{org_id}.sqlite3"

    def database_of(self, org_id):
        if self.tenant_folder is None:
            return self.db
        with self._tenant_dbs_lock:
            db = self._tenant_dbs.get(org_id)
            if db is None:
                db = self._tenant_dbs[org_id] = Database(str(self.tenant_file(org_id)),
                                                         self.tenant_schema, trace=self.trace)
            return db

    def delete_org(self, org):
        """Remove the organisation and every row of it, and nothing of anyone else's."""
        control, data = self.control(org), self.data(org)
        if data.db is self.db:    # shared schema: one transaction removes it all or nothing
            with self.db.transaction():
                data.delete_everything()
                control.delete_everything()
                self.db.execute("DELETE FROM orgs WHERE id = ?", (org["id"],))
            return
        with self.db.transaction():  # the control plane first: from here on nobody reaches it
            control.delete_everything()
            self.db.execute("DELETE FROM orgs WHERE id = ?", (org["id"],))
        with self._tenant_dbs_lock:
            self._tenant_dbs.pop(org["id"]).close()   # data(org) above opened it
            self._unlink_tenant_file(org["id"])

    def _unlink_tenant_file(self, org_id):
        path = self.tenant_file(org_id)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    def _remove_orphan_files(self):
        """A crash between deleting an organisation and its file leaves the file: gone at the
        next start, as is an empty file a request racing the deletion may have made."""
        alive = {row["id"] for row in self.db.query("SELECT id FROM orgs")}
        for path in self.tenant_folder.glob("org-*.sqlite3"):
            org_id = path.name.removeprefix("org-").removesuffix(".sqlite3")
            if not org_id.isdigit() or int(org_id) not in alive:
                self._unlink_tenant_file(org_id)

    def close(self):
        with self._tenant_dbs_lock:
            for db in self._tenant_dbs.values():
                db.close()
            self._tenant_dbs.clear()


def tenant_for(request, slug, permission):
    """The organisation `slug` names, if the caller may use `permission` in it: 404 when it
    does not exist or the caller is not a member (the same answer, so a slug's existence does
    not leak), 403 naming the permission when the caller's role lacks it. Every tenant route
    goes through here (`tenant_route`), on every request."""
    tenancy = request.app.state.tenancy
    org = tenancy.org_by_slug(slug)
    granted = tenancy.permissions_of(request, org) if org is not None else frozenset()
    require_granted(granted, permission, slug)
    request.context["org"], request.context["permissions"] = org, granted
    trace_event(f"tenant {slug} (org {org['id']}): {permission} granted")
    return org


def require_granted(granted, permission, slug):
    if not granted:
        raise NotFound(f"no organisation {slug} that you are a member of")
    if permission not in granted:
        raise Forbidden(f"this needs the permission {permission}, which your role in {slug} "
                        f"does not have", missing_permission=permission)


def tenant_route(app, method, pattern, permission, handler, **options):
    """Declare `handler(request, org, **params)` for a path under `/orgs/{slug}`: the tenant
    is resolved by `tenant_for` before the handler runs, so no handler can forget it."""

    @functools.wraps(handler)
    def resolve_tenant_then_handle(request, slug, **params):
        return handler(request, tenant_for(request, slug, permission), **params)

    app.route(method, pattern, permission=permission, tenant=True, **options)(
        resolve_tenant_then_handle)


def tenancy_route_problems(routes, permissions=ROUTE_PERMISSIONS):
    """rbac's deny-by-default check, and one more: a path with an organisation's slug in it
    must be declared with `tenant_route`, and only such a path needs a tenant permission."""
    problems = route_permission_problems(routes, permissions)
    for route in routes:
        where = f"{route.method} {route.pattern}"
        scoped = "{slug}" in route.pattern
        if scoped != bool(route.meta.get("tenant")):
            problems.append(f"{where} {'is not' if scoped else 'is'} declared with tenant_route")
        elif route.meta.get("permission") in PERMISSIONS and not scoped:
            problems.append(f"{where} needs a tenant permission but has no {{slug}}")
    return problems


def check_tenancy_routes(app, permissions=ROUTE_PERMISSIONS):
    """Refuse to start (exit 2) while any route breaks `tenancy_route_problems`."""
    problems = tenancy_route_problems(app.router.routes, permissions)
    if problems:
        exit_usage_error("refusing to start: " + "; ".join(problems))


# =============================================================================================
# Organisations and plans
# =============================================================================================

SLUG = Text(3, 40, pattern=r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", lower=True,
            pattern_text="must be lower-case letters, digits and inner hyphens", required=True)
ORG_FIELDS = {"name": Text(1, 100, required=True), "slug": SLUG}


def org_json(org, role=None):
    body = {"id": org["id"], "slug": org["slug"], "name": org["name"], "plan": org["plan"],
            "created_at": org["created_at"]}
    if role is not None:
        body["role"] = role
    return body


def create_org(conn, user_id, name, slug):
    """A new organisation on the free plan, `user_id` its owner: the org as a dict, with
    "role": "owner". `conn` is a connection inside a transaction the caller holds (a route's
    `db.transaction()`, or saas_starter's signup), so the organisation and its owner are made
    together or not at all. A bad name or slug is a 422, a taken slug a 409."""
    values = validate({"name": name, "slug": slug}, ORG_FIELDS)
    try:
        org = conn.execute("INSERT INTO orgs (slug, name, plan, created_at) VALUES (?, ?, 'free', ?) "
                           "RETURNING *", (values["slug"], values["name"], utc_timestamp())
                           ).fetchone()
    except sqlite3.IntegrityError:
        raise Conflict(f"the slug {values['slug']} is taken") from None
    conn.execute("INSERT INTO memberships (org_id, user_id, role, created_at) "
                 "VALUES (?, ?, 'owner', ?)", (org["id"], user_id, org["created_at"]))
    return {**dict(org), "role": "owner"}


def set_plan(conn_or_db, org_id_or_slug, plan):
    """Put an organisation on `plan` (a key of PLANS, else ValueError); the org as a dict, or
    None when there is no such organisation. `conn_or_db` is a `Database` or a connection in
    the caller's transaction. A downgrade deletes nothing: quotas only refuse new rows."""
    if plan not in PLANS:
        raise ValueError(f"{plan!r} is not a plan ({', '.join(PLANS)})")
    column = "slug" if isinstance(org_id_or_slug, str) else "id"
    sql, params = f"UPDATE orgs SET plan = ? WHERE {column} = ? RETURNING *", (plan, org_id_or_slug)
    rows = (conn_or_db.execute_returning(sql, params) if isinstance(conn_or_db, Database)
            else conn_or_db.execute(sql, params).fetchall())
    return dict(rows[0]) if rows else None


class PaymentRequired(HTTPError):
    """402: the organisation's plan allows no more of something; upgrading would."""

    status = 402


def require_quota(org, plan_name, plan, quota, used):
    """402 when `used` already reaches the plan's allowance of `quota` (projects, members)."""
    allowed = getattr(plan, quota)
    if used >= allowed:
        raise PaymentRequired(
            f"the {plan_name} plan allows {allowed} {quota} and {org['slug']} has {used}: "
            f"upgrade the plan (or remove some) to add more", quota=quota, limit=allowed,
            plan=plan_name)


def tenancy_of(request):
    return request.app.state.tenancy


def acting_user_id(request):
    """The signed-in user behind the request, or None (saas_starter's API keys have none)."""
    user = request.context.get("user")
    return user["id"] if user else None


@app.get("/roles", public=True, responses={200: "Every role and its permissions"})
def list_roles(request):
    """The permission table: which role holds which permission"""
    return {"roles": [{"name": role, "permissions": sorted(ROLE_PERMISSIONS[role])}
                      for role in ROLES],
            "permissions": PERMISSIONS,
            "plans": {name: plan._asdict() for name, plan in PLANS.items()}}


def create_organisation(request):
    """Create an organisation: you become its owner"""
    values = validate(request.json_object(), ORG_FIELDS)   # unknown fields are a 422 too
    with tenancy_of(request).db.transaction() as conn:
        org = create_org(conn, current_user(request)["id"], values["name"], values["slug"])
    return created(org_json(org, "owner"), f"/orgs/{org['slug']}")


def list_my_orgs(request):
    """The organisations you are a member of, with your role in each"""
    limit, cursor = list_params(request, (int,))
    rows = tenancy_of(request).db.query(
        "SELECT orgs.*, memberships.role FROM memberships JOIN orgs ON orgs.id = memberships.org_id "
        "WHERE memberships.user_id = ? AND orgs.id > ? ORDER BY orgs.id LIMIT ?",
        (current_user(request)["id"], cursor[0] if cursor else 0, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], lambda row: org_json(row, row["role"]))


def read_org(request, org):
    """The organisation: its plan, what the plan allows and what it uses"""
    tenancy = tenancy_of(request)
    plan_name, plan = tenancy.plan_of(org["id"])
    usage = {"projects": tenancy.data(org).count("projects"),
             "members": tenancy.control(org).count("memberships")}
    return {**org_json({**org, "plan": plan_name}), "limits": plan._asdict(), "usage": usage,
            "permissions": sorted(request.context["permissions"])}


def delete_organisation(request, org):
    """Delete the organisation and all of its data (owners only)"""
    tenancy = tenancy_of(request)
    tenancy.delete_org(org)
    tenancy.record(request, org, "org.deleted", f"org:{org['slug']}")
    return no_content()


# =============================================================================================
# Invites
# =============================================================================================

INVITE_FIELDS = {"email": Email(required=True), "role": Choice(ROLES, default="member")}


def invite_json(row):
    return {"id": row["id"], "email": row["email"], "role": row["role"],
            "created_at": row["created_at"],
            "expires_at": utc_timestamp(row["expires_at"]), "accepted_at": row["accepted_at"]}


def require_owner_rights_for(request, org, *roles):
    """Making, unmaking or inviting an owner needs owners:manage besides the route's own."""
    if "owner" in roles:
        require_granted(request.context["permissions"], "owners:manage", org["slug"])


def create_invite(request, org):
    """Invite someone by email: a single-use token, shown once"""
    values = validate(request.json_object(), INVITE_FIELDS)
    require_owner_rights_for(request, org, values["role"])
    tenancy = tenancy_of(request)
    control = tenancy.control(org)
    token = secrets.token_urlsafe(32)   # 256 bits; only its hash is kept
    with control.transaction():
        plan_name, plan = tenancy.plan_of(org["id"])
        require_quota(org, plan_name, plan, "members", control.count("memberships"))
        if control.find("memberships", "users.email_key = ?", (email_key(values["email"]),),
                        join=MEMBER_JOIN):
            raise Conflict(f"{values['email']} is already a member of {org['slug']}")
        row = control.insert("invites", email=values["email"], email_key=email_key(values["email"]),
                             role=values["role"], token_hash=token_hash(token),
                             invited_by=acting_user_id(request), created_at=utc_timestamp(),
                             expires_at=time.time() + tenancy.invite_ttl)
    tenancy.record(request, org, "invite.created", f"invite:{row['id']}",
                   {"email": values["email"], "role": values["role"]})
    return created({**invite_json(row), "token": token, "accept_path": f"/invites/{token}/accept"},
                   f"/orgs/{org['slug']}/invites/{row['id']}")


def list_invites(request, org):
    """Invites not accepted yet (expired ones included, with their expiry)"""
    limit, cursor = list_params(request, (int,))
    rows = tenancy_of(request).control(org).select(
        "invites", "accepted_at IS NULL AND id > ?", (cursor[0] if cursor else 0,),
        order_by="id", limit=limit + 1)
    return page(rows, limit, lambda row: [row["id"]], invite_json)


def found(row, what, key):
    if row is None:
        raise NotFound(f"no {what} {key} in this organisation")
    return row


def read_invite(request, org, invite_id):
    """One invite (never its token)"""
    return invite_json(found(tenancy_of(request).control(org).get("invites", invite_id),
                             "invite", invite_id))


def revoke_invite(request, org, invite_id):
    """Revoke an invite: its token stops working"""
    tenancy = tenancy_of(request)
    if not tenancy.control(org).delete("invites", "id = ?", (invite_id,)):
        raise NotFound(f"no invite {invite_id} in this organisation")
    tenancy.record(request, org, "invite.revoked", f"invite:{invite_id}")
    return no_content()


def accept_invite(request, token):
    """Accept an invite sent to your email: you join its organisation with its role"""
    user = current_user(request)
    tenancy = tenancy_of(request)
    with tenancy.db.transaction() as conn:  # one writer: of many racing accepts, one wins
        invite = conn.execute("SELECT * FROM invites WHERE token_hash = ?",
                              (token_hash(token),)).fetchone()
        # An invite for another address is answered as an unknown one: the token proves
        # nothing about who holds it, and the answer tells them nothing.
        if invite is None or invite["email_key"] != email_key(user["email"]):
            raise NotFound("no invite with this token for your account")
        if invite["accepted_at"] is not None:
            raise Gone("this invite has been used already")
        if invite["expires_at"] <= time.time():
            raise Gone("this invite has expired: ask for a new one")
        org = dict(conn.execute("SELECT * FROM orgs WHERE id = ?", (invite["org_id"],)).fetchone())
        control = tenancy.control(org)
        if control.find("memberships", "user_id = ?", (user["id"],)):
            raise Conflict(f"you are already a member of {org['slug']}")
        plan_name, plan = tenancy.plan_of(org["id"])
        require_quota(org, plan_name, plan, "members", control.count("memberships"))
        control.insert("memberships", user_id=user["id"], role=invite["role"],
                       created_at=utc_timestamp())
        control.update("invites", "id = ?", (invite["id"],), accepted_at=utc_timestamp(),
                       accepted_by=user["id"])
    tenancy.record(request, org, "invite.accepted", f"user:{user['id']}",
                   {"invite": invite["id"], "role": invite["role"]})
    return {"org": org_json(org, invite["role"]), "role": invite["role"]}


# =============================================================================================
# Members
# =============================================================================================

ROLE_CHANGE = {"role": Choice(ROLES, required=True)}
MEMBER_JOIN = "JOIN users ON users.id = memberships.user_id"
MEMBER_COLUMNS = "memberships.*, users.email"


def member_json(row):
    return {"user_id": row["user_id"], "email": row["email"], "role": row["role"],
            "joined_at": row["created_at"]}


def list_members(request, org):
    """Members and their roles"""
    limit, cursor = list_params(request, (int,))
    rows = tenancy_of(request).control(org).select(
        "memberships", "memberships.user_id > ?", (cursor[0] if cursor else 0,),
        columns=MEMBER_COLUMNS, join=MEMBER_JOIN, order_by="memberships.user_id", limit=limit + 1)
    return page(rows, limit, lambda row: [row["user_id"]], member_json)


def member_in_transaction(request, org, control, user_id):
    """Inside the write transaction: the caller's permissions read again (a demotion that
    committed a moment ago counts) and the member, or 404."""
    request.context["permissions"] = granted = tenancy_of(request).permissions_of(request, org)
    require_granted(granted, "tenant:read", org["slug"])
    return found(control.find("memberships", "memberships.user_id = ?", (user_id,),
                              columns=MEMBER_COLUMNS, join=MEMBER_JOIN), "member", user_id)


def require_another_owner(control, member):
    if member["role"] == "owner" and control.count("memberships", "role = 'owner'") <= 1:
        raise Conflict("this is the last owner: make another member owner first")


def change_member_role(request, org, user_id):
    """Change a member's role; owners only make or unmake owners; the last owner stays"""
    role = validate(request.json_object(), ROLE_CHANGE)["role"]
    control = tenancy_of(request).control(org)
    # One write transaction: two owners demoting each other at once are serialised, and the
    # second sees the first one's change (and that only one owner is left).
    with control.transaction():
        member = member_in_transaction(request, org, control, user_id)
        require_granted(request.context["permissions"], "members:manage", org["slug"])
        require_owner_rights_for(request, org, member["role"], role)
        if role != "owner":
            require_another_owner(control, member)
        control.update("memberships", "user_id = ?", (user_id,), role=role)
    tenancy_of(request).record(request, org, "member.role_changed", f"user:{user_id}",
                               {"from": member["role"], "to": role})
    return {**member_json(member), "role": role}


def remove_member(request, org, user_id):
    """Remove a member (or leave, for yourself); the last owner stays"""
    control = tenancy_of(request).control(org)
    with control.transaction():
        member = member_in_transaction(request, org, control, user_id)
        if user_id != acting_user_id(request):
            require_granted(request.context["permissions"], "members:manage", org["slug"])
            require_owner_rights_for(request, org, member["role"])
        require_another_owner(control, member)
        control.delete("memberships", "user_id = ?", (user_id,))
    tenancy_of(request).record(request, org, "member.removed", f"user:{user_id}",
                               {"role": member["role"]})
    return no_content()


# =============================================================================================
# Projects and tasks: tenant-owned rows, only through TenantData
# =============================================================================================

PROJECT_FIELDS = {"name": Text(1, 200, required=True)}
TASK_FIELDS = {"title": Text(1, 500, required=True), "done": Boolean(default=False)}
READ_ONLY = {"id", "org_id", "project_id", "version", "created_at", "updated_at"}


def project_json(row):
    return {"id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def task_json(row):
    return {"id": row["id"], "project_id": row["project_id"], "title": row["title"],
            "done": bool(row["done"]), "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def with_etag(render, row, status=200):
    return json_response(render(row), status, {"ETag": etag(row["version"])})


def id_page(request, data, table, render, where="1", params=()):
    """A page of `table`'s rows in id order (the list contract)."""
    limit, cursor = list_params(request, (int,))
    rows = data.select(table, f"id > ? AND ({where})", (cursor[0] if cursor else 0, *params),
                       order_by="id", limit=limit + 1)
    return page(rows, limit, lambda row: [row["id"]], render)


def create_project(request, org):
    """Create a project (within the plan's quota: 402 beyond it)"""
    values = validate(request.json_object(), PROJECT_FIELDS, read_only=READ_ONLY)
    tenancy = tenancy_of(request)
    data = tenancy.data(org)
    now = utc_timestamp()
    with data.transaction():  # count and insert under one write lock: racing creates queue here
        plan_name, plan = tenancy.plan_of(org["id"])
        require_quota(org, plan_name, plan, "projects", data.count("projects"))
        row = data.insert("projects", name=values["name"], created_at=now, updated_at=now)
    return created(project_json(row), f"/orgs/{org['slug']}/projects/{row['id']}",
                   {"ETag": etag(row["version"])})


def list_projects(request, org):
    """Projects, oldest first"""
    return id_page(request, tenancy_of(request).data(org), "projects", project_json)


def project_of(data, project_id):
    return found(data.get("projects", project_id), "project", project_id)


def read_project(request, org, project_id):
    """One project"""
    return with_etag(project_json, project_of(tenancy_of(request).data(org), project_id))


def update_row(request, data, table, row_id, fields, render, where="1", params=()):
    """PATCH one row (that also meets `where`): the fields given, If-Match honoured, the
    version bumped."""
    values = validate(request.json_object(), fields, partial=True, read_only=READ_ONLY)
    with data.transaction():
        row = found(data.find(table, f"id = ? AND ({where})", (row_id, *params)),
                    table.removesuffix("s"), row_id)
        request.require_if_match(etag(row["version"]))
        if values:
            row = data.update(table, "id = ?", (row_id,), **values, version=row["version"] + 1,
                              updated_at=utc_timestamp())[0]
    return with_etag(render, row)


def delete_row(request, data, table, row_id, where="1", params=()):
    with data.transaction():
        row = found(data.find(table, f"id = ? AND ({where})", (row_id, *params)),
                    table.removesuffix("s"), row_id)
        request.require_if_match(etag(row["version"]))
        data.delete(table, "id = ?", (row_id,))
    return no_content()


def update_project(request, org, project_id):
    """Rename a project"""
    return update_row(request, tenancy_of(request).data(org), "projects", project_id,
                      PROJECT_FIELDS, project_json)


def delete_project(request, org, project_id):
    """Delete a project and its tasks"""
    return delete_row(request, tenancy_of(request).data(org), "projects", project_id)


def create_task(request, org, project_id):
    """Add a task to a project"""
    values = validate(request.json_object(), TASK_FIELDS, read_only=READ_ONLY)
    data = tenancy_of(request).data(org)
    now = utc_timestamp()
    with data.transaction():
        project_of(data, project_id)
        row = data.insert("tasks", project_id=project_id, title=values["title"],
                          done=values["done"], created_at=now, updated_at=now)
    return created(task_json(row), f"/orgs/{org['slug']}/projects/{project_id}/tasks/{row['id']}",
                   {"ETag": etag(row["version"])})


def list_tasks(request, org, project_id):
    """A project's tasks, oldest first"""
    data = tenancy_of(request).data(org)
    project_of(data, project_id)
    return id_page(request, data, "tasks", task_json, "project_id = ?", (project_id,))


def task_of(data, project_id, task_id):
    return found(data.find("tasks", "id = ? AND project_id = ?", (task_id, project_id)),
                 "task", task_id)


def read_task(request, org, project_id, task_id):
    """One task"""
    return with_etag(task_json, task_of(tenancy_of(request).data(org), project_id, task_id))


def update_task(request, org, project_id, task_id):
    """Change a task's title or mark it done"""
    return update_row(request, tenancy_of(request).data(org), "tasks", task_id, TASK_FIELDS,
                      task_json, "project_id = ?", (project_id,))


def delete_task(request, org, project_id, task_id):
    """Delete a task"""
    return delete_row(request, tenancy_of(request).data(org), "tasks", task_id,
                      "project_id = ?", (project_id,))


# =============================================================================================
# Settings and export
# =============================================================================================

SETTINGS_LIMIT = 16 * 1024   # bytes of the stored JSON object


def read_settings(request, org):
    """The organisation's settings: one JSON object"""
    row = tenancy_of(request).data(org).find("settings")
    value, version = (json.loads(row["value"]), row["version"]) if row else ({}, 0)
    return json_response(value, headers={"ETag": etag(version)})


def update_settings(request, org):
    """Merge keys into the settings (RFC 7396 at the top level: null removes a key)"""
    patch = request.json_object()
    data = tenancy_of(request).data(org)
    with data.transaction():
        row = data.find("settings")
        value, version = (json.loads(row["value"]), row["version"]) if row else ({}, 0)
        request.require_if_match(etag(version))
        for key, item in patch.items():
            if item is None:
                value.pop(key, None)
            else:
                value[key] = item
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if not is_unicode_text(text):
            raise UnprocessableContent("settings must be Unicode text (no lone surrogates)")
        if len(text.encode("utf-8")) > SETTINGS_LIMIT:
            raise UnprocessableContent(f"the settings would be {len(text.encode())} bytes; "
                                       f"at most {SETTINGS_LIMIT} are kept")
        if row is None:
            data.insert("settings", value=text, version=1)
        else:
            data.update("settings", "1", (), value=text, version=version + 1)
    tenancy_of(request).record(request, org, "settings.changed", f"org:{org['slug']}",
                               {"keys": sorted(patch)})
    return json_response(value, headers={"ETag": etag(version + 1)})


def export_org(request, org):
    """Everything of this organisation, and nothing of any other"""
    tenancy = tenancy_of(request)
    control = tenancy.control(org)
    members = control.select("memberships", columns=MEMBER_COLUMNS, join=MEMBER_JOIN,
                             order_by="memberships.user_id")
    invites = control.select("invites")
    plan_name, _ = tenancy.plan_of(org["id"])
    tenancy.record(request, org, "org.exported", f"org:{org['slug']}")
    return {"org": org_json({**org, "plan": plan_name}), "exported_at": utc_timestamp(),
            "members": [member_json(row) for row in members],
            "invites": [invite_json(row) for row in invites],
            "tables": tenancy.data(org).export()}


# =============================================================================================
# The routes, declared on any App
# =============================================================================================

ORG_BODY_LIMIT = 16 * 1024


def add_tenancy_routes(app):
    """Every `/orgs…` and `/invites…` route of level07.md §27 on `app`, whose
    `app.state.tenancy` must be a `Tenancy` (the `/auth/*` routes and the middleware that
    authenticates the caller are the caller's: `add_token_routes`, `require_user`)."""
    scoped = functools.partial(tenant_route, app)
    limited = {"body_limit": ORG_BODY_LIMIT}
    app.post("/orgs", permission=SIGNED_IN, request_schema=body_schema(ORG_FIELDS),
             responses={201: "The organisation; you are its owner", 409: "The slug is taken"},
             **limited)(create_organisation)
    app.get("/orgs", permission=SIGNED_IN, query=PAGE)(list_my_orgs)
    app.post("/invites/{token}/accept", permission=SIGNED_IN, responses={
        200: "You are a member", 404: "No invite with this token for you",
        409: "Already a member", 410: "Used or expired", 402: "The plan's members are full"})(
        accept_invite)
    scoped("GET", "/orgs/{slug}", "tenant:read", read_org)
    scoped("DELETE", "/orgs/{slug}", "org:delete", delete_organisation, status=204)
    scoped("POST", "/orgs/{slug}/invites", "invites:manage", create_invite,
           request_schema=body_schema(INVITE_FIELDS), responses={
               201: "The invite and its token (shown once)", 402: "The plan's members are full",
               409: "Already a member"}, **limited)
    scoped("GET", "/orgs/{slug}/invites", "invites:manage", list_invites, query=PAGE)
    scoped("GET", "/orgs/{slug}/invites/{invite_id:int}", "invites:manage", read_invite)
    scoped("DELETE", "/orgs/{slug}/invites/{invite_id:int}", "invites:manage", revoke_invite,
           status=204)
    scoped("GET", "/orgs/{slug}/members", "tenant:read", list_members, query=PAGE)
    scoped("PATCH", "/orgs/{slug}/members/{user_id:int}", "members:manage", change_member_role,
           request_schema=body_schema(ROLE_CHANGE), responses={
               200: "The member with the new role", 409: "It would leave no owner"}, **limited)
    scoped("DELETE", "/orgs/{slug}/members/{user_id:int}", "tenant:read", remove_member,
           status=204, responses={409: "It would leave no owner"})
    scoped("POST", "/orgs/{slug}/projects", "tenant:write", create_project,
           request_schema=body_schema(PROJECT_FIELDS), responses={
               201: "The new project", 402: "The plan's projects are used up"}, **limited)
    scoped("GET", "/orgs/{slug}/projects", "tenant:read", list_projects, query=PAGE)
    scoped("GET", "/orgs/{slug}/projects/{project_id:int}", "tenant:read", read_project)
    scoped("PATCH", "/orgs/{slug}/projects/{project_id:int}", "tenant:write", update_project,
           request_schema=body_schema(PROJECT_FIELDS, partial=True), if_match=True, **limited)
    scoped("DELETE", "/orgs/{slug}/projects/{project_id:int}", "tenant:write", delete_project,
           status=204, if_match=True)
    scoped("POST", "/orgs/{slug}/projects/{project_id:int}/tasks", "tenant:write", create_task,
           request_schema=body_schema(TASK_FIELDS), responses={201: "The new task"}, **limited)
    scoped("GET", "/orgs/{slug}/projects/{project_id:int}/tasks", "tenant:read", list_tasks,
           query=PAGE)
    scoped("GET", "/orgs/{slug}/projects/{project_id:int}/tasks/{task_id:int}", "tenant:read",
           read_task)
    scoped("PATCH", "/orgs/{slug}/projects/{project_id:int}/tasks/{task_id:int}",
           "tenant:write", update_task, request_schema=body_schema(TASK_FIELDS, partial=True),
           if_match=True, **limited)
    scoped("DELETE", "/orgs/{slug}/projects/{project_id:int}/tasks/{task_id:int}",
           "tenant:write", delete_task, status=204, if_match=True)
    scoped("GET", "/orgs/{slug}/settings", "tenant:read", read_settings)
    scoped("PATCH", "/orgs/{slug}/settings", "settings:manage", update_settings,
           request_schema={"type": "object"}, body_limit=SETTINGS_LIMIT, if_match=True,
           responses={200: "The settings after the merge", 422: "Over 16 KiB"})
    scoped("GET", "/orgs/{slug}/export", "tenant:export", export_org)


add_token_routes(app)
add_tenancy_routes(app)
app.use(require_user)   # who are you? 401; the tenant routes then ask tenant_for


# =============================================================================================
# Command line
# =============================================================================================

def tenant_folder_for(db_path):
    """--db-per-tenant's folder, beside --db: data/multi_tenant.sqlite3 → data/multi_tenant.tenants/"""
    path = Path(db_path)
    return path.with_name(path.stem + ".tenants")


def plan_command(argv):
    """`plan SLUG PLAN --db PATH`: the operator puts an organisation on a plan."""
    parser = argparse.ArgumentParser(prog="multi_tenant.py plan",
                                     description="Put an organisation on a plan.")
    parser.add_argument("slug")
    parser.add_argument("plan", choices=sorted(PLANS))
    parser.add_argument("--db", default=default_db_path(app.name), help="the server's sqlite file")
    args = parser.parse_args(argv)
    try:
        db = Database(args.db, SCHEMA)
    except StorageError as err:
        exit_usage_error(str(err))
    try:
        org = set_plan(db, args.slug, args.plan)
    finally:
        db.close()
    if org is None:
        sys.stderr.write(f"error: no organisation {args.slug}\n")
        raise SystemExit(1)
    sys.stderr.write(f"{org['slug']} is on the {org['plan']} plan: {PLANS[org['plan']]}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        return plan_command(argv[1:])
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    parser.add_argument("--invite-ttl", type=at_least_a_second, default=float(INVITE_TTL_S),
                        help="seconds an invite stays valid (default 7 days)")
    parser.add_argument("--db-per-tenant", action="store_true",
                        help="keep each organisation's projects, tasks and settings in a sqlite "
                             "file of its own, in a folder beside --db")
    args = parser.parse_args(argv)
    check_tenancy_routes(app)   # before anything listens
    if args.db_per_tenant and args.db == ":memory:":
        exit_usage_error("--db-per-tenant needs a --db file: its folder goes beside it")
    db = app.open_database(args, SCHEMA)
    app.state.auth = Auth.from_args(db, args)
    app.state.tenancy = Tenancy(db, invite_ttl=args.invite_ttl, trace=args.trace,
                                tenant_folder=tenant_folder_for(args.db) if args.db_per_tenant
                                else None)
    app.shutdown_hooks.insert(0, app.state.tenancy.close)
    app.run(args)


if __name__ == "__main__":
    main()
