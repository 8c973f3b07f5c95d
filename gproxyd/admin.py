"""The admin HTTP endpoint: GET /stats (JSON), /mismatches (JSON), /metrics (Prometheus), /healthz.

It only reads: a `source()` callable returns {route name: RouteStats}, and the lifecycle's
ReloadStatus says which configuration serves and how the last reload went. /healthz
answers 200 "ok", or 503 "draining" once the daemon is stopping (`draining`), so that a
load balancer takes it out while its connections finish. /stats and /metrics
are rendered from it at most once per `max_age` (1 s) and only when asked for, in a
greenlet that lets the loop run between routes and backends, by a custom prometheus_client collector
(serving traffic never touches prometheus_client's locks). The endpoint holds at most
`max_connections` connections and gives each a deadline to send its request, so any local
user can reach it without taking descriptors or loop time from the proxy.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qs

import gevent
from gevent.event import AsyncResult
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .listener import bind
from .settings import Address
from .stats import OUTCOMES, Histogram, RouteStats

log = logging.getLogger("gproxyd.admin")

StatsSource = Callable[[], dict[str, RouteStats]]

# Prometheus histogram buckets (seconds), read off the fine-grained HDR histogram.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0)
_QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _let_the_loop_run() -> None:
    """Between two slices of a rendering: let the loop poll once and run what is ready.

    A timer, not sleep(0): the greenlets sleep(0) wakes run before the loop polls again,
    so a 26 ms rendering that yielded with sleep(0) let no relay's I/O in until it ended.
    """
    gevent.sleep(0.0001)


@dataclass
class ReloadStatus:
    """Which configuration serves and how the last reload went: the main process (single
    or arbiter) keeps it, /stats shows it as "reload" and /metrics as gproxyd_config_*.

    `generation` is 1 at start and counts successful reloads; `time` is when the
    configuration in use was loaded (start or reload); `ok` is False from a failed reload
    until one succeeds, with `error` (one line) and `failed_at` from the last failure.
    """
    config: str
    generation: int = 1
    time: float = field(default_factory=time.time)
    ok: bool = True
    error: str | None = None
    failed_at: float | None = None
    failures: int = 0  # failed reloads since start

    def succeeded(self, config: str) -> None:
        self.config = config
        self.generation += 1
        self.time = time.time()
        self.ok = True

    def failed(self, error: str) -> None:
        self.ok = False
        self.error = " ".join(error.split())  # one line, for JSON readers and log greps
        self.failed_at = time.time()
        self.failures += 1

    def document(self) -> dict:
        return {"generation": self.generation, "time": round(self.time, 3),
                "config": self.config, "ok": self.ok, "error": self.error,
                "failed_at": round(self.failed_at, 3) if self.failed_at is not None
                else None}


def stats_document(source: StatsSource, reload_status: ReloadStatus | None = None) -> dict:
    """The /stats JSON: {"routes": {name: RouteStats.snapshot()}, "version", "time"} and,
    from a daemon (with a `reload_status`), "pid" and "reload" (ReloadStatus.document()).

    `time` is when the numbers were read; `pid` is the process to signal (with workers,
    the master: it serves the endpoint). Lets the loop run after each route.
    """
    document = {"version": __version__, "time": round(time.time(), 3)}
    if reload_status is not None:
        document.update(pid=os.getpid(), reload=reload_status.document())
    document["routes"] = {}
    for name, stats in source().items():
        document["routes"][name] = stats.snapshot()
        _let_the_loop_run()
    return document


def mismatches_document(source: StatsSource, query: str = "") -> dict:
    """The /mismatches JSON: the most recent differing exchanges, newest first.

    `query`: route=NAME, shadow=ADDRESS and limit=N (default: all kept) narrow it.
    """
    asked = {key: values[-1] for key, values in parse_qs(query).items()}
    try:
        limit = int(asked.get("limit", "0"))
    except ValueError:
        raise ValueError(f"bad limit {asked['limit']!r} (expected a whole number)") from None
    samples = [sample for name, stats in source().items()
               if asked.get("route", name) == name
               for sample in stats.samples
               if asked.get("shadow", sample["shadow"]) == sample["shadow"]]
    samples.sort(key=lambda sample: sample["time"], reverse=True)
    return {"version": __version__, "time": round(time.time(), 3),
            "mismatches": samples[:limit] if limit > 0 else samples}


# (RouteStats attribute, metric name, help): one gauge, then counters, per route.
_ROUTE_METRICS = (
    ("active", "gproxyd_connections_active", "Client connections open"),
    ("total", "gproxyd_connections", "Client connections accepted"),
    ("rejected", "gproxyd_connections_rejected",
     "Client connections closed over max-connections"),
    ("parser_fallbacks", "gproxyd_parser_fallbacks",
     "Connections measured as tcp because the protocol could not be followed"),
    ("filtered", "gproxyd_shadow_filtered", "Requests kept from the shadows by shadow-filter"),
    ("archived", "gproxyd_archive_jobs", "Jobs in the beanstalkd archive now"),
    ("archived_total", "gproxyd_archive_archived", "Puts kept in the beanstalkd archive"),
    ("injected_total", "gproxyd_archive_injected", "Archived jobs moved into beanstalkd"),
    ("inject_failures", "gproxyd_archive_inject_failures",
     "Tries to move a due archived job into beanstalkd that failed (it stays archived)"),
    ("overdue_seconds", "gproxyd_archive_overdue_seconds",
     "How late the oldest due job still in the archive is"),
)
# (RecordStats attribute, metric name, help): counters per route, on routes with record.
_RECORD_METRICS = (
    ("recorded", "gproxyd_record_recorded", "Requests appended to the route's record file"),
    ("dropped", "gproxyd_record_dropped",
     "Sampled requests not recorded: the recorder's memory bound was reached"),
    ("skipped", "gproxyd_record_skipped",
     "Sampled requests not recorded: larger than 16 MiB or record-max-size, or with "
     "secrets that cannot be masked"),
    ("bytes", "gproxyd_record_bytes", "Bytes of records appended to the record file"),
    ("errors", "gproxyd_record_errors",
     "Sampled requests lost to failed writes of the record file"),
)
_GAUGES = ("active", "archived", "overdue_seconds")
_ARCHIVE = ("archived", "archived_total", "injected_total", "inject_failures",
            "overdue_seconds")  # only on routes with an archive
# (BackendStats attribute, metric name, help, shadows only): counters per route and backend.
_BACKEND_COUNTERS = (
    ("requests", "gproxyd_requests", "Requests answered (for tcp routes: connections)", False),
    ("errors", "gproxyd_errors",
     "Failed requests: connect failures, resets, 5xx, error replies", False),
    ("bytes_sent", "gproxyd_backend_sent_bytes", "Bytes written to the backend", False),
    ("bytes_received", "gproxyd_backend_received_bytes", "Bytes read from the backend", False),
    ("connect_failures", "gproxyd_connect_failures",
     "Connections to the backend that failed", False),
    ("resets", "gproxyd_resets",
     "Backend connections that broke mid-stream (reset, broken pipe) after connecting",
     False),
    ("out_of_descriptors", "gproxyd_out_of_descriptors",
     "Connections to the backend not tried: gproxyd had no file descriptor left", False),
    ("timeouts", "gproxyd_timeouts",
     "Requests never answered (shadows: by the end of shadow-linger)", False),
    ("mirrored", "gproxyd_shadow_mirrored",
     "Client connections mirrored to the shadow, one shadow connection each (shadow-sample "
     "picks them)", True),
    ("dropped", "gproxyd_shadow_dropped", "Shadow connections dropped for falling behind",
     True),
    ("compared", "gproxyd_shadow_compared",
     "Shadow answers compared with production's answer to the same request", True),
    ("mismatches", "gproxyd_shadow_mismatches", "Shadow answers that differ from production's",
     True),
    ("noise", "gproxyd_shadow_noise",
     "Shadow answers that differ from production's only where the baseline's do", True),
    ("uncompared", "gproxyd_shadow_uncompared",
     "Shadow answers that could not be paired with production's (bounds, lost framing)",
     True),
    ("turn_timeouts", "gproxyd_shadow_turn_timeouts",
     "Client turns given to a shadow that had not answered the turn before in "
     "shadow-turn-timeout", True),
)


def read_histogram(histogram: Histogram) -> tuple[list[int], list[float]]:
    """The counts at or below each of _BUCKETS and the values at _QUANTILES: what
    `count_below()` and `percentile()` return, in one pass over the filled buckets
    instead of one pass per bound and share (18 passes made a scrape cost ~10 ms a backend).
    """
    count, top = histogram.count, histogram.max
    limits = [int(bound * 1e6) + 1 for bound in _BUCKETS]
    ranks = [max(1, int(share * count + 0.5)) for share in _QUANTILES]
    below, values = [count] * len(limits), [top if count else 0.0] * len(ranks)
    bucket = quantile = seen = 0
    for index, hits in [(index, hits) for index, hits in enumerate(histogram.counts) if hits]:
        if bucket < len(limits):
            upper = histogram._upper(index)
            while bucket < len(limits) and upper > limits[bucket]:
                below[bucket] = seen
                bucket += 1
        seen += hits
        while quantile < len(ranks) and seen >= ranks[quantile]:
            values[quantile] = min(histogram._midpoint(index), top)
            quantile += 1
        if quantile == len(ranks) and bucket == len(limits):
            break
    return below, values


def config_families(status: ReloadStatus) -> list[Metric]:
    """gproxyd_config_*: the configuration in use and how the last reload went."""
    generation = GaugeMetricFamily(
        "gproxyd_config_generation",
        "Configuration generation: 1 at start, plus one per successful reload",
        value=status.generation)
    success = GaugeMetricFamily(
        "gproxyd_config_last_reload_success",
        "Whether the last reload attempt succeeded (1) or failed, the previous "
        "configuration still serving (0)", value=int(status.ok))
    loaded = GaugeMetricFamily(
        "gproxyd_config_last_reload_timestamp_seconds",
        "Unix time the configuration in use was loaded (start or successful reload)",
        value=status.time)
    failures = CounterMetricFamily(
        "gproxyd_config_reload_failures",
        "Reloads that failed and kept the running configuration", value=status.failures)
    return [generation, success, loaded, failures]


class _Collector:
    """Builds every metric family from `source()` (and the reload status, if any),
    letting the loop run after each backend and each family (generate_latest formats a
    family as it is yielded)."""

    def __init__(self, source: StatsSource, reload_status: ReloadStatus | None = None):
        self._source = source
        self._reload_status = reload_status

    def collect(self):
        if self._reload_status is not None:
            yield from config_families(self._reload_status)
        routes = [(GaugeMetricFamily if attr in _GAUGES else CounterMetricFamily)(
            name, doc, labels=["route"]) for attr, name, doc in _ROUTE_METRICS]
        counters = [CounterMetricFamily(name, doc, labels=["route", "backend"])
                    for _, name, doc, _ in _BACKEND_COUNTERS]
        latency = HistogramMetricFamily("gproxyd_request_duration_seconds",
                                        "Request latency per backend",
                                        labels=["route", "backend"])
        quantiles = Metric("gproxyd_request_latency_seconds",
                           "Request latency quantiles per backend", "summary")
        outcomes = CounterMetricFamily(
            "gproxyd_shadow_connections", "Shadow connections by how they ended",
            labels=["route", "backend", "outcome"])
        records = [CounterMetricFamily(name, doc, labels=["route"])
                   for _, name, doc in _RECORD_METRICS]
        for name, stats in self._source().items():
            for family, (attr, _, _) in zip(routes, _ROUTE_METRICS, strict=True):
                if stats.archive or attr not in _ARCHIVE:
                    family.add_metric([name], getattr(stats, attr))
            if stats.record is not None:
                for family, (attr, _, _) in zip(records, _RECORD_METRICS, strict=True):
                    family.add_metric([name], getattr(stats.record, attr))
            backends = [("production", stats.production)] + list(stats.shadows.items())
            for backend, numbers in backends:
                for family, (attr, _, _, shadow_only) in zip(counters, _BACKEND_COUNTERS,
                                                             strict=True):
                    if backend != "production" or not shadow_only:
                        family.add_metric([name, backend], getattr(numbers, attr))
                if backend != "production":
                    for outcome in OUTCOMES:
                        outcomes.add_metric([name, backend, outcome],
                                            numbers.outcomes.get(outcome, 0))
                histogram = numbers.latency
                below, values = read_histogram(histogram)
                buckets = [(str(bound), hits) for bound, hits in zip(_BUCKETS, below, strict=True)]
                buckets.append(("+Inf", histogram.count))
                latency.add_metric([name, backend], buckets, histogram.total)
                where = {"route": name, "backend": backend}
                for share, value in zip(_QUANTILES, values, strict=True):
                    quantiles.add_sample("gproxyd_request_latency_seconds",
                                         dict(where, quantile=str(share)), value)
                quantiles.add_sample("gproxyd_request_latency_seconds_count", where,
                                     histogram.count)
                quantiles.add_sample("gproxyd_request_latency_seconds_sum", where,
                                     histogram.total)
                _let_the_loop_run()
        for family in [*routes, *records, *counters, outcomes, latency, quantiles]:
            yield family
            _let_the_loop_run()


class Rendered:
    """One document (bytes), rendered at most once per `max_age` seconds and only when asked.

    A request for it gets the copy rendered last if that is younger than `max_age`; else it
    waits for a fresh one, which one greenlet of its own renders for every request waiting
    (a waiting request that goes away does not stop it). `renders` counts them.
    """

    def __init__(self, render: Callable[[], bytes], max_age: float):
        self._render, self._max_age = render, max_age
        self._body = b""
        self._taken = float("-inf")  # time.monotonic() when the copy's numbers were read
        self._pending: AsyncResult | None = None
        self._renderer: gevent.Greenlet | None = None
        self.renders = 0

    def get(self) -> bytes:
        if time.monotonic() - self._taken < self._max_age:
            return self._body
        if self._pending is None:
            self._pending = AsyncResult()
            self._renderer = gevent.spawn(self._refresh, self._pending)
        return self._pending.get()

    def _refresh(self, pending: AsyncResult) -> None:
        taken = time.monotonic()
        try:
            body = self._render()
        except Exception as error:  # the waiting requests answer 500 and log it
            pending.set_exception(error)
        else:
            self._body, self._taken = body, taken
            self.renders += 1
            pending.set(body)
        finally:
            self._pending = self._renderer = None

    def stop(self) -> None:
        if self._renderer is not None:
            self._renderer.kill(block=False)


class _Connection:
    """One admin connection: its socket, the greenlet that serves it, and since when it
    has been waiting for (the rest of) a request; None while a request is answered."""
    __slots__ = ("sock", "greenlet", "serving", "waiting_since", "requests")

    def __init__(self, sock):
        self.sock = sock
        self.greenlet: gevent.Greenlet | None = None
        self.serving = False  # the greenlet has started (and then owns the socket)
        self.waiting_since: float | None = time.monotonic()
        self.requests = 0

    def close(self) -> None:
        """Close it from another greenlet: its own closes the socket when it unwinds; one
        that has not started never runs."""
        if not self.serving:
            self.sock.close()
        self.greenlet.kill(block=False)


class _Handler(WSGIHandler):
    """pywsgi's handler with deadlines: a request must arrive complete within
    `request_timeout` of the accept (or of its first byte, on a kept-alive connection),
    and the next one must begin within `idle_timeout` of the last answer."""

    def __init__(self, sock, address, server: _Server, connection: _Connection):
        super().__init__(sock, address, server)
        self.connection = connection
        self._deadline: gevent.Timeout | None = None

    def handle(self) -> None:
        self._arm(self.server.request_timeout)
        try:
            super().handle()  # closes the socket, however it ends
        except gevent.Timeout as timeout:
            if timeout is not self._deadline:
                raise
        finally:
            self._disarm()

    def read_requestline(self) -> str:
        connection = self.connection
        if connection.requests:  # kept alive: wait idle_timeout for the next request
            connection.waiting_since = time.monotonic()
            self._arm(self.server.idle_timeout)
            if not self.rfile.peek(1):
                return ""  # the client closed
            self._arm(self.server.request_timeout)
        return super().read_requestline()

    def get_environ(self):
        # The request has been read: answering it has no deadline but the socket timeout.
        self._disarm()
        self.connection.waiting_since = None
        self.connection.requests += 1
        return super().get_environ()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = gevent.Timeout.start_new(seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None


class _Server(WSGIServer):
    """A WSGIServer that holds at most `max_connections` connections.

    A connection over the cap is still accepted (left queued, it would keep /healthz
    waiting): the connection that has waited longest for a request is closed to make room,
    or, when every one is being answered, the new one is closed at once.
    """

    def __init__(self, sock, application, max_connections: int, request_timeout: float,
                 idle_timeout: float):
        super().__init__(sock, application, spawn=Pool(), log=None, error_log=log)
        self.max_connections = max_connections
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self.max_accept = 1  # an evicted connection's socket is closed before the next accept
        self.connections: dict[object, _Connection] = {}  # by socket, in accept order
        self.evicted = 0   # waiting connections closed to make room for a new one
        self.rejected = 0  # new connections closed at once: every one was being answered
        self._last_warning = 0.0

    def do_handle(self, sock, address) -> None:
        if len(self.connections) >= self.max_connections and not self._evict():
            sock.close()
            self.rejected += 1
            self._warn()
            return
        connection = self.connections[sock] = _Connection(sock)
        connection.greenlet = self.pool.spawn(self._serve, connection, address)

    def _serve(self, connection: _Connection, address) -> None:
        sock = connection.sock
        connection.serving = True
        try:
            sock.settimeout(self.request_timeout)  # bounds each write to a slow reader
            _Handler(sock, address, self, connection).handle()
        finally:
            self.connections.pop(sock, None)
            sock.close()

    def _evict(self) -> bool:
        waiting = [connection for connection in self.connections.values()
                   if connection.waiting_since is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda connection: connection.waiting_since)
        del self.connections[oldest.sock]
        oldest.close()
        self.evicted += 1
        self._warn()
        return True

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("admin: %d connections open (the most it holds); closing the one "
                        "waiting longest for a request, or the new one if none is waiting "
                        "(%d and %d so far)", self.max_connections, self.evicted,
                        self.rejected)

    def close_waiting(self) -> None:
        """Close every connection that is not being answered (stop() waits for the rest)."""
        for connection in list(self.connections.values()):
            if connection.waiting_since is not None:
                connection.close()


class AdminServer:
    """Serves the admin endpoint on `address` until stop().

    `reload_status` (a daemon's) is shown in /stats and /metrics; `draining`, set by the
    daemon when it begins to stop, makes /healthz answer 503 "draining". It holds at most
    `max_connections` connections (see _Server), closes one that has not sent a complete
    request `request_timeout` seconds after connecting or that stays idle `idle_timeout`
    seconds between requests, and serves /stats and /metrics rendered at most `max_age`
    seconds ago.
    """

    def __init__(self, address: Address, source: StatsSource, sock=None, *,
                 reload_status: ReloadStatus | None = None, max_connections: int = 64,
                 request_timeout: float = 10.0, idle_timeout: float = 5.0,
                 max_age: float = 1.0):
        self.address = address
        self._source = source
        self.draining = False
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(source, reload_status))
        self.metrics = Rendered(lambda: generate_latest(registry), max_age)
        self.stats = Rendered(lambda: json.dumps(stats_document(source, reload_status),
                                                 indent=1).encode() + b"\n", max_age)
        self._server = _Server(sock or bind(address), self._app, max_connections,
                               request_timeout, idle_timeout)

    @property
    def connections(self) -> int:
        """How many connections the endpoint holds now."""
        return len(self._server.connections)

    @property
    def evicted(self) -> int:
        return self._server.evicted

    @property
    def rejected(self) -> int:
        return self._server.rejected

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.close()
        self._server.close_waiting()
        self._server.stop(timeout=1)
        self.metrics.stop()
        self.stats.stop()
        if self.address.family == 1:  # AF_UNIX: leave no socket file behind
            try:
                os.unlink(self.address.path)
            except OSError:
                pass

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"GET only\n")
        if path == "/stats":
            return _respond(start_response, "200 OK", self.stats.get(), "application/json")
        if path == "/mismatches":
            try:
                document = mismatches_document(self._source, environ.get("QUERY_STRING", ""))
            except ValueError as error:
                return _respond(start_response, "400 Bad Request", f"{error}\n".encode())
            body = json.dumps(document, indent=1).encode() + b"\n"
            return _respond(start_response, "200 OK", body, "application/json")
        if path == "/metrics":
            return _respond(start_response, "200 OK", self.metrics.get(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            if self.draining:
                return _respond(start_response, "503 Service Unavailable", b"draining\n")
            return _respond(start_response, "200 OK", b"ok\n")
        return _respond(start_response, "404 Not Found",
                        b"not found: try /stats, /mismatches, /metrics or /healthz\n")


def _respond(start_response, status: str, body: bytes, kind: str = "text/plain"):
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
