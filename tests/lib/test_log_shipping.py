"""`--log-to URL` (lib/logs.py's LogShipper): any server ships its access log to a log
collector as NDJSON, in batches, and never waits for it or fails because of it."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

APP = "tests/lib/transport_app.py"


class Collector(ThreadingHTTPServer):
    """A stand-in collector: keeps every NDJSON line POSTed to /logs."""

    def __init__(self):
        self.lines, self.arrived = [], threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                with self.arrived:
                    self.lines += [json.loads(line) for line in body.splitlines()]
                    self.arrived.notify_all()
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, count, timeout=10):
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.lines) >= count, timeout), self.lines
            return list(self.lines)


@pytest.fixture
def collector():
    server = Collector()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_the_access_log_reaches_the_collector_as_records(start_server, collector, transport):
    server = start_server(APP, "--server", transport, "--log-to", collector.url)
    ids = [requests.get(f"{server.url}{path}", timeout=5).headers["X-Request-Id"]
           for path in ("/health", "/nothing-here")]
    lines = collector.wait_for(2)
    assert [(r["service"], r["fields"]["path"], r["fields"]["status"], r["level"], r["trace_id"])
            for r in lines] == [("transport_app", "/health", 200, "info", ids[0]),
                                ("transport_app", "/nothing-here", 404, "warning", ids[1])]
    assert all(r["message"].endswith(f"id={r['trace_id']}") for r in lines)


def test_lines_waiting_at_shutdown_are_sent(start_server, collector):
    server = start_server(APP, "--log-to", collector.url)
    requests.get(f"{server.url}/health", timeout=5)
    server.stop()  # before the shipper's next batch: the stop sends what waits
    assert collector.wait_for(1)[0]["fields"]["path"] == "/health"


def test_a_collector_that_is_down_costs_requests_nothing(start_server):
    with Collector() as gone:
        url = gone.url
        gone.shutdown()
    server = start_server(APP, "--log-to", url)
    assert all(requests.get(f"{server.url}/health", timeout=5).status_code == 200
               for _ in range(50))
    server.stop()  # exits 0, promptly, with its lines undeliverable
