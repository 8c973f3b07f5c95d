"""The last hour of every route's backends, interval by interval: what /stats/history,
the dashboard and `gproxyctl stats --watch` show.

RouteStats only counts up since start, and its latency histograms only answer "since
start". `History.sample(now, routes)`, called about once a second with the cumulative
stats (a single process's own, or an arbiter's merged over its workers), keeps for each
backend the difference from the sample before: the requests, errors, drops, compared
answers and mismatches of that interval, and the percentiles of the latencies recorded in
it, read off the difference of the two cumulative histograms (the buckets are fixed, so
the difference is the histogram of that interval alone). The percentiles are what
Histogram.percentile() would say of that interval's values alone (a bucket's midpoint,
~3%), but for the interval's top bucket when it set no new all-time maximum: there the
midpoint is capped by the all-time maximum, not by the interval's own.

Two tiers (TIERS): a point per second for the last 15 minutes, and a point per 10
seconds for the last hour. A tier's interval ends at the first sample past a multiple of
its step (wall clock), so a late sample makes a longer interval, never a lost one; each
point carries its length in seconds. The first sample is where counting begins; a route
or backend that appears later counts from zero since the sample before it appeared. A
counter that went down (a route removed and added again starts at zero) counts from
zero.

Memory is bounded: a point is POINT_FIELDS doubles (88 bytes), so a backend holds
(900 + 360) x 88 = 111 KB of points (each tier's allocated whole with its first point),
and 2 x 16 KiB for the histogram counts each tier began its current interval with: 144
KB per backend (production or a shadow) of each route, however long the daemon runs. A
route or shadow that is no longer in the stats is forgotten at the next sample.
"""
from __future__ import annotations

import logging
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from operator import sub
from typing import Callable, Iterable

import gevent

from .stats import Histogram, RouteStats

log = logging.getLogger("gproxyd.history")

# (seconds per point, points kept): a point a second for 15 minutes, then a point per 10
# seconds for an hour.
TIERS = ((1.0, 900), (10.0, 360))

# What a point holds, in this order: when its interval ended (Unix time), how long it
# was (seconds), what was counted in it, and the latency percentiles (ms) of the
# requests answered in it (0 when none were).
POINT_FIELDS = ("time", "seconds", "requests", "errors", "dropped", "compared",
                "mismatches", "p50_ms", "p90_ms", "p99_ms", "max_ms")
_COUNTERS = ("requests", "errors", "dropped", "compared", "mismatches")
_SHARES = (0.50, 0.90, 0.99)
_WIDTH = len(POINT_FIELDS)
_SLOTS = len(Histogram().counts)
_ZEROS = array("q", bytes(8 * _SLOTS))
_NOTHING = (0,) * len(_COUNTERS)


class _Ring:
    """The newest `capacity` points of one tier of one backend, in one flat array of
    capacity x POINT_FIELDS doubles (allocated whole with the first point)."""
    __slots__ = ("capacity", "values", "start", "length")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.values = array("d")
        self.start = 0   # index of the oldest point
        self.length = 0  # points held

    def append(self, point: Iterable[float]) -> None:
        if not self.values:
            self.values = array("d", bytes(8 * _WIDTH * self.capacity))
        if self.length < self.capacity:
            at = self.length * _WIDTH
            self.length += 1
        else:
            at = self.start * _WIDTH
            self.start = (self.start + 1) % self.capacity
        self.values[at:at + _WIDTH] = array("d", point)

    def since(self, earliest: float) -> list[tuple[float, ...]]:
        """The points whose interval ended after `earliest`, oldest first."""
        points = []
        for offset in range(self.length - 1, -1, -1):  # newest first, stop at the old
            at = ((self.start + offset) % self.capacity) * _WIDTH
            if self.values[at] <= earliest:
                break
            points.append(tuple(self.values[at:at + _WIDTH]))
        points.reverse()
        return points


@dataclass
class _Reading:
    """One backend's cumulative numbers at one sample: where an interval starts."""
    time: float
    counters: tuple[int, ...]
    counts: array  # the latency histogram's bucket counts (never changed once read)
    count: int
    max: float


def _read(now: float, stats) -> _Reading:
    latency = stats.latency
    counters = tuple(getattr(stats, name, 0) for name in _COUNTERS)
    return _Reading(now, counters, array("q", latency.counts), latency.count, latency.max)


def percentiles(counts: Iterable[int], count: int, top: float) -> tuple[float, ...]:
    """p50, p90, p99 and the largest value (seconds) of a histogram given as its bucket
    counts (`count` in all), as Histogram.percentile() reads them: the midpoint of the
    bucket the rank falls in, at most `top`."""
    if count <= 0:
        return (0.0,) * (len(_SHARES) + 1)
    running = list(accumulate(counts))
    midpoint = _MIDPOINT
    values = []
    for share in (*_SHARES, 1.0):
        index = bisect_left(running, max(1, int(share * count + 0.5)))
        values.append(min(midpoint(index), top) if index < len(running) else top)
    return tuple(values)


_MIDPOINT = Histogram()._midpoint


def _interval(start: _Reading, end: _Reading) -> tuple[float, ...]:
    """The point for the interval from `start` to `end`."""
    counted = tuple(after - before if after >= before else after
                    for before, after in zip(start.counters, end.counters, strict=True))
    if end.count < start.count:  # the stats began again from zero
        start = _Reading(start.time, start.counters, _ZEROS, 0, 0.0)
    answered = end.count - start.count
    if answered:
        # The interval's largest value is known when it set a new maximum; otherwise it
        # lies in the top bucket with values, and the all-time maximum bounds it.
        counts = map(sub, end.counts, start.counts)
        latency = percentiles(counts, answered, end.max)
        if end.max > start.max:
            latency = (*latency[:-1], end.max)
    else:
        latency = (0.0,) * (len(_SHARES) + 1)
    return (end.time, end.time - start.time, *counted,
            *(round(seconds * 1e3, 3) for seconds in latency))


@dataclass
class _Backend:
    """The tiers of one backend: where each tier's current interval began, its points."""
    role: str
    started: list[_Reading | None] = field(default_factory=lambda: [None] * len(TIERS))
    rings: list[_Ring] = field(default_factory=lambda: [_Ring(kept) for _, kept in TIERS])


class History:
    """Per route and backend, the points of the last hour (see the module's docstring).

    Only `sample()` writes; `document()` reads. Both run in the event loop, so a reader
    never sees half a sample of one backend.
    """

    def __init__(self, tiers: tuple[tuple[float, int], ...] = TIERS):
        self.tiers = tiers
        self._routes: dict[str, dict[str, _Backend]] = {}
        self.sampled: float | None = None  # the `now` of the last sample

    def sample(self, now: float, routes: dict[str, RouteStats],
               tick: Callable[[], None] = lambda: None) -> None:
        """Take the cumulative `routes` as of `now` (Unix time): ends every tier's
        interval that a multiple of its step has passed since it began. Calls `tick()`
        after each backend (a histogram difference is ~0.1 ms of work)."""
        for name in list(self._routes):
            if name not in routes:
                del self._routes[name]
        for name, stats in list(routes.items()):
            kept = self._routes.setdefault(name, {})
            backends = {"production": stats.production, **stats.shadows}
            for gone in [backend for backend in kept if backend not in backends]:
                del kept[gone]
            for backend, numbers in backends.items():
                role = ("production" if backend == "production" else
                        "baseline" if backend == stats.baseline else "candidate")
                history = kept.get(backend)
                if history is None:
                    history = kept[backend] = _Backend(role)
                    if self.sampled is not None:
                        # Not there at the last sample: all it counted is since then.
                        history.started = [_Reading(self.sampled, _NOTHING, _ZEROS, 0, 0.0)
                                           for _ in self.tiers]
                history.role = role
                self._sample_backend(now, numbers, history)
                tick()
        self.sampled = now

    def _sample_backend(self, now: float, numbers, history: _Backend) -> None:
        reading = None
        for tier, (step, _) in enumerate(self.tiers):
            began = history.started[tier]
            if began is not None and now // step == began.time // step:
                continue  # this tier's interval goes on
            if reading is None:
                reading = _read(now, numbers)
            if began is not None and now > began.time:
                history.rings[tier].append(_interval(began, reading))
            history.started[tier] = reading

    def tier_for(self, since: float) -> int:
        """The finest tier that reaches `since` seconds back (else the coarsest)."""
        for tier, (step, kept) in enumerate(self.tiers):
            if since <= step * kept:
                return tier
        return len(self.tiers) - 1

    def document(self, now: float, since: float, route: str | None = None,
                 step: float | None = None) -> dict:
        """The /stats/history JSON: {"time", "step", "since", "routes": {route:
        {backend: {"role", "points": [{POINT_FIELDS...}, ...]}}}}, the points of the
        last `since` seconds, oldest first, from the tier with `step` seconds per point
        (default: the finest that reaches back `since` seconds). `route`: that one only.
        Raises KeyError for a route or step it does not have."""
        if step is None:
            tier = self.tier_for(since)
        else:
            tiers = [tier for tier, (seconds, _) in enumerate(self.tiers) if seconds == step]
            if not tiers:
                raise KeyError(f"step {step:g}")
            tier = tiers[0]
        if route is not None and route not in self._routes:
            raise KeyError(f"route {route}")
        earliest = now - since
        names = [route] if route is not None else list(self._routes)
        return {"time": round(now, 3), "step": self.tiers[tier][0], "since": since,
                "fields": list(POINT_FIELDS),
                "routes": {name: {backend: {"role": kept.role,
                                            "points": [dict(zip(POINT_FIELDS, point, strict=True))
                                                       for point in
                                                       kept.rings[tier].since(earliest)]}
                                  for backend, kept in self._routes[name].items()}
                           for name in names}}

    def routes(self) -> list[str]:
        return list(self._routes)


def sample_forever(history: History, source: Callable[[], dict[str, RouteStats]],
                   step: float = 1.0) -> None:
    """`history.sample()` of `source()` now, then forever just after each whole `step`
    of the wall clock, letting the loop run between backends. A failing sample is logged
    and the next one is tried (run it in a greenlet of its own; kill it to stop)."""
    while True:
        try:
            history.sample(time.time(), source(), tick=_let_the_loop_run)
        except Exception:
            log.exception("history: sampling the stats failed; trying again in %gs", step)
        gevent.sleep(step - time.time() % step + 0.001)


def _let_the_loop_run() -> None:
    # A timer, not sleep(0): the loop polls for I/O before it runs us again.
    gevent.sleep(0.0001)
