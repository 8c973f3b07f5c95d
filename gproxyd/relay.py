"""The relay loops: move the bytes of a connection, cut-through, with half-close.

Both work on Channels, through their transport API (channel.py).

- `Relay` drives one or both directions with libev callbacks: each chunk moves as it
  arrives, with no greenlet switch; small chunks through one shared buffer, bulk
  streams kernel to kernel through a pipe (`os.splice`). A non-blocking `tap` (shadows,
  observers) may look at each chunk on the way.
- `copy_pump` runs in a greenlet, for hooks: user code that may block, and may change
  or drop what is relayed.

Neither holds a pipe or a buffer while the connection is idle: they go back to a
process-wide free list whenever the source has nothing to read, so an idle proxied
connection costs no buffer memory and no pipe file descriptors.
"""
from __future__ import annotations

import errno
import fcntl
import os
from time import monotonic
from typing import Callable

import gevent
from gevent.hub import Waiter

from .channel import STAMP_SPACE, Channel, arrival

CHUNK = 256 * 1024
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_KEEP_SPARE = 16  # pipes/buffers kept for reuse; more are freed

# A pump that never has to wait (both peers always ready) yields to the other greenlets
# after this many chunks in a row: other connections and shadow writers get their turn.
_FAIR_SHARE = 4

# Why a direction stopped.
EOF = "eof"


class FreeList:
    """Spare pipes or buffers, shared by all connections of the process."""

    def __init__(self, make: Callable, drop: Callable = lambda item: None):
        self._items: list = []
        self._make, self._drop = make, drop

    def take(self):
        return self._items.pop() if self._items else self._make()

    def give(self, item) -> None:
        if len(self._items) < _KEEP_SPARE:
            self._items.append(item)
        else:
            self._drop(item)

    def discard(self, item) -> None:
        self._drop(item)


def _make_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: the default 64 KiB still works
    return read_end, write_end


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def _make_buffer() -> tuple[bytearray, memoryview]:
    buffer = bytearray(CHUNK)
    return buffer, memoryview(buffer)


_pipes = FreeList(_make_pipe, _close_pipe)
_buffers = FreeList(_make_buffer)


class Counter:
    """Bytes moved in one direction, and when the first of them moved."""
    __slots__ = ("bytes", "first")

    def __init__(self):
        self.bytes = 0
        self.first = 0.0


class Broken(Exception):
    """A pump stopped because `channel` failed (reset, broken pipe); `error` says how."""

    def __init__(self, channel: Channel, error: OSError):
        super().__init__(channel, error)
        self.channel, self.error = channel, error


# Small chunks go through this one process-wide buffer: recv_into then send straight
# away. It is never held across a wait (a partial send copies the rest out first), so
# it serves every connection of the process.
SMALL = 64 * 1024
_shared = bytearray(SMALL)
_shared_view = memoryview(_shared)
_shared_buffers = [_shared]  # for recvmsg_into
# Where shadows' answers are read to be counted and dropped (also never held).
discard_buffer = bytearray(SMALL)


class Relay:
    """One or both directions of a connection, driven by libev callbacks.

    No greenlet per direction and no switch per chunk: each readable event moves one
    chunk (small ones through the shared buffer, bulk through a pipe with splice); a
    destination that cannot take it all stops the reading side until its writable
    event has flushed the rest, so backpressure is end to end. Half-close is passed on;
    the relay is done when every direction has seen EOF, or one of them failed.

    `start(on_done)` it: the callbacks own the connection, and `on_done(failure)` is
    called once, from the hub, when it is done; or `run()` it from a greenlet, which
    waits. While it runs, the relay is the only user of its source channels' reading
    and its destination channels' writing.
    """
    __slots__ = ("_ways", "_on_done", "failure", "_open")

    def __init__(self, *directions: Direction):
        for direction in directions:
            direction.relay = self
        self._ways = directions
        self._on_done = None
        self.failure: Broken | None = None
        self._open = len(self._ways)

    def start(self, on_done: Callable[[Broken | None], None]) -> None:
        """Relay from now on; `on_done(failure or None)` when done (must not block)."""
        self._on_done = on_done
        for way in self._ways:
            way.src.start_reading(way._readable)

    def run(self) -> Broken | None:
        """Relay until done (blocks the calling greenlet); returns the failure, if any."""
        waiter = Waiter()
        self.start(waiter.switch)
        try:
            return waiter.get()
        finally:
            self._stop()

    def _stop(self) -> None:
        for way in self._ways:
            way.stop()

    def reached_eof(self, way: "Direction") -> None:
        """`way`'s source has ended (its own reading has stopped)."""
        ways = self._ways
        self._open -= 1
        if self._open == 0:
            if len(ways) == 1:
                way.dst.half_close()
            # else the close() that follows sends the FIN: one syscall less
            self._done(None)
            return
        other = ways[1] if ways[0] is way else ways[0]
        if other.src.read_pending:
            # The other side is readable in this same turn of the loop: its reader passes
            # this EOF on, after its read. When that read is its EOF too (both ends close,
            # as with HTTP's Connection: close), the relay is done and close() sends both
            # FINs: no half-close.
            other.src.start_reading(other._readable_owing_eof)
            return
        way.dst.half_close()  # pass the EOF on

    def failed(self, broken: Broken) -> None:
        """A way failed: the whole relay stops."""
        if self.failure is None:
            # What failed is all anyone reads of it; its tracebacks would hold the frames
            # that raised it, and through them this relay (a cycle).
            broken.__traceback__ = broken.__context__ = broken.error.__traceback__ = None
            self.failure = broken
            self._done(broken)

    def _done(self, failure: Broken | None) -> None:
        if failure is not None:
            self._stop()  # else each way has stopped itself at its EOF
        # The directions refer to their relay: letting go of them here breaks the cycle,
        # so a finished connection is freed by reference counting, not left to the
        # cycle collector (whose passes cost ~10 us a connection under connect load).
        self._ways = ()
        self._on_done(failure)


class Direction:
    """One way of a Relay: src -> dst, counted in `counter`, and its state as it runs
    (what is pending, the pipe when splicing). One object per way: a connection is
    made of two, so nothing more is allocated per connection.

    `tap(chunk)`, if given, sees each chunk (a memoryview it must not keep) right after
    it was written to dst; it runs inside a libev callback, so it must never block.
    Such a direction never splices. `on_eof()` runs at src's EOF, before dst's
    half-close. `stamped`: src stamps arrivals (Channel.stamp_arrivals); the tap is then
    called as tap(chunk, arrived), with channel.arrival()'s time. `clocked`: the tap is
    called as tap(chunk, sending), with the time just before the chunk was written (a
    request's clock starts there: on loopback the answer may arrive before the write
    returns).
    """
    __slots__ = ("relay", "src", "dst", "counter", "tap", "on_eof", "pending", "pipe",
                 "piped", "bulk", "stamped", "clocked")

    def __init__(self, src: Channel, dst: Channel, counter: Counter,
                 tap: Callable[..., None] | None = None,
                 on_eof: Callable[[], None] | None = None, stamped: bool = False,
                 clocked: bool = False):
        self.relay: Relay | None = None  # set by the Relay it joins
        self.src, self.dst, self.counter = src, dst, counter
        self.tap, self.on_eof = tap, on_eof
        self.stamped = stamped and tap is not None
        self.clocked = clocked and tap is not None
        self.pending = None   # bytes read but not yet written (the shared buffer is reused)
        self.pipe = None
        self.piped = 0        # bytes sitting in the pipe
        self.bulk = False

    def stop(self) -> None:
        self.src.stop_reading()
        self.dst.stop_writing()
        if self.pipe is not None:
            (_pipes.give if not self.piped else _pipes.discard)(self.pipe)
            self.pipe = None

    def _readable(self) -> None:
        try:
            if self.bulk:
                if self.pipe is None:
                    self.pipe = _pipes.take()
                try:
                    received = os.splice(self.src.fd, self.pipe[1], CHUNK, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return
                except OSError as error:
                    raise Broken(self.src, error) from None
            else:
                try:
                    if self.stamped:
                        received, ancillary, _, _ = self.src.sock.recvmsg_into(
                            _shared_buffers, STAMP_SPACE)
                    else:
                        received = self.src.sock.recv_into(_shared)
                except BlockingIOError:
                    return
                except OSError as error:
                    raise Broken(self.src, error) from None
            if received == 0:
                # Reading stops here; writing to dst was stopped when this read was
                # started again (_writable), and the pipe, if any, is empty.
                self.src.stop_reading()
                if self.pipe is not None:
                    _pipes.give(self.pipe)
                    self.pipe = None
                if self.on_eof is not None:
                    self.on_eof()
                self.relay.reached_eof(self)
                return
            counter = self.counter
            if not counter.bytes:
                counter.first = monotonic()
            counter.bytes += received
            if self.bulk:
                self.piped = received
                self._flush_pipe()
            else:
                sending = monotonic() if self.clocked else 0.0
                chunk = _shared_view[:received]  # one view for the send and the tap
                try:
                    sent = self.dst.sock.send(chunk)
                except BlockingIOError:
                    sent = 0
                except OSError as error:
                    raise Broken(self.dst, error) from None
                if sent < received:
                    self.pending = chunk[sent:].tobytes()
                    self._wait_for_dst()
                if self.tap is not None:
                    # After production has it: a shadow's loopback write (which runs
                    # the shadow's wake-up in our syscall) must not delay production.
                    if self.stamped:
                        self.tap(chunk, arrival(ancillary))
                    elif self.clocked:
                        self.tap(chunk, sending)
                    else:
                        self.tap(chunk)
            self.bulk = received >= SMALL and self.tap is None
            if not self.bulk and self.pipe is not None and not self.piped:
                _pipes.give(self.pipe)
                self.pipe = None
        except Broken as broken:
            self.relay.failed(broken)
        except BaseException as error:  # never let an error escape into the hub
            self.relay.failed(Broken(self.src, OSError(errno.EIO, repr(error))))

    def _readable_owing_eof(self) -> None:
        """_readable, called once in place of it after the other way's EOF (see
        Relay.reached_eof): then pass that EOF on, unless this read ended the relay."""
        self.src.start_reading(self._readable)  # active: this only puts it back
        self._readable()
        if self.relay._ways:
            self.src.half_close()

    def _flush_pipe(self) -> None:
        """Write the pipe out as far as dst takes it; wait for dst if it is full."""
        while self.piped:
            try:
                self.piped -= os.splice(self.pipe[0], self.dst.fd, self.piped,
                                        flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._wait_for_dst()
                return
            except OSError as error:
                raise Broken(self.dst, error) from None

    def _wait_for_dst(self) -> None:
        self.src.stop_reading()
        self.dst.start_writing(self._writable)

    def _writable(self) -> None:
        try:
            if self.pending is not None:
                try:
                    sent = self.dst.sock.send(self.pending)
                except BlockingIOError:
                    return
                except OSError as error:
                    raise Broken(self.dst, error) from None
                self.pending = self.pending[sent:] or None
                if self.pending is not None:
                    return
            elif self.piped:
                self._flush_pipe()
                if self.piped:
                    return
            self.dst.stop_writing()
            self.src.start_reading(self._readable)
        except Broken as broken:
            self.relay.failed(broken)
        except BaseException as error:
            self.relay.failed(Broken(self.dst, OSError(errno.EIO, repr(error))))


def copy_pump(src: Channel, dst: Channel, counter: Counter,
              on_chunk: Callable[[memoryview], object], on_eof: Callable[[], None]) -> str:
    """Move src -> dst through a reused buffer; each chunk passes through `on_chunk`.

    `on_chunk(chunk)` returns what to write to dst: the chunk itself, other bytes, or
    None to write nothing. It must not keep the memoryview (the next read overwrites
    it). On src's EOF, `on_eof()` runs, dst is half-closed and EOF is returned.
    Raises Broken naming the failed channel.
    """
    recv_into = src.sock.recv_into
    send = dst.sock.send
    buffer = view = None
    ready = False
    streak = 0
    try:
        while True:
            if not ready:
                if buffer is not None:
                    _buffers.give((buffer, view))
                    buffer = None
                src.wait_readable()
                streak = 0
            elif streak == _FAIR_SHARE:
                streak = 0
                gevent.sleep(0)
            if buffer is None:
                buffer, view = _buffers.take()
            try:
                received = recv_into(buffer)
            except BlockingIOError:
                ready = False
                continue
            except OSError as error:
                raise Broken(src, error) from None
            if received == 0:
                on_eof()
                dst.half_close()
                return EOF
            if not counter.bytes:
                counter.first = monotonic()
            counter.bytes += received
            streak += 1
            ready = received == CHUNK  # a short read has drained the socket
            data = on_chunk(view[:received])
            if not data:
                continue
            try:
                try:
                    sent = send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    dst.flush(memoryview(data)[sent:])
            except OSError as error:
                raise Broken(dst, error) from None
    finally:
        if buffer is not None:
            _buffers.give((buffer, view))
