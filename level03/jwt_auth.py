"""JWT authentication: sign up, log in, and prove who you are with a signed token.

What it teaches
  - JSON Web Tokens (RFC 7519) signed with HS256 (JWS, RFC 7515), encoded, signed and verified
    by hand with `hmac` and `hashlib`: base64url without padding, the header, the claims, and
    the checks a verifier must make (only the algorithm it expects, the signature in constant
    time, `exp` / `nbf` with a small leeway, `iss`, `aud`, a size limit).
  - Bearer tokens on the wire (RFC 6750): `Authorization: Bearer <token>`, and the
    `WWW-Authenticate` challenge of every 401.
  - Passwords the way NIST SP 800-63B says: 8–128 characters of anything, no composition rules,
    refused when on a list of common passwords or equal to the email; stored with scrypt
    (RFC 7914) and a random salt in a self-describing string, so the cost can be raised later.
  - What an attacker tries first, and the answer here: guessing (a lockout), asking "does this
    account exist?" (the same answer in the same time), a stolen refresh token (rotation and
    reuse detection), a token with `"alg": "none"` (refused).

What other projects import from here (names are stable):
  passwords   hash_password, verify_password, needs_rehash, ScryptParams, DEFAULT_SCRYPT,
              password_problem, Password (a lib.validation field), COMMON_PASSWORDS
  email       normalise_email, email_key
  tokens      b64url_encode, b64url_decode, sign_token, verify_token, InvalidToken,
              TokenSettings, issue_access_token, verify_access_token, token_hash (how any
              random token is stored: refresh tokens here, reset tokens, session ids)
  storage     SCHEMA (and its parts USERS_SCHEMA, LOGIN_FAILURES_SCHEMA, REFRESH_TOKENS_SCHEMA,
              SECRETS_SCHEMA), UserStore, user_json, LoginLockout, RefreshTokenStore,
              InvalidRefreshToken, load_or_create_secret
  the flow    Credentials (users, lockout, scrypt cost: what checking a password needs),
              Auth (Credentials and the token settings, built once in main), create_account,
              authenticate_password, issue_token_pair, token_answer, bearer_token,
              authenticate_bearer, invalid_token, require_user (a middleware step), current_user
  bodies      SIGN_UP, CREDENTIALS, REFRESH, PASSWORD_CHANGE (lib.validation fields, and
              with `body_schema` the routes' request schemas), AUTH_BODY_LIMIT (bytes)
  the CLI     add_auth_arguments, add_password_arguments, Auth.from_args,
              Credentials.from_args; argparse types scrypt_cost, at_least_a_second,
              email_argument
  handlers    sign_up, log_in, refresh, log_out, read_me, change_password: each reads
              `request.app.state.auth`, so another app that sets that may mount them as they
              are; add_token_routes(app) mounts the first four as jwt_auth serves them.

What it leaves out: asymmetric keys (RS256/ES256) and JWKS key rotation, OAuth 2.0 flows and
scopes, revoking an access token before it expires (they are short-lived instead), email
verification, multi-factor authentication. "In production" in jwt_auth.md says who does those.
"""
import argparse
import base64
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import sys
import time
import unicodedata
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, Forbidden, TooManyRequests, Unauthorized, ValidationFailed,
                 created, json_response, no_content, trace_event)
from lib.app import bounded, exit_usage_error, seconds
from lib.request import utc_timestamp
from lib.validation import Email, Field, Invalid, Text, body_schema, is_unicode_text, validate

app = App("jwt_auth", "Sign up, log in, and call the API with HS256 JSON Web Tokens.", port=8008)


# =============================================================================================
# Schema
# =============================================================================================

USERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    email         TEXT NOT NULL,           -- as given, normalised (trimmed, domain lower-cased)
    email_key     TEXT NOT NULL UNIQUE,    -- case-folded: one account per address, any case
    password_hash TEXT NOT NULL,           -- scrypt$N$r$p$salt$hash
    created_at    TEXT NOT NULL
);
"""

LOGIN_FAILURES_SCHEMA = """
CREATE TABLE IF NOT EXISTS login_failures (
    id        INTEGER PRIMARY KEY,
    email_key TEXT NOT NULL,
    failed_at REAL NOT NULL                -- unix time; rows older than the window are deleted
);
CREATE INDEX IF NOT EXISTS login_failures_by_email ON login_failures (email_key, failed_at);
CREATE INDEX IF NOT EXISTS login_failures_by_time ON login_failures (failed_at);
"""

REFRESH_TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS refresh_tokens (
    id         INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,       -- SHA-256 of the token: the token itself is never stored
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family     TEXT NOT NULL,              -- every token rotated from one login shares it
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    rotated_at REAL,                       -- exchanged for a newer one: presenting it again is reuse
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_by_family ON refresh_tokens (family);
CREATE INDEX IF NOT EXISTS refresh_tokens_by_user ON refresh_tokens (user_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_by_expiry ON refresh_tokens (expires_at);
"""

SECRETS_SCHEMA = """
CREATE TABLE IF NOT EXISTS server_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

SCHEMA = USERS_SCHEMA + LOGIN_FAILURES_SCHEMA + REFRESH_TOKENS_SCHEMA + SECRETS_SCHEMA


# =============================================================================================
# Tokens: base64url, sign, verify (RFC 7515, RFC 7519)
# =============================================================================================

# RFC 7515 §2: base64url (RFC 4648 §5) with the trailing '=' padding removed.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

ACCEPTED_ALG = "HS256"
MAX_TOKEN_BYTES = 8 * 1024     # a token is a header value; nothing legitimate comes near this
DEFAULT_LEEWAY_S = 30          # RFC 7519 §4.1.4 allows "some small leeway" for clock skew


class InvalidToken(Exception):
    """A token was refused. The message is safe to show the client: it goes into RFC 6750's
    `error_description`, so it says what is wrong without echoing anything from the token."""


def b64url_encode(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """Strict base64url: only the URL-safe alphabet, no padding, and the canonical encoding
    (the unused bits of the last character must be zero). A lenient decoder would accept many
    spellings of one signature, and skip characters it does not know."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidToken("the token is not valid base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:
        raise InvalidToken("the token is not valid base64url")
    return raw


def _json_object(raw, what):
    """Parse one JSON object of a token. Duplicate names are refused (RFC 7515 §5.2: a parser
    that silently keeps the last `alg` is how confusion attacks start), so are NaN/Infinity."""

    def no_duplicates(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise InvalidToken(f"the token {what} repeats a member")
        return dict(pairs)

    def no_constants(name):
        raise InvalidToken(f"the token {what} is not valid JSON")

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates,
                           parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidToken(f"the token {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"the token {what} is not a JSON object")
    return value


def _compact_json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _hs256(signing_input, secret):
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def sign_token(claims, secret):
    """A compact JWS (RFC 7515 §7.1): base64url(header) . base64url(claims) . base64url(sig),
    the signature being HMAC-SHA256 over the first two parts, as ASCII."""
    header = {"alg": ACCEPTED_ALG, "typ": "JWT"}
    signing_input = f"{b64url_encode(_compact_json(header))}.{b64url_encode(_compact_json(claims))}"
    signature = _hs256(signing_input.encode("ascii"), secret)
    return f"{signing_input}.{b64url_encode(signature)}"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def verify_token(token, secret, *, issuer, audience, leeway=DEFAULT_LEEWAY_S, now=None):
    """The claims of `token` if it is an HS256 JWT signed with `secret`, current, and meant for
    us; else `InvalidToken` saying why. The order matters: the header is read only to refuse
    every algorithm but HS256, and no claim is trusted before the signature is checked."""
    if len(token) > MAX_TOKEN_BYTES:  # characters; a token that passes is ASCII, so also bytes
        raise InvalidToken("the token is too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("the token is not a compact JWS of three parts")
    header_part, claims_part, signature_part = parts
    header = _json_object(b64url_decode(header_part), "header")

    # RFC 8725 §3.1: use only the algorithm you expect. "none" (no signature) and "RS256" (an
    # HMAC forged with the public key as the secret) are the classic attacks; HS512 is refused
    # too, since this server never issues it.
    alg = header.get("alg")
    if alg is None:
        raise InvalidToken("the token header names no alg")
    if alg != ACCEPTED_ALG:
        raise InvalidToken("the token alg is not HS256")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in ("jwt", "at+jwt")):
        raise InvalidToken("the token typ is not JWT")
    if "crit" in header:  # RFC 7515 §4.1.11: extensions we do not understand must be refused
        raise InvalidToken("the token header has crit extensions this server does not support")

    claims_json = b64url_decode(claims_part)       # decoded, not yet believed
    signature = b64url_decode(signature_part)
    expected = _hs256(f"{header_part}.{claims_part}".encode("ascii"), secret)
    if not hmac.compare_digest(signature, expected):  # constant time: no byte-by-byte oracle
        raise InvalidToken("the token signature is invalid")

    claims = _json_object(claims_json, "claims")
    now = time.time() if now is None else now
    exp = claims.get("exp")
    if exp is None:
        raise InvalidToken("the token has no exp")
    if not _is_number(exp):
        raise InvalidToken("the token exp is not a number")
    if now >= exp + leeway:
        raise InvalidToken("the token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _is_number(nbf) or now + leeway < nbf):
        raise InvalidToken("the token is not valid yet")
    iat = claims.get("iat")
    if iat is not None and not _is_number(iat):
        raise InvalidToken("the token iat is not a number")
    if claims.get("iss") != issuer:
        raise InvalidToken("the token issuer is wrong")
    aud = claims.get("aud")  # RFC 7519 §4.1.3: one string, or an array of them
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise InvalidToken("the token audience is wrong")
    sub = claims.get("sub")
    if sub is None:
        raise InvalidToken("the token has no sub")
    if not isinstance(sub, str) or not sub:  # RFC 7519 §4.1.2: a StringOrURI, never a number
        raise InvalidToken("the token sub is not a non-empty string")
    return claims


class TokenSettings(NamedTuple):
    """How this server signs and checks access tokens."""
    secret: bytes          # the HMAC key, at least 32 bytes (RFC 7518 §3.2: ≥ the hash size)
    issuer: str            # `iss`: who issued the token
    audience: str          # `aud`: who the token is for
    access_ttl: int = 900  # seconds an access token lives (`exp` - `iat`)
    leeway: int = DEFAULT_LEEWAY_S


def issue_access_token(settings, user_id, now=None):
    """A signed access token for one user, with the claims of spec §8."""
    now = int(time.time() if now is None else now)
    claims = {"iss": settings.issuer, "aud": settings.audience, "sub": str(user_id),
              "iat": now, "exp": now + settings.access_ttl, "jti": secrets.token_urlsafe(16)}
    return sign_token(claims, settings.secret)


def verify_access_token(settings, token, now=None):
    return verify_token(token, settings.secret, issuer=settings.issuer,
                        audience=settings.audience, leeway=settings.leeway, now=now)


# =============================================================================================
# Passwords: policy and scrypt (NIST SP 800-63B §5.1.1, RFC 7914)
# =============================================================================================

class ScryptParams(NamedTuple):
    """scrypt's cost: N (CPU and memory, a power of two), r (block size), p (parallelism).
    Memory per hash is about 128·r·N bytes: 16 MiB at the default."""
    n: int
    r: int
    p: int


DEFAULT_SCRYPT = ScryptParams(2**14, 8, 5)   # OWASP Password Storage Cheat Sheet's minimum
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD = 8       # NIST SP 800-63B §5.1.1.2: at least 8 characters
MAX_PASSWORD = 128     # … and accept at least 64; the cap bounds the work a request can cause

# NIST SP 800-63B §5.1.1.2: refuse values "known to be commonly-used, expected, or compromised".
# The most frequent passwords of the public breach lists (SecLists, the UK NCSC's top 100,000,
# HIBP), lower-cased; only those of 8+ characters matter, as shorter ones fail the length rule.
# A real service checks far more, e.g. HIBP's k-anonymity range API (see jwt_auth.md).
COMMON_PASSWORDS = frozenset("""
password password1 password12 password123 password1234 password12345 password123! passw0rd
p@ssword p@ssw0rd p@55w0rd pa55word pa55w0rd passwort passwort1 motdepasse contraseña
12345678 123456789 1234567890 12345678910 0123456789 0987654321 9876543210 987654321
87654321 11111111 111111111 1111111111 00000000 000000000 0000000000 22222222 33333333
44444444 55555555 66666666 77777777 88888888 99999999 12341234 12121212 11223344 12344321
123123123 123321123 123456123 147258369 159753456 741852963 789456123 147852369 123654789
1q2w3e4r 1q2w3e4r5t 1q2w3e4r5t6y 1qaz2wsx 1qaz2wsx3edc zaq12wsx zaq1zaq1 1q2w3e4r5t6y7u
qwertyui qwertyuiop qwerty123 qwerty1234 qwerty12 qwertyu1 qwerty123456 qwer1234 qwerasdf
asdfghjk asdfghjkl asdf1234 asdfasdf zxcvbnm1 zxcvbnm123 zxcvbnmm azertyuiop qazwsxedc
abcd1234 abc12345 abc123456 abcdefgh abcdefg1 a1b2c3d4 a1234567 aa123456 aaaaaaaa
iloveyou iloveyou1 iloveyou2 iloveu123 sunshine sunshine1 princess princess1 football
football1 baseball baseball1 basketball soccer123 hockey123 superman superman1 batman123
spiderman starwars starwars1 pokemon1 pokemon123 naruto123 trustno1 welcome1 welcome123
welcome! letmein1 letmein123 monkey123 dragon123 master123 shadow123 michael1 jennifer
jessica1 jordan23 michelle charlie1 computer computer1 internet whatever1 chocolate
butterfly butterfly1 babygirl babygirl1 lovely123 loveyou1 lovelove lovers123 sweetheart
sweetie1 angel123 freedom1 liverpool liverpool1 chelsea1 arsenal1 manchester barcelona
mercedes ferrari1 corvette mustang1 harley123 yankees1 cowboys1 steelers eagles123
metallica slipknot nirvana1 rockyou1 blink182 eminem123 beyonce1 justinbieber onedirection
qwerty12345 aaaaaa11 qqqqqqqq zzzzzzzz 1234qwer 1234abcd 12qwaszx q1w2e3r4 q1w2e3r4t5
q1w2e3r4t5y6 1a2b3c4d 123qweasd 123qweasdzxc qweasdzxc qweqweqwe qazqazqaz asdasdasd
zxczxczxc 123abc123 abc123abc password! password. password01 password2 password3 password7
password11 password22 password99 password2020 password2021 password2022 password2023
password2024 password2025 welcome2020 welcome2021 welcome2022 welcome2023 welcome2024
summer2020 summer2021 summer2022 summer2023 summer2024 winter2020 winter2021 winter2022
winter2023 winter2024 spring2023 spring2024 autumn2023 autumn2024 january1 february
september november december monday123 friday13 admin123 admin1234 administrator adminadmin
rootroot root1234 toor1234 changeme changeme1 changeme123 default1 default123 secret123
secret1234 topsecret mysecret letmein! temp1234 temppass test1234 test12345 testtest
testing1 testing123 guest123 guestguest user1234 username userpass login123 master12
access14 access123 qwerty!@# !qaz2wsx 1qaz!qaz !@#$%^&* !@#$%^&*() 1234!@#$ p4ssw0rd
mypassword mypass123 newpassword newpass1 nopassword thisisit whatever iloveyou! trustme1
asdfjkl; 1234567a 1234567q a12345678 q12345678 123456789a 12345678a 123456abc 12345qwert
killer123 hunter12 hunter123 ranger12 tigger12 tigger123 pepper12 ginger12 buster12
maggie12 bailey12 daniel12 andrew12 joshua12 matthew1 robert12 thomas12 william1 richard1
jonathan nicholas benjamin alexander victoria samantha isabella elizabeth christina
jasmine1 natasha1 patrick1 justin12 anthony1 brandon1 charlotte princesa teamo123
tequiero amorcito hellokitty hello123 hello1234 helloworld goodluck1 godbless
jesus123 jesuschrist blessed1 christ123 heaven123 angels12 diamond1 midnight1 rainbow1
sunflower flower123 snoopy12 scooter1 tinkerbell cookie123 cheese123 banana123 orange12
apple123 pineapple strawberry blueberry watermelon chicken1 purple12 yellow12 silver12
golden12 qwerty11 asdf;lkj 123456qwerty 1password 1iloveyou 1234567890q zaqxswcde
zaq!2wsx 1qazxsw2 2wsx3edc xsw21qaz 3edc4rfv 4rfv5tgb 5tgb6yhn 1qw23er4 google123
facebook facebook1 linkedin twitter1 youtube1 instagram minecraft minecraft1 fortnite
roblox123 gamer123 playstation xbox360! nintendo warcraft starcraft counterstrike
matrix123 computer12 samsung1 iphone12 apple1234 microsoft windows1 windows10 linux123
ubuntu123 oracle123 database sqlserver postgres12 mysql1234
""".split())


def password_problem(password, email=None):
    """What is wrong with `password` under the policy, or None if it is acceptable: 8–128
    characters (counted after Unicode normalisation), not a common password, not the email."""
    if not isinstance(password, str):
        return "must be a string"
    if not is_unicode_text(password):   # JSON's "\ud800": no character, and no UTF-8 to hash
        return "must be Unicode text (a lone surrogate such as \\ud800 is not)"
    length = len(unicodedata.normalize("NFKC", password))
    if length < MIN_PASSWORD:
        return f"must be at least {MIN_PASSWORD} characters"
    if length > MAX_PASSWORD:
        return f"must be at most {MAX_PASSWORD} characters"
    if password.lower() in COMMON_PASSWORDS:
        return "is one of the most common passwords; choose another"
    if email and password.casefold() in (email.casefold(), email.partition("@")[0].casefold()):
        return "must not be your email address"
    return None


class Password(Field):
    """A lib.validation field for a new password: the policy, minus the email check, which
    needs the other field (`password_problem(value, email)` after `validate`)."""

    def __init__(self, **kw):
        kw.setdefault("description", f"{MIN_PASSWORD}–{MAX_PASSWORD} characters of any kind, "
                                     f"counted after Unicode NFKC normalisation; not one of the "
                                     f"most common passwords, nor the email")
        super().__init__(**kw)

    def shape(self):
        # What JSON Schema can say of the policy is its length; the common-password list and the
        # email rule are in the description. The policy counts characters after NFKC, which a
        # few (the ligature "ﬁ" becomes "fi") change, so near a bound the server's count wins.
        return {"type": "string", "minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD}

    def clean(self, value):
        problem = password_problem(value)
        if problem:
            raise Invalid(problem)
        return value


def _password_bytes(password):
    # NIST SP 800-63B §5.1.1.2: normalise Unicode (NFKC) before hashing, so the same
    # password typed on two keyboards (composed "é" or "e" + accent) is the same password.
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _scrypt(password, salt, params):
    # OpenSSL refuses more memory than `maxmem` (32 MiB by default): allow what N, r, p need.
    maxmem = 128 * params.r * (params.n + params.p + 2) + (1 << 20)
    return hashlib.scrypt(_password_bytes(password), salt=salt, n=params.n, r=params.r,
                          p=params.p, maxmem=maxmem, dklen=HASH_BYTES)


def hash_password(password, params=DEFAULT_SCRYPT):
    """`scrypt$N$r$p$salt$hash`: everything needed to check the password later, so a change
    of cost applies to new hashes while old ones still verify (and get re-hashed)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, params)
    return f"scrypt${params.n}${params.r}${params.p}${b64url_encode(salt)}${b64url_encode(digest)}"


def parse_password_hash(stored):
    """(ScryptParams, salt, hash) of a stored string, or None when it is not one of ours."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        return None
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    try:
        return ScryptParams(n, r, p), b64url_decode(parts[4]), b64url_decode(parts[5])
    except InvalidToken:
        return None


def verify_password(password, stored):
    """True when `password` matches the stored hash. The comparison takes the same time
    wherever the first differing byte is (`hmac.compare_digest`)."""
    parsed = parse_password_hash(stored)
    if parsed is None:
        return False
    params, salt, expected = parsed
    return hmac.compare_digest(_scrypt(password, salt, params), expected)


def needs_rehash(stored, params):
    """True when the stored hash was made with another cost than `params` (say, before
    `--scrypt-n` was raised): the next successful login hashes the password again."""
    parsed = parse_password_hash(stored)
    return parsed is None or parsed[0] != params


# =============================================================================================
# Email addresses
# =============================================================================================

def normalise_email(text):
    """`text` trimmed with its domain lower-cased, or None when it is not a sane address
    (lib.validation.Email does the syntax; see its docstring)."""
    return Email.normalise(text) if isinstance(text, str) else None


def email_key(email):
    """The key that makes an email unique in any case: `Ann@X.org` and `ann@x.org` are one
    account here (most providers treat the local part case-insensitively in practice)."""
    return email.casefold()


def email_argument(text):
    """An argparse `type` for an address given on the command line (rbac's `--admin-email`,
    the address of password_reset's `--mail-from`): normalised as a signup's is, else exit 2."""
    email = normalise_email(text)
    if email is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an email address")
    return email


# =============================================================================================
# Storage: users, the login lockout, refresh tokens, the generated secret
# =============================================================================================

def user_json(row):
    """What a client may see of a user: never the password hash."""
    return {"id": row["id"], "email": row["email"], "created_at": row["created_at"]}


class UserStore:
    """The `users` table. Its methods run single statements, so a caller may group them with
    others in one `db.transaction()` (rbac creates a user and its role atomically)."""

    def __init__(self, db):
        self.db = db

    def create(self, email, password_hash):
        """Insert a user; a taken email (in any case) is a 409. Returns the user as JSON."""
        created_at = utc_timestamp()
        try:
            cursor = self.db.execute(
                "INSERT INTO users (email, email_key, password_hash, created_at) VALUES (?, ?, ?, ?)",
                (email, email_key(email), password_hash, created_at))
        except sqlite3.IntegrityError:
            raise Conflict("an account with this email already exists") from None
        return {"id": cursor.lastrowid, "email": email, "created_at": created_at}

    def by_email(self, email):
        return self.db.query_one("SELECT * FROM users WHERE email_key = ?", (email_key(email),))

    def by_id(self, user_id):
        return self.db.query_one("SELECT * FROM users WHERE id = ?", (user_id,))

    def set_password_hash(self, user_id, password_hash):
        self.db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))


class LoginLockout:
    """At most `max_failures` failed logins per email in a sliding window of `window_s`;
    beyond that, 429 with `Retry-After` until the oldest failure leaves the window.

    An attempt is counted *before* the password is checked and forgiven when it succeeds, in
    one transaction with the count: so many simultaneous guesses cannot slip past the limit
    while each other's hashes are still running. Unknown emails are counted like known ones,
    or the lockout itself would tell which accounts exist."""

    def __init__(self, db, window_s=900.0, max_failures=5):
        self.db = db
        self.window_s = window_s
        self.max_failures = max_failures

    def begin_attempt(self, key, now=None):
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM login_failures WHERE failed_at <= ?", (now - self.window_s,))
            count, oldest = conn.execute(
                "SELECT count(*), min(failed_at) FROM login_failures WHERE email_key = ?",
                (key,)).fetchone()
            if count < self.max_failures:
                conn.execute("INSERT INTO login_failures (email_key, failed_at) VALUES (?, ?)",
                             (key, now))
                return
        retry_after = oldest + self.window_s - now
        raise TooManyRequests(f"too many failed logins for this email; try again in "
                              f"{math.ceil(retry_after)} s", retry_after=retry_after)

    def forgive(self, key):
        """A successful login clears the record of failures for this email."""
        self.db.execute("DELETE FROM login_failures WHERE email_key = ?", (key,))


class InvalidRefreshToken(Exception):
    """Unknown, expired, revoked or already used: the client must log in again."""


def token_hash(token):
    """What a table keeps instead of a secret random token (a refresh token here, a reset
    token in password_reset, a session id in session_auth): its SHA-256, in hex. The token has
    256 random bits, so a fast hash is enough: nobody can search back from it to the token,
    unlike from a password's hash (people choose guessable passwords; that needs scrypt). A
    leaked table or backup gives no usable token, and looking a token up by its hash means the
    index compares bytes the client does not choose: no timing tells how much of a guess was
    right."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class RefreshTokenStore:
    """Opaque refresh tokens, stored hashed, rotated on every use (OAuth 2.0 Security BCP,
    RFC 9700 §4.14.2): a refresh answers a new token and retires the old one; presenting a
    retired one again means two parties hold the family (the user and a thief), so the whole
    family is revoked and both must log in again."""

    def __init__(self, db, ttl_s=30 * 24 * 3600):
        self.db = db
        self.ttl_s = ttl_s

    def issue(self, user_id, family=None, now=None):
        """A new token for `user_id`, in `family` (a new family for a fresh login)."""
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)  # 256 bits
        self.db.execute("DELETE FROM refresh_tokens WHERE expires_at < ?", (now,))
        self.db.execute(
            "INSERT INTO refresh_tokens (token_hash, user_id, family, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (token_hash(token), user_id, family or secrets.token_hex(16), now, now + self.ttl_s))
        return token

    def rotate(self, token, now=None):
        """Exchange `token` for a new one of its family: (user_id, new token). Raises
        InvalidRefreshToken; a reuse revokes the family first (committed, then raised)."""
        now = time.time() if now is None else now
        new_token = secrets.token_urlsafe(32)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM refresh_tokens WHERE token_hash = ?",
                               (token_hash(token),)).fetchone()
            if row is None or row["revoked_at"] is not None or row["expires_at"] <= now:
                outcome = "invalid"
            elif row["rotated_at"] is not None:
                outcome = "reused"
                conn.execute("UPDATE refresh_tokens SET revoked_at = ? "
                             "WHERE family = ? AND revoked_at IS NULL", (now, row["family"]))
            else:
                outcome = "rotated"
                conn.execute("UPDATE refresh_tokens SET rotated_at = ? WHERE id = ?",
                             (now, row["id"]))
                conn.execute(
                    "INSERT INTO refresh_tokens (token_hash, user_id, family, created_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?)",
                    (token_hash(new_token), row["user_id"], row["family"], now, now + self.ttl_s))
        if outcome == "reused":
            trace_event("refresh token reused: its family is revoked")
        if outcome != "rotated":
            raise InvalidRefreshToken(outcome)
        return row["user_id"], new_token

    def revoke_family(self, token, now=None):
        """Log out: revoke every token of `token`'s family. Unknown tokens are ignored."""
        now = time.time() if now is None else now
        self.db.execute(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND family = "
            "(SELECT family FROM refresh_tokens WHERE token_hash = ?)", (now, token_hash(token)))

    def revoke_all(self, user_id, now=None):
        """Revoke every refresh token of a user (password changed or reset)."""
        now = time.time() if now is None else now
        self.db.execute("UPDATE refresh_tokens SET revoked_at = ? "
                        "WHERE user_id = ? AND revoked_at IS NULL", (now, user_id))


def load_or_create_secret(db, name="jwt"):
    """The signing secret kept in the database: made once (256 random bits), read ever after,
    so tokens stay valid across restarts. Two processes starting together agree (INSERT OR
    IGNORE, then read)."""
    db.execute("INSERT OR IGNORE INTO server_secrets (name, value) VALUES (?, ?)",
               (name, secrets.token_urlsafe(32)))
    return db.query_one("SELECT value FROM server_secrets WHERE name = ?", (name,))["value"].encode()


# =============================================================================================
# The flow: log in, issue tokens, require a user
# =============================================================================================

MIN_SECRET_BYTES = 32
LOGIN_CHALLENGE = "Bearer"   # what a client must present next: a bearer token, got by logging in


class Credentials:
    """What checking a password needs, made once in `main()` and kept in `app.state.auth`: the
    user store, the login lockout, the scrypt cost of new hashes, and a dummy hash. A project
    that signs no tokens (session_auth) uses this alone; `Auth` adds the tokens."""

    def __init__(self, db, *, scrypt=DEFAULT_SCRYPT, lockout_s=900.0):
        self.db = db
        self.users = UserStore(db)
        self.lockout = LoginLockout(db, lockout_s)
        self.scrypt = scrypt
        # Checked against when the email is unknown, so that answer costs one hash too.
        self.dummy_hash = hash_password(secrets.token_urlsafe(16), scrypt)

    @classmethod
    def from_args(cls, db, args, **options):
        """From the flags of `add_password_arguments` (and a subclass's own `options`)."""
        return cls(db, scrypt=DEFAULT_SCRYPT._replace(n=args.scrypt_n), lockout_s=args.lockout_s,
                   **options)


class Auth(Credentials):
    """Everything the auth routes and `require_user` need: the `Credentials`, the refresh
    token store, and how access tokens are signed."""

    def __init__(self, db, *, secret, issuer, audience, access_ttl=900, refresh_ttl=30 * 24 * 3600,
                 scrypt=DEFAULT_SCRYPT, lockout_s=900.0):
        super().__init__(db, scrypt=scrypt, lockout_s=lockout_s)
        self.refresh_tokens = RefreshTokenStore(db, refresh_ttl)
        self.tokens = TokenSettings(secret, issuer, audience, int(access_ttl))

    @classmethod
    def from_args(cls, db, args):
        """From the flags of `add_auth_arguments`; a bad secret exits with status 2."""
        return super().from_args(db, args, secret=resolve_secret(args, db), issuer=args.issuer,
                                 audience=args.audience, access_ttl=args.access_ttl,
                                 refresh_ttl=args.refresh_ttl)


def create_account(credentials, fields, *, in_transaction=None):
    """Sign up, the one way an account is made: `fields` (a request's JSON or form) validated
    as `SIGN_UP`, the password policy with the email (which needs both fields), the password
    hashed with scrypt (slow, so before any write lock), the user inserted (409 for a taken
    email). `in_transaction(conn, user)` runs in the same transaction as the insert, so both
    happen or neither (rbac gives the user its role there); it may add fields to `user`, which
    is what is returned, as `user_json` shows it."""
    values = validate(fields, SIGN_UP)
    problem = password_problem(values["password"], values["email"])
    if problem:
        raise ValidationFailed({"password": problem})
    password_hash = hash_password(values["password"], credentials.scrypt)
    if in_transaction is None:
        return credentials.users.create(values["email"], password_hash)
    with credentials.db.transaction() as conn:
        user = credentials.users.create(values["email"], password_hash)
        in_transaction(conn, user)
    return user


def authenticate_password(credentials, email, password, *, www_authenticate=LOGIN_CHALLENGE):
    """The user whose email and password these are, or a 401 that is the same, in body and in
    time, for an unknown email and a wrong password; a 429 when the email is locked out.
    A login with an older scrypt cost stores a fresh hash at the current one. `credentials`
    is a `Credentials` (an `Auth` is one)."""
    key = email_key(email)
    credentials.lockout.begin_attempt(key)
    user = credentials.users.by_email(email)
    stored = user["password_hash"] if user is not None else credentials.dummy_hash
    matches = verify_password(password, stored)
    trace_event("password checked with scrypt")
    if user is None or not matches:
        raise Unauthorized("the email or the password is wrong", www_authenticate=www_authenticate)
    credentials.lockout.forgive(key)
    if needs_rehash(stored, credentials.scrypt):
        credentials.users.set_password_hash(user["id"], hash_password(password, credentials.scrypt))
        trace_event("password re-hashed at the current scrypt cost")
    return user


def issue_token_pair(auth, user_id):
    """The body of a login answer: a new access token and a refresh token of a new family."""
    return token_answer(auth, user_id, auth.refresh_tokens.issue(user_id))


def token_answer(auth, user_id, refresh_token):
    """RFC 6749 §5.1's shape: a fresh access token beside the given refresh token."""
    return {"access_token": issue_access_token(auth.tokens, user_id), "token_type": "Bearer",
            "expires_in": auth.tokens.access_ttl, "refresh_token": refresh_token}


def invalid_token(description):
    """RFC 6750 §3: a 401 whose challenge says the token was refused, and why."""
    return Unauthorized(description, www_authenticate=f'Bearer error="invalid_token", '
                                                      f'error_description="{description}"')


# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_USER_ID = re.compile(r"[1-9][0-9]{0,17}")  # `sub` is our user id as a string (ASCII digits only)


def bearer_token(request):
    """The token of `Authorization: Bearer <token>`; None when the request has no bearer
    credentials at all (no header, or another scheme such as Basic)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":  # RFC 9110 §11.1: the scheme is case-insensitive
        return None
    return token.strip()


def authenticate_bearer(request, auth):
    """The user (as `user_json`) that the request's bearer token names. Missing → 401 with
    `WWW-Authenticate: Bearer`; refused → 401 with `error="invalid_token"` and why."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("this route needs a bearer token: Authorization: Bearer <token>",
                           www_authenticate="Bearer")
    if not _B64TOKEN.fullmatch(token):
        raise invalid_token("the token is malformed")
    try:
        claims = verify_access_token(auth.tokens, token)
    except InvalidToken as error:
        raise invalid_token(str(error)) from None
    user = auth.users.by_id(int(claims["sub"])) if _USER_ID.fullmatch(claims["sub"]) else None
    if user is None:
        raise invalid_token("the token subject is not a user")
    trace_event(f"bearer token verified: user {user['id']}")
    return user_json(user)


def require_user(request, call_next):
    """Middleware step: deny by default. Every route not declared `public=True` needs a valid
    bearer token; the user lands in `request.context["user"]` for the handler."""
    if not request.route.meta.get("public"):
        request.context["user"] = authenticate_bearer(request, request.app.state.auth)
    return call_next(request)


def current_user(request):
    """The user `require_user` found for this request."""
    return request.context["user"]


# =============================================================================================
# Routes
# =============================================================================================

# A login's password is checked, not judged: no policy (it may predate the policy), only a
# generous bound on the work one request can cause.
CREDENTIALS = {"email": Email(required=True), "password": Text(1, 4 * MAX_PASSWORD, strip=False,
                                                                required=True)}
SIGN_UP = {"email": Email(required=True), "password": Password(required=True)}
REFRESH = {"refresh_token": Text(1, 200, required=True)}
PASSWORD_CHANGE = {"current_password": Text(1, 4 * MAX_PASSWORD, strip=False, required=True),
                   "new_password": Password(required=True)}
AUTH_BODY_LIMIT = 16 * 1024
NO_STORE = {"Cache-Control": "no-store"}  # RFC 6749 §5.1: token answers must not be cached


def sign_up(request):
    """Create an account"""
    user = create_account(request.app.state.auth, request.json_object())
    return created(user, "/me")


def log_in(request):
    """Exchange email and password for an access token and a refresh token"""
    auth = request.app.state.auth
    values = validate(request.json_object(), CREDENTIALS)
    user = authenticate_password(auth, values["email"], values["password"])
    return json_response(issue_token_pair(auth, user["id"]), headers=NO_STORE)


def refresh(request):
    """Rotate a refresh token: a new pair, and the old refresh token dies"""
    auth = request.app.state.auth
    values = validate(request.json_object(), REFRESH)
    try:
        user_id, refresh_token = auth.refresh_tokens.rotate(values["refresh_token"])
    except InvalidRefreshToken:
        # One answer for unknown, expired, revoked and reused: the client logs in again.
        raise Unauthorized("the refresh token is invalid, expired or revoked; log in again",
                           www_authenticate=LOGIN_CHALLENGE) from None
    return json_response(token_answer(auth, user_id, refresh_token), headers=NO_STORE)


def log_out(request):
    """Revoke a refresh token and its whole family"""
    values = validate(request.json_object(), REFRESH)
    # RFC 7009 §2.2: an unknown token is answered like a known one; there is nothing to undo.
    request.app.state.auth.refresh_tokens.revoke_family(values["refresh_token"])
    return no_content()


def add_token_routes(app, sign_up=sign_up, signed_up="The new user", log_in=log_in):
    """Serve the account routes on `app` as jwt_auth does: signup, login, refresh and logout,
    public, with their bodies, limits and OpenAPI answers. The handlers read
    `request.app.state.auth` (an `Auth`), which `app` must set. A project whose signup does
    more passes its own handler and what its 201 holds (rbac gives the user a role); one whose
    login does more passes that handler (saas_starter audits each login)."""
    app.post("/auth/signup", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
             request_schema=body_schema(SIGN_UP), responses={201: signed_up})(sign_up)
    app.post("/auth/login", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
             request_schema=body_schema(CREDENTIALS),
             responses={200: "An access token and a refresh token"})(log_in)
    app.post("/auth/refresh", public=True, body_limit=AUTH_BODY_LIMIT,
             request_schema=body_schema(REFRESH), responses={200: "A new pair of tokens"})(refresh)
    app.post("/auth/logout", public=True, body_limit=AUTH_BODY_LIMIT,
             request_schema=body_schema(REFRESH), responses={204: "Logged out"})(log_out)


add_token_routes(app)


@app.get("/me", responses={200: "The user the token names"})
def read_me(request):
    """The signed-in user"""
    return current_user(request)


@app.post("/auth/password", blocking=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=body_schema(PASSWORD_CHANGE),
          responses={204: "Changed; every refresh token of the user is revoked"})
def change_password(request):
    """Change the password (needs the current one); logs out every session"""
    auth = request.app.state.auth
    user = current_user(request)
    values = validate(request.json_object(), PASSWORD_CHANGE)
    problem = password_problem(values["new_password"], user["email"])
    if problem:
        raise ValidationFailed({"new_password": problem})
    # A stolen access token must not become a way to guess the password: the check counts
    # against the same lockout as logins do.
    key = email_key(user["email"])
    auth.lockout.begin_attempt(key)
    row = auth.users.by_id(user["id"])
    if not verify_password(values["current_password"], row["password_hash"]):
        raise Forbidden("current_password is wrong")
    auth.lockout.forgive(key)
    new_hash = hash_password(values["new_password"], auth.scrypt)  # slow: before taking the lock
    with auth.db.transaction():
        auth.users.set_password_hash(user["id"], new_hash)
        auth.refresh_tokens.revoke_all(user["id"])
    return no_content()


app.use(require_user)


# =============================================================================================
# Command line
# =============================================================================================

def scrypt_cost(text):
    """`--scrypt-n`: a power of two from 2^10 (tests) to 2^17 (128 MiB of memory per hash)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not (2**10 <= value <= 2**17 and value & (value - 1) == 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a power of two from 1024 to 131072")
    return value


# A token or session lifetime: from a second (shorter is a typo, not a policy) to lib's cap.
at_least_a_second = bounded(float, "a duration in seconds of at least 1", at_least=1, below=10**6)


def add_auth_arguments(parser, name):
    """The flags of every project that signs tokens and checks passwords; `name` is the
    default issuer and audience."""
    parser.add_argument("--secret", help="HMAC secret for tokens, at least 32 bytes (default: the "
                        "JWT_SECRET environment variable, else one generated and kept in the db)")
    parser.add_argument("--issuer", default=name, help=f"the tokens' iss claim (default {name})")
    parser.add_argument("--audience", default=name, help=f"the tokens' aud claim (default {name})")
    parser.add_argument("--access-ttl", type=at_least_a_second, default=900.0,
                        help="seconds an access token is valid (default 900)")
    parser.add_argument("--refresh-ttl", type=at_least_a_second, default=30 * 24 * 3600.0,
                        help="seconds a refresh token is valid (default 30 days)")
    add_password_arguments(parser)


def add_password_arguments(parser):
    """The flags of every project that checks passwords (read by `Credentials.from_args`)."""
    parser.add_argument("--scrypt-n", type=scrypt_cost, default=DEFAULT_SCRYPT.n,
                        help=f"scrypt cost N for new hashes, a power of two (default {DEFAULT_SCRYPT.n}; "
                             f"raising it re-hashes each password at its next login)")
    parser.add_argument("--lockout-s", type=seconds, default=900.0,
                        help="window in which 5 failed logins lock an email (default 900; 0: off)")


def resolve_secret(args, db):
    """`--secret`, else `JWT_SECRET`, else the one kept in the database. A given secret
    shorter than 32 bytes exits with status 2 (RFC 7518 §3.2: at least the hash's size)."""
    for source, value in (("--secret", args.secret), ("JWT_SECRET", os.environ.get("JWT_SECRET"))):
        if value is not None:
            secret = value.encode("utf-8")
            if len(secret) < MIN_SECRET_BYTES:
                exit_usage_error(f"{source} must be at least {MIN_SECRET_BYTES} bytes "
                                 f"(it has {len(secret)})")
            return secret
    return load_or_create_secret(db)


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    app.state.auth = Auth.from_args(db, args)
    app.run(args)


if __name__ == "__main__":
    main()
