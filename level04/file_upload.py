"""File upload — files streamed to disk as they arrive, stored once by content, served back with
HTTP's download machinery.

What it teaches
  - Streaming a request body: `POST /files` declares a `body_sink` (lib/routing.py), so the
    body is handed over piece by piece as it arrives, never held in memory: each file goes to a
    temporary file while its SHA-256 is computed, and is renamed into place only when it is
    complete (after an fsync, so a crash never leaves half a file under a real name).
  - multipart/form-data (RFC 7578), parsed by hand as it streams (lib/multipart.py); or a raw
    body with `?filename=`. Limits apply as the bytes arrive: the byte that passes
    `--max-bytes` is answered 413 at once, not after reading gigabytes; an announced
    Content-Length over it is refused before the first byte.
  - Never trust the client's Content-Type: the type is read from the content's magic bytes
    (PNG, JPEG, GIF, WebP, PDF; else UTF-8 text without NUL bytes), checked against
    `--allowed-types` → 415. The stored type is the one found, not the one claimed.
  - Content-addressed storage: a file is stored under its SHA-256, so identical content is kept
    once however often it is uploaded; the rows that name a blob are its reference count, and
    the last DELETE removes it. One lock orders placing and removing blobs, so a delete cannot
    remove a blob an upload is about to name.
  - The client's file name is metadata, nothing more: it never becomes a path (blobs are named
    by their hash), and is cleaned for the people who download it (no path, no control or
    bidi-override characters, no Windows device names).
  - Downloads: `Content-Disposition: attachment` with an RFC 6266/8187 `filename*` for any
    name, `X-Content-Type-Options: nosniff` (the browser must not guess HTML into an "image"),
    the hash as a strong `ETag` (304 for `If-None-Match`), and single byte ranges (206, 416;
    RFC 9110 §14) streamed from the file with their length known.
  - Image dimensions read by hand from the bytes: PNG's IHDR, GIF's screen descriptor, JPEG's
    start-of-frame marker (found by walking its segments).
  - Crash safety: an upload cut off (a dropped connection, a kill -9) leaves nothing listed;
    temporary files and blobs no row names are removed when the server starts.

Users and tokens come from level03/jwt_auth.py; every file route is the signed-in owner's
(anyone else gets 404, as if it did not exist). The upload checks the token from the request's
head, before a byte of the body is accepted.

Standards: RFC 7578 (multipart/form-data), RFC 2046 (boundaries), RFC 9110 (Range, 206, 416,
ETag, 304), RFC 6266 and RFC 8187 (Content-Disposition, filename*), PNG (ISO/IEC 15948), GIF89a,
JPEG (ITU T.81).

Left out: resumable uploads (tus, S3 multipart), presigned URLs, virus scanning, thumbnails,
per-user quotas, a CDN in front. file_upload.md's "In production" says who does those.

    python level04/file_upload.py [--storage DIR] [--max-bytes N] [--allowed-types png,pdf,…]
"""
import argparse
import codecs
import contextlib
import hashlib
import os
import re
import secrets
import struct
import sys
import threading
import unicodedata
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, ContentTooLarge, NotFound, Response, UnsupportedMediaType, created,
                 no_content, trace_event)
from lib.app import bounded, exit_usage_error
from lib.listing import list_params, page
from lib.multipart import PART_END, MultipartParser, Part, boundary
from lib.problems import HTTPError, LengthRequired, ValidationFailed
from lib.storage import StorageFull
from lib.request import Query, bad_query, utc_timestamp
from lib.response import StreamingResponse
from lib.routing import PAGE
from level03.jwt_auth import (SCHEMA as IDENTITY_SCHEMA, Auth, add_auth_arguments,
                              add_token_routes, authenticate_bearer, current_user,
                              load_or_create_secret, require_user)

app = App("file_upload", "Uploads streamed to disk, stored by content hash, downloaded with "
          "ranges.", port=8012)

SCHEMA = IDENTITY_SCHEMA + """
CREATE TABLE IF NOT EXISTS files (
    id           INTEGER PRIMARY KEY,
    owner_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    filename     TEXT NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    width        INTEGER,
    height       INTEGER,
    created_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner_id, id);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
"""

MAX_FILES = 20                 # file parts in one request
FORM_OVERHEAD = 1024 * 1024    # a form's bytes beyond its files: heads, boundaries, other fields
FILENAME = Query("filename", "the file's name, with a raw (not multipart) body")
PIECE = 64 * 1024              # bytes read from a blob at a time when sending it


# =============================================================================================
# What a file is: its type from its first bytes, its dimensions from its headers
# =============================================================================================

TYPES = {  # --allowed-types name → (the Content-Type stored, the magic bytes test)
    "png": ("image/png", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
    "jpeg": ("image/jpeg", lambda head: head.startswith(b"\xff\xd8\xff")),
    "gif": ("image/gif", lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
    "webp": ("image/webp", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
    "pdf": ("application/pdf", lambda head: head.startswith(b"%PDF-")),
    "text": ("text/plain; charset=utf-8", None),  # no magic: valid UTF-8 without NUL bytes
}
SNIFF_BYTES = 12               # enough for every magic above (WebP's is at bytes 8–11)


def sniff(head, could_be_text):
    """The type name of a file from its first bytes; "text" when none matches and every byte so
    far was UTF-8 without NUL; None when it is none of the types."""
    for name, (_, matches) in TYPES.items():
        if matches and matches(head):
            return name
    return "text" if could_be_text else None


def image_size(path, kind):
    """(width, height) read from an image's own headers, or None."""
    with open(path, "rb") as file:
        if kind == "png":  # signature, then the IHDR chunk: length, "IHDR", width, height
            head = file.read(24)
            return struct.unpack(">II", head[16:24]) if head[12:16] == b"IHDR" else None
        if kind == "gif":  # "GIF89a", then the logical screen's width and height
            return struct.unpack("<HH", file.read(10)[6:10])
        if kind == "jpeg":
            return jpeg_size(file)
    return None


def jpeg_size(file):
    """Walk a JPEG's marker segments (ITU T.81 §B.1) to its start-of-frame, which holds the
    height and width: SOI, then `FF xx` markers, each but a few followed by a 2-byte length."""
    file.read(2)  # SOI
    while True:
        marker = file.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        code = marker[1]
        while code == 0xFF:  # fill bytes before a marker
            code = (file.read(1) or b"\xd9")[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers that stand alone
            continue
        if code in (0xD9, 0xDA):  # end of image, or the scan began with no frame header
            return None
        length = file.read(2)
        if len(length) < 2:
            return None
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # SOF0…SOF15
            frame = file.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        file.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)


# =============================================================================================
# File names: metadata for people, never a path
# =============================================================================================

WINDOWS_DEVICES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", re.IGNORECASE)


def clean_filename(name):
    """The client's name for a file, safe to show and to offer as a download name: its last
    path segment, NFC, without control, format (bidi overrides) or unassigned characters, no
    leading or trailing dots and spaces, at most 255 characters, never a Windows device name."""
    name = unicodedata.normalize("NFC", name or "")
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip(" .")[:255]
    if WINDOWS_DEVICES.fullmatch(name):
        name = "_" + name
    return name.strip(" .") or "upload"


def content_disposition(filename):
    """`attachment` with the name twice (RFC 6266 §4.3): an ASCII stand-in for clients that
    read only `filename` (curl -J among them), and the exact name as RFC 8187's
    `filename*=UTF-8''…`, which browsers prefer."""
    ascii_name = "".join(map(ascii_stand_in, filename))
    exact = quote(filename, safe="!#$&+^`|")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{exact}"


def ascii_stand_in(char):
    """A character as plain ASCII in a quoted string: é → e (its accent dropped), and "_" for
    what has no such form or would need escaping (quote, backslash, %)."""
    folded = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
    return folded if folded and all(" " <= c <= "~" and c not in '"\\%' for c in folded) else "_"


# =============================================================================================
# The blob store: content by hash, temporary files, and what a crash leaves behind
# =============================================================================================

BLOB_NAME = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """`root/ab/abcdef…` (the SHA-256) for stored content, `root/tmp/` for uploads under way.
    `lock` orders placing and removing blobs within this server (one server owns the folder)."""

    def __init__(self, root):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def path(self, sha256):
        return self.root / sha256[:2] / sha256

    def new_temp(self):
        """A new temporary file, opened for writing, that nobody else can have made."""
        path = self.tmp / f"{secrets.token_hex(16)}.part"
        return path, open(path, "xb")

    def place(self, temp_path, sha256):
        """Move a complete upload to its blob (call with `lock` held). Content already stored
        is not stored again: the upload is dropped and the blob gains one more row."""
        target = self.path(sha256)
        if target.exists():
            temp_path.unlink()
            return False
        target.parent.mkdir(exist_ok=True)
        os.replace(temp_path, target)
        fsync_directory(target.parent)  # the rename itself survives a crash
        return True

    def remove_unreferenced(self, db, sha256):
        """Remove a blob once no row names it (call with `lock` held, after the rows' commit)."""
        if db.query_one("SELECT 1 FROM files WHERE sha256 = ?", (sha256,)) is None:
            with contextlib.suppress(FileNotFoundError):
                self.path(sha256).unlink()
                trace_event(f"blob {sha256[:12]}… removed: no file names it any more")

    def claim(self, db):
        """Tie the folder to its database, by an identity kept in both: recover() removes the
        blobs that no row names, so the folder of another database must be refused, never
        "recovered" (ValueError)."""
        identity = load_or_create_secret(db, "storage").decode()
        marker = self.root / "database-id"
        if not marker.exists():
            marker.write_text(identity)
        elif marker.read_text() != identity:
            raise ValueError("it holds the files of another database (see its database-id)")

    def recover(self, db):
        """At start: what a crash or a kill -9 left — temporary files of cut-off uploads, and
        blobs placed or unreferenced without the row's commit — is removed. Only names this
        store makes are touched."""
        for path in self.tmp.glob("*.part"):
            path.unlink()
        named = {row[0] for row in db.query("SELECT DISTINCT sha256 FROM files")}
        for path in self.root.glob("[0-9a-f][0-9a-f]/*"):
            if BLOB_NAME.fullmatch(path.name) and path.name not in named:
                path.unlink()


@contextlib.contextmanager
def disk_errors():
    """A failing disk (full, read-only, broken) is the machine's trouble: 507 with one log line,
    never a dropped connection or a traceback (the temporary files are discarded)."""
    try:
        yield
    except OSError as error:
        sys.stderr.write(f"error: an upload could not be stored: {error}\n")
        raise StorageFull("the upload could not be stored (the server's disk is full or "
                          "failing); nothing of it was kept, retry later") from None


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# =============================================================================================
# Receiving: one file as it arrives, and the sink that a request body streams into
# =============================================================================================

class IncomingFile:
    """One file being received: written to a temporary file, hashed, its type decided from its
    first bytes (and, for text, checked as UTF-8 all the way), its size held to the limit."""

    def __init__(self, blobs, filename, settings):
        self.filename = clean_filename(filename)
        self.settings = settings
        self.temp_path, self.file = blobs.new_temp()
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.kind = None
        self.utf8 = codecs.getincrementaldecoder("utf-8")()  # None once it cannot be text
        self.dimensions = None

    def write(self, piece):
        self.size += len(piece)
        if self.size > self.settings.max_bytes:
            raise ContentTooLarge(f"{self.filename} is over the limit of "
                                  f"{self.settings.max_bytes} bytes")
        if len(self.head) < SNIFF_BYTES:
            self.head += piece[:SNIFF_BYTES - len(self.head)]
        if self.utf8 is not None:
            self._check_text(piece)
        if self.kind is None and len(self.head) == SNIFF_BYTES:
            self._decide_type()
        if self.kind == "text" and self.utf8 is None:
            raise self._refusal("text that is not UTF-8 (or holds NUL bytes)")
        self.digest.update(piece)
        self.file.write(piece)

    def _check_text(self, piece, final=False):
        try:
            self.utf8.decode(piece, final)
            if b"\0" in piece:
                raise ValueError("NUL")
        except ValueError:  # UnicodeDecodeError is one
            self.utf8 = None

    def _decide_type(self):
        self.kind = sniff(self.head, self.utf8 is not None)
        if self.kind != "text":
            self.utf8 = None  # a binary type: no need to read it as text
        if self.kind not in self.settings.allowed_types:
            raise self._refusal(f"a {self.kind} file" if self.kind else "none of the known types")

    def _refusal(self, what):
        allowed = ", ".join(self.settings.allowed_types)
        return UnsupportedMediaType(f"{self.filename} is {what}, judged by its content (the "
                                    f"Content-Type sent is not trusted); allowed: {allowed}")

    def end(self):
        """The whole file has arrived (its part ended, or the raw body)."""
        if self.size == 0:
            raise ValidationFailed({"file": f"{self.filename} is empty"})
        if self.utf8 is not None:
            self._check_text(b"", final=True)  # a multi-byte character cut off at the end
        if self.kind is None:  # shorter than SNIFF_BYTES
            self._decide_type()
        if self.kind == "text" and self.utf8 is None:
            raise self._refusal("text that is not UTF-8 (or holds NUL bytes)")
        self.file.close()

    def make_durable(self):
        """fsync the content and read what the server reports about it (blocking: in the
        handler, off the event loop)."""
        with open(self.temp_path, "rb") as file:
            os.fsync(file.fileno())
        self.dimensions = image_size(self.temp_path, self.kind)

    def discard(self):
        self.file.close()
        with contextlib.suppress(FileNotFoundError):  # gone already: placed as a blob
            self.temp_path.unlink()


class UploadSink:
    """Where `POST /files`'s body goes as it arrives (the route's `body_sink`). Made from the
    request's head: the token is checked and the body's framing decided before any of it is
    read, so an anonymous or oversized upload costs the server nothing."""

    def __init__(self, request):
        request.context["user"] = authenticate_bearer(request, request.app.state.auth)
        self.state = state = request.app.state
        self.files = []
        self.current = None       # the file whose part is arriving, if it is a file part
        self.received = 0
        if request.content_type == "multipart/form-data":
            self.parser = MultipartParser(boundary(request.header("content-type")))
            self.limit = MAX_FILES * state.settings.max_bytes + FORM_OVERHEAD
        else:
            self.parser = None
            self.limit = state.settings.max_bytes
            filename = FILENAME.read(request)
            if not filename:
                raise bad_query("filename", "is required with a raw body (or send "
                                            "multipart/form-data)")
        declared = request.header("content-length")
        if declared is not None and int(declared) > self.limit:
            raise ContentTooLarge(f"the body announces {declared} bytes, over the limit of "
                                  f"{self.limit}")
        if self.parser is None:
            self._start(filename)

    def _start(self, filename):
        if len(self.files) == MAX_FILES:
            raise ContentTooLarge(f"at most {MAX_FILES} files in one request")
        with disk_errors():
            self.current = IncomingFile(self.state.blobs, filename, self.state.settings)
        self.files.append(self.current)

    def write(self, piece):
        self.received += len(piece)
        if self.received > self.limit:
            raise ContentTooLarge(f"the body is over the limit of {self.limit} bytes")
        with disk_errors():
            if self.parser is None:
                self.current.write(piece)
            else:
                self._feed_form(piece)

    def _feed_form(self, piece):
        for event in self.parser.feed(piece):
            if isinstance(event, Part):
                if event.name == "file":
                    self._start(event.filename)  # other fields are not files: ignored
            elif event is PART_END:
                if self.current is not None:
                    self.current.end()
                self.current = None
            elif self.current is not None:
                self.current.write(event)

    def complete(self):
        """The files, once the body has ended: each checked, none empty."""
        if self.parser is None:
            self.current.end()
        else:
            self.parser.close()
        if not self.files:
            raise ValidationFailed({"file": 'send one or more parts named "file"'})
        return self.files

    def discard(self):
        for file in self.files:
            file.discard()


# =============================================================================================
# Routes
# =============================================================================================

add_token_routes(app)

FILE = {"type": "object", "required": ["id", "filename", "size", "content_type", "sha256",
                                       "width", "height", "created_at"]}
OWNER_ONLY = {401: "No valid bearer token", 404: "No such file of yours"}


def file_json(row):
    return {"id": row["id"], "filename": row["filename"], "size": row["size"],
            "content_type": row["content_type"], "sha256": row["sha256"],
            "width": row["width"], "height": row["height"], "created_at": row["created_at"]}


def owned_file(request, file_id):
    row = request.app.state.auth.db.query_one("SELECT * FROM files WHERE id = ? AND owner_id = ?",
                                              (file_id, current_user(request)["id"]))
    if row is None:
        raise NotFound(f"no file {file_id}")
    return row


@app.post("/files", body_sink=UploadSink, body_limit=2**62, blocking=True,
          request_media_type="multipart/form-data", query=(FILENAME,),
          request_schema={"type": "object", "required": ["file"], "properties": {
              "file": {"type": "string", "minLength": 1,
                       "contentMediaType": "application/octet-stream"}}},
          responses={201: "The stored files, in upload order", 400: "A malformed form",
                     401: "No valid bearer token", 411: "No body",
                     413: "A file over --max-bytes", 415: "A type not allowed, by content",
                     422: "No file, or an empty one", 507: "The disk is full or failing"},
          response_schema={"type": "object", "required": ["items"],
                           "properties": {"items": {"type": "array", "items": FILE}}})
def upload(request):
    """Upload files: multipart/form-data parts named "file", or a raw body with ?filename="""
    if not isinstance(request.body, UploadSink):
        raise LengthRequired("send the file as the body, with Content-Length or chunked")
    files = request.body.complete()
    state, user = request.app.state, current_user(request)
    db, placed = state.auth.db, []
    now = utc_timestamp()
    with disk_errors(), state.blobs.lock:
        for file in files:
            file.make_durable()
        try:
            with db.transaction() as conn:
                ids = []
                for file in files:
                    sha256 = file.digest.hexdigest()
                    if state.blobs.place(file.temp_path, sha256):
                        placed.append(sha256)
                        trace_event(f"blob {sha256[:12]}… stored")
                    else:
                        trace_event(f"blob {sha256[:12]}… stored already: not written again")
                    width, height = file.dimensions or (None, None)
                    ids.append(conn.execute(
                        "INSERT INTO files (owner_id, filename, size, content_type, sha256, "
                        "width, height, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (user["id"], file.filename, file.size, TYPES[file.kind][0], sha256,
                         width, height, now)).lastrowid)
        except BaseException:
            for sha256 in placed:  # the rows were not written: their new blobs go too
                state.blobs.remove_unreferenced(db, sha256)
            raise
    items = [file_json(row) for row in db.query(
        f"SELECT * FROM files WHERE id IN ({', '.join('?' * len(ids))}) ORDER BY id", ids)]
    return created({"items": items}, f"/files/{ids[0]}")


@app.get("/files", query=PAGE, responses={200: "Your files, newest first", 401: OWNER_ONLY[401]},
         response_schema={"type": "object", "required": ["items", "next_cursor"],
                          "properties": {"items": {"type": "array", "items": FILE},
                                         "next_cursor": {"type": ["string", "null"]}}})
def list_files(request):
    """Your files, newest first"""
    limit, cursor = list_params(request, (int,))
    rows = request.app.state.auth.db.query(
        "SELECT * FROM files WHERE owner_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
        (current_user(request)["id"], cursor[0] if cursor else 2**63 - 1, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], file_json)


@app.get("/files/{file_id:int}", responses={200: "The file's metadata", **OWNER_ONLY},
         response_schema=FILE)
def read_file(request, file_id):
    """One file's metadata (with width and height for PNG, GIF and JPEG images)"""
    return file_json(owned_file(request, file_id))


STORED_TYPES = {media: {} for media, _ in TYPES.values()}
CONTENT = {200: {"description": "The content, with its stored type", "content": STORED_TYPES},
           206: {"description": "The one byte range asked for (Range)", "content": STORED_TYPES},
           304: {"description": "If-None-Match names the content (its ETag is its SHA-256)"},
           416: "The range is outside the file", **OWNER_ONLY}


@app.get("/files/{file_id:int}/content", responses=CONTENT)
def download(request, file_id):
    """The content, as a download: ETag, If-None-Match → 304, a single Range → 206"""
    row = owned_file(request, file_id)
    tag = f'"{row["sha256"]}"'
    headers = {"ETag": tag, "Content-Disposition": content_disposition(row["filename"]),
               "X-Content-Type-Options": "nosniff", "Accept-Ranges": "bytes",
               "Cache-Control": "private, no-cache"}
    if request.if_none_match(tag):
        return Response(b"", 304, headers)
    size = row["size"]
    span = byte_range(request, size, tag)
    status, start, length = 200, 0, size
    if span is not None:
        status, start, length = 206, span[0], span[1] - span[0] + 1
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    chunks = () if request.method == "HEAD" else read_blob(
        open(request.app.state.blobs.path(row["sha256"]), "rb"), start, length)  # open now:
    # a blob deleted while it is sent stays readable through this descriptor
    return StreamingResponse(chunks, status, headers, row["content_type"], length=length)


def read_blob(file, start, length):
    with file:
        file.seek(start)
        while length > 0:
            piece = file.read(min(PIECE, length))
            if not piece:
                raise OSError("the blob is shorter than its row says")
            length -= len(piece)
            yield piece


RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})", re.IGNORECASE)


def byte_range(request, size, tag):
    """The (first, last) byte of a single `Range: bytes=…` (RFC 9110 §14.1.2), or None to send
    the whole file: no Range, several ranges or a malformed one (which a server may ignore,
    §14.2), or an `If-Range` that is not the current ETag. Unsatisfiable → 416."""
    header = request.header("range")
    if header is None or request.header("if-range", tag) != tag:
        return None
    match = RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        first, last = max(0, size - int(last)), size - 1
        if size == 0 or first > last:
            raise unsatisfiable(size)
        return first, last
    first, last = int(first), (int(last) if last else size - 1)
    if first >= size:
        raise unsatisfiable(size)
    if first > last:
        return None  # invalid: ignored
    return first, min(last, size - 1)


def unsatisfiable(size):
    return HTTPError(f"the file has {size} bytes", status=416,
                     headers={"Content-Range": f"bytes */{size}"})


@app.delete("/files/{file_id:int}", responses={204: "Deleted", **OWNER_ONLY})
def delete_file(request, file_id):
    """Delete a file (its content goes with the last file that names it)"""
    state = request.app.state
    db = state.auth.db
    with state.blobs.lock:
        with db.transaction():
            row = owned_file(request, file_id)
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        state.blobs.remove_unreferenced(db, row["sha256"])
    return no_content()


app.use(require_user)  # deny by default (jwt_auth): every route above that is not public


# =============================================================================================
# Running
# =============================================================================================

class Settings:
    def __init__(self, max_bytes, allowed_types):
        self.max_bytes = max_bytes
        self.allowed_types = allowed_types


def type_list(text):
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TYPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'}: choose from "
                                         f"{', '.join(TYPES)}")
    return tuple(dict.fromkeys(names))


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    parser.add_argument("--storage", help="folder of the stored files (default: uploads/ beside "
                                          "the database, so data/uploads)")
    parser.add_argument("--max-bytes", type=bounded(int, "bytes", at_least=1),
                        default=10 * 1024 * 1024, help="largest file accepted (default 10 MiB)")
    parser.add_argument("--allowed-types", type=type_list, default=tuple(TYPES),
                        help=f"comma list of {', '.join(TYPES)} (default all)")
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    app.state.auth = Auth.from_args(db, args)
    app.state.settings = Settings(args.max_bytes, args.allowed_types)
    storage = args.storage or Path(args.db).parent / "uploads"
    try:
        app.state.blobs = BlobStore(storage)
        app.state.blobs.claim(db)
        app.state.blobs.recover(db)
    except (OSError, ValueError) as error:
        exit_usage_error(f"--storage {storage}: {error}")
    app.run(args)


if __name__ == "__main__":
    main()
