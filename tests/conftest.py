"""Fixtures shared by every test file.

    def test_counter(start_server):
        server = start_server("level01/counter.py", "--memory")   # --port 0, temp --db, cwd=tmp
        resp = requests.post(f"{server.url}/counters/a/increment", timeout=5)
        body = expect_json(resp, 200)                            # failure message = curl command
        assert body["value"] == 1
        # teardown: SIGTERM, assert exit status 0 within 10 s

`start_server` is function-scoped; `start_server_module` keeps servers for a whole test module
(for read-mostly tests that share one server). Both stop every server they started.
"""
import os

import pytest

from tests.harness import ServerGroup

# The servers are on loopback: a proxy from the environment must not sit between the tests
# (requests, or curl in the README walk-throughs) and them.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))


@pytest.fixture
def start_server(tmp_path_factory):
    """A factory: `start_server(script, *args, db="auto", env=None)` → a running `Server`.
    Every server still running at teardown gets SIGTERM and must exit with status 0."""
    group = ServerGroup(tmp_path_factory)
    yield group.start
    group.stop_all()


@pytest.fixture(scope="module")
def start_server_module(tmp_path_factory):
    """`start_server` whose servers live until the end of the test module."""
    group = ServerGroup(tmp_path_factory)
    yield group.start
    group.stop_all()


def pytest_terminal_summary(terminalreporter):
    """lib's code lines per module beside its budget, at the end of every run that collected
    the budget test (issue 10 item 3: the suite prints the count, passing or not)."""
    reports = [report for kind in terminalreporter.stats.values() for report in kind]
    if not any(getattr(report, "nodeid", "").startswith("tests/test_lib_budget.py")
               for report in reports):
        return
    from tests.test_lib_budget import budget_report
    from tests.test_lib_budget import LIB_BUDGET
    terminalreporter.write_sep("-", f"lib/ code lines (budget {LIB_BUDGET:,}; issue 10 asked 1,500)")
    terminalreporter.write_line(budget_report())
