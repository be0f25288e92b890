"""level06/microservices.py, black-box: it starts both services wired to each other (the first
stdout line is auth_service's, then one line per service), stops both on SIGTERM, and when
either child dies it stops the other and exits non-zero: no orphan.

A child's pid is read from /proc (Linux), which is the only way to kill one child on purpose.
"""
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import requests

from tests.harness import run_once
from tests.level03.accounts import TIMEOUT
from tests.level06.services import account, bearer, eventually

LAUNCHER = "level06/microservices.py"
SERVICE_LINE = re.compile(r"(auth_service|user_service) (http://127\.0\.0\.1:\d+)")


@pytest.fixture
def launched(start_server, tmp_path):
    """The launcher, and {service name: its URL} from its stdout."""
    server = start_server(LAUNCHER, "--port", "0", "--auth-db", tmp_path / "auth.sqlite3",
                          "--user-db", tmp_path / "users.sqlite3")

    def both_lines():
        urls = dict(match.groups() for line in server.stdout_text().splitlines()
                    if (match := SERVICE_LINE.fullmatch(line)))
        return urls.keys() == {"auth_service", "user_service"} and urls

    return server, eventually(both_lines, "a line per service after `listening on`")


def refuses_connections(url):
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs Linux's /proc/PID/task/PID/children")
    return [int(child) for child in path.read_text().split()]


def test_both_services_start_wired_to_each_other(launched):
    server, urls = launched
    assert urls["auth_service"] == server.url   # the first line is auth_service's
    user, token = account(server)
    profile = eventually(lambda: requests.get(f"{urls['user_service']}/users/me",
                                              headers=bearer(token), timeout=TIMEOUT).json()
                         .get("email"), "the profile reaches user_service")
    assert profile == user["email"]


def test_sigterm_stops_both(launched):
    server, urls = launched
    pids = children(server.proc.pid)
    assert len(pids) == 2
    server.stop()   # exit status 0
    assert all(refuses_connections(url) for url in urls.values())
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "a child outlived the launcher"


@pytest.mark.parametrize("victim", [0, 1], ids=["first-child", "second-child"])
def test_a_child_that_dies_takes_the_launcher_and_the_other_child_down(launched, victim):
    server, urls = launched
    pids = children(server.proc.pid)
    os.kill(pids[victim], signal.SIGKILL)
    code = server.proc.wait(timeout=30)
    server.stopped = True
    assert code != 0, "the launcher must say that a service failed"
    assert all(refuses_connections(url) for url in urls.values()), "an orphan still listens"
    survivor = pids[1 - victim]
    assert not Path(f"/proc/{survivor}").exists(), "the other child is still running"


def test_a_child_that_cannot_start_fails_the_launcher(tmp_path):
    done = run_once(LAUNCHER, "--port", "0", "--auth-db", tmp_path / "a.sqlite3",
                    "--user-db", tmp_path, "--service-token", "x" * 32)   # a folder: unusable
    assert done.returncode != 0
    assert "listening on" not in done.stdout
    assert "Traceback" not in done.stderr


def test_bad_flags_exit_2():
    done = run_once(LAUNCHER, "--port", "nope")
    assert done.returncode == 2 and "usage" in done.stderr.lower()
