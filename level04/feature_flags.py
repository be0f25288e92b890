"""Feature flags — switch features on for some users, per environment, without a deploy.

What it teaches
  - A flag is data the code asks about at run time: `enabled`, `variants` (`{name: value}`; a
    flag without them is boolean, `on`/`off`), ordered targeting `rules`, `weights` that split
    users among variants and a `rollout` percentage. Each environment (`development`,
    `staging`, `production`, `?env=`) has its own flags: one key there is two flags.
  - Evaluation, in one fixed order, answered with OpenFeature's reasons: disabled → `off` or
    the default variant (`DISABLED`); the first rule that matches → its `serve`
    (`TARGETING_MATCH`); `weights` → the user's share (`SPLIT`); `rollout` → `on` inside it
    (`SPLIT`), `off` outside (`DEFAULT`); else `on` or the default variant (`STATIC` when the
    flag has no rules, `DEFAULT` when none matched); `ERROR` when it cannot be evaluated.
  - Sticky bucketing: `sha256(flag_key + ":" + user_key)` → a bucket 0–9999. The same user lands
    in the same bucket every time, on every server, with nothing stored, and a rollout takes
    buckets below `rollout * 100`: a user who is in at 10 % is still in at 20 %.
  - Two credentials: `--admin-token` manages flags, `--sdk-key` (Bearer or `X-API-Key`, as SDKs
    send it) only evaluates and listens. An SDK key on an admin route is a 403, a wrong token a
    401 with `WWW-Authenticate`.
  - The OpenFeature Remote Evaluation Protocol (OFREP): `/ofrep/v1/evaluate/flags[/{key}]` with
    its own request, answer and error shapes (`{"key", "errorCode", "errorDetails"}`, not problem
    documents), so an OpenFeature SDK's OFREP provider evaluates here unchanged.
  - Change propagation three ways: `ETag`/`If-None-Match` on `GET /flags` (cheap polling),
    Server-Sent Events on `GET /stream` (a push within a second, `Last-Event-ID` resume), and the
    history of every change (who, when, before/after), which is also what the stream replays.
  - The hot path: flags live in memory per environment, and evaluations are cached by (flag,
    context); a change clears that environment's caches. No SQL runs for an evaluation.

Standards: OpenFeature (reasons, OFREP), HTML Living Standard §9.2 (Server-Sent Events),
RFC 9110 (ETag, If-None-Match, If-Match, 401/403), RFC 6750 (bearer tokens), RFC 9457 (problem
details), Semantic Versioning 2.0.0 (the semver_* operators).

Left out: segments shared between flags, scheduled changes, flag dependencies, approvals,
per-user audit identities (the admin token is one identity; `X-Actor` names who acts),
client-side SDK bootstrapping. feature_flags.md's "In production" says who does those.

    python level04/feature_flags.py [--admin-token T] [--sdk-key K] [--db PATH]
"""
import asyncio
import collections
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed,
                 created, json_response, no_content)
from lib.listing import list_params, page
from lib.request import Query, utc_timestamp
from lib.response import Response, StreamingResponse
from lib.routing import PAGE, PAGE_ANSWER
from lib.validation import Boolean, Choice, Field, Invalid, Text, body_schema, validate
from level01.counter import etag
from level03.jwt_auth import bearer_token

app = App("feature_flags", "Feature flags per environment: targeting rules, sticky rollouts, "
          "OpenFeature reasons, OFREP, ETag polling and an SSE change stream.", port=8016)

SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    env         TEXT NOT NULL,             -- development, staging or production
    key         TEXT NOT NULL,
    definition  TEXT NOT NULL,             -- JSON: description, enabled, variants, rules, ...
    version     INTEGER NOT NULL,          -- the ETag
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (env, key)
);
CREATE TABLE IF NOT EXISTS changes (
    id      INTEGER PRIMARY KEY,           -- also the SSE event id: Last-Event-ID resumes after it
    env     TEXT NOT NULL,
    key     TEXT NOT NULL,
    action  TEXT NOT NULL,                 -- created, updated, deleted
    who     TEXT NOT NULL,
    at      TEXT NOT NULL,
    before  TEXT,                          -- the flag's JSON before (NULL when created)
    after   TEXT                           -- and after (NULL when deleted)
);
CREATE INDEX IF NOT EXISTS changes_by_flag ON changes (env, key, id);
CREATE INDEX IF NOT EXISTS changes_by_env ON changes (env, id);
"""

ENVIRONMENTS = ("development", "staging", "production")
DEFAULT_ENV = "production"
ENV = Query("env", f"the environment (default {DEFAULT_ENV})", ENVIRONMENTS, DEFAULT_ENV)
KEY = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
KEY_SCHEMA = {"key": {"pattern": f"^{KEY}$"}}
BOOLEAN_VARIANTS = {"on": True, "off": False}

# =============================================================================================
# Flag definitions: fields and their checks
# =============================================================================================

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_VARIANTS = 50
MAX_RULES = 100
MAX_VALUES = 1000
SINGLE_VALUE_OPS = {"eq", "neq", "gt", "gte", "lt", "lte",
                    "semver_eq", "semver_gt", "semver_gte", "semver_lt", "semver_lte"}
ANY_OF_OPS = {"in", "not_in", "contains", "starts_with", "ends_with"}
OPERATORS = sorted(SINGLE_VALUE_OPS | ANY_OF_OPS)
SEMVER = re.compile(r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?")


def semver_key(text):
    """A comparable key of a semantic version (SemVer 2.0.0 §11): a pre-release sorts before its
    release, numeric identifiers numerically and before alphanumeric ones. None if not one."""
    match = SEMVER.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    pre_key = (1,) if pre is None else (0, *((0, int(p), "") if p.isdigit() else (1, 0, p)
                                           for p in pre.split(".")))
    return int(major), int(minor), int(patch), pre_key


class Variants(Field):
    """A variant's value is one OFREP can serve: a boolean, string, number or object, or null
    (OFREP's "code default": the SDK answers the default its caller passed). Not an array."""

    def shape(self):
        return {"type": "object", "minProperties": 1, "maxProperties": MAX_VARIANTS,
                "propertyNames": {"pattern": f"^{VARIANT_NAME.pattern}$"},
                "additionalProperties": {"type": ["boolean", "string", "number", "object",
                                                  "null"]},
                "description": "{name: value}; leave out for a boolean flag (on/off)"}

    def clean(self, value):
        if not isinstance(value, dict) or not 1 <= len(value) <= MAX_VARIANTS:
            raise Invalid(f"must be an object of 1–{MAX_VARIANTS} variants")
        if not all(VARIANT_NAME.fullmatch(name) for name in value):
            raise Invalid("variant names must be 1–64 of A–Z, a–z, 0–9, '_', '.', '-'")
        if any(isinstance(served, list) for served in value.values()):
            raise Invalid("a variant's value is a boolean, string, number, object or null; "
                          "OFREP serves no arrays")
        return value


class Weights(Field):
    def shape(self):
        return {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0,
                                                           "maximum": 100},
                "description": "{variant: percent}, whole percents adding up to 100"}

    def clean(self, value):
        if not isinstance(value, dict) or not all(
                type(share) is int and 0 <= share <= 100 for share in value.values()):
            raise Invalid("must be an object of variant: whole percent (0–100)")
        if sum(value.values()) != 100:
            raise Invalid("must add up to 100")
        return value


class Rollout(Field):
    def shape(self):
        return {"type": "number", "minimum": 0, "maximum": 100,
                "description": "percent of users who get `on` (boolean flags), to 0.01"}

    def clean(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise Invalid("must be a number from 0 to 100")
        return value


RULE_SCHEMA = {"type": "object", "required": ["attribute", "op", "values", "serve"],
               "additionalProperties": False,
               "properties": {"attribute": {"type": "string", "minLength": 1, "maxLength": 100},
                              "op": {"enum": OPERATORS},
                              "values": {"type": "array", "minItems": 1, "maxItems": MAX_VALUES},
                              "serve": {"type": "string"}},
               "anyOf": [{"properties": {"op": {"enum": sorted(SINGLE_VALUE_OPS)},
                                         "values": {"maxItems": 1}}},
                         {"properties": {"op": {"enum": sorted(ANY_OF_OPS)}}}]}


def check_rule(rule):
    if not isinstance(rule, dict) or set(rule) != set(RULE_SCHEMA["required"]):
        raise Invalid('each rule is {"attribute", "op", "values", "serve"}')
    attribute, op, values, serve = (rule[name] for name in ("attribute", "op", "values", "serve"))
    if not isinstance(attribute, str) or not 1 <= len(attribute) <= 100:
        raise Invalid("a rule's attribute is a name of 1–100 characters")
    if op not in OPERATORS:
        raise Invalid(f"a rule's op is one of {', '.join(OPERATORS)}")
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_VALUES:
        raise Invalid(f"a rule's values are a list of 1–{MAX_VALUES}")
    if op in SINGLE_VALUE_OPS and len(values) != 1:
        raise Invalid(f"op {op} compares with exactly one value")
    if op.startswith("semver_") and semver_key(values[0]) is None:
        raise Invalid(f"op {op} needs a semantic version like 1.4.0")
    if op in ("gt", "gte", "lt", "lte") and not comparable(values[0]):
        raise Invalid(f"op {op} compares with a number or a string")
    if op in ("contains", "starts_with", "ends_with") and not all(isinstance(v, str) for v in values):
        raise Invalid(f"op {op} needs string values")
    if not isinstance(serve, str):
        raise Invalid("a rule's serve names a variant")
    return rule


class Rules(Field):
    def shape(self):
        return {"type": "array", "maxItems": MAX_RULES, "items": RULE_SCHEMA,
                "description": "ordered targeting rules: the first that matches serves"}

    def clean(self, value):
        if not isinstance(value, list) or len(value) > MAX_RULES:
            raise Invalid(f"must be a list of at most {MAX_RULES} rules")
        return [check_rule(rule) for rule in value]


DEFINITION = {
    "description": Text(0, 500, default=""),
    "enabled": Boolean(required=True),
    "variants": Variants(nullable=True, default=None),
    "default_variant": Text(1, 64, nullable=True, default=None,
                            description="the variant served by default (flags with variants)"),
    "weights": Weights(nullable=True, default=None),
    "rules": Rules(default=list),
    "rollout": Rollout(nullable=True, default=None),
}
NEW_FLAG = {"key": Text(1, 64, required=True, strip=False, pattern=KEY,
                        pattern_text="must be 1–64 of A–Z, a–z, 0–9, '_', '.', '-'"),
            **DEFINITION}
SERVER_OWNED = {"env", "version", "created_at", "updated_at"}


def check_definition(definition):
    """What relates fields to each other, which one field's check cannot see; one 422."""
    variants = definition["variants"] or BOOLEAN_VARIANTS
    errors = {}
    if definition["variants"] is None:
        if definition["default_variant"] is not None:
            errors["default_variant"] = "a boolean flag (no variants) has none: on and off"
    elif definition["default_variant"] not in variants:
        errors["default_variant"] = "must name one of the variants"
    if definition["rollout"] is not None and definition["variants"] is not None:
        errors["rollout"] = "is for boolean flags; split variants with weights"
    if definition["weights"] and not set(definition["weights"]) <= set(variants):
        errors["weights"] = "must name only the flag's variants"
    if any(rule["serve"] not in variants for rule in definition["rules"]):
        errors["rules"] = "every rule's serve must name one of the flag's variants"
    if errors:
        raise ValidationFailed(errors)


def render_flag(env, key, definition, version, created_at, updated_at):
    return {"key": key, "env": env, **definition, "version": version,
            "created_at": created_at, "updated_at": updated_at}


def row_flag(row):
    return render_flag(row["env"], row["key"], json.loads(row["definition"]), row["version"],
                       row["created_at"], row["updated_at"])


# =============================================================================================
# Evaluation
# =============================================================================================

class EvaluationError(Exception):
    """A flag that cannot be evaluated for this context: an OpenFeature error code and why."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


def bucket(flag_key, user_key):
    """0–9999, the same for one flag and user everywhere and always: rollouts stay sticky."""
    digest = hashlib.sha256(f"{flag_key}:{user_key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def comparable(value):
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def ordered(a, b):
    """a and b can be compared with < (two numbers, or two strings)."""
    return comparable(a) and comparable(b) and isinstance(a, str) == isinstance(b, str)


COMPARE = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
           "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}


def rule_matches(rule, context):
    """A rule on an attribute the context lacks never matches (neq and not_in included): a rule
    says something about users who have the attribute."""
    name, op, values = rule["attribute"], rule["op"], rule["values"]
    if name not in context:
        return False
    actual = context[name]
    if op == "eq":
        return actual == values[0]
    if op == "neq":
        return actual != values[0]
    if op == "in":
        return actual in values
    if op == "not_in":
        return actual not in values
    if op in COMPARE:
        return ordered(actual, values[0]) and COMPARE[op](actual, values[0])
    if op.startswith("semver_"):
        mine, theirs = semver_key(actual), semver_key(values[0])
        return mine is not None and COMPARE.get(op[7:], lambda a, b: a == b)(mine, theirs)
    if op == "contains" and isinstance(actual, list):   # {"groups": ["beta", ...]}
        return any(value in actual for value in values)
    if not isinstance(actual, str):
        return False
    test = {"contains": str.__contains__, "starts_with": str.startswith,
            "ends_with": str.endswith}[op]
    return any(test(actual, value) for value in values)


def user_key(context, flag_key):
    key = context.get("key")
    if not isinstance(key, str) or not key:
        raise EvaluationError("TARGETING_KEY_MISSING",
                              f"flag {flag_key} splits users: the context needs a key (targetingKey)")
    return key


def evaluate(flag, context):
    """(variant, reason) of `flag` for `context`: the order of the module docstring."""
    boolean = flag["variants"] is None
    default = "on" if boolean else flag["default_variant"]
    if not flag["enabled"]:
        return ("off" if boolean else default), "DISABLED"
    for rule in flag["rules"]:
        if rule_matches(rule, context):
            return rule["serve"], "TARGETING_MATCH"
    if flag["weights"]:
        point, edge = bucket(flag["key"], user_key(context, flag["key"])), 0
        for variant, share in flag["weights"].items():
            edge += share * 100
            if point < edge:
                return variant, "SPLIT"
    if flag["rollout"] is not None:
        inside = bucket(flag["key"], user_key(context, flag["key"])) < round(flag["rollout"] * 100)
        return ("on", "SPLIT") if inside else ("off", "DEFAULT")
    return default, ("DEFAULT" if flag["rules"] else "STATIC")


def resolution(flag, context):
    """{"value", "variant", "reason"}, or an ERROR resolution with its code."""
    try:
        variant, reason = evaluate(flag, context)
    except EvaluationError as error:
        return {"value": None, "variant": None, "reason": "ERROR", "error_code": error.code,
                "error_details": error.details}
    return {"value": (flag["variants"] or BOOLEAN_VARIANTS)[variant], "variant": variant,
            "reason": reason}


class FlagStore:
    """Each environment's flags in memory, and the evaluations done with them (by flag and
    context, bounded): the hot path runs no SQL. A change writes sqlite first, then `changed`
    drops that environment's memory; a generation counter keeps a load that began before the
    change from putting old flags back (as url_shortener's LinkCache)."""

    RESULTS = 50_000

    def __init__(self, db):
        self.db = db
        self.lock = threading.Lock()
        self.flags = {}          # env -> {key: flag}
        self.results = {}        # env -> OrderedDict((key, context json) -> resolution)
        self.generation = dict.fromkeys(ENVIRONMENTS, 0)
        self.last_change = dict.fromkeys(ENVIRONMENTS, 0)
        with db.reading() as conn:
            for env, last in conn.execute("SELECT env, max(id) FROM changes GROUP BY env"):
                self.last_change[env] = last

    def environment(self, env):
        with self.lock:
            flags = self.flags.get(env)
            generation = self.generation[env]
        if flags is None:
            with self.db.reading() as conn:
                flags = {row["key"]: row_flag(row) for row in
                         conn.execute("SELECT * FROM flags WHERE env = ? ORDER BY key", (env,))}
            with self.lock:
                if generation == self.generation[env]:
                    self.flags[env] = flags
                    self.results[env] = collections.OrderedDict()
        return flags

    def resolve(self, env, key, context, text):
        """The resolution of flag `key` for `context` (`text`: its canonical JSON), or None
        when the environment has no such flag."""
        with self.lock:
            generation = self.generation[env]
            cached = self.results.get(env, {}).get((key, text))
        if cached is not None:
            return cached
        flag = self.environment(env).get(key)
        if flag is None:
            return None
        answer = resolution(flag, context)
        with self.lock:
            results = self.results.get(env)
            if results is not None and generation == self.generation[env]:
                results[(key, text)] = answer
                if len(results) > self.RESULTS:
                    results.popitem(last=False)
        return answer

    def changed(self, env, change_id):
        with self.lock:
            self.generation[env] += 1
            self.flags.pop(env, None)
            self.results.pop(env, None)
            self.last_change[env] = max(self.last_change[env], change_id)


def context_text(context):
    """The cache key of a context: canonical JSON (sorted keys), so equal contexts share it."""
    return json.dumps(context, sort_keys=True, separators=(",", ":"))


# =============================================================================================
# Credentials
# =============================================================================================

def presented_token(request):
    return bearer_token(request) or request.header("X-API-Key")


def is_token(presented, expected):
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode())


def require_admin(request):
    token = bearer_token(request)
    if not token:
        raise Unauthorized("send the admin token: Authorization: Bearer <token>",
                           www_authenticate='Bearer realm="flags admin"')
    if is_token(token, app.state.sdk_key):
        raise Forbidden("the SDK key evaluates flags; managing them needs the admin token")
    if not is_token(token, app.state.admin_token):
        raise Unauthorized("the token is not valid here",
                           www_authenticate='Bearer realm="flags admin", error="invalid_token"')


def require_sdk(request):
    """The SDK key (or the admin token) as Bearer or X-API-Key: what OFREP providers send."""
    token = presented_token(request)
    if not token:
        raise Unauthorized("send the SDK key: Authorization: Bearer <key> or X-API-Key: <key>",
                           www_authenticate='Bearer realm="flags"')
    if not (is_token(token, app.state.sdk_key) or is_token(token, app.state.admin_token)):
        raise Unauthorized("the SDK key is not valid",
                           www_authenticate='Bearer realm="flags", error="invalid_token"')


ACTOR = re.compile(r"[ -~]{1,100}")


def actor(request):
    """Who makes a change, for the history: the `X-Actor` header, else "admin" (the token is
    shared, so the header is a label, not an identity)."""
    who = request.header("X-Actor", "admin")
    if not ACTOR.fullmatch(who):
        raise BadRequest("X-Actor must be 1–100 printable ASCII characters",
                         errors=[{"field": "X-Actor", "message": "1–100 printable ASCII"}])
    return who


# =============================================================================================
# Flags: create, read, change, delete (admin token)
# =============================================================================================

def record_change(conn, env, key, action, who, before, after):
    cursor = conn.execute(
        "INSERT INTO changes (env, key, action, who, at, before, after) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (env, key, action, who, utc_timestamp(),
         None if before is None else json.dumps(before), None if after is None else json.dumps(after)))
    return cursor.lastrowid


def stored_flag(conn, env, key):
    row = conn.execute("SELECT * FROM flags WHERE env = ? AND key = ?", (env, key)).fetchone()
    if row is None:
        raise NotFound(f"no flag {key} in {env}")
    return row_flag(row)


def definition_of(flag):
    return {name: flag[name] for name in DEFINITION}


ADMIN = {401: "No or an invalid admin token", 403: "An SDK key: it cannot manage flags"}
ONE_FLAG = {**ADMIN, 404: "No such flag in this environment"}


@app.post("/flags", query=[ENV], request_schema=body_schema(NEW_FLAG), status=201,
          body_limit=256 * 1024,
          responses={201: "The flag", 409: "The key exists in this environment", **ADMIN})
def create_flag(request):
    """Create a flag in one environment (admin token)"""
    require_admin(request)
    env = ENV.read(request)
    values = validate(request.json_object(), NEW_FLAG, read_only=SERVER_OWNED)
    key = values.pop("key")
    check_definition(values)
    who, now = actor(request), utc_timestamp()
    try:
        with app.state.db.transaction() as conn:
            conn.execute("INSERT INTO flags (env, key, definition, version, created_at, updated_at) "
                         "VALUES (?, ?, ?, 1, ?, ?)", (env, key, json.dumps(values), now, now))
            flag = render_flag(env, key, values, 1, now, now)
            change = record_change(conn, env, key, "created", who, None, flag)
    except sqlite3.IntegrityError:
        raise Conflict(f"the flag {key} exists in {env}",
                       errors=[{"field": "key", "message": "exists in this environment"}]) from None
    app.state.flags.changed(env, change)
    return created(flag, f"/flags/{key}?env={env}", {"ETag": etag(1)})


@app.get("/flags", query=[ENV, *PAGE], response_schema=PAGE_ANSWER,
         responses={200: "The environment's flags, by key; ETag for If-None-Match",
                    304: {"description": "Nothing changed since the ETag sent"}, **ADMIN})
def list_flags(request):
    """List an environment's flags (admin token; If-None-Match → 304)"""
    require_admin(request)
    env = ENV.read(request)
    limit, after = list_params(request, (str,))
    # The tag names the environment's last change and the page asked for: any change anywhere
    # in the environment makes a new one, so a poller's 304 is never stale.
    tag = '"%s"' % hashlib.sha256(
        f"{env}:{app.state.flags.last_change[env]}:{limit}:{after}".encode()).hexdigest()[:20]
    if request.if_none_match(tag):
        return Response(b"", 304, {"ETag": tag})
    flags = sorted(app.state.flags.environment(env).values(), key=lambda flag: flag["key"])
    if after:
        flags = [flag for flag in flags if flag["key"] > after[0]]
    return json_response(page(flags[:limit + 1], limit, lambda flag: [flag["key"]]),
                         headers={"ETag": tag, "Cache-Control": "no-cache"})


@app.get("/flags/{key}", query=[ENV], path_schemas=KEY_SCHEMA,
         responses={200: "The flag, with its ETag", **ONE_FLAG})
def read_flag(request, key):
    """Read a flag (admin token)"""
    require_admin(request)
    env = ENV.read(request)
    with app.state.db.reading() as conn:
        flag = stored_flag(conn, env, key)
    return json_response(flag, headers={"ETag": etag(flag["version"])})


@app.patch("/flags/{key}", query=[ENV], path_schemas=KEY_SCHEMA, if_match=True,
           request_schema=body_schema(DEFINITION, partial=True), body_limit=256 * 1024,
           responses={200: "The changed flag", **ONE_FLAG})
def change_flag(request, key):
    """Change some of a flag's fields (admin token; If-Match: its ETag)"""
    require_admin(request)
    env = ENV.read(request)
    changes = validate(request.json_object(), DEFINITION, partial=True,
                       read_only=SERVER_OWNED | {"key"})
    who = actor(request)
    with app.state.db.transaction() as conn:
        before = stored_flag(conn, env, key)
        request.require_if_match(etag(before["version"]))
        definition = {**definition_of(before), **changes}
        check_definition(definition)
        if definition == definition_of(before):
            return json_response(before, headers={"ETag": etag(before["version"])})
        after = render_flag(env, key, definition, before["version"] + 1, before["created_at"],
                            utc_timestamp())
        conn.execute("UPDATE flags SET definition = ?, version = ?, updated_at = ? "
                     "WHERE env = ? AND key = ?",
                     (json.dumps(definition), after["version"], after["updated_at"], env, key))
        change = record_change(conn, env, key, "updated", who, before, after)
    app.state.flags.changed(env, change)
    return json_response(after, headers={"ETag": etag(after["version"])})


@app.delete("/flags/{key}", query=[ENV], path_schemas=KEY_SCHEMA, if_match=True, status=204,
            responses={204: "Deleted; its history stays", **ONE_FLAG})
def delete_flag(request, key):
    """Delete a flag (admin token; If-Match: its ETag)"""
    require_admin(request)
    env = ENV.read(request)
    who = actor(request)
    with app.state.db.transaction() as conn:
        before = stored_flag(conn, env, key)
        request.require_if_match(etag(before["version"]))
        conn.execute("DELETE FROM flags WHERE env = ? AND key = ?", (env, key))
        change = record_change(conn, env, key, "deleted", who, before, None)
    app.state.flags.changed(env, change)
    return no_content()


def render_change(row):
    return {"id": row["id"], "action": row["action"], "who": row["who"], "at": row["at"],
            "before": row["before"] and json.loads(row["before"]),
            "after": row["after"] and json.loads(row["after"])}


@app.get("/flags/{key}/history", query=[ENV, *PAGE], path_schemas=KEY_SCHEMA,
         response_schema=PAGE_ANSWER,
         responses={200: "Every change, newest first: who, when, before and after",
                    **ADMIN, 404: "The key never existed in this environment"})
def flag_history(request, key):
    """A flag's changes, newest first (admin token); kept after a deletion"""
    require_admin(request)
    env = ENV.read(request)
    limit, after = list_params(request, (int,))
    with app.state.db.reading() as conn:
        rows = conn.execute(
            "SELECT * FROM changes WHERE env = ? AND key = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (env, key, after[0] if after else 2**63 - 1, limit + 1)).fetchall()
    if not rows and not after:
        raise NotFound(f"the flag {key} never existed in {env}")
    return page(rows, limit, lambda row: [row["id"]], render_change)


# =============================================================================================
# Evaluation (SDK key): this server's own shape
# =============================================================================================

EVALUATION_REQUEST = {"type": "object", "additionalProperties": False,
                      "properties": {"env": {"enum": list(ENVIRONMENTS)},
                                     "context": {"type": "object"}}}
RESOLUTION = {"type": "object", "required": ["value", "variant", "reason"],
              "properties": {"value": {}, "variant": {"type": ["string", "null"]},
                             "reason": {"enum": ["DISABLED", "TARGETING_MATCH", "SPLIT",
                                                 "DEFAULT", "STATIC", "ERROR"]}}}
SDK = {401: "No or an invalid SDK key"}
EVALUATION_FIELDS = {"env": Choice(ENVIRONMENTS, default=DEFAULT_ENV),
                     "context": Field(default=dict)}


def evaluation_input(request):
    values = validate(request.json_object(required=False), EVALUATION_FIELDS)
    context = values["context"]
    if not isinstance(context, dict):
        raise ValidationFailed({"context": "must be an object"})
    return values["env"], context


@app.post("/evaluate", request_schema=EVALUATION_REQUEST, body_required=False,
          response_schema={"type": "object", "required": ["flags"],
                           "properties": {"flags": {"type": "object",
                                                    "additionalProperties": RESOLUTION}}},
          responses={200: "Every flag of the environment, evaluated", **SDK})
def evaluate_all(request):
    """Evaluate every flag for a context (SDK key)"""
    require_sdk(request)
    env, context = evaluation_input(request)
    store, text = app.state.flags, context_text(context)
    return {"flags": {key: store.resolve(env, key, context, text)
                      for key in list(store.environment(env))}}


@app.post("/evaluate/{key}", path_schemas=KEY_SCHEMA, request_schema=EVALUATION_REQUEST,
          body_required=False, response_schema=RESOLUTION,
          responses={200: "The flag's value, variant and reason", **SDK,
                     404: "No such flag in this environment"})
def evaluate_one(request, key):
    """Evaluate one flag for a context (SDK key)"""
    require_sdk(request)
    env, context = evaluation_input(request)
    answer = app.state.flags.resolve(env, key, context, context_text(context))
    if answer is None:
        raise NotFound(f"no flag {key} in {env}")
    return answer


# =============================================================================================
# OFREP: the OpenFeature Remote Evaluation Protocol
# =============================================================================================

class OfrepError(Exception):
    def __init__(self, status, code, details):
        super().__init__(details)
        self.status, self.code, self.details = status, code, details


def ofrep_error(error, key=None):
    """OFREP's error body, plain application/json (its providers read `errorCode`)."""
    body = {"errorCode": error.code, "errorDetails": error.details}
    return json_response({"key": key, **body} if key is not None else body, error.status)


def ofrep_context(request):
    """The OFREP request's context, with `targetingKey` as the user key; a bad body is OFREP's
    PARSE_ERROR or INVALID_CONTEXT (400), never a problem document."""
    if request.body and request.content_type != "application/json":
        raise OfrepError(400, "PARSE_ERROR", "send the body as Content-Type: application/json")
    try:
        data = request.json() if request.body else {}   # no body: an empty context
    except BadRequest as error:
        raise OfrepError(400, "PARSE_ERROR", error.detail) from None
    context = data.get("context", {}) if isinstance(data, dict) else None
    if not isinstance(context, dict):
        raise OfrepError(400, "INVALID_CONTEXT", 'the body is {"context": {...}}, an object')
    targeting = context.get("targetingKey")
    if "targetingKey" in context and not isinstance(targeting, str):
        raise OfrepError(400, "INVALID_CONTEXT", "targetingKey must be a string")
    context = {name: value for name, value in context.items() if name != "targetingKey"}
    if targeting is not None:
        context["key"] = targeting
    return context


def ofrep_input(request):
    """(env, context) of an OFREP request; a bad `?env=` is OFREP's GENERAL error (400)."""
    try:
        env = ENV.read(request)
    except BadRequest as error:
        raise OfrepError(400, "GENERAL", error.detail) from None
    return env, ofrep_context(request)


def ofrep_success(key, answer):
    """OFREP's success; a null value is its code default, an answer without `value`."""
    value = {} if answer["value"] is None else {"value": answer["value"]}
    return {"key": key, **value, "variant": answer["variant"], "reason": answer["reason"],
            "metadata": {}}


OFREP_REQUEST = {"type": "object",
                 "properties": {"context": {"type": "object",
                                            "properties": {"targetingKey": {"type": "string"}}}}}
OFREP_SUCCESS = {"type": "object", "required": ["key", "variant", "reason"],
                 "properties": {"key": {"type": "string"},
                                "value": {"type": ["boolean", "string", "number", "object"],
                                          "description": "left out: use the code default"},
                                "variant": {"type": "string"}, "reason": {"type": "string"},
                                "metadata": {"type": "object"}}}
OFREP_ERROR_CODES = ["PARSE_ERROR", "TARGETING_KEY_MISSING", "INVALID_CONTEXT", "GENERAL",
                     "FLAG_NOT_FOUND"]
OFREP_FAILURE = {"type": "object", "required": ["errorCode"],
                 "properties": {"key": {"type": "string"}, "errorCode": {"enum": OFREP_ERROR_CODES},
                                "errorDetails": {"type": "string"}}}


def ofrep_answer(description):
    return {"description": description,
            "content": {"application/json": {"schema": OFREP_FAILURE}}}


@app.post("/ofrep/v1/evaluate/flags/{key}", query=[ENV], path_schemas=KEY_SCHEMA,
          request_schema=OFREP_REQUEST, body_required=False, response_schema=OFREP_SUCCESS,
          tags=["OFREP"],
          responses={200: "The evaluation: key, value, variant, reason, metadata", **SDK,
                     400: ofrep_answer("PARSE_ERROR, INVALID_CONTEXT, TARGETING_KEY_MISSING, "
                                       "or GENERAL for a bad ?env="),
                     404: ofrep_answer("FLAG_NOT_FOUND")})
def ofrep_evaluate(request, key):
    """OFREP single flag evaluation (SDK key; production unless ?env=)"""
    require_sdk(request)
    try:
        env, context = ofrep_input(request)
        answer = app.state.flags.resolve(env, key, context, context_text(context))
        if answer is None:
            raise OfrepError(404, "FLAG_NOT_FOUND", f"no flag {key} in {env}")
        if answer["reason"] == "ERROR":
            raise OfrepError(400, answer["error_code"], answer["error_details"])
    except OfrepError as error:
        return ofrep_error(error, key)
    return ofrep_success(key, answer)


OFREP_BULK = {"type": "object", "required": ["flags"],
              "properties": {"flags": {"type": "array",
                                       "items": {"anyOf": [OFREP_SUCCESS, OFREP_FAILURE]}},
                             "metadata": {"type": "object"}}}


@app.post("/ofrep/v1/evaluate/flags", query=[ENV], request_schema=OFREP_REQUEST,
          body_required=False, response_schema=OFREP_BULK, tags=["OFREP"],
          responses={200: "Every flag evaluated (an ERROR one as its error); ETag", **SDK,
                     304: {"description": "If-None-Match: nothing changed for this context"},
                     400: ofrep_answer("PARSE_ERROR, INVALID_CONTEXT or GENERAL (no key)")})
def ofrep_evaluate_all(request):
    """OFREP bulk evaluation (SDK key; production unless ?env=; If-None-Match → 304)"""
    require_sdk(request)
    try:
        env, context = ofrep_input(request)
    except OfrepError as error:
        return ofrep_error(error)
    store, text = app.state.flags, context_text(context)
    tag = '"%s"' % hashlib.sha256(f"{env}:{store.last_change[env]}:{text}".encode()).hexdigest()[:20]
    if request.if_none_match(tag):
        return Response(b"", 304, {"ETag": tag})
    flags = []
    for key in list(store.environment(env)):
        answer = store.resolve(env, key, context, text)
        flags.append({"key": key, "errorCode": answer["error_code"],
                      "errorDetails": answer["error_details"]}
                     if answer["reason"] == "ERROR" else ofrep_success(key, answer))
    return json_response({"flags": flags, "metadata": {}}, headers={"ETag": tag})


# =============================================================================================
# The change stream: Server-Sent Events
# =============================================================================================

POLL_S = 0.1          # how often a stream looks for new changes: well within the second promised
KEEPALIVE_S = 10.0    # a comment line now and then keeps proxies from closing a quiet stream


def sse_event(row):
    data = json.loads(row["after"]) if row["after"] else {"key": row["key"], "deleted": True}
    return f"id: {row['id']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventStream:
    """A Server-Sent Events stream that polls for what is new: a subclass says what is
    `pending()` after its `cursor` (as bytes, moving the cursor) and how the stream opens; this
    sends it as it comes, a keep-alive comment when it is quiet, and ends when the subclass sets
    `finished` (a last event) or its app drains (so SIGTERM exits soon). The asyncio transport
    iterates it asynchronously (it waits with `asyncio.sleep`, the event loop serves others
    meanwhile); the threaded transport iterates it as a plain generator in the connection's
    thread. job_processor, notification_queue and central_logging stream with it too."""

    def __init__(self, app, cursor):
        self.app, self.cursor = app, cursor
        self.quiet_since = time.monotonic()
        self.finished = False

    def pending(self):
        raise NotImplementedError

    def opening(self):
        return b"retry: 1000\n\n"

    def next_piece(self):
        """What to send now: new events, a keep-alive comment, or b"" (wait, then ask again)."""
        if self.app.draining and not self.finished:
            self.finished = True
            return b": the server is stopping\n\n"
        now = time.monotonic()
        if events := self.pending():
            self.quiet_since = now
            return events
        if now - self.quiet_since > KEEPALIVE_S:
            self.quiet_since = now
            return b": keep-alive\n\n"
        return b""

    async def __aiter__(self):
        yield self.opening()
        while not self.finished:
            if piece := self.next_piece():
                yield piece
            else:
                await asyncio.sleep(POLL_S)

    def __iter__(self):
        yield self.opening()
        while not self.finished:
            if piece := self.next_piece():
                yield piece
            else:
                time.sleep(POLL_S)


class ChangeStream(EventStream):
    """The changes of one environment after event id `cursor`, as SSE, for as long as the
    client listens."""

    def __init__(self, env, cursor):
        super().__init__(app, cursor)
        self.env = env

    def pending(self):
        """The events after the cursor, as bytes (b"" when there are none), moving the cursor."""
        if app.state.flags.last_change[self.env] <= self.cursor:
            return b""
        with app.state.db.reading() as conn:
            rows = conn.execute("SELECT * FROM changes WHERE env = ? AND id > ? ORDER BY id "
                                "LIMIT 500", (self.env, self.cursor)).fetchall()
        if rows:
            self.cursor = rows[-1]["id"]
        return "".join(map(sse_event, rows)).encode()

    def opening(self):
        return f"retry: 1000\n: changes of {self.env} after event {self.cursor}\n\n".encode()


@app.get("/stream", query=[ENV], media_type="text/event-stream",
         response_schema={"type": "string"},
         responses={200: "Server-Sent Events: id = change id, data = the flag's JSON, or "
                         '{"key", "deleted": true}', **SDK,
                    400: "A Last-Event-ID that is not an event id"})
def change_stream(request):
    """Every change of an environment as it happens (SDK key or admin token; Last-Event-ID)"""
    require_sdk(request)
    env = ENV.read(request)
    last = request.header("Last-Event-ID")
    if last is None:
        cursor = app.state.flags.last_change[env]
    elif last.isascii() and last.isdigit() and len(last) < 19:
        cursor = int(last)
    else:
        raise BadRequest("Last-Event-ID must be an event id this stream sent",
                         errors=[{"field": "Last-Event-ID", "message": "is not an event id"}])
    return StreamingResponse(ChangeStream(env, cursor), headers={"Cache-Control": "no-store"},
                             content_type="text/event-stream")


# =============================================================================================
# Command line
# =============================================================================================

def secret_flag(text):
    if not 8 <= len(text) <= 200 or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError
    return text


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--admin-token", type=secret_flag,
                        help="Bearer token for managing flags, 8–200 printable ASCII "
                             "(default: a random one, printed on stderr)")
    parser.add_argument("--sdk-key", type=secret_flag,
                        help="key SDKs evaluate with (Bearer or X-API-Key), 8–200 printable "
                             "ASCII (default: a random one, printed on stderr)")
    args = parser.parse_args(argv)
    if args.admin_token and args.admin_token == args.sdk_key:
        parser.error("--admin-token and --sdk-key must differ")
    state = app.state
    state.admin_token = args.admin_token or secrets.token_urlsafe(24)
    state.sdk_key = args.sdk_key or secrets.token_urlsafe(24)
    for flag, given, value in (("--admin-token", args.admin_token, state.admin_token),
                               ("--sdk-key", args.sdk_key, state.sdk_key)):
        if not given:
            sys.stderr.write(f"{flag} not given; this run's is {value}\n")
    state.db = app.open_database(args, SCHEMA)
    state.flags = FlagStore(state.db)
    app.run(args)


if __name__ == "__main__":
    main()
