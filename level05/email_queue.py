"""Email queue — mail sent later, on level05's job queue, through level04's SMTP path.

What it teaches
  - Sending is work for later: `POST /emails` renders the mail, stores it as a job of the
    durable queue (level05/job_processor.py's `Queue`: one sqlite row, committed before the
    202) and answers at once. Worker threads claim the job and send it with `smtplib`
    (level04/email_notifications.py's `build_message` and `send_message`).
  - Which failures to retry: an SMTP reply is a verdict. A 4xx (RFC 5321 §4.2.1: "transient
    negative completion") or a relay that cannot be reached is tried again after the queue's
    backoff, up to `--max-attempts`; a 5xx ("permanent negative completion") fails the mail at
    once: sending the same message again would be refused again.
  - At-least-once, and the Message-ID that makes it bearable: a worker can die after the relay
    said 250 and before the queue recorded "sent"; its lease runs out and the mail is sent
    again. Every attempt sends the message as it was enqueued, with the same `Message-ID` (made
    from the job's id and creation time) and `Date`, so the receiving side can recognise the
    second copy (RFC 5322 §3.6.4: one Message-ID per message, whatever its copies).
  - A rate limit on the way out (`--rate N` messages a second): relays throttle senders, and
    a burst would be deferred (421/451) anyway. `Pacer` hands out send slots 1/N s apart to
    every worker thread.

Standards: RFC 5321 (SMTP replies, §4.2.1 and §4.5.4.1 on retrying), RFC 5322 (Message-ID,
Date), RFC 3463 (enhanced status codes), RFC 9110 (202 Accepted, Location), the IETF draft
"The Idempotency-Key HTTP Header Field", RFC 9457 (problem details).

Left out: bounces (a DSN arriving later for a mail the relay took), per-domain queues and
rates, MX lookup (a relay or the catcher does the delivery), DKIM, unsubscribe handling,
cancelling a queued mail, `worker` processes (job_processor has them; this queue's jobs need
this server's settings). email_queue.md's "In production" says who does those.

    python level05/email_queue.py [--smtp HOST:PORT] [--catcher-port P] [--rate N]
                                  [--max-attempts N] [--backoff-s S] [--db PATH]
"""
import datetime
import email.utils
import enum
import json
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, NotFound, ValidationFailed, json_response, trace_event
from lib.app import bounded
from lib.listing import list_params, page
from lib.request import Query
from lib.routing import PAGE, PAGE_ANSWER
from lib.validation import Text, body_schema, validate
from level04.email_notifications import (MAILBOX_SCHEMA, NOTIFICATION, TEMPLATES_SCHEMA, Faults,
                                         HeaderText, MailCatcher, MailSettings, add_catcher,
                                         bind_catcher,
                                         add_catcher_flags, add_mailbox_routes,
                                         add_sending_flags, add_template_routes, build_message,
                                         render, send_message)
from level05.job_processor import (JOBS_SCHEMA, NEWEST, JobFailed, JobRefused, JobType, Queue,
                                   Status, WorkerPool, add_queue_flags, idempotency_key,
                                   nullable, now_text)

app = App("email_queue", "Email sent asynchronously on a durable sqlite job queue, over SMTP, "
          "with retries, a send rate, and a Message-ID fixed at enqueue time.", port=8018)

# The job queue's tables, and level04's templates and mailbox (what the catcher caught).
SCHEMA = JOBS_SCHEMA + TEMPLATES_SCHEMA + MAILBOX_SCHEMA

# =============================================================================================
# An email is a job of type "email": its status is the job's, in mail words
# =============================================================================================


class EmailStatus(enum.StrEnum):
    QUEUED = "queued"        # waiting for a worker
    SENDING = "sending"      # a worker holds it and talks to the relay
    SENT = "sent"            # the relay said 250
    RETRYING = "retrying"    # deferred (4xx, unreachable): the next attempt is at next_attempt_at
    FAILED = "failed"        # refused (5xx), or out of attempts


EMAIL_STATUS = {
    Status.QUEUED: EmailStatus.QUEUED,
    Status.SCHEDULED: EmailStatus.QUEUED,     # (no email is posted for later)
    Status.RUNNING: EmailStatus.SENDING,
    Status.SUCCEEDED: EmailStatus.SENT,
    Status.FAILED: EmailStatus.RETRYING,
    Status.DEAD: EmailStatus.FAILED,
    Status.CANCELLED: EmailStatus.FAILED,     # (no route here cancels one)
}
JOB_STATUSES = {mail: [job for job, shown in EMAIL_STATUS.items() if shown == mail]
                for mail in EmailStatus}
EMAIL_JOB = "email"


def message_id(row, sender):
    """`<email.42.1764998553123456@example.com>`: made of what the job's row fixed when the mail
    was enqueued (its id and creation time) and the sender's domain, so every attempt, in any
    thread, after any restart, sends the same one."""
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2]
    return f"<email.{row['id']}.{round(row['created_at'] * 1_000_000)}@{domain}>"


def build_email(row, settings):
    """The message as it was enqueued: level04's `build_message` (headers, List-Unsubscribe,
    text and html parts), with the Message-ID and Date of the enqueue (RFC 5322 §3.6.1: the
    Date is when the message was ready to be sent), and only a text part when no html was given."""
    mail = json.loads(row["payload"])
    sender = settings._replace(mail_from=mail["from"])
    message = build_message(sender, mail["to"], mail, mail["reply_to"])
    message.replace_header("Message-ID", message_id(row, mail["from"]))
    enqueued = datetime.datetime.fromtimestamp(row["created_at"], datetime.timezone.utc)
    message.replace_header("Date", email.utils.format_datetime(enqueued))
    return message


# =============================================================================================
# Sending: one attempt of the "email" job
# =============================================================================================

PERMANENT = re.compile(r"5\d\d\b")   # RFC 5321 §4.2.1: 5yz is a permanent negative completion


class MailDeferred(JobFailed):
    """A 4xx reply, or no relay to talk to: the queue tries again after its backoff."""


class MailRefused(JobRefused):
    """A 5xx reply: the same message would be refused again, so the job is dead at once."""


class Pacer:
    """`--rate N`: SMTP transactions start at least 1/N s apart, across every worker thread.
    Each send takes the next free slot and waits for it (in `JobContext.sleep`, so a stopping
    server releases the job instead of waiting out the slot)."""

    def __init__(self, rate):
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.lock = threading.Lock()
        self.next_slot = 0.0

    def wait_turn(self, context):
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot)
            self.next_slot = slot + self.interval
        context.sleep(slot - now)


def send_email(context):
    """One attempt: wait for a slot under --rate, build the message as enqueued, send it."""
    settings = app.state.mail
    app.state.pacer.wait_turn(context)
    row = context.queue.get(context.job_id)
    failure = send_message(build_email(row, settings), *settings.smtp, settings.timeout)
    if failure is None:
        return None
    if PERMANENT.match(failure):
        raise MailRefused(failure)
    raise MailDeferred(failure)


# =============================================================================================
# Enqueueing
# =============================================================================================

# Either the mail itself (html optional: then a text/plain mail) or a template and its values.
DIRECT = {"to": NOTIFICATION["to"], "reply_to": NOTIFICATION["reply_to"],
          "subject": HeaderText(1, 998, required=True, description="a header: no CR, LF or "
                                "other control characters"),
          "text": Text(1, 100_000, strip=False, required=True, description="the text/plain part"),
          "html": Text(1, 100_000, strip=False, nullable=True,
                       description="the text/html part (leave it out for a text-only mail)")}
TEMPLATED = NOTIFICATION
SERVER_OWNED = {"id", "status", "attempts", "max_attempts", "last_error", "message_id",
                "next_attempt_at", "created_at", "sent_at", "updated_at"}
EMAIL_TYPE = JobType(EMAIL_JOB, send_email, DIRECT, "an email, rendered at enqueue time")


def new_email(data):
    """The job payload for a POST's body: the mail rendered now, as it will be sent."""
    if "template" in data:
        values = validate(data, TEMPLATED, read_only=SERVER_OWNED)
        template = app.state.db.query_one("SELECT * FROM templates WHERE name = ?",
                                          (values["template"],))
        if template is None:
            raise ValidationFailed({"template": "is not the name of a template"})
        content = render(template, values["vars"])
    else:
        values = validate(data, DIRECT, read_only=SERVER_OWNED)
        content = {part: values.get(part) for part in ("subject", "text", "html")}
    return {"from": app.state.mail.mail_from, "to": values["to"],
            "reply_to": values.get("reply_to"), "template": values.get("template"), **content}


def render_email(row):
    mail = json.loads(row["payload"])
    status = EMAIL_STATUS[row["status"]]
    return {"id": row["id"], "to": mail["to"], "reply_to": mail["reply_to"],
            "subject": mail["subject"], "template": mail["template"], "status": status,
            "attempts": row["attempts"], "max_attempts": row["max_attempts"],
            "last_error": row["error"], "message_id": message_id(row, mail["from"]),
            "next_attempt_at": now_text(row["run_at"])
            if status in (EmailStatus.QUEUED, EmailStatus.RETRYING) else None,
            "created_at": now_text(row["created_at"]),
            "sent_at": now_text(row["finished_at"]) if status == EmailStatus.SENT else None,
            "updated_at": now_text(row["updated_at"])}


# =============================================================================================
# Routes
# =============================================================================================

TIME = {"type": "string", "format": "date-time"}
EMAIL_SCHEMA = {  # what render_email answers, for /openapi.json
    "type": "object",
    "required": ["id", "to", "reply_to", "subject", "template", "status", "attempts",
                 "max_attempts", "last_error", "message_id", "next_attempt_at", "created_at",
                 "sent_at", "updated_at"],
    "properties": {
        "id": {"type": "integer"}, "to": {"type": "string"},
        "reply_to": nullable({"type": "string"}), "subject": {"type": "string"},
        "template": nullable({"type": "string"}), "status": {"enum": list(EmailStatus)},
        "attempts": {"type": "integer"}, "max_attempts": {"type": "integer"},
        "last_error": nullable({"type": "string"}),
        "message_id": {"type": "string", "pattern": "^<[^<>@]+@[^<>@]*>$"},
        "next_attempt_at": nullable(TIME), "created_at": TIME, "sent_at": nullable(TIME),
        "updated_at": TIME}}
EMAIL_PAGE = {**PAGE_ANSWER, "properties": {**PAGE_ANSWER["properties"],
                                            "items": {"type": "array", "items": EMAIL_SCHEMA}}}
STATUS_FILTER = Query("status", "only emails in this state", tuple(EmailStatus))
EMAIL_ID = {"email_id": {"minimum": 1}}


def load_email(email_id):
    row = app.state.queue.db.query_one("SELECT * FROM jobs WHERE id = ? AND type = ?",
                                       (email_id, EMAIL_JOB))
    if row is None:
        raise NotFound(f"no email {email_id}")
    return row


@app.post("/emails", status=202, response_schema=EMAIL_SCHEMA,
          request_schema={"oneOf": [body_schema(DIRECT), body_schema(TEMPLATED)]},
          responses={202: "Queued; Location: /emails/{id}",
                     200: "The email this Idempotency-Key made before",
                     400: "An Idempotency-Key that is not 1–255 printable ASCII characters",
                     422: "Invalid fields, an unknown template, a value the template needs, "
                          "or an Idempotency-Key used for another email"})
def create_email(request):
    """Queue an email (optional Idempotency-Key header: the same key answers the same email)"""
    key = idempotency_key(request)
    payload = new_email(request.json_object())
    row, created = app.state.queue.enqueue(EMAIL_JOB, payload, max_attempts=app.state.max_attempts,
                                           idempotency_key=key)
    trace_event(f"email {row['id']} {'queued' if created else 'found by its Idempotency-Key'}")
    return json_response(render_email(row), 202 if created else 200,
                         {"Location": f"/emails/{row['id']}"})


@app.get("/emails", query=[*PAGE, STATUS_FILTER], response_schema=EMAIL_PAGE)
def list_emails(request):
    """List emails, newest first (filter: status)"""
    limit, cursor = list_params(request, NEWEST.shape)
    where, params = NEWEST.after(cursor) if cursor else ("1", [])
    status = STATUS_FILTER.read(request)
    statuses = JOB_STATUSES[status] if status else list(Status)
    rows = app.state.queue.db.query(
        f"SELECT * FROM jobs WHERE type = ? AND {where} AND status IN "
        f"({', '.join('?' * len(statuses))}) ORDER BY {NEWEST.order_by} LIMIT ?",
        [EMAIL_JOB, *params, *statuses, limit + 1])
    return page(rows, limit, NEWEST.cursor_values, render_email)


@app.get("/emails/{email_id:int}", path_schemas=EMAIL_ID, response_schema=EMAIL_SCHEMA,
         responses={200: "The email", 404: "No such email"})
def read_email(request, email_id):
    """An email: status, attempts, last_error, message_id, next_attempt_at"""
    return render_email(load_email(email_id))


@app.get("/health")
def health(request):
    """Liveness, where mail goes, and the send rate"""
    host, port = app.state.mail.smtp
    return {"status": "ok", "smtp": f"smtp://{host}:{port}", "catcher": app.state.catcher_running,
            "rate_per_s": app.state.rate}


add_template_routes(app)   # level04's, served here as they are: the templates an email names
add_mailbox_routes(app)    # and what the in-process catcher caught

# =============================================================================================
# Command line
# =============================================================================================


def add_max_attempts_flag(parser):
    """`--max-attempts`: here, and in notification_queue, which sends on the same terms."""
    parser.add_argument("--max-attempts", type=bounded(int, "a number of attempts (1–25)",
                                                       at_least=1, at_most=25), default=5,
                        help="attempts in all before a deferred delivery is failed (default 5)")


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_queue_flags(parser, workers_default=2, workers_min=0)
    add_max_attempts_flag(parser)
    parser.add_argument("--rate", type=bounded(float, "messages a second above 0, at most 10000",
                                               above=0, at_most=10_000), default=None,
                        help="at most this many messages a second to the SMTP server "
                             "(default: no limit)")
    add_sending_flags(parser)
    add_catcher_flags(parser, default_port="0: any free one")
    args = parser.parse_args(argv)

    db = app.state.db = app.open_database(args, SCHEMA)
    app.state.faults = Faults()
    target = args.smtp
    if args.smtp is None:
        catcher_sock = bind_catcher(args, 0)
        add_catcher(app, args, MailCatcher(db, args.catcher_max_bytes, app.state.faults),
                    catcher_sock)
        target = catcher_sock.getsockname()[:2]
    app.state.catcher_running = args.smtp is None
    app.state.mail = MailSettings(args.mail_from, target, args.smtp_timeout)
    app.state.rate = args.rate
    app.state.pacer = Pacer(args.rate)
    app.state.max_attempts = args.max_attempts
    app.state.queue = Queue(db, [EMAIL_TYPE], lease_s=args.lease_s, backoff_s=args.backoff_s,
                            backoff_max_s=args.backoff_max_s)
    pool = WorkerPool(app.state.queue, args.workers, label="sender", poll_s=args.poll_s,
                      stop_timeout=args.stop_timeout)
    app.on_listening.append(pool.start)     # after the catcher: the first sends find it up
    app.shutdown_hooks.append(pool.stop)    # hooks run in reverse: before the database closes
    app.run(args)


if __name__ == "__main__":
    main()
