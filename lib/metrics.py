"""Prometheus metrics: what a server has done, kept as numbers and read at `GET /metrics`.

Prometheus scrapes a plain-text page every few seconds and keeps the series; the server keeps
only current totals, so a counter never resets while the process lives (a rate is the scraper's
arithmetic). The text is the exposition format 0.0.4 (prometheus.io, "Exposition formats"):

    # HELP http_requests_total Requests answered, by method, route and status.
    # TYPE http_requests_total counter
    http_requests_total{method="GET",route="/notes/{id}",status="200"} 17

`add_metrics(app)` serves that page and counts every request with the series Prometheus'
client libraries and dashboards expect. Labels are bounded on purpose: the route's pattern, not
the path (`/notes/{id}`, never `/notes/41`), and an unknown method as `other` — a label value
per client-chosen text would grow without end.
"""
import bisect
import threading
import time

from lib.problems import HTTPError
from lib.response import Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The default buckets of Prometheus' client libraries, in seconds: 5 ms … 10 s.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def number(value):
    return "+Inf" if value == float("inf") else repr(value)


def label_text(labels):
    """`{name="value",…}`, with `\\`, `"` and a newline escaped as the format says."""
    if not labels:
        return ""
    values = (str(v).replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n")
              for v in labels.values())
    return "{" + ",".join(f'{name}="{value}"' for name, value in zip(labels, values)) + "}"


class Metric:
    """One metric family: a value per combination of label values. Updates take one lock, so
    threads and the event loop may update it together."""

    kind = "untyped"

    def __init__(self, name, help, labels=()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values = {}   # label values (a tuple) → this family's value for them
        self.lock = threading.Lock()

    def render(self):
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self.lock:
            for label_values, value in sorted(self.values.items()):
                labels = dict(zip(self.labels, label_values))
                lines.extend(self.samples(labels, value))
        return lines

    def samples(self, labels, value):
        yield f"{self.name}{label_text(labels)} {number(value)}"


class Counter(Metric):
    """Only goes up: requests served, bytes sent."""

    kind = "counter"

    def inc(self, *label_values, amount=1):
        with self.lock:
            self.values[label_values] = self.values.get(label_values, 0) + amount


class Gauge(Counter):
    """Goes up and down: requests in flight, a start time."""

    kind = "gauge"

    def set(self, value, *label_values):
        with self.lock:
            self.values[label_values] = value


class Histogram(Metric):
    """How values spread: a count per bucket (`le`: less than or equal to its bound), their sum
    and their count, so a scraper can estimate any quantile over any window. Each observation
    lands in one bucket here; the page shows them cumulative, as the format wants."""

    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=BUCKETS):
        super().__init__(name, help, labels)
        self.bounds = tuple(buckets) + (float("inf"),)

    def observe(self, value, *label_values):
        with self.lock:
            counts = self.values.get(label_values)
            if counts is None:
                counts = self.values[label_values] = [0] * len(self.bounds) + [0.0]
            counts[bisect.bisect_left(self.bounds, value)] += 1
            counts[-1] += value

    def samples(self, labels, counts):
        total = 0
        for bound, count in zip(self.bounds, counts):
            total += count
            yield f"{self.name}_bucket{label_text({**labels, 'le': number(bound)})} {total}"
        yield f"{self.name}_sum{label_text(labels)} {number(counts[-1])}"
        yield f"{self.name}_count{label_text(labels)} {total}"


class Metrics(list):
    """The metric families of one server, rendered in the order they were added."""

    def add(self, metric):
        self.append(metric)
        return metric

    def render(self):
        return "\n".join(line for family in self for line in family.render()) + "\n"


def add_metrics(app):
    """Serve `GET /metrics` and count every request, those answered 404 or refused included
    (the step runs before routing). Returns the registry, for a project's own series."""
    metrics = Metrics()
    requests = metrics.add(Counter("http_requests_total", "Requests answered, by method, route "
                                   "and status.", ("method", "route", "status")))
    durations = metrics.add(Histogram("http_request_duration_seconds", "Time from the request "
                                      "read to the answer ready, in seconds.", ("method", "route")))
    in_flight = metrics.add(Gauge("http_requests_in_flight", "Requests being handled now."))
    metrics.add(Gauge("process_start_time_seconds", "When the process started, in seconds since "
                      "the Unix epoch.")).set(app.started_at)
    metrics.add(Gauge("app_info", "The server's name and version.", ("name", "version"))).set(
        1, app.name, app.version)

    def measure_request(request, call_next):
        in_flight.inc()
        started = time.perf_counter()
        status = 500
        try:
            response = call_next(request)
            status = response.status
            return response
        except HTTPError as error:  # routing's 404 / 405, the transport's 400 / 413
            status = error.status
            raise
        finally:
            in_flight.inc(amount=-1)
            method = request.method if request.method in METHODS else "other"
            route = request.route.path if request.route is not None else "unmatched"
            requests.inc(method, route, str(status))
            durations.observe(time.perf_counter() - started, method, route)

    app.use(measure_request, before_routing=True)

    @app.get("/metrics", summary="Prometheus metrics, in the text exposition format",
             public=True, media_type="text/plain")
    def read_metrics(request):
        return Response(metrics.render().encode(), 200, None, CONTENT_TYPE)

    return metrics
