"""level03/jwt_auth.py, black-box: signup, login, HS256 tokens, refresh rotation, the lockout.

Tokens are checked the way a standard JWT library would: the test decodes, verifies and mints
HS256 tokens with its own hmac/hashlib/base64 code and the secret it gave the server (`--secret`
or `JWT_SECRET`), so the server's encoding must be the standard one, byte for byte.

Most tests share one module server (a low `--scrypt-n` for speed), each on emails of its own.
Tests whose point is a restart, a flag or the log start their own. Reading the sqlite file is
allowed where the point is a stored effect (the hash format, re-hashing on a cost change).
"""
import base64
import hashlib
import hmac
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import unicodedata
import uuid

import pytest
import requests

from tests.harness import ROOT, clean_env, expect, expect_json, expect_problem, run_once
from tests.level03.accounts import (GIVEN_PASSWORD_SCHEMA, LONE_SURROGATE_PASSWORD, LOW_COST,
                                    NEW_PASSWORD_SCHEMA, PASSWORD, TIMEOUT, TOKEN_ROUTE_BODIES,
                                    AccountClient, assert_policy_described, body_schema,
                                    check_bodies_name_their_fields, check_password_bounds,
                                    expect_lone_surrogate_refused, fresh_email, request_bodies)

SCRIPT = "level03/jwt_auth.py"
SECRET = "test-secret-0123456789-abcdefghijklmnop"      # ≥ 32 bytes
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


# --------------------------------------------------------------------------------------------
# JWT by hand, independent of the server's code (RFC 7515 / 7519)


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text):
    assert "=" not in text, f"base64url with padding: {text!r}"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_raw(header_bytes, claims_bytes, secret=SECRET, digest=hashlib.sha256):
    signing_input = f"{b64u(header_bytes)}.{b64u(claims_bytes)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64u(signature)}"


def mint(claims, secret=SECRET, header=None, digest=hashlib.sha256):
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    return sign_raw(json.dumps(header).encode(), json.dumps(claims).encode(), secret, digest)


def claims_for(user_id, **changes):
    now = int(time.time())
    claims = {"iss": "jwt_auth", "aud": "jwt_auth", "sub": str(user_id), "iat": now,
              "exp": now + 300, "jti": uuid.uuid4().hex}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def decode_and_verify(token, secret=SECRET):
    """(header, claims) after checking the HS256 signature the way PyJWT does."""
    header_part, claims_part, signature_part = token.split(".")
    expected = hmac.new(secret.encode(), f"{header_part}.{claims_part}".encode(),
                        hashlib.sha256).digest()
    assert hmac.compare_digest(b64u_decode(signature_part), expected), "HS256 signature mismatch"
    return json.loads(b64u_decode(header_part)), json.loads(b64u_decode(claims_part))


# --------------------------------------------------------------------------------------------
# Talking to the server


class Client(AccountClient):
    def me(self, token=None, authorization=None):
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if authorization is not None:
            headers["Authorization"] = authorization
        return self.http.get(self.url + "/me", headers=headers, timeout=TIMEOUT)

    def refresh(self, refresh_token):
        return self.post("/auth/refresh", {"refresh_token": refresh_token})

    def account(self, prefix="u"):
        """A new user, logged in: (user, tokens)."""
        email = fresh_email(prefix)
        user = self.signup(email)
        return user, self.login(email)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--secret", SECRET, *LOW_COST)


@pytest.fixture
def client(server):
    return Client(server)


def expect_invalid_token(resp):
    problem = expect_problem(resp, 401)
    challenge = resp.headers.get("WWW-Authenticate", "")
    assert re.fullmatch(r'Bearer error="invalid_token", error_description="[\x20\x21\x23-\x5b\x5d-\x7e]+"',
                        challenge), f"RFC 6750 challenge expected, got {challenge!r}"
    return problem


def stored_hash(db_path, email):
    with sqlite3.connect(db_path) as conn:
        (value,) = conn.execute("SELECT password_hash FROM users WHERE email = ?", (email,)).fetchone()
    return value


# --------------------------------------------------------------------------------------------
# Signup: email rules and the password policy


def test_signup_answers_the_user_and_nothing_secret(client):
    local = f"Ada.Lovelace-{uuid.uuid4().hex[:8]}"
    resp = client.post("/auth/signup", {"email": f"  {local}@ExAmple.COM ", "password": PASSWORD})
    user = expect_json(resp, 201)
    assert set(user) == {"id", "email", "created_at"}
    assert user["email"] == f"{local}@example.com", "trimmed, domain lower-cased, local part kept"
    assert isinstance(user["id"], int)
    assert RFC3339_UTC.fullmatch(user["created_at"])
    assert resp.headers.get("Location")
    assert PASSWORD not in resp.text and "scrypt" not in resp.text
    client.login(f"{local.lower()}@example.com")  # the same account in any case


def test_emails_are_unique_in_any_case(client):
    email = fresh_email("dup")
    client.signup(email)
    problem = expect_problem(client.post("/auth/signup", {"email": email.upper(),
                                                          "password": PASSWORD}), 409)
    assert "exists" in problem["detail"]


def fullwidth(text):
    """ASCII letters and digits as their fullwidth forms (U+FF01…): `a` → `ａ`."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def test_unicode_equal_emails_are_one_account(client):
    """`é` is one code point (NFC) or `e` and a combining accent (NFD): one address either way,
    as a keyboard, a phone or a copy-paste may send it. Fullwidth letters are a compatibility
    form of the same letters: folded into the same account or refused, never a second one."""
    local = f"josé.{uuid.uuid4().hex[:8]}"
    composed = unicodedata.normalize("NFC", f"{local}@example.com")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    client.signup(composed)
    problem = expect_problem(client.post("/auth/signup", {"email": decomposed,
                                                          "password": PASSWORD}), 409)
    assert "exists" in problem["detail"]
    client.login(composed)
    client.login(decomposed)
    wide = f"{fullwidth(local)}@example.com"
    resp = client.post("/auth/signup", {"email": wide, "password": PASSWORD})
    assert resp.status_code in (409, 422), \
        f"a fullwidth spelling of {composed} signed up as a second account: {resp.status_code}"
    if resp.status_code == 409:                            # folded: the same account
        client.login(wide)


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com",
                                   "x@-bad.example.com", "", 42])
def test_insane_email_is_a_422_naming_email(client, email):
    problem = expect_problem(client.post("/auth/signup", {"email": email, "password": PASSWORD}), 422)
    assert [e["field"] for e in problem["errors"]] == ["email"]


def test_every_bad_field_is_named_at_once(client):
    problem = expect_problem(client.post("/auth/signup", {"email": "nope", "password": "short",
                                                          "role": "admin"}), 422)
    assert {e["field"] for e in problem["errors"]} == {"email", "password", "role"}


@pytest.mark.parametrize("password", [
    pytest.param("seven77", id="7-chars"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("password123", id="common"),
    pytest.param("Password123", id="common-any-case"),
    pytest.param("qwertyuiop", id="common-keyboard"),
    pytest.param("12345678", id="common-digits"),
])
def test_password_policy_refuses(client, password):
    problem = expect_problem(client.post("/auth/signup", {"email": fresh_email("pol"),
                                                          "password": password}), 422)
    assert [e["field"] for e in problem["errors"]] == ["password"], problem


def test_password_equal_to_the_email_is_refused(client):
    email = fresh_email("same")
    problem = expect_problem(client.post("/auth/signup", {"email": email, "password": email.upper()}),
                             422)
    assert [e["field"] for e in problem["errors"]] == ["password"]


@pytest.mark.parametrize("password", [
    pytest.param("x" * 8, id="8-chars"),
    pytest.param("y" * 128, id="128-chars"),
    pytest.param("  spaces are fine  ", id="spaces-kept"),
    pytest.param("пароль-🐎-パスワード", id="unicode"),
    pytest.param("nouppercaseordigits", id="no-composition-rules"),
])
def test_password_policy_accepts(client, password):
    email = fresh_email("ok")
    client.signup(email, password)
    client.login(email, password)  # exactly as given: not trimmed


def test_a_lone_surrogate_in_a_new_password_is_a_422_not_a_500(client):
    email = fresh_email("surrogate")
    expect_lone_surrogate_refused(client.post("/auth/signup", {"email": email,
                                                               "password": LONE_SURROGATE_PASSWORD}),
                                  "password")
    user, tokens = client.account("surrogate")
    expect_lone_surrogate_refused(client.post("/auth/password", {
        "current_password": PASSWORD, "new_password": LONE_SURROGATE_PASSWORD},
        tokens["access_token"]), "new_password")
    client.login(user["email"])                             # the password did not change


def test_passwords_are_stored_with_scrypt_and_a_salt_each(server, client):
    first, second = fresh_email("salt"), fresh_email("salt")
    client.signup(first)
    client.signup(second)
    a, b = stored_hash(server.db_path, first), stored_hash(server.db_path, second)
    assert re.fullmatch(r"scrypt\$1024\$8\$5\$[A-Za-z0-9_-]{22}\$[A-Za-z0-9_-]{43}", a), a
    assert a.split("$")[4] != b.split("$")[4], "the same salt twice"
    assert a.split("$")[5] != b.split("$")[5]


# --------------------------------------------------------------------------------------------
# Login and the token: header, claims, encoding


def test_login_answers_a_bearer_pair_that_is_not_cached(client):
    email = fresh_email("login")
    client.signup(email)
    resp = client.login_response(email)
    body = expect_json(resp, 200)
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", body["refresh_token"]), "≥ 256 bits, URL-safe"
    assert "no-store" in resp.headers.get("Cache-Control", "")


def test_access_token_has_the_exact_header_and_claims(client):
    user, tokens = client.account("claims")
    token = tokens["access_token"]
    assert token.count(".") == 2 and "=" not in token
    header, claims = decode_and_verify(token)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert set(claims) == {"iss", "aud", "sub", "iat", "exp", "jti"}
    assert claims["iss"] == "jwt_auth" and claims["aud"] == "jwt_auth"
    assert claims["sub"] == str(user["id"])
    assert isinstance(claims["iat"], int) and claims["exp"] - claims["iat"] == 900
    assert abs(claims["iat"] - time.time()) < 60
    assert isinstance(claims["jti"], str) and claims["jti"]
    other = client.login(user["email"])["access_token"]
    assert decode_and_verify(other)[1]["jti"] != claims["jti"], "jti must be unique"


def test_me_with_the_servers_token(client):
    user, tokens = client.account("me")
    assert expect_json(client.me(tokens["access_token"]), 200) == user


def test_a_standard_token_minted_elsewhere_is_accepted(client):
    user, _ = client.account("minted")
    assert expect_json(client.me(mint(claims_for(user["id"]))), 200)["id"] == user["id"]
    # aud may be an array (RFC 7519 §4.1.3); typ is optional; claims come in any order
    token = mint({"aud": ["other", "jwt_auth"], "exp": int(time.time()) + 60,
                  "sub": str(user["id"]), "iss": "jwt_auth"}, header={"alg": "HS256"})
    assert expect_json(client.me(token), 200)["id"] == user["id"]


def test_leeway_of_30_seconds(client):
    user, _ = client.account("leeway")
    now = int(time.time())
    expect(client.me(mint(claims_for(user["id"], exp=now - 10))), 200)
    expect(client.me(mint(claims_for(user["id"], nbf=now + 10))), 200)
    expect_invalid_token(client.me(mint(claims_for(user["id"], exp=now - 45))))
    expect_invalid_token(client.me(mint(claims_for(user["id"], nbf=now + 45))))


# --------------------------------------------------------------------------------------------
# Every rejection: 401 with the RFC 6750 challenge


def rejected_tokens(uid):
    """Tokens that must be refused, by name. Each names a real user (`uid`) and differs from
    an accepted token only in the flaw under test."""
    now = int(time.time())
    good = lambda **changes: claims_for(uid, **changes)  # noqa: E731
    token = mint(good())
    head, body, signature = token.split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    unsigned = b64u(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." + body + "."
    return {
        "alg-none": unsigned,
        "alg-none-signed": mint(good(), header={"alg": "none", "typ": "JWT"}),
        "alg-None-case": mint(good(), header={"alg": "None"}),
        "alg-HS512": mint(good(), header={"alg": "HS512", "typ": "JWT"}, digest=hashlib.sha512),
        "alg-RS256": mint(good(), header={"alg": "RS256", "typ": "JWT"}),
        "alg-missing": mint(good(), header={"typ": "JWT"}),
        "alg-duplicated": sign_raw(b'{"alg":"HS256","alg":"none"}', json.dumps(good()).encode()),
        "wrong-secret": mint(good(), secret="another-secret-of-at-least-32-bytes!!"),
        "bad-signature": f"{head}.{body}.{flipped}",
        "no-signature": f"{head}.{body}.",
        "claims-tampered": f"{head}.{b64u(json.dumps(claims_for(uid + 1)).encode())}.{signature}",
        "bad-base64url": f"{head}.{body[:5]}*{body[5:]}.{signature}",
        "padded-base64url": f"{head}.{body}.{signature}=",
        "bad-json-header": sign_raw(b"{not json", json.dumps(good()).encode()),
        "bad-json-claims": sign_raw(b'{"alg":"HS256","typ":"JWT"}', b"{not json"),
        "claims-not-object": sign_raw(b'{"alg":"HS256","typ":"JWT"}', b'["sub"]'),
        "exp-missing": mint(good(exp=None)),
        "exp-not-a-number": mint(good(exp="tomorrow")),
        "exp-expired": mint(good(iat=now - 1000, exp=now - 100)),
        "nbf-future": mint(good(nbf=now + 600)),
        "iss-wrong": mint(good(iss="someone-else")),
        "iss-missing": mint(good(iss=None)),
        "aud-wrong": mint(good(aud="another-api")),
        "aud-missing": mint(good(aud=None)),
        "sub-unknown-user": mint(claims_for(987654321)),
        "sub-missing": mint(good(sub=None)),
        "two-parts": f"{head}.{body}",
        "four-parts": f"{token}.{signature}",
        "garbage": "not-a-token",
    }


@pytest.mark.parametrize("case", list(rejected_tokens(1)))
def test_bad_tokens_are_401_with_the_rfc6750_challenge(client, case):
    user = client.signup(fresh_email("reject"))
    expect(client.me(mint(claims_for(user["id"]))), 200)  # the control: a good token passes
    resp = client.me(rejected_tokens(user["id"])[case])
    problem = expect_invalid_token(resp)
    assert problem["detail"] and "Traceback" not in resp.text


@pytest.mark.parametrize("sub, description", [
    (None, "the token has no sub"),
    (7, "the token sub is not a non-empty string"),
    ("", "the token sub is not a non-empty string"),
])
def test_a_bad_sub_is_described_as_it_is(client, sub, description):
    user = client.signup(fresh_email("sub"))
    resp = client.me(mint(claims_for(user["id"], sub=sub)))
    expect_invalid_token(resp)
    assert f'error_description="{description}"' in resp.headers["WWW-Authenticate"]


def test_empty_bearer_token_is_an_invalid_token(client):
    expect_invalid_token(client.me(authorization="Bearer "))
    expect_invalid_token(client.me(authorization="Bearer two words"))


def test_missing_token_is_401_with_a_bare_bearer_challenge(client):
    resp = client.me()
    expect_problem(resp, 401)
    assert resp.headers.get("WWW-Authenticate") == "Bearer"
    resp = client.me(authorization="Basic dXNlcjpwYXNz")  # another scheme: no bearer token
    expect_problem(resp, 401)
    assert resp.headers.get("WWW-Authenticate") == "Bearer"


def test_bearer_scheme_is_case_insensitive(client):
    user, tokens = client.account("scheme")
    expect(client.me(authorization=f"bearer {tokens['access_token']}"), 200)


def test_a_token_over_8_kib_never_gets_in(client, server):
    """A bearer token over 8 KiB cannot even arrive: the header line limit (common.md: 8 KiB a
    line → 431) refuses it before any auth code runs. The server keeps serving."""
    user, _ = client.account("big")
    token = mint(claims_for(user["id"], pad="x" * 7000))
    assert len(token) > 8 * 1024
    expect_problem(client.me(token), 431)
    expect(requests.get(server.url + "/health", timeout=TIMEOUT), 200)


def test_verify_token_refuses_a_token_over_8_kib():
    """The limit itself, on the pure function (a token may come from elsewhere than a header,
    e.g. in a project that imports verify_token): run in a subprocess, as a learner would."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from level03.jwt_auth import verify_token, InvalidToken\n"
        "try:\n    verify_token('a' * 8193, b'k' * 32, issuer='i', audience='a')\n"
        "except InvalidToken as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                          timeout=30, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert "too large" in done.stdout


# --------------------------------------------------------------------------------------------
# Refresh tokens: rotation, reuse detection, logout, password change


def test_refresh_rotates_and_the_old_token_dies(client):
    user, tokens = client.account("rot")
    first = tokens["refresh_token"]
    pair = expect_json(client.refresh(first), 200)
    assert set(pair) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert pair["refresh_token"] != first
    assert decode_and_verify(pair["access_token"])[1]["sub"] == str(user["id"])
    expect(client.me(pair["access_token"]), 200)
    second = expect_json(client.refresh(pair["refresh_token"]), 200)["refresh_token"]
    assert second not in (first, pair["refresh_token"])


def test_reusing_a_rotated_refresh_token_revokes_the_whole_family(client):
    _, tokens = client.account("reuse")
    old = tokens["refresh_token"]
    newer = expect_json(client.refresh(old), 200)["refresh_token"]
    resp = client.refresh(old)  # a thief (or the user) presents the retired one
    expect_problem(resp, 401)
    assert resp.headers.get("WWW-Authenticate")
    expect_problem(client.refresh(newer), 401)  # the legitimate newest one is dead too


def test_reuse_revokes_only_that_family(client):
    user, tokens = client.account("fam")
    other_family = client.login(user["email"])["refresh_token"]
    old = tokens["refresh_token"]
    expect(client.refresh(old), 200)
    expect(client.refresh(old), 401)
    expect(client.refresh(other_family), 200)


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_concurrent_refreshes_of_one_token_give_one_new_pair(start_server, transport):
    client = Client(start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--server", transport))
    _, tokens = client.account("race")
    results = []
    barrier = threading.Barrier(6)

    def attempt():
        session = Client.__new__(Client)
        session.url, session.http = client.url, requests.Session()
        barrier.wait()
        results.append(session.refresh(tokens["refresh_token"]).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [401] * 5, results


def test_unknown_refresh_token_is_401(client):
    expect_problem(client.refresh("x" * 43), 401)
    expect_problem(client.post("/auth/refresh", {}), 422)


def test_logout_revokes_the_family(client):
    user, tokens = client.account("logout")
    other = client.login(user["email"])["refresh_token"]
    rotated = expect_json(client.refresh(tokens["refresh_token"]), 200)["refresh_token"]
    resp = client.post("/auth/logout", {"refresh_token": rotated})
    expect(resp, 204)
    assert resp.content == b""
    expect_problem(client.refresh(rotated), 401)
    expect(client.refresh(other), 200)  # another device's login is untouched
    expect(client.post("/auth/logout", {"refresh_token": "never-issued"}), 204)


def test_password_change_revokes_every_refresh_token(client):
    user, tokens = client.account("pwchange")
    second = client.login(user["email"])
    new_password = "a brand new passphrase"
    resp = client.post("/auth/password", {"current_password": PASSWORD,
                                          "new_password": new_password}, token=tokens["access_token"])
    expect(resp, 204)
    expect_problem(client.refresh(tokens["refresh_token"]), 401)
    expect_problem(client.refresh(second["refresh_token"]), 401)
    expect_problem(client.login_response(user["email"]), 401)
    client.login(user["email"], new_password)


def test_password_change_checks_the_current_password_and_the_policy(client):
    user, tokens = client.account("pwcheck")
    token = tokens["access_token"]
    expect_problem(client.post("/auth/password", {"current_password": "wrong one!",
                                                  "new_password": "another fine one"}, token), 403)
    problem = expect_problem(client.post("/auth/password", {"current_password": PASSWORD,
                                                            "new_password": "password1"}, token), 422)
    assert [e["field"] for e in problem["errors"]] == ["new_password"]
    problem = expect_problem(client.post("/auth/password", {"current_password": PASSWORD,
                                                            "new_password": user["email"]}, token), 422)
    assert [e["field"] for e in problem["errors"]] == ["new_password"]
    resp = client.post("/auth/password", {"current_password": PASSWORD, "new_password": "x" * 9})
    expect_problem(resp, 401)
    assert resp.headers.get("WWW-Authenticate") == "Bearer"
    expect(client.refresh(tokens["refresh_token"]), 200)  # nothing changed


# --------------------------------------------------------------------------------------------
# Login failures: no enumeration, comparable time, the lockout


def test_unknown_email_and_wrong_password_get_the_same_401(client):
    email = fresh_email("same401")
    client.signup(email)
    wrong = client.login_response(email, "not the password")
    unknown = client.login_response(fresh_email("nobody"), "not the password")
    expect_problem(wrong, 401)
    expect_problem(unknown, 401)
    assert wrong.json() == unknown.json()
    assert wrong.headers.get("WWW-Authenticate") == unknown.headers.get("WWW-Authenticate")
    assert wrong.headers.get("WWW-Authenticate")


def test_unknown_email_costs_a_hash_like_a_wrong_password(client):
    """Median time of unknown-email logins within a factor of 3 of wrong-password ones: with
    no dummy hash, an unknown email would answer in a fraction of the time."""
    accounts = [fresh_email("timing") for _ in range(3)]
    for email in accounts:
        client.signup(email)
    unknown, wrong = [], []
    for round_ in range(3):           # 3 failures per account: below the lockout
        for email in accounts:
            started = time.perf_counter()
            expect(client.login_response(email, "wrong password here"), 401)
            wrong.append(time.perf_counter() - started)
            started = time.perf_counter()
            expect(client.login_response(fresh_email("ghost"), "wrong password here"), 401)
            unknown.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 1 / 3 < ratio < 3, f"unknown {statistics.median(unknown):.4f}s vs wrong " \
                              f"{statistics.median(wrong):.4f}s"


def test_five_failures_lock_the_email_with_retry_after(client):
    email = fresh_email("lock")
    client.signup(email)
    for _ in range(5):
        expect_problem(client.login_response(email, "wrong password!"), 401)
    resp = client.login_response(email, "wrong password!")
    expect_problem(resp, 429)
    retry = int(resp.headers["Retry-After"])
    assert 0 < retry <= 900
    expect_problem(client.login_response(email), 429)  # even the right password, while locked
    expect_problem(client.login_response(email.upper()), 429)  # the same account in any case
    client.login(client.signup(fresh_email("free"))["email"])  # others are not affected


def test_unknown_emails_lock_too(client):
    """Or the lockout would tell which accounts exist."""
    email = fresh_email("ghostlock")
    for _ in range(5):
        expect_problem(client.login_response(email, "wrong password!"), 401)
    expect_problem(client.login_response(email, "wrong password!"), 429)


def test_a_success_clears_the_failures(client):
    email = fresh_email("clear")
    client.signup(email)
    for _ in range(4):
        expect(client.login_response(email, "wrong password!"), 401)
    client.login(email)
    for _ in range(4):
        expect(client.login_response(email, "wrong password!"), 401)
    client.login(email)


def test_concurrent_guesses_cannot_pass_the_limit(client):
    email = fresh_email("swarm")
    client.signup(email)
    results = []
    barrier = threading.Barrier(10)

    def guess():
        session = requests.Session()
        barrier.wait()
        results.append(session.post(client.url + "/auth/login", timeout=TIMEOUT,
                                    json={"email": email, "password": "wrong password!"}).status_code)

    threads = [threading.Thread(target=guess) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [401] * 5 + [429] * 5, results


def test_the_lock_is_lifted_when_the_window_passes(start_server):
    server = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--lockout-s", "2")
    client = Client(server)
    email = fresh_email("window")
    client.signup(email)
    for _ in range(5):
        expect(client.login_response(email, "wrong password!"), 401)
    resp = expect(client.login_response(email), 429)
    retry = int(resp.headers["Retry-After"])
    assert 1 <= retry <= 2
    time.sleep(retry + 0.2)
    client.login(email)


# --------------------------------------------------------------------------------------------
# Secrets, costs and restarts


def test_generated_secret_and_default_cost_survive_a_restart(start_server):
    """No --secret, no JWT_SECRET: a random secret kept in the database; the OWASP default cost."""
    first = start_server(SCRIPT)
    client = Client(first)
    email = fresh_email("restart")
    client.signup(email)
    tokens = client.login(email)
    assert stored_hash(first.db_path, email).startswith("scrypt$16384$8$5$")
    with pytest.raises(AssertionError):
        decode_and_verify(tokens["access_token"], SECRET)
    first.stop()
    second = start_server(SCRIPT, "--db", first.db_path)
    client = Client(second)
    assert expect_json(client.me(tokens["access_token"]), 200)["email"] == email
    expect(client.refresh(tokens["refresh_token"]), 200)


def test_jwt_secret_from_the_environment(start_server):
    secret = "environment-secret-with-enough-bytes-0123"
    server = start_server(SCRIPT, *LOW_COST, env={"JWT_SECRET": secret})
    client = Client(server)
    user, tokens = client.account("env")
    decode_and_verify(tokens["access_token"], secret)
    expect(client.me(mint(claims_for(user["id"]), secret=secret)), 200)
    expect_invalid_token(client.me(mint(claims_for(user["id"]))))


def test_issuer_and_audience_flags(start_server):
    server = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--issuer", "https://id.example",
                          "--audience", "notes-api", "--access-ttl", "60")
    client = Client(server)
    user, tokens = client.account("flags")
    _, claims = decode_and_verify(tokens["access_token"])
    assert claims["iss"] == "https://id.example" and claims["aud"] == "notes-api"
    assert claims["exp"] - claims["iat"] == 60 and tokens["expires_in"] == 60
    expect_invalid_token(client.me(mint(claims_for(user["id"]))))  # iss/aud of the defaults


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_short_secret_exits_2(tmp_path, how):
    short = "only-31-bytes-long-not-enough!!"
    assert len(short) == 31
    cmd = [sys.executable, str(ROOT / SCRIPT), "--port", "0", "--db", str(tmp_path / "db.sqlite3")]
    env = clean_env()
    env.pop("JWT_SECRET", None)
    if how == "flag":
        cmd += ["--secret", short]
    else:
        env["JWT_SECRET"] = short
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "32 bytes" in done.stderr and "Traceback" not in done.stderr
    assert short not in done.stderr, "the secret itself must not be printed"
    assert "listening on" not in done.stdout


@pytest.mark.parametrize("value", ["1000", "512", "262144", "lots"])
def test_scrypt_n_must_be_a_sane_power_of_two(value):
    done = run_once(SCRIPT, "--port", "0", "--db", ":memory:", "--scrypt-n", value)
    assert done.returncode == 2 and "usage" in done.stderr.lower(), done.stderr


def test_raising_the_cost_rehashes_at_the_next_login(start_server, tmp_path):
    db = tmp_path / "cost.sqlite3"
    email = fresh_email("cost")
    server = start_server(SCRIPT, "--secret", SECRET, "--scrypt-n", "1024", "--db", db)
    Client(server).signup(email)
    server.stop()
    before = stored_hash(db, email)
    assert before.startswith("scrypt$1024$8$5$")

    server = start_server(SCRIPT, "--secret", SECRET, "--scrypt-n", "2048", "--db", db)
    Client(server).login(email)                      # verifies with the old cost, re-hashes
    server.stop()
    after = stored_hash(db, email)
    assert after.startswith("scrypt$2048$8$5$"), after
    assert after.split("$")[4] != before.split("$")[4], "a fresh salt with the new hash"

    server = start_server(SCRIPT, "--secret", SECRET, "--scrypt-n", "2048", "--db", db)
    client = Client(server)
    client.login(email)                              # the new hash verifies
    expect_problem(client.login_response(email, "not it at all"), 401)
    assert stored_hash(db, email) == after, "no re-hash when the cost is current"


# --------------------------------------------------------------------------------------------
# The request bodies in /openapi.json: generated from the fields the server validates

PASSWORD_CHANGE_BODY = body_schema({"current_password": GIVEN_PASSWORD_SCHEMA,
                                    "new_password": NEW_PASSWORD_SCHEMA},
                                   ["current_password", "new_password"])


def test_openapi_describes_each_body_exactly(client):
    bodies = request_bodies(client.url)
    assert {route: schema for route, (schema, _) in bodies.items()} == {
        **TOKEN_ROUTE_BODIES,
        ("POST", "/auth/password"): PASSWORD_CHANGE_BODY,
    }
    described = {(route, name): text for route, (_, texts) in bodies.items()
                 for name, text in texts.items()}
    assert set(described) == {(("POST", "/auth/signup"), "password"),
                              (("POST", "/auth/password"), "new_password")}
    for text in described.values():
        assert_policy_described(text)


def test_the_schemas_fields_are_the_ones_the_server_checks(client):
    _, tokens = client.account("fields")
    check_bodies_name_their_fields(
        request_bodies(client.url),
        lambda method, path, body: client.post(path, body, tokens["access_token"]))


def test_the_schemas_password_lengths_are_the_policys(client):
    bodies = request_bodies(client.url)
    check_password_bounds(bodies[("POST", "/auth/signup")][0], "password",
                          lambda password: client.post("/auth/signup", {"email": fresh_email("len"),
                                                                        "password": password}),
                          201)

    def change_password(password):   # an account each: an accepted change uses the old one up
        _, tokens = client.account("len")
        return client.post("/auth/password", {"current_password": PASSWORD,
                                              "new_password": password}, tokens["access_token"])

    check_password_bounds(bodies[("POST", "/auth/password")][0], "new_password", change_password,
                          204)


# --------------------------------------------------------------------------------------------
# Nothing secret in the log or the trace


def test_no_secret_reaches_the_log_or_the_trace(start_server):
    server = start_server(SCRIPT, "--secret", SECRET, *LOW_COST, "--trace")
    client = Client(server)
    email = fresh_email("quiet")
    client.signup(email)
    tokens = client.login(email)
    client.login_response(email, "a wrong password guess")
    rotated = expect_json(client.refresh(tokens["refresh_token"]), 200)
    expect(client.me(rotated["access_token"]), 200)
    expect_invalid_token(client.me(rotated["access_token"] + "x"))
    new_password = "the second passphrase"
    expect(client.post("/auth/password", {"current_password": PASSWORD,
                                          "new_password": new_password},
                       rotated["access_token"]), 204)
    password_hash = stored_hash(server.db_path, email)
    server.stop()
    log = server.stderr_text()
    assert "trace " in log and "SQL" in log, "the trace ran"
    secrets_ = {"password": PASSWORD, "new password": new_password,
                "wrong guess": "a wrong password guess", "secret": SECRET,
                "access token": tokens["access_token"], "rotated access token": rotated["access_token"],
                "refresh token": tokens["refresh_token"], "rotated refresh": rotated["refresh_token"],
                "hash": password_hash, "hash salt": password_hash.split("$")[4],
                "token signature": tokens["access_token"].rsplit(".", 1)[1]}
    for name, value in secrets_.items():
        assert value not in log, f"the {name} appears in stderr"
    assert server.stdout_text() == ""
