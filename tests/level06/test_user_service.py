"""level06/user_service.py with auth_service beside it, black-box: profiles appear through the
outbox, /users/me, /users/{id} and the list with ?q=, authentication by introspection with a
short cache (counted in auth_service's access log), 503 when auth_service is down or silent,
the idempotent event consumer, and both services stopped, killed and restarted mid-test with
nothing lost.
"""
import re
import shlex
import socket

import pytest
import requests

from tests.harness import ROOT, expect, expect_json, expect_problem
from tests.level03.accounts import TIMEOUT, fresh_email
from tests.level06.services import (AUTH, SERVICE_TOKEN, USERS, account, bearer, closed_url,
                                    eventually, free_port, introspections, login, signup,
                                    start_auth, start_pair, start_users)
from tests.projects import BY_NAME
from tests.test_readme_walkthroughs import (CMD_MARK, HTTP_MARK, PRELUDE, localise,
                                            output_mismatches, parse_walkthrough, private_tmp,
                                            run_script, split_output)


@pytest.fixture(scope="module")
def pair(start_server_module):
    return start_pair(start_server_module)


def get(server, path, token, **kw):
    return requests.get(server.url + path, headers=bearer(token), timeout=TIMEOUT, **kw)


def patch_me(users, token, body, headers=None):
    return requests.patch(f"{users.url}/users/me", json=body,
                          headers={**bearer(token), **(headers or {})}, timeout=TIMEOUT)


def profile_arrives(users, token):
    """/users/me once the account's event has reached user_service."""
    return eventually(lambda: get(users, "/users/me", token).status_code == 200 and
                      get(users, "/users/me", token), "the profile appears").json()


def send_event(users, event, token=SERVICE_TOKEN):
    return requests.post(f"{users.url}/internal/events", json=event, headers=bearer(token),
                         timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------
# Profiles


def test_a_profile_appears_once_the_signup_event_arrives(pair):
    auth, users = pair
    user, token = account(auth)
    me = profile_arrives(users, token)
    assert me == {"id": user["id"], "display_name": "", "bio": "",
                  "created_at": user["created_at"], "email": user["email"]}


def test_me_is_patched_with_display_name_and_bio_only(pair):
    auth, users = pair
    _, token = account(auth)
    profile_arrives(users, token)
    first = get(users, "/users/me", token)
    resp = patch_me(users, token, {"display_name": "  Ada L. ", "bio": "engines"},
                    {"If-Match": first.headers["ETag"]})
    body = expect_json(resp, 200)
    assert body["display_name"] == "Ada L." and body["bio"] == "engines"
    assert resp.headers["ETag"] != first.headers["ETag"]
    expect_problem(patch_me(users, token, {"bio": "late"}, {"If-Match": first.headers["ETag"]}),
                   412)
    for field in ("email", "id", "created_at", "nickname"):
        problem = expect_problem(patch_me(users, token, {field: "x@example.com"}), 422)
        assert [e["field"] for e in problem["errors"]] == [field]
    expect_problem(patch_me(users, token, {"display_name": "x" * 101}), 422)
    assert expect_json(get(users, "/users/me", token), 200)["bio"] == "engines"


def test_another_users_profile_has_no_email(pair):
    auth, users = pair
    other, other_token = account(auth)
    _, token = account(auth)
    profile_arrives(users, other_token)
    seen = expect_json(get(users, f"/users/{other['id']}", token), 200)
    assert seen == {"id": other["id"], "display_name": "", "bio": "",
                    "created_at": other["created_at"]}
    expect_problem(get(users, "/users/999999999", token), 404)


def test_the_list_finds_display_names_in_any_case_anywhere_and_pages(pair):
    auth, users = pair
    names = ["Zoë ÅNGSTRÖM", "bob ångström-smith", "Carol"]
    tokens = []
    for name in names:
        _, token = account(auth)
        profile_arrives(users, token)
        expect(patch_me(users, token, {"display_name": name}), 200)
        tokens.append(token)
    token = tokens[0]
    found = expect_json(get(users, "/users", token, params={"q": "ångström"}), 200)
    assert sorted(p["display_name"] for p in found["items"]) == sorted(names[:2])
    assert all("email" not in p for p in found["items"])
    carol = expect_json(get(users, "/users", token, params={"q": "ROL"}), 200)["items"]
    assert [p["display_name"] for p in carol] == ["Carol"]
    first = expect_json(get(users, "/users", token, params={"q": "ngstr", "limit": 1}), 200)
    assert len(first["items"]) == 1 and first["next_cursor"]
    second = expect_json(get(users, "/users", token, params={
        "q": "ngstr", "limit": 1, "cursor": first["next_cursor"]}), 200)
    assert second["next_cursor"] is None
    assert {first["items"][0]["id"], second["items"][0]["id"]} == {p["id"] for p in found["items"]}
    everyone = expect_json(get(users, "/users", token, params={"limit": 100}), 200)["items"]
    assert {p["display_name"] for p in everyone} >= set(names)
    expect_problem(get(users, "/users", token, params={"cursor": "bogus"}), 400)
    expect_problem(get(users, "/users", token, params={"limit": 0}), 400)


# --------------------------------------------------------------------------------------------
# Authentication by introspection


def test_without_an_active_token_the_answer_is_401(pair):
    _, users = pair
    resp = requests.get(f"{users.url}/users/me", timeout=TIMEOUT)
    expect_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = get(users, "/users", "not-a-token")
    expect_problem(resp, 401)
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


def test_the_cache_spares_auth_service_a_call_per_request(start_server):
    auth, users = start_pair(start_server, user_args=("--introspect-cache-s", "60"))
    _, token = account(auth)
    profile_arrives(users, token)
    before = introspections(auth)
    for _ in range(10):
        expect(get(users, "/users/me", token), 200)
    assert introspections(auth) - before <= 1, "ten requests, one token: at most one introspection"


def test_without_the_cache_every_request_is_introspected(start_server):
    auth, users = start_pair(start_server, user_args=("--introspect-cache-s", "0"))
    _, token = account(auth)
    profile_arrives(users, token)
    before = introspections(auth)
    for _ in range(3):
        expect(get(users, "/users/me", token), 200)
    eventually(lambda: introspections(auth) - before == 3, "three introspections logged")


def test_a_revoked_token_stops_working_within_the_cache_time(start_server):
    auth, users = start_pair(start_server, user_args=("--introspect-cache-s", "1"))
    _, token = account(auth)
    profile_arrives(users, token)
    expect(requests.post(f"{auth.url}/auth/revoke", data={"token": token}, timeout=TIMEOUT), 200)
    eventually(lambda: get(users, "/users/me", token).status_code == 401,
               "the revoked token is refused once the 1 s cache has passed", timeout=10)


def test_the_cache_never_outlives_the_tokens_exp(start_server):
    auth, users = start_pair(start_server, auth_args=("--access-ttl", "2"),
                             user_args=("--introspect-cache-s", "600"))
    user, _ = account(auth)
    _, first_token = account(auth)
    profile_arrives(users, first_token)
    token = login(auth, user["email"])["access_token"]
    get(users, "/users/me", token)   # cached, if still active on a slow machine
    eventually(lambda: get(users, "/users/me", token).status_code == 401,
               "the expired token is refused though the cache lasts 600 s", timeout=15)


def test_auth_service_down_is_a_503_not_a_500(start_server):
    users = start_users(start_server, closed_url())
    resp = get(users, "/users/me", "some-token")
    expect_problem(resp, 503)
    assert resp.headers.get("Retry-After")


def test_auth_service_silent_is_a_503_within_the_timeout(start_server):
    with socket.socket() as silent:   # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        users = start_users(start_server, url, "--auth-timeout", "0.5")
        resp = get(users, "/users/me", "some-token")   # TIMEOUT (15 s) would mean a hang
        expect_problem(resp, 503)


# --------------------------------------------------------------------------------------------
# Events: the service credential, and a repeat changes nothing


def test_events_need_the_service_credential(pair):
    auth, users = pair
    _, token = account(auth)
    event = {"id": "evt-credential", "type": "user.created",
             "data": {"id": 990001, "email": "e@example.com", "created_at": "2026-01-01T00:00:00Z"}}
    for credential in ("wrong-service-token-000000", token):
        resp = send_event(users, event, credential)
        expect_problem(resp, 401)
    assert requests.post(f"{users.url}/internal/events", json=event,
                         timeout=TIMEOUT).status_code == 401
    expect_problem(get(users, "/users/990001", token), 404)


def test_a_repeated_event_id_is_204_and_changes_nothing(pair):
    auth, users = pair
    _, token = account(auth)
    event = {"id": "evt-repeat-1", "type": "user.created",
             "data": {"id": 990002, "email": "r@example.com", "created_at": "2026-01-01T00:00:00Z"}}
    expect(send_event(users, event), 204)
    assert expect_json(get(users, "/users/990002", token), 200)["id"] == 990002
    again = {**event, "data": {**event["data"], "id": 990003}}
    expect(send_event(users, again), 204)
    expect_problem(get(users, "/users/990003", token), 404)
    expect_problem(send_event(users, {"id": "evt-bad", "type": "user.created",
                                      "data": {"id": "x"}}), 422)


# --------------------------------------------------------------------------------------------
# Services stopped, killed and restarted mid-test


def test_signups_succeed_while_user_service_is_down_and_the_profile_follows(start_server):
    auth, users = start_pair(start_server)
    users.stop()
    user, token = account(auth)                   # auth_service alone: still 201 and 200
    again = start_users(start_server, auth.url, "--port", users.port, "--db", users.db_path)
    assert profile_arrives(again, token)["id"] == user["id"]


def test_kill_9_of_auth_service_mid_way_loses_nothing(start_server):
    auth, users = start_pair(start_server)
    users.stop()
    accounts = [signup(auth, fresh_email()) for _ in range(5)]   # their events wait
    auth.kill9()
    users = start_users(start_server, auth.url, "--port", users.port, "--db", users.db_path)
    auth = start_auth(start_server, "--port", auth.port, "--db", auth.db_path,
                      user_url=users.url)
    token = login(auth, accounts[0]["email"])["access_token"]
    wanted = {a["id"] for a in accounts}

    def all_there():
        items = expect_json(get(users, "/users", token, params={"limit": 100}), 200)["items"]
        return wanted <= {p["id"] for p in items} and items

    items = eventually(all_there, "every profile signed up before the kill appears")
    assert len(items) == len({p["id"] for p in items}) == 5


def test_two_services_share_the_token_file_beside_their_databases(start_server, tmp_path):
    """Without --service-token or SERVICE_TOKEN, both use `service-token` in the databases'
    folder (data/service-token by default)."""
    port = free_port()
    auth = start_server(AUTH, "--db", tmp_path / "auth.sqlite3",
                        "--scrypt-n", "1024", "--retry-s", "0.05", "--retry-max-s", "0.3",
                        "--user-service-url", f"http://127.0.0.1:{port}")
    users = start_server(USERS, "--db", tmp_path / "users.sqlite3", "--port", port,
                         "--auth-service-url", auth.url)
    _, token = account(auth)
    profile_arrives(users, token)
    assert (tmp_path / "service-token").is_file()


# --------------------------------------------------------------------------------------------
# The README's walk-through, against both services (the suite's README test runs one server)


def test_the_readme_walkthrough_runs_against_both_services(start_server, tmp_path):
    readme = (ROOT / "level06/user_service.md").read_text(encoding="utf-8")
    walkthrough = parse_walkthrough(readme)
    run = shlex.split(walkthrough.run_line)
    token = run[run.index("--service-token") + 1]
    port = free_port()
    auth = start_server(AUTH, "--service-token", token, "--user-service-url",
                        f"http://127.0.0.1:{port}", "--retry-s", "0.05")
    users = start_server(USERS, "--service-token", token, "--auth-service-url", auth.url,
                         "--port", port)
    lines = [PRELUDE]
    for n, (command, _) in enumerate(walkthrough.commands):
        command = localise(localise(command, 8022, auth), 8122, users)
        lines += [f"printf '\\n{CMD_MARK} {n}\\n'", private_tmp(command, tmp_path)]
    lines.append(f"printf '\\n{CMD_MARK} end\\n'")
    code, output, _ = run_script("\n".join(lines) + "\n", tmp_path)
    segments = split_output(output)
    assert code == 0 and "end" in segments, output[-3000:]
    for n, (command, expected) in enumerate(walkthrough.commands):
        statuses = [int(s) for s in re.findall(rf"{HTTP_MARK} (\d{{3}})", segments[n])]
        assert not any(s >= 500 for s in statuses), (command, segments[n])
        if expected is not None:
            assert statuses and statuses[-1] == expected, (command, segments[n])
    problems = output_mismatches(walkthrough, segments, BY_NAME["user_service"])
    assert not problems, "\n\n".join(problems)
