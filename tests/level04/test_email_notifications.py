"""level04/email_notifications.py, black-box: templates (escaping, missing values), MIME
messages sent with smtplib, header injection, fault injection, the hand-written SMTP catcher
spoken to on the wire and by smtplib, a relay (`--smtp`), the catcher alone, both transports.

One server serves most of the module; tests that need flags start their own.
"""
import email
import email.policy
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.harness import ROOT, clean_env, expect, expect_json, expect_problem

SCRIPT = "level04/email_notifications.py"
TIMEOUT = 10
SMTP_LINE = re.compile(r"listening on smtp://(?P<host>[0-9.]+):(?P<port>[0-9]+)\n")
WELCOME = {"name": "welcome", "subject": "Welcome, {{ name }}",
           "text": "Hello {{ name }}, your code is {{code}}.",
           "html": "<p>Hello <b>{{ name }}</b>, your code is {{ code }}.</p>"}


def smtp_address(server):
    """The catcher's address, from the second stdout line (printed right after the first)."""
    deadline = time.monotonic() + 5
    while not (match := SMTP_LINE.match(server.stdout_text())):
        assert time.monotonic() < deadline, f"no smtp line: {server.stdout_text()!r}"
        time.sleep(0.02)
    return match["host"], int(match["port"])


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT)


@pytest.fixture
def fresh(start_server):
    return start_server(SCRIPT)


def post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=TIMEOUT)


def get(server, path, **params):
    return requests.get(server.url + path, params=params, timeout=TIMEOUT)


def add_template(server, **fields):
    return post(server, "/templates", {**WELCOME, **fields})


def notify(server, **fields):
    return post(server, "/notifications", {"template": "welcome", "to": "ann@example.com",
                                           "vars": {"name": "Ann", "code": "42"}, **fields})


def caught(server):
    return expect_json(get(server, "/mailbox"), 200)["items"]


def caught_mail(server, mail_id):
    return expect_json(get(server, f"/mailbox/{mail_id}"), 200)


# --------------------------------------------------------------------------------------------
# Templates


def test_template_crud_with_etag(fresh):
    resp = add_template(fresh)
    body = expect_json(resp, 201)
    assert resp.headers["Location"] == "/templates/welcome"
    assert body["subject"] == WELCOME["subject"]
    expect_problem(add_template(fresh), 409)
    read = get(fresh, "/templates/welcome")
    tag = read.headers["ETag"]
    changed = {"subject": "Hi {{ name }}", "text": "t", "html": "<p>h</p>"}
    resp = requests.put(fresh.url + "/templates/welcome", json=changed,
                        headers={"If-Match": tag}, timeout=TIMEOUT)
    assert expect_json(resp, 200)["subject"] == "Hi {{ name }}"
    expect_problem(requests.put(fresh.url + "/templates/welcome", json=changed,
                                headers={"If-Match": tag}, timeout=TIMEOUT), 412)
    assert [t["name"] for t in expect_json(get(fresh, "/templates"), 200)["items"]] == ["welcome"]
    expect(requests.delete(fresh.url + "/templates/welcome", timeout=TIMEOUT), 204)
    expect_problem(get(fresh, "/templates/welcome"), 404)
    expect_problem(requests.delete(fresh.url + "/templates/welcome", timeout=TIMEOUT), 404)


@pytest.mark.parametrize("fields, bad", [
    ({"subject": "Hi\r\nBcc: everyone@example.com"}, "subject"),
    ({"subject": "Hi\nthere"}, "subject"),
    ({"name": "no spaces"}, "name"),
    ({"html": ""}, "html"),
])
def test_invalid_templates_are_refused(server, fields, bad):
    problem = expect_problem(add_template(server, **fields), 422)
    assert bad in [e["field"] for e in problem["errors"]]


def test_preview_escapes_values_in_html_only(server):
    add_template(server, name="preview")
    body = expect_json(post(server, "/templates/preview/preview",
                            {"vars": {"name": "<script>Bob & co</script>", "code": 7}}), 200)
    assert body["html"] == ("<p>Hello <b>&lt;script&gt;Bob &amp; co&lt;/script&gt;</b>, "
                            "your code is 7.</p>")
    assert body["text"] == "Hello <script>Bob & co</script>, your code is 7."
    assert body["subject"] == "Welcome, <script>Bob & co</script>"


def test_a_missing_value_is_a_422_naming_each_one(server):
    add_template(server, name="missing")
    problem = expect_problem(post(server, "/templates/missing/preview", {"vars": {}}), 422)
    assert sorted(e["field"] for e in problem["errors"]) == ["vars.code", "vars.name"]
    expect_problem(post(server, "/templates/nothing-here/preview", {"vars": {}}), 404)


# --------------------------------------------------------------------------------------------
# Notifications


def test_notification_is_a_multipart_alternative_mail_in_the_catcher(fresh):
    add_template(fresh)
    resp = notify(fresh, vars={"name": "<Ann>", "code": "42"}, reply_to="help@example.com")
    sent = expect_json(resp, 201)
    assert sent["status"] == "sent" and "error" not in sent, sent
    assert resp.headers["Location"] == f"/notifications/{sent['id']}"
    assert expect_json(get(fresh, f"/notifications/{sent['id']}"), 200) == sent
    [summary] = caught(fresh)
    assert summary["to"] == ["ann@example.com"] and summary["subject"] == "Welcome, <Ann>"
    mail = caught_mail(fresh, summary["id"])
    message = email.message_from_string(mail["raw"], policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Message-ID"] == sent["message_id"]
    assert message["Reply-To"] == "help@example.com"
    assert message["List-Unsubscribe"].startswith("<mailto:")
    assert mail["html"].strip() == "<p>Hello <b>&lt;Ann&gt;</b>, your code is 42.</p>"
    assert mail["text"].strip() == "Hello <Ann>, your code is 42."
    assert ["To", "ann@example.com"] in mail["headers"]
    expect(requests.delete(fresh.url + "/mailbox", timeout=TIMEOUT), 204)
    assert caught(fresh) == []
    expect_problem(get(fresh, f"/mailbox/{summary['id']}"), 404)


@pytest.mark.parametrize("fields, bad", [
    ({"to": "ann@example.com\r\nBcc: everyone@example.com"}, "to"),
    ({"to": "ann@example.com\n"}, "to"),
    ({"reply_to": "x@example.com\rBcc: a@example.com"}, "reply_to"),
    ({"vars": {"name": "Ann\r\nBcc: everyone@example.com", "code": "1"}}, "vars.name"),
    ({"to": "not an address"}, "to"),
    ({"template": "no-such-template"}, "template"),
    ({"vars": {"name": "Ann"}}, "vars.code"),
])
def test_header_injection_and_bad_input_are_422_and_send_nothing(fresh, fields, bad):
    add_template(fresh)
    problem = expect_problem(notify(fresh, **fields), 422)
    assert bad in [e["field"] for e in problem["errors"]]
    assert caught(fresh) == []


def test_faults_make_notifications_fail_with_the_reply(fresh):
    add_template(fresh)
    expect_json(post(fresh, "/mailbox/faults", {"fail_next": 2, "code": 550}), 200)
    first = expect_json(notify(fresh), 201)
    assert first["status"] == "failed" and first["error"].startswith("550 ")
    assert expect_json(notify(fresh), 201)["status"] == "failed"
    assert expect_json(notify(fresh), 201)["status"] == "sent"
    expect_json(post(fresh, "/mailbox/faults", {"fail_next": 1, "code": 451}), 200)
    assert expect_json(notify(fresh), 201)["error"].startswith("451 ")
    assert len(caught(fresh)) == 1
    failed = expect_json(get(fresh, "/notifications", status="failed"), 200)["items"]
    assert [n["id"] for n in failed] == [4, 2, 1]
    assert expect_json(get(fresh, "/notifications", to="nobody@example.com"), 200)["items"] == []
    expect_problem(get(fresh, "/notifications", status="lost"), 400)
    expect_problem(post(fresh, "/mailbox/faults", {"fail_next": 1, "code": 500}), 422)


# --------------------------------------------------------------------------------------------
# The catcher on the wire


class Smtp:
    """A raw SMTP client: the wire, for pipelining and limits."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        lines = []
        while True:
            line = self.file.readline().decode()
            assert line.endswith("\r\n"), f"reply line {line!r}"
            lines.append(line[:-2])
            if line[3] == " ":
                return lines

    def code(self):
        return int(self.reply()[-1][:3])

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def smtp(server):
    client = Smtp(smtp_address(server))
    yield client
    client.close()


def test_smtplib_delivers_to_the_catcher(server):
    host, port = smtp_address(server)
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as client:
        code, features = client.ehlo("client.example")
        assert code == 250 and client.has_extn("size")
        refused = client.sendmail("a@example.com", ["b@example.com", "c@example.com"],
                                  b"Subject: by smtplib\r\n\r\n.leading dot\r\nbody\r\n")
        assert refused == {}
    mail = next(m for m in caught(server) if m["subject"] == "by smtplib")
    assert mail["from"] == "a@example.com" and mail["to"] == ["b@example.com", "c@example.com"]
    assert caught_mail(server, mail["id"])["raw"].endswith("\r\n.leading dot\r\nbody\r\n")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_delivers_to_the_catcher(server):
    """swaks, the SMTP test tool mail administrators use, unchanged: it pipelines when the
    server offers PIPELINING and checks every reply code."""
    host, port = smtp_address(server)
    done = subprocess.run(["swaks", "--server", host, "--port", str(port), "--from",
                           "ops@example.com", "--to", "dest@example.com", "--header",
                           "Subject: by swaks", "--body", "a line\n.starts with a dot\n",
                           "--timeout", "10"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
    mail = next(m for m in caught(server) if m["subject"] == "by swaks")
    assert mail["from"] == "ops@example.com" and mail["to"] == ["dest@example.com"]
    assert "\r\n.starts with a dot" in caught_mail(server, mail["id"])["raw"]


def test_pipelined_commands_dot_unstuffing_and_rset(server, smtp):
    assert smtp.greeting[0].startswith("220 ")
    smtp.send(b"EHLO me\r\nMAIL FROM:<x@example.com>\r\nRSET\r\nNOOP\r\n"
              b"MAIL FROM:<p@example.com>\r\nRCPT TO:<q@example.com>\r\nDATA\r\n")
    ehlo = smtp.reply()
    assert ehlo[0].startswith("250-") and ehlo[-1].startswith("250 ")
    assert "250-SIZE 10485760" in ehlo
    assert [smtp.code() for _ in range(6)] == [250, 250, 250, 250, 250, 354]
    smtp.send(b"Subject: pipelined\r\n\r\n..one dot\r\n.\r\nQUIT\r\n")
    assert smtp.code() == 250 and smtp.code() == 221
    mail = next(m for m in caught(server) if m["subject"] == "pipelined")
    assert mail["from"] == "p@example.com"
    assert caught_mail(server, mail["id"])["raw"].endswith("\r\n.one dot\r\n")


@pytest.mark.parametrize("commands, codes", [
    (b"MAIL FROM:<a@example.com>\r\n", [503]),            # before EHLO
    (b"HELO me\r\nRCPT TO:<a@example.com>\r\n", [250, 503]),
    (b"HELO me\r\nDATA\r\n", [250, 503]),
    (b"HELO me\r\nMAIL FROM a@example.com\r\n", [250, 501]),
    (b"EHLO\r\n", [501]),
    (b"FROB\r\n", [500]),
    (b"HELO me\r\nMAIL FROM:<a@example.com> SIZE=99999999999\r\n", [250, 552]),
    (b"NOOP " + b"x" * 1000 + b"\r\nNOOP\r\n", [500, 250]),
])
def test_bad_commands_get_their_reply_codes(smtp, commands, codes):
    smtp.send(commands)
    assert [smtp.code() for _ in codes] == codes


def test_an_overlong_line_in_data_is_500_at_the_end_and_nothing_stored(server, smtp):
    smtp.send(b"HELO me\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [smtp.code() for _ in range(4)] == [250, 250, 250, 354]
    smtp.send(b"Subject: overlong\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
    assert smtp.code() == 500
    smtp.send(b"NOOP\r\n")
    assert smtp.code() == 250, "the session goes on after the refusal"
    assert not [m for m in caught(server) if m["subject"] == "overlong"]


def test_a_message_over_the_size_limit_is_552(start_server):
    server = start_server(SCRIPT, "--catcher-max-bytes", "2048")
    client = Smtp(smtp_address(server))
    try:
        client.send(b"EHLO me\r\n")
        assert "250-SIZE 2048" in client.reply()
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [client.code() for _ in range(3)] == [250, 250, 354]
        client.send(b"Subject: big\r\n\r\n" + b"z" * 900 + b"\r\n" * 3
                    + b"\r\n".join([b"z" * 900] * 3) + b"\r\n.\r\n")
        assert client.code() == 552
    finally:
        client.close()
    assert caught(server) == []


# --------------------------------------------------------------------------------------------
# A relay (--smtp), the catcher alone, the threaded transport


def start_catcher_alone(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), "catcher", "--catcher-port", "0",
                             "--db", str(tmp_path / "relay.sqlite3")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=clean_env(),
                            cwd=tmp_path)
    line = proc.stdout.readline().decode()
    match = SMTP_LINE.fullmatch(line)
    assert match, f"catcher's stdout line: {line!r}"
    return proc, int(match["port"])


def test_smtp_relay_and_the_catcher_alone(start_server, tmp_path):
    relay, port = start_catcher_alone(tmp_path)
    try:
        server = start_server(SCRIPT, "--smtp", f"127.0.0.1:{port}")
        add_template(server)
        assert expect_json(notify(server), 201)["status"] == "sent"
        assert caught(server) == [], "with --smtp no catcher runs here"
        server.stop()
        assert "smtp://" not in server.stdout_text()
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=10) == 0
    assert relay.stdout.read() == b""
    with sqlite3.connect(tmp_path / "relay.sqlite3") as db:
        assert db.execute("SELECT rcpt_to, subject FROM mailbox").fetchall() == \
            [('["ann@example.com"]', "Welcome, Ann")]


class SmtpSink:
    """A minimal SMTP server of the test's own (not the project's catcher), on a thread: it
    takes one session and keeps the envelope and the message, dot-unstuffed."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.envelope, self.message = [], b""
        self.thread = threading.Thread(target=self.session, daemon=True)
        self.thread.start()

    def session(self):
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink ready\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    for data in lines:
                        if data == b".\r\n":
                            break
                        self.message += data[1:] if data.startswith(b".") else data
                    conn.sendall(b"250 stored\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    if verb in (b"MAIL", b"RCPT"):
                        self.envelope.append(line.decode().strip())
                    conn.sendall(b"250 ok\r\n")


def test_smtp_relay_mail_reaches_an_independent_smtp_server(start_server):
    sink = SmtpSink()
    server = start_server(SCRIPT, "--smtp", f"127.0.0.1:{sink.port}")
    add_template(server)
    assert expect_json(notify(server), 201)["status"] == "sent"
    sink.thread.join(timeout=TIMEOUT)
    sink.listener.close()
    assert [line.upper() for line in sink.envelope] == \
        ["MAIL FROM:<NOTIFICATIONS@EXAMPLE.COM>", "RCPT TO:<ANN@EXAMPLE.COM>"]
    message = email.message_from_bytes(sink.message, policy=email.policy.default)
    assert message["Subject"] == "Welcome, Ann"
    assert message.get_content_type() == "multipart/alternative"


def test_a_relay_that_does_not_answer_fails_the_notification(start_server):
    with socket.create_server(("127.0.0.1", 0)) as silent:
        server = start_server(SCRIPT, "--smtp", f"127.0.0.1:{silent.getsockname()[1]}",
                              "--smtp-timeout", "0.3")
        add_template(server)
        sent = expect_json(notify(server), 201)
    assert sent["status"] == "failed" and "no answer" in sent["error"]


def test_threaded_transport_runs_the_catcher_too(start_server):
    server = start_server(SCRIPT, "--server", "threaded")
    add_template(server)
    assert expect_json(notify(server), 201)["status"] == "sent"
    assert len(caught(server)) == 1
    host, port = smtp_address(server)
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as client:
        assert client.noop()[0] == 250
    server.stop()
    assert server.stdout_text() == f"listening on smtp://{host}:{port}\n"


@pytest.mark.parametrize("transport", ["asyncio", "threaded"])
def test_sigterm_closes_open_smtp_sessions_with_421_and_exits_0(start_server, transport):
    server = start_server(SCRIPT, "--server", transport)
    client = Smtp(smtp_address(server))
    try:
        client.send(b"HELO me\r\n")
        assert client.code() == 250
        server.stop(signal.SIGTERM, timeout=5)
        assert client.code() == 421
        assert client.file.read() == b"", "the session is closed"
    finally:
        client.close()
    assert "Traceback" not in server.stderr_text(), server.stderr_text()[-2000:]


def test_a_hostile_message_is_caught_and_readable(server, smtp):
    smtp.send(b"HELO me\r\nMAIL FROM:<h@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert [smtp.code() for _ in range(4)] == [250, 250, 250, 354]
    smtp.send(b"Subject: caf\xc3\xa9 \xff hostile\r\nFrom: =?utf-8?q?broken\r\nTo: <<<@@>, \"\r\n"
              b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nbody \xff\r\n.\r\n")
    assert smtp.code() == 250
    mail = next(m for m in caught(server) if m["from"] == "h@example.com")
    assert "hostile" in mail["subject"]
    assert "body" in caught_mail(server, mail["id"])["raw"]


def test_values_are_not_read_as_placeholders_and_must_be_text(server):
    add_template(server, name="once")
    body = expect_json(post(server, "/templates/once/preview",
                            {"vars": {"name": "{{ code }}", "code": "1"}}), 200)
    assert body["text"] == "Hello {{ code }}, your code is 1."
    problem = expect_problem(post(server, "/templates/once/preview",
                                  {"vars": {"name": "\ud800", "code": "1"}}), 422)
    assert [e["field"] for e in problem["errors"]] == ["vars"]
