"""The admin HTTP endpoint: GET /stats (JSON), /metrics (Prometheus), /healthz.

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
from .stats import RouteStats

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


class _Collector:
    def __init__(self, source: StatsSource):
        self._source = source

    def collect(self):
        labels = ["route", "backend"]
        families = {
            "requests": CounterMetricFamily(
                "gproxyd_requests", "Requests answered (for tcp routes: connections)",
                labels=labels),
            "errors": CounterMetricFamily(
                "gproxyd_errors", "Failed requests: connect failures, resets, 5xx, error replies",
                labels=labels),
            "sent": CounterMetricFamily(
                "gproxyd_backend_sent_bytes", "Bytes written to the backend", labels=labels),
            "received": CounterMetricFamily(
                "gproxyd_backend_received_bytes", "Bytes read from the backend", labels=labels),
            "connect_failures": CounterMetricFamily(
                "gproxyd_connect_failures", "Connections to the backend that failed",
                labels=labels),
            "dropped": CounterMetricFamily(
                "gproxyd_shadow_dropped", "Shadow connections dropped for falling behind",
                labels=labels),
            "mismatches": CounterMetricFamily(
                "gproxyd_shadow_mismatches", "Shadow answers that differ from production's",
                labels=labels),
            "latency": HistogramMetricFamily(
                "gproxyd_request_duration_seconds", "Request latency per backend",
                labels=labels),
            "quantiles": Metric("gproxyd_request_latency_seconds",
                                "Request latency quantiles per backend", "summary"),
        }
        active = GaugeMetricFamily("gproxyd_connections_active", "Client connections open",
                                   labels=["route"])
        total = CounterMetricFamily("gproxyd_connections", "Client connections accepted",
                                    labels=["route"])
        rejected = CounterMetricFamily("gproxyd_connections_rejected",
                                       "Client connections closed over max-connections",
                                       labels=["route"])
        fallbacks = CounterMetricFamily("gproxyd_parser_fallbacks",
                                        "Connections measured as tcp because the protocol "
                                        "could not be followed", labels=["route"])
        for name, stats in self._source().items():
            active.add_metric([name], stats.active)
            total.add_metric([name], stats.total)
            rejected.add_metric([name], stats.rejected)
            fallbacks.add_metric([name], stats.parser_fallbacks)
            backends = [("production", stats.production)] + list(stats.shadows.items())
            for backend, numbers in backends:
                key = [name, backend]
                families["requests"].add_metric(key, numbers.requests)
                families["errors"].add_metric(key, numbers.errors)
                families["sent"].add_metric(key, numbers.bytes_sent)
                families["received"].add_metric(key, numbers.bytes_received)
                families["connect_failures"].add_metric(key, numbers.connect_failures)
                if backend != "production":
                    families["dropped"].add_metric(key, numbers.dropped)
                    families["mismatches"].add_metric(key, numbers.mismatches)
                histogram = numbers.latency
                buckets = [(str(bound), histogram.count_below(bound)) for bound in _BUCKETS]
                buckets.append(("+Inf", histogram.count))
                families["latency"].add_metric(key, buckets, histogram.total)
                quantiles = families["quantiles"]
                where = {"route": name, "backend": backend}
                for share in _QUANTILES:
                    quantiles.add_sample("gproxyd_request_latency_seconds",
                                         dict(where, quantile=str(share)),
                                         histogram.percentile(share))
                quantiles.add_sample("gproxyd_request_latency_seconds_count", where,
                                     histogram.count)
                quantiles.add_sample("gproxyd_request_latency_seconds_sum", where,
                                     histogram.total)
        yield from (active, total, rejected, fallbacks)
        yield from families.values()


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
        if path == "/metrics":
            body = generate_latest(self._registry)
            return _respond(start_response, "200 OK", body,
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return _respond(start_response, "200 OK", b"ok\n")
        return _respond(start_response, "404 Not Found",
                        b"not found: try /stats, /metrics or /healthz\n")


def _respond(start_response, status: str, body: bytes, kind: str = "text/plain"):
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
