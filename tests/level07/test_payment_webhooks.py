"""level07/payment_webhooks.py, black-box: Stripe-Signature verified over the raw bytes (several
v1, the tolerance both ways, rotated secrets, malformed headers, bodies that are not events, all
400 and nothing stored); acknowledged at once and processed later (on the job queue, and after a
restart); 16 concurrent deliveries of one event processed once; an older event never overwrites
a newer state, also delivered concurrently; the payment state machine and its refusals;
subscriptions; unknown types; replay; --dev test events; the generated secret; and Stripe's own
`stripe` package signing what the server must accept and reject, and checking what it signs.

Events are signed here the way Stripe signs them (HMAC-SHA256 of `{t}.{raw body}`), and each
test uses ids of its own, so one server serves the module.
"""
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import re
import sqlite3
import threading
import time
import uuid

import pytest
import requests

from tests.harness import expect, expect_json, expect_problem, run_once

SCRIPT = "level07/payment_webhooks.py"
TIMEOUT = 10
SECRET_A, SECRET_B, SECRET_C = ("whsec_" + name * 32 for name in "abc")
FAST = ["--poll-s", "0.02", "--backoff-s", "0.05"]


def unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def sign(body, secret=SECRET_A, timestamp=None):
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def event(event_type, obj, *, created=None, event_id=None):
    return {"id": event_id or unique("evt"), "object": "event", "type": event_type,
            "created": int(time.time()) if created is None else created,
            "api_version": "2024-06-20", "livemode": False, "data": {"object": obj}}


def body_of(evt):
    return json.dumps(evt, indent=2).encode()


def post(server, body, header):
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if header is not None:
        headers["Stripe-Signature"] = header
    return requests.post(server.url + "/webhooks/stripe", data=body, headers=headers,
                         timeout=TIMEOUT)


def deliver(server, evt, secret=SECRET_A):
    body = body_of(evt)
    return expect_json(post(server, body, sign(body, secret)), 200)


def read_event(server, event_id):
    return expect_json(requests.get(f"{server.url}/webhooks/events/{event_id}", timeout=TIMEOUT),
                       200)


def processed(server, event_id):
    """The event once a worker has judged it (its status leaves `received`)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = read_event(server, event_id)
        if found["status"] != "received":
            return found
        assert time.monotonic() < deadline, f"{event_id} still not processed: {found}"
        time.sleep(0.02)


def deliver_processed(server, evt):
    deliver(server, evt)
    return processed(server, evt["id"])


def read(server, path):
    return expect_json(requests.get(server.url + path, timeout=TIMEOUT), 200)


def assert_not_stored(server, event_id):
    expect_problem(requests.get(f"{server.url}/webhooks/events/{event_id}", timeout=TIMEOUT),
                   404)


@pytest.fixture(scope="module")
def server(start_server_module):
    return start_server_module(SCRIPT, *FAST, "--dev", "--webhook-secret",
                               f"{SECRET_A},{SECRET_B}", "--webhook-secret", SECRET_C)


# --------------------------------------------------------------------------------------------
# The signature


def test_a_signed_event_is_acknowledged_and_then_processed(server):
    payment = unique("pi")
    evt = event("payment_intent.succeeded", {"id": payment, "object": "payment_intent",
                                             "amount": 4200, "currency": "eur"})
    assert deliver(server, evt) == {"received": True, "id": evt["id"], "duplicate": False}
    found = processed(server, evt["id"])
    assert found["status"] == "processed" and found["event"] == evt
    state = read(server, f"/payments/{payment}")
    assert state["status"] == "paid" and state["amount"] == 4200 and state["currency"] == "eur"
    assert state["last_event"]["id"] == evt["id"]


def test_the_signature_covers_the_raw_bytes_not_the_json(server):
    evt = event("payment_intent.succeeded", {"id": unique("pi")})
    body = body_of(evt)
    header = sign(body)
    reserialised = json.dumps(json.loads(body)).encode()   # the same JSON, other bytes
    expect_problem(post(server, reserialised, header), 400)
    assert_not_stored(server, evt["id"])
    expect_json(post(server, body, header), 200)


def test_any_of_several_v1_signatures_may_match_and_only_v1_counts(server):
    evt = event("customer.created", {"id": unique("cus")})
    body, now = body_of(evt), int(time.time())
    good = sign(body, timestamp=now).split("v1=")[1]
    wrong = sign(body, "whsec_" + "x" * 32, timestamp=now).split("v1=")[1]
    for header in (f"t={now},v1={wrong}", f"t={now},v0={good}", f"t={now},v1={good.upper()}"):
        expect_problem(post(server, body, header), 400)
    assert_not_stored(server, evt["id"])
    expect_json(post(server, body, f"t={now},v1={wrong},v1={good},v0={wrong}"), 200)


@pytest.mark.parametrize("offset", [-400, 400, -100_000, 100_000])
def test_a_timestamp_beyond_the_tolerance_either_way_is_refused(server, offset):
    evt = event("customer.created", {"id": unique("cus")})
    body = body_of(evt)
    problem = expect_problem(post(server, body, sign(body, timestamp=int(time.time()) + offset)),
                             400)
    assert "either way" in problem["detail"]
    assert_not_stored(server, evt["id"])


@pytest.mark.parametrize("offset", [-250, 250])
def test_a_timestamp_within_the_tolerance_either_way_is_accepted(server, offset):
    evt = event("customer.created", {"id": unique("cus")})
    body = body_of(evt)
    expect_json(post(server, body, sign(body, timestamp=int(time.time()) + offset)), 200)


def test_a_narrower_tolerance_is_honoured(start_server):
    server = start_server(SCRIPT, "--webhook-secret", SECRET_A, "--tolerance", "30")
    evt = event("customer.created", {"id": unique("cus")})
    body = body_of(evt)
    expect_problem(post(server, body, sign(body, timestamp=int(time.time()) - 60)), 400)
    expect_json(post(server, body, sign(body, timestamp=int(time.time()) - 10)), 200)


def test_every_rotated_secret_verifies_and_no_other(server):
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        deliver(server, event("customer.created", {"id": unique("cus")}), secret)
    evt = event("customer.created", {"id": unique("cus")})
    body = body_of(evt)
    expect_problem(post(server, body, sign(body, "whsec_" + "d" * 32)), 400)
    assert_not_stored(server, evt["id"])


@pytest.mark.parametrize("header", [
    None, "", "garbage", "v1=" + "0" * 64, "t=,v1=" + "0" * 64, "t=12x,v1=" + "0" * 64,
    "t=1,t=2,v1=" + "0" * 64, "t={now}", "t={now},v1=", "t={now};v1=" + "0" * 64,
    "t={now},v1=\u00e9" + "0" * 63])
def test_a_malformed_or_missing_signature_is_400_and_nothing_is_stored(server, header):
    evt = event("customer.created", {"id": unique("cus")})
    header = None if header is None else header.format(now=int(time.time()))
    expect_problem(post(server, body_of(evt), header), 400)
    assert_not_stored(server, evt["id"])


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'"evt"', b'{"id": "evt_x1", "type": "a.b", "created": 1}',
    b'{"id": "evt_x2", "type": "a.b", "created": "1", "data": {"object": {}}}',
    b'{"id": 7, "type": "a.b", "created": 1, "data": {"object": {}}}',
    b'{"id": "evt_x3", "created": 1, "data": {"object": {}}}',
    b'{"id": "evt_x4", "type": "a.b", "created": 1, "data": {"object": []}}',
    b'\xff\xfe{}'])
def test_a_verified_body_that_is_not_an_event_is_400_and_not_stored(server, body):
    expect_problem(post(server, body, sign(body)), 400)
    for event_id in ("evt_x1", "evt_x2", "evt_x3", "evt_x4"):
        assert_not_stored(server, event_id)


# --------------------------------------------------------------------------------------------
# Acknowledged at once, processed later, once


def test_an_event_is_acknowledged_before_processing_and_processed_after_a_restart(
        start_server, tmp_path):
    db = tmp_path / "hooks.sqlite3"
    server = start_server(SCRIPT, *FAST, "--webhook-secret", SECRET_A, "--workers", "0", db=db)
    payment = unique("pi")
    evt = event("payment_intent.succeeded", {"id": payment, "amount": 100, "currency": "usd"})
    deliver(server, evt)   # nobody processes here: the answer did not wait for it
    assert read_event(server, evt["id"])["status"] == "received"
    expect_problem(requests.get(f"{server.url}/payments/{payment}", timeout=TIMEOUT), 404)
    expect_problem(requests.post(f"{server.url}/webhooks/events/{evt['id']}/replay",
                                 timeout=TIMEOUT), 409)   # still waiting: nothing to replay
    server.kill9()
    server = start_server(SCRIPT, *FAST, "--webhook-secret", SECRET_A, db=db)
    assert processed(server, evt["id"])["status"] == "processed"
    assert read(server, f"/payments/{payment}")["status"] == "paid"


def test_an_event_stored_but_never_queued_is_queued_by_a_redelivery_or_the_next_start(
        start_server, tmp_path):
    db = tmp_path / "outbox.sqlite3"
    server = start_server(SCRIPT, *FAST, "--webhook-secret", SECRET_A, "--workers", "0", db=db)
    first, second = (event("payment_intent.succeeded", {"id": unique("pi")}) for _ in range(2))
    deliver(server, first)
    deliver(server, second)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM jobs")   # as if the process had died between store and queue
    assert deliver(server, first)["duplicate"] is True   # Stripe's retry of the first …
    with contextlib.closing(sqlite3.connect(db)) as conn:
        jobs = [json.loads(payload)["event"]
                for payload, in conn.execute("SELECT payload FROM jobs")]
    assert jobs == [first["id"]]                           # … queues it again
    server.stop()
    server = start_server(SCRIPT, *FAST, "--webhook-secret", SECRET_A, db=db)   # the start: both
    for evt in (first, second):
        assert processed(server, evt["id"])["status"] == "processed"
        assert read(server, f"/payments/{evt['data']['object']['id']}")["status"] == "paid"


def test_a_processing_failure_is_recorded_and_retried_never_refusing_the_delivery(
        start_server, tmp_path):
    db = tmp_path / "failing.sqlite3"
    server = start_server(SCRIPT, "--poll-s", "0.02", "--backoff-s", "0.5",
                          "--webhook-secret", SECRET_A, db=db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:   # a fault, injected
        conn.execute("CREATE TRIGGER broken BEFORE INSERT ON payments "
                     "BEGIN SELECT RAISE(ABORT, 'the disk is on fire'); END")
    payment = unique("pi")
    evt = event("payment_intent.succeeded", {"id": payment, "amount": 100})
    deliver(server, evt)
    failed = processed(server, evt["id"])
    assert failed["status"] == "failed" and "the disk is on fire" in failed["outcome"]
    assert deliver(server, evt)["duplicate"] is True       # still 200 to a redelivery
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER broken")
    deadline = time.monotonic() + TIMEOUT
    while read_event(server, evt["id"])["status"] != "processed":
        assert time.monotonic() < deadline, "the failed processing was not retried"
        time.sleep(0.05)
    assert read(server, f"/payments/{payment}")["status"] == "paid"


def test_sixteen_concurrent_deliveries_of_one_event_are_stored_and_processed_once(server):
    payment = unique("pi")
    evt = event("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                    "amount": 1000, "amount_refunded": 300, "refunded": False})
    body = body_of(evt)
    header = sign(body)
    barrier = threading.Barrier(16)

    def one_delivery(_):
        with requests.Session() as session:
            session.get(server.url + "/health", timeout=TIMEOUT)   # connected before the race
            barrier.wait(TIMEOUT)
            return expect_json(session.post(server.url + "/webhooks/stripe", data=body, headers={
                "Stripe-Signature": header, "Content-Type": "application/json"},
                timeout=TIMEOUT), 200)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one_delivery, range(16)))
    assert sorted(answer["duplicate"] for answer in answers) == [False] + [True] * 15
    found = processed(server, evt["id"])
    assert found["deliveries"] == 16 and found["times_applied"] == 1
    assert found["status"] == "processed"
    listed = read(server, f"/webhooks/events?type=charge.refunded&limit=100")["items"]
    assert [item["id"] for item in listed].count(evt["id"]) == 1
    assert read(server, f"/payments/{payment}")["status"] == "partially_refunded"


# --------------------------------------------------------------------------------------------
# Out of order


def test_an_older_event_arriving_later_does_not_overwrite_a_newer_state(server):
    payment, order, now = unique("pi"), unique("ord"), int(time.time())
    paid = event("payment_intent.succeeded", {"id": payment, "amount": 500, "currency": "usd",
                                              "metadata": {"order_id": order}}, created=now - 10)
    refunded = event("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                         "amount": 500, "amount_refunded": 500, "refunded": True,
                                         "metadata": {"order_id": order}}, created=now)
    assert deliver_processed(server, refunded)["status"] == "processed"
    late = deliver_processed(server, paid)
    assert late["status"] == "ignored" and refunded["id"] in late["outcome"]
    for path in (f"/payments/{payment}", f"/orders/{order}"):
        state = read(server, path)
        assert state["status"] == "refunded" and state["last_event"]["id"] == refunded["id"]


def test_out_of_order_events_delivered_concurrently_end_in_the_newest_state(server):
    now, payments, deliveries = int(time.time()), [], []
    for _ in range(12):
        payment = unique("pi")
        payments.append(payment)
        deliveries += [   # newest first, each twice: duplicates and reordering together
            event("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                      "amount": 900, "amount_refunded": 900}, created=now - 1),
            event("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                      "amount": 900, "amount_refunded": 200}, created=now - 5),
            event("payment_intent.succeeded", {"id": payment, "amount": 900},
                  created=now - 9)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda evt: deliver(server, evt), deliveries * 2))
    for evt in deliveries:
        processed(server, evt["id"])
    for payment in payments:
        state = read(server, f"/payments/{payment}")
        assert (state["status"], state["amount_refunded"]) == ("refunded", 900), state


# --------------------------------------------------------------------------------------------
# The state machine, subscriptions, unknown types


def test_payments_move_along_the_state_machine_and_an_illegal_move_is_refused(server):
    payment, now = unique("pi"), int(time.time())
    steps = [("payment_intent.succeeded", {"id": payment, "amount": 1000}, "paid"),
             ("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                  "amount": 1000, "amount_refunded": 250}, "partially_refunded"),
             ("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                  "amount": 1000, "amount_refunded": 600}, "partially_refunded"),
             ("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                  "amount": 1000, "amount_refunded": 1000}, "refunded")]
    for n, (event_type, obj, status) in enumerate(steps):
        assert deliver_processed(server, event(event_type, obj, created=now - 20 + n))[
            "status"] == "processed"
        assert read(server, f"/payments/{payment}")["status"] == status
    illegal = deliver_processed(server, event("payment_intent.payment_failed", {"id": payment},
                                              created=now))
    assert illegal["status"] == "failed"
    assert "refunded → failed" in illegal["outcome"]
    state = read(server, f"/payments/{payment}")
    assert state["status"] == "refunded" and state["last_event"]["id"] != illegal["id"]


def test_a_refused_event_changes_none_of_its_objects(server):
    order, first, second, now = unique("ord"), unique("pi"), unique("pi"), int(time.time())
    checkout = event("checkout.session.completed", {
        "id": unique("cs"), "client_reference_id": order, "payment_status": "unpaid",
        "amount_total": 700, "currency": "usd"}, created=now - 10)
    assert deliver_processed(server, checkout)["status"] == "processed"
    assert read(server, f"/orders/{order}")["status"] == "pending"
    failed = event("payment_intent.payment_failed", {"id": first, "metadata": {"order_id": order}},
                   created=now - 5)
    assert deliver_processed(server, failed)["status"] == "processed"   # pending → failed
    assert read(server, f"/orders/{order}")["status"] == "failed"
    # A new payment may start paid, but its order cannot go failed → paid: neither changes.
    paid = event("payment_intent.succeeded", {"id": second, "metadata": {"order_id": order}},
                 created=now)
    refused = deliver_processed(server, paid)
    assert refused["status"] == "failed" and "failed → paid" in refused["outcome"]
    assert read(server, f"/orders/{order}")["status"] == "failed"
    expect_problem(requests.get(f"{server.url}/payments/{second}", timeout=TIMEOUT), 404)


def test_checkout_and_invoice_events_mark_orders_and_payments_paid(server):
    order, payment, other_order = unique("ord"), unique("pi"), unique("ord")
    deliver_processed(server, event("checkout.session.completed", {
        "id": unique("cs"), "client_reference_id": order, "payment_status": "paid",
        "amount_total": 1500, "currency": "usd", "payment_intent": payment}))
    state = read(server, f"/orders/{order}")
    assert (state["status"], state["amount_total"], state["payment_intent"]) == (
        "paid", 1500, payment)
    deliver_processed(server, event("checkout.session.completed", {
        "id": unique("cs"), "metadata": {"order_id": other_order}, "payment_status": "paid"}))
    assert read(server, f"/orders/{other_order}")["status"] == "paid"
    invoice_payment = unique("pi")
    deliver_processed(server, event("invoice.paid", {
        "id": unique("in"), "payment_intent": invoice_payment, "amount_paid": 990,
        "currency": "usd"}))
    state = read(server, f"/payments/{invoice_payment}")
    assert (state["status"], state["amount"]) == ("paid", 990)


def test_subscriptions_keep_stripes_status_in_event_order(server):
    sub, now = unique("sub"), int(time.time())
    for n, (event_type, status) in enumerate([("customer.subscription.created", "trialing"),
                                              ("customer.subscription.updated", "active"),
                                              ("customer.subscription.deleted", "canceled")]):
        deliver_processed(server, event(event_type, {"id": sub, "status": status,
                                                     "customer": "cus_1"}, created=now - 9 + n))
    late = event("customer.subscription.updated", {"id": sub, "status": "past_due"},
                 created=now - 20)
    assert deliver_processed(server, late)["status"] == "ignored"
    state = read(server, f"/subscriptions/{sub}")
    assert (state["status"], state["customer"]) == ("canceled", "cus_1")


def test_unknown_types_are_stored_and_ignored_and_unknown_objects_are_404(server):
    evt = event("customer.created", {"id": unique("cus")})
    found = deliver_processed(server, evt)
    assert found["status"] == "ignored" and "customer.created" in found["outcome"]
    for path in ("/payments/pi_nothing", "/orders/nothing", "/subscriptions/sub_nothing",
                 "/webhooks/events/evt_nothing"):
        expect_problem(requests.get(server.url + path, timeout=TIMEOUT), 404)


def test_objects_stripe_would_not_send_are_judged_not_retried(server):
    no_id = deliver_processed(server, event("payment_intent.succeeded", {"amount": 5}))
    assert no_id["status"] == "ignored" and "no id" in no_id["outcome"]
    payment = unique("pi")
    odd = deliver_processed(server, event("payment_intent.succeeded", {
        "id": payment, "amount": 2 ** 70, "currency": {"code": "usd"}, "customer": 7}))
    assert odd["status"] == "processed" and odd["times_applied"] == 1
    state = read(server, f"/payments/{payment}")
    assert (state["status"], state["amount"], state["currency"], state["customer"]) == (
        "paid", None, None, None)


def test_events_are_listed_newest_first_with_filters(server):
    kind = f"test.{uuid.uuid4().hex[:8]}"
    ids = [deliver_processed(server, event(kind, {"id": unique("obj")}))["id"]
           for _ in range(3)]
    first = read(server, f"/webhooks/events?type={kind}&status=ignored&limit=2")
    second = read(server, f"/webhooks/events?type={kind}&limit=2&cursor={first['next_cursor']}")
    assert [item["id"] for item in first["items"] + second["items"]] == ids[::-1]
    assert read(server, f"/webhooks/events?type={kind}&status=processed")["items"] == []
    for query in ("status=done", "limit=0", "cursor=zzz"):
        expect_problem(requests.get(f"{server.url}/webhooks/events?{query}", timeout=TIMEOUT),
                       400)


# --------------------------------------------------------------------------------------------
# Replay


def test_a_replay_processes_the_event_again_without_regressing_newer_state(server):
    payment, now = unique("pi"), int(time.time())
    paid = event("payment_intent.succeeded", {"id": payment, "amount": 300}, created=now - 5)
    deliver_processed(server, paid)
    answer = requests.post(f"{server.url}/webhooks/events/{paid['id']}/replay", timeout=TIMEOUT)
    replayed = expect_json(answer, 202)
    assert replayed["status"] == "received" and replayed["replays"] == 1
    again = processed(server, paid["id"])
    assert again["status"] == "processed" and again["times_applied"] == 2
    refund = event("charge.refunded", {"id": unique("ch"), "payment_intent": payment,
                                       "amount": 300, "amount_refunded": 300}, created=now)
    deliver_processed(server, refund)
    expect_json(requests.post(f"{server.url}/webhooks/events/{paid['id']}/replay",
                              timeout=TIMEOUT), 202)
    assert processed(server, paid["id"])["status"] == "ignored"
    assert read(server, f"/payments/{payment}")["status"] == "refunded"
    expect_problem(requests.post(f"{server.url}/webhooks/events/evt_nothing/replay",
                                 timeout=TIMEOUT), 404)


# --------------------------------------------------------------------------------------------
# --dev test events, the generated secret, flags


def test_dev_send_signs_and_delivers_a_test_event(server):
    payment = unique("pi")
    sent = expect_json(requests.post(server.url + "/dev/send", json={
        "type": "payment_intent.succeeded", "data": {"object": {"id": payment}}},
        timeout=TIMEOUT), 200)
    assert sent["delivery"]["status"] == 200
    evt = sent["event"]
    assert evt["type"] == "payment_intent.succeeded" and evt["id"].startswith("evt_")
    assert evt["data"]["object"]["amount"] > 0      # filled in
    assert processed(server, evt["id"])["event"] == evt
    assert read(server, f"/payments/{payment}")["status"] == "paid"
    expect_problem(requests.post(server.url + "/dev/send", json={"data": {}}, timeout=TIMEOUT),
                   422)


def test_dev_send_is_404_without_dev(start_server):
    server = start_server(SCRIPT, "--webhook-secret", SECRET_A)
    expect_problem(requests.post(server.url + "/dev/send", json={"type": "invoice.paid"},
                                 timeout=TIMEOUT), 404)


def test_without_a_secret_one_is_made_printed_once_and_kept(start_server, tmp_path):
    db = tmp_path / "made.sqlite3"
    server = start_server(SCRIPT, db=db)
    line = server.wait_for_stderr("webhook secret")
    secret = re.search(r"whsec_[A-Za-z0-9_-]{20,}", line).group(0)
    deliver(server, event("customer.created", {"id": unique("cus")}), secret)
    server.stop()
    server = start_server(SCRIPT, db=db)
    deliver(server, event("customer.created", {"id": unique("cus")}), secret)
    assert "webhook secret" not in server.stderr_text()


@pytest.mark.parametrize("flags", [["--tolerance", "0"], ["--tolerance", "x"],
                                   ["--webhook-secret", ""], ["--webhook-secret", "a,,b"]])
def test_bad_flags_exit_2(flags):
    result = run_once(SCRIPT, *flags, "--db", ":memory:")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# Stripe's own signature code


def stripe_header(stripe, payload, secret, timestamp=None):
    """The header as Stripe's library makes it (`generate_signature_header` since stripe 12;
    before, the same from its `_compute_signature`)."""
    signature = stripe.WebhookSignature
    if hasattr(signature, "generate_signature_header"):
        return signature.generate_signature_header(payload, secret, timestamp)
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={signature._compute_signature(f'{timestamp}.{payload}', secret)}"


def test_stripes_library_signs_what_the_server_accepts_and_checks_what_it_signs(server):
    stripe = pytest.importorskip("stripe")
    evt = event("payment_intent.succeeded", {"id": unique("pi")})
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        evt["id"] = unique("evt")
        payload = json.dumps(evt, indent=2)
        header = stripe_header(stripe, payload, secret)
        expect_json(post(server, payload.encode(), header), 200)
    stale = stripe_header(stripe, payload, SECRET_A, int(time.time()) - 301)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, stale, SECRET_A)          # Stripe refuses it …
    expect_problem(post(server, payload.encode(), stale), 400)            # … and so does this
    forged = stripe_header(stripe, payload, "whsec_" + "e" * 32)
    expect_problem(post(server, payload.encode(), forged), 400)
    # What --dev signs, Stripe's library verifies: the same scheme both ways.
    sent = expect_json(requests.post(server.url + "/dev/send", json={"type": "invoice.paid"},
                                     timeout=TIMEOUT), 200)
    body = read_event(server, sent["event"]["id"])
    raw = json.dumps(sent["event"], indent=2)
    assert json.loads(raw) == body["event"]
    constructed = stripe.Webhook.construct_event(raw, sent["stripe_signature"], SECRET_A)
    assert constructed["id"] == sent["event"]["id"]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(raw, sent["stripe_signature"], SECRET_B)
