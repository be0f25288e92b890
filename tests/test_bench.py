"""The benchmark still runs: tests/bench/run.py is not part of the suite (its figures are judged by
a person, never by a timed assertion), but its machinery is, so that it cannot rot unnoticed.

Short runs of the Python load generator (the one that needs no wrk) through the scenarios that
use each of its parts: the fixed-request closed loop and the raw sqlite reference (counter, with
its check that the stored value equals the increments answered), the same loop counting 302s as
successes (redirects, with its check that the link's stats hold every redirect answered), the
same loop POSTing a JSON body with a bearer token (evaluations, with its probe of the variant), the
request flows (crud) and the generated documents with the query mix (search, on 2,000 documents);
the idle keep-alive connections scenario with a few connections; levels 04-06's scenarios; and
level 07's, each with what it checks afterwards (analytics' acknowledged events stored once,
audit's chain valid over a small built log, payments' deliveries processed once, deploy's reads
counted by the metrics and the JSON log). Only what the run did is
asserted — every row measured, no errors, the check passed, every connection answered — never a
speed or a memory figure. None of them needs the optional uvicorn reference.
"""
import re
import subprocess
import sys

import pytest

from tests.harness import ROOT, clean_env


def run_bench(scenario, *options):
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "run.py"), "--only", scenario,
                           "--tool", "python", "--duration", "1", "--connections", "4", *options],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table_rows(output, scenario):
    """(server, req/s, errors) of each row of the results table for `scenario`."""
    rows = []
    for line in output.splitlines():
        found = re.fullmatch(rf"{scenario}\s+(.+?)\s+([\d,.]+)\s+[\d.]+\s+[\d.]+\s+(\d+)", line.strip())
        if found:
            rows.append((found.group(1), float(found.group(2).replace(",", "")), int(found.group(3))))
    return rows


@pytest.mark.parametrize("scenario, options, servers", [
    ("counter", [], ["counter.py POST /counters/bench/increment", "raw sqlite"]),
    ("crud", [], ["notes.py mix", "POST /notes", "GET /notes?limit=20", "GET /notes/{id}",
                  "PATCH /notes/{id}", "health_check --server asyncio"]),
    ("redirects", [], ["url_shortener.py GET /{code} → 302", "health_check --server asyncio"]),
    ("evaluations", [], ["feature_flags.py POST /ofrep/v1/evaluate/flags/{key}", "health_check --server asyncio"]),
    ("search", ["--documents", "2000"], ["GET /search mix, one connection", "· words", "· phrase", "· prefix",
                                         "· filter", "· tag, dates, newest", "GET /search mix, 4 connections"]),
])
def test_a_short_benchmark_run_measures_every_row_without_errors(scenario, options, servers):
    output = run_bench(scenario, *options)
    assert "load generator: Python load generator" in output, output
    rows = table_rows(output, scenario)
    for server in servers:
        measured = [row for row in rows if server in row[0]]
        assert measured, f"no row for {server!r}:\n{output}"
        assert all(rps > 0 and errors == 0 for _, rps, errors in measured), output
    if scenario == "counter":
        assert "counter check OK" in output, output
    if scenario == "redirects":
        assert re.search(r"redirects check OK: total_clicks (\d+) = \1 redirects answered 302", output), output
    if scenario == "evaluations":
        assert "evaluations check OK: the probe answered 200, variant 'on', reason SPLIT" in output, output
        assert re.search(r"feature_flags OFREP evaluations ÷ health_check asyncio \(Python loadgen\)\s+[\d.]+"
                         r"\s+≥ 0.7\s+(PASS|MISS)", output), output
    if scenario == "search":
        # Measured and judged, never asserted: the line is there, whatever it says.
        assert re.search(r"search p95 on 2,000 documents \(one connection\)\s+[\d.]+ ms\s+≤ 30 ms\s+(PASS|MISS)",
                         output), output
        assert re.search(r"search: 2,000 documents imported in [\d.]+ s", output), output


@pytest.mark.parametrize("scenario, options, lines", [
    ("upload", ["--upload-mib", "4"], [r"upload ÷ writing the same bytes to a file\s+[\d.]+\s+≥ 0.5",
                                      r"upload: 4 MiB streamed at"]),
    ("jobs", [], [r"every job ran exactly once\s+5,000 of 5,000\s+5,000\s+PASS",
                  r"a worker killed -9: every job still succeeded\s+5,000\s+5,000\s+PASS"]),
    ("limits", [], [r"rate_limiter POST /check ÷ health_check asyncio \(Python loadgen\)\s+[\d.]+"]),
    ("gateway", [], [r"through api_gateway ÷ health_check alone \(Python loadgen\)\s+[\d.]+"]),
    ("chat", [], [r"fan-out chat.py: [\d,]+ deliveries/s, .*; 500 of 500 messages reached all 100"]),
])
def test_the_later_scenarios_run_and_check_what_they_measured(scenario, options, lines):
    """levels 04–06's scenarios (the logs scenario's half a million lines take too long here):
    each runs, and what it checks, the stored or delivered counts, holds."""
    output = run_bench(scenario, *options)
    for line in lines:
        assert re.search(line, output), output


@pytest.mark.parametrize("scenario, options, servers, lines", [
    ("analytics", [], ["analytics_collector.py POST /v1/batch", "analytics_collector.py POST /v1/track",
                       "health_check --server asyncio"],
     [r"analytics_collector events acknowledged durably through /v1/batch\s+[\d,]+ events/s\s+≥ 100,000",
      r"every acknowledged batch event stored, once\s+([\d,]+) of \1\s+\1\s+PASS",
      r"analytics tracks check OK: track events stored (\d+) = \1 tracks answered 200",
      r"analytics_collector POST /v1/track ÷ health_check asyncio \(Python loadgen\)\s+[\d.]+\s+≥ 0.5"]),
    ("audit", ["--audit-entries", "2000"], ["audit_log.py POST /audit", "raw sqlite"],
     [r"audit_log appends ÷ raw sqlite commits\s+[\d.]+\s+≥ 0.3",
      r"the appended chain verifies\s+valid\s+valid\s+PASS",
      r"audit check OK: entries by actor bench (\d+) = \1 appends answered 201",
      r"audit_log GET /audit/verify over 2,000 entries\s+[\d,]+ entries/s"]),
    ("payments", [], ["payment_webhooks.py POST /webhooks/stripe"],
     [r"every acknowledged delivery stored and processed once, its payment paid\s+([\d,]+) of \1\s+\1\s+PASS",
      r"time until all are processed, after the last acknowledgement\s+[\d.]+ s"]),
    ("deploy", [], ["deployment_ready.py GET /notes/{id}, metrics, JSON logs", "notes.py GET /notes/{id}, X-User-Id"],
     [r"deployment_ready GET /notes/\{id\} ÷ level 02 notes.py's \(Python loadgen\)\s+[\d.]+\s+≥ 0.8",
      r"reads counted by /metrics and logged as JSON lines\s+([\d,]+) and \1\s+≥ [\d,]+\s+PASS"]),
])
def test_the_level07_scenarios_measure_without_errors_and_find_everything_acknowledged(scenario, options, servers,
                                                                                        lines):
    """Level 07's scenarios (the audit one verifying a log of 2,000 entries built for it): every
    row measured without errors, and what each checks afterwards holds: every acknowledged event
    stored once, the chain valid, every delivery processed once, every read counted by the
    metrics and logged as JSON."""
    output = run_bench(scenario, *options)
    rows = table_rows(output, scenario)
    for server in servers:
        measured = [row for row in rows if server in row[0]]
        assert measured, f"no row for {server!r}:\n{output}"
        assert all(rps > 0 and errors == 0 for _, rps, errors in measured), output
    for line in lines:
        assert re.search(line, output), output


def test_a_short_run_holds_idle_connections_and_serves_each_of_them():
    output = run_bench("connections", "--idle-connections", "20")
    assert re.search(r"20 keep-alive connections on health_check asyncio, each answered 200\s+20/20\s+all\s+PASS",
                     output), output
    assert re.search(r"health_check --server asyncio: memory per idle connection\s+-?[\d.]+ KiB", output), output
    assert "health_check --server asyncio: 20/20 answered 200" in output, output
