"""Rate limiter — five algorithms behind one small interface, as a service and as middleware.

What it teaches
  - What a limit is: a quota (`limit`) per window of time (`window_s`), and how much of it may be
    spent at once (`burst`). Five ways to keep it, each a small class with the same two methods,
    pure functions of (a key's state, the time, a cost) → (a decision, the new state):
      fixed_window            one counter per calendar window: cheap, but 2× the limit can pass
                              around a window's edge (the end of one and the start of the next)
      sliding_window_counter  the previous window's count, weighted by how much of it still
                              overlaps the last `window_s`: two counters, a close approximation
                              (Cloudflare's choice)
      sliding_window_log      every admitted request's time: exact, at a cost of memory per
                              request in the window
      token_bucket            tokens refill at limit/window_s a second up to `burst`: smooth,
                              with bursts up to the bucket's size
      gcra                    the Generic Cell Rate Algorithm (ATM networks, then Redis'
                              redis-cell): a token bucket kept as one timestamp, the theoretical
                              arrival time of the next request
  - A refused request spends nothing, and a refusal says when the same cost would pass
    (`retry_after_s`); a cost over the burst can never pass (422, not a 429 for ever).
  - Correct under concurrency: one lock around read-decide-write, so 64 clients at once never
    get more than the limit (check-then-act without it over-admits).
  - Memory that cannot grow without bound: at most `--max-keys` keys; the least recently used
    one is evicted first, and a key whose state has recovered fully is dropped (it means the
    same as no state).
  - Telling clients: the IETF draft's `RateLimit-Policy` (the quota and its window) and
    `RateLimit` (what is left, and when it is back) header fields, and `Retry-After` on a 429
    (draft-ietf-httpapi-ratelimit-headers-11, RFC 9110 §10.2.3, RFC 6585 §4).

Two faces: the service (`POST /check`, `GET|DELETE /limits/{key}`), for other backends to ask,
and `rate_limit`, middleware in front of a demo API (`GET /api/resource`), limited per API key
(`X-API-Key`) or else per client address. The api_gateway imports both the limiter and the
middleware.

Left out: limits shared by several server processes (Redis with a Lua script or redis-cell,
Envoy's global rate limit service), quotas per month, cost from the response, client-side
throttling. rate_limiter.md's "In production" says who does those.

    python level06/rate_limiter.py [--policy 60/min] [--algorithm gcra] [--max-keys N]
"""
import collections
import functools
import math
import re
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, Conflict, NotFound, TooManyRequests, ValidationFailed, no_content,
                 trace_event)
from lib.app import bounded
from lib.validation import Choice, Field, Integer, Invalid, Text, body_schema, validate

app = App("rate_limiter", "Rate limits by five algorithms, as a service and as middleware, with "
          "the IETF RateLimit headers.", port=8024)


# =============================================================================================
# Policies: a quota per window, and the most spent at once
# =============================================================================================

class Policy(NamedTuple):
    algorithm: str
    limit: int          # admitted per window
    window_s: float
    burst: int          # the most admitted at once (a single cost may not exceed it)

    def header(self, name="default"):
        """This policy as an item of the `RateLimit-Policy` field (`"default";q=100;w=60`)."""
        return f'"{name}";q={self.limit};w={max(1, round(self.window_s))}'


class Decision(NamedTuple):
    allowed: bool
    remaining: int      # what could still be spent right now
    reset_s: float      # until the quota is whole again
    retry_after_s: float  # until the same cost would pass (0 when allowed)

    def json(self):
        return {"allowed": self.allowed, "remaining": self.remaining,
                "reset_s": round(self.reset_s, 3), "retry_after_s": round(self.retry_after_s, 3)}

    def header(self, name="default"):
        """The `RateLimit` field: what is left (r) and the seconds until it is whole (t)."""
        return f'"{name}";r={self.remaining};t={math.ceil(self.reset_s)}'


UNITS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
         "day": 86400}
POLICY_TEXT = re.compile(r"([1-9][0-9]{0,8})/(" + "|".join(UNITS) + ")")
MAX_WINDOW_S = 86400.0
MAX_LOG = 10_000           # sliding_window_log keeps an entry per admitted request
WINDOWS = ("fixed_window", "sliding_window_counter", "sliding_window_log")


def log_limit_problem(policy):
    """Why a policy cannot be kept as an exact log, or None."""
    if policy.algorithm == "sliding_window_log" and policy.limit > MAX_LOG:
        return f"the exact log keeps an entry per request: its limit is {MAX_LOG} at most"
    return None


@functools.lru_cache(maxsize=1024)  # a service is asked the same few policies over and over
def parse_policy(text, algorithm):
    """`N/UNIT` ("100/min") as a Policy of `algorithm`, its burst the whole limit; ValueError
    for anything else."""
    match = POLICY_TEXT.fullmatch(text.strip())
    if not match:
        raise ValueError(f"must be N/UNIT, UNIT one of {', '.join(UNITS)} (like 100/min)")
    limit = int(match.group(1))
    return Policy(algorithm, limit, float(UNITS[match.group(2)]), limit)


# =============================================================================================
# The algorithms: (state, now, cost) → (decision, new state); None is a fresh key's state
# =============================================================================================

class FixedWindow:
    """A counter per window of the clock: (window number, count)."""

    def __init__(self, policy):
        self.policy = policy

    def check(self, state, now, cost):
        limit, window = self.policy.limit, self.policy.window_s
        number = math.floor(now / window)
        count = state[1] if state and state[0] == number else 0
        window_end = (number + 1) * window - now
        if count + cost > limit:  # the next window starts empty: the cost passes then
            return Decision(False, limit - count, window_end, window_end), state
        count += cost
        return Decision(True, limit - count, window_end if count else 0.0, 0.0), (number, count)


class SlidingWindowCounter:
    """This window's count and the last one's, the last one weighted by how much of it still
    lies within `window_s` of now: (window number, previous count, current count)."""

    def __init__(self, policy):
        self.policy = policy

    def check(self, state, now, cost):
        limit, window = self.policy.limit, self.policy.window_s
        number = math.floor(now / window)
        previous, current = self._counts(state, number)
        elapsed = now / window - number          # 0 … 1 into the current window
        estimate = previous * (1 - elapsed) + current
        if estimate + cost > limit:
            return Decision(False, max(0, math.floor(limit - estimate)),
                            self._whole_in(previous, current, elapsed),
                            self._wait(previous, current, elapsed, cost)), state
        current += cost
        return (Decision(True, max(0, math.floor(limit - estimate - cost)),
                         self._whole_in(previous, current, elapsed), 0.0),
                (number, previous, current))

    @staticmethod
    def _counts(state, number):
        if state is None or state[0] < number - 1:
            return 0, 0
        if state[0] == number - 1:  # the window moved on: its count is now the previous one
            return state[2], 0
        return state[1], state[2]

    def _whole_in(self, previous, current, elapsed):
        """Seconds until the estimate is 0: this window's count weighs until the next ends."""
        if current:
            return (2 - elapsed) * self.policy.window_s
        return (1 - elapsed) * self.policy.window_s if previous else 0.0

    def _wait(self, previous, current, elapsed, cost):
        """Seconds until previous·(1 − f) + current + cost ≤ limit, as the weight decays."""
        limit, window = self.policy.limit, self.policy.window_s
        if current + cost <= limit:  # within this window, once enough of the previous decays
            return ((1 - (limit - current - cost) / previous) - elapsed) * window
        # in the next window, where this one is the previous: current·(1 − f) + cost ≤ limit
        return (1 - elapsed + (1 - (limit - cost) / current)) * window


class SlidingWindowLog:
    """Every admitted request's (time, cost) within the last `window_s`, and their sum: exact,
    at the price of an entry per admitted request (so its limit is capped at `MAX_LOG`)."""

    def __init__(self, policy):
        self.policy = policy

    def check(self, state, now, cost):
        limit, window = self.policy.limit, self.policy.window_s
        log, spent = state or (collections.deque(), 0)
        while log and log[0][0] <= now - window:  # expired: forgetting them spends nothing
            spent -= log.popleft()[1]
        if spent + cost > limit:
            freed, wait = spent, 0.0
            for at, entry_cost in log:  # the oldest expire first
                freed -= entry_cost
                wait = at + window - now
                if freed + cost <= limit:
                    break
            return Decision(False, limit - spent, log[-1][0] + window - now, wait), (log, spent)
        if cost:
            log.append((now, cost))
        spent += cost
        return (Decision(True, limit - spent, log[-1][0] + window - now if log else 0.0, 0.0),
                (log, spent))


class TokenBucket:
    """Tokens that refill at limit/window_s a second, up to `burst`: (tokens, when counted)."""

    def __init__(self, policy):
        self.policy = policy
        self.rate = policy.limit / policy.window_s

    def check(self, state, now, cost):
        burst = self.policy.burst
        tokens = burst if state is None else min(burst, state[0] + (now - state[1]) * self.rate)
        if tokens < cost:
            return Decision(False, math.floor(tokens), (burst - tokens) / self.rate,
                            (cost - tokens) / self.rate), state
        tokens -= cost
        return Decision(True, math.floor(tokens), (burst - tokens) / self.rate, 0.0), (tokens, now)


class GCRA:
    """The theoretical arrival time (TAT) of the next request: each admitted unit of cost moves
    it `interval` (window_s/limit) later; a request passes while the TAT, after it, stays within
    `burst` intervals of now. One number per key."""

    def __init__(self, policy):
        self.policy = policy
        self.interval = policy.window_s / policy.limit

    def check(self, state, now, cost):
        interval, capacity = self.interval, self.policy.burst * self.interval
        tat = max(state if state is not None else now, now)
        new_tat = tat + cost * interval
        if new_tat - now > capacity:
            return Decision(False, math.floor((capacity - (tat - now)) / interval + 1e-9),
                            tat - now, new_tat - now - capacity), state
        return Decision(True, math.floor((capacity - (new_tat - now)) / interval + 1e-9),
                        new_tat - now, 0.0), new_tat


ALGORITHMS = {"fixed_window": FixedWindow, "sliding_window_counter": SlidingWindowCounter,
              "sliding_window_log": SlidingWindowLog, "token_bucket": TokenBucket, "gcra": GCRA}


@functools.lru_cache(maxsize=1024)
def algorithm_for(policy):
    """One algorithm object per policy, shared by all its keys (a key holds only its state)."""
    return ALGORITHMS[policy.algorithm](policy)


# =============================================================================================
# The limiter: keys, their state, one lock, bounded memory
# =============================================================================================

class Limiter:
    """Each key's policy and state, at most `max_keys` of them (the least recently used goes
    first). `check` reads, decides and writes under one lock: checks of one key never race."""

    def __init__(self, max_keys=100_000, clock=time.monotonic):
        self.max_keys = max_keys
        self.clock = clock
        self.keys = collections.OrderedDict()   # key → (policy, state)
        self.lock = threading.Lock()

    def check(self, key, policy, cost=1):
        """The decision for spending `cost` under `policy` (ValueError: the key is limited by
        another policy)."""
        with self.lock:
            now = self.clock()
            entry = self.keys.get(key)
            if entry is not None and entry[0] != policy:
                raise ValueError(f"the key is limited by {describe(entry[0])}")
            state = entry[1] if entry else None
            decision, state = algorithm_for(policy).check(state, now, cost)
            if entry is None:
                self._make_room()
            self.keys[key] = (policy, state)
            self.keys.move_to_end(key)
            return decision

    def _make_room(self):
        while len(self.keys) >= self.max_keys:
            self.keys.popitem(last=False)
        # One step of cleaning per new key: the least recent key, if its quota is whole again,
        # is the same as no state at all.
        if self.keys:
            key, (policy, state) = next(iter(self.keys.items()))
            if algorithm_for(policy).check(state, self.clock(), 0)[0].reset_s <= 0:
                del self.keys[key]

    def inspect(self, key):
        """(policy, the decision for a cost of 0) of a key with state, or None."""
        with self.lock:
            entry = self.keys.get(key)
            if entry is None:
                return None
            policy, state = entry
            return policy, algorithm_for(policy).check(state, self.clock(), 0)[0]

    def reset(self, key):
        with self.lock:
            return self.keys.pop(key, None) is not None


def describe(policy):
    return (f"{policy.algorithm} {policy.limit} per {policy.window_s:g} s"
            f"{f', burst {policy.burst}' if policy.burst != policy.limit else ''}")


# =============================================================================================
# Middleware: a limit in front of routes, with the IETF headers
# =============================================================================================

def client_key(request):
    """Who a request counts against: its API key, else the peer's address (never a header a
    client could set to anything, such as X-Forwarded-For)."""
    api_key = request.header("x-api-key")
    return f"key:{api_key}" if api_key else f"ip:{request.client[0]}"


def rate_limit(limiter, policy, key_of=client_key):
    """A middleware step that limits the routes declared with `rate_limited=True`: every answer
    carries `RateLimit-Policy` and `RateLimit`; over the limit, a 429 with `Retry-After`."""
    def enforce_rate_limit(request, call_next):
        if not request.route.meta.get("rate_limited"):
            return call_next(request)
        return admit(limiter, key_of(request), policy, request, call_next)
    return enforce_rate_limit


def admit(limiter, key, policy, request, call_next):
    """Spend one of `key`'s quota under `policy`: the answer of `call_next` with the RateLimit
    headers, or a 429 with them and `Retry-After`. (A middleware that picks the key and the
    policy per request, as saas_starter's per plan, calls this.)"""
    decision = limiter.check(key, policy)
    trace_event(f"{key}: {'allowed' if decision.allowed else 'refused'}, "
                f"{decision.remaining} left")
    headers = {"RateLimit-Policy": policy.header(), "RateLimit": decision.header()}
    if not decision.allowed:
        raise TooManyRequests(f"over the limit of {describe(policy)}; retry in "
                              f"{decision.retry_after_s:.1f} s",
                              retry_after=decision.retry_after_s, headers=headers)
    response = call_next(request)
    response.headers.extend(headers.items())
    return response


# =============================================================================================
# The service
# =============================================================================================

class PolicyField(Field):
    """`"100/min"`, or `{"algorithm", "limit", "window_s", "burst"?}`; cleaned to a Policy (a
    string's algorithm None: the server's `--algorithm`)."""

    OBJECT = {"algorithm": Choice(tuple(ALGORITHMS), required=True),
              "limit": Integer(1, 1_000_000_000, required=True),
              "window_s": Integer(1, int(MAX_WINDOW_S), required=True,
                                  description="the window, in whole seconds"),
              "burst": Integer(1, 1_000_000_000, description="the most admitted at once "
                               "(default: limit; token_bucket and gcra only)")}

    def shape(self):
        return {"oneOf": [{"type": "string", "pattern": f"^{POLICY_TEXT.pattern}$"},
                          body_schema(self.OBJECT)]}

    def clean(self, value):
        if isinstance(value, str):
            try:
                return parse_policy(value, None)
            except ValueError as error:
                raise Invalid(str(error)) from None
        if not isinstance(value, dict):
            raise Invalid("must be a string like 100/min or an object")
        try:
            fields = validate(value, self.OBJECT)
        except ValidationFailed as error:
            raise Invalid("; ".join(f"{e['field']} {e['message']}" for e in error.errors)) \
                from None
        algorithm, limit, burst = fields["algorithm"], fields["limit"], fields.get("burst")
        if algorithm in WINDOWS and burst not in (None, limit):
            raise Invalid("burst is for token_bucket and gcra: a window admits its limit")
        policy = Policy(algorithm, limit, float(fields["window_s"]), burst or limit)
        if problem := log_limit_problem(policy):
            raise Invalid(problem)
        return policy


CHECK = {"key": Text(1, 256, strip=False, required=True), "policy": PolicyField(required=True),
         "cost": Integer(1, 1_000_000_000, default=1)}
CHECK_ANSWER = {"type": "object", "required": ["allowed", "remaining", "reset_s", "retry_after_s"]}


@app.post("/check", body_limit=16 * 1024,
          request_schema=body_schema(CHECK),
          responses={200: "The decision, allowed or not",
                     409: "The key is limited by another policy",
                     422: "A bad field, or a cost over the burst (it could never pass)"},
          response_schema=CHECK_ANSWER)
def check(request):
    """Spend `cost` of `key`'s quota under `policy`, if it fits"""
    values = validate(request.json_object(), CHECK)
    policy, cost = values["policy"], values["cost"]
    if policy.algorithm is None:  # given as N/UNIT
        policy = policy._replace(algorithm=request.app.state.algorithm)
        if problem := log_limit_problem(policy):
            raise ValidationFailed({"policy": problem})
    if cost > policy.burst:
        raise ValidationFailed({"cost": f"is over the burst of {policy.burst}: it could never "
                                        f"pass"})
    try:
        return request.app.state.service.check(values["key"], policy, cost).json()
    except ValueError as error:
        raise Conflict(f"{error}; DELETE /limits/{{key}} to change it") from None


@app.get("/limits/{key}", responses={200: "The key's policy and what is left",
                                     404: "The key has no state (never checked, reset, or "
                                          "whole again and forgotten)"})
def inspect(request, key):
    """A key's policy and its quota now"""
    found = request.app.state.service.inspect(key)
    if found is None:
        raise NotFound(f"no state for the key {key!r}")
    policy, decision = found
    return {"key": key, "policy": policy._asdict(), "remaining": decision.remaining,
            "reset_s": round(decision.reset_s, 3)}


@app.delete("/limits/{key}", responses={204: "Reset: its next check starts whole",
                                        404: "The key has no state"})
def reset(request, key):
    """Forget a key's state"""
    if not request.app.state.service.reset(key):
        raise NotFound(f"no state for the key {key!r}")
    return no_content()


@app.get("/api/resource", rate_limited=True,
         responses={200: "The resource", 429: "Over the limit: Retry-After says when to come back"})
def resource(request):
    """A demo resource behind the middleware, limited per X-API-Key or client address"""
    return {"resource": "a demo resource", "client": client_key(request)}


# =============================================================================================
# Running
# =============================================================================================

def main(argv=None):
    parser = app.arg_parser()
    parser.add_argument("--policy", default="60/min",
                        help="the demo API's limit per client, N/UNIT (default 60/min)")
    parser.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="gcra",
                        help="the algorithm of --policy and of policies given as N/UNIT "
                             "(default gcra)")
    parser.add_argument("--max-keys", type=bounded(int, "keys", at_least=1), default=100_000,
                        help="keys kept at most, per limiter (default 100,000)")
    args = parser.parse_args(argv)
    try:
        policy = parse_policy(args.policy, args.algorithm)
    except ValueError as error:
        parser.error(f"--policy: {error}")
    if problem := log_limit_problem(policy):
        parser.error(f"--policy: {problem}")
    app.state.algorithm = args.algorithm
    app.state.service = Limiter(args.max_keys)
    app.use(rate_limit(Limiter(args.max_keys), policy))
    app.run(args)


if __name__ == "__main__":
    main()
