"""Observer: pairs one backend's requests with its responses on one connection.

Each backend of a session (production, and each shadow) gets its own Exchanges, fed
with the bytes as they were written to that backend (`sent`) and as they came back
(`received`). It only looks at copies: bytes are never changed here.

With `protocol = tcp` a "request" is the whole connection and its latency is the time
to the first response byte. With a protocol framer (http, redis) each request is timed
from the moment it was completely sent to the moment its response was complete; a
request sent while the backend still owed an earlier answer (pipelined by the client,
or written together with others after shadow-write-delay) is timed from the moment
that earlier answer was complete, when the backend could start on it. So production
and shadows are compared by their service times even when the bytes reached them in
different bursts. A stream the framer cannot follow falls back to tcp-level measurement.

On a route with `record`, production's Exchanges also hands each request written to it
to a Recording (record.py), cut where the request framer saw it end; the recording
stops with the framing.

When the session writes the same client stream to every backend, their Exchanges
follow one framing of it (protocols/shared.py) instead of each framing it again: the
requests each backend's writes complete, and so every clock and pairing above, stay
that backend's own.
"""
from __future__ import annotations

import logging
from collections import deque
from operator import itemgetter
from time import monotonic
from typing import TYPE_CHECKING

from .compare import Capture, Comparison
from .protocols import FRAMERS, SHAREABLE, ProtocolError, Upgraded, new_framers
from .protocols.shared import RequestFollower, SharedRequests
from .relay import Counter
from .stats import BackendStats, RouteStats

if TYPE_CHECKING:
    from .record import Recording

log = logging.getLogger("gproxyd.observe")

# Most requests a backend may owe answers for before we stop pairing (a backend that
# never answers must not make `pending` grow without bound).
_MAX_PENDING = 10_000
# observe-max-header's default (settings.py), for callers that do not pass the route's.
DEFAULT_MAX_HEAD = 16 * 1024
_IS_ERROR = itemgetter(1)  # of a framer's (status, is_error)


class Exchanges:
    __slots__ = ("stats", "route_stats", "label", "watching", "_requests", "_responses",
                 "_pending", "_owed", "_connected", "_answered", "answers", "failures",
                 "_by_turn", "_turn_sent", "_last_sent", "_early", "_comparison", "_name",
                 "_capture", "_request_capture", "_kept", "_recording")

    def __init__(self, protocol: str, stats: BackendStats, route_stats: RouteStats,
                 label: str, max_head: int = DEFAULT_MAX_HEAD,
                 shared: SharedRequests | None = None, use_native: bool = True):
        """`max_head`: the route's observe-max-header, the most an HTTP framer buffers
        of one head; past it the connection falls back to tcp-level measurement.
        `shared`: the framing of the client stream this backend is written (see
        new_shared), which this one follows instead of framing the stream itself.
        `use_native`: the C parsers in front of the framers where installed
        (protocols/native.py); the measurements are the same either way."""
        self.stats = stats
        self.route_stats = route_stats
        self.label = label
        framers = (new_framers(protocol, max_head, shared, use_native)
                   if protocol in FRAMERS else None)  # tcp: no call a connection
        self._requests = framers[0] if framers else None
        self._responses = framers[1] if framers else None
        # sent() and received() want the bytes: framed, and after a fallback measuring
        # by turn, so for good (an attribute: the taps ask for every chunk).
        self.watching = bool(framers)
        # Requests not answered yet, in order, as (send time, how many were sent then):
        # a pipeline written at once is one entry. Only framed protocols pair them (an
        # idle tcp connection should not carry an empty deque).
        self._pending: deque[tuple[float, int]] | None = deque() if framers else None
        self._owed = 0  # the requests in _pending
        self._connected = monotonic()
        self._answered = 0.0  # when the latest complete answer arrived
        self.answers = 0      # this connection's answers, and how many were errors
        self.failures = 0
        self._last_sent = 0.0  # when the latest request bytes were sent
        self._early = 0        # requests answered before they were complete
        # After a fallback: one exchange per client turn (see _fall_back).
        self._by_turn = False
        self._turn_sent = 0.0  # when the unanswered turn's latest byte was sent
        # With compare_in(): where each answer goes, as whom, and what is kept of it.
        self._comparison: Comparison | None = None
        self._name = ""
        self._capture: Capture | None = None
        self._request_capture: Capture | None = None
        self._kept: deque[bytes] | None = None  # first bytes of requests not answered yet
        self._recording: Recording | None = None

    def compare_in(self, comparison: Comparison, name: str, capture: Capture | None,
                   request_capture: Capture | None = None) -> None:
        """Hand every complete answer to `comparison` as backend `name`, with its
        latency, the answer itself when there is a `capture`, and the first bytes of
        the request it answers when there is a `request_capture` (production's). Only
        framed protocols pair answers; on tcp routes this does nothing."""
        if self._requests is None:
            return
        self._comparison = comparison
        self._name = name
        self._capture = capture
        if capture is not None:
            self._responses.ends = []
        if request_capture is not None:
            self._request_capture = request_capture
            self._requests.ends = []
            self._kept = deque()

    def record_in(self, recording: "Recording") -> None:
        """Hand every request written to this backend to `recording`, whole, as the
        framer delimits it (production's observer, on an http route with record)."""
        if self._requests is None:
            return
        self._recording = recording
        if self._requests.ends is None:
            self._requests.ends = []

    @property
    def shared(self) -> SharedRequests | None:
        """The framing of the client stream this one follows, while it follows one."""
        requests = self._requests
        return requests.shared if type(requests) is RequestFollower else None

    def sent(self, data, at: float = 0.0) -> None:
        """Bytes written to the backend (the client's requests); only while watching.
        `at`: when the write began (0: now)."""
        requests = self._requests
        if requests is None:
            self._turn_sent = at or monotonic()
            return
        self._last_sent = sending = at or monotonic()
        recording = self._recording
        if recording is None and self._request_capture is None:
            # The common case, in short: nothing records or keeps the requests.
            try:
                done = requests.feed(data)
            except ProtocolError as error:
                self._fall_back(f"request: {error}")
                self._turn_sent = sending  # this chunk starts a turn
                return
            if done:
                count = len(done)
                if self._early or self._owed + count > _MAX_PENDING:
                    self._expect(done)
                    return
                self._pending.append((sending, count))
                self._owed += count
                if count == 1:
                    self._responses.expect(done[0])
                else:
                    self._responses.expect_all(done)
            return
        try:
            done = self._requests.feed(data)
        except ProtocolError as error:
            if recording is not None:  # the requests before what cannot be followed
                recording.feed(data, self._requests.ends, False, self._last_sent)
            self._fall_back(f"request: {error}")
            self._turn_sent = self._last_sent  # this chunk starts a turn
            return
        if recording is not None:
            ends = self._requests.ends
            recording.feed(data, ends, self._requests.in_message, self._last_sent)
            if self._request_capture is None:
                ends.clear()  # else the capture clears them, once it has used them too
        if self._request_capture is not None:
            kept = self._request_capture.feed(data, self._requests.ends)
            if done:
                self._expect(done, kept)
        elif done:
            self._expect(done)

    def _expect(self, done, kept: list | None = None) -> None:
        now = self._last_sent
        for index, request in enumerate(done):
            if self._early:  # answered already (see _complete)
                self._early -= 1
                continue
            if self._owed >= _MAX_PENDING:
                self._fall_back("too many requests without an answer")
                return
            self._pending.append((now, 1))
            self._owed += 1
            self._responses.expect(request)
            if kept is not None:
                self._kept.append(kept[index].raw)

    def received(self, data, at: float = 0.0) -> None:
        """Bytes read from the backend (its responses); only while watching. `at`: when
        they arrived (the kernel's receive time, channel.arrival()), so that reading
        them late does not add to the backend's latency; 0: now."""
        if self._responses is None:
            if self._turn_sent:
                self.stats.record((at or monotonic()) - self._turn_sent)
                self._turn_sent = 0.0
            return
        capture = self._capture
        try:
            done = self._responses.feed(data)
        except Upgraded as upgrade:
            # the 101 and what came before it
            self._complete(upgrade.completed, at,
                           capture.feed(data, self._responses.ends) if capture else None)
            self._stop_framing()
            return
        except ProtocolError as error:
            self._complete(error.completed, at,
                           capture.feed(data, self._responses.ends) if capture else None)
            self._fall_back(f"response: {error}")
            return
        if capture is not None:
            self._complete(done, at, capture.feed(data, self._responses.ends))
        elif done:
            count = len(done)
            if self._owed < count or self._comparison is not None:
                self._complete(done, at)
                return
            # The common case, in short: answers to requests sent, no comparison. Those
            # to requests written at once have the same latency: one record for them.
            pending = self._pending
            sent, sent_count = pending[0]
            if sent_count == count:
                pending.popleft()
            elif sent_count > count:  # the rest of that write is still owed
                pending[0] = (sent, sent_count - count)
            else:  # answers to several writes
                self._complete(done, at)
                return
            now = at or monotonic()
            self._owed -= count
            answered = self._answered
            self._answered = now
            failures = done[0][1] if count == 1 else sum(map(_IS_ERROR, done))
            self.stats.record(now - (sent if sent > answered else answered), failures, count)
            self.answers += count
            self.failures += failures

    @property
    def unanswered(self) -> int:
        """Requests sent and not answered (by turn: the turn waiting for an answer)."""
        if self._pending is not None:
            return self._owed
        return int(bool(self._turn_sent))

    def closed(self, sent: Counter, received: Counter, error: bool = False,
               owed_answers: bool = False) -> None:
        """The backend's side is done: `sent`/`received` are its byte counters; `error`
        if it ended by a reset or failure. `owed_answers` (shadows): requests still
        unanswered are counted as timeouts, not as answered requests."""
        if self._recording is not None:
            self._stop_recording()
        self.stats.bytes_sent += sent.bytes
        self.stats.bytes_received += received.bytes
        if error:
            self.stats.errors += 1
        if self._responses is not None:
            if type(self._requests) is RequestFollower:
                self._requests.stop()
            try:
                done = self._responses.close()
            except ProtocolError:
                done = None
                self.stats.errors += 1  # an answer cut short
            if done:  # an answer delimited by the close
                self._complete(done, 0.0, [self._capture.take()] if self._capture else None)
            if owed_answers:
                self.stats.timeouts += self._owed
            self._stop_comparing()
            return
        if self._by_turn:
            if owed_answers and self._turn_sent:
                self.stats.timeouts += 1
            return
        # tcp: one connection is one request.
        if received.first:
            # Time to first byte, from the first request byte, or from the connect when
            # the server speaks first (SMTP, MySQL).
            start = sent.first if 0 < sent.first < received.first else self._connected
            self.stats.record(received.first - start)
        elif owed_answers and sent.bytes:
            self.stats.timeouts += 1  # asked, and nothing came back: no latency to record
        else:
            self.stats.requests += 1

    def _complete(self, done, at: float = 0.0, answers: list | None = None) -> None:
        """Account for the answers `done` completed; `answers`: the same, captured."""
        if not done:
            return
        now = at or monotonic()
        pending = self._pending
        answered = self._answered
        self._answered = now
        record = self.stats.record
        count = len(done)
        if self._comparison is None and self._owed >= count:
            # Every answer to a request sent, nothing compared (a pipeline's answers):
            # answers to requests sent at the same time (in one write) have the same
            # latency, so they are recorded together, one histogram step per write.
            # The errors go with the first record (only their sum is counted).
            failures = sum(map(_IS_ERROR, done))
            self.answers += count
            self.failures += failures
            self._owed -= count
            while count:
                sent, sent_count = pending[0]
                if sent_count > count:
                    pending[0] = (sent, sent_count - count)
                    sent_count = count
                else:
                    pending.popleft()
                record(now - (sent if sent > answered else answered), failures, sent_count)
                failures = 0
                count -= sent_count
            return
        for index, (_status, is_error) in enumerate(done):
            early = not self._owed
            if early:
                if not self._requests.in_message:
                    self._fall_back("a response nobody asked for")
                    return
                # An early answer (a 413 before the body was sent, a server that does
                # not read the body): paired with the request still being sent.
                self._early += 1
                pending.append((self._last_sent, 1))
                self._owed += 1
            sent, sent_count = pending[0]
            if sent_count > 1:
                pending[0] = (sent, sent_count - 1)
            else:
                pending.popleft()
            self._owed -= 1
            latency = now - (sent if sent > answered else answered)
            record(latency, is_error)
            self.answers += 1
            self.failures += is_error
            if self._comparison is not None:
                request = b""
                if self._kept is not None:
                    request = self._request_capture.peek() if early else self._kept.popleft()
                self._comparison.answered(self._name, answers[index] if answers else None,
                                          latency, request)

    def _stop_comparing(self) -> None:
        if self._comparison is not None:
            self._comparison.ended(self._name)
            self._comparison = self._capture = self._request_capture = self._kept = None

    def _stop_recording(self) -> None:
        if self._recording is not None:
            self._recording.stop()
            self._recording = None

    def _stop_framing(self) -> None:
        """From here on, one exchange per client turn: the time from the turn's last
        byte to the first answer byte after it. What was counted so far stays counted;
        a request still unanswered opens the first turn."""
        if self._pending:
            self._turn_sent = self._pending[-1][0]
        self._stop_comparing()
        self._stop_recording()
        if type(self._requests) is RequestFollower:
            self._requests.stop()
        self._requests = self._responses = self._pending = None
        self._by_turn = True

    def _fall_back(self, why: str) -> None:
        self.route_stats.parser_fallbacks += 1
        log.debug("%s: cannot follow the protocol (%s); measuring by turn", self.label, why)
        self._stop_framing()


def new_shared(protocol: str, max_head: int = DEFAULT_MAX_HEAD) -> SharedRequests | None:
    """One framing of a client stream for the Exchanges of every backend it is written
    to, unchanged and whole (not filtered, not rewritten by hooks); None for a protocol
    that frames nothing or whose framer cannot be shared."""
    if protocol not in SHAREABLE:
        return None
    return SharedRequests(protocol, max_head)
