"""Counters and latency histograms per route and backend, in constant memory.

Sessions and observers write here; the admin endpoint, gproxyctl and the periodic log
line read `RouteStats.snapshot()`. Nothing here grows per request.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .verdict import PairedLatency

_SUB_BITS = 5                       # 32 sub-buckets per power of two: <= ~3% error
_SUB = 1 << _SUB_BITS
_BUCKETS = 64 * _SUB                # covers microseconds up to ~2^63: never overflows


def _bucket(micros: int) -> int:
    """The bucket of a value of `micros` microseconds."""
    shift = micros.bit_length() - (_SUB_BITS + 1)
    if shift < 0:
        shift = 0
    return (shift << _SUB_BITS) + (micros >> shift)


# The buckets of values below ~16 ms (most answers), looked up: one record per answer, or
# per chunk of a pipeline's, makes the arithmetic above a share of each request's cost.
# (128 KiB of references to the ~320 indices, each one int object.)
_TABLED = 1 << 14
_INDICES = {index: index for index in range(_bucket(_TABLED) + 1)}
_BUCKET_OF = [_INDICES[_bucket(micros)] for micros in range(_TABLED)]
del _INDICES


class Histogram:
    """Latency histogram in log-linear (HDR-style) microsecond buckets.

    Values below 64 µs are exact; above, each power of two is split into 32 buckets, so
    a reported percentile is within ~3% of the true value. Memory is fixed.
    """
    __slots__ = ("counts", "count", "total", "max")

    def __init__(self):
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float, count: int = 1) -> None:
        """Count `count` values of `seconds` each (the answers of one chunk to requests
        written at once: one step, not one per answer). Counts and buckets are what
        `count` calls with one value give; `total` may differ from their sum in its
        last bits (one multiplication instead of `count` additions)."""
        micros = int(seconds * 1e6) if seconds > 0 else 0
        self.counts[_BUCKET_OF[micros] if micros < _TABLED else _bucket(micros)] += count
        self.count += count
        self.total += seconds * count
        if seconds > self.max:
            self.max = seconds

    def percentile(self, share: float) -> float:
        """The value (seconds) under which `share` of the recorded values fall; 0 if none."""
        if not self.count:
            return 0.0
        rank = max(1, int(share * self.count + 0.5))
        seen = 0
        for index, hits in enumerate(self.counts):
            if hits:
                seen += hits
                if seen >= rank:
                    return min(self._midpoint(index), self.max)
        return self.max

    def count_below(self, seconds: float) -> int:
        """How many values are <= `seconds` (bucket resolution), for Prometheus buckets."""
        limit = int(seconds * 1e6)
        below = 0
        for index, hits in enumerate(self.counts):
            if hits:
                if self._upper(index) > limit + 1:
                    break
                below += hits
        return below

    @staticmethod
    def _bounds(index: int) -> tuple[int, int]:
        shift = max(0, (index >> _SUB_BITS) - 1)
        mantissa = index - (shift << _SUB_BITS)
        return mantissa << shift, (mantissa + 1) << shift

    def _midpoint(self, index: int) -> float:
        low, high = self._bounds(index)
        return (low + high) / 2e6 if high - low > 1 else low / 1e6

    def _upper(self, index: int) -> int:
        return self._bounds(index)[1]

    def export(self) -> dict:
        """The raw numbers (for merging several processes' histograms)."""
        return {"counts": {index: hits for index, hits in enumerate(self.counts) if hits},
                "count": self.count, "total": self.total, "max": self.max}

    def add(self, exported: dict) -> None:
        """Add another histogram's export() into this one."""
        for index, hits in exported["counts"].items():
            self.counts[int(index)] += hits
        self.count += exported["count"]
        self.total += exported["total"]
        self.max = max(self.max, exported["max"])

    def summary_ms(self) -> dict:
        return {"p50": round(self.percentile(0.50) * 1e3, 3),
                "p90": round(self.percentile(0.90) * 1e3, 3),
                "p99": round(self.percentile(0.99) * 1e3, 3),
                "p999": round(self.percentile(0.999) * 1e3, 3),
                "max": round(self.max * 1e3, 3)}


@dataclass
class BackendStats:
    """One backend (production, or one shadow) of a route, over all its connections."""
    requests: int = 0
    errors: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    connect_failures: int = 0  # the backend refused, or did not answer the connect in time
    out_of_descriptors: int = 0  # connects not even tried: this process had no fd left
    resets: int = 0            # the backend reset or broke a connection mid-stream
    timeouts: int = 0          # requests never answered (shadows: by the end of linger)
    latency: Histogram = field(default_factory=Histogram)

    def record(self, seconds: float, error: int = False, count: int = 1) -> None:
        """`count` requests answered after `seconds` each, `error` of them (a bool for
        one) with an error."""
        self.requests += count
        self.errors += error
        self.latency.record(seconds, count)

    def export(self) -> dict:
        numbers = {key: value for key, value in vars(self).items() if key != "latency"}
        return dict(numbers, latency=self.latency.export())

    def add(self, exported: dict) -> None:
        for key, value in exported.items():
            if key == "latency":
                self.latency.add(value)
            elif isinstance(value, dict):
                counts = getattr(self, key)
                for name, count in value.items():
                    counts[name] = counts.get(name, 0) + count
            else:
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict:
        return {"requests": self.requests, "errors": self.errors,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "connect_failures": self.connect_failures,
                "out_of_descriptors": self.out_of_descriptors, "resets": self.resets,
                "timeouts": self.timeouts, "latency_ms": self.latency.summary_ms()}


# How a shadow connection can end (see shadow.ShadowSink).
OUTCOMES = ("done", "dropped", "failed", "reset", "timeout", "diverged")

# Why bytes waiting for a shadow were let go unwritten (see shadow.py): gproxyd dropped
# the shadow connection (over-buffer: past shadow-buffer; over-budget: the furthest behind
# when shadow-memory was full; over-shadow-max-connections: too many lingering), or it
# ended first (shadow-failed: could not connect, broke, or shadow-linger ran out).
DROP_CAUSES = ("over-buffer", "over-budget", "shadow-failed",
               "over-shadow-max-connections")


# Most distinct differing paths counted per shadow (and noise paths per route); the
# rest are counted under OTHER_PATHS, so that a field with random names cannot grow memory.
MAX_PATHS = 100
OTHER_PATHS = "(other)"
TOP_PATHS = 10  # paths shown per shadow in /stats


def count_path(paths: dict, path: str, limit: int = MAX_PATHS) -> None:
    if path not in paths and len(paths) >= limit:
        path = OTHER_PATHS
    paths[path] = paths.get(path, 0) + 1


def _top(paths: dict, count: int = TOP_PATHS) -> dict:
    return dict(sorted(paths.items(), key=lambda item: (-item[1], item[0]))[:count])


@dataclass
class ShadowStats(BackendStats):
    """A shadow backend: also how often it was mirrored to, dropped, and disagreed."""
    mirrored: int = 0          # client connections copied to this shadow
    dropped: int = 0           # shadow connections dropped (by gproxyd: see drops)
    # Shadow connections by why waiting bytes were let go (DROP_CAUSES): the dropped ones,
    # and those that ended with bytes still waiting (shadow-failed).
    drops: dict = field(default_factory=dict)
    compared: int = 0          # answers compared with production's answer to the same request
    mismatches: int = 0        # compared answers that differ from production's
    noise: int = 0             # differing answers whose every difference the baseline makes too
    uncompared: int = 0        # answers paired with no production answer (see compare.py)
    turn_timeouts: int = 0     # turns given to the shadow unanswered (shadow-turn-timeout)
    # How each shadow connection ended: done, dropped, failed, reset, timeout, diverged.
    outcomes: dict = field(default_factory=dict)
    mismatch_paths: dict = field(default_factory=dict)  # generalised path -> mismatches
    paired: PairedLatency = field(default_factory=PairedLatency)  # (production, shadow) latencies

    def ended(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def export(self) -> dict:
        numbers = super().export()
        numbers["paired"] = self.paired.export()
        return numbers

    def add(self, exported: dict) -> None:
        exported = dict(exported)
        self.paired.add_exported(exported.pop("paired"))
        super().add(exported)

    def snapshot(self) -> dict:
        numbers = super().snapshot()
        numbers.update(
            mirrored=self.mirrored, dropped=self.dropped,
            drops={cause: self.drops.get(cause, 0) for cause in DROP_CAUSES},
            compared=self.compared,
            mismatches=self.mismatches, noise=self.noise, uncompared=self.uncompared,
            mismatch_paths=_top(self.mismatch_paths), turn_timeouts=self.turn_timeouts,
            outcomes={outcome: self.outcomes.get(outcome, 0) for outcome in OUTCOMES},
            latency_diff_ms=self.paired.summary())
        return numbers


@dataclass
class ShadowMemoryStats:
    """shadow-memory: what one process holds for its shadows over all routes (see
    shadow.memory_stats()); merged over worker processes by adding them up (each has a
    shadow-memory of its own, so `limit` and `high_water` are sums too)."""
    limit: int = 0            # shadow-memory
    queued: int = 0           # bytes waiting to be written to shadows now
    high_water: int = 0       # most bytes waiting at once since start
    send_buffers: int = 0     # kernel send buffers of the open shadow sockets (their caps)
    drops: dict = field(default_factory=dict)          # cause -> shadow connections
    dropped_bytes: dict = field(default_factory=dict)  # cause -> bytes let go unwritten

    def export(self) -> dict:
        return dict(vars(self), drops=dict(self.drops), dropped_bytes=dict(self.dropped_bytes))

    def add(self, exported: dict) -> None:
        for key in ("limit", "queued", "high_water", "send_buffers"):
            setattr(self, key, getattr(self, key) + exported[key])
        for key in ("drops", "dropped_bytes"):
            counts = getattr(self, key)
            for cause, count in exported[key].items():
                counts[cause] = counts.get(cause, 0) + count

    def snapshot(self) -> dict:
        return {"limit": self.limit, "queued": self.queued, "high_water": self.high_water,
                "send_buffers": self.send_buffers,
                "drops": {cause: self.drops.get(cause, 0) for cause in DROP_CAUSES},
                "dropped_bytes": {cause: self.dropped_bytes.get(cause, 0)
                                  for cause in DROP_CAUSES}}


@dataclass
class RecordStats:
    """A route's recording (record.py): the file, and what became of the sampled requests.

    The writer's numbers (recorded, bytes, errors) are brought over by the event loop, so
    every field here is written by the loop alone."""
    file: str = ""       # the record file (PATH; rotated ones are PATH.1, PATH.2, ...)
    recorded: int = 0    # requests appended to the record file
    dropped: int = 0     # sampled requests not recorded: the memory bound was reached
    skipped: int = 0     # sampled requests not recorded: too large, or secrets unmaskable
    bytes: int = 0       # bytes of records appended (the requests, 16 more bytes each)
    errors: int = 0      # sampled requests lost to write failures (a full disk, ...)

    def export(self) -> dict:
        return dict(vars(self))

    def add(self, exported: dict) -> None:
        self.file = exported["file"] or self.file  # the newest process's (reloads move it)
        for key in ("recorded", "dropped", "skipped", "bytes", "errors"):
            setattr(self, key, getattr(self, key) + exported[key])

    def snapshot(self) -> dict:
        return dict(vars(self))


@dataclass
class RouteStats:
    """Everything counted for one route. Survives reloads that keep the route's listener."""
    active: int = 0
    total: int = 0
    rejected: int = 0          # over max-connections
    refused: int = 0           # closed before production: no valid PROXY header, a loop
    parser_fallbacks: int = 0  # connections whose protocol could not be followed
    filtered: int = 0          # requests kept from the shadows by shadow-filter
    production: BackendStats = field(default_factory=BackendStats)
    shadows: dict[str, ShadowStats] = field(default_factory=dict)
    baseline: str = ""  # which of the shadows is the baseline (see compare.py), if any
    verdict_threshold: float | None = None  # seconds; None: automatic (see verdict.judge)
    # Where the baseline's answers differed from production's: generalised path -> count.
    noise_paths: dict = field(default_factory=dict)
    # The most recent differing exchanges (dicts, see compare.py), newest last.
    samples: deque = field(default_factory=lambda: deque(maxlen=100))
    # The beanstalkd archive (interceptors/beanstalkd.py), on routes with one: counters,
    # then what the store held at the last look (the same for every process sharing it).
    archive: str = ""          # the store's URL without its password; "" without an archive
    archived_total: int = 0    # puts kept in the archive
    injected_total: int = 0    # archived jobs moved into beanstalkd
    inject_failures: int = 0   # tries to move a due job that failed (it stays archived)
    archived: int = 0          # jobs in the archive now
    overdue_seconds: float = 0.0  # how late the oldest due job still in the archive is
    record: RecordStats | None = None  # on routes with record = PATH (see record.py)
    # Failed TLS handshakes by side (client, production, shadow), on routes with TLS
    # options (tls.py): a side is listed, from 0, once its route uses TLS there.
    tls_handshake_failures: dict[str, int] = field(default_factory=dict)

    def shadow(self, name: str) -> ShadowStats:
        stats = self.shadows.get(name)
        if stats is None:
            stats = self.shadows[name] = ShadowStats()
        return stats

    def export(self) -> dict:
        """Everything, raw: what a worker process sends its master."""
        return {"active": self.active, "total": self.total, "rejected": self.rejected,
                "refused": self.refused, "parser_fallbacks": self.parser_fallbacks,
                "filtered": self.filtered,
                "archive": self.archive, "archived_total": self.archived_total,
                "injected_total": self.injected_total,
                "inject_failures": self.inject_failures, "archived": self.archived,
                "overdue_seconds": self.overdue_seconds,
                "production": self.production.export(),
                "shadows": {name: stats.export() for name, stats in self.shadows.items()},
                "baseline": self.baseline, "verdict_threshold": self.verdict_threshold,
                "noise_paths": self.noise_paths,
                "samples": list(self.samples),
                "record": self.record.export() if self.record is not None else None,
                "tls_handshake_failures": dict(self.tls_handshake_failures)}

    def add(self, exported: dict) -> None:
        """Add another process's export() of the same route into this one."""
        for key in ("active", "total", "rejected", "refused", "parser_fallbacks", "filtered",
                    "archived_total", "injected_total", "inject_failures"):
            setattr(self, key, getattr(self, key) + exported[key])
        self.production.add(exported["production"])
        for name, numbers in exported["shadows"].items():
            self.shadow(name).add(numbers)
        self.baseline = self.baseline or exported["baseline"]
        self.archive = self.archive or exported["archive"]
        # Every process sees the same store: its gauges are not added up.
        self.archived = max(self.archived, exported["archived"])
        self.overdue_seconds = max(self.overdue_seconds, exported["overdue_seconds"])
        if self.verdict_threshold is None:
            self.verdict_threshold = exported["verdict_threshold"]
        for side, count in exported.get("tls_handshake_failures", {}).items():
            self.tls_handshake_failures[side] = self.tls_handshake_failures.get(side, 0) + count
        for path, count in exported["noise_paths"].items():
            self.noise_paths[path] = self.noise_paths.get(path, 0) + count
        if exported["record"] is not None:
            if self.record is None:
                self.record = RecordStats()
            self.record.add(exported["record"])
        merged = sorted([*self.samples, *exported["samples"]], key=lambda sample: sample["time"])
        self.samples.clear()
        self.samples.extend(merged)  # the deque keeps the newest

    def noise_rates(self) -> dict:
        """Each noise path with the share of the baseline's compared answers it differed in."""
        baseline = self.shadows.get(self.baseline)
        compared = baseline.compared if baseline is not None else 0
        return {path: round(count / compared, 4) if compared else 0.0
                for path, count in _top(self.noise_paths, MAX_PATHS).items()}

    def snapshot(self) -> dict:
        return {"connections": {"active": self.active, "total": self.total,
                                "rejected": self.rejected, "refused": self.refused},
                "parser_fallbacks": self.parser_fallbacks,
                "filtered": self.filtered,
                "production": self.production.snapshot(),
                "shadows": {name: dict(stats.snapshot(),
                                       role="baseline" if name == self.baseline else "candidate")
                            for name, stats in self.shadows.items()},
                "noise_paths": self.noise_rates(),
                "verdict_threshold_ms": None if self.verdict_threshold is None
                else round(self.verdict_threshold * 1e3, 3),
                **({"archive": {"store": self.archive, "archived": self.archived,
                                "archived_total": self.archived_total,
                                "injected_total": self.injected_total,
                                "inject_failures": self.inject_failures,
                                "overdue_seconds": round(self.overdue_seconds, 3)}}
                   if self.archive else {}),
                "record": self.record.snapshot() if self.record is not None else None,
                **({"tls_handshake_failures": dict(self.tls_handshake_failures)}
                   if self.tls_handshake_failures else {})}
