"""level03/rbac.py, black-box: the permission table, deny by default, 401 vs 403, roles read per
request, the last admin, ownership and hidden posts.

One module server (with `--admin-email`) serves the tests that only add users and posts; tests
that change who is admin start their own. The one test that imports the module is the start-up
refusal: its point is that a server with an undeclared route never starts.
"""
import hashlib
import hmac
import base64
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.harness import ROOT, clean_env, expect, expect_json, expect_problem
from tests.level03.accounts import (LONE_SURROGATE_PASSWORD, LOW_COST, TIMEOUT, TOKEN_ROUTE_BODIES,
                                    AccountClient, assert_policy_described, body_schema,
                                    check_bodies_name_their_fields, check_password_bounds,
                                    expect_lone_surrogate_refused, fresh_email, request_bodies)

SCRIPT = "level03/rbac.py"
SECRET = "rbac-test-secret-0123456789abcdefghijkl"
ADMIN_EMAIL = "root-admin@example.com"
PUBLIC = {("GET", "/"), ("GET", "/openapi.json"), ("GET", "/health"), ("GET", "/roles"),
          ("POST", "/auth/signup"), ("POST", "/auth/login"), ("POST", "/auth/refresh"),
          ("POST", "/auth/logout")}


class Api(AccountClient):
    """One server; `as_(token)` gives a session that sends the bearer token."""

    def account(self, prefix="u", email=None):
        """A new user and a session that acts as them: (user, session)."""
        email = email or fresh_email(prefix)
        user = self.signup(email)
        return user, self.as_(self.login(email)["access_token"])

    def as_(self, token):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        session.request = _with_base(session.request, self.url)
        return session


def _with_base(request, base):
    def call(method, path, **kw):
        kw.setdefault("timeout", TIMEOUT)
        return request(method, base + path, **kw)
    return call


def set_role(admin, user_id, role):
    return admin.put(f"/users/{user_id}/role", json={"role": role})


def expect_forbidden(resp, permission):
    problem = expect_problem(resp, 403)
    assert permission in problem["detail"], problem
    assert problem.get("missing_permission") == permission, problem
    return problem


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--secret", SECRET, *LOW_COST, "--admin-email", ADMIN_EMAIL)


@pytest.fixture(scope="module")
def api(server):
    return Api(server)


@pytest.fixture(scope="module")
def admin(api):
    user, session = api.account(email=ADMIN_EMAIL.upper())  # the flag matches in any case
    assert user["role"] == "admin"
    return session


@pytest.fixture(scope="module")
def moderator(api, admin):
    user, session = api.account("mod")
    expect(set_role(admin, user["id"], "moderator"), 200)
    return session


# --------------------------------------------------------------------------------------------
# The table


def test_roles_table_is_public_and_ordered(api):
    body = expect_json(requests.get(api.url + "/roles", timeout=TIMEOUT), 200)
    roles = {r["name"]: set(r["permissions"]) for r in body["roles"]}
    assert [r["name"] for r in body["roles"]] == ["user", "moderator", "admin"]
    assert roles["user"] < roles["moderator"] < roles["admin"], "each role holds the one before"
    for permission in ("posts:create", "posts:update:own", "posts:update:any", "posts:delete:own",
                       "posts:delete:any", "posts:hide", "users:read", "users:role:update"):
        assert permission in body["permissions"], permission
    assert {"posts:create", "posts:update:own", "posts:delete:own"} <= roles["user"]
    assert not {"posts:update:any", "posts:hide", "users:read"} & roles["user"]
    assert {"posts:update:any", "posts:delete:any", "posts:hide", "users:read"} <= roles["moderator"]
    assert "users:role:update" not in roles["moderator"]
    assert "users:role:update" in roles["admin"]


def test_my_permissions_are_my_roles_row(api, admin, moderator):
    table = {r["name"]: r["permissions"]
             for r in requests.get(api.url + "/roles", timeout=TIMEOUT).json()["roles"]}
    _, user = api.account("perm")
    for session, role in ((user, "user"), (moderator, "moderator"), (admin, "admin")):
        body = expect_json(session.get("/me/permissions"), 200)
        assert body == {"role": role, "permissions": sorted(table[role])}


def test_a_lone_surrogate_in_a_new_password_is_a_422_not_a_500(api):
    expect_lone_surrogate_refused(api.post("/auth/signup", {"email": fresh_email("surrogate"),
                                                            "password": LONE_SURROGATE_PASSWORD}),
                                  "password")


def test_new_users_are_users(api):
    user = api.signup(fresh_email("new"))
    assert user["role"] == "user"
    assert set(user) == {"id", "email", "role", "created_at"}


# --------------------------------------------------------------------------------------------
# 401 vs 403, deny by default


def test_every_route_but_the_public_ones_needs_a_token(api):
    index = expect_json(requests.get(api.url + "/", timeout=TIMEOUT), 200)
    checked = 0
    for route in index["routes"]:
        if (route["method"], route["path"]) in PUBLIC:
            continue
        path = re.sub(r"\{[^}]*\}", "1", route["path"])
        resp = requests.request(route["method"], api.url + path, json={}, timeout=TIMEOUT)
        expect_problem(resp, 401)
        assert resp.headers.get("WWW-Authenticate") == "Bearer", route
        checked += 1
    assert checked >= 10


def test_public_routes_need_no_token(api):
    for path in ("/", "/openapi.json", "/health", "/roles"):
        expect(requests.get(api.url + path, timeout=TIMEOUT), 200)


def test_an_invalid_token_is_401_not_403(api):
    user = api.signup(fresh_email("forged"))
    now = int(time.time())
    claims = {"iss": "rbac", "aud": "rbac", "sub": str(user["id"]), "iat": now, "exp": now + 60}
    forged = _mint(claims, "not-the-server-secret-but-long-enough!!")
    resp = requests.get(api.url + "/users", headers={"Authorization": f"Bearer {forged}"},
                        timeout=TIMEOUT)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    genuine = api.as_(_mint(claims, SECRET))  # the same claims, signed with the server's secret
    assert expect_json(genuine.get("/me"), 200)["id"] == user["id"]
    expect_forbidden(genuine.get("/users"), "users:read")


def _mint(claims, secret):
    def b64u(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    signing_input = f"{b64u(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{b64u(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64u(signature)}"


def test_a_valid_token_without_the_permission_is_403_naming_it(api, moderator):
    _, user = api.account("noperm")
    expect_forbidden(user.get("/users"), "users:read")
    expect_forbidden(user.put("/users/1/role", json={"role": "admin"}), "users:role:update")
    expect_forbidden(moderator.put("/users/1/role", json={"role": "admin"}), "users:role:update")
    post = expect_json(user.post("/posts", json={"title": "mine"}), 201)
    expect_forbidden(user.post(f"/posts/{post['id']}/hide"), "posts:hide")


def test_the_start_up_check_refuses_an_undeclared_route(tmp_path):
    """Deny by default at start-up: a route that declares no permission (or an unknown one)
    stops the server before it listens, exit status 2, naming the route."""
    for declaration, expected in (("", "GET /forgotten"),
                                  ("permission='posts:frobnicate'", "posts:frobnicate")):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv[0] = 'rbac.py'\n"
                "from level03 import rbac\n"
                f"@rbac.app.get('/forgotten', {declaration})\n"
                "def forgotten(request):\n    return {'secret': 'data'}\n"
                "rbac.main(['--port', '0', '--db', sys.argv[2]])\n")
        done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "db.sqlite3")],
                              capture_output=True, text=True, timeout=30, env=clean_env(),
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2, (done.returncode, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "listening on" not in done.stdout


# --------------------------------------------------------------------------------------------
# Roles come from the database on every request


def test_a_role_change_applies_to_the_next_request_with_an_old_token(api, admin):
    user, session = api.account("promoted")  # this token was issued while they were a user
    expect_forbidden(session.get("/users"), "users:read")
    expect(set_role(admin, user["id"], "moderator"), 200)
    expect(session.get("/users"), 200)
    assert expect_json(session.get("/me/permissions"), 200)["role"] == "moderator"
    expect(set_role(admin, user["id"], "user"), 200)
    expect_forbidden(session.get("/users"), "users:read")


def test_a_refreshed_token_carries_no_role_either(api, admin):
    email = fresh_email("refresh")
    user = api.signup(email)
    tokens = api.login(email)
    expect(set_role(admin, user["id"], "moderator"), 200)
    pair = expect_json(requests.post(api.url + "/auth/refresh", timeout=TIMEOUT,
                                     json={"refresh_token": tokens["refresh_token"]}), 200)
    expect(api.as_(pair["access_token"]).get("/users"), 200)
    expect(requests.post(api.url + "/auth/logout", json={"refresh_token": pair["refresh_token"]},
                         timeout=TIMEOUT), 204)


def test_role_changes_validate(api, admin):
    user = api.signup(fresh_email("val"))
    problem = expect_problem(set_role(admin, user["id"], "superuser"), 422)
    assert [e["field"] for e in problem["errors"]] == ["role"]
    expect_problem(set_role(admin, 987654321, "moderator"), 404)
    changed = expect_json(set_role(admin, user["id"], "moderator"), 200)
    assert changed["role"] == "moderator" and changed["id"] == user["id"]


def test_users_list_shows_roles_and_pages(api, moderator):
    first = expect_json(moderator.get("/users", params={"limit": 2}), 200)
    assert len(first["items"]) == 2 and first["next_cursor"]
    assert all(set(u) == {"id", "email", "role", "created_at"} for u in first["items"])
    second = expect_json(moderator.get("/users", params={"limit": 2, "cursor": first["next_cursor"]}),
                         200)
    assert {u["id"] for u in first["items"]}.isdisjoint(u["id"] for u in second["items"])
    emails = [u["email"] for u in expect_json(moderator.get("/users", params={"limit": 100}), 200)["items"]]
    assert ADMIN_EMAIL.upper().split("@")[0] + "@example.com" in emails
    expect_problem(moderator.get("/users", params={"cursor": "garbage!"}), 400)


# --------------------------------------------------------------------------------------------
# The last admin


def test_the_last_admin_cannot_be_demoted(start_server):
    server = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--admin-email", ADMIN_EMAIL)
    api = Api(server)
    first_user, first = api.account(email=ADMIN_EMAIL)
    problem = expect_problem(set_role(first, first_user["id"], "moderator"), 409)
    assert "admin" in problem["detail"]
    second_user, second = api.account("second")
    expect(set_role(first, second_user["id"], "admin"), 200)
    expect(set_role(second, first_user["id"], "user"), 200)       # now there is another admin
    expect_forbidden(first.get("/users"), "users:read")            # the very next request
    expect_problem(set_role(second, second_user["id"], "user"), 409)


@pytest.mark.parametrize("transport", ["threaded", "asyncio"])
def test_simultaneous_demotions_leave_exactly_one_admin(start_server, transport):
    server = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--admin-email", ADMIN_EMAIL,
                          "--server", transport)
    api = Api(server)
    first_user, first = api.account(email=ADMIN_EMAIL)
    admins = [(first_user, first)]
    for n in range(5):
        user, session = api.account(f"admin{n}")
        expect(set_role(first, user["id"], "admin"), 200)
        admins.append((user, session))
    barrier = threading.Barrier(len(admins))
    results = []

    def demote_self(user, session):
        barrier.wait()
        results.append(set_role(session, user["id"], "user").status_code)

    threads = [threading.Thread(target=demote_self, args=pair) for pair in admins]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * (len(admins) - 1) + [409], results
    remaining = [session for _, session in admins if session.get("/users").status_code == 200]
    assert len(remaining) == 1
    roles = [u["role"] for u in remaining[0].get("/users", params={"limit": 100}).json()["items"]]
    assert roles.count("admin") == 1


# --------------------------------------------------------------------------------------------
# Posts: ownership, moderation, hidden posts


def new_post(session, title="a post"):
    resp = session.post("/posts", json={"title": title, "body": "text"})
    post = expect_json(resp, 201)
    assert resp.headers["Location"] == f"/posts/{post['id']}" and resp.headers.get("ETag")
    return post


def test_owners_edit_and_delete_their_own_posts_only(api):
    _, owner = api.account("owner")
    _, other = api.account("other")
    post = new_post(owner)
    changed = expect_json(owner.patch(f"/posts/{post['id']}", json={"title": "edited"}), 200)
    assert changed["title"] == "edited" and changed["body"] == "text"
    expect_forbidden(other.patch(f"/posts/{post['id']}", json={"title": "mine now"}),
                     "posts:update:any")
    expect_forbidden(other.delete(f"/posts/{post['id']}"), "posts:delete:any")
    assert expect_json(other.get(f"/posts/{post['id']}"), 200)["title"] == "edited"
    expect(owner.delete(f"/posts/{post['id']}"), 204)
    expect_problem(owner.get(f"/posts/{post['id']}"), 404)


def test_moderators_edit_and_delete_any_post(api, moderator):
    _, owner = api.account("owner")
    post = new_post(owner)
    assert expect_json(moderator.patch(f"/posts/{post['id']}", json={"body": "moderated"}),
                       200)["body"] == "moderated"
    expect(moderator.delete(f"/posts/{post['id']}"), 204)
    expect_problem(owner.get(f"/posts/{post['id']}"), 404)


def test_hidden_posts_are_seen_by_their_author_and_moderators_only(api, admin, moderator):
    author_user, author = api.account("author")
    _, stranger = api.account("stranger")
    post = new_post(author, "to be hidden")
    hidden = expect_json(moderator.post(f"/posts/{post['id']}/hide"), 200)
    assert hidden["hidden"] is True
    for session in (author, moderator, admin):
        assert expect_json(session.get(f"/posts/{post['id']}"), 200)["hidden"] is True
        ids = [p["id"] for p in expect_json(session.get("/posts", params={"limit": 100}), 200)["items"]]
        assert post["id"] in ids
    expect_problem(stranger.get(f"/posts/{post['id']}"), 404)           # not 403: no leak
    expect_problem(stranger.patch(f"/posts/{post['id']}", json={"title": "x"}), 404)
    expect_problem(stranger.delete(f"/posts/{post['id']}"), 404)
    ids = [p["id"] for p in expect_json(stranger.get("/posts", params={"limit": 100}), 200)["items"]]
    assert post["id"] not in ids
    expect(author.patch(f"/posts/{post['id']}", json={"title": "still mine"}), 200)
    expect(moderator.post(f"/posts/{post['id']}/unhide"), 200)
    assert expect_json(stranger.get(f"/posts/{post['id']}"), 200)["author_id"] == author_user["id"]


def test_posts_refuse_server_owned_fields_and_stale_etags(api):
    _, owner = api.account("fields")
    post = new_post(owner)
    for field, value in (("author_id", 1), ("hidden", False), ("id", 5)):
        problem = expect_problem(owner.patch(f"/posts/{post['id']}", json={field: value}), 422)
        assert [e["field"] for e in problem["errors"]] == [field]
    expect_problem(owner.post("/posts", json={"title": "x", "author_id": 1}), 422)
    resp = owner.get(f"/posts/{post['id']}")
    tag = resp.headers["ETag"]
    expect(owner.patch(f"/posts/{post['id']}", json={"title": "v2"}, headers={"If-Match": tag}), 200)
    expect_problem(owner.patch(f"/posts/{post['id']}", json={"title": "v3"},
                               headers={"If-Match": tag}), 412)


def test_posts_list_pages_newest_first(api):
    _, owner = api.account("lister")
    made = [new_post(owner, f"p{n}")["id"] for n in range(3)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = expect_json(owner.get("/posts", params=params), 200)
        seen += [p["id"] for p in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen, reverse=True) and set(made) <= set(seen)


# --------------------------------------------------------------------------------------------
# The request bodies in /openapi.json: generated from the fields the server validates

POST_FIELDS = {"title": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},  # as PATCH shows them
               "body": {"type": "string", "minLength": 0, "maxLength": 20000}}


def test_openapi_describes_each_body_exactly(api):
    bodies = request_bodies(api.url)
    assert {route: schema for route, (schema, _) in bodies.items()} == {
        **TOKEN_ROUTE_BODIES,
        ("PUT", "/users/{user_id}/role"): body_schema(
            {"role": {"enum": ["user", "moderator", "admin"]}}, ["role"]),
        ("POST", "/posts"): body_schema({**POST_FIELDS, "body": {**POST_FIELDS["body"], "default": ""}},
                                        ["title"]),
        ("PATCH", "/posts/{post_id}"): body_schema(POST_FIELDS, []),   # PATCH: nothing required
    }
    described = {(route, name): text for route, (_, texts) in bodies.items()
                 for name, text in texts.items()}
    assert list(described) == [(("POST", "/auth/signup"), "password")]
    assert_policy_described(described[(("POST", "/auth/signup"), "password")])


def test_the_schemas_are_what_the_server_checks(api, admin):
    user = api.signup(fresh_email("target"))
    post = new_post(admin)
    bodies = request_bodies(api.url)

    def send(method, path, body):
        path = path.replace("{user_id}", str(user["id"])).replace("{post_id}", str(post["id"]))
        return admin.request(method, path, json=body)

    check_bodies_name_their_fields(bodies, send)
    check_password_bounds(bodies[("POST", "/auth/signup")][0], "password",
                          lambda password: api.post("/auth/signup", {"email": fresh_email("len"),
                                                                     "password": password}),
                          201)
    for field, schema in POST_FIELDS.items():
        longest = "x" * schema["maxLength"]
        expect(admin.patch(f"/posts/{post['id']}", json={field: longest}), 200)
        problem = expect_problem(admin.patch(f"/posts/{post['id']}", json={field: longest + "x"}),
                                 422)
        message = f"must be at most {schema['maxLength']} characters"
        assert problem["errors"] == [{"field": field, "message": message}]
    problem = expect_problem(set_role(admin, user["id"], "superuser"), 422)
    assert [e["field"] for e in problem["errors"]] == ["role"]
