"""level03/session_auth.py, black-box: the cookie, fixation, timeouts, CSRF, the session list,
logout, the imported login rules, the page, and secrets kept out of the log.

Cookies are handled by hand (`Browser` below): each test sends exactly the `Cookie`, `Origin`
and `X-CSRF-Token` headers it means to, and reads every `Set-Cookie` the server answers, the way
a browser would. One test drives the page's own flow with requests' real cookie jar.

Most tests share one module server (a low `--scrypt-n` for speed), each on emails of its own.
Tests whose point is a flag (timeouts, `--secure-cookies`, `--public-url`), a restart or the log
start their own. Reading the sqlite file is allowed where the point is a stored effect (the
session id is stored hashed).
"""
import base64
import hashlib
import re
import sqlite3
import time

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once
from tests.level03.accounts import (LOGIN_BODY, LONE_SURROGATE_PASSWORD, LOW_COST, PASSWORD,
                                    SIGN_UP_BODY, TIMEOUT, assert_policy_described,
                                    check_bodies_name_their_fields, check_password_bounds,
                                    expect_lone_surrogate_refused, fresh_email,
                                    password_of_length, request_bodies)

SCRIPT = "level03/session_auth.py"
SAFE = {"GET", "HEAD", "OPTIONS"}
PUBLIC = {("POST", "/auth/signup"), ("POST", "/auth/login")}
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
SID = re.compile(r"[A-Za-z0-9_-]{22,}")      # ≥ 128 bits of base64url


# --------------------------------------------------------------------------------------------
# Cookies, by hand (RFC 6265 §4.1)


def set_cookie_headers(resp):
    """Every Set-Cookie field of the answer, unjoined."""
    return resp.raw.headers.getlist("Set-Cookie")


def parse_set_cookie(header):
    """`sid=v; HttpOnly; Path=/` → ("sid", "v", {"httponly": None, "path": "/"}); attribute names
    lower-cased (they are case-insensitive), each attribute exactly once."""
    pair, *attributes = [part.strip() for part in header.split(";")]
    name, _, value = pair.partition("=")
    parsed = {}
    for attribute in attributes:
        key, eq, val = attribute.partition("=")
        assert key.lower() not in parsed, f"attribute {key} twice in {header!r}"
        parsed[key.lower()] = val if eq else None
    return name, value, parsed


def only_set_cookie(resp):
    headers = set_cookie_headers(resp)
    assert len(headers) == 1, f"expected one Set-Cookie, got {headers!r}"
    return parse_set_cookie(headers[0])


def assert_cookie_cleared(resp, secure=False):
    name, value, attributes = only_set_cookie(resp)
    expected = {"max-age": "0", "httponly": None, "samesite": "Lax", "path": "/"}
    if secure:
        expected["secure"] = None
    assert (name, value, attributes) == ("sid", "", expected)


class Browser:
    """One user agent: keeps its `sid` from Set-Cookie, sends it back, and on unsafe methods
    sends `Origin` (the server's own unless told otherwise) and the CSRF token it was given.
    Pass a header as None to leave it out."""

    def __init__(self, server, user_agent="test-browser/1.0"):
        self.url = server.url
        self.sid = None
        self.csrf = None
        self.user_agent = user_agent

    def request(self, method, path, **kw):
        headers = {"User-Agent": self.user_agent, **kw.pop("headers", {})}
        if self.sid:
            headers.setdefault("Cookie", f"sid={self.sid}")
        if method not in SAFE:
            headers.setdefault("Origin", self.url)
            if self.csrf:
                headers.setdefault("X-CSRF-Token", self.csrf)
        resp = requests.request(method, self.url + path, headers=headers, timeout=TIMEOUT, **kw)
        for header in set_cookie_headers(resp):
            name, value, attributes = parse_set_cookie(header)
            if name == "sid":
                self.sid = None if attributes.get("max-age") == "0" else value
        return resp

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def signed_in(self, resp, status):
        body = expect_json(resp, status)
        self.csrf = body["csrf_token"]
        return body

    def signup(self, email=None, password=PASSWORD):
        email = email or fresh_email()
        return self.signed_in(self.post("/auth/signup", json={"email": email, "password": password}), 201)

    def login(self, email, password=PASSWORD, form=False):
        body = {"email": email, "password": password}
        resp = self.post("/auth/login", **({"data": body} if form else {"json": body}))
        return self.signed_in(resp, 200)

    def sessions(self):
        return expect_json(self.get("/auth/sessions"), 200)["items"]


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *LOW_COST)


@pytest.fixture
def browser(server):
    return Browser(server)


def account(server, user_agent="test-browser/1.0"):
    """A new user, signed in, in a browser of its own: (browser, email)."""
    browser = Browser(server, user_agent)
    email = browser.signup()["user"]["email"]
    return browser, email


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# The cookie


def test_signup_sets_the_session_cookie_with_exact_attributes(browser):
    email = fresh_email("cookie")
    resp = browser.post("/auth/signup", json={"email": email, "password": PASSWORD})
    body = expect_json(resp, 201)
    name, value, attributes = only_set_cookie(resp)
    assert name == "sid"
    assert SID.fullmatch(value), f"session id {value!r}: not ≥ 128 bits of base64url"
    assert attributes == {"httponly": None, "samesite": "Lax", "path": "/"}, \
        "HttpOnly; SameSite=Lax; Path=/ and nothing else: no Secure without the flag, no Domain, " \
        "no Max-Age/Expires (a browser-session cookie)"
    assert set(body) == {"user", "session", "csrf_token"}
    assert body["user"]["email"] == email and set(body["user"]) == {"id", "email", "created_at"}
    assert resp.headers["Location"] == "/me"
    assert resp.headers["Cache-Control"] == "no-store"
    assert value not in resp.text, "the session id is only in the cookie"
    assert expect_json(browser.get("/me"), 200) == body["user"]


def test_login_sets_a_cookie_and_answers_the_csrf_token(server):
    browser, email = account(server)
    resp = Browser(server).post("/auth/login", json={"email": email, "password": PASSWORD})
    body = expect_json(resp, 200)
    name, value, attributes = only_set_cookie(resp)
    assert (name, attributes) == ("sid", {"httponly": None, "samesite": "Lax", "path": "/"})
    assert SID.fullmatch(value) and value != browser.sid
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", body["csrf_token"])
    assert body["session"]["current"] is True
    assert resp.headers["Cache-Control"] == "no-store"


def test_a_lone_surrogate_in_a_new_password_is_a_422_not_a_500(browser):
    resp = browser.post("/auth/signup", json={"email": fresh_email("surrogate"),
                                              "password": LONE_SURROGATE_PASSWORD})
    expect_lone_surrogate_refused(resp, "password")
    assert browser.sid is None, "no session for a refused signup"


def test_login_and_signup_accept_an_html_form(server):
    browser = Browser(server)
    email = fresh_email("form")
    resp = browser.post("/auth/signup", data={"email": email, "password": PASSWORD})
    assert expect_json(resp, 201)["user"]["email"] == email
    other = Browser(server)
    other.login(email, form=True)
    expect(other.get("/me"), 200)
    problem = expect_problem(Browser(server).post("/auth/signup", data={"email": fresh_email(),
                                                                       "password": "password123"}), 422)
    assert [e["field"] for e in problem["errors"]] == ["password"], "jwt_auth's policy applies"


def test_no_cookie_is_a_401_with_a_cookie_challenge_and_nothing_to_clear(browser):
    resp = browser.get("/me")
    expect_problem(resp, 401)
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Cookie ") and 'realm="session_auth"' in challenge
    assert "cookie-name=sid" in challenge
    assert set_cookie_headers(resp) == []


@pytest.mark.parametrize("sid", ["A" * 43, "not-a-session", "x" * 300])
def test_an_unknown_session_is_a_401_that_clears_the_cookie(browser, sid):
    browser.sid = sid
    resp = browser.get("/me")
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Cookie ")
    assert_cookie_cleared(resp)


def test_the_session_id_is_stored_only_as_its_sha256(server):
    browser, _ = account(server)
    with sqlite3.connect(server.db_path) as conn:
        rows = conn.execute("SELECT * FROM sessions").fetchall()
        hashes = {row[0] for row in conn.execute("SELECT id_hash FROM sessions")}
    assert sha256_hex(browser.sid) in hashes
    assert not any(browser.sid in str(value) for row in rows for value in row)


# --------------------------------------------------------------------------------------------
# Session fixation


def test_login_always_issues_a_new_id_and_the_old_one_dies(server):
    browser, email = account(server)
    before = browser.sid
    expect(browser.get("/me"), 200)
    browser.login(email)                       # sends the old cookie along, as a browser would
    assert browser.sid != before
    expect(browser.get("/me"), 200)
    old = Browser(server)
    old.sid = before
    resp = old.get("/me")
    expect_problem(resp, 401)
    assert_cookie_cleared(resp)


def test_a_planted_session_id_is_never_adopted(server):
    _, email = account(server)
    victim = Browser(server)
    planted = "attacker-chosen-" + "a" * 27            # the shape of a real id: 43 characters
    victim.sid = planted
    victim.login(email)
    assert victim.sid != planted
    attacker = Browser(server)
    attacker.sid = planted
    expect_problem(attacker.get("/me"), 401)
    for junk in ("é", "x" * 500, '"quoted"'):     # whatever a cookie holds, login still works
        other = Browser(server)
        other.sid = junk
        other.login(email)
        assert other.sid != junk


def test_an_attackers_own_session_planted_in_a_browser_dies_at_the_victims_login(server):
    attacker, _ = account(server)
    _, victim_email = account(server)
    planted = attacker.sid
    victim = Browser(server)
    victim.sid = planted
    victim.login(victim_email)
    assert expect_json(victim.get("/me"), 200)["email"] == victim_email
    expect_problem(attacker.get("/me"), 401)   # the id the browser had before is invalid


# --------------------------------------------------------------------------------------------
# CSRF: the token and the origin, on every unsafe route that uses the session


def unsafe_session_routes(browser):
    """Every non-GET operation of /openapi.json but signup and login, with a real path: the
    `{session_id}` of the browser's own session (a request that got through would end it)."""
    doc = expect_json(browser.get("/openapi.json"), 200)
    own = next(s["id"] for s in browser.sessions() if s["current"])
    routes = [(method.upper(), re.sub(r"\{[^}]+\}", own, path))
              for path, item in doc["paths"].items() for method in item
              if method.upper() not in SAFE and (method.upper(), path) not in PUBLIC]
    assert {m for m, _ in routes} >= {"POST", "DELETE"} and len(routes) >= 3, routes
    return routes


CSRF_CASES = {
    "no token": {"X-CSRF-Token": None},
    "empty token": {"X-CSRF-Token": ""},
    "wrong token": {"X-CSRF-Token": "A" * 43},
    "cross-site Origin": {"Origin": "https://evil.example"},
    "cross-site Origin, same host other port": {"Origin": "http://127.0.0.1:1"},
    "cross-site Origin, other scheme": {"Origin": "HTTPS-SAME"},
    "null Origin": {"Origin": "null"},
    "cross-site Referer without Origin": {"Origin": None, "Referer": "https://evil.example/page"},
}


@pytest.mark.parametrize("case", CSRF_CASES)
def test_every_unsafe_request_needs_the_token_and_our_origin(server, case):
    browser, _ = account(server)
    headers = dict(CSRF_CASES[case])
    if headers.get("Origin") == "HTTPS-SAME":
        headers["Origin"] = server.url.replace("http://", "https://")
    for method, path in unsafe_session_routes(browser):
        resp = browser.request(method, path, headers=headers)
        expect_problem(resp, 403)
        assert set_cookie_headers(resp) == [], f"{method} {path}: a refused request changes nothing"
    expect(browser.get("/me"), 200)
    assert len(browser.sessions()) == 1, "nothing was revoked"


def test_the_right_token_from_our_origin_goes_through(server):
    browser, _ = account(server)
    expect(browser.post("/auth/logout"), 204)        # Origin: the server's own, and the token


def test_our_origin_ignores_letter_case_and_a_referer_path(server):
    browser, _ = account(server)
    other, _ = account(server)
    host_port = server.url.removeprefix("http://")
    own = next(s["id"] for s in other.sessions() if s["current"])
    resp = other.delete(f"/auth/sessions/{own}", headers={"Origin": f"HTTP://{host_port.upper()}"})
    expect(resp, 204)
    resp = browser.post("/auth/logout", headers={"Origin": None,
                                                 "Referer": f"{server.url}/app?x=1"})
    expect(resp, 204)


def test_without_origin_or_referer_the_token_alone_decides(server):
    """curl and servers send neither header: the token is what guards them."""
    browser, _ = account(server)
    expect_problem(browser.post("/auth/logout", headers={"Origin": None, "X-CSRF-Token": None}), 403)
    expect(browser.post("/auth/logout", headers={"Origin": None}), 204)


def test_login_and_signup_from_another_site_are_refused(server):
    """Login CSRF: a forged login would sign the victim in to the attacker's account."""
    browser, email = account(server)
    evil = {"Origin": "https://evil.example"}
    resp = Browser(server).post("/auth/login", data={"email": email, "password": PASSWORD}, headers=evil)
    expect_problem(resp, 403)
    assert set_cookie_headers(resp) == []
    new_email = fresh_email("csrfsignup")
    resp = Browser(server).post("/auth/signup", json={"email": new_email, "password": PASSWORD},
                                headers=evil)
    expect_problem(resp, 403)
    Browser(server).signup(new_email)                 # no account was made by the forged one


def test_a_token_belongs_to_its_own_session(server):
    one, _ = account(server)
    two, _ = account(server)
    expect_problem(one.post("/auth/logout", headers={"X-CSRF-Token": two.csrf}), 403)
    expect(one.get("/me"), 200)


def test_get_auth_session_gives_a_reloaded_page_its_token(server):
    browser, email = account(server)
    body = expect_json(browser.get("/auth/session"), 200)
    assert body["csrf_token"] == browser.csrf
    assert body["user"]["email"] == email and body["session"]["current"] is True


# --------------------------------------------------------------------------------------------
# The session list and revocation


def test_the_session_list_shows_where_and_when_and_never_the_id(server):
    laptop, email = account(server, "Laptop/1.0")
    phone = Browser(server, "Phone/2.0 <script>alert(1)</script>")
    phone.login(email)
    resp = laptop.get("/auth/sessions")
    items = expect_json(resp, 200)["items"]
    assert resp.headers["Cache-Control"] == "no-store"
    assert [s["user_agent"] for s in items] == ["Phone/2.0 <script>alert(1)</script>", "Laptop/1.0"]
    assert [s["current"] for s in items] == [False, True]
    for session in items:
        assert set(session) == {"id", "created_at", "last_seen_at", "idle_expires_at",
                                "expires_at", "user_agent", "ip", "current"}
        assert re.fullmatch(r"[0-9a-f]{16}", session["id"])
        assert session["ip"] == "127.0.0.1"
        for field in ("created_at", "last_seen_at", "idle_expires_at", "expires_at"):
            assert RFC3339_UTC.fullmatch(session[field])
    for secret in (laptop.sid, phone.sid, laptop.csrf, phone.csrf, sha256_hex(laptop.sid)):
        assert secret not in resp.text
    assert [s["current"] for s in phone.sessions()] == [True, False]


def test_the_session_list_pages_with_a_cursor(server):
    browser, email = account(server)
    for _ in range(2):
        Browser(server).login(email)
    first = expect_json(browser.get("/auth/sessions?limit=2"), 200)
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = expect_json(browser.get(f"/auth/sessions?limit=2&cursor={first['next_cursor']}"), 200)
    assert len(second["items"]) == 1 and second["next_cursor"] is None
    assert second["items"][0]["current"] is True     # the oldest: the signup
    expect_problem(browser.get("/auth/sessions?cursor=garbage"), 400)
    expect_problem(browser.get("/auth/sessions?limit=0"), 400)


def test_revoking_another_session_makes_its_next_request_401(server):
    laptop, email = account(server)
    phone = Browser(server)
    phone.login(email)
    expect(phone.get("/me"), 200)
    other = next(s["id"] for s in laptop.sessions() if not s["current"])
    resp = laptop.delete(f"/auth/sessions/{other}")
    expect(resp, 204)
    assert set_cookie_headers(resp) == [], "the laptop keeps its own cookie"
    resp = phone.get("/me")
    expect_problem(resp, 401)
    assert_cookie_cleared(resp)
    expect(laptop.get("/me"), 200)
    expect_problem(laptop.delete(f"/auth/sessions/{other}"), 404)   # already gone


def test_revoking_the_current_session_logs_out(server):
    browser, _ = account(server)
    own = next(s["id"] for s in browser.sessions() if s["current"])
    sid = browser.sid
    resp = browser.delete(f"/auth/sessions/{own}")
    expect(resp, 204)
    assert_cookie_cleared(resp)
    browser.sid = sid
    expect_problem(browser.get("/me"), 401)


def test_someone_elses_session_is_not_yours_to_revoke(server):
    mallory, _ = account(server)
    alice, _ = account(server)
    alices = next(s["id"] for s in alice.sessions() if s["current"])
    expect_problem(mallory.delete(f"/auth/sessions/{alices}"), 404)
    expect(alice.get("/me"), 200)
    expect_problem(mallory.delete("/auth/sessions/0123456789abcdef"), 404)
    problem = expect_problem(mallory.delete("/auth/sessions/NOT-A-SESSION-ID"), 400)
    assert problem["errors"][0]["field"] == "session_id"


# --------------------------------------------------------------------------------------------
# Logout


def test_logout_deletes_the_session_on_the_server(server):
    browser, _ = account(server)
    sid = browser.sid
    resp = browser.post("/auth/logout")
    expect(resp, 204)
    assert_cookie_cleared(resp)
    replay = Browser(server)
    replay.sid = sid                               # the cookie kept by someone who copied it
    resp = replay.get("/me")
    expect_problem(resp, 401)
    assert_cookie_cleared(resp)
    with sqlite3.connect(server.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions WHERE id_hash = ?",
                            (sha256_hex(sid),)).fetchone() == (0,)


def test_logout_all_ends_every_session_of_the_user(server):
    laptop, email = account(server)
    phone = Browser(server)
    phone.login(email)
    bystander, _ = account(server)
    resp = laptop.post("/auth/logout-all")
    expect(resp, 204)
    assert_cookie_cleared(resp)
    laptop_sid = resp.request.headers["Cookie"].removeprefix("sid=")
    for sid in (laptop_sid, phone.sid):
        again = Browser(server)
        again.sid = sid
        expect_problem(again.get("/me"), 401)
    expect(bystander.get("/me"), 200)


# --------------------------------------------------------------------------------------------
# Login failures: imported from jwt_auth


def test_unknown_email_and_wrong_password_get_the_same_401(server):
    _, email = account(server)
    wrong = Browser(server).post("/auth/login", json={"email": email, "password": "not the password"})
    unknown = Browser(server).post("/auth/login", json={"email": fresh_email("nobody"),
                                                        "password": "not the password"})
    expect_problem(wrong, 401)
    expect_problem(unknown, 401)
    assert wrong.json() == unknown.json()
    assert wrong.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]
    assert wrong.headers["WWW-Authenticate"].startswith("Cookie ")
    assert set_cookie_headers(wrong) == set_cookie_headers(unknown) == []


def test_five_failures_lock_the_email_with_retry_after(server):
    _, email = account(server)
    for _ in range(5):
        expect_problem(Browser(server).post("/auth/login", data={"email": email,
                                                                 "password": "wrong guess!"}), 401)
    resp = Browser(server).post("/auth/login", data={"email": email, "password": PASSWORD})
    expect_problem(resp, 429)
    assert 0 < int(resp.headers["Retry-After"]) <= 900
    assert set_cookie_headers(resp) == []


# --------------------------------------------------------------------------------------------
# The request bodies in /openapi.json: jwt_auth's fields, JSON or a form


def test_openapi_describes_signup_and_login_exactly(server):
    bodies = request_bodies(server.url)
    assert {route: schema for route, (schema, _) in bodies.items()} == {
        ("POST", "/auth/signup"): SIGN_UP_BODY, ("POST", "/auth/login"): LOGIN_BODY}
    assert bodies[("POST", "/auth/login")][1] == {}
    descriptions = bodies[("POST", "/auth/signup")][1]
    assert list(descriptions) == ["password"]
    assert_policy_described(descriptions["password"])


def test_the_schemas_are_what_the_server_checks(server):
    bodies = request_bodies(server.url)
    check_bodies_name_their_fields(
        bodies, lambda method, path, body: Browser(server).request(method, path, json=body))
    sign_up = bodies[("POST", "/auth/signup")][0]
    check_password_bounds(sign_up, "password", lambda password: Browser(server).post(
        "/auth/signup", json={"email": fresh_email("len"), "password": password}), 201)
    # The form takes the same fields, under the same rules.
    short = password_of_length(sign_up["properties"]["password"]["minLength"] - 1)
    problem = expect_problem(Browser(server).post("/auth/signup", data={"email": fresh_email("len"),
                                                                        "password": short}), 422)
    assert [e["field"] for e in problem["errors"]] == ["password"]


# --------------------------------------------------------------------------------------------
# Timeouts


@pytest.fixture(scope="module")
def short_server(start_server_module):
    return start_server_module(SCRIPT, *LOW_COST, "--idle-ttl", "1", "--absolute-ttl", "3")


def test_an_idle_session_ends_after_idle_ttl(short_server):
    browser, _ = account(short_server)
    expect(browser.get("/me"), 200)
    time.sleep(1.3)
    resp = browser.get("/me")
    expect_problem(resp, 401)
    assert_cookie_cleared(resp)


def test_use_slides_the_idle_timeout_but_not_the_absolute_one(short_server):
    started = time.monotonic()
    browser, _ = account(short_server)
    sid = browser.sid
    last_ok = None
    while time.monotonic() - started < 6:
        resp = browser.get("/me")
        if resp.status_code != 200:
            break
        last_ok = time.monotonic() - started
        time.sleep(0.3)
    ended = time.monotonic() - started
    expect_problem(resp, 401)
    assert_cookie_cleared(resp)
    assert last_ok is not None and last_ok > 2.0, "activity kept it alive past the 1 s idle timeout"
    assert 2.9 <= ended <= 4.5, f"ended {ended:.1f} s after login, not at the 3 s absolute timeout"
    again = Browser(short_server)
    again.sid = sid
    expect_problem(again.get("/me"), 401)


def test_timeouts_must_be_at_least_a_second():
    for flag in ("--idle-ttl", "--absolute-ttl"):
        done = run_once(SCRIPT, flag, "0", "--port", "0")
        assert done.returncode == 2 and "usage" in done.stderr.lower(), done.stderr


# --------------------------------------------------------------------------------------------
# --secure-cookies and --public-url


def test_secure_cookies_mark_both_setting_and_clearing_and_expect_https(start_server):
    server = start_server(SCRIPT, *LOW_COST, "--secure-cookies")
    browser = Browser(server)
    https_origin = server.url.replace("http://", "https://")
    resp = browser.post("/auth/signup", json={"email": fresh_email("secure"), "password": PASSWORD},
                        headers={"Origin": https_origin})
    browser.signed_in(resp, 201)
    _, _, attributes = only_set_cookie(resp)
    assert attributes == {"httponly": None, "samesite": "Lax", "path": "/", "secure": None}
    # Secure cookies reach us only over HTTPS (a proxy in front): our origin is https://Host.
    expect_problem(browser.post("/auth/logout", headers={"Origin": server.url}), 403)
    resp = browser.post("/auth/logout", headers={"Origin": https_origin})
    expect(resp, 204)
    assert_cookie_cleared(resp, secure=True)


def test_public_url_defines_our_origin(start_server):
    server = start_server(SCRIPT, *LOW_COST, "--public-url", "https://app.example.test/")
    browser = Browser(server)
    public = {"Origin": "https://app.example.test"}
    browser.signed_in(browser.post("/auth/signup", json={"email": fresh_email("pub"),
                                                         "password": PASSWORD}, headers=public), 201)
    expect_problem(browser.post("/auth/logout", headers={"Origin": server.url}), 403)
    expect(browser.post("/auth/logout", headers={"Origin": "https://app.example.test:443"}), 204)


@pytest.mark.parametrize("url", ["ftp://example.com", "example.com", "https://", "http://x:99999"])
def test_a_bad_public_url_exits_2(url):
    done = run_once(SCRIPT, "--public-url", url, "--port", "0")
    assert done.returncode == 2 and "usage" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# The page


def test_app_is_html_under_a_strict_csp_that_allows_exactly_its_own_script(server):
    resp = requests.get(server.url + "/app", timeout=TIMEOUT)
    expect(resp, 200, content_type="text/html")
    html = resp.text
    csp = {d.split()[0]: d.split()[1:] for d in resp.headers["Content-Security-Policy"].split("; ")}
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == 1 and len(styles) == 1

    def sha(text):
        return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"

    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == [sha(scripts[0])], "the CSP hash must match the inline script"
    assert csp["style-src"] == [sha(styles[0])]
    assert csp["connect-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # no external assets, nothing the CSP would refuse
    assert not re.search(r"\b(?:src|href)=", html) and "//" not in re.sub(r"<script>.*</script>", "", html, flags=re.S)
    assert " style=" not in html and "onclick" not in html.lower()
    # the login form, and the signed-in view
    assert re.search(r'<form[^>]*method="post"[^>]*action="/auth/login"', html)
    assert 'name="email"' in html and 'name="password"' in html and 'type="password"' in html
    assert "Signed in as" in html and 'id="sessions"' in html and 'id="logout"' in html
    # the script: cookies same-origin, the CSRF header, and text, never HTML
    script = scripts[0]
    assert 'credentials: "same-origin"' in script
    assert '"X-CSRF-Token"' in script and "csrf_token" in script
    assert "/auth/session" in script and "/auth/sessions" in script and "/auth/logout" in script
    assert "textContent" in script
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    assert "localStorage" not in script and "document.cookie" not in script


def test_the_page_asks_for_the_session_only_when_there_is_a_cookie(server):
    """Signed out, asking GET /auth/session costs a 401, which a browser's console shows as an
    error on every visit: the page tells its script whether a sid cookie came with it."""
    signed_out = expect(requests.get(server.url + "/app", timeout=TIMEOUT), 200)
    assert "<body data-signed-out>" in signed_out.text
    browser, _ = account(server)
    signed_in = expect(browser.get("/app"), 200)
    assert "<body>" in signed_in.text and "data-signed-out" not in signed_in.text.split("<script>")[0]
    assert "Cookie" in signed_in.headers.get("Vary", "")


def test_the_pages_flow_with_a_real_cookie_jar(server):
    """What the page's script does, step by step, with requests' cookie jar in place of the
    browser's: GET /auth/session, a form login, the list, a revoke, logout."""
    _, email = account(server)
    jar = requests.Session()
    origin = {"Origin": server.url}
    expect(jar.get(server.url + "/app", timeout=TIMEOUT), 200)
    expect_problem(jar.get(server.url + "/auth/session", timeout=TIMEOUT), 401)
    resp = jar.post(server.url + "/auth/login", data={"email": email, "password": PASSWORD},
                    headers=origin, timeout=TIMEOUT)
    token = expect_json(resp, 200)["csrf_token"]
    assert jar.cookies.get("sid")
    session = expect_json(jar.get(server.url + "/auth/session", timeout=TIMEOUT), 200)
    assert session["csrf_token"] == token and session["user"]["email"] == email
    items = expect_json(jar.get(server.url + "/auth/sessions?limit=100", timeout=TIMEOUT), 200)["items"]
    other = next(s["id"] for s in items if not s["current"])
    with_token = {**origin, "X-CSRF-Token": token}
    expect(jar.delete(f"{server.url}/auth/sessions/{other}", headers=with_token, timeout=TIMEOUT), 204)
    expect_problem(jar.post(server.url + "/auth/logout", headers=origin, timeout=TIMEOUT), 403)
    expect(jar.post(server.url + "/auth/logout", headers=with_token, timeout=TIMEOUT), 204)
    assert jar.cookies.get("sid") is None, "Max-Age=0 removed the cookie from the jar"
    expect_problem(jar.get(server.url + "/me", timeout=TIMEOUT), 401)


# --------------------------------------------------------------------------------------------
# Restart, and secrets kept out of the log


def test_sessions_survive_a_restart(start_server, tmp_path):
    db = tmp_path / "sessions.sqlite3"
    first = start_server(SCRIPT, *LOW_COST, "--db", db)
    browser = Browser(first)
    browser.signup()
    first.stop()
    second = start_server(SCRIPT, *LOW_COST, "--db", db)
    browser.url = second.url
    expect(browser.get("/me"), 200)
    expect(browser.post("/auth/logout", headers={"Origin": second.url}), 204)


def test_no_secret_reaches_the_log_or_the_trace(start_server):
    server = start_server(SCRIPT, *LOW_COST, "--trace")
    browser = Browser(server)
    email = fresh_email("quiet")
    first = browser.signup(email)
    first_sid = browser.sid
    browser.login(email, form=True)
    expect_problem(Browser(server).post("/auth/login", json={"email": email,
                                                             "password": "a wrong password guess"}), 401)
    expect(browser.get("/me"), 200)
    expect(browser.get("/auth/sessions"), 200)
    expect_problem(browser.post("/auth/logout", headers={"X-CSRF-Token": "wrong-token-guess"}), 403)
    expect_problem(browser.post("/auth/logout", headers={"Origin": "https://evil.example"}), 403)
    stale = Browser(server)
    stale.sid = first_sid
    expect_problem(stale.get("/me"), 401)
    with sqlite3.connect(server.db_path) as conn:
        (password_hash,) = conn.execute("SELECT password_hash FROM users").fetchone()
    second_sid, second_csrf = browser.sid, browser.csrf
    expect(browser.post("/auth/logout"), 204)
    server.stop()
    log = server.stderr_text()
    assert "trace " in log and "SQL" in log and "POST /auth/login" in log, "the trace ran"
    secrets_ = {"password": PASSWORD, "wrong guess": "a wrong password guess",
                "first session id": first_sid, "second session id": second_sid,
                "first csrf token": first["csrf_token"], "second csrf token": second_csrf,
                "wrong csrf guess": "wrong-token-guess",
                "first id hash": sha256_hex(first_sid), "second id hash": sha256_hex(second_sid),
                "password hash": password_hash, "hash salt": password_hash.split("$")[4]}
    for name, value in secrets_.items():
        assert value not in log, f"the {name} appears in stderr"
    assert server.stdout_text() == ""
