"""`--trace`: print how each request flowed through the server.

With tracing on, every request collects its events (each middleware step in and out, the
handler, every SQL statement, anything a project notes with `trace_event`) with their time
since the request arrived, and prints them as one block on stderr when the answer is sent —
one block per request, so the lines of concurrent requests never interleave:

    trace 3f9c2a1b POST /counters/visits/increment
      +0.004 ms  → request_id
      +0.011 ms    → timing
      ...
      +0.120 ms            SQL INSERT INTO counters (name, value, ...) VALUES (…, 1, …) ...
      +0.450 ms          ← handler increment_counter (0.41 ms)

The current trace lives in a context variable, so code deep below the handler (the database
layer) can add to it without being passed anything. With tracing off, `trace_event` is a cheap
no-op and nothing is recorded.

Secrets stay out: SQL is printed with its string values masked (`…`), since sqlite hands the
trace callback statements with their parameters filled in.
"""
import contextvars
import sys
import time

_current = contextvars.ContextVar("trace", default=None)


def printable(text):
    """`text` safe to write on one log line: control characters (CR, LF, ESC …) escaped. A path
    is decoded from its %-escapes, and error messages quote what a client sent, so without this
    a client could end the line and forge the next one (`/x%0d%0a… DELETE /notes/1 204`) in the
    access log or a trace. Used for both."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class Trace:
    __slots__ = ("title", "started", "lines", "depth")

    def __init__(self, title):
        self.title = printable(title)
        self.started = time.perf_counter()
        self.lines = []
        self.depth = 1

    def add(self, text):
        elapsed = (time.perf_counter() - self.started) * 1000
        self.lines.append(f"  +{elapsed:8.3f} ms  {'  ' * self.depth}{printable(text)}")

    def render(self, request_id):
        return "\n".join([f"trace {request_id} {self.title}", *self.lines]) + "\n"


def start(title):
    trace = Trace(title)
    return trace, _current.set(trace)


def finish(trace, token, request_id):
    _current.reset(token)
    sys.stderr.write(trace.render(request_id))
    sys.stderr.flush()


def trace_event(text):
    """Add a line to the current request's trace, if one is being recorded."""
    trace = _current.get()
    if trace is not None:
        trace.add(text)


def traced_step(name, step):
    """Wrap one middleware step (or the handler) so that entering and leaving it is traced."""

    def traced(request, call_next):
        trace = _current.get()
        if trace is None:
            return step(request, call_next)
        trace.add(f"→ {name}")
        trace.depth += 1
        started = time.perf_counter()
        outcome = "raised"
        try:
            response = step(request, call_next)
            outcome = str(response.status)
            return response
        except Exception as error:
            outcome = f"raised {type(error).__name__}: {error}"
            raise
        finally:
            trace.depth -= 1
            trace.add(f"← {name} {outcome} ({(time.perf_counter() - started) * 1000:.2f} ms)")

    return traced
