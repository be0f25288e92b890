"""Password reset: win back an account by email, without telling anyone which accounts exist.

What it teaches
  - The "forgot password" flow of the OWASP Forgot Password Cheat Sheet: `POST /auth/forgot`
    always answers the same 202, for a known address and an unknown one alike, in the same time;
    the email carries a link with a random token; `POST /auth/reset` trades the token and a new
    password for the change.
  - Reset tokens done right: 256 random bits (`secrets.token_urlsafe(32)`), only their SHA-256
    stored, valid 30 minutes, used once (consumed in the same transaction that changes the
    password, so two simultaneous resets cannot both win), and a newer request kills the older
    link. At most 3 emails per address per hour, counted for addresses without an account too.
  - Equal work for "exists" and "does not exist": the same SQL statements run either way (for
    an unknown address they touch no rows), the mail is built either way (and dropped when
    there is no account, as login hashes against a dummy), and the part that can be slow and
    only a real account needs, delivering the mail, happens on a background thread.
  - After a reset: every refresh token of the user is revoked (signed out everywhere), the
    login lockout is lifted, and a "your password was changed" email is sent.
  - Where tokens leak in practice, and how this server keeps them in: the access log and the
    trace never print query strings; the reset page is `Referrer-Policy: no-referrer` and
    `Cache-Control: no-store`; the link's host comes from `--public-url` (else the server's
    own address, with the port it really listens on), never from the request's `Host` header
    (reset-link poisoning); a `GET` of the link changes nothing, so mail scanners that open
    links cannot burn it; the mail goes to the address stored on the account, never to the one
    typed (the Unicode case-folding takeover of CVE-2019-19844).
  - A real email: a MIME message (RFC 5322 headers, RFC 2045/2046 multipart/alternative with a
    text and an HTML part) built with `email.message.EmailMessage`, written atomically to an
    outbox folder as an `.eml` file, or sent with `smtplib` (RFC 5321).

Users, passwords, login, refresh tokens and the lockout are level03/jwt_auth.py's, imported.

What it leaves out: a durable mail queue with retries (level 05 email_queue), templates and
per-user preferences (level 04 email_notifications), SMTP authentication and TLS, per-IP rate
limits (level 06 rate_limiter), multi-factor checks before a reset. password_reset.md's "In production" says who does those.
"""
import argparse
import base64
import contextlib
import datetime
import email.policy
import email.utils
import hashlib
import html
import os
import queue
import secrets
import smtplib
import sys
import tempfile
import textwrap
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, HTTPError, ValidationFailed, html_response, json_response,
                 no_content, redirect, trace_event)
from lib.app import bounded, exit_usage_error, http_url
from lib.request import Query, utc_timestamp
from lib.storage import REPO_ROOT
from lib.validation import Email, Text, body_schema, validate
from level03.jwt_auth import (AUTH_BODY_LIMIT, SCHEMA as IDENTITY_SCHEMA, Auth, Password,
                              add_auth_arguments, add_token_routes, email_argument, email_key,
                              hash_password, password_problem, read_me, require_user,
                              token_hash)

app = App("password_reset", "Forgot your password? A single-use reset link by email, without "
          "telling anyone which accounts exist.", port=8011)


# =============================================================================================
# Schema (beside jwt_auth's users, login failures and refresh tokens)
# =============================================================================================

SCHEMA = IDENTITY_SCHEMA + """
CREATE TABLE IF NOT EXISTS reset_tokens (
    id         INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,       -- SHA-256 of the token, which is only in the mail
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL               -- a used or superseded token is deleted, not marked
);
CREATE INDEX IF NOT EXISTS reset_tokens_by_user ON reset_tokens (user_id);
CREATE INDEX IF NOT EXISTS reset_tokens_by_expiry ON reset_tokens (expires_at);

CREATE TABLE IF NOT EXISTS reset_requests (
    id           INTEGER PRIMARY KEY,
    email_key    TEXT NOT NULL,            -- case-folded address, with or without an account
    requested_at REAL NOT NULL             -- unix time; rows older than the window are deleted
);
CREATE INDEX IF NOT EXISTS reset_requests_by_email ON reset_requests (email_key, requested_at);
CREATE INDEX IF NOT EXISTS reset_requests_by_time ON reset_requests (requested_at);
"""


# =============================================================================================
# Reset tokens: issue, look up, consume
# =============================================================================================

TOKEN_BYTES = 32               # 256 bits: `token_urlsafe` makes 43 URL-safe characters of them
DEFAULT_TOKEN_TTL_S = 30 * 60  # OWASP: short-lived; long enough to switch to the mail app and back
MAX_TOKEN_TTL_S = 24 * 3600    # a reset link valid for days is a standing key to the account
MAILS_PER_WINDOW = 3           # reset mails per address …
MAIL_WINDOW_S = 3600           # … per hour


class ResetRequest(NamedTuple):
    """What `request_password_reset` decided: whether to send the mail, and its token (made
    for every request, so that the mail can be built for every request too)."""
    send_to: str | None        # the address stored on the account; None: no mail
    token: str


def allow_reset_mail(conn, key, now):
    """The rate limit, inside the caller's transaction: True, and the request is counted, when
    this address has had fewer than `MAILS_PER_WINDOW` mails in the last hour. Counted by the
    address typed, whether or not it has an account, or the limit itself would tell."""
    conn.execute("DELETE FROM reset_requests WHERE requested_at <= ?", (now - MAIL_WINDOW_S,))
    (count,) = conn.execute("SELECT count(*) FROM reset_requests WHERE email_key = ?",
                            (key,)).fetchone()
    if count >= MAILS_PER_WINDOW:
        trace_event(f"rate limit: {count} reset mails for this address this hour, none sent")
        return False
    conn.execute("INSERT INTO reset_requests (email_key, requested_at) VALUES (?, ?)", (key, now))
    trace_event(f"rate limit: reset mail {count + 1} of {MAILS_PER_WINDOW} this hour")
    return True


def request_password_reset(auth, email, ttl_s, now=None):
    """What `POST /auth/forgot` does, in one transaction. A token is made and hashed for every
    request, and the same statements run whether the account exists or not: for an unknown
    address (or one over its limit) they simply match no rows. Only then does the outcome differ,
    and only inside the server: whether the mail is sent."""
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(TOKEN_BYTES)
    stored_hash = token_hash(token)   # jwt_auth's SHA-256: a stolen database holds no usable link
    with auth.db.transaction() as conn:
        allowed = allow_reset_mail(conn, email_key(email), now)
        user = auth.users.by_email(email)
        user_id = user["id"] if user is not None and allowed else None  # None matches no row
        # A newer request kills the older links of the user (and expired ones of everybody).
        conn.execute("DELETE FROM reset_tokens WHERE user_id = ? OR expires_at <= ?",
                     (user_id, now))
        inserted = conn.execute(
            "INSERT INTO reset_tokens (token_hash, user_id, created_at, expires_at) "
            "SELECT ?, id, ?, ? FROM users WHERE id = ?",
            (stored_hash, now, now + ttl_s, user_id)).rowcount
    if not inserted:
        trace_event("no reset token issued: nothing to send, the same answer")
        return ResetRequest(None, token)
    trace_event("reset token issued: its SHA-256 stored, the token goes only into the mail")
    # To the address on the account, never to the one typed: `ß` and `ss` case-fold alike, and
    # answering to the typed address would mail the link to whoever typed a look-alike.
    return ResetRequest(user["email"], token)


def live_reset_token(db, token, now=None):
    """The reset token's row joined with its user (`user_id`, `email`), or None when the token
    is unknown, expired, used or superseded. It only looks: nothing is consumed."""
    now = time.time() if now is None else now
    return db.query_one(
        "SELECT t.user_id, u.email FROM reset_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = ? AND t.expires_at > ?", (token_hash(token), now))


def consume_reset_token(conn, token, now):
    """Inside the caller's write transaction: the user id of a live token, which is used up
    together with every other token of that user; None if it is not live (any more). The
    transaction's write lock makes this check-and-delete atomic: of two requests with one
    token, the second finds nothing."""
    row = conn.execute("SELECT user_id FROM reset_tokens WHERE token_hash = ? AND expires_at > ?",
                       (token_hash(token), now)).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM reset_tokens WHERE user_id = ?", (row["user_id"],))
    return row["user_id"]


INVALID_LINK = "this reset link is invalid, has expired or was already used; ask for a new one"


def reset_password(auth, token, password):
    """Set a new password with a reset token; returns the address to notify. One 400 for every
    kind of bad token (unknown, expired, used, superseded): which one it was helps nobody but
    an attacker. The policy is checked before the token is used, so a refused password does
    not burn the link."""
    found = live_reset_token(auth.db, token)
    if found is None:
        raise BadRequest(INVALID_LINK)
    problem = password_problem(password, found["email"])
    if problem:
        raise ValidationFailed({"password": problem})
    new_hash = hash_password(password, auth.scrypt)   # slow: before taking the write lock
    with auth.db.transaction() as conn:
        user_id = consume_reset_token(conn, token, time.time())
        if user_id is not None:
            auth.users.set_password_hash(user_id, new_hash)
            auth.refresh_tokens.revoke_all(user_id)          # signed out everywhere
            auth.lockout.forgive(email_key(found["email"]))  # the mailbox owner is back in
    if user_id is None:   # another request used the token while this one was hashing
        raise BadRequest(INVALID_LINK)
    trace_event("password reset: token used up, refresh tokens revoked, lockout lifted")
    return found["email"]


# =============================================================================================
# Mail: build the message (RFC 5322, RFC 2045), deliver it (an .eml file, or SMTP)
# =============================================================================================

SMTP_TIMEOUT_S = 10
MAIL_QUEUE_LIMIT = 1000   # messages waiting for the mail thread; more are dropped (and logged)
MAIL_DRAIN_S = 5          # at shutdown, how long the queue may take to empty
# RFC 5322 §2.1: lines end in CRLF. `utf8=True` (RFC 6532) keeps a non-ASCII address readable
# in the file; smtplib picks its own policy for the wire.
EML_POLICY = email.policy.SMTPUTF8


class MailSettings(NamedTuple):
    mail_from: str           # `Name <address>`, the From header
    public_url: str | None   # `--public-url`, where users reach this server; None: see site_url
    host: str                # `--host`, which the default public URL names
    token_ttl: float         # seconds a reset link works
    outbox: Path | None      # write .eml files here …
    smtp: tuple | None       # … or send to (host, port)


def describe_duration(seconds_):
    """`1800` → "30 minutes", for the text of a mail."""
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds_ >= 2 * size or unit == "second":
            count = round(seconds_ / size)
            return f"{count} {unit}{'' if count == 1 else 's'}"


def new_message(settings, to, subject):
    """An EmailMessage with the headers every mail needs (RFC 5322 §3.6): From, To, Subject,
    Date, Message-ID, and `Auto-Submitted` (RFC 3834) so that vacation auto-replies stay quiet."""
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))
    # The sender's domain, not socket.getfqdn(): that can be a slow DNS lookup per call.
    domain = email.utils.parseaddr(settings.mail_from)[1].rpartition("@")[2]
    message["Message-ID"] = email.utils.make_msgid(domain=domain)
    message["Auto-Submitted"] = "auto-generated"
    return message


def site_url(settings, port):
    """Where users reach this server, the base of every link: `--public-url`, else this server
    itself, `http://localhost:8011` with the defaults. `port` is the one really listened on
    (`app.port`): under `--port 0` the OS chooses it, so the default is known only once the
    server listens, and is built per link. Never the request's `Host` header: a client chooses
    that (see "reset-link poisoning" in password_reset.md)."""
    if settings.public_url is not None:
        return settings.public_url
    host = settings.host
    if host in ("127.0.0.1", "0.0.0.0", "::", "::1", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"   # an IPv6 address in a URL (RFC 3986 §3.2.2)
    return f"http://{host}:{port}"


def reset_link(base_url, token):
    return f"{base_url}/reset?{urlencode({'token': token})}"


def mail_text(*paragraphs):
    """Plain text wrapped at 72 columns (RFC 5322 §2.1.1: lines SHOULD stay under 78), so the
    part can go as 7bit, readable in the raw file. A link is a paragraph of its own, unwrapped."""
    return "\n\n".join(p if p.startswith("http") else textwrap.fill(p, 72)
                       for p in paragraphs) + "\n"


def build_reset_message(settings, to, link):
    """The reset mail, around its `reset_link`: a text part, and an HTML alternative
    (RFC 2046 §5.1.4) of the same."""
    valid = describe_duration(settings.token_ttl)
    intro = f"Someone, hopefully you, asked to reset the password of the account {to}."
    outro = ("The link works once. If you did not ask for it, ignore this mail: your password "
             "stays as it is.")
    message = new_message(settings, to, "Reset your password")
    message.set_content(mail_text(intro, f"To choose a new password, open this link within "
                                         f"{valid}:", link, outro))
    message.add_alternative(
        f"<!doctype html>\n<html><body style=\"font-family: sans-serif\">\n"
        f"<p>{html.escape(intro)}</p>\n"
        f"<p><a href=\"{html.escape(link)}\">Choose a new password</a> (within {valid}).</p>\n"
        f"<p>{html.escape(outro)}</p>\n</body></html>\n", subtype="html")
    return message


def build_password_changed_message(settings, to):
    """The notice after a reset: if it was not the owner, this is how they find out."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    message = new_message(settings, to, "Your password was changed")
    message.set_content(mail_text(
        f"The password of your account {to} was changed with a reset link at {when}. Every "
        f"device that was signed in has been signed out.",
        "If this was you, there is nothing else to do. If it was not, someone can read your "
        "mail: secure your mailbox first, then reset your password again."))
    return message


def write_to_outbox(message, folder):
    """Write the message as an .eml file, atomically: to a temporary file in the same folder,
    flushed to disk, then renamed (a rename within one file system is atomic, POSIX). A reader
    of `*.eml` never sees half a message. The file is 0600 (mkstemp): it holds a live token."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    final = Path(folder) / f"{stamp}-{secrets.token_hex(4)}.eml"   # names sort by time
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(message.as_bytes(policy=EML_POLICY))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return final


def send_over_smtp(message, host, port):
    """One SMTP session per message (RFC 5321): EHLO, MAIL FROM, RCPT TO, DATA, QUIT."""
    with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT_S) as smtp:
        smtp.send_message(message)


def deliver(message, settings):
    """Send one message the configured way; returns where it went, for the log."""
    if settings.smtp is not None:
        send_over_smtp(message, *settings.smtp)
        return "smtp://{}:{}".format(*settings.smtp)
    return str(write_to_outbox(message, settings.outbox))


def log_line(text):
    sys.stderr.write(f"{utc_timestamp()} {text}\n")
    sys.stderr.flush()


class Mailer:
    """One background thread that delivers mail, so that no request waits for an SMTP server
    or an fsync. That keeps `POST /auth/forgot` for a known address (a mail to deliver) as fast
    as for an unknown one (none): the request only puts the built message on a queue.

    The price: a message still in the queue is lost if the process dies (the user asks again);
    level 05's email_queue makes the queue durable, with retries. Messages are delivered in the
    order they were posted."""

    def __init__(self, settings, limit=MAIL_QUEUE_LIMIT):
        self.settings = settings
        self.jobs = queue.Queue(limit)
        self.thread = threading.Thread(target=self._run, name="mailer", daemon=True)
        self.thread.start()

    def post(self, message, *, deliver=True):
        """Queue an EmailMessage, to be delivered; with `deliver=False`, to be rendered and
        dropped: the same work on this thread, for a request that must not be told apart."""
        try:
            self.jobs.put_nowait((message, deliver))
        except queue.Full:
            log_line(f"mail queue full ({MAIL_QUEUE_LIMIT}): a message was dropped")
            return
        trace_event(f"mail queued: {message['Subject']!r}" if deliver else
                    "mail queued to be rendered and dropped: the same work, nothing sent")

    def _run(self):
        while (job := self.jobs.get()) is not None:
            message, wanted = job
            if not wanted:
                message.as_bytes(policy=EML_POLICY)
                continue
            try:
                where = deliver(message, self.settings)
                log_line(f"mail {message['Subject']!r} {message['Message-ID']} "
                         f"delivered to {where}")
            except Exception as error:  # the thread must live on; the error goes to the log
                log_line(f"mail not delivered: {type(error).__name__}: {error}")

    def close(self, timeout=MAIL_DRAIN_S):
        """At shutdown: deliver what is queued, waiting at most `timeout` seconds."""
        with contextlib.suppress(queue.Full):
            self.jobs.put(None, timeout=timeout)
        self.thread.join(timeout)


# =============================================================================================
# The reset page: a small HTML form that works in any browser, without script
# =============================================================================================

PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;"
              "padding:0 1rem;line-height:1.5}label,input,button{display:block;width:100%;"
              "box-sizing:border-box}input{margin:.25rem 0 1rem;padding:.5rem;font-size:1rem}"
              "button{padding:.6rem;font-size:1rem}.error{color:#a00}[hidden]{display:none}")
# CSP (W3C CSP Level 3): nothing may load, the one inline style is allowed by its hash, the
# form may post only here, no framing (clickjacking), no <base> tricks. No script at all.
_STYLE_HASH = base64.b64encode(hashlib.sha256(PAGE_STYLE.encode("utf-8")).digest()).decode()
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; "
                               f"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",   # the page's URL holds the token: never send it on
    "Cache-Control": "no-store",        # … nor keep the page (or the token in it) in a cache
    "X-Content-Type-Options": "nosniff",
}


def page(title, body, status=200):
    document = (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n"
        f"<main>\n<h1>{html.escape(title)}</h1>\n{body}</main>\n</body>\n</html>\n")
    return html_response(document, status, PAGE_HEADERS)


def reset_form_page(token, email, messages=(), status=200):
    """The form of `GET /reset`. The token goes back in a hidden field, in the body of a POST,
    where no log sees it. This page's own URL holds it too: it is neither cached (no-store) nor
    sent on (no-referrer); browser history keeps it, which a single-use, short-lived token
    survives."""
    errors = "".join(f"<p class=\"error\" role=\"alert\">{html.escape(m)}</p>\n" for m in messages)
    return page("Choose a new password", (
        f"<p>For the account <strong>{html.escape(email)}</strong>.</p>\n{errors}"
        "<form method=\"post\" action=\"/auth/reset\">\n"
        f"<input type=\"hidden\" name=\"token\" value=\"{html.escape(token)}\">\n"
        # No name: not sent. It tells a password manager which account the new password is for.
        f"<input type=\"email\" autocomplete=\"username\" value=\"{html.escape(email)}\" "
        "readonly hidden>\n"
        "<label for=\"password\">New password (8 to 128 characters)</label>\n"
        "<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"new-password\" "
        "minlength=\"8\" maxlength=\"128\" required autofocus>\n"
        "<button type=\"submit\">Set the new password</button>\n</form>\n"), status)


def invalid_link_page():
    return page("This link does not work", (
        "<p>This reset link is invalid, has expired or was already used. A link works once, "
        "and only the newest one you asked for.</p>\n"
        "<p><a href=\"/forgot\">Ask for a new link</a>.</p>\n"), 400)


def forgot_form_page(messages=(), status=200):
    """The form of `GET /forgot`, for a person who has no API client: it posts to
    `/auth/forgot` as a form, and gets a page back."""
    errors = "".join(f"<p class=\"error\" role=\"alert\">{html.escape(m)}</p>\n" for m in messages)
    return page("Forgot your password?", (
        f"{errors}<form method=\"post\" action=\"/auth/forgot\">\n"
        "<label for=\"email\">The email address of your account</label>\n"
        "<input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" required "
        "autofocus>\n<button type=\"submit\">Mail me a reset link</button>\n</form>\n"), status)


# =============================================================================================
# Routes
# =============================================================================================

FORGOT = {"email": Email(required=True)}
RESET = {"token": Text(1, 200, required=True), "password": Password(required=True)}
FORM = "application/x-www-form-urlencoded"


# Signup, login, refresh, logout and /me are jwt_auth's routes, unchanged: they read
# app.state.auth. Login brings jwt_auth's lockout and its equal-time answer for unknown emails.
add_token_routes(app)
app.get("/me", responses={200: "The user the bearer token names"})(read_me)


@app.post("/auth/forgot", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=body_schema(FORGOT),   # JSON; the form of GET /forgot posts the same
          responses={202: "Accepted: a link is mailed if the address has an account"})
def forgot_password(request):
    """Ask for a password reset link by email (the same answer whether the account exists)"""
    state = request.app.state
    from_form = request.content_type == FORM   # the page of GET /forgot; else JSON
    try:
        values = validate(request.fields(), FORGOT)
    except ValidationFailed as error:
        if not from_form:
            raise
        return forgot_form_page([f"The {e['field']} {e['message']}." for e in error.errors],
                                error.status)
    outcome = request_password_reset(state.auth, values["email"], state.mail.token_ttl)
    # Built for every request, sent only to an account: building a MIME message takes a
    # millisecond or two, which a client can time, as it could time a hash (see jwt_auth's
    # dummy hash). Built after the answer, on the mail thread, it would slow the answer of a
    # known address still, by taking the interpreter (the GIL) while that answer is written.
    # The mail thread then renders it in both cases too, and drops it without an account: a
    # message rendered only for known addresses would take the interpreter from their answers.
    link = reset_link(site_url(state.mail, request.app.port), outcome.token)
    message = build_reset_message(state.mail, outcome.send_to or values["email"], link)
    state.mailer.post(message, deliver=outcome.send_to is not None)
    # One body for every case; 202 (RFC 9110 §15.3.3): accepted, the outcome not told.
    detail = (f"if an account uses this address, a link to reset its password is on its way; "
              f"it works once, within {describe_duration(state.mail.token_ttl)}")
    if from_form:
        return page("Check your mail", f"<p>{html.escape(detail.capitalize())}.</p>\n", 202)
    return json_response({"status": "accepted", "detail": detail}, 202)


@app.get("/forgot", public=True, media_type="text/html", responses={200: "An HTML form to ask for a reset link"})
def show_forgot_form(request):
    """A page to ask for a reset link: a form that posts to /auth/forgot"""
    return forgot_form_page()


@app.post("/auth/reset", public=True, blocking=True, body_limit=AUTH_BODY_LIMIT,
          request_schema=body_schema(RESET),   # JSON; the HTML form posts the same fields
          responses={204: "Password changed; every refresh token of the user is revoked",
                     303: "From the HTML form: on to /reset/done",
                     400: "The token is invalid, expired or used"})
def reset_with_token(request):
    """Set a new password with the token from the reset mail (JSON, or the HTML form)"""
    state = request.app.state
    fields = request.fields()     # JSON from an API client, a form post from the reset page
    from_form = request.content_type == FORM
    try:
        values = validate(fields, RESET)
        notify = reset_password(state.auth, values["token"], values["password"])
    except HTTPError as error:
        if not from_form:
            raise
        return form_error_page(state.auth, fields.get("token"), error)
    state.mailer.post(build_password_changed_message(state.mail, notify))
    if from_form:  # Post/Redirect/Get: reloading the result page does not post again
        return redirect("/reset/done", 303, {"Cache-Control": "no-store"})
    return no_content()


def form_error_page(auth, token, error):
    """A refused form post, shown as a page: the form again with what to fix while the token
    is live (a 422: the link is not used up), else the invalid-link page."""
    found = live_reset_token(auth.db, token) if isinstance(token, str) and token else None
    if found is None:
        return invalid_link_page()
    messages = [f"The {e['field']} {e['message']}." for e in error.errors or ()] or [error.detail]
    return reset_form_page(token, found["email"], messages, error.status)


@app.get("/reset", public=True, media_type="text/html", query=[Query("token", "the token from the reset mail")],
         responses={200: "An HTML form to choose a new password",
                    400: {"description": "An HTML page: the link is invalid, expired or used",
                          "content": {"text/html": {"schema": {"type": "string"}}}}})
def show_reset_form(request):
    """The page the reset link opens: a form that posts to /auth/reset"""
    try:
        token = request.query_param("token", "")
    except BadRequest:   # a query that is not UTF-8 (`%ff`) holds no token: a person reads this
        token = ""
    # Looking changes nothing: mail scanners that open every link must not burn the token.
    found = live_reset_token(request.app.state.auth.db, token) if token else None
    if found is None:
        return invalid_link_page()
    return reset_form_page(token, found["email"])


@app.get("/reset/done", public=True, media_type="text/html", responses={200: "An HTML page: the password is changed"})
def show_reset_done(request):
    """The page after a successful reset from the form"""
    return page("Password changed", (
        "<p>Your password has been changed. Every device that was signed in has been signed "
        "out: log in again with the new password.</p>\n"))


app.use(require_user)   # deny by default (jwt_auth): every route above that is not public


# =============================================================================================
# Command line
# =============================================================================================

def mail_address(text):
    """`--mail-from`: `Name <address>` or a bare address, the address as jwt_auth takes one."""
    name, address = email.utils.parseaddr(text)
    try:
        return email.utils.formataddr((name, email_argument(address)))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an email address") from None


def smtp_address(text):
    """`--smtp HOST:PORT` (an IPv6 host in brackets: `[::1]:25`)."""
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_auth_arguments(parser, app.name)
    delivery = parser.add_mutually_exclusive_group()
    delivery.add_argument("--outbox", type=Path,
                          help="write each mail as an .eml file into this folder "
                               "(default data/outbox/ under the repository)")
    delivery.add_argument("--smtp", type=smtp_address, metavar="HOST:PORT",
                          help="send mail to this SMTP server instead of the outbox")
    parser.add_argument("--mail-from", type=mail_address,
                        default="Password reset <no-reply@example.com>",
                        help="the From of every mail (default %(default)s)")
    parser.add_argument("--public-url", type=http_url,
                        help="where users reach this server; reset links are built on it "
                             "(default http://localhost:PORT, the port really listened on, "
                             "also under --port 0; set it behind a proxy)")
    parser.add_argument("--token-ttl", default=float(DEFAULT_TOKEN_TTL_S),
                        type=bounded(float, f"a duration from 1 to {MAX_TOKEN_TTL_S} s",
                                     at_least=1, at_most=MAX_TOKEN_TTL_S),
                        help=f"seconds a reset link works (default {DEFAULT_TOKEN_TTL_S})")
    args = parser.parse_args(argv)

    outbox = None
    if args.smtp is None:
        outbox = (args.outbox or REPO_ROOT / "data" / "outbox").resolve()
        try:
            outbox.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            exit_usage_error(f"cannot create the outbox {outbox}: {err.strerror or err}")
        if not os.access(outbox, os.W_OK | os.X_OK):
            exit_usage_error(f"cannot write to the outbox {outbox}")
    settings = MailSettings(args.mail_from, args.public_url, args.host, args.token_ttl, outbox,
                            args.smtp)

    db = app.open_database(args, SCHEMA)
    app.state.auth = Auth.from_args(db, args)
    app.state.mail = settings
    app.state.mailer = Mailer(settings)
    app.shutdown_hooks.append(app.state.mailer.close)   # runs before the database closes
    app.run(args)


if __name__ == "__main__":
    main()
