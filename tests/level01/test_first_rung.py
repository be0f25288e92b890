"""level01/README.md's first rung runs as printed: the health check on bare `http.server`.

The README's one `python` code block is written to a file and run the way a learner would run
it (`python first_rung.py PORT`, here 0 for a free one); it must print where it listens, answer
GET /health 200 {"status": "ok"} with Content-Length, keep the connection open for the next
request, and answer 404 to any other path without closing it.
"""
import re
import select
import subprocess
import sys

import pytest

from tests.harness import ROOT, RawConnection, request_bytes

README = ROOT / "level01" / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
START_TIMEOUT = 10  # s


@pytest.fixture
def first_rung(tmp_path):
    """(host, port) of the README's snippet, running in a process of its own."""
    blocks = PYTHON_BLOCK.findall(README.read_text())
    assert len(blocks) == 1, f"level01/README.md should hold one python block, found {len(blocks)}"
    script = tmp_path / "first_rung.py"
    script.write_text(blocks[0])
    process = subprocess.Popen([sys.executable, str(script), "0"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline().decode() if ready else ""
        listening = LISTENING.search(line)
        assert listening, f"no 'listening on' line: {line!r}"
        yield listening.group(1), int(listening.group(2))
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_the_first_rung_answers_health_with_keep_alive_and_404_otherwise(first_rung):
    host, port = first_rung
    with RawConnection(host, port) as connection:
        for _ in range(2):  # the same connection twice: keep-alive
            connection.send(request_bytes("GET", "/health"))
            response = connection.read_response()
            assert response.status == 200, response.raw
            assert response.header("Content-Type") == "application/json"
            assert response.header("Content-Length") == str(len(response.body))
            assert response.json() == {"status": "ok"}
        connection.send(request_bytes("GET", "/nope"))
        missing = connection.read_response()
        assert missing.status == 404, missing.raw
        assert missing.header("Content-Length") == str(len(missing.body))
        connection.send(request_bytes("GET", "/health"))  # still open after the 404
        assert connection.read_response().status == 200
