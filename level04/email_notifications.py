"""Email notifications — templates rendered into real MIME mail, sent over SMTP to a catcher
written by hand.

What it teaches
  - Templates with `{{ var }}` placeholders: a value is HTML-escaped in the html part (a user's
    name `<script>` is text there, not markup), and a placeholder without a value is a 422
    naming `vars.<name>`, never a mail that says "Hello {{ name }}".
  - A real message (RFC 5322 headers, RFC 2046 `multipart/alternative` with a text and an html
    part) built with the stdlib `email` package (level03/password_reset.py's `new_message`),
    with `Message-ID`, `Reply-To` and `List-Unsubscribe` (RFC 2369), sent with `smtplib`.
  - Header injection: a CR or LF in a header value ends the header and starts another (`Bcc:`),
    so control characters in addresses or a subject are refused (422), before and after the
    template's values are put in.
  - Failure is an answer, not an exception: a refused or unreachable relay gives
    `"status": "failed"` and the reply it gave (`550 …`), stored with the notification.
  - An SMTP server (RFC 5321 subset) on asyncio streams: `SmtpSession` is the protocol as a
    pure object (bytes in, replies out: greeting, EHLO/HELO, MAIL, RCPT, DATA with
    dot-unstuffing, RSET, NOOP, QUIT, pipelined commands, the 1000-octet line limit and the
    `SIZE` limit of RFC 1870), and `MailCatcher.serve` is the thin loop that moves its bytes.
    Any SMTP client (`smtplib`, `swaks`, an MTA) can deliver to it; what it catches is stored
    in sqlite and shown at `/mailbox`. `/mailbox/faults` makes it refuse the next messages.

Standards: RFC 5321 (SMTP), RFC 5322 (message format), RFC 2045/2046 (MIME), RFC 1870 (SIZE),
RFC 2369 (List-Unsubscribe), RFC 3463 (enhanced status codes), RFC 9457 (problem details).

Left out: a queue with retries (level 05 email_queue imports this file's sending and catcher),
SMTP AUTH and STARTTLS, DKIM signing, bounces, per-user preferences and unsubscribe handling.

    python level04/email_notifications.py [--smtp HOST:PORT] [--catcher-port P] [--db PATH]
    python level04/email_notifications.py catcher [--catcher-port P] [--db PATH]
"""
import argparse
import asyncio
import contextlib
import email
import email.policy
import html
import json
import re
import signal
import smtplib
import sys
import threading
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, Conflict, NotFound, ValidationFailed, created, json_response, no_content
from lib.app import bounded, exit_usage_error, port_number
from lib.listing import list_params, page
from lib.request import Query, utc_timestamp
from lib.routing import PAGE
from lib.runner import announce_listening, bind, exit_now
from lib.storage import Database, StorageError, default_db_path
from lib.validation import (Choice, Email, Field, Integer, Invalid, Text, body_schema,
                            is_unicode_text, validate)
from level01.counter import etag
from level03.password_reset import log_line, new_message

app = App("email_notifications", "Transactional email: templates rendered into MIME messages, "
          "sent with smtplib to a relay or to the built-in SMTP mail catcher.", port=8013)

TEMPLATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS templates (
    name        TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    text        TEXT NOT NULL,
    html        TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,   -- the ETag
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
"""
NOTIFICATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id          INTEGER PRIMARY KEY,
    template    TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    reply_to    TEXT,
    status      TEXT NOT NULL,                -- sent | failed
    message_id  TEXT NOT NULL,
    error       TEXT,                         -- the relay's reply, or why it was not reached
    created_at  TEXT NOT NULL
);
"""
MAILBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (             -- what the catcher received
    id          INTEGER PRIMARY KEY,
    mail_from   TEXT NOT NULL,
    rcpt_to     TEXT NOT NULL,                -- a JSON array: the envelope's recipients
    subject     TEXT,
    size        INTEGER NOT NULL,
    raw         BLOB NOT NULL,                -- the message as received, dot-unstuffed
    received_at TEXT NOT NULL
);
"""
SCHEMA = TEMPLATES_SCHEMA + NOTIFICATIONS_SCHEMA + MAILBOX_SCHEMA

# =============================================================================================
# Templates
# =============================================================================================

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # C0, DEL, C1: CR and LF among them
NO_CONTROL = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
HEADER_INJECTION = "must not contain control characters such as CR or LF (header injection)"


class HeaderText(Text):
    """Text that goes into a mail header: no control characters, or a CR LF would start a
    header of the sender's choosing (`Bcc: everyone`)."""

    def shape(self):
        return {**super().shape(), "pattern": NO_CONTROL}

    def clean(self, value):
        if isinstance(value, str) and CONTROL.search(value):
            raise Invalid(HEADER_INJECTION)
        return super().clean(value)


class Address(Email):
    """One mail address (lib's `Email`), refused with a control character anywhere in it:
    `Email` trims white space, and a trailing CR LF must be refused, not trimmed."""

    def clean(self, value):
        if isinstance(value, str) and CONTROL.search(value):
            raise Invalid(HEADER_INJECTION)
        return super().clean(value)


class Vars(Field):
    """The template's values: an object of strings and numbers."""

    def shape(self):
        return {"type": "object", "maxProperties": 100,
                "additionalProperties": {"type": ["string", "number"], "maxLength": 10_000}}

    def clean(self, value):
        if not isinstance(value, dict):
            raise Invalid("must be an object of strings and numbers")
        if len(value) > 100:
            raise Invalid("must have at most 100 values")
        for name, item in value.items():
            text = isinstance(item, str)
            if isinstance(item, bool) or not isinstance(item, (str, int, float)) \
                    or (text and (len(item) > 10_000 or not is_unicode_text(item))):
                raise Invalid(f"'{name}' must be a string (at most 10,000 characters of "
                              f"Unicode text) or a number")
        return {name: str(item) for name, item in value.items()}


NAME = r"[A-Za-z0-9_.-]{1,64}"
TEMPLATE_BODY = {
    "subject": HeaderText(1, 998, required=True, description="a header: no CR, LF or other "
                          "control characters; may hold {{ var }}"),
    "text": Text(1, 100_000, strip=False, required=True, description="the text/plain part"),
    "html": Text(1, 100_000, strip=False, required=True,
                 description="the text/html part; values are HTML-escaped into it"),
}
NEW_TEMPLATE = {"name": Text(1, 64, pattern=NAME, required=True,
                             pattern_text="must be 1–64 of A–Z, a–z, 0–9, '_', '.', '-'"),
                **TEMPLATE_BODY}
PREVIEW = {"vars": Vars(default=dict)}
NOTIFICATION = {
    "template": Text(1, 64, required=True),
    "to": Address(required=True),
    "vars": Vars(default=dict),
    "reply_to": Address(nullable=True),
}
TEMPLATE_OWNED = {"version", "created_at", "updated_at"}


def fill(text, values, escape=False):
    """`text` with every `{{ name }}` replaced by its value (HTML-escaped when `escape`)."""
    return PLACEHOLDER.sub(lambda m: html.escape(values[m.group(1)]) if escape
                           else values[m.group(1)], text)


def render(template, values):
    """{subject, text, html} of a template with `values`; one 422 naming every missing value
    (`vars.<name>`), and a 422 when a value would put a control character in the subject."""
    wanted = {m.group(1) for part in ("subject", "text", "html")
              for m in PLACEHOLDER.finditer(template[part])}
    missing = {f"vars.{name}": "is used by the template but has no value"
               for name in sorted(wanted - values.keys())}
    if missing:
        raise ValidationFailed(missing)
    in_subject = {m.group(1) for m in PLACEHOLDER.finditer(template["subject"])}
    injected = {f"vars.{name}": HEADER_INJECTION for name in sorted(in_subject)
                if CONTROL.search(values[name])}
    if injected:
        raise ValidationFailed(injected)
    subject = fill(template["subject"], values)
    return {"subject": subject, "text": fill(template["text"], values),
            "html": fill(template["html"], values, escape=True)}


def render_template(row):
    return {"name": row["name"], "subject": row["subject"], "text": row["text"],
            "html": row["html"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


def load_template(db, name):
    row = db.query_one("SELECT * FROM templates WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"no template is named {name!r}")
    return row


def create_template(request):
    """Create a template"""
    values = validate(request.json_object(), NEW_TEMPLATE, read_only=TEMPLATE_OWNED)
    now = utc_timestamp()
    db = request.app.state.db
    with db.transaction() as conn:
        if conn.execute("SELECT 1 FROM templates WHERE name = ?", (values["name"],)).fetchone():
            raise Conflict(f"a template is already named {values['name']!r}")
        conn.execute("INSERT INTO templates (name, subject, text, html, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (values["name"], values["subject"],
                                                   values["text"], values["html"], now, now))
    row = load_template(db, values["name"])
    return created(render_template(row), f"/templates/{quote(row['name'])}",
                   {"ETag": etag(row["version"])})


def list_templates(request):
    """List templates, by name"""
    limit, cursor = list_params(request, (str,))
    rows = request.app.state.db.query(
        "SELECT * FROM templates WHERE name > ? ORDER BY name LIMIT ?",
        (cursor[0] if cursor else "", limit + 1))
    return page(rows, limit, lambda row: [row["name"]], render_template)


def read_template(request, name):
    """Read a template"""
    row = load_template(request.app.state.db, name)
    return json_response(render_template(row), headers={"ETag": etag(row["version"])})


def replace_template(request, name):
    """Replace a template's subject, text and html"""
    values = validate(request.json_object(), TEMPLATE_BODY, read_only=TEMPLATE_OWNED | {"name"})
    db = request.app.state.db
    with db.transaction() as conn:
        row = conn.execute("SELECT version FROM templates WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no template is named {name!r}")
        request.require_if_match(etag(row["version"]))
        conn.execute("UPDATE templates SET subject = ?, text = ?, html = ?, version = version + 1,"
                     " updated_at = ? WHERE name = ?", (values["subject"], values["text"],
                                                        values["html"], utc_timestamp(), name))
    row = load_template(db, name)
    return json_response(render_template(row), headers={"ETag": etag(row["version"])})


def delete_template(request, name):
    """Delete a template (notifications sent with it stay)"""
    deleted = request.app.state.db.execute("DELETE FROM templates WHERE name = ?", (name,))
    if deleted.rowcount == 0:
        raise NotFound(f"no template is named {name!r}")
    return no_content()


def preview_template(request, name):
    """Render a template without sending it"""
    values = validate(request.json_object(), PREVIEW)
    return render(load_template(request.app.state.db, name), values["vars"])


def add_template_routes(app):
    """Serve the template routes on `app` (this server's, and email_queue's); the handlers read
    `request.app.state.db`, which holds TEMPLATES_SCHEMA."""
    app.post("/templates", request_schema=body_schema(NEW_TEMPLATE),
             responses={201: "created", 409: "a template has this name",
                        422: "invalid fields"})(create_template)
    app.get("/templates", query=PAGE)(list_templates)
    app.get("/templates/{name}", responses={404: "no such template"})(read_template)
    app.put("/templates/{name}", request_schema=body_schema(TEMPLATE_BODY), if_match=True,
            responses={404: "no such template", 412: "stale If-Match",
                       422: "invalid fields"})(replace_template)
    app.delete("/templates/{name}",
               responses={204: "deleted", 404: "no such template"})(delete_template)
    app.post("/templates/{name}/preview", request_schema=body_schema(PREVIEW),
             responses={404: "no such template",
                        422: "a value is missing or invalid"})(preview_template)


add_template_routes(app)


# =============================================================================================
# Notifications: build the message, send it with smtplib
# =============================================================================================

class MailSettings(NamedTuple):
    mail_from: str             # the From header: `Name <address>`
    smtp: tuple                # (host, port): the relay, or the catcher
    timeout: float             # seconds to wait for the relay before "failed"


def build_message(settings, to, rendered, reply_to=None):
    """The MIME message: headers (password_reset's `new_message`: From, To, Subject, Date,
    Message-ID, Auto-Submitted), Reply-To, List-Unsubscribe, and a text part with its html
    alternative when there is one (RFC 2046 §5.1.4: the last part is the richest, which a
    reader shows)."""
    message = new_message(settings, to, rendered["subject"])
    if reply_to:
        message["Reply-To"] = reply_to
    domain = settings.mail_from.rpartition("@")[2].strip(">")
    message["List-Unsubscribe"] = f"<mailto:unsubscribe@{domain}?subject={quote(to)}>"
    message.set_content(rendered["text"])
    if rendered.get("html") is not None:  # a text-only message has no alternative
        message.add_alternative(rendered["html"], subtype="html")
    return message


def send_message(message, host, port, timeout):
    """Send over SMTP; returns None, or the reason it failed (the server's reply, or why it
    could not be reached) — a failure is data to store, not a crash."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as err:
        code, reply = next(iter(err.recipients.values()))
        return f"{code} {reply.decode('utf-8', 'replace')}"
    except smtplib.SMTPResponseException as err:
        return f"{err.smtp_code} {err.smtp_error.decode('utf-8', 'replace')}"
    except (smtplib.SMTPException, OSError) as err:
        # smtplib reports a timeout while reading a reply as a disconnection caused by it
        if isinstance(err, TimeoutError) or isinstance(err.__context__, TimeoutError):
            return f"no answer from {host}:{port} within {timeout:g} s"
        return f"could not deliver to {host}:{port}: {err}"
    return None


def render_notification(row):
    answer = {"id": row["id"], "template": row["template"], "to": row["recipient"],
              "reply_to": row["reply_to"], "status": row["status"],
              "message_id": row["message_id"], "created_at": row["created_at"]}
    if row["error"]:
        answer["error"] = row["error"]
    return answer


@app.post("/notifications", request_schema=body_schema(NOTIFICATION), blocking=True,
          responses={201: "sent, or failed (see status)", 422: "invalid fields, an unknown "
                     "template, or a missing value"})
def send_notification(request):
    """Render a template and send it"""
    values = validate(request.json_object(), NOTIFICATION)
    row = app.state.db.query_one("SELECT * FROM templates WHERE name = ?", (values["template"],))
    if row is None:
        raise ValidationFailed({"template": "is not the name of a template"})
    settings = app.state.mail
    message = build_message(settings, values["to"], render(row, values["vars"]),
                            values.get("reply_to"))
    error = send_message(message, *settings.smtp, settings.timeout)
    notification_id = app.state.db.execute_returning(
        "INSERT INTO notifications (template, recipient, reply_to, status, message_id, error, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (values["template"], values["to"], values.get("reply_to"), "failed" if error else "sent",
         message["Message-ID"], error, utc_timestamp()))[0]["id"]
    return created(load_notification(notification_id), f"/notifications/{notification_id}")


def load_notification(notification_id):
    row = app.state.db.query_one("SELECT * FROM notifications WHERE id = ?", (notification_id,))
    if row is None:
        raise NotFound(f"no notification has id {notification_id}")
    return render_notification(row)


@app.get("/notifications/{id:int}", responses={404: "no such notification"})
def read_notification(request, id):
    """Read a notification"""
    return load_notification(id)


STATUS = Query("status", "only those sent, or only those failed", ("sent", "failed"))
TO = Query("to", "only those to this address")


@app.get("/notifications", query=[*PAGE, STATUS, TO])
def list_notifications(request):
    """List notifications, newest first"""
    limit, cursor = list_params(request, (int,))
    status, to = STATUS.read(request), TO.read(request)
    rows = app.state.db.query(
        "SELECT * FROM notifications WHERE id < ? AND (? IS NULL OR status = ?) "
        "AND (? IS NULL OR recipient = ?) ORDER BY id DESC LIMIT ?",
        (cursor[0] if cursor else 2**63 - 1, status, status, to, to, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], render_notification)


# =============================================================================================
# The mail catcher: SMTP as a pure object (bytes in, replies out), then the asyncio edge
# =============================================================================================

MAX_LINE = 1000          # octets, CR LF included (RFC 5321 §4.5.3.1.6)
MAX_RECIPIENTS = 100     # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
IDLE_TIMEOUT_S = 300     # RFC 5321 §4.5.3.2.7 suggests 5 minutes for a server
PATH = re.compile(r"(?i)(FROM|TO):\s*<([^<>\s]*)>((?:\s+[A-Za-z0-9-]+(?:=\S+)?)*)\s*")


class SmtpSession:
    """One SMTP conversation as a state machine, with no sockets (like lib/connection.py for
    HTTP): `receive(data)` takes whatever bytes arrived and returns the replies to send, in
    order, so pipelined commands (RFC 2920) just work. `deliver(mail_from, rcpts, data)` is
    called with each complete message and returns its reply (`250 …`, or a refusal)."""

    def __init__(self, hostname, max_bytes, deliver):
        self.hostname = hostname
        self.max_bytes = max_bytes
        self.deliver = deliver
        self.buffer = b""
        self.overlong = False     # the line being read has passed MAX_LINE: it is dropped
        self.greeted = False
        self.closed = False
        self.reset()

    def reset(self):
        self.mail_from = None
        self.rcpts = []
        self.data = None          # a list of lines while in DATA
        self.size = 0
        self.data_error = None    # what the end of DATA will answer instead of delivering

    def greeting(self):
        return f"220 {self.hostname} ESMTP mail catcher ready\r\n".encode()

    def receive(self, data):
        """Split the bytes into lines (CR LF; a bare LF is taken too) and answer each."""
        self.buffer += data
        replies, start = [], 0
        while not self.closed and (end := self.buffer.find(b"\n", start)) >= 0:
            line, start = self.buffer[start:end + 1], end + 1
            too_long = self.overlong or len(line) > MAX_LINE
            self.overlong = False
            reply = self.line(line.rstrip(b"\r\n"), too_long)
            if reply:
                replies.append(reply.encode())
        self.buffer = self.buffer[start:]
        if len(self.buffer) > MAX_LINE:   # keep none of an overlong line in memory
            self.overlong, self.buffer = True, b""
        return replies

    def line(self, line, too_long):
        if self.data is not None:
            return self.data_line(line, too_long)
        if too_long:
            return "500 5.5.2 Line too long (at most 1000 octets)\r\n"
        verb, _, argument = line.decode("utf-8", "replace").partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            return "500 5.5.2 Command not recognised\r\n"
        return handler(argument.strip())

    def data_line(self, line, too_long):
        if line == b".":
            return self.end_of_data()
        if too_long:
            self.data_error = "500 5.5.2 Line too long (at most 1000 octets); message not stored"
        if line.startswith(b"."):
            line = line[1:]   # dot-unstuffing (RFC 5321 §4.5.2)
        self.size += len(line) + 2
        if self.size > self.max_bytes and self.data_error is None:
            self.data_error = (f"552 5.3.4 Message exceeds the fixed maximum size of "
                               f"{self.max_bytes} bytes")
        if self.data_error is None:
            self.data.append(line)
        return None

    def end_of_data(self):
        if self.data_error:
            reply = self.data_error
        else:
            reply = self.deliver(self.mail_from, self.rcpts, b"\r\n".join(self.data) + b"\r\n")
        self.reset()
        return reply + "\r\n"

    # --- the commands: each returns its reply -------------------------------------------

    def smtp_EHLO(self, argument):
        if not argument:
            return "501 5.5.4 EHLO needs a domain\r\n"
        self.greeted = True
        self.reset()
        return (f"250-{self.hostname} greets {argument}\r\n250-SIZE {self.max_bytes}\r\n"
                f"250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")

    def smtp_HELO(self, argument):
        if not argument:
            return "501 5.5.4 HELO needs a domain\r\n"
        self.greeted = True
        self.reset()
        return f"250 {self.hostname}\r\n"

    def smtp_MAIL(self, argument):
        if not self.greeted:
            return "503 5.5.1 Say EHLO or HELO first\r\n"
        if self.mail_from is not None:
            return "503 5.5.1 A mail transaction is already open (RSET to start over)\r\n"
        match = PATH.fullmatch(argument)
        if not match or match.group(1).upper() != "FROM":
            return "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        size = re.search(r"(?i)\bSIZE=(\d+)", match.group(3))
        if size and int(size.group(1)) > self.max_bytes:
            return f"552 5.3.4 Message size exceeds the maximum of {self.max_bytes} bytes\r\n"
        self.mail_from = match.group(2)
        return "250 2.1.0 Sender OK\r\n"

    def smtp_RCPT(self, argument):
        if self.mail_from is None:
            return "503 5.5.1 Need MAIL before RCPT\r\n"
        match = PATH.fullmatch(argument)
        if not match or match.group(1).upper() != "TO" or not match.group(2):
            return "501 5.5.4 Syntax: RCPT TO:<address>\r\n"
        if len(self.rcpts) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients\r\n"
        self.rcpts.append(match.group(2))
        return "250 2.1.5 Recipient OK\r\n"

    def smtp_DATA(self, argument):
        if argument:
            return "501 5.5.4 DATA takes no argument\r\n"
        if not self.rcpts:
            return "503 5.5.1 Need RCPT before DATA\r\n"
        self.data = []
        return "354 End data with <CR><LF>.<CR><LF>\r\n"

    def smtp_RSET(self, argument):
        self.reset()
        return "250 2.0.0 OK\r\n"

    def smtp_NOOP(self, argument):
        return "250 2.0.0 OK\r\n"

    def smtp_QUIT(self, argument):
        self.closed = True
        return f"221 2.0.0 {self.hostname} closing connection\r\n"


class Faults:
    """`POST /mailbox/faults`: the next n messages are refused with this code."""

    REPLIES = {451: "451 4.3.0 Temporary failure (fault injected by /mailbox/faults)",
               550: "550 5.7.1 Message refused (fault injected by /mailbox/faults)"}

    def __init__(self):
        self.lock = threading.Lock()
        self.remaining, self.code = 0, 451

    def arm(self, count, code):
        with self.lock:
            self.remaining, self.code = count, code

    def take(self):
        """The refusal for the next message, or None to accept it."""
        with self.lock:
            if self.remaining == 0:
                return None
            self.remaining -= 1
            return self.REPLIES[self.code]


class MailCatcher:
    """The edge: moves bytes between an asyncio stream and an `SmtpSession`, and stores each
    accepted message in the `mailbox` table."""

    def __init__(self, db, max_bytes, faults):
        self.db = db
        self.max_bytes = max_bytes
        self.faults = faults
        self.hostname = "catcher.localhost"
        self.sessions = set()     # the tasks of the open sessions, for the shutdown

    def deliver(self, mail_from, rcpts, data):
        refusal = self.faults.take()
        if refusal:
            log_line(f"smtp refused a message from <{mail_from}>: {refusal}")
            return refusal
        subject = parse_mail(data)["subject"]
        mail_id = self.db.execute_returning(
            "INSERT INTO mailbox (mail_from, rcpt_to, subject, size, raw, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (mail_from, json.dumps(rcpts), subject, len(data), data, utc_timestamp()))[0]["id"]
        log_line(f"smtp caught mail {mail_id} from <{mail_from}> for {len(rcpts)} recipient(s), "
                 f"{len(data)} bytes")
        return f"250 2.0.0 OK: queued as {mail_id}"

    async def serve(self, reader, writer):
        session = SmtpSession(self.hostname, self.max_bytes, self.deliver)
        writer.write(session.greeting())
        self.sessions.add(asyncio.current_task())
        try:
            while not session.closed:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT_S):
                        data = await reader.read(65536)
                except TimeoutError:
                    writer.write(b"421 4.4.2 Idle too long, closing connection\r\n")
                    break
                if not data:
                    break
                for reply in session.receive(data):
                    writer.write(reply)
                await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The server is stopping (`close_sessions`, or the HTTP server's loop ending): say
            # so (RFC 5321 §3.8) and end normally, as a leaf task may. A message is stored
            # before its 250 with no `await` between, so none is cut in half.
            writer.write(b"421 4.3.2 Shutting down, closing connection\r\n")
        finally:
            self.sessions.discard(asyncio.current_task())
            writer.close()

    async def close_sessions(self):
        sessions = list(self.sessions)
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)


async def run_catcher(catcher, sock, stop=None):
    """Serve SMTP on `sock` until `stop` (an asyncio.Event) is set or the task is cancelled
    (the HTTP server's loop ending), then stop accepting and close the open sessions."""
    server = await asyncio.start_server(catcher.serve, sock=sock)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        await catcher.close_sessions()


# =============================================================================================
# The mailbox: what the catcher caught
# =============================================================================================

def mailbox_summary(row):
    return {"id": row["id"], "from": row["mail_from"], "to": json.loads(row["rcpt_to"]),
            "subject": row["subject"], "size": row["size"], "received_at": row["received_at"]}


def list_mailbox(request):
    """List caught mail, newest first"""
    limit, cursor = list_params(request, (int,))
    rows = request.app.state.db.query(
        "SELECT id, mail_from, rcpt_to, subject, size, received_at FROM mailbox WHERE id < ? "
        "ORDER BY id DESC LIMIT ?", (cursor[0] if cursor else 2**63 - 1, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], mailbox_summary)


def decoded_header(message, name, value):
    """A header's value with its encoded words decoded (`=?utf-8?q?caf=C3=A9?=` → `café`), or
    as written when the `email` package fails on it (it can raise on hostile addresses)."""
    try:
        return str(message.policy.header_fetch_parse(name, value))
    except Exception:
        return value


def parse_mail(raw):
    """Subject, headers, text and html of a caught message, as far as they can be read. The
    catcher takes any bytes a client sends, so the raw bytes are decoded leniently first (no
    undecodable byte may reach sqlite or JSON); a part the `email` package cannot read (an
    unknown charset) is None, a header it cannot parse is shown as written."""
    message = email.message_from_string(raw.decode("utf-8", "replace"), policy=email.policy.default)
    headers = [[name, decoded_header(message, name, value)] for name, value in message.raw_items()]
    mail = {"headers": headers, "text": None, "html": None,
            "subject": next((value for name, value in headers if name.lower() == "subject"), None)}
    for key, subtype in (("text", "plain"), ("html", "html")):
        with contextlib.suppress(Exception):
            part = message.get_body((subtype,))
            mail[key] = None if part is None else part.get_content()
    return mail


def read_mail(request, id):
    """Read one caught mail: headers, text, html and the raw message"""
    row = request.app.state.db.query_one("SELECT * FROM mailbox WHERE id = ?", (id,))
    if row is None:
        raise NotFound(f"no caught mail has id {id}")
    mail = parse_mail(row["raw"])
    return {**mailbox_summary(row), "headers": mail["headers"], "text": mail["text"],
            "html": mail["html"], "raw": row["raw"].decode("utf-8", "replace")}


def empty_mailbox(request):
    """Delete every caught mail"""
    request.app.state.db.execute("DELETE FROM mailbox")
    return no_content()


FAULTS = {"fail_next": Integer(0, 1000, required=True,
                               description="how many of the next messages to refuse"),
          "code": Choice((451, 550), default=451,
                         description="451: try again later; 550: refused for good")}


def inject_faults(request):
    """Make the catcher refuse the next n messages"""
    values = validate(request.json_object(), FAULTS)
    request.app.state.faults.arm(values["fail_next"], values["code"])
    return values


def add_mailbox_routes(app):
    """Serve what the catcher caught, and its fault injection, on `app` (this server's, and
    email_queue's); the handlers read `request.app.state.db` (MAILBOX_SCHEMA) and `.faults`."""
    app.get("/mailbox", query=PAGE)(list_mailbox)
    app.get("/mailbox/{id:int}", responses={404: "no such mail"})(read_mail)
    app.delete("/mailbox", responses={204: "emptied"})(empty_mailbox)
    app.post("/mailbox/faults", request_schema=body_schema(FAULTS),
             responses={422: "invalid"})(inject_faults)


add_mailbox_routes(app)


@app.get("/health")
def health(request):
    """Liveness, and where mail goes"""
    host, port = app.state.mail.smtp
    return {"status": "ok", "smtp": f"smtp://{host}:{port}",
            "catcher": app.state.catcher_running}


# =============================================================================================
# Running: the HTTP server and the catcher, on one event loop (or the catcher on a thread)
# =============================================================================================

def smtp_target(text):
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), port_number(port)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT") from None


def mail_from(text):
    """`--mail-from`: `address` or `Name <address>`, with no control characters."""
    if CONTROL.search(text) or not Address.normalise(text.rpartition("<")[2].rstrip(">")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an address like Name <a@example.com>")
    return text


max_bytes = bounded(int, "a size in bytes (1 KiB – 1 GiB)", at_least=1024, at_most=2**30)


def add_sending_flags(parser):
    """Where mail goes and what it says it is from: this server's, and email_queue's."""
    parser.add_argument("--smtp", type=smtp_target, default=None,
                        help="send through this SMTP relay, HOST:PORT (then no catcher runs)")
    parser.add_argument("--smtp-timeout", type=bounded(float, "seconds above 0", above=0,
                                                        at_most=300), default=10.0,
                        help="seconds to wait for the relay before a send fails (default 10)")
    parser.add_argument("--mail-from", type=mail_from,
                        default="Notifications <notifications@example.com>",
                        help="the From of every mail")


def add_catcher_flags(parser, default_port="8025; with --port 0, also 0"):
    parser.add_argument("--catcher-port", type=port_number, default=None,
                        help=f"the mail catcher's SMTP port, 0 for any free one (default "
                             f"{default_port})")
    parser.add_argument("--catcher-max-bytes", type=max_bytes, default=DEFAULT_MAX_BYTES,
                        help="largest message the catcher takes (default 10 MiB)")


def bind_catcher(args, default_port):
    return bind(args.host, default_port if args.catcher_port is None else args.catcher_port)


def add_catcher(app, args, catcher, sock):
    """Start the catcher once `app`'s HTTP server listens, right after its line
    (`app.on_listening`): on the same event loop (asyncio), or on a loop of its own in a thread
    (threaded), which a shutdown hook stops before the database closes."""
    stop = []   # the catcher thread's (loop, event, thread), for a threaded shutdown

    def start():
        announce_listening("smtp", sock)
        if args.server == "asyncio":
            # kept: the loop holds only a weak reference to a task, and a collected one stops
            app.state.catcher_task = asyncio.get_running_loop().create_task(
                run_catcher(catcher, sock))
        else:
            threading.Thread(target=asyncio.run, args=(catcher_thread(catcher, sock, stop),),
                             name="catcher", daemon=True).start()

    def finish():
        if stop:
            loop, event, thread = stop[0]
            loop.call_soon_threadsafe(event.set)
            thread.join(timeout=args.drain_timeout)

    app.on_listening.append(start)
    app.shutdown_hooks.append(finish)


async def catcher_thread(catcher, sock, stop):
    event = asyncio.Event()
    stop.append((asyncio.get_running_loop(), event, threading.current_thread()))
    await run_catcher(catcher, sock, event)


def open_db(path):
    try:
        return Database(path, SCHEMA)
    except StorageError as err:
        exit_usage_error(str(err))


def run_catcher_alone(argv):
    """`email_notifications.py catcher`: only the SMTP server, until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="email_notifications.py catcher",
                                     description="Only the mail catcher (SMTP), no HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--db", default=default_db_path(app.name), help="sqlite file")
    add_catcher_flags(parser)
    args = parser.parse_args(argv)
    db = open_db(args.db)
    sock = bind_catcher(args, 8025)
    catcher = MailCatcher(db, args.catcher_max_bytes, Faults())

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: exit_now() if stop.is_set() else stop.set())
        announce_listening("smtp", sock)
        await run_catcher(catcher, sock, stop)

    try:
        asyncio.run(main())
    finally:
        db.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["catcher"]:
        return run_catcher_alone(argv[1:])
    parser = app.arg_parser(database=True)
    add_sending_flags(parser)
    add_catcher_flags(parser)
    parser.epilog = "Or: email_notifications.py catcher [--catcher-port P] [--db PATH]"
    args = parser.parse_args(argv)
    app.state.db = app.open_database(args, SCHEMA)
    app.state.faults = Faults()
    target = args.smtp
    if args.smtp is None:
        catcher_sock = bind_catcher(args, 0 if args.port == 0 else 8025)
        add_catcher(app, args, MailCatcher(app.state.db, args.catcher_max_bytes,
                                           app.state.faults), catcher_sock)
        target = catcher_sock.getsockname()[:2]
    app.state.catcher_running = args.smtp is None
    app.state.mail = MailSettings(args.mail_from, target, args.smtp_timeout)
    app.run(args)


if __name__ == "__main__":
    main()
