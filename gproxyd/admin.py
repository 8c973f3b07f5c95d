"""The admin HTTP endpoint: GET /stats (JSON), /mismatches (JSON), /metrics (Prometheus), /healthz.

It only reads: a `source()` callable returns {route name: RouteStats} at request time.
Metrics are rendered from those snapshots on each scrape by a custom prometheus_client
collector, so serving traffic never touches prometheus_client's locks.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIServer
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
from .stats import OUTCOMES, RouteStats

log = logging.getLogger("gproxyd.admin")

StatsSource = Callable[[], dict[str, RouteStats]]

# Prometheus histogram buckets (seconds), read off the fine-grained HDR histogram.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0)
_QUANTILES = (0.5, 0.9, 0.99, 0.999)


def stats_document(source: StatsSource) -> dict:
    """The /stats JSON: {"routes": {name: RouteStats.snapshot()}, "version", "time"}."""
    return {"version": __version__, "time": round(time.time(), 3),
            "routes": {name: stats.snapshot() for name, stats in source().items()}}


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
    ("timeouts", "gproxyd_timeouts",
     "Requests never answered (shadows: by the end of shadow-linger)", False),
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


class _Collector:
    def __init__(self, source: StatsSource):
        self._source = source

    def collect(self):
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
        for name, stats in self._source().items():
            for family, (attr, _, _) in zip(routes, _ROUTE_METRICS, strict=True):
                if stats.archive or attr not in _ARCHIVE:
                    family.add_metric([name], getattr(stats, attr))
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
                buckets = [(str(bound), histogram.count_below(bound)) for bound in _BUCKETS]
                buckets.append(("+Inf", histogram.count))
                latency.add_metric([name, backend], buckets, histogram.total)
                where = {"route": name, "backend": backend}
                for share in _QUANTILES:
                    quantiles.add_sample("gproxyd_request_latency_seconds",
                                         dict(where, quantile=str(share)),
                                         histogram.percentile(share))
                quantiles.add_sample("gproxyd_request_latency_seconds_count", where,
                                     histogram.count)
                quantiles.add_sample("gproxyd_request_latency_seconds_sum", where,
                                     histogram.total)
        yield from routes
        yield from counters
        yield outcomes
        yield latency
        yield quantiles


class AdminServer:
    """Serves the admin endpoint on `address` until stop()."""

    def __init__(self, address: Address, source: StatsSource, sock=None):
        self.address = address
        self._source = source
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(source))
        self._server = WSGIServer(sock or bind(address), self._app, log=None, error_log=log)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(timeout=1)
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
            body = json.dumps(stats_document(self._source), indent=1).encode() + b"\n"
            return _respond(start_response, "200 OK", body, "application/json")
        if path == "/mismatches":
            try:
                document = mismatches_document(self._source, environ.get("QUERY_STRING", ""))
            except ValueError as error:
                return _respond(start_response, "400 Bad Request", f"{error}\n".encode())
            body = json.dumps(document, indent=1).encode() + b"\n"
            return _respond(start_response, "200 OK", body, "application/json")
        if path == "/metrics":
            body = generate_latest(self._registry)
            return _respond(start_response, "200 OK", body,
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return _respond(start_response, "200 OK", b"ok\n")
        return _respond(start_response, "404 Not Found",
                        b"not found: try /stats, /mismatches, /metrics or /healthz\n")


def _respond(start_response, status: str, body: bytes, kind: str = "text/plain"):
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
