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
from urllib.parse import parse_qs

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

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
# saved up for a burst (seconds): see LoopBudget. An answer takes the loop 0.1-0.5 ms
# (pywsgi's parsing and writing; more when it comes alone, its caches cold): ~10 a
# second go on, ~20 at once, where Prometheus, gproxyctl and health checks ask a few
# times a second. Each answer delays a relay that comes meanwhile by about its length, so
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
    gproxyd_request_latency_seconds summary; the same text prometheus_client's
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
    return "".join(parts).encode()


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


class _Handler(WSGIHandler):
    """pywsgi's handler with deadlines: a request must arrive complete within
    `request_timeout` of the accept (or of its first byte, on a kept-alive connection),
    and the next one must begin within `idle_timeout` of the last answer."""

    def __init__(self, sock, address, server: _Server, connection: _Connection):
        super().__init__(sock, address, server)
        self.connection = connection
        self._deadline: gevent.Timeout | None = None
        self._cpu: float | None = None  # since when the loop's time is this request's
        self._environ: dict | None = None

    def handle(self) -> None:
        self._arm(self.server.request_timeout)
        try:
            super().handle()  # closes the socket, however it ends
        except gevent.Timeout as timeout:
            if timeout is not self._deadline:
                raise
        finally:
            self._disarm()

    def handle_one_request(self):
        """One request. The loop's time it takes, from here until its answer is out, is
        spent from the budget, but for the waits (for the request to come, for the
        budget, for a rendering): the loop works for others meanwhile."""
        self._environ = None
        self._cpu = time.thread_time()
        try:
            return super().handle_one_request()
        finally:
            if self._cpu is not None:  # not ended in a wait (a closed or evicted client)
                others = self._environ.get(_NOT_ITS_OWN, 0.0) if self._environ else 0.0
                self.server.budget.spend(time.thread_time() - self._cpu - others)

    def read_requestline(self) -> str:
        connection = self.connection
        self._spend()
        if connection.requests:  # kept alive: wait idle_timeout for the next request
            connection.waiting_since = time.monotonic()
            self._arm(self.server.idle_timeout)
        if not self.rfile.peek(1):
            return ""  # the client closed
        if connection.requests:
            self._arm(self.server.request_timeout)
        self._cpu = time.thread_time()
        return super().read_requestline()

    def get_environ(self):
        # The request has been read: answering it has no deadline but the socket timeout.
        self._disarm()
        self.connection.waiting_since = None
        self.connection.requests += 1
        # Every request waits its turn, after reading it (one that waits is being
        # answered, not idle): a client that asks again as soon as it has its answer
        # would otherwise find its next request already read, and be answered for as
        # long as it asks, the relays waiting.
        self._spend()
        self.server.budget.wait()
        self._cpu = time.thread_time()
        self._environ = super().get_environ()
        return self._environ

    def _spend(self) -> None:
        """Before a wait: spend the loop's time taken since the count began, and stop
        counting (the caller begins again after the wait)."""
        self.server.budget.spend(time.thread_time() - self._cpu)
        self._cpu = None

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
                 idle_timeout: float, budget: LoopBudget):
        super().__init__(sock, application, spawn=Pool(), log=None, error_log=log)
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

    def _serve(self, connection: _Connection, address) -> None:
        sock = connection.sock
        connection.serving = True
        try:
            sock.settimeout(self.request_timeout)  # bounds each write to a slow reader
            if sock.family != socket.AF_UNIX:
                # pywsgi sends the head and the body in two writes: with Nagle's algorithm
                # the body waits for the head's ACK, which the client delays (~40 ms).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
