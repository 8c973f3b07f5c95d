"""The admin HTTP endpoint: GET /stats (JSON), /mismatches (JSON), /metrics (Prometheus), /healthz.

It only reads: a `source()` callable returns {route name: RouteStats}, and the lifecycle's
ReloadStatus says which configuration serves and how the last reload went. /healthz
answers 200 "ok", or 503 "draining" once the daemon is stopping (`draining`), so that a
load balancer takes it out while its connections finish.

It shares the event loop with the relays, so it takes little of it, in small pieces:
/stats and /metrics are rendered at most once per `max_age` (1 s) and only when asked
for, in slices of ~0.1 ms between which the loop runs (the Prometheus text is written
here, not by prometheus_client: ~0.1 ms a backend), /mismatches too; answering takes at
most 0.3% of the loop's time (a LoopBudget), which clients asking faster wait for. The
endpoint holds at most `max_connections` connections and gives each a deadline to send
its request, so any local user can reach it without taking descriptors or loop time from
the proxy.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable
from urllib.parse import parse_qs, unquote

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.pool import Pool
from gevent.server import StreamServer

from . import __version__, dashboard
from .history import History
from .listener import bind
from .settings import Address
from .stats import DROP_CAUSES, OUTCOMES, Histogram, RouteStats, ShadowMemoryStats

log = logging.getLogger("gproxyd.admin")

StatsSource = Callable[[], dict[str, RouteStats]]
MemorySource = Callable[[], ShadowMemoryStats]

# Prometheus histogram buckets (seconds), read off the fine-grained HDR histogram.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0)
_QUANTILES = (0.5, 0.9, 0.99, 0.999)
# Most work a rendering does between two turns of the loop (seconds): a connection
# relayed beside it waits at most about this long for it.
_SLICE = 0.0001
# The share of the loop's time answering requests may take, and how much of it may be
# saved up for a burst (seconds): see LoopBudget. An answer takes the loop ~30-50 us
# (0.13-0.5 ms with pywsgi, before _Server; more when it comes alone, its caches cold):
# ~60 a second go on, ~100 at once, where Prometheus, gproxyctl and health checks ask a
# few times a second. Each answer delays a relay that comes meanwhile by about its length, so
# the share is what a scrape loop costs the relays' latency: 1% moved the benchmark's
# p99 (0.2 ms) by more than 2x.
_LOOP_SHARE = 0.003
_LOOP_BURST = 0.005
# The environ key under which _app notes the loop's CPU time in a request that is not its
# answer's own: waiting for a rendering, or what others did while its slices let them.
_NOT_ITS_OWN = "gproxyd.admin.not_its_own"


def _let_the_loop_run() -> None:
    """Between two slices of work: let the loop poll and run what is ready first.

    An idle watcher: the loop polls without blocking, runs every relay that is ready, and
    only then this greenlet, which so takes its turns when the relays leave it some; the
    timeout gives it one anyway every millisecond on a loop that is never idle. Not
    sleep(0): the greenlets it wakes run before the loop polls again, so a 26 ms rendering
    that yielded with sleep(0) let no relay's I/O in until it ended. Not a short sleep
    either: each one made the loop block in the kernel for a timer (~0.15 ms of CPU a turn
    on the benchmark machine).
    """
    with gevent.Timeout(0.001, False):
        gevent.idle()


def _no_tick() -> None:
    """A rendering's tick outside the admin endpoint: no slicing."""


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


class LoopBudget:
    """How much of the event loop's time answering requests may still take: `share` of
    the time going by, and at most `burst` seconds of it saved up.

    Each answer says what it took with `spend(seconds)` (the thread's CPU time: what the
    loop could not give the relays meanwhile), and the next one `wait()`s first: that
    lets the loop turn and, while more was spent than the share allows, waits until it is
    paid back, one waiting greenlet after another. So clients that ask as fast as they
    can get answers at the pace the share allows, and the loop stays the relays' for the
    rest. (Renderings are not spent from it: max_age bounds them, see Rendered.) `waits`
    counts the waits that had to be longer than a turn.
    """

    def __init__(self, share: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.share, self.burst = share, burst
        self._clock = clock
        self._left, self._at = burst, clock()
        self._turn = Semaphore()
        self.waits = 0

    def left(self) -> float:
        """Seconds of loop time the endpoint may take now (negative: what it owes)."""
        now = self._clock()
        self._left = min(self.burst, self._left + (now - self._at) * self.share)
        self._at = now
        return self._left

    def spend(self, seconds: float) -> None:
        self._left = self.left() - seconds

    def wait(self) -> None:
        with self._turn:
            owed = -self.left()
            if owed <= 0:
                _let_the_loop_run()
            while owed > 0:
                self.waits += 1
                gevent.sleep(owed / self.share)
                owed = -self.left()


class _Slicer:
    """Cuts work done in the loop into slices: `tick()`, called between small steps of
    the work, lets the loop run once `length` seconds have gone by since it last did (at
    every tick with 0). `yields` counts the times it did; `busy` is the thread's CPU time
    in the slices so far (what the loop could not give the relays), `done()` adds the last.
    """

    def __init__(self, length: float = _SLICE):
        self._length = length
        self._until = time.perf_counter() + length
        self._cpu = time.thread_time()
        self.yields = 0
        self.busy = 0.0

    def tick(self) -> None:
        if time.perf_counter() >= self._until:
            self.done()
            _let_the_loop_run()
            self.yields += 1
            self._until = time.perf_counter() + self._length
            self._cpu = time.thread_time()

    def done(self) -> None:
        now = time.thread_time()
        self.busy += now - self._cpu
        self._cpu = now


def stats_text(routes: dict[str, RouteStats], reload_status: ReloadStatus | None = None,
               tick: Callable[[], None] = _no_tick,
               shadow_memory: ShadowMemoryStats | None = None) -> bytes:
    """The /stats JSON: {"version", "time", "pid", "reload", "shadow_memory", "routes":
    {name: RouteStats.snapshot()}}, as json.dumps(indent=1) writes it; "pid" and "reload"
    (ReloadStatus.document()) only from a daemon (with a `reload_status`), "shadow_memory"
    (ShadowMemoryStats.snapshot(): shadow-memory's bytes and drops) with `shadow_memory`.

    `time` is when the numbers were read; `pid` is the process to signal (with workers,
    the master: it serves the endpoint). Calls `tick()` after each route: each route's
    text is written on its own and set in at its depth, so no step takes the whole
    document.
    """
    document = {"version": __version__, "time": round(time.time(), 3)}
    if reload_status is not None:
        document.update(pid=os.getpid(), reload=reload_status.document())
    if shadow_memory is not None:
        document["shadow_memory"] = shadow_memory.snapshot()
    document["routes"] = {}
    head = json.dumps(document, indent=1)
    parts = []
    for name, stats in list(routes.items()):
        text = json.dumps(stats.snapshot(), indent=1).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(name)}: {text}")
        tick()
    if parts:  # in place of the empty {} that ends the head
        head = head[:-len("{}\n}")] + "{\n" + ",\n".join(parts) + "\n }\n}"
    return head.encode() + b"\n"


def mismatches_text(routes: dict[str, RouteStats], query: str = "",
                    tick: Callable[[], None] = _no_tick) -> bytes:
    """The /mismatches JSON: {"version", "time", "mismatches": [the most recent differing
    exchanges, newest first]}, as json.dumps(indent=1) writes it.

    `query`: route=NAME, shadow=ADDRESS and limit=N (default: all kept) narrow it; a bad
    limit raises ValueError. Calls `tick()` after each exchange (bodies make them large).
    """
    asked = {key: values[-1] for key, values in parse_qs(query).items()}
    try:
        limit = int(asked.get("limit", "0"))
    except ValueError:
        raise ValueError(f"bad limit {asked['limit']!r} (expected a whole number)") from None
    samples = [sample for name, stats in list(routes.items())
               if asked.get("route", name) == name
               for sample in list(stats.samples)
               if asked.get("shadow", sample["shadow"]) == sample["shadow"]]
    samples.sort(key=lambda sample: sample["time"], reverse=True)
    head = json.dumps({"version": __version__, "time": round(time.time(), 3),
                       "mismatches": []}, indent=1)
    parts = []
    for sample in samples[:limit] if limit > 0 else samples:
        parts.append("  " + json.dumps(sample, indent=1).replace("\n", "\n  "))
        tick()
    if parts:  # in place of the empty [] that ends the head
        head = head[:-len("[]\n}")] + "[\n" + ",\n".join(parts) + "\n ]\n}"
    return head.encode() + b"\n"


# (RouteStats attribute, metric name, help): one gauge, then counters, per route.
_ROUTE_METRICS = (
    ("active", "gproxyd_connections_active", "Client connections open"),
    ("total", "gproxyd_connections", "Client connections accepted"),
    ("rejected", "gproxyd_connections_rejected",
     "Client connections closed over max-connections"),
    ("refused", "gproxyd_connections_refused",
     "Client connections closed before production: no valid PROXY header (accept-proxy), "
     "or an original destination that is gproxyd itself"),
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
    `count_below()` and `percentile()` return, from running sums over the bucket counts
    (C loops: ~30 µs a histogram where a Python pass over its filled buckets took ~0.3 ms).
    """
    count, top = histogram.count, histogram.max
    running = list(accumulate(histogram.counts))
    below = [running[end - 1] if end else 0 for end in _BUCKET_ENDS]
    if not count:
        return below, [0.0] * len(_QUANTILES)
    values = []
    for share in _QUANTILES:
        index = bisect_left(running, max(1, int(share * count + 0.5)))
        values.append(min(histogram._midpoint(index), top) if index < len(running) else top)
    return below, values


def _bucket_ends() -> tuple[int, ...]:
    """For each of _BUCKETS, how many of the histogram's buckets lie at or below it (what
    count_below() adds up): the first bucket whose upper end passes the bound ends it."""
    histogram = Histogram()
    uppers = [histogram._upper(index) for index in range(len(histogram.counts))]
    return tuple(bisect_right(uppers, int(bound * 1e6) + 1) for bound in _BUCKETS)


_BUCKET_ENDS = _bucket_ends()


# --- /metrics: the Prometheus text format (version 0.0.4), written here ----------------------

def _number(value: float) -> str:
    """A sample value as Prometheus' Go clients write it (and prometheus_client does)."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go uses an exponent from 1e+06 up, Python from 1e+16
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _head(name: str, doc: str, kind: str) -> str:
    """A family's HELP and TYPE lines; a counter's samples and family are NAME_total."""
    if kind == "counter":
        name += "_total"
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


_LE = tuple(str(bound) for bound in _BUCKETS)


def metrics_text(routes: dict[str, RouteStats], reload_status: ReloadStatus | None = None,
                 tick: Callable[[], None] = _no_tick,
                 shadow_memory: ShadowMemoryStats | None = None) -> bytes:
    """The /metrics text: gproxyd_config_* (with a `reload_status`), gproxyd_shadow_memory_*
    and gproxyd_shadow_send_buffer_bytes (with `shadow_memory`), then per route and per
    backend the families of _ROUTE_METRICS, _RECORD_METRICS, _BACKEND_COUNTERS,
    gproxyd_shadow_drops, gproxyd_shadow_connections, the
    gproxyd_request_duration_seconds histogram and the
    gproxyd_request_latency_seconds summary, and gproxyd_tls_handshake_failures by
    route and side where routes use TLS; the same text prometheus_client's
    generate_latest() writes for those families (labels in name order). Calls `tick()`
    after each backend (~0.1 ms of work each).
    """
    routed = [[] for _ in _ROUTE_METRICS]
    recorded = [[] for _ in _RECORD_METRICS]
    counted = [[] for _ in _BACKEND_COUNTERS]
    drops: list[str] = []
    outcomes: list[str] = []
    latency: list[str] = []
    quantiles: list[str] = []
    handshakes: list[str] = []
    for name, stats in list(routes.items()):
        route = f'route="{_label(name)}"'
        for lines, (attr, metric, _) in zip(routed, _ROUTE_METRICS, strict=True):
            if stats.archive or attr not in _ARCHIVE:
                sample = metric if attr in _GAUGES else f"{metric}_total"
                lines.append(f"{sample}{{{route}}} {_number(getattr(stats, attr))}\n")
        if stats.record is not None:
            for lines, (attr, metric, _) in zip(recorded, _RECORD_METRICS, strict=True):
                lines.append(
                    f"{metric}_total{{{route}}} {_number(getattr(stats.record, attr))}\n")
        for backend, numbers in [("production", stats.production), *stats.shadows.items()]:
            named = f'backend="{_label(backend)}"'
            labels = f"{named},{route}"
            for lines, (attr, metric, _, shadow_only) in zip(counted, _BACKEND_COUNTERS,
                                                             strict=True):
                if backend != "production" or not shadow_only:
                    lines.append(
                        f"{metric}_total{{{labels}}} {_number(getattr(numbers, attr))}\n")
            if backend != "production":
                drops.extend(
                    f'gproxyd_shadow_drops_total{{{named},cause="{cause}",{route}}} '
                    f"{_number(numbers.drops.get(cause, 0))}\n" for cause in DROP_CAUSES)
                outcomes.extend(
                    f'gproxyd_shadow_connections_total{{{named},outcome="{outcome}",{route}}} '
                    f"{_number(numbers.outcomes.get(outcome, 0))}\n" for outcome in OUTCOMES)
            histogram = numbers.latency
            below, values = read_histogram(histogram)
            count, total = _number(histogram.count), _number(histogram.total)
            latency.extend(f'gproxyd_request_duration_seconds_bucket{{{named},le="{le}",'
                           f"{route}}} {_number(hits)}\n"
                           for le, hits in zip(_LE, below, strict=True))
            latency.append(f'gproxyd_request_duration_seconds_bucket{{{named},le="+Inf",'
                           f"{route}}} {count}\n")
            latency.append(f"gproxyd_request_duration_seconds_count{{{labels}}} {count}\n")
            latency.append(f"gproxyd_request_duration_seconds_sum{{{labels}}} {total}\n")
            quantiles.extend(f'gproxyd_request_latency_seconds{{{named},quantile="{share}",'
                             f"{route}}} {_number(value)}\n"
                             for share, value in zip(_QUANTILES, values, strict=True))
            quantiles.append(f"gproxyd_request_latency_seconds_count{{{labels}}} {count}\n")
            quantiles.append(f"gproxyd_request_latency_seconds_sum{{{labels}}} {total}\n")
            tick()
        handshakes.extend(f'gproxyd_tls_handshake_failures_total{{{route},side="{side}"}} '
                          f"{_number(count)}\n"
                          for side, count in sorted(stats.tls_handshake_failures.items()))
    parts = _config_lines(reload_status) if reload_status is not None else []
    if shadow_memory is not None:
        parts += _shadow_memory_lines(shadow_memory)
    for (attr, metric, doc), lines in zip(_ROUTE_METRICS, routed, strict=True):
        parts += [_head(metric, doc, "gauge" if attr in _GAUGES else "counter"), *lines]
    for (_, metric, doc), lines in zip(_RECORD_METRICS, recorded, strict=True):
        parts += [_head(metric, doc, "counter"), *lines]
    for (_, metric, doc, _), lines in zip(_BACKEND_COUNTERS, counted, strict=True):
        parts += [_head(metric, doc, "counter"), *lines]
    parts += [_head("gproxyd_shadow_drops", _SHADOW_DROPS, "counter"), *drops,
              _head("gproxyd_shadow_connections", "Shadow connections by how they ended",
                    "counter"), *outcomes,
              _head("gproxyd_request_duration_seconds", "Request latency per backend",
                    "histogram"), *latency,
              _head("gproxyd_request_latency_seconds",
                    "Request latency quantiles per backend", "summary"), *quantiles]
    if handshakes:  # routes with TLS options only (tls.py)
        parts += [_head("gproxyd_tls_handshake_failures", _TLS_HANDSHAKE_FAILURES, "counter"),
                  *handshakes]
    return "".join(parts).encode()


_TLS_HANDSHAKE_FAILURES = ("TLS handshakes that failed (a timeout, a verification failure, no "
                           "shared protocol), by side: client (tls-cert), production "
                           "(production-tls) or shadow (shadow-tls)")
_SHADOW_DROPS = ("Shadow connections whose waiting bytes were let go, by cause: dropped "
                 "past shadow-buffer (over-buffer), as the furthest behind when "
                 "shadow-memory was full (over-budget), past shadow-max-connections, or "
                 "ended first with bytes waiting (shadow-failed)")


def _shadow_memory_lines(memory: ShadowMemoryStats) -> list[str]:
    """gproxyd_shadow_memory_* and gproxyd_shadow_send_buffer_bytes: shadow-memory, the
    process-wide budget for bytes waiting to be written to shadows (summed over workers)."""
    lines = []
    for metric, doc, value in (
            ("gproxyd_shadow_memory_limit_bytes",
             "shadow-memory: most bytes held for shadows at once (summed over workers)",
             memory.limit),
            ("gproxyd_shadow_memory_queued_bytes",
             "Bytes waiting to be written to shadows now", memory.queued),
            ("gproxyd_shadow_memory_high_water_bytes",
             "Most bytes waiting to be written to shadows at once since start",
             memory.high_water),
            ("gproxyd_shadow_send_buffer_bytes",
             "Kernel send buffers of the open shadow sockets (their sizes as set)",
             memory.send_buffers)):
        lines += [_head(metric, doc, "gauge"), f"{metric} {_number(value)}\n"]
    for metric, doc, counts in (
            ("gproxyd_shadow_memory_drops",
             "Shadow connections whose waiting bytes were let go, by cause "
             "(all routes)", memory.drops),
            ("gproxyd_shadow_memory_dropped_bytes",
             "Bytes waiting for shadows that were let go unwritten, by cause",
             memory.dropped_bytes)):
        lines.append(_head(metric, doc, "counter"))
        lines += [f'{metric}_total{{cause="{cause}"}} {_number(counts.get(cause, 0))}\n'
                  for cause in DROP_CAUSES]
    return lines


def _config_lines(status: ReloadStatus) -> list[str]:
    """gproxyd_config_*: the configuration in use and how the last reload went."""
    return [
        _head("gproxyd_config_generation",
              "Configuration generation: 1 at start, plus one per successful reload",
              "gauge"),
        f"gproxyd_config_generation {_number(status.generation)}\n",
        _head("gproxyd_config_last_reload_success",
              "Whether the last reload attempt succeeded (1) or failed, the previous "
              "configuration still serving (0)", "gauge"),
        f"gproxyd_config_last_reload_success {_number(int(status.ok))}\n",
        _head("gproxyd_config_last_reload_timestamp_seconds",
              "Unix time the configuration in use was loaded (start or successful reload)",
              "gauge"),
        f"gproxyd_config_last_reload_timestamp_seconds {_number(status.time)}\n",
        _head("gproxyd_config_reload_failures",
              "Reloads that failed and kept the running configuration", "counter"),
        f"gproxyd_config_reload_failures_total {_number(status.failures)}\n"]


class Rendered:
    """One document (bytes), rendered at most once per `max_age` seconds and only when asked.

    A request for it gets the copy rendered last if that is younger than `max_age`; else it
    waits for a fresh one, which one greenlet of its own renders for every request waiting
    (a waiting request that goes away does not stop it). `render(tick)` writes it, calling
    `tick()` between small steps of the work, which cuts it into slices of ~_SLICE seconds
    (see _Slicer). `renders` counts them.
    """

    def __init__(self, render: Callable[[Callable[[], None]], bytes], max_age: float):
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
            body = self._render(_Slicer().tick)
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


class _BadRequest(Exception):
    """A request the endpoint does not take; args: (status, reason)."""


# The request headers the endpoint reads (the rest are skipped), as environ keys.
_WANTED = {b"authorization": "HTTP_AUTHORIZATION", b"cookie": "HTTP_COOKIE",
           b"connection": "HTTP_CONNECTION", b"content-length": "CONTENT_LENGTH",
           b"transfer-encoding": "HTTP_TRANSFER_ENCODING"}
_MOST_HEAD = 16 * 1024  # a request's line and headers; the endpoint's are a few hundred bytes


def _parse(head: bytes, peer) -> dict:
    """The WSGI environ of the request whose line and headers are `head` (without the
    blank line): what the endpoint and the dashboard read of it. Raises _BadRequest."""
    line, *fields = head.split(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("400 Bad Request", "expected a request line: GET /path HTTP/1.1")
    method, target, version = (part.decode("latin-1") for part in parts)
    if target.startswith(("http://", "https://")):  # absolute form: keep the path
        target = "/" + target.split("/", 3)[3] if target.count("/") > 2 else "/"
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path, encoding="latin-1"),
               "QUERY_STRING": query, "SERVER_PROTOCOL": version,
               "REMOTE_ADDR": peer[0] if isinstance(peer, tuple) and peer else ""}
    for field_line in fields:
        name, colon, value = field_line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _BadRequest("400 Bad Request", "expected header lines: Name: value")
        key = _WANTED.get(name.lower())
        if key is not None:
            environ[key] = value.strip().decode("latin-1")
    return environ


def _call(application, environ: dict) -> tuple[str, list, bytes]:
    """`application`'s answer to `environ`: (status, headers, body); an exception it raises
    is logged and answered 500."""
    answer = []

    def start_response(status, headers, exc_info=None):
        answer[:] = [status, headers]

    try:
        body = b"".join(application(environ, start_response))
    except Exception:
        log.exception("admin: answering %s %s failed", environ["REQUEST_METHOD"],
                      environ["PATH_INFO"])
        return ("500 Internal Server Error", [("Content-Type", "text/plain")],
                b"internal error: see gproxyd's log\n")
    return answer[0], answer[1], body


def _keeps_alive(environ: dict) -> bool:
    """Whether the client keeps the connection for another request (HTTP/1.1 unless it
    says close; 1.0 only if it asks), and sent no body (none is read: the endpoint takes
    none, and its end would not be known)."""
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or \
            "HTTP_TRANSFER_ENCODING" in environ:
        return False
    asked = environ.get("HTTP_CONNECTION", "").lower()
    if environ["SERVER_PROTOCOL"] == "HTTP/1.0":
        return "keep-alive" in asked
    return "close" not in asked


@dataclass
class _Deadlines:
    request: gevent.Timeout  # request_timeout: a request arrives complete
    idle: gevent.Timeout     # idle_timeout: a kept-alive client's next request begins


class _Server(StreamServer):
    """The admin endpoint's HTTP/1.1 server: a WSGI `application` answers each request.

    Written here rather than taken from gevent.pywsgi because each answer is a turn of the
    loop the relays wait for: pywsgi's took 0.13-0.5 ms (parsing headers through
    email.feedparser, the head and the body written apart), this one's ~30 us. It reads
    only GET-sized requests (a head of at most 16 KiB, no body kept) and answers with a
    Content-Length, in one write.

    Each request must arrive complete within `request_timeout` of the accept (or of its
    first byte, on a kept-alive connection), and the next one must begin within
    `idle_timeout` of the last answer. Every request waits its turn in `budget`, which is
    charged the loop's CPU time its answer took.

    It holds at most `max_connections` connections. A connection over the cap is still
    accepted (left queued, it would keep /healthz waiting): the connection that has waited
    longest for a request is closed to make room, or, when every one is being answered,
    the new one is closed at once.
    """

    def __init__(self, sock, application, max_connections: int, request_timeout: float,
                 idle_timeout: float, budget: LoopBudget):
        # do_handle (below) takes each accepted socket: the handle StreamServer asks for
        # is never called.
        super().__init__(sock, handle=self.do_handle, spawn=Pool())
        self.application = application
        self.budget = budget
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

    def _serve(self, connection: _Connection, peer) -> None:
        sock = connection.sock
        connection.serving = True
        # A deadline for each kind of wait (a timer's length is fixed when it is made).
        deadlines = _Deadlines(gevent.Timeout(self.request_timeout),
                               gevent.Timeout(self.idle_timeout))
        deadlines.request.start()
        try:
            sock.settimeout(self.request_timeout)  # bounds each write to a slow reader
            if sock.family != socket.AF_UNIX:
                # The answer is one write; without this, a kept-alive client's next answer
                # could wait for the delayed ACK of the last (~40 ms).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._answer_requests(connection, peer, deadlines)
        except gevent.Timeout as timeout:
            if timeout is not deadlines.request and timeout is not deadlines.idle:
                raise
        except OSError:
            pass  # the client reset or went away: nothing to answer
        finally:
            deadlines.request.close()
            deadlines.idle.close()
            self.connections.pop(sock, None)
            sock.close()

    def _answer_requests(self, connection: _Connection, peer, deadlines: _Deadlines) -> None:
        sock, budget = connection.sock, self.budget
        pending = b""
        cpu = time.thread_time()  # since when the loop's CPU time is this connection's
        while True:
            end = pending.find(b"\r\n\r\n")
            while end < 0 and len(pending) <= _MOST_HEAD:
                budget.spend(time.thread_time() - cpu)  # recv may wait: others run then
                data = sock.recv(65536)
                cpu = time.thread_time()
                if not data:
                    return
                if not pending and connection.requests:  # a kept-alive client's next one
                    deadlines.idle.cancel()
                    deadlines.request.start()  # complete within request_timeout
                pending += data
                end = pending.find(b"\r\n\r\n", max(0, len(pending) - len(data) - 3))
            if end < 0 or end > _MOST_HEAD:
                self._refuse(sock, "431 Request Header Fields Too Large",
                             f"a request head is at most {_MOST_HEAD} bytes")
                return
            head, pending = pending[:end], pending[end + 4:]
            deadlines.request.cancel()
            deadlines.idle.cancel()
            connection.waiting_since = None
            connection.requests += 1
            try:
                environ = _parse(head, peer)
            except _BadRequest as error:
                self._refuse(sock, *error.args)
                return
            # Every request waits its turn, after reading it (one that waits is being
            # answered, not idle): a client that asks again as soon as it has its answer
            # would otherwise find its next request already read, and be answered for as
            # long as it asks, the relays waiting.
            budget.spend(time.thread_time() - cpu)
            budget.wait()
            cpu = time.thread_time()
            status, headers, body = _call(self.application, environ)
            alive = _keeps_alive(environ)
            lines = [f"HTTP/1.1 {status}\r\n"]
            lines += [f"{name}: {value}\r\n" for name, value in headers]
            if not any(name.lower() == "content-length" for name, _ in headers):
                lines.append(f"Content-Length: {len(body)}\r\n")
            lines.append("\r\n" if alive else "Connection: close\r\n\r\n")
            answer = "".join(lines).encode("latin-1")
            sock.sendall(answer if environ["REQUEST_METHOD"] == "HEAD" else answer + body)
            budget.spend(time.thread_time() - cpu - environ.get(_NOT_ITS_OWN, 0.0))
            cpu = time.thread_time()
            if not alive:
                return
            connection.waiting_since = time.monotonic()
            if pending:  # pipelined: the next request has begun
                deadlines.request.start()
            else:
                deadlines.idle.start()  # its next request must begin within idle_timeout

    @staticmethod
    def _refuse(sock, status: str, reason: str) -> None:
        body = f"{reason}\n".encode()
        sock.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

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
    seconds ago, rendered in slices of ~_SLICE seconds of the loop's time. Reading and
    answering requests take at most `loop_share` of the loop's time, `loop_burst` seconds
    of it at once (see LoopBudget), so that a scrape loop slows itself, not the relays.

    In front of it all is the dashboard (dashboard.middleware): GET / (the page),
    /stats/history (from `history`, a History the caller samples; None: 404), and the
    check of who may ask, `access()` giving admin-allow's networks and admin-token's
    token (loopback clients only, without it). `shadow_memory()` (shadow-memory's numbers,
    ShadowMemoryStats) adds "shadow_memory" to /stats and gproxyd_shadow_memory_* to
    /metrics.
    """

    def __init__(self, address: Address, source: StatsSource, sock=None, *,
                 reload_status: ReloadStatus | None = None,
                 history: History | None = None,
                 access: Callable[[], tuple] = lambda: ((), ""),
                 shadow_memory: MemorySource | None = None,
                 max_connections: int = 64,
                 request_timeout: float = 10.0, idle_timeout: float = 5.0,
                 max_age: float = 1.0, loop_share: float = _LOOP_SHARE,
                 loop_burst: float = _LOOP_BURST):
        self.address = address
        self._source = source
        self.draining = False
        self.budget = LoopBudget(loop_share, loop_burst)
        memory = shadow_memory or (lambda: None)
        self.metrics = Rendered(
            lambda tick: metrics_text(source(), reload_status, tick, memory()), max_age)
        self.stats = Rendered(
            lambda tick: stats_text(source(), reload_status, tick, memory()), max_age)
        application = dashboard.middleware(self._app, source, history, self.stats.get,
                                           access)
        self._server = _Server(sock or bind(address), application, max_connections,
                               request_timeout, idle_timeout, self.budget)

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
            return _respond(start_response, "200 OK", _fresh(self.stats, environ),
                            "application/json")
        if path == "/mismatches":
            slicer, began = _Slicer(), time.thread_time()
            try:
                body = mismatches_text(self._source(), environ.get("QUERY_STRING", ""),
                                       slicer.tick)
            except ValueError as error:
                return _respond(start_response, "400 Bad Request", f"{error}\n".encode())
            finally:
                slicer.done()
                environ[_NOT_ITS_OWN] = time.thread_time() - began - slicer.busy
            return _respond(start_response, "200 OK", body, "application/json")
        if path == "/metrics":
            return _respond(start_response, "200 OK", _fresh(self.metrics, environ),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            if self.draining:
                return _respond(start_response, "503 Service Unavailable", b"draining\n")
            return _respond(start_response, "200 OK", b"ok\n")
        return _respond(start_response, "404 Not Found",
                        b"not found: try / (the dashboard), /stats, /stats/history, "
                        b"/mismatches, /metrics or /healthz\n")


def _fresh(document: Rendered, environ: dict) -> bytes:
    """The document, noting in `environ` the loop's CPU time while the request waited for
    it to be rendered: not the answer's own."""
    began = time.thread_time()
    body = document.get()
    environ[_NOT_ITS_OWN] = time.thread_time() - began
    return body


def _respond(start_response, status: str, body: bytes, kind: str = "text/plain"):
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
