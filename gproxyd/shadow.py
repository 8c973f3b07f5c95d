"""ShadowSink: a bounded, isolated mirror of one client stream to one shadow backend.

The session calls `feed()` with every client chunk and `finish()` at the client's EOF.
Neither ever blocks: bytes go into a queue of at most `shadow-buffer` bytes, and the
sink's own writer greenlet connects and writes. If the queue would overflow, the shadow
connection is dropped (counted, logged once) and production carries on untouched.
A reader greenlet reads the shadow's answers, shows them to the observer and drops them.
"""
from __future__ import annotations

import logging
from collections import deque
from time import monotonic

import gevent
from gevent.event import Event

from .observe import Exchanges
from .relay import Broken, Channel, Counter, connect, is_disconnect, read_all
from .settings import Address
from .stats import ShadowStats

log = logging.getLogger("gproxyd.shadow")


class ShadowSink:
    """Owns one shadow connection: its socket, its queue, its writer and reader greenlets.

    States: connecting -> open -> done (finished normally), or dropped (fell behind by
    more than the buffer), failed (could not connect), reset (broke mid-stream).
    """

    def __init__(self, address: Address, limit: int, connect_timeout: float,
                 stats: ShadowStats, observer: Exchanges, label: str, on_answer=None):
        self.address = address
        self.observer = observer
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._stats = stats
        self._label = label  # "route web client 1.2.3.4:5" for log lines
        self._on_answer = on_answer  # hooks: on_answer(sink, chunk), then (sink, None) at end
        self._queue: deque = deque()
        self._queued = 0
        self._eof = False
        self._wakeup = Event()
        self._channel: Channel | None = None
        self._reader: gevent.Greenlet | None = None
        self.sent = Counter()
        self.received = Counter()
        self.state = "connecting"
        stats.mirrored += 1
        self._writer = gevent.spawn(self._write_loop)

    @property
    def alive(self) -> bool:
        return self.state in ("connecting", "open")

    def feed(self, chunk) -> None:
        """Queue a copy of `chunk` for the shadow; drop the shadow if over the bound."""
        if not self.alive:
            return
        size = len(chunk)
        if self._queued + size > self._limit:
            self._stats.dropped += 1
            log.warning("%s: shadow %s dropped: more than %d bytes waiting (shadow-buffer)",
                        self._label, self.address, self._limit)
            self._stop("dropped")
            return
        self._queue.append(bytes(chunk))
        self._queued += size
        self._wakeup.set()

    def finish(self) -> None:
        """The client sent EOF: pass it on once the queue is written out."""
        self._eof = True
        self._wakeup.set()

    def linger(self, timeout: float) -> None:
        """Give the shadow up to `timeout` to take the rest and answer, then close it."""
        self.finish()
        self._writer.join(timeout=timeout)
        if self.state == "connecting":
            # Out of time before the shadow even accepted: that is a failed connect.
            self._stats.connect_failures += 1
            self._stats.errors += 1
            self._stop("failed")
            self._writer.kill()
            return
        if self.alive:
            self._stop("done")  # out of time; the writer closes the channel
        self._writer.join()

    def _stop(self, state: str) -> None:
        self.state = state
        self._queue.clear()
        self._queued = 0
        self._wakeup.set()
        if self._channel is not None:
            self._channel.abort()  # wakes the writer and reader; the writer closes it

    def _write_loop(self) -> None:
        try:
            channel = connect(self.address, self._connect_timeout)
        except OSError as error:
            if self.alive:
                self._stats.connect_failures += 1
                self._stats.errors += 1
                log.info("%s: shadow %s: cannot connect: %s", self._label, self.address,
                         error.strerror or error)
                self._stop("failed")
            return
        if not self.alive:  # dropped or lingered out while connecting
            channel.close()
            return
        self._channel = channel
        self.state = "open"
        self._reader = gevent.spawn(self._read_loop)
        try:
            self._drain_queue(channel)
        except OSError as error:
            self._lost(error)
        finally:
            self._reader.join()
            channel.close()
            if self.alive:
                self.state = "done"
            self.observer.closed(self.sent, self.received, error=self.state == "reset")
            if self._on_answer is not None:
                self._on_answer(self, None)

    def _drain_queue(self, channel: Channel) -> None:
        queue = self._queue
        while self.alive:
            if not queue:
                if self._eof:
                    channel.shutdown_write()
                    return
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            data = queue[0]
            channel.sendall(data)  # waits for this shadow only; feed() keeps queueing
            if not self.alive:
                return
            queue.popleft()
            self._queued -= len(data)
            if not self.sent.bytes:
                self.sent.first = monotonic()
            self.sent.bytes += len(data)
            if self.observer.framed:
                self.observer.sent(data)

    def _read_loop(self) -> None:
        try:
            read_all(self._channel, self._answer)
        except Broken as broken:
            self._lost(broken.error)

    def _answer(self, chunk) -> None:
        if not self.received.bytes:
            self.received.first = monotonic()
        self.received.bytes += len(chunk)
        if self.observer.framed:
            self.observer.received(chunk)
        if self._on_answer is not None:
            self._on_answer(self, chunk)

    def _lost(self, error: OSError) -> None:
        if not self.alive:
            return
        self._stats.resets += 1
        if not is_disconnect(error):
            log.warning("%s: shadow %s: %s", self._label, self.address, error)
        else:
            log.info("%s: shadow %s: connection lost: %s", self._label, self.address,
                     error.strerror or error)
        self._stop("reset")
