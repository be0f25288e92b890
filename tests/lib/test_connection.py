"""lib.connection's state machine, driven with byte literals and a fake clock: no socket.

What both transports rely on: the states move only along the table, the same bytes give the
same requests and answers however they are split, and the deadlines are the ones common.md
promises."""
import pytest

from lib import App, Response
from lib.connection import (CLOSE, MIN_BODY_RATE, NEED_DATA, TRANSITIONS, Connection, Event,
                            State)
from lib.protocol import CONTINUE, MAX_HEAD

app = App("machine", "A test application.", port=0)


@app.post("/echo", body_limit=64)
def echo(request):
    return Response(request.body, content_type="application/octet-stream")


@app.get("/health")
def health(request):
    return {"status": "ok"}


@app.get("/bye")
def bye(request):
    return Response(b"bye", headers={"CONNECTION": "Close"})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def machine(idle_timeout=15.0):
    clock = Clock()
    return Connection(app, ("127.0.0.1", 5), idle_timeout, clock=clock), clock


def run(conn, pieces):
    """Feed `pieces` one by one, answering every request as a transport would; return the
    statuses answered (as bytes of the status line) and the state at the end."""
    answers = []
    pieces = list(pieces)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(pieces.pop(0) if pieces else b"")
        elif event is CLOSE:
            return answers, conn.state
        elif isinstance(event, bytes):
            answers.append(event.split(b"\r\n", 1)[0])
        else:
            data = conn.send(app.handle(event))
            answers.append(data.split(b"\r\n", 1)[0])


GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

HEADS = {
    "pipelined": GET + POST + CHUNKED + GET,
    "ten 7 KB fields": b"GET /health HTTP/1.1\r\nHost: x\r\n"
                       + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 7000) for i in range(10)) + b"\r\n",
    "101 fields": b"GET /health HTTP/1.1\r\nHost: x\r\n"
                  + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
    "long request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "obs-fold": b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    "bare LF": b"GET /health HTTP/1.1\r\nHost: x\nX: a\r\n\r\n",
    "bare LF only": b"GET /health HTTP/1.1\nHost: x\n\n",
    "body over the limit": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n" + b"a" * 65,
    "chunked over the limit": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              + b"41\r\n" + b"a" * 65 + b"\r\n0\r\n\r\n",
    "extensions over the limit": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"1;" + b"e" * 70 + b"\r\na\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", HEADS)
def test_the_same_bytes_get_the_same_answers_however_they_are_split(name):
    data = HEADS[name]
    whole = run(machine()[0], [data])
    byte_by_byte = run(machine()[0], [data[i:i + 1] for i in range(len(data))])
    assert whole == byte_by_byte
    assert whole[0], "every case gets at least one answer"


def test_the_expected_answers():
    assert run(machine()[0], [HEADS["pipelined"]])[0] == [b"HTTP/1.1 200 OK"] * 4
    for name, status in [("ten 7 KB fields", b"431"), ("101 fields", b"431"),
                         ("long request line", b"414"), ("obs-fold", b"400"), ("bare LF", b"400"), ("bare LF only", b"400"),
                         ("body over the limit", b"413"), ("chunked over the limit", b"413"),
                         ("extensions over the limit", b"413")]:
        answers, state = run(machine()[0], [HEADS[name]])
        assert [a.split(b" ")[1] for a in answers] == [status], name
        assert state == State.CLOSED


def test_a_head_over_the_limit_is_refused_before_it_ends():
    conn, _ = machine()
    conn.receive_data(b"GET / HTTP/1.1\r\nX: " + b"v" * MAX_HEAD)
    request = conn.next_event()
    assert request.context["failure"].status == 431
    assert conn.state == State.HANDLING and conn.linger and not conn.buffer


def test_states_follow_the_table():
    conn, _ = machine()
    assert conn.state == State.IDLE
    conn.receive_data(POST[:53])
    assert conn.next_event() is NEED_DATA and conn.state == State.BODY
    conn.receive_data(POST[53:])
    request = conn.next_event()
    assert request.body == b"hello" and conn.state == State.HANDLING
    with pytest.raises(RuntimeError):
        conn.next_event()  # answer first
    conn.send(app.handle(request))
    assert conn.state == State.IDLE
    with pytest.raises(RuntimeError):
        conn.end_stream()  # no stream under way
    assert all(isinstance(state, State) and isinstance(event, Event)
               for state, event in TRANSITIONS)


def test_a_handler_asking_to_close_in_any_case_closes():
    conn, _ = machine()
    answers, state = run(conn, [b"GET /bye HTTP/1.1\r\nHost: x\r\n\r\n" + GET])
    assert answers == [b"HTTP/1.1 200 OK"] and state == State.CLOSED


def test_continue_is_sent_only_when_the_body_is_not_there_yet():
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    conn, _ = machine()
    conn.receive_data(head)
    assert conn.next_event() == CONTINUE
    assert conn.next_event() is NEED_DATA
    conn, _ = machine()
    conn.receive_data(head + b"hello")
    assert conn.next_event().body == b"hello"


def test_deadlines():
    conn, clock = machine(idle_timeout=15.0)
    assert conn.deadline == clock.now + 10.0  # the first head: 10 s
    conn.receive_data(POST[:53])
    conn.next_event()
    assert conn.deadline == clock.now + 15.0  # a body: the idle timeout between bytes …
    for _ in range(40):  # … and a byte now and then does not move it for ever
        clock.now += 1.0
        conn.receive_data(b"h")
    assert conn.deadline == 1000.0 + 15.0 + (2 + 40) / MIN_BODY_RATE
    assert conn.deadline < clock.now


def test_a_body_cut_short_closes_the_connection_without_an_answer():
    answers, state = run(machine()[0], [POST[:-2]])
    assert answers == [] and state == State.CLOSED
