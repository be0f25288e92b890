"""level06/auth_service.py, black-box: RFC 7662 introspection as a resource server calls it (and
through a real OAuth client library when installed), only for the service credential, RFC 7009
revocation, the service token's sources, and the transactional outbox: written with the user,
delivered with retries, kept across kill -9, not holding up a shutdown.

The outbox's consumer here is a stand-in in the test process (`EventSink`), so each test can
make it refuse, hang or count; the real user_service is in test_user_service.py.
"""
import os
import stat

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once
from tests.level03.accounts import TIMEOUT, fresh_email
from tests.level06.services import (AUTH, SERVICE_TOKEN, EventSink, account, bearer, eventually,
                                    login, signup, start_auth)

RESOURCE_SERVER = {"Authorization": f"Bearer {SERVICE_TOKEN}", "Accept": "application/json"}


@pytest.fixture(scope="module")
def auth(start_server_module):
    return start_auth(start_server_module)


@pytest.fixture
def sink():
    consumer = EventSink()
    yield consumer
    consumer.close()


def introspect(auth, token, headers=RESOURCE_SERVER, **form):
    """The request an OAuth resource server sends (RFC 7662 §2.1): a form, JSON accepted."""
    return requests.post(f"{auth.url}/internal/introspect", data={"token": token, **form},
                         headers=headers, timeout=TIMEOUT)


def outbox(auth):
    return expect_json(requests.get(f"{auth.url}/internal/outbox", headers=bearer(SERVICE_TOKEN),
                                    timeout=TIMEOUT), 200)


# --------------------------------------------------------------------------------------------
# Introspection (RFC 7662)


def test_an_active_token_is_described_as_rfc_7662_lists(auth):
    user, token = account(auth)
    resp = introspect(auth, token, token_type_hint="access_token")
    assert resp.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    body = expect_json(resp, 200)
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers.get("Cache-Control") == "no-store"
    assert body["active"] is True
    assert body["sub"] == str(user["id"]) and body["username"] == user["email"]
    assert body["token_type"] == "Bearer"
    assert body["iss"] == "auth_service" and body["aud"] == "auth_service"
    assert isinstance(body["exp"], int) and isinstance(body["iat"], int)
    assert body["exp"] - body["iat"] == 900 and isinstance(body["jti"], str)


def test_a_json_body_is_introspected_too(auth):
    user, token = account(auth)
    resp = requests.post(f"{auth.url}/internal/introspect", json={"token": token},
                         headers=RESOURCE_SERVER, timeout=TIMEOUT)
    assert expect_json(resp, 200)["sub"] == str(user["id"])


def test_an_inactive_token_is_active_false_and_nothing_else(auth):
    _, token = account(auth)
    email = fresh_email()
    signup(auth, email)
    refresh = login(auth, email)["refresh_token"]
    head, claims, signature = token.split(".")
    forged = f"{head}.{claims}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    for bad in ["garbage", forged, refresh, "a.b.c", "x" * 9000]:
        assert expect_json(introspect(auth, bad), 200) == {"active": False}, bad[:40]


def test_an_expired_token_turns_inactive_at_its_exp(start_server):
    server = start_auth(start_server, "--access-ttl", "1")
    _, token = account(server)
    expect_json(introspect(server, token), 200)  # active or, on a slow machine, already not
    eventually(lambda: expect_json(introspect(server, token), 200) == {"active": False},
               "an access token of --access-ttl 1 is inactive")


def test_a_revoked_access_token_is_inactive_at_once(auth):
    _, token = account(auth)
    assert expect_json(introspect(auth, token), 200)["active"] is True
    resp = requests.post(f"{auth.url}/auth/revoke", data={"token": token,
                                                          "token_type_hint": "access_token"},
                         timeout=TIMEOUT)
    expect(resp, 200)
    assert expect_json(introspect(auth, token), 200) == {"active": False}


def test_revoking_a_refresh_token_ends_its_family_and_unknown_tokens_are_fine(auth):
    email = fresh_email()
    signup(auth, email)
    refresh = login(auth, email)["refresh_token"]
    expect(requests.post(f"{auth.url}/auth/revoke", data={"token": refresh}, timeout=TIMEOUT), 200)
    resp = requests.post(f"{auth.url}/auth/refresh", json={"refresh_token": refresh},
                         timeout=TIMEOUT)
    expect_problem(resp, 401)
    # RFC 7009 §2.2: an invalid token is answered like a valid one
    expect(requests.post(f"{auth.url}/auth/revoke", data={"token": "nope"}, timeout=TIMEOUT), 200)


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-credential"),
    pytest.param({"Authorization": "Bearer not-the-service-token-at-all"}, id="wrong-token"),
    pytest.param({"Authorization": f"Basic {SERVICE_TOKEN}"}, id="basic-scheme"),
    pytest.param("user-token", id="a-users-access-token"),
])
def test_introspection_answers_only_the_service_credential(auth, headers):
    _, token = account(auth)
    if headers == "user-token":
        headers = bearer(token)
    resp = introspect(auth, token, headers=headers)
    expect_problem(resp, 401)
    assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert "active" not in resp.json()


def test_the_outbox_view_is_for_services_only(auth):
    expect_problem(requests.get(f"{auth.url}/internal/outbox", timeout=TIMEOUT), 401)


def test_introspection_without_a_token_is_a_400(auth):
    for body in ({"token_type_hint": "access_token"}, {"token": ""}):
        resp = requests.post(f"{auth.url}/internal/introspect", data=body, headers=RESOURCE_SERVER,
                             timeout=TIMEOUT)
        expect_problem(resp, 400)


def test_a_real_oauth_client_introspects_and_revokes(auth, monkeypatch):
    """authlib's RFC 7662 and RFC 7009 client calls, unchanged (the service credential as its
    `auth`); skipped when authlib is not installed (requirements-interop.txt)."""
    requests_client = pytest.importorskip("authlib.integrations.requests_client")
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # loopback http, not https

    def service_credential(request):
        request.headers["Authorization"] = f"Bearer {SERVICE_TOKEN}"
        return request

    user, token = account(auth)
    client = requests_client.OAuth2Session(client_id="user_service",
                                           token_endpoint_auth_method="none")
    resp = client.introspect_token(f"{auth.url}/internal/introspect", token=token,
                                   token_type_hint="access_token", auth=service_credential)
    assert expect_json(resp, 200)["sub"] == str(user["id"])
    expect(client.revoke_token(f"{auth.url}/auth/revoke", token=token,
                               token_type_hint="access_token"), 200)
    resp = client.introspect_token(f"{auth.url}/internal/introspect", token=token,
                                   auth=service_credential)
    assert expect_json(resp, 200) == {"active": False}


# --------------------------------------------------------------------------------------------
# The service credential's sources


def test_without_a_token_one_is_made_beside_the_database_mode_0600(start_server, tmp_path):
    db = tmp_path / "auth.sqlite3"
    server = start_server(AUTH, "--db", db, "--scrypt-n", "1024")
    path = tmp_path / "service-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    made = path.read_text().strip()
    assert len(made) >= 32
    _, token = account(server)
    assert expect_json(introspect(server, token, headers=bearer(made)), 200)["active"] is True
    server.stop()
    again = start_server(AUTH, "--db", db, "--scrypt-n", "1024")
    assert path.read_text().strip() == made   # kept: the other service reads the same file
    assert expect_json(introspect(again, token, headers=bearer(made)), 200)["active"] is True


def test_the_environment_names_the_token_when_the_flag_does_not(start_server, tmp_path):
    server = start_server(AUTH, "--scrypt-n", "1024",
                          env={"SERVICE_TOKEN": "from-the-environment-123"})
    _, token = account(server)
    expect(introspect(server, token, headers=bearer("from-the-environment-123")), 200)
    expect_problem(introspect(server, token, headers=bearer(SERVICE_TOKEN)), 401)
    assert not os.path.exists(server.workdir / "service-token")


def test_a_short_service_token_exits_2():
    done = run_once(AUTH, "--port", "0", "--db", ":memory:", "--service-token", "short")
    assert done.returncode == 2, done.stderr
    assert "--service-token" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# The outbox


def test_signup_writes_the_event_with_the_user_and_a_refused_signup_writes_none(start_server):
    server = start_auth(start_server)   # no consumer listens: every event stays pending
    user = signup(server, fresh_email())
    box = outbox(server)
    assert box["pending"] == 1 and box["delivered"] == 0
    event = box["oldest_pending"][0]["event"]
    assert event["type"] == "user.created" and isinstance(event["id"], str)
    assert event["data"] == {"id": user["id"], "email": user["email"],
                             "created_at": user["created_at"]}
    expect_problem(requests.post(f"{server.url}/auth/signup", json={
        "email": user["email"], "password": "another good password"}, timeout=TIMEOUT), 409)
    expect_problem(requests.post(f"{server.url}/auth/signup", json={
        "email": fresh_email(), "password": "password"}, timeout=TIMEOUT), 422)
    assert outbox(server)["pending"] == 1


def test_an_unreachable_user_service_pauses_the_pass_instead_of_failing_every_event(start_server):
    """When user_service cannot be reached, the events behind the oldest are not tried one by
    one (against a hanging service each would cost the call's timeout): the oldest is retried
    with its backoff and the rest wait their turn, their attempts untouched."""
    server = start_auth(start_server)   # nothing listens at the user_service URL
    for _ in range(3):
        signup(server, fresh_email())
    eventually(lambda: outbox(server)["oldest_pending"][0]["attempts"] >= 3,
               "the oldest event is retried")
    box = outbox(server)
    assert box["pending"] == 3
    assert [entry["attempts"] for entry in box["oldest_pending"][1:]] == [0, 0]
    assert "unreachable" in box["oldest_pending"][0]["last_error"]


def test_events_are_delivered_with_the_credential_and_retried_until_accepted(start_server):
    sink = EventSink(answers=[503, 500, 401])
    try:
        server = start_auth(start_server, user_url=sink.url)
        user = signup(server, fresh_email())
        eventually(lambda: outbox(server)["delivered"] == 1, "the event is delivered")
        path, headers, event = sink.received[-1]
        assert len(sink.received) == 4            # three refusals, then accepted
        assert {body["id"] for body in sink.events()} == {event["id"]}   # one event, resent
        assert path == "/internal/events"
        assert headers["Authorization"] == f"Bearer {SERVICE_TOKEN}"
        assert headers["Content-Type"] == "application/json"
        assert event == {"id": event["id"], "type": "user.created",
                         "data": {"id": user["id"], "email": user["email"],
                                  "created_at": user["created_at"]}}
        assert outbox(server)["pending"] == 0
    finally:
        sink.close()


def test_a_kill_9_loses_no_event_and_the_outbox_catches_up_after_the_restart(start_server):
    sink = EventSink(answers=[503] * 1000)   # "down" until the answers are cleared
    try:
        first = start_auth(start_server, user_url=sink.url)
        users = [signup(first, fresh_email()) for _ in range(5)]
        first.kill9()
        with sink.lock:
            sink.answers.clear()
        again = start_auth(start_server, "--db", first.db_path, user_url=sink.url)
        eventually(lambda: outbox(again)["pending"] == 0, "every event is delivered")
        delivered = {event["data"]["id"] for event in sink.events()}
        assert delivered == {user["id"] for user in users}
        assert outbox(again)["delivered"] == 5
    finally:
        sink.close()


def test_a_consumer_that_never_answers_does_not_hold_up_sigterm(start_server):
    sink = EventSink(hang=True)
    try:
        server = start_auth(start_server, user_url=sink.url)
        signup(server, fresh_email())
        eventually(lambda: sink.received, "the relay is waiting on the consumer")
        server.stop()   # exit status 0 within the harness's 10 s
    finally:
        sink.close()
