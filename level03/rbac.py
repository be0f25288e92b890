"""Role-based access control: who may do what, declared once and checked on every request.

What it teaches
  - Authentication and authorisation are two questions, two middleware steps and two statuses:
    "who are you?" (`require_user`, imported from jwt_auth: 401 without a valid token) and
    "may you do this?" (`enforce_permission`: 403 naming the permission that is missing).
  - One permission table in the code (`ROLE_PERMISSIONS`, served at `GET /roles`), with roles
    ordered user < moderator < admin, each holding every permission of the one before.
  - Deny by default: every route declares the permission it needs (`permission="posts:create"`)
    or that it is open (`public=True`); a route that says neither stops the server from
    starting (`check_route_permissions`), so a forgotten check cannot ship.
  - Roles are read from the database on every request, never from the token: a demotion
    applies to the very next request, even with a token issued before it.
  - Ownership beside roles: a user may change their own posts, a moderator anyone's; a hidden
    post is answered 404 to those who may not see it, so its existence does not leak.
  - An invariant kept under concurrency: the last admin cannot be demoted (409), checked and
    written in one `BEGIN IMMEDIATE` transaction.

Identity (signup, login, refresh tokens, the bearer check) is imported from level03/jwt_auth.py.

What it leaves out: attribute- and relationship-based rules (ABAC, ReBAC: "editors of this
folder"), per-resource grants, groups, custom roles edited at run time, an audit log of role
changes (level 07). rbac.md's "In production" says who does those.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, Conflict, Forbidden, NotFound, created, json_response, no_content
from lib.app import exit_usage_error
from lib.listing import list_params, page
from lib.request import utc_timestamp
from lib.routing import PAGE
from lib.validation import Choice, Text, body_schema, validate
from level01.counter import etag
from level03.jwt_auth import (SCHEMA as IDENTITY_SCHEMA, Auth, add_auth_arguments,
                              add_token_routes, create_account, current_user, email_argument,
                              email_key, require_user)

app = App("rbac", "Roles and permissions: users, moderators and admins over a small posts API.",
          port=8010)


# =============================================================================================
# The permission table
# =============================================================================================

ROLES = ("user", "moderator", "admin")   # in order: each role holds the permissions before it

PERMISSIONS = {
    "me:read": "read your own account and permissions",
    "posts:read": "list and read posts (hidden ones only your own)",
    "posts:create": "write a post",
    "posts:update:own": "edit your own posts",
    "posts:delete:own": "delete your own posts",
    "posts:read:hidden": "see hidden posts of anyone",
    "posts:update:any": "edit anyone's post",
    "posts:delete:any": "delete anyone's post",
    "posts:hide": "hide and unhide posts",
    "users:read": "list users and their roles",
    "users:role:update": "change a user's role",
}

_USER = {"me:read", "posts:read", "posts:create", "posts:update:own", "posts:delete:own"}
_MODERATOR = _USER | {"posts:read:hidden", "posts:update:any", "posts:delete:any", "posts:hide",
                      "users:read"}
_ADMIN = _MODERATOR | {"users:role:update"}
ROLE_PERMISSIONS = {"user": frozenset(_USER), "moderator": frozenset(_MODERATOR),
                    "admin": frozenset(_ADMIN)}


# =============================================================================================
# Schema (beside jwt_auth's users and refresh tokens)
# =============================================================================================

SCHEMA = IDENTITY_SCHEMA + """
CREATE TABLE IF NOT EXISTS user_roles (
    user_id INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    role    TEXT NOT NULL CHECK (role IN ('user', 'moderator', 'admin'))
);
CREATE INDEX IF NOT EXISTS user_roles_by_role ON user_roles (role);

CREATE TABLE IF NOT EXISTS posts (
    id         INTEGER PRIMARY KEY,
    author_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title      TEXT NOT NULL,
    body       TEXT NOT NULL,
    hidden     INTEGER NOT NULL DEFAULT 0,
    version    INTEGER NOT NULL DEFAULT 1,       -- the ETag: bumped by every change
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


# =============================================================================================
# Authorisation: the start-up check and the middleware step
# =============================================================================================

def route_permission_problems(routes, permissions=PERMISSIONS):
    """What is wrong with the routes' declarations: each needs exactly one of `public=True`
    or a `permission` from the table (`permissions`: another project's own table)."""
    problems = []
    for route in routes:
        public, permission = route.meta.get("public"), route.meta.get("permission")
        where = f"{route.method} {route.pattern}"
        if public and permission:
            problems.append(f"{where} is both public and needs {permission!r}")
        elif not public and permission is None:
            problems.append(f"{where} declares no permission (add permission=… or public=True)")
        elif permission is not None and permission not in permissions:
            problems.append(f"{where} needs {permission!r}, which is not in the permission table")
    return problems


def check_route_permissions(app, permissions=PERMISSIONS):
    """Deny by default, enforced at start-up: refuse to run (exit 2) while any route has no
    declared permission, so no route can be forgotten by `enforce_permission`."""
    problems = route_permission_problems(app.router.routes, permissions)
    if problems:
        exit_usage_error("refusing to start: " + "; ".join(problems))


def role_of(db, user_id):
    """The user's role now (None if it has none): read per request, never from the token."""
    row = db.query_one("SELECT role FROM user_roles WHERE user_id = ?", (user_id,))
    return row["role"] if row else None


def permissions_of(role):
    return ROLE_PERMISSIONS.get(role, frozenset())


def enforce_permission(request, call_next):
    """Middleware step after `require_user`: the user's current role must hold the route's
    permission, else 403 naming it. The role and permissions land in `request.context`."""
    route = request.route
    if route.meta.get("public"):
        return call_next(request)
    user = current_user(request)
    role = role_of(request.app.state.auth.db, user["id"])
    granted = permissions_of(role)
    request.context["role"], request.context["permissions"] = role, granted
    require_permission(request, route.meta["permission"])
    return call_next(request)


def require_permission(request, permission):
    """403 unless this request's user holds `permission` (handlers call it for the `:any`
    permissions that only apply to other people's posts)."""
    if permission not in request.context["permissions"]:
        role = request.context["role"]
        holder = f"the role {role}" if role else "an account without a role"
        raise Forbidden(f"this needs the permission {permission}, which {holder} does not have",
                        missing_permission=permission)


def has_permission(request, permission):
    return permission in request.context["permissions"]


# =============================================================================================
# Accounts and roles
# =============================================================================================

ROLE_CHANGE = {"role": Choice(ROLES, required=True)}


def user_with_role(row):
    return {"id": row["id"], "email": row["email"], "role": row["role"],
            "created_at": row["created_at"]}


@app.get("/roles", public=True, responses={200: "Every role and its permissions"})
def list_roles(request):
    """The permission table: which role holds which permission"""
    return {"roles": [{"name": role, "permissions": sorted(ROLE_PERMISSIONS[role])}
                      for role in ROLES],
            "permissions": PERMISSIONS}


def sign_up(request):
    """Create an account"""
    admin_email = request.app.state.admin_email

    def grant_role(conn, user):  # in the insert's transaction: the user and its role, or neither
        is_admin = admin_email and email_key(user["email"]) == email_key(admin_email)
        user["role"] = "admin" if is_admin else "user"
        conn.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?)",
                     (user["id"], user["role"]))

    user = create_account(request.app.state.auth, request.json_object(), in_transaction=grant_role)
    return created(user, "/me")


# jwt_auth's account routes with this signup; login, refresh and logout are its handlers,
# unchanged: they read app.state.auth.
add_token_routes(app, sign_up, "The new user, with the role `user` (or `admin` for --admin-email)")


@app.get("/me", permission="me:read")
def read_me(request):
    """The signed-in user and their current role"""
    return {**current_user(request), "role": request.context["role"]}


@app.get("/me/permissions", permission="me:read")
def read_my_permissions(request):
    """What the signed-in user may do, from their role now"""
    return {"role": request.context["role"],
            "permissions": sorted(request.context["permissions"])}


@app.get("/users", permission="users:read", query=PAGE)
def list_users(request):
    """Users and their roles (moderators and admins)"""
    limit, cursor = list_params(request, (int,))
    after = cursor[0] if cursor else 0
    rows = request.app.state.auth.db.query(
        "SELECT u.id, u.email, u.created_at, r.role FROM users u "
        "LEFT JOIN user_roles r ON r.user_id = u.id WHERE u.id > ? ORDER BY u.id LIMIT ?",
        (after, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], user_with_role)


@app.put("/users/{user_id:int}/role", permission="users:role:update",
         request_schema=body_schema(ROLE_CHANGE),
         responses={200: "The user with the new role", 409: "It would leave no admin"})
def change_role(request, user_id):
    """Set a user's role (admins only); the last admin cannot be demoted"""
    role = validate(request.json_object(), ROLE_CHANGE)["role"]
    actor = current_user(request)
    db = request.app.state.auth.db
    # One write transaction: two admins demoting each other at the same moment are serialised,
    # and the second one sees the first one's change (and is no longer an admin).
    with db.transaction() as conn:
        acting_role = conn.execute("SELECT role FROM user_roles WHERE user_id = ?",
                                   (actor["id"],)).fetchone()
        if acting_role is None or "users:role:update" not in permissions_of(acting_role["role"]):
            outcome = "actor demoted"
        else:
            row = conn.execute("SELECT u.id, u.email, u.created_at, r.role FROM users u "
                               "LEFT JOIN user_roles r ON r.user_id = u.id WHERE u.id = ?",
                               (user_id,)).fetchone()
            admins = conn.execute("SELECT count(*) FROM user_roles WHERE role = 'admin'").fetchone()[0]
            if row is None:
                outcome = "no user"
            elif row["role"] == "admin" and role != "admin" and admins <= 1:
                outcome = "last admin"
            else:
                outcome = "changed"
                conn.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?) "
                             "ON CONFLICT (user_id) DO UPDATE SET role = excluded.role",
                             (user_id, role))
    if outcome == "actor demoted":
        raise Forbidden("this needs the permission users:role:update, which your role no "
                        "longer has", missing_permission="users:role:update")
    if outcome == "no user":
        raise NotFound(f"no user {user_id}")
    if outcome == "last admin":
        raise Conflict("this is the last admin: make another user admin first")
    return {**user_with_role(row), "role": role}


# =============================================================================================
# Posts: ownership and visibility
# =============================================================================================

POST_FIELDS = {"title": Text(1, 200, required=True), "body": Text(0, 20_000, default="")}
POST_READ_ONLY = {"id", "author_id", "hidden", "created_at", "updated_at"}


def post_json(row):
    return {"id": row["id"], "author_id": row["author_id"], "title": row["title"],
            "body": row["body"], "hidden": bool(row["hidden"]), "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def can_see(request, row):
    return not row["hidden"] or row["author_id"] == current_user(request)["id"] \
        or has_permission(request, "posts:read:hidden")


def visible_post(request, post_id):
    """The post, or 404 when it does not exist or is hidden from this user: answering 403
    would confirm that a hidden post is there."""
    row = request.app.state.auth.db.query_one("SELECT * FROM posts WHERE id = ?", (post_id,))
    if row is None or not can_see(request, row):
        raise NotFound(f"no post {post_id}")
    return row


def require_owner_or(request, row, permission):
    """Owners act on their own posts with the route's `:own` permission; anyone else needs
    the `:any` one."""
    if row["author_id"] != current_user(request)["id"]:
        require_permission(request, permission)


def post_response(row, status=200):
    return json_response(post_json(row), status, {"ETag": etag(row["version"])})


@app.post("/posts", permission="posts:create", request_schema=body_schema(POST_FIELDS),
          responses={201: "The new post"})
def create_post(request):
    """Write a post"""
    values = validate(request.json_object(), POST_FIELDS, read_only=POST_READ_ONLY)
    now = utc_timestamp()
    db = request.app.state.auth.db
    cursor = db.execute("INSERT INTO posts (author_id, title, body, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (current_user(request)["id"], values["title"], values["body"], now, now))
    row = db.query_one("SELECT * FROM posts WHERE id = ?", (cursor.lastrowid,))
    return created(post_json(row), f"/posts/{row['id']}", {"ETag": etag(row["version"])})


@app.get("/posts", permission="posts:read", query=PAGE)
def list_posts(request):
    """Posts, newest first (hidden ones only to their author and moderators)"""
    limit, cursor = list_params(request, (int,))
    before = cursor[0] if cursor else 2**63 - 1
    see_hidden = 1 if has_permission(request, "posts:read:hidden") else 0
    rows = request.app.state.auth.db.query(
        "SELECT * FROM posts WHERE id < ? AND (hidden = 0 OR author_id = ? OR ?) "
        "ORDER BY id DESC LIMIT ?", (before, current_user(request)["id"], see_hidden, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], post_json)


@app.get("/posts/{post_id:int}", permission="posts:read")
def read_post(request, post_id):
    """One post"""
    return post_response(visible_post(request, post_id))


@app.patch("/posts/{post_id:int}", permission="posts:update:own", if_match=True,
           request_schema=body_schema(POST_FIELDS, partial=True))
def update_post(request, post_id):
    """Edit a post: your own, or anyone's with posts:update:any"""
    values = validate(request.json_object(), POST_FIELDS, partial=True, read_only=POST_READ_ONLY)
    db = request.app.state.auth.db
    with db.transaction():
        row = visible_post(request, post_id)
        require_owner_or(request, row, "posts:update:any")
        request.require_if_match(etag(row["version"]))
        if values:
            db.execute("UPDATE posts SET title = ?, body = ?, version = version + 1, "
                       "updated_at = ? WHERE id = ?",
                       (values.get("title", row["title"]), values.get("body", row["body"]),
                        utc_timestamp(), post_id))
        row = db.query_one("SELECT * FROM posts WHERE id = ?", (post_id,))
    return post_response(row)


@app.delete("/posts/{post_id:int}", permission="posts:delete:own", status=204, if_match=True)
def delete_post(request, post_id):
    """Delete a post: your own, or anyone's with posts:delete:any"""
    db = request.app.state.auth.db
    with db.transaction():
        row = visible_post(request, post_id)
        require_owner_or(request, row, "posts:delete:any")
        request.require_if_match(etag(row["version"]))
        db.execute("DELETE FROM posts WHERE id = ?", (post_id,))
    return no_content()


def set_hidden(request, post_id, hidden):
    db = request.app.state.auth.db
    with db.transaction():
        row = visible_post(request, post_id)
        if bool(row["hidden"]) != hidden:
            db.execute("UPDATE posts SET hidden = ?, version = version + 1, updated_at = ? "
                       "WHERE id = ?", (int(hidden), utc_timestamp(), post_id))
        row = db.query_one("SELECT * FROM posts WHERE id = ?", (post_id,))
    return post_response(row)


@app.post("/posts/{post_id:int}/hide", permission="posts:hide", responses={200: "The hidden post"})
def hide_post(request, post_id):
    """Hide a post from everyone but its author and moderators"""
    return set_hidden(request, post_id, True)


@app.post("/posts/{post_id:int}/unhide", permission="posts:hide",
          responses={200: "The post, visible again"})
def unhide_post(request, post_id):
    """Make a hidden post visible again"""
    return set_hidden(request, post_id, False)


app.use(require_user)        # who are you? 401
app.use(enforce_permission)  # may you? 403


# =============================================================================================
# Command line
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    parser.add_argument("--admin-email", type=email_argument,
                        help="the account with this email becomes admin when it signs up")
    args = parser.parse_args(argv)
    check_route_permissions(app)   # before anything listens
    db = app.open_database(args, SCHEMA)
    app.state.auth = Auth.from_args(db, args)
    app.state.admin_email = args.admin_email
    app.run(args)


if __name__ == "__main__":
    main()
