"""Comparison: pairs each shadow's answers with production's answers to the same requests.

Every backend of a connection answers the same requests in the same order, so the n-th
answer of a shadow answers the request production's n-th answer did. Observers
(observe.Exchanges) hand each complete answer here with its latency; a `Comparison`
per client connection keeps the answers still waiting for their pair and, once both
are in, compares them (diff.compare), counts the result in the shadow's stats and
records the pair of latencies (verdict.PairedLatency).

Nothing here is on the client's path: production's answer has reached the client by
the time its observer sees it. Memory is bounded per connection: answers are kept up
to compare-max-body (longer ones as a hash, see Capture), at most MAX_ROWS exchanges
and a byte budget wait for their pair; past either, the oldest exchange is given up
and its shadow answers count as `uncompared`.

A route's `baseline` is a shadow running production's own build. Where its answers
differ from production's (timestamps, random ids) is noise: those paths are learned
per route and not counted against the other shadows. A candidate's answer is judged
only after the baseline's answer to the same request (while the baseline lives), so
that the noise seen in that very exchange is already known.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque

from . import diff
from .config import Route
from .stats import RouteStats, count_path

HEAD_ROOM = 64 * 1024   # an answer's head on top of compare-max-body (framers' MAX_HEAD)
PREVIEW = 1024          # body bytes kept of an answer too big to compare in full
REQUEST_KEPT = 256      # bytes kept of each request, to name it in samples
MAX_ROWS = 1000         # exchanges one connection may hold waiting for their pair
PRODUCTION = "production"


def rules_of(route: Route) -> diff.Rules | None:
    """What the route compares, or None when it compares nothing (latencies are still
    paired)."""
    if route.compare == "off" or route.protocol not in ("http", "redis"):
        return None
    return diff.Rules(mode=route.compare,
                      headers=tuple(name.lower() for name in route.compare_headers),
                      ignore=route.compare_ignore_fields, max_body=route.compare_max_body)


class Capture:
    """Cuts one direction of a stream into whole messages at the offsets a framer
    reports (its `ends`), keeping at most `limit` bytes of each. With `digest`, a
    message over the limit keeps its head and the first PREVIEW bytes of its body,
    and a hash and length of the whole body (diff.Answer); without, just its first
    `limit` bytes."""

    __slots__ = ("protocol", "limit", "digest", "_buf", "_hasher", "_body_length")

    def __init__(self, protocol: str, limit: int, digest: bool = True):
        self.protocol = protocol
        self.limit = limit
        self.digest = digest
        self._buf = bytearray()
        self._hasher = None
        self._body_length = 0

    def feed(self, data, ends: list[int]) -> list[diff.Answer]:
        """The messages `data` completes (one per offset in `ends`, which is cleared)."""
        if (len(ends) == 1 and ends[0] == len(data) and not self._buf
                and self._hasher is None and ends[0] <= self.limit):
            ends.clear()  # the common case: one chunk, one whole message
            return [diff.Answer(bytes(data))]
        answers = []
        start = 0
        for end in ends:
            self._add(data[start:end])
            answers.append(self.take())
            start = end
        ends.clear()
        if start < len(data):
            self._add(data[start:])
        return answers

    def peek(self) -> bytes:
        """The message so far (for a request answered before it was complete)."""
        return bytes(self._buf)

    def take(self) -> diff.Answer:
        """The message captured so far, as a whole one; the capture starts afresh."""
        buf = self._buf
        if self._hasher is not None:
            answer = diff.Answer(bytes(buf), self._body_length, self._hasher.digest())
            self._hasher = None
        else:
            answer = diff.Answer(bytes(buf))
        buf.clear()
        return answer

    def _add(self, piece) -> None:
        if self._hasher is not None:
            self._hasher.update(piece)
            self._body_length += len(piece)
            return
        buf = self._buf
        if len(buf) + len(piece) <= self.limit:
            buf += piece
            return
        if not self.digest:
            buf += piece[:self.limit - len(buf)]
            return
        buf += piece
        start = diff.body_start(self.protocol, buf)
        self._hasher = hashlib.blake2b(memoryview(buf)[start:], digest_size=diff.DIGEST_SIZE)
        self._body_length = len(buf) - start
        del buf[start + PREVIEW:]


class _Row:
    """One exchange: production's answer and what each shadow answered, until judged."""
    __slots__ = ("answer", "latency", "request", "shadows", "judged")

    def __init__(self):
        self.answer = None     # production's diff.Answer (None when only pairing latencies)
        self.latency: float | None = None  # production's latency, once it answered
        self.request = b""     # the request's first bytes, for samples
        self.shadows: dict = {}  # shadow name -> (its Answer, its latency), until judged
        self.judged: set = set()


class Comparison:
    """One client connection's pairing of production's answers with each shadow's.

    `answered(name, answer, latency, request)` is called by the observers, in each
    backend's answer order ("production" or a shadow's address text); `ended(name)`
    when a backend will answer no more (closed, or its protocol no longer followed).
    """

    __slots__ = ("route", "stats", "rules", "_rows", "_base", "_counts", "_live",
                 "_baseline", "_held", "_budget", "_production_gone", "_decisions")

    def __init__(self, route: Route, stats: RouteStats, shadows: list[str]):
        self.route = route
        self.stats = stats
        self.rules = rules_of(route)
        self._rows: deque[_Row] = deque()
        self._base = 0  # the exchange index of _rows[0]
        self._counts = dict.fromkeys([PRODUCTION, *shadows], 0)  # answers seen per backend
        self._live = set(shadows)
        baseline = route.baseline.text if route.baseline is not None else None
        self._baseline = baseline if baseline in self._live else None
        self._held = 0  # bytes of answers kept in rows
        self._budget = max(4 << 20, 2 * (route.compare_max_body + HEAD_ROOM))
        self._production_gone = False
        # With a shadow-filter: whether each request production will answer was mirrored.
        self._decisions: deque[bool] | None = deque() if route.shadow_filter else None

    def decided(self, mirrored: bool) -> None:
        """The shadow-filter's decision on the client's next request (request_filter)."""
        self._decisions.append(mirrored)
        self.stats.filtered += not mirrored

    def answered(self, name: str, answer: diff.Answer | None, latency: float,
                 request: bytes = b"") -> None:
        if name == PRODUCTION and self._decisions is not None:
            # An answer to a request the shadows did not get has nothing to pair with (an
            # answer before any decision, to a request cut short, neither).
            if not (self._decisions.popleft() if self._decisions else False):
                return
        index = self._counts[name]
        self._counts[name] = index + 1
        if name == PRODUCTION:
            row = self._row(index)
            row.answer, row.latency, row.request = answer, latency, request
        else:
            if index < self._base or name not in self._live or (
                    self._production_gone and index >= self._counts[PRODUCTION]):
                self.stats.shadow(name).uncompared += 1
                return
            row = self._row(index)
            row.shadows[name] = (answer, latency)
        if answer is not None:
            self._held += len(answer.raw)
        self._judge(row)
        self._trim()

    def ended(self, name: str) -> None:
        if name == PRODUCTION:
            # The exchanges production answered can still be compared; the others not.
            self._production_gone = True
            rows = self._rows
            while rows and rows[-1].latency is None:
                self._give_up(rows.pop(), oldest=False)
            self._trim()
            return
        self._live.discard(name)
        if name == self._baseline:
            for row in self._rows:  # candidates waiting on the baseline go ahead
                self._judge(row)
        self._trim()

    # --- judging -------------------------------------------------------------------------

    def _row(self, index: int) -> _Row:
        rows = self._rows
        while self._base + len(rows) <= index:
            rows.append(_Row())
        return rows[index - self._base]

    def _judge(self, row: _Row) -> None:
        """Compare every shadow answer of `row` that can be compared now: the baseline's
        first, the candidates' once the baseline has been judged (or is gone)."""
        if row.latency is None:
            return
        baseline = self._baseline
        if baseline is not None and baseline in row.shadows:
            self._compare(row, baseline)
        if baseline is None or baseline in row.judged or baseline not in self._live:
            for name in list(row.shadows):
                self._compare(row, name)

    def _compare(self, row: _Row, name: str) -> None:
        answer, latency = row.shadows.pop(name)
        row.judged.add(name)
        stats = self.stats.shadow(name)
        stats.paired.add(row.latency, latency)
        if answer is None or row.answer is None:
            return  # compare = off: latencies only
        self._held -= len(answer.raw)
        stats.compared += 1
        difference = diff.compare(self.route.protocol, self.rules, row.answer, answer)
        if difference is None:
            return
        noise = self.stats.noise_paths
        if name == self._baseline:
            # Noise by definition: learned and counted, not sampled (it would crowd out
            # the candidates' differences in /mismatches).
            stats.mismatches += 1
            for path in difference.paths:
                path = diff.generalise(path)
                count_path(noise, path)
                count_path(stats.mismatch_paths, path)
            return
        paths = [path for path in difference.paths if diff.generalise(path) not in noise]
        if not paths:
            stats.noise += 1
            return
        stats.mismatches += 1
        for path in paths:
            count_path(stats.mismatch_paths, diff.generalise(path))
        self._sample(row, name, answer, paths, difference.offset)

    def _sample(self, row: _Row, name: str, answer: diff.Answer, paths: list[str],
                offset: int | None) -> None:
        protocol = self.route.protocol
        sample = {"time": round(time.time(), 3), "route": self.route.name, "shadow": name,
                  "request": diff.describe_request(protocol, row.request), "paths": paths}
        if offset is not None:
            sample["offset"] = offset
        for side, which in ((PRODUCTION, row.answer), ("candidate", answer)):
            described = diff.describe_answer(protocol, which)
            if not self.route.compare_sample_bodies:
                described = {"status": described["status"], "hash": _body_hash(protocol, which)}
            sample[side] = described
        self.stats.samples.append(sample)

    # --- bounds ----------------------------------------------------------------------------

    def _trim(self) -> None:
        """Drop exchanges nobody is waiting on, and the oldest ones over the bounds."""
        rows = self._rows
        while rows and (self._settled(rows[0]) or len(rows) > MAX_ROWS
                        or self._held > self._budget):
            self._give_up(rows.popleft())

    def _settled(self, row: _Row) -> bool:
        return row.latency is not None and not row.shadows and self._live <= row.judged

    def _give_up(self, row: _Row, oldest: bool = True) -> None:
        if oldest:
            self._base += 1
        if row.answer is not None:
            self._held -= len(row.answer.raw)
        for name, (answer, _latency) in row.shadows.items():
            self.stats.shadow(name).uncompared += 1
            if answer is not None:
                self._held -= len(answer.raw)


def _body_hash(protocol: str, answer: diff.Answer) -> str:
    if answer.digest is not None:
        return answer.digest.hex()
    body = memoryview(answer.raw)[diff.body_start(protocol, answer.raw):]
    return hashlib.blake2b(body, digest_size=diff.DIGEST_SIZE).hexdigest()
