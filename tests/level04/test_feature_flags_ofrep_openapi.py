"""level04/feature_flags.py's OFREP endpoints against OFREP's published OpenAPI definition.

ofrep_openapi.yaml is open-feature/protocol's service/openapi.yaml, vendored verbatim (its first
line names the commit). Every answer of an OFREP endpoint here is checked against what the file
declares for that operation: the status must be one it lists, and where it lists a body, the
Content-Type must be its media type and the JSON must validate against its schema ($refs
resolved); declared headers must validate too. Each operation is driven to every status the
server can give it: single evaluation 200 (each value type, each reason, a code default), 400
(PARSE_ERROR, INVALID_CONTEXT, TARGETING_KEY_MISSING, GENERAL), 404 (FLAG_NOT_FOUND), 401; bulk
evaluation 200 (with per-flag failures and an ETag), 304 (If-None-Match), 400, 401.

Three places where the file cannot be checked literally; `checkable_components` changes them
and asserts they still read as described, so a new version of the file shows up here:
  - evaluationSuccess's value is a `oneOf` of booleanFlag … objectFlag and codeDefaultFlag, but
    codeDefaultFlag (`properties: {}`) matches every object and integerFlag's values are also
    floatFlag's, so as written no answer with a value passes and any value (null, an array)
    passes as a code default. Checked as the file describes it: `anyOf` the typed values, and
    codeDefaultFlag is the answer *without* a value ("This schema has no `value` property").
  - The `reason` enum (STATIC, TARGETING_MATCH, SPLIT, DISABLED, UNKNOWN) lacks OpenFeature's
    DEFAULT. The protocol dropped the enum on purpose ("feat: Allow any reason", #20: OpenFeature
    reasons are open), and it came back with a documentation rewrite (#56). This server answers
    DEFAULT when no rule matched or a user is outside a rollout, as flagd does over OFREP, and
    the OpenFeature SDK's OFREP provider maps it to Reason.DEFAULT; DEFAULT is the one reason
    added, every other reason must be one of the file's.

Not covered: 403 and 429 (the server has no per-key permissions and no rate limit), 500 (no
input makes one), and answers given before the operation is reached (413 for a body over the
server's limit, 405 for another method), which are HTTP's, not the operation's.
"""
import copy
from pathlib import Path

import pytest
import requests

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

from tests.harness import describe_exchange, expect_problem   # noqa: E402
from tests.level04.test_feature_flags import (SDK, TIMEOUT, create, new_flag,   # noqa: E402,F401
                                              ofrep, server)

SPEC = yaml.safe_load(Path(__file__).with_name("ofrep_openapi.yaml").read_text(encoding="utf-8"))
SINGLE = "/ofrep/v1/evaluate/flags/{key}"
BULK = "/ofrep/v1/evaluate/flags"
REASONS_BEYOND_THE_FILE = ["DEFAULT"]


def checkable_components(spec):
    """The file's components, with the changes of the module docstring."""
    components = copy.deepcopy(spec["components"])
    schemas = components["schemas"]
    known, value_union = schemas["evaluationSuccess"]["allOf"]
    assert value_union == {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in (
        "booleanFlag", "stringFlag", "integerFlag", "floatFlag", "objectFlag", "codeDefaultFlag")]}
    value_union["anyOf"] = value_union.pop("oneOf")
    code_default = schemas["codeDefaultFlag"]
    assert code_default["properties"] == {} and "required" not in code_default
    code_default["not"] = {"required": ["value"]}
    reason = known["properties"]["reason"]
    assert "DEFAULT" not in reason["enum"]
    reason["enum"] = reason["enum"] + REASONS_BEYOND_THE_FILE
    return components


COMPONENTS = checkable_components(SPEC)


def schema_errors(instance, schema):
    validator = jsonschema.Draft202012Validator({**schema, "components": COMPONENTS})
    return [f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in validator.iter_errors(instance)]


def answered(resp, path):
    """The decoded body of an OFREP answer (None when the file declares none), after checking
    its status, headers, Content-Type and body against the file's POST `path` at that status."""
    declared = SPEC["paths"][path]["post"]["responses"]
    status = str(resp.status_code)
    assert status in declared, (f"POST {path} answered {status}; the file declares only "
                                f"{', '.join(declared)}\n{describe_exchange(resp)}")
    response = declared[status]
    for name, header in response.get("headers", {}).items():
        if name in resp.headers:
            errors = schema_errors(resp.headers[name], header["schema"])
            assert not errors, f"header {name}: {errors}\n{describe_exchange(resp)}"
    if "content" not in response:
        return None
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    expected = list(response["content"])
    assert media_type in expected, \
        f"Content-Type {media_type!r}, the file says {expected}\n{describe_exchange(resp)}"
    body = resp.json()
    errors = schema_errors(body, response["content"][media_type]["schema"])
    assert not errors, (f"POST {path} {status} breaks the file's schema: {errors}\n"
                        f"{describe_exchange(resp)}")
    return body


def post_raw(server, path, data, content_type="application/json", headers=SDK, params=None):
    return requests.post(server.url + path, data=data, params=params, timeout=TIMEOUT,
                         headers={**headers, "Content-Type": content_type})


def matches(instance, schema_name):
    return not schema_errors(instance, {"$ref": f"#/components/schemas/{schema_name}"})


CONTEXT = {"context": {"targetingKey": "user-1", "plan": "pro"}}


def test_the_file_defines_exactly_the_operations_exercised_here():
    operations = {(path, method) for path, item in SPEC["paths"].items() for method in item}
    assert operations == {(SINGLE, "post"), (BULK, "post")}


# --------------------------------------------------------------------------------------------
# Single evaluation: 200


@pytest.mark.parametrize("kind, flag, value", [
    ("boolean", {}, True),
    ("string", {"variants": {"a": "blue"}, "default_variant": "a"}, "blue"),
    ("integer", {"variants": {"a": 42}, "default_variant": "a"}, 42),
    ("float", {"variants": {"a": 0.25}, "default_variant": "a"}, 0.25),
    ("object", {"variants": {"a": {"color": "red", "sizes": [1, 2]}}, "default_variant": "a"},
     {"color": "red", "sizes": [1, 2]}),
])
def test_each_value_type_is_the_files_success(server, kind, flag, value):
    new_flag(server, key=f"type-{kind}", **flag)
    resp = ofrep(server, f"type-{kind}", CONTEXT)
    body = answered(resp, SINGLE)
    assert resp.status_code == 200 and body["key"] == f"type-{kind}"
    assert body["value"] == value and type(body["value"]) is type(value)
    assert matches(body, f"{kind}Flag")


PRO_RULE = [{"attribute": "plan", "op": "eq", "values": ["pro"], "serve": "off"}]


@pytest.mark.parametrize("key, flag, context, reason", [
    ("static", {}, {}, "STATIC"),
    ("rule-matched", {"rules": PRO_RULE}, {"plan": "pro"}, "TARGETING_MATCH"),
    ("no-rule-matched", {"rules": PRO_RULE}, {"plan": "free"}, "DEFAULT"),
    ("weights", {"variants": {"a": "A", "b": "B"}, "default_variant": "a",
                 "weights": {"a": 50, "b": 50}}, {}, "SPLIT"),
    ("rollout", {"rollout": 100}, {}, "SPLIT"),
    ("disabled", {"enabled": False}, {}, "DISABLED"),
])
def test_each_reason_is_the_files_success(server, key, flag, context, reason):
    new_flag(server, key=key, **flag)
    resp = ofrep(server, key, {"context": {"targetingKey": "user-1", **context}})
    body = answered(resp, SINGLE)
    assert resp.status_code == 200 and body["reason"] == reason and isinstance(body["variant"], str)


def test_a_null_variant_is_a_code_default_without_a_value(server):
    new_flag(server, key="code-default", variants={"inherit": None, "set": "x"},
             default_variant="inherit")
    resp = ofrep(server, "code-default", CONTEXT)
    body = answered(resp, SINGLE)
    assert resp.status_code == 200 and "value" not in body
    assert (body["variant"], body["reason"]) == ("inherit", "STATIC")
    assert matches(body, "codeDefaultFlag")
    bulk = answered(ofrep(server, body=CONTEXT), BULK)
    assert {"key": "code-default", "variant": "inherit", "reason": "STATIC", "metadata": {}} \
        in bulk["flags"]


def test_a_variant_value_no_ofrep_type_carries_is_refused(server):
    """OFREP's values are booleans, strings, numbers and objects (or none, a code default): an
    array variant could be stored but never served over OFREP."""
    problem = expect_problem(create(server, key="list-flag", variants={"a": [1, 2]},
                                    default_variant="a"), 422)
    assert [error["field"] for error in problem["errors"]] == ["variants"]


# --------------------------------------------------------------------------------------------
# Single evaluation: 400, 404, 401


def test_an_unknown_flag_is_the_files_flag_not_found(server):
    for key in ("no-such-flag", "not a key", "ä" * 70):
        resp = ofrep(server, key, CONTEXT)
        body = answered(resp, SINGLE)
        assert resp.status_code == 404
        assert (body["key"], body["errorCode"]) == (key, "FLAG_NOT_FOUND")


BAD_REQUESTS = [
    ("{oops", "application/json", "PARSE_ERROR"),
    (b'{"context": {"targetingKey": "\xff"}}', "application/json", "PARSE_ERROR"),
    ("[" * 100_000 + "]" * 100_000, "application/json", "PARSE_ERROR"),
    ('{"context": {"targetingKey": "u"}}', "text/plain", "PARSE_ERROR"),
    ('{"context": 5}', "application/json", "INVALID_CONTEXT"),
    ("null", "application/json", "INVALID_CONTEXT"),
    ('{"context": {"targetingKey": 7}}', "application/json", "INVALID_CONTEXT"),
]


@pytest.mark.parametrize("data, content_type, code", BAD_REQUESTS)
def test_a_bad_request_is_the_files_evaluation_failure(server, data, content_type, code):
    resp = post_raw(server, f"{BULK}/any-flag", data, content_type)
    body = answered(resp, SINGLE)
    assert resp.status_code == 400 and (body["key"], body["errorCode"]) == ("any-flag", code)


def test_a_split_without_a_targeting_key_is_the_files_evaluation_failure(server):
    new_flag(server, key="split-needs-key", rollout=50)
    resp = ofrep(server, "split-needs-key", {"context": {"plan": "pro"}})
    body = answered(resp, SINGLE)
    assert resp.status_code == 400 and body["errorCode"] == "TARGETING_KEY_MISSING"


def test_an_unknown_environment_is_the_files_general_failure(server):
    resp = ofrep(server, "any-flag", CONTEXT, env="qa")
    body = answered(resp, SINGLE)
    assert resp.status_code == 400 and body["errorCode"] == "GENERAL"


@pytest.mark.parametrize("path", [f"{BULK}/any-flag", BULK])
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-1"},
                                     {"Authorization": "Bearer wrong-key-1"}])
def test_a_missing_or_wrong_key_is_the_files_401(server, path, headers):
    resp = requests.post(server.url + path, json=CONTEXT, headers=headers, timeout=TIMEOUT)
    assert answered(resp, SINGLE if path != BULK else BULK) is None and resp.status_code == 401


# --------------------------------------------------------------------------------------------
# Bulk evaluation: 200, 304, 400


def test_bulk_is_the_files_success_with_failures_in_the_list_and_an_etag(server):
    new_flag(server, "staging", key="bulk-bool")
    new_flag(server, "staging", key="bulk-object", variants={"a": {"n": 1}}, default_variant="a")
    new_flag(server, "staging", key="bulk-split", rollout=50)
    resp = ofrep(server, body={"context": {"plan": "pro"}}, env="staging")
    body = answered(resp, BULK)
    assert resp.status_code == 200 and resp.headers["ETag"]
    by_key = {item["key"]: item for item in body["flags"]}
    assert by_key.keys() == {"bulk-bool", "bulk-object", "bulk-split"}
    assert matches(by_key["bulk-bool"], "evaluationSuccess")
    assert matches(by_key["bulk-object"], "objectFlag")
    assert matches(by_key["bulk-split"], "evaluationFailure")
    assert by_key["bulk-split"]["errorCode"] == "TARGETING_KEY_MISSING"


def test_bulk_if_none_match_is_the_files_304(server):
    new_flag(server, "development", key="bulk-cached")
    first = ofrep(server, body=CONTEXT, env="development")
    answered(first, BULK)
    again = requests.post(server.url + BULK, params={"env": "development"}, json=CONTEXT,
                          headers={**SDK, "If-None-Match": first.headers["ETag"]}, timeout=TIMEOUT)
    assert answered(again, BULK) is None and again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("data, content_type, code", BAD_REQUESTS)
def test_a_bad_bulk_request_is_the_files_bulk_failure(server, data, content_type, code):
    resp = post_raw(server, BULK, data, content_type)
    body = answered(resp, BULK)
    assert resp.status_code == 400 and body["errorCode"] == code


def test_a_bulk_request_for_an_unknown_environment_is_the_files_bulk_failure(server):
    resp = ofrep(server, body=CONTEXT, env="qa")
    body = answered(resp, BULK)
    assert resp.status_code == 400 and body["errorCode"] == "GENERAL"
