"""The upload scenario's measurements: a large raw upload streamed to file_upload.py, and the
reference it is judged against, writing the same bytes to a file (then fsync, as the server
does) in the same run.

The content is ASCII text (file_upload accepts it as `text`, checked as UTF-8 all the way), one
1 MiB block repeated, so the client spends nothing making it and its SHA-256 is known before the
clock starts.
"""
import hashlib
import http.client
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

PIECE = 1024 * 1024
_LINE = b"".join(b"%07d the quick brown fox jumps over the lazy dog\n" % n for n in range(21_000))
BLOCK = _LINE[:PIECE]


def content_sha256(size):
    """The SHA-256 of `size` bytes of the repeated block."""
    digest = hashlib.sha256()
    for _ in range(size // PIECE):
        digest.update(BLOCK)
    digest.update(BLOCK[:size % PIECE])
    return digest.hexdigest()


def pieces(size):
    for _ in range(size // PIECE):
        yield BLOCK
    if size % PIECE:
        yield BLOCK[:size % PIECE]


def write_file_seconds(path: Path, size: int) -> float:
    """Write `size` bytes to a new file in pieces and fsync it: the seconds it took."""
    started = time.perf_counter()
    with open(path, "wb") as file:
        for piece in pieces(size):
            file.write(piece)
        file.flush()
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def upload_seconds(url: str, token: str, size: int) -> tuple[float, int, dict]:
    """POST `size` bytes as one raw body with its Content-Length: the seconds until the answer,
    its status and its JSON."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120,
                                            blocksize=PIECE)
    try:
        started = time.perf_counter()
        connection.request("POST", "/files?filename=big.txt", body=pieces(size),
                           headers={"Authorization": f"Bearer {token}",
                                    "Content-Type": "text/plain", "Content-Length": str(size)})
        response = connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return elapsed, response.status, json.loads(body)


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM, Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
