"""The logs scenario's measurements on central_logging.py: NDJSON ingestion over HTTP (lines
acknowledged durably per second), and syslog over UDP at rising rates until a datagram is lost.

Lines are counted in the server's database (read-only), so "acknowledged" and "lost" are exact.
"""
import http.client
import json
import socket
import sqlite3
import threading
import time
from urllib.parse import urlsplit

CLIENTS = 4
BATCH = 10_000            # lines per POST (about 1.2 MB, under the 5 MiB limit)


def ndjson_batch(service, number):
    return "".join(json.dumps({"ts": "2026-12-06T10:00:00.000Z", "service": service,
                               "level": "info", "message": f"request {number}-{n} served in 12 ms",
                               "fields": {"status": 200}}) + "\n"
                   for n in range(BATCH)).encode()


def ingest(url, service, batches):
    """POST `batches` NDJSON batches of BATCH lines from CLIENTS connections: (seconds, lines
    acknowledged)."""
    parts = urlsplit(url)
    bodies = [ndjson_batch(service, n) for n in range(batches)]
    accepted, errors = [], []

    def post(mine):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            for body in mine:
                connection.request("POST", "/logs", body, {"Content-Type": "application/x-ndjson"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    errors.append(f"POST /logs answered {response.status}: {answer[:200]!r}")
                    return
                accepted.append(json.loads(answer)["accepted"])
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(bodies[n::CLIENTS],)) for n in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(errors[0])
    return elapsed, sum(accepted)


def stored(db_path, service):
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT count(*) FROM logs WHERE service = ?", (service,)).fetchone()[0]


def udp_burst(host, port, service, rate, seconds):
    """Send rate × seconds syslog datagrams at `rate` a second (paced in 1 ms steps): how many
    were sent."""
    total = int(rate * seconds)
    datagrams = [f"<14>{service}: datagram {n}".encode() for n in range(total)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        started = time.perf_counter()
        for n, datagram in enumerate(datagrams):
            due = started + n / rate
            if (delay := due - time.perf_counter()) > 0.001:
                time.sleep(delay)
            sock.sendto(datagram, (host, port))
    return total


def settled_count(db_path, service, timeout=10.0):
    """The stored count once it stops growing (the writer has caught up)."""
    deadline = time.monotonic() + timeout
    last = -1
    while (count := stored(db_path, service)) != last and time.monotonic() < deadline:
        last = count
        time.sleep(0.3)
    return count
