"""level05/job_processor.py, black-box: the job API, the queue's promises (one claim per job
across threads and processes, leases and heartbeats, reclaim after kill -9, backoff with jitter,
dead letters, timeouts, order, idempotency keys, cancellation), its event stream, its stats,
and clean stops of the server and of `worker` processes.

Workers log one stderr line per attempt started (`job 12 sleep: attempt 1 started by NAME`):
the tests count executions from those lines, in every process's log. Backoffs and leases are
set short by flag so the module runs in well under a minute.
"""
import collections
import concurrent.futures
import datetime
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.harness import ROOT, clean_env, expect, expect_json, expect_problem

SCRIPT = "level05/job_processor.py"
TIMEOUT = 10
STARTED = re.compile(r"job (\d+) \w+: attempt (\d+) started by (\S+)")


# --------------------------------------------------------------------------------------------
# Helpers


def post_job(server, job_type, payload=None, headers=None, **options):
    body = {"type": job_type, **({} if payload is None else {"payload": payload}), **options}
    return requests.post(f"{server.url}/jobs", json=body, headers=headers, timeout=TIMEOUT)


def new_job(server, job_type, payload=None, **options):
    resp = post_job(server, job_type, payload, **options)
    job = expect_json(resp, 202)
    assert resp.headers["Location"] == f"/jobs/{job['id']}"
    return job


def read_job(server, job_id):
    return expect_json(requests.get(f"{server.url}/jobs/{job_id}", timeout=TIMEOUT), 200)


def wait_for(server, job_id, done, timeout=10.0):
    """Poll the job until `done(job)`; fail with the last state after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        job = read_job(server, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.02)


def status_is(*statuses):
    return lambda job: job["status"] in statuses


def stats(server):
    return expect_json(requests.get(f"{server.url}/queue/stats", timeout=TIMEOUT), 200)


def wait_for_stats(server, done, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        current = stats(server)
        if done(current):
            return current
        assert time.monotonic() < deadline, f"the queue never got there: {current}"
        time.sleep(0.05)


def all_jobs(server, **filters):
    jobs, cursor = [], None
    while True:
        params = {"limit": 100, **filters, **({"cursor": cursor} if cursor else {})}
        page = expect_json(requests.get(f"{server.url}/jobs", params=params, timeout=TIMEOUT), 200)
        jobs += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs


def starts(*logs):
    """[(job id, attempt, worker name)] of every attempt started, from these stderr texts."""
    return [(int(m[1]), int(m[2]), m[3]) for text in logs for m in STARTED.finditer(text)]


def events(resp):
    """The SSE events of a streamed response until it ends: [(id, event, job)]."""
    found, fields = [], {}
    for line in resp.iter_lines(decode_unicode=True):
        if line == "":
            if "data" in fields:
                found.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return found


def job_events(server, job_id, headers=None):
    with requests.get(f"{server.url}/jobs/{job_id}/events", headers=headers, stream=True,
                      timeout=TIMEOUT) as resp:
        expect(resp, 200)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return events(resp)


def seconds(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Worker:
    """`job_processor.py worker` as a subprocess, its stderr in a file."""

    def __init__(self, db_path, workdir, *args):
        self.log_path = workdir / f"worker-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / SCRIPT), "worker", "--db", str(db_path), *map(str, args)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=workdir,
                env=clean_env())
        self.wait_for_log(f"worker process {self.proc.pid}:")   # its readiness line

    def log(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, needle, timeout=10.0):
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            assert self.proc.poll() is None, \
                f"the worker exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {needle!r} in the worker's log:\n{self.log()}"
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)


@pytest.fixture
def start_worker(tmp_path):
    """`start_worker(server, *args)` → a running Worker on the server's database. At teardown
    every worker still running gets SIGTERM and must exit 0."""
    started = []

    def start(server, *args):
        worker = Worker(server.db_path, tmp_path, *args)
        started.append(worker)
        return worker

    yield start
    codes = [(worker.stop(), worker.log()) for worker in started if worker.proc.poll() is None]
    assert all(code == 0 for code, _ in codes), f"a worker did not stop cleanly: {codes}"


@pytest.fixture(scope="module")
def api_only(start_server_module):
    """A server without workers: jobs stay where the API puts them."""
    return start_server_module(SCRIPT, "--workers", "0")


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, "--backoff-s", "0.05", "--lease-s", "2")


# --------------------------------------------------------------------------------------------
# The API


def test_a_job_is_accepted_run_and_read_back(server):
    job = new_job(server, "hash", {"data": "abc", "rounds": 1000})
    assert job["status"] == "queued" and job["attempts"] == 0 and job["progress"] == 0
    done = wait_for(server, job["id"], status_is("succeeded"))
    digest = b"abc"
    for _ in range(1000):
        digest = hashlib.sha256(digest).digest()
    assert done["result"] == {"sha256": digest.hex(), "rounds": 1000}
    assert done["attempts"] == 1 and done["progress"] == 100 and done["error"] is None
    assert done["next_run_at"] is None
    assert seconds(done["created_at"]) <= seconds(done["started_at"]) <= seconds(done["finished_at"])


@pytest.mark.parametrize("body, fields", [
    ({"type": "nope"}, ["type"]),
    ({}, ["type"]),
    ({"type": "sleep"}, ["payload.ms"]),
    ({"type": "sleep", "payload": {"ms": -1}}, ["payload.ms"]),
    ({"type": "sleep", "payload": {"ms": "5"}}, ["payload.ms"]),
    ({"type": "sleep", "payload": {"ms": 5, "extra": 1}}, ["payload.extra"]),
    ({"type": "sleep", "payload": []}, ["payload"]),
    ({"type": "hash", "payload": {"rounds": 0}}, ["payload.data", "payload.rounds"]),
    ({"type": "sleep", "payload": {"ms": 1}, "priority": 10, "max_attempts": 0,
      "timeout_s": 0, "run_at": "tomorrow"}, ["priority", "max_attempts", "timeout_s", "run_at"]),
    ({"type": "sleep", "payload": {"ms": 1}, "status": "succeeded"}, ["status"]),
])
def test_an_invalid_job_is_a_422_naming_every_field(api_only, body, fields):
    resp = requests.post(f"{api_only.url}/jobs", json=body, timeout=TIMEOUT)
    problem = expect_problem(resp, 422)
    assert sorted(error["field"] for error in problem["errors"]) == sorted(fields), problem


def test_a_future_run_at_is_scheduled_and_the_list_filters(api_only):
    later = new_job(api_only, "sleep", {"ms": 1}, run_at="2999-01-01T00:00:00Z")
    assert later["status"] == "scheduled" and later["next_run_at"] == "2999-01-01T00:00:00.000Z"
    ids = [new_job(api_only, "fail", {"times": 0})["id"] for _ in range(3)]
    listed = all_jobs(api_only, type="fail", status="queued")
    assert [job["id"] for job in listed][:3] == ids[::-1], "newest first"
    assert {job["type"] for job in listed} == {"fail"}
    page = expect_json(requests.get(f"{api_only.url}/jobs", params={"limit": 2, "type": "fail"},
                                    timeout=TIMEOUT), 200)
    assert len(page["items"]) == 2 and page["next_cursor"]
    for params in ({"status": "bogus"}, {"type": "bogus"}, {"cursor": "nope"}):
        problem = expect_problem(requests.get(f"{api_only.url}/jobs", params=params,
                                              timeout=TIMEOUT), 400)
        assert problem["errors"][0]["field"] == next(iter(params))


def test_unknown_job_is_404(api_only):
    for path in ("/jobs/999999", "/jobs/999999/events"):
        expect_problem(requests.get(api_only.url + path, timeout=TIMEOUT), 404)
    for action in ("cancel", "retry"):
        expect_problem(requests.post(f"{api_only.url}/jobs/999999/{action}", timeout=TIMEOUT), 404)


def test_stats_count_by_status_and_type(start_server):
    own = start_server(SCRIPT, "--workers", "0")
    empty = stats(own)
    assert empty == {"by_status": {status: 0 for status in empty["by_status"]}, "by_type": {},
                     "done_last_minute": 0, "oldest_queued_age_s": None}
    assert set(empty["by_status"]) == {"queued", "scheduled", "running", "succeeded", "failed",
                                       "dead", "cancelled"}
    for _ in range(2):
        new_job(own, "sleep", {"ms": 1})
    new_job(own, "hash", {"data": "x"})
    new_job(own, "report", {"rows": 1}, run_at="2999-01-01T00:00:00Z")
    current = stats(own)
    assert current["by_status"]["queued"] == 3 and current["by_status"]["scheduled"] == 1
    assert current["by_type"] == {"sleep": 2, "hash": 1, "report": 1}
    assert 0 <= current["oldest_queued_age_s"] < 60


# --------------------------------------------------------------------------------------------
# Idempotency keys


def test_the_same_idempotency_key_answers_the_same_job(api_only):
    key = {"Idempotency-Key": "order-1234-receipt"}
    first = expect_json(post_job(api_only, "sleep", {"ms": 1}, headers=key), 202)
    again = post_job(api_only, "sleep", {"ms": 1}, headers=key)
    assert expect_json(again, 200)["id"] == first["id"]
    assert again.headers["Location"] == f"/jobs/{first['id']}"
    other = expect_problem(post_job(api_only, "sleep", {"ms": 2}, headers=key), 422)
    assert other["errors"][0]["field"] == "Idempotency-Key"
    too_long = {"Idempotency-Key": "x" * 256}
    bad = expect_problem(post_job(api_only, "sleep", {"ms": 1}, headers=too_long), 400)
    assert bad["errors"][0]["field"] == "Idempotency-Key"


def test_concurrent_requests_with_one_key_make_one_job(start_server):
    # A thread per connection: the requests really overlap inside the server.
    own = start_server(SCRIPT, "--workers", "0", "--server", "threaded")
    key = {"Idempotency-Key": "concurrent"}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_job(own, "sleep", {"ms": 1}, headers=key),
                                range(32)))
    assert sorted(resp.status_code for resp in answers) == [200] * 31 + [202]
    assert len({resp.json()["id"] for resp in answers}) == 1


# --------------------------------------------------------------------------------------------
# The claim: one worker per job, in priority → run_at → FIFO order


def test_jobs_are_claimed_by_priority_then_run_at_then_fifo(start_server, start_worker):
    own = start_server(SCRIPT, "--workers", "0")
    low_first = new_job(own, "sleep", {"ms": 0})
    high_late = new_job(own, "sleep", {"ms": 0}, priority=5)
    high_early = new_job(own, "sleep", {"ms": 0}, priority=5, run_at="2020-01-01T00:00:00Z")
    low_second = new_job(own, "sleep", {"ms": 0})
    future = new_job(own, "sleep", {"ms": 0}, priority=9, run_at="2999-01-01T00:00:00Z")
    worker = start_worker(own, "--workers", "1")
    wait_for(own, low_second["id"], status_is("succeeded"))
    order = [job_id for job_id, _, _ in starts(worker.log())]
    assert order == [high_early["id"], high_late["id"], low_first["id"], low_second["id"]]
    assert read_job(own, future["id"])["status"] == "scheduled"


def test_each_job_runs_exactly_once_across_threads_and_worker_processes(start_server, start_worker):
    own = start_server(SCRIPT, "--workers", "0")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: new_job(own, "sleep", {"ms": 20})["id"], range(150)))
    workers = [start_worker(own, "--workers", "3") for _ in range(3)]
    wait_for_stats(own, lambda s: s["by_status"]["succeeded"] == 150)
    ran = starts(*(worker.log() for worker in workers))
    assert collections.Counter(job_id for job_id, _, _ in ran) == dict.fromkeys(ids, 1), \
        "every job started exactly once"
    assert {job["attempts"] for job in all_jobs(own)} == {1}
    processes = {name.rpartition(":")[2] for _, _, name in ran}
    assert len(processes) >= 2, f"only {processes} ran jobs: the test proves nothing"


# --------------------------------------------------------------------------------------------
# Leases: heartbeats, and reclaim after a crash


def test_heartbeats_keep_a_job_longer_than_its_lease(start_server):
    own = start_server(SCRIPT, "--workers", "2", "--lease-s", "0.3", "--poll-s", "0.02")
    job = new_job(own, "sleep", {"ms": 1500})
    done = wait_for(own, job["id"], status_is("succeeded", "failed", "dead"))
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert [attempt for job_id, attempt, _ in starts(own.stderr_text()) if job_id == job["id"]] == [1]
    assert "lease expired" not in own.stderr_text()


def test_a_job_whose_worker_is_killed_runs_again_after_its_lease(start_server, start_worker):
    own = start_server(SCRIPT, "--workers", "0")
    first = start_worker(own, "--workers", "1", "--lease-s", "0.5")
    job = new_job(own, "sleep", {"ms": 1500})
    running = wait_for(own, job["id"], status_is("running"))
    assert running["worker"].endswith(f":{first.proc.pid}")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = start_worker(own, "--workers", "1", "--lease-s", "0.5")
    done = wait_for(own, job["id"], status_is("succeeded"))
    assert done["attempts"] == 2 and done["worker"].endswith(f":{second.proc.pid}")
    assert "lease expired" in done["error"]
    assert [job_id for job_id, _, _ in starts(second.log())] == [job["id"]]


def test_a_job_cancelled_while_its_dead_worker_held_it_is_not_run_again(start_server,
                                                                          start_worker):
    own = start_server(SCRIPT, "--workers", "0")
    first = start_worker(own, "--workers", "1", "--lease-s", "0.5")
    job = new_job(own, "sleep", {"ms": 5000})
    wait_for(own, job["id"], status_is("running"))
    first.stop(signal.SIGKILL)
    asked = expect_json(requests.post(f"{own.url}/jobs/{job['id']}/cancel", timeout=TIMEOUT), 200)
    assert asked["status"] == "running" and asked["cancel_requested"]
    second = start_worker(own, "--workers", "1", "--lease-s", "0.5")
    done = wait_for(own, job["id"], status_is("cancelled"))
    assert done["attempts"] == 1 and done["finished_at"]
    second.wait_for_log("lease expired")
    assert starts(second.log()) == [], "the cancelled job ran again"


def test_jobs_queued_when_the_server_is_killed_run_after_a_restart(start_server):
    before = start_server(SCRIPT, "--workers", "0")
    ids = [new_job(before, "sleep", {"ms": 0})["id"] for _ in range(5)]
    before.kill9()
    after = start_server(SCRIPT, db=before.db_path)
    for job_id in ids:
        assert wait_for(after, job_id, status_is("succeeded"))["attempts"] == 1
    assert stats(after)["done_last_minute"] == 5


# --------------------------------------------------------------------------------------------
# Failures: backoff, dead letters, retry, timeouts


def test_the_backoff_doubles_with_each_failure_up_to_the_cap(start_server):
    own = start_server(SCRIPT, "--backoff-s", "0.25", "--backoff-max-s", "0.6")
    job = new_job(own, "fail", {"times": 3})
    seen = job_events(own, job["id"])
    failed = [event for _, kind, event in seen if kind == "status" and event["status"] == "failed"]
    assert [event["attempts"] for event in failed] == [1, 2, 3]
    waits = [seconds(event["next_run_at"]) - seconds(event["updated_at"]) for event in failed]
    assert 0.2 - 0.002 <= waits[0] <= 0.3 + 0.002, waits        # 0.25 s ± 20 %
    assert 0.4 - 0.002 <= waits[1] <= 0.6 + 0.002, waits        # 0.5 s ± 20 %
    assert abs(waits[2] - 0.6) <= 0.002, waits                   # 1 s ± 20 %, capped at 0.6
    assert seen[-1][2]["status"] == "succeeded" and seen[-1][2]["attempts"] == 4


def test_backoffs_are_jittered_within_20_percent(start_server):
    own = start_server(SCRIPT, "--backoff-s", "1", "--workers", "4")
    ids = {new_job(own, "fail", {"times": 1})["id"] for _ in range(12)}
    deadline = time.monotonic() + 10
    while len(failed := [job for job in all_jobs(own, status="failed") if job["id"] in ids]) < 12:
        assert time.monotonic() < deadline, f"only {len(failed)} of 12 failed"
        time.sleep(0.02)
    waits = [seconds(job["next_run_at"]) - seconds(job["updated_at"]) for job in failed]
    assert all(0.8 - 0.002 <= wait <= 1.2 + 0.002 for wait in waits), waits
    assert len({round(wait, 3) for wait in waits}) > 1, f"no jitter: {waits}"


def test_a_job_out_of_attempts_is_dead_until_retried(server):
    job = new_job(server, "fail", {"times": 5}, max_attempts=2)
    dead = wait_for(server, job["id"], status_is("dead"))
    assert dead["attempts"] == 2 and "attempt 2" in dead["error"] and dead["next_run_at"] is None
    expect_problem(requests.post(f"{server.url}/jobs/{job['id']}/cancel", timeout=TIMEOUT), 409)
    retried = expect_json(requests.post(f"{server.url}/jobs/{job['id']}/retry", timeout=TIMEOUT), 200)
    assert retried["status"] in ("queued", "running") and retried["attempts"] <= 1
    again = wait_for(server, job["id"], lambda j: j["status"] == "dead" and j["attempts"] == 2)
    assert "attempt 2" in again["error"]
    done = new_job(server, "fail", {"times": 0})
    wait_for(server, done["id"], status_is("succeeded"))
    conflict = expect_problem(requests.post(f"{server.url}/jobs/{done['id']}/retry",
                                            timeout=TIMEOUT), 409)
    assert "succeeded" in conflict["detail"]


def test_a_job_past_its_timeout_fails_its_attempt(server):
    job = new_job(server, "sleep", {"ms": 5000}, timeout_s=0.3, max_attempts=2)
    seen = [event for _, kind, event in job_events(server, job["id"]) if kind == "status"]
    statuses = [event["status"] for event in seen]
    assert statuses[-4:] == ["running", "failed", "running", "dead"], statuses
    assert "timed out after 0.3 s" in seen[-1]["error"]
    assert seconds(seen[-3]["updated_at"]) - seconds(seen[-4]["started_at"]) < 3


# --------------------------------------------------------------------------------------------
# Cancellation


def test_waiting_jobs_are_cancelled_at_once_and_finished_ones_refuse(api_only):
    queued = new_job(api_only, "sleep", {"ms": 1})
    scheduled = new_job(api_only, "sleep", {"ms": 1}, run_at="2999-01-01T00:00:00Z")
    for job in (queued, scheduled):
        cancelled = expect_json(requests.post(f"{api_only.url}/jobs/{job['id']}/cancel",
                                              timeout=TIMEOUT), 200)
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
        problem = expect_problem(requests.post(f"{api_only.url}/jobs/{job['id']}/cancel",
                                               timeout=TIMEOUT), 409)
        assert "cancelled" in problem["detail"]


def test_a_failed_job_waiting_to_retry_can_be_cancelled(start_server):
    own = start_server(SCRIPT, "--backoff-s", "30")
    job = new_job(own, "fail", {"times": 1})
    wait_for(own, job["id"], status_is("failed"))
    cancelled = expect_json(requests.post(f"{own.url}/jobs/{job['id']}/cancel", timeout=TIMEOUT), 200)
    assert cancelled["status"] == "cancelled" and cancelled["next_run_at"] is None


def test_a_running_job_sees_its_cancellation_at_the_next_progress_report(server):
    job = new_job(server, "sleep", {"ms": 20_000})
    wait_for(server, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0)
    asked = expect_json(requests.post(f"{server.url}/jobs/{job['id']}/cancel", timeout=TIMEOUT), 200)
    assert asked["status"] == "running" and asked["cancel_requested"] is True
    done = wait_for(server, job["id"], status_is("cancelled"), timeout=3)
    assert done["progress"] < 100 and done["result"] is None


# --------------------------------------------------------------------------------------------
# The event stream


def test_the_event_stream_shows_progress_and_ends_after_the_final_status(server):
    job = new_job(server, "report", {"rows": 300})
    seen = job_events(server, job["id"])
    kinds = [kind for _, kind, _ in seen]
    assert kinds[0] == "status" and kinds[-1] == "status" and "progress" in kinds
    progress = [event["progress"] for _, kind, event in seen if kind == "progress"]
    assert progress == sorted(progress) and len(progress) >= 10
    last = seen[-1][2]
    assert last["status"] == "succeeded" and last["result"]["rows"] == 300
    ids = [event_id for event_id, _, _ in seen]
    assert ids[1:] == sorted(ids[1:]) and len(set(ids)) == len(ids)
    # A finished job's stream sends its final status at once, and ends.
    assert [(kind, event["status"]) for _, kind, event in job_events(server, job["id"])] == \
           [("status", "succeeded")]
    # Resuming after an event sends what came after it, and nothing before.
    middle = seen[len(seen) // 2][0]
    resumed = job_events(server, job["id"], {"Last-Event-ID": str(middle)})
    assert [event_id for event_id, _, _ in resumed] == [i for i in ids if i > middle]
    # After the final event there is nothing more: 204 tells an EventSource not to reconnect.
    done = requests.get(f"{server.url}/jobs/{job['id']}/events",
                        headers={"Last-Event-ID": str(ids[-1])}, timeout=TIMEOUT)
    assert expect(done, 204).content == b""
    bad = requests.get(f"{server.url}/jobs/{job['id']}/events", headers={"Last-Event-ID": "x"},
                       timeout=TIMEOUT)
    assert expect_problem(bad, 400)["errors"][0]["field"] == "Last-Event-ID"


# --------------------------------------------------------------------------------------------
# Stopping: nothing is left running


def test_sigterm_finishes_short_jobs_releases_long_ones_and_exits_0(start_server):
    own = start_server(SCRIPT, "--workers", "2", "--stop-timeout", "1")
    short = new_job(own, "sleep", {"ms": 600})
    long = new_job(own, "sleep", {"ms": 60_000})
    for job in (short, long):
        wait_for(own, job["id"], status_is("running"))
    own.stop()
    after = start_server(SCRIPT, "--workers", "0", db=own.db_path)
    assert read_job(after, short["id"])["status"] == "succeeded"
    released = read_job(after, long["id"])
    assert released["status"] == "queued" and released["attempts"] == 0 and released["worker"] is None
    assert stats(after)["by_status"]["running"] == 0


def test_a_worker_process_stops_the_same_way_on_sigterm(start_server, start_worker):
    own = start_server(SCRIPT, "--workers", "0")
    worker = start_worker(own, "--workers", "2", "--stop-timeout", "1")
    short = new_job(own, "sleep", {"ms": 600})
    long = new_job(own, "sleep", {"ms": 60_000})
    for job in (short, long):
        wait_for(own, job["id"], status_is("running"))
    assert worker.stop() == 0, worker.log()
    assert read_job(own, short["id"])["status"] == "succeeded"
    released = read_job(own, long["id"])
    assert released["status"] == "queued" and released["attempts"] == 0
    assert "stopped" in worker.log()


def test_the_worker_command_refuses_an_unusable_database(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / SCRIPT), "worker", "--db", str(tmp_path)],
                          capture_output=True, text=True, timeout=30, env=clean_env())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
