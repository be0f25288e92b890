"""level06/rate_limiter.py, black-box: the five algorithms through `POST /check` (limits,
costs, refusals that spend nothing, retry_after_s and refill, bursts, the window edge), exact
counting under 64 parallel clients, bounded keys, and the middleware's IETF headers.

Counting tests use windows of an hour, so nothing refills while they run; the tests about time
wait for the `retry_after_s` the server itself announces, and bound it generously.
"""
import re
import threading
import time
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once

SCRIPT = "level06/rate_limiter.py"
TIMEOUT = 10
ALGORITHMS = ["fixed_window", "sliding_window_counter", "sliding_window_log", "token_bucket",
              "gcra"]
WINDOWS = ALGORITHMS[:3]
# draft-ietf-httpapi-ratelimit-headers: a List of Items, a quoted policy name with parameters
POLICY_FIELD = re.compile(r'"default";q=(\d+);w=(\d+)')
RATELIMIT_FIELD = re.compile(r'"default";r=(\d+);t=(\d+)')


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--policy", "5/min")


def new_key():
    return f"test-{uuid.uuid4().hex[:12]}"


def check(server, key, policy, cost=None):
    body = {"key": key, "policy": policy} | ({"cost": cost} if cost is not None else {})
    return requests.post(f"{server.url}/check", json=body, timeout=TIMEOUT)


def decision(server, key, policy, cost=None):
    return expect_json(check(server, key, policy, cost), 200)


def hourly(algorithm, limit, burst=None):
    policy = {"algorithm": algorithm, "limit": limit, "window_s": 3600}
    return policy | ({"burst": burst} if burst else {})


# --------------------------------------------------------------------------------------------
# Policies


@pytest.mark.parametrize("text", ["1/s", "10/sec", "3/second", "100/min", "5/minute", "7/h",
                                  "2/hour", "1000/day"])
def test_policy_strings_of_every_unit_are_accepted(server, text):
    assert decision(server, new_key(), text)["allowed"] is True


@pytest.mark.parametrize("policy, field", [
    ("0/min", "policy"), ("10/week", "policy"), ("10 per min", "policy"), ("-1/s", "policy"),
    ("1.5/s", "policy"), (100, "policy"), ({"algorithm": "leaky", "limit": 1, "window_s": 1},
                                           "policy"),
    ({"algorithm": "gcra", "limit": 0, "window_s": 1}, "policy"),
    ({"algorithm": "gcra", "limit": 5}, "policy"),
    ({"algorithm": "fixed_window", "limit": 5, "window_s": 60, "burst": 10}, "policy"),
    ({"algorithm": "sliding_window_log", "limit": 10_001, "window_s": 60}, "policy"),
])
def test_bad_policies_are_a_422_naming_the_policy(server, policy, field):
    problem = expect_problem(check(server, new_key(), policy), 422)
    assert [e["field"] for e in problem["errors"]] == [field]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_cost_over_the_burst_could_never_pass_and_is_a_422(server, algorithm):
    problem = expect_problem(check(server, new_key(), hourly(algorithm, 5), cost=6), 422)
    assert problem["errors"][0]["field"] == "cost"


def test_a_key_keeps_its_policy_until_it_is_reset(server):
    key = new_key()
    decision(server, key, "5/min")
    expect_problem(check(server, key, "6/min"), 409)
    expect(requests.delete(f"{server.url}/limits/{key}", timeout=TIMEOUT), 204)
    assert decision(server, key, "6/min")["remaining"] == 5
    expect_problem(requests.get(f"{server.url}/limits/{new_key()}", timeout=TIMEOUT), 404)
    expect_problem(requests.delete(f"{server.url}/limits/{new_key()}", timeout=TIMEOUT), 404)


# --------------------------------------------------------------------------------------------
# Counting


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_limit_is_admitted_then_refused_and_a_refusal_spends_nothing(server, algorithm):
    key, policy = new_key(), hourly(algorithm, 5)
    answers = [decision(server, key, policy) for _ in range(5)]
    assert [a["allowed"] for a in answers] == [True] * 5
    assert [a["remaining"] for a in answers] == [4, 3, 2, 1, 0]
    assert all(a["retry_after_s"] == 0 for a in answers)
    for _ in range(3):
        refused = decision(server, key, policy)
        assert refused["allowed"] is False and refused["remaining"] == 0
        # at most a window, but up to 1.2 for the sliding counter: once its current window
        # holds the whole limit, the weighted estimate falls below it only 0.2 into the next
        assert 0 < refused["retry_after_s"] <= 1.2 * 3600 and refused["reset_s"] > 0
    state = expect_json(requests.get(f"{server.url}/limits/{key}", timeout=TIMEOUT), 200)
    assert state["remaining"] == 0 and state["policy"]["algorithm"] == algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_costs_are_spent_whole_or_not_at_all(server, algorithm):
    key, policy = new_key(), hourly(algorithm, 10)
    assert decision(server, key, policy, cost=4)["remaining"] == 6
    assert decision(server, key, policy, cost=4)["remaining"] == 2
    refused = decision(server, key, policy, cost=4)
    assert refused["allowed"] is False and refused["remaining"] == 2
    last = decision(server, key, policy, cost=2)
    assert last["allowed"] is True and last["remaining"] == 0
    assert decision(server, key, policy, cost=1)["allowed"] is False


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra"])
def test_a_bucket_admits_its_burst_at_once_then_its_rate(server, algorithm):
    key, policy = new_key(), hourly(algorithm, 1, burst=5)
    assert [decision(server, key, policy)["allowed"] for _ in range(6)] == [True] * 5 + [False]
    refused = decision(server, key, policy)
    assert 3500 < refused["retry_after_s"] <= 3600  # one more unit after an hour / 1


# --------------------------------------------------------------------------------------------
# Time


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_after_retry_after_s_the_same_cost_passes(server, algorithm):
    """Limit 2 a second: the third is refused, with a wait of at most the window, after which
    it passes; retry_after_s is a promise, not a guess."""
    key, policy = new_key(), {"algorithm": algorithm, "limit": 2, "window_s": 1}
    for _ in range(2):
        decision(server, key, policy)
    refused = decision(server, key, policy)
    if refused["allowed"]:  # the window turned between the checks: try once more
        refused = decision(server, key, policy)
    assert refused["allowed"] is False and 0 < refused["retry_after_s"] <= 2.0, refused
    time.sleep(refused["retry_after_s"] + 0.05)
    assert decision(server, key, policy)["allowed"] is True


def test_a_fixed_window_admits_twice_its_limit_around_its_edge_and_the_log_does_not(server):
    """The fixed window's known flaw, measured: 10 a 2 s window, 10 requests just before a
    window ends and 10 just after all pass (20 within a fraction of a second); the exact log
    admits 10 over any 2 s."""
    assert around_a_window_edge(server, "fixed_window") == 20
    assert around_a_window_edge(server, "sliding_window_log") == 10


def around_a_window_edge(server, algorithm, attempts=3):
    """How many of 10 requests sent in the last 0.6 s of a 2 s window and 10 sent 0.1 s into
    the next are admitted (a window's end is learnt from a fixed window's reset_s). A batch that
    could not be sent on time (a slow machine) is measured again."""
    for _ in range(attempts):
        key, policy = new_key(), {"algorithm": algorithm, "limit": 10, "window_s": 2}
        clock = decision(server, f"{key}-clock", {"algorithm": "fixed_window", "limit": 10,
                                                  "window_s": 2})
        window_end = time.monotonic() + clock["reset_s"]
        time.sleep(max(0.0, window_end - 0.6 - time.monotonic()))
        before = [decision(server, key, policy) for _ in range(10)]
        if time.monotonic() > window_end - 0.05:
            continue  # the first batch ran into the next window
        time.sleep(max(0.0, window_end + 0.1 - time.monotonic()))
        after = [decision(server, key, policy) for _ in range(10)]
        if time.monotonic() < window_end + 1.5:
            return sum(a["allowed"] for a in before + after)
    pytest.fail(f"no batch of 10 checks took under half a second in {attempts} attempts")


# --------------------------------------------------------------------------------------------
# Concurrency and memory


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_64_parallel_clients_never_get_more_than_the_limit(server, algorithm):
    key, policy = new_key(), hourly(algorithm, 100)
    allowed = []
    start = threading.Barrier(64)

    def client():
        session = requests.Session()
        start.wait()
        for _ in range(4):
            answer = session.post(f"{server.url}/check", json={"key": key, "policy": policy},
                                  timeout=TIMEOUT).json()
            allowed.append(answer["allowed"])

    threads = [threading.Thread(target=client) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 256 and sum(allowed) == 100


def test_keys_are_bounded_by_max_keys(start_server):
    server = start_server(SCRIPT, "--max-keys", "10")
    keys = [new_key() for _ in range(25)]
    for key in keys:
        decision(server, key, "1/hour")
    present = [key for key in keys
               if requests.get(f"{server.url}/limits/{key}", timeout=TIMEOUT).status_code == 200]
    assert len(present) <= 10 and present == keys[-len(present):]
    assert keys[-1] in present


# --------------------------------------------------------------------------------------------
# The middleware


def test_the_demo_api_carries_the_ietf_headers_and_a_429_says_when(server):
    session = requests.Session()
    headers = {"X-API-Key": new_key()}
    answers = [session.get(f"{server.url}/api/resource", headers=headers, timeout=TIMEOUT)
               for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    for number, answer in enumerate(answers):
        assert POLICY_FIELD.fullmatch(answer.headers["RateLimit-Policy"]).groups() == ("5", "60")
        remaining, reset = RATELIMIT_FIELD.fullmatch(answer.headers["RateLimit"]).groups()
        assert int(remaining) == max(0, 4 - number) and 0 <= int(reset) <= 60
    refused = expect_problem(answers[-1], 429)
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60, refused


def test_clients_are_limited_apart_by_api_key_else_by_address(server):
    session = requests.Session()
    for _ in range(5):
        expect(session.get(f"{server.url}/api/resource", headers={"X-API-Key": "a" + new_key()},
                           timeout=TIMEOUT), 200)
    key = {"X-API-Key": new_key()}
    for _ in range(5):
        expect(session.get(f"{server.url}/api/resource", headers=key, timeout=TIMEOUT), 200)
    expect_problem(session.get(f"{server.url}/api/resource", headers=key, timeout=TIMEOUT), 429)
    other = expect(session.get(f"{server.url}/api/resource", headers={"X-API-Key": new_key()},
                               timeout=TIMEOUT), 200)
    assert other.json()["client"].startswith("key:")
    health = expect(session.get(f"{server.url}/health", timeout=TIMEOUT), 200)
    assert "RateLimit" not in health.headers  # only the limited routes


def test_the_address_is_the_peer_not_a_header(start_server):
    server = start_server(SCRIPT, "--policy", "2/hour")
    session = requests.Session()
    spoofed = [session.get(f"{server.url}/api/resource", timeout=TIMEOUT,
                           headers={"X-Forwarded-For": f"10.0.0.{n}"}) for n in range(3)]
    assert [a.status_code for a in spoofed] == [200, 200, 429]
    assert spoofed[0].json()["client"] == "ip:127.0.0.1"


@pytest.mark.parametrize("args", [["--policy", "5/fortnight"], ["--policy", "0/s"],
                                  ["--algorithm", "sliding_window_log", "--policy", "20000/h"],
                                  ["--max-keys", "0"]])
def test_bad_flags_exit_2(args):
    done = run_once(SCRIPT, "--port", "0", *args, timeout=10)
    assert done.returncode == 2, done.stderr[-500:]
