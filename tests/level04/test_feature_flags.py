"""level04/feature_flags.py, black-box: flags per environment, the two credentials, every
evaluation step and its OpenFeature reason, sticky bucketing, OFREP's shapes and error codes (and
the OpenFeature SDK's OFREP provider, when installed), ETag polling, the SSE stream with
Last-Event-ID resume, history, and the evaluation cache's invalidation.

One server serves most of the module; each test uses flag keys of its own.
"""
import hashlib
import importlib.util
import itertools
import json
import signal
import threading

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem

SCRIPT = "level04/feature_flags.py"
TIMEOUT = 10
ADMIN_TOKEN = "admin-secret-1"
SDK_KEY = "sdk-secret-1"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SDK = {"X-API-Key": SDK_KEY}


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--admin-token", ADMIN_TOKEN, "--sdk-key", SDK_KEY)


def create(server, env="production", headers=ADMIN, **flag):
    return requests.post(f"{server.url}/flags", params={"env": env}, json={"enabled": True, **flag},
                         headers=headers, timeout=TIMEOUT)


def new_flag(server, env="production", **flag):
    return expect_json(create(server, env, **flag), 201)


def evaluate(server, key, context, env="production"):
    resp = requests.post(f"{server.url}/evaluate/{key}", json={"env": env, "context": context},
                         headers=SDK, timeout=TIMEOUT)
    return expect_json(resp, 200)


def ofrep(server, key=None, body=None, env=None, headers=SDK):
    path = "/ofrep/v1/evaluate/flags" + (f"/{key}" if key else "")
    return requests.post(server.url + path, json=body if body is not None else {},
                         params={"env": env} if env else None, headers=headers, timeout=TIMEOUT)


def bucket(flag_key, user):
    return int.from_bytes(hashlib.sha256(f"{flag_key}:{user}".encode()).digest()[:8], "big") % 10_000


# --------------------------------------------------------------------------------------------
# Credentials


def test_admin_routes_need_the_admin_token(server):
    resp = create(server, headers={}, key="auth-a")
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = create(server, headers={"Authorization": "Bearer nope-nope"}, key="auth-a")
    expect_problem(wrong, 401)
    assert "invalid_token" in wrong.headers["WWW-Authenticate"]
    expect_problem(create(server, headers={"Authorization": f"Bearer {SDK_KEY}"}, key="auth-a"), 403)
    expect_problem(requests.get(f"{server.url}/flags", timeout=TIMEOUT), 401)


def test_evaluation_needs_the_sdk_key_as_bearer_or_x_api_key(server):
    new_flag(server, key="auth-b")
    url = f"{server.url}/evaluate/auth-b"
    resp = requests.post(url, json={}, timeout=TIMEOUT)
    expect_problem(resp, 401)
    assert "WWW-Authenticate" in resp.headers
    expect_problem(requests.post(url, json={}, headers={"X-API-Key": "wrong-key"}, timeout=TIMEOUT), 401)
    for headers in (SDK, {"Authorization": f"Bearer {SDK_KEY}"}):
        assert expect_json(requests.post(url, json={}, headers=headers, timeout=TIMEOUT), 200)["value"] is True


# --------------------------------------------------------------------------------------------
# Flags per environment, validation, ETags


def test_one_key_in_two_environments_is_two_flags(server):
    new_flag(server, "staging", key="env-a", enabled=True)
    new_flag(server, "production", key="env-a", enabled=False)
    assert evaluate(server, "env-a", {}, "staging")["value"] is True
    assert evaluate(server, "env-a", {}, "production")["reason"] == "DISABLED"
    expect_problem(requests.get(f"{server.url}/flags/env-a", params={"env": "development"},
                                headers=ADMIN, timeout=TIMEOUT), 404)
    expect_problem(create(server, "staging", key="env-a"), 409)
    expect_problem(requests.get(f"{server.url}/flags", params={"env": "qa"}, headers=ADMIN,
                                timeout=TIMEOUT), 400)


@pytest.mark.parametrize("flag, fields", [
    ({"variants": {"a": 1, "b": 2}, "default_variant": "c"}, ["default_variant"]),
    ({"variants": {"a": 1}, "default_variant": "a", "weights": {"a": 60}}, ["weights"]),
    ({"weights": {"on": 50, "off": 40}}, ["weights"]),
    ({"variants": {"a": 1}, "default_variant": "a", "weights": {"a": 50, "z": 50}}, ["weights"]),
    ({"variants": {"a": 1}, "default_variant": "a", "rollout": 10}, ["rollout"]),
    ({"rollout": 101}, ["rollout"]),
    ({"rules": [{"attribute": "x", "op": "like", "values": [1], "serve": "on"}]}, ["rules"]),
    ({"rules": [{"attribute": "x", "op": "eq", "values": [1, 2], "serve": "on"}]}, ["rules"]),
    ({"rules": [{"attribute": "x", "op": "semver_gte", "values": ["one"], "serve": "on"}]}, ["rules"]),
    ({"rules": [{"attribute": "x", "op": "eq", "values": [1], "serve": "maybe"}]}, ["rules"]),
    ({"enabled": "yes"}, ["enabled"]),
    ({"version": 7}, ["version"]),
])
def test_invalid_definitions_are_422_naming_the_field(server, flag, fields):
    problem = expect_problem(create(server, key="bad-flag", **flag), 422)
    assert [error["field"] for error in problem["errors"]] == fields


def test_patch_needs_a_current_if_match_and_records_history(server):
    new_flag(server, key="hist-a")
    resp = requests.patch(f"{server.url}/flags/hist-a", json={"enabled": False},
                          headers={**ADMIN, "If-Match": '"9"'}, timeout=TIMEOUT)
    expect_problem(resp, 412)
    resp = requests.patch(f"{server.url}/flags/hist-a", json={"enabled": False},
                          headers={**ADMIN, "If-Match": '"1"', "X-Actor": "ann"}, timeout=TIMEOUT)
    assert expect_json(resp, 200)["version"] == 2 and resp.headers["ETag"] == '"2"'
    expect(requests.delete(f"{server.url}/flags/hist-a", headers=ADMIN, timeout=TIMEOUT), 204)
    history = expect_json(requests.get(f"{server.url}/flags/hist-a/history", headers=ADMIN,
                                       timeout=TIMEOUT), 200)["items"]
    assert [c["action"] for c in history] == ["deleted", "updated", "created"]
    assert history[1]["who"] == "ann" and history[0]["who"] == "admin"
    assert history[1]["before"]["enabled"] is True and history[1]["after"]["enabled"] is False
    assert history[0]["after"] is None and history[2]["before"] is None
    assert all(c["at"].endswith("Z") for c in history)


def test_list_carries_an_etag_that_changes_with_any_flag(server):
    url, params = f"{server.url}/flags", {"env": "development"}
    first = requests.get(url, params=params, headers=ADMIN, timeout=TIMEOUT)
    tag = expect_json(first, 200) and first.headers["ETag"]
    cached = requests.get(url, params=params, headers={**ADMIN, "If-None-Match": tag}, timeout=TIMEOUT)
    assert cached.status_code == 304 and cached.content == b""
    new_flag(server, "development", key="etag-a")
    fresh = requests.get(url, params=params, headers={**ADMIN, "If-None-Match": tag}, timeout=TIMEOUT)
    assert "etag-a" in [f["key"] for f in expect_json(fresh, 200)["items"]]
    assert fresh.headers["ETag"] != tag


# --------------------------------------------------------------------------------------------
# Evaluation: the order and the reasons


def test_a_disabled_flag_serves_off_or_the_default_variant(server):
    new_flag(server, key="dis-a", enabled=False,
             rules=[{"attribute": "country", "op": "eq", "values": ["NL"], "serve": "on"}])
    new_flag(server, key="dis-b", enabled=False, variants={"a": "A", "b": "B"}, default_variant="b")
    assert evaluate(server, "dis-a", {"country": "NL"}) == \
        {"value": False, "variant": "off", "reason": "DISABLED"}
    assert evaluate(server, "dis-b", {}) == {"value": "B", "variant": "b", "reason": "DISABLED"}


def test_static_and_default_reasons(server):
    new_flag(server, key="static-a")
    new_flag(server, key="static-b", variants={"x": 1, "y": 2}, default_variant="y",
             rules=[{"attribute": "plan", "op": "eq", "values": ["pro"], "serve": "x"}])
    assert evaluate(server, "static-a", {}) == {"value": True, "variant": "on", "reason": "STATIC"}
    assert evaluate(server, "static-b", {"plan": "free"}) == {"value": 2, "variant": "y", "reason": "DEFAULT"}
    assert evaluate(server, "static-b", {"plan": "pro"}) == \
        {"value": 1, "variant": "x", "reason": "TARGETING_MATCH"}


OPERATOR_FLAGS = itertools.count()


@pytest.mark.parametrize("op, values, matching, other", [
    ("eq", ["NL"], "NL", "nl"), ("neq", ["NL"], "DE", "NL"),
    ("in", ["NL", "BE"], "BE", "DE"), ("not_in", ["NL", "BE"], "DE", "NL"),
    ("contains", ["@corp"], "ann@corp.example", "ann@example.com"),
    ("starts_with", ["adm"], "admin", "user"), ("ends_with", [".nl"], "x.nl", "x.de"),
    ("gt", [18], 19, 18), ("gte", [18], 18, 17), ("lt", [18], 17, 18), ("lte", [18], 18, 19),
    ("gt", [18], 19, "19"),
    ("semver_gte", ["1.10.0"], "1.10.0", "1.9.9"), ("semver_gte", ["1.10.0"], "2.0.0", "1.10.0-rc.1"),
    ("semver_lt", ["2.0.0"], "1.99.0", "2.0.0"),
])
def test_every_operator(server, op, values, matching, other):
    key = f"op-{next(OPERATOR_FLAGS)}"
    new_flag(server, key=key, rules=[{"attribute": "a", "op": op, "values": values, "serve": "off"}])
    assert evaluate(server, key, {"a": matching})["reason"] == "TARGETING_MATCH"
    assert evaluate(server, key, {"a": other})["reason"] == "DEFAULT"
    assert evaluate(server, key, {})["reason"] == "DEFAULT", "a missing attribute never matches"


def test_the_first_matching_rule_wins(server):
    new_flag(server, key="first-a", variants={"x": 1, "y": 2, "z": 3}, default_variant="z", rules=[
        {"attribute": "plan", "op": "eq", "values": ["pro"], "serve": "x"},
        {"attribute": "country", "op": "eq", "values": ["NL"], "serve": "y"}])
    assert evaluate(server, "first-a", {"plan": "pro", "country": "NL"})["variant"] == "x"
    assert evaluate(server, "first-a", {"plan": "free", "country": "NL"})["variant"] == "y"


def test_rollout_is_sticky_and_matches_sha256_bucketing(server):
    new_flag(server, key="roll-a", rollout=10)
    users = [f"user-{n}" for n in range(200)]
    at_10 = {u for u in users if evaluate(server, "roll-a", {"key": u})["value"]}
    assert at_10 == {u for u in users if bucket("roll-a", u) < 1000}
    assert {evaluate(server, "roll-a", {"key": u})["reason"] for u in users} == {"SPLIT", "DEFAULT"}
    expect_json(requests.patch(f"{server.url}/flags/roll-a", json={"rollout": 20}, headers=ADMIN,
                               timeout=TIMEOUT), 200)
    at_20 = {u for u in users if evaluate(server, "roll-a", {"key": u})["value"]}
    assert at_10 < at_20, "everyone in at 10 % is still in at 20 %"
    assert at_20 == {u for u in users if bucket("roll-a", u) < 2000}


def test_weights_split_users_by_bucket(server):
    new_flag(server, key="weights-a", variants={"a": "A", "b": "B", "c": "C"}, default_variant="a",
             weights={"a": 20, "b": 30, "c": 50})
    for n in range(60):
        point = bucket("weights-a", f"u{n}")
        expected = "a" if point < 2000 else "b" if point < 5000 else "c"
        assert evaluate(server, "weights-a", {"key": f"u{n}"}) == \
            {"value": expected.upper(), "variant": expected, "reason": "SPLIT"}


def test_a_split_without_a_user_key_is_an_error(server):
    new_flag(server, key="err-a", rollout=50)
    answer = evaluate(server, "err-a", {})
    assert answer["reason"] == "ERROR" and answer["error_code"] == "TARGETING_KEY_MISSING"


def test_evaluate_all_and_the_cache_is_invalidated_on_change(server):
    new_flag(server, "staging", key="all-a")
    context = {"env": "staging", "context": {"key": "u1"}}
    url = f"{server.url}/evaluate"
    assert expect_json(requests.post(url, json=context, headers=SDK, timeout=TIMEOUT), 200)[
        "flags"]["all-a"]["value"] is True
    expect_json(requests.patch(f"{server.url}/flags/all-a", params={"env": "staging"},
                               json={"enabled": False}, headers=ADMIN, timeout=TIMEOUT), 200)
    flags = expect_json(requests.post(url, json=context, headers=SDK, timeout=TIMEOUT), 200)["flags"]
    assert flags["all-a"] == {"value": False, "variant": "off", "reason": "DISABLED"}
    expect_problem(requests.post(f"{url}/nope", json={}, headers=SDK, timeout=TIMEOUT), 404)


# --------------------------------------------------------------------------------------------
# OFREP


def test_ofrep_single_evaluation_shape(server):
    new_flag(server, key="ofrep-a", variants={"v1": {"color": "red"}, "v2": {}}, default_variant="v1",
             rules=[{"attribute": "plan", "op": "eq", "values": ["pro"], "serve": "v2"}])
    resp = ofrep(server, "ofrep-a", {"context": {"targetingKey": "u1", "plan": "pro"}})
    assert resp.headers["Content-Type"] == "application/json"
    assert expect_json(resp, 200) == {"key": "ofrep-a", "value": {}, "variant": "v2",
                                      "reason": "TARGETING_MATCH", "metadata": {}}
    new_flag(server, "staging", key="ofrep-a", enabled=False)
    assert expect_json(ofrep(server, "ofrep-a", env="staging"), 200)["reason"] == "DISABLED"


@pytest.mark.parametrize("body, status, code", [
    ("{oops", 400, "PARSE_ERROR"),
    ('{"context": 5}', 400, "INVALID_CONTEXT"),
    ("null", 400, "INVALID_CONTEXT"),
    ('{"context": {"targetingKey": 7}}', 400, "INVALID_CONTEXT"),
    ('{"context": {"targetingKey": null}}', 400, "INVALID_CONTEXT"),
    ("{}", 400, "TARGETING_KEY_MISSING"),
])
def test_ofrep_errors_are_ofrep_bodies_not_problems(server, body, status, code):
    create(server, key="ofrep-err", rollout=50)   # 409 after the first case: the same flag
    resp = requests.post(f"{server.url}/ofrep/v1/evaluate/flags/ofrep-err", data=body,
                         headers={**SDK, "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert resp.status_code == status and resp.headers["Content-Type"] == "application/json"
    answer = resp.json()
    assert answer["key"] == "ofrep-err" and answer["errorCode"] == code and answer["errorDetails"]
    bulk = requests.post(f"{server.url}/ofrep/v1/evaluate/flags", data=body,
                         headers={**SDK, "Content-Type": "application/json"}, timeout=TIMEOUT)
    if code == "TARGETING_KEY_MISSING":   # bulk answers the flag's own error in its list
        item = next(f for f in expect_json(bulk, 200)["flags"] if f["key"] == "ofrep-err")
        assert item["errorCode"] == code
    else:
        assert bulk.status_code == 400 and "key" not in bulk.json()
        assert bulk.json()["errorCode"] == code


def test_ofrep_bad_env_is_an_ofrep_error_too(server):
    for key in ("any-flag", None):
        resp = ofrep(server, key, env="qa")
        assert resp.status_code == 400 and resp.headers["Content-Type"] == "application/json"
        assert resp.json()["errorCode"] == "GENERAL" and "env" in resp.json()["errorDetails"]


def test_ofrep_unknown_flag_is_flag_not_found(server):
    resp = ofrep(server, "no-such-flag")
    assert resp.status_code == 404 and resp.headers["Content-Type"] == "application/json"
    assert resp.json()["errorCode"] == "FLAG_NOT_FOUND" and resp.json()["key"] == "no-such-flag"
    expect_problem(ofrep(server, "no-such-flag", headers={}), 401)


def test_ofrep_bulk_has_an_etag_and_answers_304(server):
    new_flag(server, "development", key="bulk-a")
    body = {"context": {"targetingKey": "u9"}}
    first = ofrep(server, body=body, env="development")
    flags = expect_json(first, 200)["flags"]
    assert {"key": "bulk-a", "value": True, "variant": "on", "reason": "STATIC", "metadata": {}} in flags
    again = requests.post(f"{server.url}/ofrep/v1/evaluate/flags", params={"env": "development"},
                          json=body, headers={**SDK, "If-None-Match": first.headers["ETag"]},
                          timeout=TIMEOUT)
    assert again.status_code == 304


@pytest.mark.skipif(importlib.util.find_spec("openfeature") is None
                    or importlib.util.find_spec("openfeature.contrib.provider.ofrep") is None,
                    reason="openfeature-sdk / openfeature-provider-ofrep not installed "
                           "(requirements-interop.txt)")
def test_the_openfeature_sdk_with_the_ofrep_provider_works_unchanged(server):
    from openfeature import api
    from openfeature.contrib.provider.ofrep import OFREPProvider
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.flag_evaluation import Reason

    new_flag(server, key="sdk-a", rules=[{"attribute": "plan", "op": "eq", "values": ["pro"],
                                          "serve": "on"}], rollout=0)
    new_flag(server, key="sdk-b", variants={"small": 10, "large": 50}, default_variant="small")
    api.set_provider(OFREPProvider(server.url, headers_factory=lambda: {"X-API-Key": SDK_KEY}),
                     domain="feature-flags-test")
    client = api.get_client("feature-flags-test")
    pro = client.get_boolean_details("sdk-a", False, EvaluationContext("u1", {"plan": "pro"}))
    assert (pro.value, pro.variant, pro.reason) == (True, "on", Reason.TARGETING_MATCH)
    free = client.get_boolean_details("sdk-a", True, EvaluationContext("u1", {"plan": "free"}))
    assert (free.value, free.reason) == (False, Reason.DEFAULT)
    assert client.get_integer_value("sdk-b", 0, EvaluationContext("u1")) == 10
    missing = client.get_boolean_details("nope", True, EvaluationContext("u1"))
    assert missing.value is True and missing.error_code.value == "FLAG_NOT_FOUND"


# --------------------------------------------------------------------------------------------
# The SSE stream


def read_events(lines, count):
    """The next `count` events of an SSE stream's lines, as {"id", "data"} dicts."""
    events, current = [], {}
    for line in lines:
        if line == "":
            if "data" in current:
                events.append(current)
                if len(events) == count:
                    return events
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value
    raise AssertionError(f"the stream ended after {events}")


def test_the_stream_pushes_changes_and_resumes_after_last_event_id(server):
    url, params = f"{server.url}/stream", {"env": "staging"}
    with requests.get(url, params=params, headers=SDK, stream=True, timeout=TIMEOUT) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.iter_lines(chunk_size=None, decode_unicode=True)
        next(lines)   # the opening: the stream is listening from here
        flag = new_flag(server, "staging", key="sse-a")
        new_flag(server, "development", key="sse-a")   # another environment: not on this stream
        expect(requests.delete(f"{server.url}/flags/sse-a", params=params, headers=ADMIN,
                               timeout=TIMEOUT), 204)
        created_event, deleted_event = read_events(lines, 2)
    shown = expect_json(requests.get(f"{server.url}/flags/sse-a/history", params=params,
                                     headers=ADMIN, timeout=TIMEOUT), 200)["items"]
    assert json.loads(created_event["data"]) == flag
    assert json.loads(deleted_event["data"]) == {"key": "sse-a", "deleted": True}
    assert [int(created_event["id"]), int(deleted_event["id"])] == [c["id"] for c in reversed(shown)]
    with requests.get(url, params=params, headers={**SDK, "Last-Event-ID": created_event["id"]},
                      stream=True, timeout=TIMEOUT) as resumed:
        assert read_events(resumed.iter_lines(chunk_size=None, decode_unicode=True), 1)[0] \
            == deleted_event
    expect_problem(requests.get(url, params=params, headers={**SDK, "Last-Event-ID": "x"},
                                timeout=TIMEOUT), 400)
    expect_problem(requests.get(url, params=params, timeout=TIMEOUT), 401)


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_sigterm_with_an_open_stream_exits_cleanly(start_server, transport):
    own = start_server(SCRIPT, "--admin-token", ADMIN_TOKEN, "--sdk-key", SDK_KEY,
                       "--server", transport)
    new_flag(own, key="before-stream")
    resumed = requests.get(f"{own.url}/stream", headers={**SDK, "Last-Event-ID": "0"},
                           stream=True, timeout=TIMEOUT)
    event, = read_events(resumed.iter_lines(chunk_size=None, decode_unicode=True), 1)
    assert json.loads(event["data"])["key"] == "before-stream"
    resumed.close()
    resp = requests.get(f"{own.url}/stream", headers=SDK, stream=True, timeout=TIMEOUT)
    lines = resp.iter_lines(chunk_size=None)
    next(lines)
    reader = threading.Thread(target=lambda: list(lines), daemon=True)
    reader.start()
    own.stop(signal.SIGTERM)   # asserts exit status 0 within the harness' bound
    reader.join(TIMEOUT)
    assert not reader.is_alive(), "the stream ends when the server drains"


def test_flags_survive_a_restart(start_server, tmp_path):
    db = str(tmp_path / "flags.sqlite3")
    args = ("--admin-token", ADMIN_TOKEN, "--sdk-key", SDK_KEY, "--db", db)
    first = start_server(SCRIPT, *args)
    new_flag(first, key="keep-a", rollout=100)
    first.stop()
    again = start_server(SCRIPT, *args)
    assert evaluate(again, "keep-a", {"key": "u"})["value"] is True
