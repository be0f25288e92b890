"""level04/file_upload.py, black-box: uploads streamed to disk (multipart and raw), limits as the
bytes arrive, types by content, storage by hash with reference counting, safe file names,
downloads (filename*, nosniff, ETag/304, ranges), owners only, and what a cut-off upload or a
kill -9 leaves behind (nothing, after a restart).

One server serves most of the module; tests that need flags or a restart start their own.
Files on disk are read from the server's storage folder, `uploads/` beside its database (in
its workdir).
"""
import hashlib
import json
import shutil
import struct
import subprocess
import threading
import time
import zlib
from urllib.parse import unquote

import pytest
import requests

from tests.harness import (RawConnection, expect, expect_json, expect_problem, request_bytes,
                           run_once)
from tests.level03.accounts import LOW_COST, AccountClient, fresh_email

SCRIPT = "level04/file_upload.py"
TIMEOUT = 15


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *LOW_COST)


class User(AccountClient):
    """A signed-up, logged-in user of one server, with its file requests."""

    def __init__(self, server):
        super().__init__(server)
        self.server = server
        email = fresh_email()
        self.signup(email)
        self.token = self.login(email)["access_token"]
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def upload(self, *files, data=None):
        """multipart/form-data: `files` are (filename, bytes[, claimed content type])."""
        parts = [("file", f) for f in files]
        return self.http.post(self.url + "/files", files=parts, data=data, headers=self.auth,
                              timeout=TIMEOUT)

    def upload_raw(self, content, filename="raw.bin", content_type="application/octet-stream"):
        params = {"filename": filename} if filename is not None else {}
        return self.http.post(self.url + "/files", params=params, data=content, timeout=TIMEOUT,
                              headers={**self.auth, "Content-Type": content_type})

    def stored(self, *files):
        return expect_json(self.upload(*files), 201)["items"]

    def get(self, path, **headers):
        return self.http.get(self.url + path, headers={**self.auth, **headers}, timeout=TIMEOUT)

    def delete(self, path):
        return self.http.delete(self.url + path, headers=self.auth, timeout=TIMEOUT)


@pytest.fixture
def user(server):
    return User(server)


def storage(server):
    return server.db_path.parent / "uploads"


def blobs(server):
    """The stored blobs' names (their SHA-256), and the temporary files left."""
    root = storage(server)
    return (sorted(p.name for p in root.glob("??/*")),
            sorted(p.name for p in (root / "tmp").iterdir()))


# --- contents of each type, made here ------------------------------------------------------

def png(width, height):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    raw = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def gif(width, height):
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


def jpeg(width, height, exif=60_000):
    """SOI, a JFIF APP0, a big APP1 (as cameras write EXIF), a DQT, then SOF0: the frame header
    is far from the start, so only a walk over the segments finds it."""
    def segment(code, data):
        return bytes([0xFF, code]) + struct.pack(">H", len(data) + 2) + data
    return (b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
            + segment(0xE1, b"Exif\x00\x00" + bytes(exif)) + segment(0xDB, bytes(65))
            + b"\xff\xff"  # a fill byte before the next marker
            + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
            + b"\xff\xda" + bytes(20) + b"\xff\xd9")


PDF = b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8 " + bytes(14)
TEXT = "héllo, wörld\n".encode()


def sha(data):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Uploading


def test_a_multipart_upload_answers_each_file_in_order(user):
    resp = user.upload(("cat.png", png(3, 2), "image/png"), ("notes.txt", TEXT, "text/plain"))
    items = expect_json(resp, 201)["items"]
    assert [(i["filename"], i["size"], i["sha256"], i["content_type"]) for i in items] == [
        ("cat.png", len(png(3, 2)), sha(png(3, 2)), "image/png"),
        ("notes.txt", len(TEXT), sha(TEXT), "text/plain; charset=utf-8")]
    assert resp.headers["Location"] == f"/files/{items[0]['id']}"
    assert all(set(i) == {"id", "filename", "size", "content_type", "sha256", "width", "height",
                          "created_at"} for i in items)
    assert items[0]["id"] < items[1]["id"]
    for item in items:
        assert expect_json(user.get(f"/files/{item['id']}"), 200) == item


def test_a_raw_body_is_one_file_named_by_the_query(user):
    items = expect_json(user.upload_raw(PDF, "report.pdf", "application/pdf"), 201)["items"]
    assert [(i["filename"], i["content_type"], i["sha256"]) for i in items] == [
        ("report.pdf", "application/pdf", sha(PDF))]
    expect_problem(user.upload_raw(PDF, filename=None), 400)


def test_other_form_fields_are_ignored_and_a_form_without_a_file_is_a_422(user):
    items = user.stored(("a.txt", b"a"))  # beside a "note" field below
    assert len(items) == 1
    resp = user.http.post(user.url + "/files", files=[("note", ("n.txt", b"x"))],
                          headers=user.auth, timeout=TIMEOUT)
    problem = expect_problem(resp, 422)
    assert problem["errors"][0]["field"] == "file"


def test_an_empty_file_is_a_422_and_nothing_is_stored(server, user):
    problem = expect_problem(user.upload(("ok.txt", b"fine"), ("empty.txt", b"")), 422)
    assert "empty.txt is empty" in problem["errors"][0]["message"]
    assert expect_json(user.get("/files"), 200)["items"] == []
    assert blobs(server)[1] == []


def test_a_post_without_a_body_is_a_411_and_an_empty_one_a_422(server, user):
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/files?filename=a.txt", user.auth))
        assert conn.read_response().status == 411
    expect_problem(user.upload_raw(b"", "a.txt"), 422)


@pytest.mark.parametrize("name, content, claimed, stored_as", [
    ("x.txt", png(1, 1), "text/plain", "image/png"),
    ("x.png", b"<html><script>alert(1)</script></html>", "image/png", "text/plain; charset=utf-8"),
    ("x.bin", jpeg(2, 2, exif=10), "application/octet-stream", "image/jpeg"),
    ("x", gif(1, 1), "image/png", "image/gif"),
    ("x", WEBP, "", "image/webp"),
    ("x", PDF, "text/plain", "application/pdf"),
    ("short", "é".encode(), "image/png", "text/plain; charset=utf-8"),
])
def test_the_type_is_read_from_the_content_never_from_the_claim(user, name, content, claimed,
                                                                stored_as):
    item = user.stored((name, content, claimed))[0]
    assert item["content_type"] == stored_as
    assert user.get(f"/files/{item['id']}/content").headers["Content-Type"] == stored_as


@pytest.mark.parametrize("content", [
    bytes(range(256)),                   # binary: none of the types
    b"text with a NUL \x00 inside",
    b"fine at first " * 5000 + b"\xff",  # invalid UTF-8 long after the first bytes
    "ends in half a character é".encode()[:-1],
])
def test_content_that_is_none_of_the_types_is_a_415(server, user, content):
    expect_problem(user.upload(("x.png", content, "image/png")), 415)
    assert blobs(server)[1] == []


def test_allowed_types_limit_what_is_accepted_by_content(start_server):
    server = start_server(SCRIPT, *LOW_COST, "--allowed-types", "png,gif")
    user = User(server)
    assert user.stored(("a.png", png(1, 1)))[0]["content_type"] == "image/png"
    for name, content, claimed in (("b.png", TEXT, "image/png"), ("c.gif", PDF, "image/gif"),
                                   ("d.png", jpeg(1, 1, exif=10), "image/png")):
        problem = expect_problem(user.upload((name, content, claimed)), 415)
        assert "png, gif" in problem["detail"]
    assert blobs(server) == ([sha(png(1, 1))], [])


@pytest.mark.parametrize("value", ["", "png,exe", "bmp"])
def test_an_unknown_allowed_type_is_a_usage_error(value, tmp_path):
    done = run_once(SCRIPT, "--port", "0", "--db", tmp_path / "db.sqlite3",
                    "--allowed-types", value, timeout=10)
    assert done.returncode == 2, done.stderr[-500:]
    assert "choose from png, jpeg, gif, webp, pdf, text" in done.stderr


def test_image_dimensions_are_read_from_the_headers(user):
    items = user.stored(("a.png", png(640, 3)), ("b.gif", gif(320, 200)),
                        ("c.jpg", jpeg(1024, 768)), ("d.pdf", PDF), ("e.webp", WEBP))
    assert [(i["content_type"], i["width"], i["height"]) for i in items] == [
        ("image/png", 640, 3), ("image/gif", 320, 200), ("image/jpeg", 1024, 768),
        ("application/pdf", None, None), ("image/webp", None, None)]


def test_more_than_20_files_in_one_request_is_a_413(user):
    expect_problem(user.upload(*[(f"{n}.txt", b"x") for n in range(21)]), 413)


@pytest.mark.parametrize("body, content_type", [
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nnever ends",
     "multipart/form-data; boundary=b"),
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--b--\r\n",
     "multipart/form-data"),  # no boundary parameter
    (b"--b\r\nX: y\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"),
])
def test_a_malformed_form_is_a_400_and_leaves_no_file(server, user, body, content_type):
    resp = user.http.post(user.url + "/files", data=body, timeout=TIMEOUT,
                          headers={**user.auth, "Content-Type": content_type})
    expect_problem(resp, 400)
    assert blobs(server)[1] == []


def test_anonymous_uploads_are_refused_from_the_head(server):
    """401 before the body: a client waiting for 100 Continue hears the refusal instead."""
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/files?filename=a.txt",
                                {"Content-Length": "5000", "Expect": "100-continue"}))
        resp = conn.read_response()
    assert resp.status == 401 and resp.header("WWW-Authenticate", "").startswith("Bearer")
    for path in ("/files", "/files/1", "/files/1/content"):
        expect_problem(requests.get(server.url + path, timeout=TIMEOUT), 401)


# --------------------------------------------------------------------------------------------
# Limits as the bytes arrive


def test_an_announced_length_over_the_limit_is_a_413_before_the_body(start_server):
    server = start_server(SCRIPT, *LOW_COST, "--max-bytes", "1000")
    user = User(server)
    with RawConnection(server.host, server.port) as conn:
        conn.send(request_bytes("POST", "/files?filename=big.txt", {
            "Content-Length": "1001", "Expect": "100-continue", **user.auth}))
        resp = conn.read_response()
    assert resp.status == 413, resp.raw[:300]
    assert expect_json(user.upload_raw(b"x" * 1000, "fits.txt"), 201)


@pytest.mark.parametrize("framing", ["multipart", "chunked"])
def test_a_file_over_the_limit_is_a_413_at_the_byte_that_passes_it(start_server, framing):
    """--max-bytes 100000; the client sends 150 KB of a file that would be 50 MB, and hears 413
    without sending more. The half-received file is removed."""
    server = start_server(SCRIPT, *LOW_COST, "--max-bytes", "100000")
    user = User(server)
    if framing == "multipart":
        head = request_bytes("POST", "/files", {
            "Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": "50000000",
            **user.auth})
        body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n'
    else:
        head = request_bytes("POST", "/files?filename=big", {"Transfer-Encoding": "chunked",
                                                             **user.auth})
        body = b""
    content = b"a" * 150_000
    body += b"%x\r\n%s\r\n" % (len(content), content) if framing == "chunked" else content
    with RawConnection(server.host, server.port, timeout=10) as conn:
        conn.send(head + body)
        resp = conn.read_response(timeout=10)
    assert resp.status == 413, resp.raw[:300]
    wait_until(lambda: blobs(server) == ([], []), "the half-received file is removed")


# --------------------------------------------------------------------------------------------
# Storage by content


def test_identical_content_is_stored_once_and_goes_with_the_last_file(server, user):
    content = b"the same bytes " * 1000
    first, second = user.stored(("one.txt", content), ("two.txt", content))
    third = user.stored(("three.txt", content))[0]
    assert first["sha256"] == second["sha256"] == third["sha256"] == sha(content)
    assert blobs(server)[0].count(sha(content)) == 1
    expect(user.delete(f"/files/{first['id']}"), 204)
    expect(user.delete(f"/files/{second['id']}"), 204)
    assert sha(content) in blobs(server)[0]
    assert user.get(f"/files/{third['id']}/content").content == content
    expect(user.delete(f"/files/{third['id']}"), 204)
    assert sha(content) not in blobs(server)[0]
    expect_problem(user.get(f"/files/{third['id']}"), 404)
    expect_problem(user.delete(f"/files/{third['id']}"), 404)


def test_parallel_uploads_of_the_same_content_make_one_blob_and_every_row(server, user):
    content = bytes(range(32, 128)) * 10923  # about 1 MiB of text
    results = []

    def upload(n):
        results.append(user.upload_raw(content, f"copy-{n}.bin"))

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [201] * 8
    listed = expect_json(user.get("/files?limit=100"), 200)["items"]
    assert sorted(i["filename"] for i in listed) == sorted(f"copy-{n}.bin" for n in range(8))
    names, temporary = blobs(server)
    assert names.count(sha(content)) == 1 and temporary == []
    # Deleting them all in parallel too: the blob goes with the last, not before.
    deletes = [threading.Thread(target=user.delete, args=(f"/files/{i['id']}",)) for i in listed]
    for thread in deletes:
        thread.start()
    for thread in deletes:
        thread.join()
    assert sha(content) not in blobs(server)[0]


@pytest.mark.parametrize("given, kept", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Windows\\system32\\evil.dll", "evil.dll"),
    ("con.txt", "_con.txt"),
    ("NUL", "_NUL"),
    ("invoice\u202egpj.exe", "invoicegpj.exe"),  # a right-to-left override hides ".exe"
    ("tab\there.txt", "tabhere.txt"),
    ("..", "upload"),
    ("  .hidden. ", "hidden"),
    ("cafe\u0301.txt", "café.txt"),   # NFC
    ("x" * 300 + ".txt", "x" * 255),
])
def test_file_names_are_metadata_and_never_reach_the_file_system(server, user, given, kept):
    item = expect_json(user.upload_raw(b"name test " + given.encode(), given), 201)["items"][0]
    assert item["filename"] == kept
    names, _ = blobs(server)
    assert all(len(name) == 64 for name in names)  # only hashes, whatever the names sent


# --------------------------------------------------------------------------------------------
# Downloading


def test_a_download_carries_its_type_name_and_hash(user):
    content = "Grüße aus Köln\n".encode()
    resp = user.upload_raw(content, "Grüße \"aus\" Köln.txt", "application/x-evil")
    item = expect_json(resp, 201)["items"][0]
    resp = expect(user.get(f"/files/{item['id']}/content"), 200)
    assert resp.content == content
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["ETag"] == f'"{sha(content)}"'
    assert resp.headers["Content-Length"] == str(len(content))
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Gru_e _aus_ Koln.txt"; ')
    encoded = disposition.split("filename*=", 1)[1]
    assert encoded.startswith("UTF-8''") and unquote(encoded[7:]) == item["filename"]
    assert all(c.isascii() and c not in ' "' for c in encoded)


def test_if_none_match_with_the_hash_is_a_304(user):
    item = user.stored(("a.txt", b"cache me"))[0]
    tag = f'"{item["sha256"]}"'
    resp = user.get(f"/files/{item['id']}/content", **{"If-None-Match": tag})
    assert resp.status_code == 304 and resp.content == b"" and resp.headers["ETag"] == tag
    assert user.get(f"/files/{item['id']}/content",
                    **{"If-None-Match": '"other"'}).status_code == 200


@pytest.mark.parametrize("header, status, span", [
    ("bytes=0-3", 206, (0, 3)),
    ("bytes=10-", 206, (10, 99)),
    ("bytes=-5", 206, (95, 99)),
    ("bytes=90-1000", 206, (90, 99)),
    ("BYTES=0-0", 206, (0, 0)),
    ("bytes=0-1,5-6", 200, None),      # several ranges: the whole file (a server may)
    ("bytes=5-2", 200, None),          # invalid: ignored
    ("items=0-1", 200, None),
    ("bytes=100-", 416, None),
    ("bytes=-0", 416, None),
])
def test_a_single_range_is_a_206_and_an_unsatisfiable_one_a_416(user, header, status, span):
    content = bytes(range(28, 128))  # 100 bytes of text
    item = user.stored(("r.bin", content, "application/octet-stream"))
    file_id = item[0]["id"]
    resp = user.get(f"/files/{file_id}/content", Range=header)
    assert resp.status_code == status, resp.text[:300]
    if status == 206:
        first, last = span
        assert resp.content == content[first:last + 1]
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/100"
        assert resp.headers["Content-Length"] == str(last - first + 1)
    elif status == 416:
        assert resp.headers["Content-Range"] == "bytes */100"
        expect_problem(resp, 416)
    else:
        assert resp.content == content


def test_if_range_with_another_tag_sends_the_whole_file(user):
    item = user.stored(("r.bin", b"0123456789"))[0]
    tag = f'"{item["sha256"]}"'
    path = f"/files/{item['id']}/content"
    assert user.get(path, Range="bytes=0-1", **{"If-Range": tag}).status_code == 206
    resp = user.get(path, Range="bytes=0-1", **{"If-Range": '"stale"'})
    assert resp.status_code == 200 and resp.content == b"0123456789"


def test_head_of_the_content_gives_its_length_and_no_body(user):
    item = user.stored(("h.txt", b"x" * 5000))[0]
    resp = user.http.head(f"{user.url}/files/{item['id']}/content", headers=user.auth,
                          timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.content == b""
    assert resp.headers["Content-Length"] == "5000"


# --------------------------------------------------------------------------------------------
# Owners


def test_files_are_their_owners_alone(server, user):
    other = User(server)
    item = user.stored(("mine.txt", b"private"))[0]
    for path in (f"/files/{item['id']}", f"/files/{item['id']}/content"):
        expect_problem(other.get(path), 404)
    expect_problem(other.delete(f"/files/{item['id']}"), 404)
    assert expect_json(other.get("/files"), 200)["items"] == []
    assert expect_json(user.get(f"/files/{item['id']}"), 200)["filename"] == "mine.txt"


def test_the_list_is_newest_first_in_pages(server):
    user = User(server)
    ids = [user.stored((f"{n}.txt", f"page {n}".encode()))[0]["id"] for n in range(5)]
    first = expect_json(user.get("/files?limit=2"), 200)
    assert [i["id"] for i in first["items"]] == ids[:-3:-1]
    rest = expect_json(user.get(f"/files?limit=10&cursor={first['next_cursor']}"), 200)
    assert [i["id"] for i in rest["items"]] == ids[2::-1] and rest["next_cursor"] is None
    expect_problem(user.get("/files?cursor=nonsense"), 400)


# --------------------------------------------------------------------------------------------
# Cut off, killed, restarted


def wait_until(done, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def half_an_upload(server, user, size=1_000_000):
    """A connection that has sent half of a raw upload, and waits (returned open)."""
    conn = RawConnection(server.host, server.port)
    conn.send(request_bytes("POST", "/files?filename=half.bin",
                            {"Content-Length": str(size), **user.auth}) + b"h" * (size // 2))
    wait_until(lambda: blobs(server)[1] != [], "the upload reached a temporary file")
    return conn


def test_a_dropped_connection_leaves_no_file(server, user):
    conn = half_an_upload(server, user)
    conn.sock.close()
    wait_until(lambda: blobs(server)[1] == [], "the temporary file is removed")
    assert expect_json(user.get("/files"), 200)["items"] == []


def test_a_kill_9_mid_upload_leaves_nothing_after_a_restart(start_server):
    server = start_server(SCRIPT, *LOW_COST)
    user = User(server)
    kept = user.stored(("kept.txt", b"stored before the crash"))[0]
    conn = half_an_upload(server, user)
    # A blob no row names, as a crash between placing a blob and committing its row leaves.
    orphan = storage(server) / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    server.kill9()
    conn.sock.close()
    assert blobs(server)[1] != [], "the kill left the temporary file (the test needs one)"
    again = start_server(SCRIPT, *LOW_COST, db=server.db_path, workdir=server.workdir)
    assert blobs(again) == ([kept["sha256"]], [])
    user.url = again.url
    assert [i["filename"] for i in expect_json(user.get("/files"), 200)["items"]] == ["kept.txt"]
    assert user.get(f"/files/{kept['id']}/content").content == b"stored before the crash"


def test_the_storage_of_another_database_is_refused_not_emptied(start_server, tmp_path):
    """Recovery removes the blobs no row names: pointed at another database's folder, it would
    delete that database's files. The folder knows its database, and the server refuses it."""
    server = start_server(SCRIPT, *LOW_COST)
    item = User(server).stored(("keep.txt", b"belongs to the first database"))[0]
    server.stop()
    done = run_once(SCRIPT, "--port", "0", "--db", tmp_path / "other.sqlite3",
                    "--storage", storage(server), timeout=10)
    assert done.returncode == 2 and "another database" in done.stderr, done.stderr[-500:]
    assert blobs(server)[0] == [item["sha256"]]


def test_stored_files_survive_a_restart(start_server):
    server = start_server(SCRIPT, *LOW_COST)
    user = User(server)
    item = user.stored(("a.png", png(4, 4)))[0]
    server.stop()
    again = start_server(SCRIPT, *LOW_COST, db=server.db_path, workdir=server.workdir)
    user.url = again.url
    assert expect_json(user.get(f"/files/{item['id']}"), 200) == item
    assert user.get(f"/files/{item['id']}/content").content == png(4, 4)


# --------------------------------------------------------------------------------------------
# Real clients


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_dash_f_uploads_and_downloads(user, tmp_path):
    source = tmp_path / "résumé.pdf"
    source.write_bytes(PDF)
    done = subprocess.run(["curl", "-sS", "--fail-with-body", "-H",
                           f"Authorization: Bearer {user.token}", "-F", f"file=@{source}",
                           "-F", "file=@-;filename=pic.gif", f"{user.url}/files"],
                          input=gif(7, 9), capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)["items"]
    assert [(i["filename"], i["content_type"], i["width"]) for i in items] == [
        ("résumé.pdf", "application/pdf", None), ("pic.gif", "image/gif", 7)]
    target = tmp_path / "download"
    done = subprocess.run(["curl", "-sS", "--fail", "-OJ", "--output-dir", str(target),
                           "--create-dirs", "-H", f"Authorization: Bearer {user.token}",
                           f"{user.url}/files/{items[0]['id']}/content"],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    # curl -J reads only the ASCII stand-in (`filename`), not `filename*`
    assert [p.name for p in target.iterdir()] == ["resume.pdf"]
    assert (target / "resume.pdf").read_bytes() == PDF
