"""level05/email_queue.py, black-box: emails queued (202) and sent later to the in-process catcher
or to a relay (`--smtp`), templates, idempotency keys, the Message-ID fixed at enqueue time and
sent on every attempt, 4xx and unreachable relays retried with backoff up to --max-attempts,
5xx failed at once, --rate, queued mail surviving kill -9, a resend after a crash mid-send,
and a SIGTERM that leaves nothing `sending`.

The relay of the `--smtp` tests is an independent asyncio SMTP server (`ScriptedRelay`, on
tests/level03's `SmtpSink`), not the project's catcher: it answers each message with the code it
is told and keeps every message, refused ones too, so a test can compare the attempts. Backoffs
are set short by flag.
"""
import concurrent.futures
import datetime
import email
import email.policy
import re
import smtplib
import socket
import time

import pytest
import requests

from tests.harness import expect_json, expect_problem
from tests.level03.test_password_reset import SmtpSink
from tests.level04.test_email_notifications import smtp_address

SCRIPT = "level05/email_queue.py"
TIMEOUT = 10
FAST = ("--backoff-s", "0.05", "--backoff-max-s", "0.2")
STARTED = re.compile(r"(\S+) job (\d+) email: attempt (\d+) started")
WELCOME = {"name": "welcome", "subject": "Welcome, {{ name }}",
           "text": "Hello {{ name }}, your code is {{code}}.",
           "html": "<p>Hello <b>{{ name }}</b>, your code is {{ code }}.</p>"}


# --------------------------------------------------------------------------------------------
# Helpers


def post_email(server, body=None, headers=None, **fields):
    body = {"to": "ann@example.com", "subject": "Hello", "text": "Hi Ann.", **fields} \
        if body is None else body
    return requests.post(f"{server.url}/emails", json=body, headers=headers, timeout=TIMEOUT)


def new_email(server, **fields):
    resp = post_email(server, **fields)
    mail = expect_json(resp, 202)
    assert mail["status"] == "queued" and resp.headers["Location"] == f"/emails/{mail['id']}"
    return mail


def read_email(server, email_id):
    return expect_json(requests.get(f"{server.url}/emails/{email_id}", timeout=TIMEOUT), 200)


def wait_for(server, email_id, *statuses, timeout=10.0):
    """Poll the email until its status is one of `statuses`; fail with its last state."""
    deadline = time.monotonic() + timeout
    while True:
        mail = read_email(server, email_id)
        if mail["status"] in statuses:
            return mail
        assert time.monotonic() < deadline, f"email {email_id} never got to {statuses}: {mail}"
        time.sleep(0.02)


def caught(server):
    """The catcher's mailbox, oldest first, each mail parsed."""
    listed = expect_json(requests.get(f"{server.url}/mailbox?limit=100", timeout=TIMEOUT), 200)
    return [parse(expect_json(requests.get(f"{server.url}/mailbox/{item['id']}", timeout=TIMEOUT),
                              200)["raw"].encode()) for item in reversed(listed["items"])]


def wait_for_caught(server, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(mails := caught(server)) < count:
        assert time.monotonic() < deadline, f"{len(mails)} mails caught, not {count}"
        time.sleep(0.02)
    return mails


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def arm_faults(server, count, code):
    resp = requests.post(f"{server.url}/mailbox/faults", json={"fail_next": count, "code": code},
                         timeout=TIMEOUT)
    expect_json(resp, 200)


def attempt_starts(server, email_id):
    """The times (from the log) at which each attempt of an email started, in order."""
    return [datetime.datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
            for m in STARTED.finditer(server.stderr_text()) if int(m[2]) == email_id]


class ScriptedRelay(SmtpSink):
    """password_reset's independent SMTP server (asyncio, on a thread of its own), answering
    each message with the next code of `codes` (250 once they run out). Every message is kept,
    refused or not, as (envelope lines, raw message), so a test can compare the attempts."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        super().__init__()

    async def session(self, reader, writer):
        writer.write(b"220 relay ready\r\n")
        envelope = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                data = b""
                while (piece := await reader.readline()) not in (b".\r\n", b""):
                    data += piece[1:] if piece.startswith(b".") else piece
                self.messages.append((envelope, data))
                code = self.codes.pop(0) if self.codes else 250
                writer.write(f"{code} {'ok' if code == 250 else 'not now'}\r\n".encode())
                envelope = []
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                if verb in (b"MAIL", b"RCPT"):
                    envelope.append(line.decode().strip())
                writer.write(b"250 ok\r\n")
            await writer.drain()
        await writer.drain()
        writer.close()


@pytest.fixture
def relay():
    relays = []

    def start(codes=()):
        relays.append(ScriptedRelay(codes))
        return relays[-1]

    yield start
    for started in relays:
        started.close()


@pytest.fixture
def silent_relay():
    """A port that takes connections and never says a word: a send waits there."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *FAST)


@pytest.fixture
def fresh(start_server):
    return start_server(SCRIPT, *FAST)


# --------------------------------------------------------------------------------------------
# Queueing and sending


def test_an_email_is_queued_then_sent_with_the_message_id_it_was_given(server):
    mail = new_email(server, to="bob@example.com", subject="Plain", text="Only text.")
    assert re.fullmatch(r"<[^<>@]+@example\.com>", mail["message_id"]), mail
    assert mail["attempts"] == 0 and mail["last_error"] is None
    sent = wait_for(server, mail["id"], "sent")
    assert sent["attempts"] == 1 and sent["message_id"] == mail["message_id"]
    message = next(m for m in caught(server) if m["Message-ID"] == mail["message_id"])
    assert message["To"] == "bob@example.com" and message["Subject"] == "Plain"
    assert message.get_content_type() == "text/plain"        # no html given: no html part
    assert message.get_content().strip() == "Only text."
    assert message["Date"].datetime.timestamp() == \
        pytest.approx(datetime.datetime.fromisoformat(mail["created_at"]).timestamp(), abs=1)


def test_html_makes_a_multipart_alternative(server):
    mail = new_email(server, subject="Rich", html="<p>Hi <b>Ann</b></p>")
    wait_for(server, mail["id"], "sent")
    message = next(m for m in caught(server) if m["Message-ID"] == mail["message_id"])
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("html",)).get_content().strip() == "<p>Hi <b>Ann</b></p>"


def test_a_template_is_rendered_when_the_email_is_queued(server):
    expect_json(requests.post(f"{server.url}/templates", json=WELCOME, timeout=TIMEOUT), 201)
    mail = new_email(server, body={"to": "cy@example.com", "template": "welcome",
                                   "vars": {"name": "<Cy>", "code": 7}})
    assert mail["subject"] == "Welcome, <Cy>" and mail["template"] == "welcome"
    wait_for(server, mail["id"], "sent")
    message = next(m for m in caught(server) if m["Message-ID"] == mail["message_id"])
    assert message.get_body(("html",)).get_content().strip() == \
        "<p>Hello <b>&lt;Cy&gt;</b>, your code is 7.</p>"
    problem = expect_problem(post_email(server, body={"to": "cy@example.com",
                                                      "template": "welcome"}), 422)
    assert sorted(e["field"] for e in problem["errors"]) == ["vars.code", "vars.name"]
    problem = expect_problem(post_email(server, body={"to": "cy@example.com",
                                                      "template": "nothing-here"}), 422)
    assert [e["field"] for e in problem["errors"]] == ["template"]


@pytest.mark.parametrize("fields, bad", [
    ({"subject": "Hi\r\nBcc: everyone@example.com"}, "subject"),
    ({"to": "ann@example.com\r\nBcc: everyone@example.com"}, "to"),
    ({"to": "not an address"}, "to"),
    ({"text": ""}, "text"),
    ({"status": "sent"}, "status"),
    ({"vars": {"name": "Ann"}}, "vars"),
])
def test_invalid_emails_are_a_422_and_queue_nothing(server, fields, bad):
    before = expect_json(requests.get(f"{server.url}/emails?limit=100", timeout=TIMEOUT), 200)
    problem = expect_problem(post_email(server, **fields), 422)
    assert bad in [e["field"] for e in problem["errors"]], problem
    after = expect_json(requests.get(f"{server.url}/emails?limit=100", timeout=TIMEOUT), 200)
    assert [m["id"] for m in after["items"]] == [m["id"] for m in before["items"]]


def test_an_unknown_email_is_404_and_health_says_where_mail_goes(server):
    expect_problem(requests.get(f"{server.url}/emails/999999", timeout=TIMEOUT), 404)
    health = expect_json(requests.get(f"{server.url}/health", timeout=TIMEOUT), 200)
    host, port = smtp_address(server)
    assert health == {"status": "ok", "smtp": f"smtp://{host}:{port}", "catcher": True,
                      "rate_per_s": None}


def test_the_catcher_listens_on_its_own_line_and_takes_smtplib_mail(server):
    host, port = smtp_address(server)
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as client:
        client.sendmail("x@example.com", ["y@example.com"],
                        b"Subject: by hand\r\nMessage-ID: <by-hand@example.com>\r\n\r\nhi\r\n")
    assert any(m["Message-ID"] == "<by-hand@example.com>" for m in caught(server))


def test_the_list_filters_by_status_and_pages(fresh):
    ids = [new_email(fresh, subject=f"n{n}")["id"] for n in range(3)]
    for email_id in ids:
        wait_for(fresh, email_id, "sent")
    arm_faults(fresh, 1, 550)
    refused = new_email(fresh, subject="refused")["id"]
    wait_for(fresh, refused, "failed")
    first = expect_json(requests.get(f"{fresh.url}/emails",
                                     params={"status": "sent", "limit": 2}, timeout=TIMEOUT), 200)
    assert [m["id"] for m in first["items"]] == [ids[2], ids[1]] and first["next_cursor"]
    rest = expect_json(requests.get(f"{fresh.url}/emails", params={
        "status": "sent", "limit": 2, "cursor": first["next_cursor"]}, timeout=TIMEOUT), 200)
    assert [m["id"] for m in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    failed = expect_json(requests.get(f"{fresh.url}/emails?status=failed", timeout=TIMEOUT), 200)
    assert [m["id"] for m in failed["items"]] == [refused]
    expect_problem(requests.get(f"{fresh.url}/emails?status=lost", timeout=TIMEOUT), 400)
    expect_problem(requests.get(f"{fresh.url}/emails?cursor=bogus", timeout=TIMEOUT), 400)


# --------------------------------------------------------------------------------------------
# Idempotency keys


def test_the_same_idempotency_key_answers_the_same_email(fresh):
    key = {"Idempotency-Key": "welcome-ann-1"}
    first = expect_json(post_email(fresh, headers=key), 202)
    again = post_email(fresh, headers=key)
    assert expect_json(again, 200)["id"] == first["id"]
    assert again.headers["Location"] == f"/emails/{first['id']}"
    assert again.json()["message_id"] == first["message_id"]
    expect_problem(post_email(fresh, headers=key, subject="Another"), 422)
    wait_for(fresh, first["id"], "sent")
    assert [m["Message-ID"] for m in caught(fresh)] == [first["message_id"]]
    expect_problem(post_email(fresh, headers={"Idempotency-Key": "x" * 256}), 400)


def test_concurrent_requests_with_one_key_make_one_email(fresh):
    key = {"Idempotency-Key": "concurrent"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_email(fresh, headers=key), range(8)))
    assert sorted(resp.status_code for resp in answers) == [200] * 7 + [202]
    assert len({resp.json()["id"] for resp in answers}) == 1
    wait_for(fresh, answers[0].json()["id"], "sent")
    assert len(expect_json(requests.get(f"{fresh.url}/emails", timeout=TIMEOUT), 200)["items"]) == 1
    assert len(caught(fresh)) == 1


# --------------------------------------------------------------------------------------------
# Failures: 4xx and unreachable relays retried, 5xx failed at once


def test_a_451_is_retried_after_the_backoff_and_then_sent(fresh):
    arm_faults(fresh, 2, 451)
    mail = new_email(fresh)
    sent = wait_for(fresh, mail["id"], "sent")
    assert sent["attempts"] == 3, sent
    assert sent["last_error"].startswith("MailDeferred: 451 "), sent
    assert [m["Message-ID"] for m in caught(fresh)] == [mail["message_id"]]


def test_a_550_fails_at_once_with_no_retry(fresh):
    arm_faults(fresh, 1, 550)
    mail = new_email(fresh)
    failed = wait_for(fresh, mail["id"], "failed")
    assert failed["attempts"] == 1 and failed["last_error"].startswith("MailRefused: 550 "), failed
    assert failed["next_attempt_at"] is None
    time.sleep(0.5)   # ten backoffs: a retry, if one were due, would have started
    assert read_email(fresh, mail["id"])["attempts"] == 1
    assert len(attempt_starts(fresh, mail["id"])) == 1
    assert caught(fresh) == []


def test_an_unreachable_relay_is_retried_with_a_growing_backoff_until_max_attempts(start_server):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    server = start_server(SCRIPT, "--smtp", address, "--backoff-s", "0.2", "--max-attempts", "3")
    mail = new_email(server)
    retrying = wait_for(server, mail["id"], "retrying")
    assert retrying["last_error"].startswith(f"MailDeferred: could not deliver to {address}")
    assert retrying["next_attempt_at"] is not None and retrying["max_attempts"] == 3
    failed = wait_for(server, mail["id"], "failed")
    assert failed["attempts"] == 3, failed
    starts = attempt_starts(server, mail["id"])
    assert len(starts) == 3
    first_wait, second_wait = starts[1] - starts[0], starts[2] - starts[1]
    assert 0.15 <= first_wait < second_wait, starts   # 0.2 s, then 0.4 s, each ±20 %


def test_every_attempt_sends_the_same_message_to_a_real_relay(start_server, relay):
    smtp = relay([451, 421])
    server = start_server(SCRIPT, "--smtp", f"127.0.0.1:{smtp.port}", *FAST)
    assert server.stdout_text() == "", "with --smtp no catcher runs, so no smtp:// line"
    mail = new_email(server, to="dee@example.com", subject="Thrice", html="<p>3</p>")
    sent = wait_for(server, mail["id"], "sent")
    assert sent["attempts"] == 3 and sent["last_error"].startswith("MailDeferred: 421 "), sent
    assert len(smtp.messages) == 3
    for envelope, raw in smtp.messages:
        assert [line.upper() for line in envelope] == \
            ["MAIL FROM:<NOTIFICATIONS@EXAMPLE.COM>", "RCPT TO:<DEE@EXAMPLE.COM>"]
        message = parse(raw)
        assert message["Message-ID"] == mail["message_id"]
        assert message["Subject"] == "Thrice"
        assert message.get_body(("html",)).get_content().strip() == "<p>3</p>"
    assert len({parse(raw)["Date"] for _, raw in smtp.messages}) == 1, "the Date of the enqueue"
    health = expect_json(requests.get(f"{server.url}/health", timeout=TIMEOUT), 200)
    assert health["catcher"] is False and health["smtp"] == f"smtp://127.0.0.1:{smtp.port}"


def test_a_relay_that_refuses_for_good_fails_the_email_once(start_server, relay):
    smtp = relay([554])
    server = start_server(SCRIPT, "--smtp", f"127.0.0.1:{smtp.port}", *FAST)
    failed = wait_for(server, new_email(server)["id"], "failed")
    assert failed["attempts"] == 1 and failed["last_error"] == "MailRefused: 554 not now", failed
    assert len(smtp.messages) == 1


# --------------------------------------------------------------------------------------------
# --rate


def test_rate_spaces_the_messages_sent(start_server):
    server = start_server(SCRIPT, "--rate", "5", "--workers", "4")
    started = time.monotonic()
    for n in range(10):
        new_email(server, subject=f"paced {n}")
    wait_for_caught(server, 10)
    # 10 sends 0.2 s apart: the last starts 1.8 s after the first. Without --rate, 4 workers
    # send the 10 in a fraction of that.
    assert time.monotonic() - started >= 1.6
    health = expect_json(requests.get(f"{server.url}/health", timeout=TIMEOUT), 200)
    assert health["rate_per_s"] == 5


# --------------------------------------------------------------------------------------------
# Crashes, restarts and stops


def test_mail_queued_when_the_server_is_killed_is_sent_after_a_restart(start_server):
    before = start_server(SCRIPT, "--workers", "0")
    queued = [new_email(before, subject=f"survivor {n}") for n in range(3)]
    before.kill9()
    after = start_server(SCRIPT, db=before.db_path)
    for mail in queued:
        assert wait_for(after, mail["id"], "sent")["attempts"] == 1
    assert sorted(m["Message-ID"] for m in caught(after)) == \
        sorted(mail["message_id"] for mail in queued)


def test_a_crash_mid_send_sends_again_after_the_lease_with_the_same_message_id(start_server,
                                                                                silent_relay):
    before = start_server(SCRIPT, "--smtp", silent_relay, "--smtp-timeout", "30",
                          "--lease-s", "0.5")
    mail = new_email(before)
    wait_for(before, mail["id"], "sending")
    before.kill9()       # as if it died after the relay took the mail, before recording it
    after = start_server(SCRIPT, "--lease-s", "0.5", db=before.db_path)
    sent = wait_for(after, mail["id"], "sent")
    assert sent["attempts"] == 2 and "lease expired" in sent["last_error"], sent
    assert [m["Message-ID"] for m in caught(after)] == [mail["message_id"]]


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_sigterm_leaves_nothing_sending_and_exits_0(start_server, silent_relay, transport):
    server = start_server(SCRIPT, "--smtp", silent_relay, "--smtp-timeout", "30",
                          "--stop-timeout", "0.2", "--server", transport)
    mail = new_email(server)
    wait_for(server, mail["id"], "sending")
    server.stop()        # asserts exit status 0
    assert "Traceback" not in server.stderr_text()
    after = start_server(SCRIPT, "--workers", "0", db=server.db_path)
    back = read_email(after, mail["id"])
    assert back["status"] == "queued" and back["attempts"] == 0, back


def test_the_threaded_transport_runs_the_catcher_too(start_server):
    server = start_server(SCRIPT, "--server", "threaded")
    mail = new_email(server)
    wait_for(server, mail["id"], "sent")
    assert [m["Message-ID"] for m in caught(server)] == [mail["message_id"]]
    host, port = smtp_address(server)
    server.stop()
    assert server.stdout_text() == f"listening on smtp://{host}:{port}\n"
