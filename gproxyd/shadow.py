"""ShadowSink: a bounded, isolated mirror of one client stream to one shadow backend.

The session calls `feed()` with every client chunk, after production has it, and
`finish()` at the client's EOF. Neither ever blocks or waits for the shadow. A chunk
that starts a new turn of the conversation (a request after production's answer to the
one before) is written at once if the shadow has answered the turn before too, and so is
a connection's first chunk; any other chunk is written at once when nothing else waits
in this turn of the event loop, else queued and written once the loop has served what
was waiting (production first; see _SpareTime); with `shadow-write-delay`, it is queued
and written with whatever else the same client sent within the delay. What the
shadow's socket does not take stays queued until it is writable. One queue holds at
most `shadow-buffer` bytes, and all the queues of the process together at most
`shadow-memory` (BUDGET): a shadow
connection past either is dropped (counted, logged once) while production carries on
untouched. Connecting, flushing the queue and reading (and discarding) the
shadow's answers are driven by libev callbacks on the shadow's own socket: no greenlet
per shadow, so a healthy shadow costs little and a dead one nothing.
"""
from __future__ import annotations

import logging
import mmap
import resource
import socket
import weakref
from collections import deque
from heapq import heapify, heappop, heappush, heapreplace
from itertools import count, islice
from time import monotonic
from typing import Callable

import gevent
from gevent import GreenletExit
from gevent.event import Event
from gevent.queue import SimpleQueue

from .channel import STAMP_SPACE, Channel, arrival, is_disconnect
from .config import Route
from .relay import FreeList, discard_buffer
from .settings import GLOBAL_BY_NAME
from .stats import ShadowMemoryStats
from .upstream import Upstream

log = logging.getLogger("gproxyd.shadow")


class _Lingering:
    """The shadow connections still open after their session ended (shadow-linger),
    oldest first. Nothing else counts them: past `limit` (shadow-max-connections; 0: a
    quarter of the open-files limit) the oldest is dropped, so that a stalled shadow
    and clients that open many short connections cannot take the descriptors
    production needs."""

    def __init__(self):
        self.limit = 0
        self._sinks: dict[ShadowSink, None] = {}
        self._logged = 0.0

    def add(self, sink: "ShadowSink") -> None:
        self._sinks[sink] = None
        bound = self.limit or self._nofile_bound or self._default_bound()
        while len(self._sinks) > bound:
            oldest = next(iter(self._sinks))
            del self._sinks[oldest]
            oldest.drop("over-shadow-max-connections")
            now = monotonic()
            if now - self._logged > 10:
                self._logged = now
                log.warning("%d shadow connections lingering (shadow-max-connections): "
                            "dropping the oldest", bound)

    def discard(self, sink: "ShadowSink") -> None:
        self._sinks.pop(sink, None)

    _nofile_bound = 0

    def _default_bound(self) -> int:
        """A quarter of the open-files limit (read once: a syscall per lingering sink)."""
        if not self._nofile_bound:
            self._nofile_bound = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        return self._nofile_bound


LINGERING = _Lingering()


def _autotuning_most() -> int:
    """The largest send buffer the kernel's autotuning gives a TCP socket (tcp_wmem's
    third value; 4 MiB unless the host says otherwise)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as values:
            return int(values.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


_AUTOTUNING_MOST = _autotuning_most()


def _largest_settable() -> int:
    """net.core.wmem_max: the most SO_SNDBUF takes (the kernel then doubles it); 0 if
    unknown."""
    try:
        with open("/proc/sys/net/core/wmem_max") as value:
            return int(value.read())
    except (OSError, ValueError):
        return 0


# Read once, like tcp_wmem above: what a socket is granted follows from it, so it is not
# read back from each socket (a getsockopt a shadow connection). Under 4 KiB the kernel's
# own minimum may apply instead: then it is read back.
_LARGEST_SETTABLE = _largest_settable()
_GRANTED_IS_KNOWN = _LARGEST_SETTABLE >= 4096
# The smallest kernel send buffer a shadow socket gets however many there are (the
# kernel's size, which is twice what SO_SNDBUF asks for).
SEND_BUFFER_FLOOR = 32 * 1024


def send_buffer_for(memory: int, most: int, sockets: int, granted: int,
                    autotuning_most: int = _AUTOTUNING_MOST) -> int | None:
    """The kernel send buffer (in the kernel's count: twice SO_SNDBUF) a shadow socket
    gets as it connects, or None: leave it to the kernel's autotuning, as production's.

    An eighth of shadow-memory (`memory`) shared among the shadow sockets open, itself
    included (`sockets` + 1); at most `most` (shadow-buffer) and autotuning's largest
    (which is left to autotuning: the buffer grows only as far as the connection needs),
    at least SEND_BUFFER_FLOOR. All of them together (`granted` so far) get at most half
    of shadow-memory: past it, a new one gets the floor. A stalled shadow fills its
    socket's buffer once; from then on a chunk costs an append to its queue (counted in
    shadow-memory), not a send() copying into fresh kernel memory.
    """
    size = min(most, autotuning_most, memory // 8 // (sockets + 1))
    if granted + size > memory // 2:
        return SEND_BUFFER_FLOOR
    if size >= autotuning_most:
        return None
    return max(SEND_BUFFER_FLOOR, size)


# A shadow connection enters the budget's heap each time its queue grows past another
# 16 KiB: "furthest behind" is exact to within that much.
_STEP_BITS = 14
_COMPACT_AT = 4096  # heap entries before the first clean-up of superseded ones


class _Budget:
    """shadow-memory: the memory holding what waits to be written to shadows in this
    process, over all routes and connections, and which shadow connection is furthest
    behind; also the kernel send buffers of shadow sockets (send_buffer_for).

    A ShadowSink adds what its queue grows by to `queued` (the queue's `held`: whole 64
    KiB blocks, as they are resident) and takes off what it writes or lets go. Past
    `limit`, the shadow connection whose queue holds the most is dropped (over-budget),
    then the next, until the total fits again: the sink that just queued is dropped only
    if it is that one. Finding it stays cheap with many connections: a sink enters a
    max-heap each time its queue grows past another 16 KiB, and an entry whose queue has
    shrunk since is put back at its size of now when it comes up (lazily), so a drop
    costs O(log n) amortised, and queueing a chunk an add and three compares.

    `limit` is the option's default until the lifecycle sets it (start and reload).
    """

    def __init__(self):
        option = GLOBAL_BY_NAME["shadow-memory"]
        self.limit: int = option.parse(option.default)
        self.queued = 0
        self.high_water = 0
        self.sockets = 0        # TCP shadow sockets open, each with its send buffer...
        self.send_buffers = 0   # ...granted (the kernel's sizes), in total
        self.drops: dict[str, int] = {}          # cause -> shadow connections
        self.dropped_bytes: dict[str, int] = {}  # cause -> bytes let go unwritten
        # (-(held >> _STEP_BITS), serial, [sink]), lazily kept: the sink's own one-item
        # list, emptied when it ends, so that stale entries do not keep it alive.
        self._heap: list = []
        self._serial = count()
        self._compact_at = _COMPACT_AT

    def grew(self, sink: "ShadowSink") -> None:
        """`sink`'s queue has grown past its last step: enter it at its size of now."""
        step = sink.held >> _STEP_BITS
        sink.budget_step = step
        if sink.budget_entry is None:
            sink.budget_entry = [sink]
        heappush(self._heap, (-step, next(self._serial), sink.budget_entry))
        if len(self._heap) > self._compact_at:
            self._compact()

    def make_room(self, feeding: "ShadowSink") -> bool:
        """Over the limit: drop the shadow connections furthest behind until the total
        fits; False if `feeding` (it has just queued a chunk) was one of them."""
        while self.queued > self.limit:
            # Every queue under one step (thousands of connections): any is as far behind.
            sink = self._furthest_behind() or feeding
            sink.drop("over-budget", f"furthest behind ({sink.queued} bytes waiting) when "
                                     f"{self.queued} bytes waited for shadows (shadow-memory)")
            if sink is feeding:
                return False
        return True

    def let_go(self, sink: "ShadowSink", cause: str | None) -> None:
        """`sink` is ending: what its queue holds is let go; `cause`: why (one of
        stats.DROP_CAUSES), None if it was not dropped and nothing waited."""
        queue = sink._queue
        self.queued -= queue.held
        if cause is not None:
            self.drops[cause] = self.drops.get(cause, 0) + 1
            self.dropped_bytes[cause] = self.dropped_bytes.get(cause, 0) + queue.size
        if sink.budget_entry is not None:
            sink.budget_entry[0] = None

    def size_send_buffer(self, sock: socket.socket, most: int) -> int:
        """Give a TCP shadow socket its kernel send buffer (send_buffer_for); returns
        what it was granted, for release_send_buffer() when it closes."""
        size = send_buffer_for(self.limit, most, self.sockets, self.send_buffers)
        if size is None:
            granted = _AUTOTUNING_MOST
        else:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size // 2)
                granted = 2 * min(size // 2, _LARGEST_SETTABLE) if _GRANTED_IS_KNOWN \
                    else sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                return 0
        self.sockets += 1
        self.send_buffers += granted
        return granted

    def release_send_buffer(self, granted: int) -> None:
        self.sockets -= 1
        self.send_buffers -= granted

    def stats(self) -> ShadowMemoryStats:
        return ShadowMemoryStats(limit=self.limit, queued=self.queued,
                                 high_water=self.high_water, send_buffers=self.send_buffers,
                                 drops=dict(self.drops), dropped_bytes=dict(self.dropped_bytes))

    def _furthest_behind(self) -> "ShadowSink | None":
        heap = self._heap
        while heap:
            negative, _, entry = heap[0]
            sink = entry[0]
            if sink is None or sink.budget_step != -negative:
                heappop(heap)  # ended, or entered again since at a larger size
                continue
            step = sink.held >> _STEP_BITS
            if step == -negative:
                return sink  # no one else's queue is larger than its entry says
            sink.budget_step = step  # it has written some since: put it back as it is now
            if step:
                heapreplace(heap, (-step, next(self._serial), entry))
            else:
                heappop(heap)
        return None

    def _compact(self) -> None:
        """Forget the superseded entries (amortised: at most once per as many pushes)."""
        current = {id(entry): (negative, entry) for negative, _, entry in self._heap
                   if entry[0] is not None and entry[0].budget_step == -negative}
        self._heap = [(negative, next(self._serial), entry)
                      for negative, entry in current.values()]
        heapify(self._heap)
        self._compact_at = max(_COMPACT_AT, 2 * len(self._heap))


BUDGET = _Budget()


def memory_stats() -> ShadowMemoryStats:
    """shadow-memory in this process now: for /stats ("shadow_memory") and /metrics."""
    return BUDGET.stats()


_discard_buffers = [discard_buffer]  # for recvmsg_into
_LAZY_READ = 32 * 1024  # SO_RCVLOWAT once a tcp-level shadow has answered
_CALM_TURNS = 16  # turns in a row it had answered in time before reading lazily again
# Bytes waiting for the write delay that are written at once instead: a bulk stream
# gains nothing from waiting, and waiting must never fill shadow-buffer by itself.
_WRITE_NOW = 64 * 1024
# The longest a busy proxy keeps shadows waiting for spare time.
_LATEST = 0.002
# Queued bytes written to shadows in one turn of the event loop, at most (give or take one
# write): a shadow catching up on a backlog (its turn timed out after a second of queueing,
# or its socket became writable again) goes on in spare time (_SpareTime), so that
# production's events that came meanwhile wait for half a MiB of copying, not for
# megabytes. Twice what production's relay reads at once (relay.CHUNK): one client
# streaming at full speed does not leave its shadow behind.
_WRITTEN_PER_TURN = 512 * 1024
_this_turn = [-1, 0]  # the loop's iteration, and the queued bytes written in it
# A connection's answers are compared in size only from this many bytes on (production's
# or the shadow's): below, a small difference is a large share.
_DIVERGENCE_FLOOR = 64 * 1024
# A shadow's error answers on one connection count as "far above production's" from
# this many on, when they are more than twice production's and at least 10% of its answers.
_ERRORS_FLOOR = 5


_BLOCK = 64 * 1024
_MOST_PER_WRITE = 64  # queued pieces in one sendmsg()
# A block that is not kept as a spare is simply let go: the last reference to an mmap
# unmaps it, so its memory goes back to the system at once. MAP_POPULATE maps its pages
# in one go: half the cost of faulting them in one by one as the block fills.
_BLOCK_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
_spare_blocks = FreeList(lambda: mmap.mmap(-1, _BLOCK, flags=_BLOCK_FLAGS))


class _Block:
    """64 KiB of anonymous memory being filled (at end) and drained (from start)."""
    __slots__ = ("memory", "start", "end")

    def __init__(self):
        self.memory = _spare_blocks.take()
        self.memory.seek(0)  # writes go at the position: end
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def fill(self, data: memoryview) -> int:
        """Copy in as much of `data` as there is room for; how much that was."""
        count = min(_BLOCK - self.end, len(data))
        self.memory.write(data[:count] if count < len(data) else data)
        self.end += count
        return count

    def view(self) -> memoryview:
        return memoryview(self.memory)[self.start:self.end]

    def release(self) -> None:
        _spare_blocks.give(self.memory)
        self.memory = None


class _Queue:
    """The bytes one shadow has not taken yet, in order.

    A shadow that keeps up never has more than a write delay's worth waiting: those
    pieces stay small bytes objects, cheap to make, written together by one sendmsg().
    Past _WRITE_NOW waiting, the shadow is behind, and the rest goes into 64 KiB blocks
    of anonymous memory (mmap): freed heap objects would leave the process's heap
    fragmented at the peak of every past stall, while blocks are reused or unmapped as
    soon as they are drained, or the shadow dropped.

    `size` counts the bytes waiting; `held` the memory holding them (the bytes pieces,
    and each block whole, however little of it waits): that is what shadow-memory counts.
    """
    __slots__ = ("_pieces", "size", "held")

    def __init__(self):
        self._pieces: deque = deque()   # bytes, and then _Blocks
        self.size = 0
        self.held = 0

    def append(self, data) -> None:
        """Copy `data` (any bytes-like object) in at the end."""
        size = len(data)
        if not size:
            return
        pieces = self._pieces
        self.size += size
        last = pieces[-1] if pieces else None
        if type(last) is _Block:
            # Once in blocks, in blocks until they are drained: a heap piece behind a
            # block would make the next append start another block before that one is
            # full (more than two partly used blocks).
            if _BLOCK - last.end >= size:  # most appends: one copy
                last.memory.write(data)
                last.end += size
                return
        elif self.size <= _WRITE_NOW:
            pieces.append(bytes(data))
            self.held += size
            return
        view = memoryview(data)
        while view:
            if type(last) is not _Block or last.end == _BLOCK:
                last = _Block()
                pieces.append(last)
                self.held += _BLOCK
            view = view[last.fill(view):]

    def pieces(self, limit: int | None = None) -> list:
        """The first waiting pieces, in order (up to _MOST_PER_WRITE of them, and at most
        `limit` bytes), to be written with one sendmsg(); use them before the next
        consume() or clear()."""
        found = [piece if type(piece) is bytes else piece.view()
                 for piece in islice(self._pieces, _MOST_PER_WRITE)]
        if limit is not None:
            kept, left = [], limit
            for piece in found:
                if left <= 0:
                    break
                kept.append(piece if len(piece) <= left else piece[:left])
                left -= len(piece)
            found = kept
        return found

    def consume(self, count: int) -> None:
        """The first `count` waiting bytes were written: forget them."""
        self.size -= count
        pieces = self._pieces
        while count:
            piece = pieces[0]
            size = len(piece)
            if count < size:
                if type(piece) is bytes:
                    pieces[0] = piece[count:]
                    self.held -= count
                else:
                    piece.start += count
                return
            count -= size
            pieces.popleft()
            if type(piece) is _Block:
                piece.release()
                self.held -= _BLOCK
            else:
                self.held -= size

    def clear(self) -> None:
        for piece in self._pieces:
            if type(piece) is _Block:
                piece.release()
        self._pieces.clear()
        self.size = 0
        self.held = 0


# What a shadow connection that has not queued anything reads as its queue (sizes 0);
# never appended to: most shadows of short connections write everything at once.
_NOTHING_QUEUED = _Queue()


class _SpareTime:
    """Writes the queued shadow chunks once the event loop has nothing else to do.

    A chunk that arrives while other events wait in the same turn of the loop (other
    clients' requests, production's answers) is queued, and written when the loop
    finds nothing pending (a libev idle watcher): under a burst, production's part of
    it is served first, and a shadow gets what its client sent meanwhile in one
    write. A loop that never runs out of work writes them at the latest after _LATEST.
    A connection's first chunk does not wait here, nor does a chunk that starts a new
    turn (see ShadowSink.feed). Waiting made the shadow answer a new turn after the
    client's next request, which then waited for the answer; a saturated route with a
    healthy shadow on the same 2 cores kept 0.38-0.39x of its no-shadow req/s that way,
    0.46-0.52x with new turns written at once (bench/run.py --only shadow-matrix,
    bench/results.md). A first chunk (with Connection: close, the whole request) saves
    the copy into the queue and the trip through spare time.
    """

    def __init__(self):
        loop = gevent.get_hub().loop
        self._idle = loop.idle()
        # One-shot timers that are armed again and again: libev's again() re-arms from
        # now (start() on a timer that has fired once would fire at the next turn),
        # and the repeat it uses is stopped in the callback.
        self._deadline = loop.timer(_LATEST, _LATEST)
        self._sinks: list = []

    def add(self, sink: "ShadowSink") -> None:
        if not self._sinks:
            self._idle.start(self._run)
            self._deadline.again(self._run)
        self._sinks.append(sink)

    def _run(self) -> None:
        self._idle.stop()
        self._deadline.stop()
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.write_waiting()


_spare_times: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


_last_spare: list = [None, None]  # (hub, its _SpareTime): one sink after another asks


def _spare_time() -> _SpareTime:
    """The _SpareTime of this thread's hub."""
    hub = gevent.get_hub()
    if _last_spare[0] is hub:
        return _last_spare[1]
    spare = _spare_times.get(hub)
    if spare is None:
        spare = _spare_times[hub] = _SpareTime()
    _last_spare[:] = [hub, spare]
    return spare


class ShadowSink:
    """Owns one shadow connection (an Upstream): its queue and its part of the traffic.

    States: connecting -> open -> one outcome (stats.OUTCOMES), decided when linger()
    ends: done (finished normally), dropped (fell behind by more than shadow-buffer, or
    furthest behind when shadow-memory was full, or lingering past shadow-max-connections),
    failed (could not connect), reset (broke mid-stream), timeout (requests still
    unanswered when linger ended), diverged (it closed or reset while production
    carried on, or its answers differ from production's in size or error rate; see
    _divergence). `why` says more, for the log line.
    """
    # One a shadow connection: no instance dict to fill, and none for the cycle
    # collector to traverse while the connection lives.
    __slots__ = ("upstream", "_reference", "_reference_sent", "_divergence_share", "why",
                 "address", "name", "_limit", "_stats", "_label", "_queue", "budget_step",
                 "budget_entry", "_send_buffer", "_write_delay", "_delay_timer", "_loop",
                 "_waiting", "_eof", "_written_eof", "_answered", "_channel", "_ended",
                 "state", "alive", "_turns", "_fed", "_gate_mark", "_received_when_written",
                 "_turn_timeout", "_keeps_turns", "_lazy", "_calm", "_stamped",
                 "_turn_timer", "_settle", "_on_answer", "_answers", "_answer_greenlet")

    def __init__(self, upstream: Upstream, route: Route, label: str, spawn: Callable,
                 reference: Upstream, on_answer: Callable | None = None):
        """`label` ("route web client 1.2.3.4:5") starts its log lines; `spawn` starts a
        greenlet (connecting to a host name); `reference` is production's connection, to
        compare with; `on_answer(sink, chunk)` gets each answer, then None, in a
        greenlet of its own (hooks may block)."""
        self.upstream = upstream
        self._reference = reference
        self._reference_sent = 0    # what the client had sent production when this ended
        # A filtered shadow answers fewer requests than production: sizes don't compare.
        self._divergence_share = None if route.shadow_filter else route.shadow_divergence
        self.why = ""
        self.address = upstream.address
        self.name = upstream.address.text
        self._limit = route.shadow_buffer
        self._stats = upstream.stats
        self._label = label
        self._queue = _NOTHING_QUEUED  # its own _Queue from the first chunk it queues
        self.budget_step = 0        # BUDGET's bookkeeping: the step of its newest heap entry,
        self.budget_entry = None    # and what its heap entries hold (see _Budget)
        self._send_buffer = 0       # the kernel send buffer BUDGET granted its socket
        # Each shadow connection times its own delay: one timer for all would write to
        # every shadow at the same moment, and a shadow would get its requests in
        # bursts production never saw (queueing in the shadow, measured as its latency).
        self._write_delay = route.shadow_write_delay
        self._delay_timer = None    # created at the first delayed write
        self._loop = gevent.get_hub().loop
        self._waiting = False       # the delay timer runs, or spare time is awaited
        self._eof = False           # the client has sent EOF
        self._written_eof = False   # ...and it has been passed on to the shadow
        self._answered = False      # the shadow has sent EOF
        self._channel: Channel | None = None
        self._ended: Event | None = None  # what linger() waits on, while it does
        self.state = "connecting"
        self.alive = True           # state is connecting or open: no outcome yet
        # Turns: offsets in the client stream where a chunk came that production got only
        # after it had answered. The shadow gets the bytes from such an offset on only
        # once it has answered too (or after shadow-turn-timeout): handshakes then reach
        # it as they reached production (PostgreSQL's SSLRequest, then StartupMessage).
        self._turns: deque | tuple[()] = ()  # a deque from the first turn that waits
        self._fed = 0               # bytes of the client stream given to feed()
        self._gate_mark = -1        # answer bytes when the turn's gate was reached
        self._received_when_written = 0  # answer bytes when all fed bytes were written
        self._turn_timeout = route.shadow_turn_timeout
        self._keeps_turns = True
        self._lazy = False          # answers are read in bulk (SO_RCVLOWAT raised)
        self._calm = 0              # turns in a row that found the shadow had answered
        self._stamped = False       # reads carry the kernel's arrival time
        self._turn_timer = None
        self._settle = None         # linger_then(): (its timer, on_done)
        self._on_answer = on_answer
        self._answers: SimpleQueue | None = None
        self._answer_greenlet: gevent.Greenlet | None = None
        if on_answer is not None:
            self._answers = SimpleQueue()
            self._answer_greenlet = spawn(self._deliver_answers)
        self._stats.mirrored += 1
        upstream.connect(route.shadow_connect_timeout, self._connected, spawn)

    @property
    def queued(self) -> int:
        """Bytes waiting to be written to the shadow."""
        return self._queue.size

    @property
    def held(self) -> int:
        """The memory holding them, as shadow-memory counts it (see _Queue)."""
        return self._queue.held

    # --- what the session calls ----------------------------------------------------------

    def feed(self, chunk, new_turn: bool = False) -> None:
        """Write `chunk` to the shadow now if it starts a turn the shadow is ready for or
        the connection, or if nothing else waits for the event loop; else queue a copy
        of it for spare time (or for the write delay, or for the shadow's answer to the
        turn before); drop the shadow if its queue would overflow. `new_turn`: production got this
        chunk only after it had answered (see _turns)."""
        state = self.state
        if state != "open" and state != "connecting":
            return
        turns = self._turns
        if new_turn and self._keeps_turns:
            upstream = self.upstream
            if self._fed != upstream.sent.bytes:
                turns = self._gate(self._fed)  # once the bytes before are written
            elif (upstream.received.bytes <= self._received_when_written
                    and not (self._lazy and self._read_now())):
                turns = self._gate(self._fed)  # all written, no answer since: wait for one
                self._gate_mark = self._received_when_written
            else:  # it has answered since all before was written: nothing to wait for
                self._calm += 1
                if self._calm == _CALM_TURNS and not self._lazy:
                    self._read_lazily()
        first = not self._fed
        self._fed += len(chunk)
        if (state == "open" and not self._write_delay and not self._queue.size
                and (new_turn or first or not self._loop.pendingcnt)
                and (not turns or self._room() >= len(chunk))):
            # A new turn (one request of a request-reply conversation) has nothing to be
            # batched with, and waiting would make the shadow answer after the client's
            # next request, which would then wait for it (see _turns): it goes now; so
            # does the connection's first chunk (its first request: nothing came before
            # it). A chunk continuing a stream goes now only if nothing else waits in
            # this turn of the event loop (no one to go first).
            sent = self._send(chunk)
            if sent is None or sent == len(chunk):
                return
            chunk = chunk[sent:]
            self._channel.start_writing(self._writable)
        if not self._enqueue(chunk):
            return
        if self.state != "open" or self._channel.waiting_to_write:
            return  # written once connected, or by the writer, with the rest
        if self._turns and not self._room():
            self._wait_for_turn()  # for the shadow's answer to the turn before
            return
        if self._queue.size >= _WRITE_NOW:
            self._write_queue()
            return
        if self._waiting:
            return
        self._waiting = True
        if self._write_delay:
            if self._delay_timer is None:
                # Armed with again(), stopped when it fires: see _SpareTime.
                self._delay_timer = self._loop.timer(self._write_delay, self._write_delay)
            self._delay_timer.again(self.write_waiting)
        else:
            _spare_time().add(self)

    def _enqueue(self, chunk) -> bool:
        """Queue a copy of `chunk`; False if that dropped this shadow connection (past
        shadow-buffer, or the furthest behind when shadow-memory is full)."""
        queue = self._queue
        if queue is _NOTHING_QUEUED:
            queue = self._queue = _Queue()
        size = len(chunk)
        if queue.size + size > self._limit:
            self.drop("over-buffer", f"more than {self._limit} bytes waiting (shadow-buffer)")
            return False
        held = queue.held
        queue.append(chunk)
        budget = BUDGET
        budget.queued += queue.held - held
        if queue.held >> _STEP_BITS > self.budget_step:
            budget.grew(self)
        if budget.queued > budget.limit and not budget.make_room(self):
            return False
        if budget.queued > budget.high_water:
            budget.high_water = budget.queued
        return True

    def finish(self) -> None:
        """The client sent EOF: pass it on once the queue is written out."""
        self._eof = True
        if self.state != "open" or self._channel.waiting_to_write:
            return  # connecting, gone, or the writer passes the EOF on when it is done
        if self._queue.size:
            self._write_queue()  # nothing more is coming: no point waiting for the delay
        else:
            self._pass_eof()

    def linger(self, timeout: float) -> None:
        """Give the shadow up to `timeout` to take the rest and answer, then close it
        and decide its outcome (after the session has ended: production's counters are
        final)."""
        self.finish()
        if self.alive:
            LINGERING.add(self)
            self._ended = Event()
            try:
                self._ended.wait(timeout)
            finally:
                LINGERING.discard(self)
        self._decide()
        if self._answer_greenlet is not None:
            self._answer_greenlet.join(timeout=1)

    def linger_then(self, timeout: float, on_done: Callable[[], None]) -> None:
        """linger() without blocking, from the hub (a sink without on_answer: no answer
        greenlet to join): `on_done()` once the outcome is decided, at the latest after
        `timeout`. A greenlet per lingering connection costs ~15 us more."""
        if not self._eof:  # else the session's finish() at the client's EOF is done
            self.finish()
        if not self.alive:
            self._decide()
            on_done()
            return
        LINGERING.add(self)
        self._settle = (self._loop.timer(timeout), on_done)
        self._settle[0].start(self._settled)

    def _settled(self) -> None:
        """Ended (called by _end), or out of linger time: whichever comes first."""
        if self._settle is None:
            return
        (timer, on_done), self._settle = self._settle, None
        timer.stop()
        timer.close()
        LINGERING.discard(self)
        self._decide()
        on_done()

    def _decide(self) -> None:
        """After lingering: close it if it is still open, and count its outcome."""
        if self.state == "connecting":
            # Out of time before the shadow even accepted: that is a failed connect.
            self._stats.connect_failures += 1
            self._stats.errors += 1
            self._end("failed")
        elif self.alive:
            unanswered = self._unanswered()
            if unanswered:
                self.why = f"{unanswered}-unanswered"
                self._end("timeout")
            else:
                self._end("done")
        if self.state in ("done", "reset"):
            why = self._divergence()
            if why:
                self.state, self.why = "diverged", why
        self._stats.ended(self.state)

    def drop(self, why: str, message: str = "") -> None:
        """Drop this shadow connection now, `why` being one of stats.DROP_CAUSES;
        `message` (what was exceeded) is logged."""
        if self.alive:
            if message:
                log.warning("%s: shadow %s dropped: %s", self._label, self.address, message)
            self._stats.dropped += 1
            self.why = why
            self._end("dropped")

    def _unanswered(self) -> int:
        observer = self.upstream.observer
        if observer.watching:
            return observer.unanswered
        return int(bool(self.upstream.sent.bytes) and not self.upstream.received.bytes)

    def _divergence(self) -> str:
        """Why this shadow's connection cannot be compared with production's, or ""."""
        reference = self._reference
        if reference.sent.bytes > self._reference_sent:
            return "closed-while-production-carried-on"
        mine, theirs = self.upstream.received.bytes, reference.received.bytes
        larger = max(mine, theirs)
        if (self._divergence_share is not None and larger >= _DIVERGENCE_FLOOR
                and abs(mine - theirs) > self._divergence_share * larger):
            return f"answered-{mine}-bytes-production-{theirs}"
        own, base = self.upstream.observer, reference.observer
        if (own.failures >= _ERRORS_FLOOR and own.failures > 2 * base.failures
                and own.failures * 10 >= own.answers):
            return f"errors-{own.failures}-production-{base.failures}"
        return ""

    # --- connecting ------------------------------------------------------------------------

    def _connected(self, error: OSError | None) -> None:
        if error is not None:  # logged as an outage by the Upstream
            log.debug("%s: shadow %s: cannot connect: %s", self._label, self.address,
                      error.strerror or error)
            self._end("failed")
            return
        self.state = "open"
        self._channel = channel = self.upstream.channel
        # Answers timed as they arrived, not as they were read (the loop may be busy).
        self._stamped = self.upstream.observer.watching
        if self._stamped:
            channel.stamp_arrivals()
        if channel.sock.family != socket.AF_UNIX:
            self._send_buffer = BUDGET.size_send_buffer(channel.sock, self._limit)
        channel.start_reading(self._readable)
        if self._queue.size:
            channel.start_writing(self._writable)
        elif self._eof:
            self._pass_eof()

    # --- writing ---------------------------------------------------------------------------

    def _send(self, data) -> int | None:
        """One non-blocking write of a bytes-like object or of a list of them; the count
        sent, or None if the shadow broke."""
        upstream = self.upstream
        observer = upstream.observer
        watching = observer.watching
        # The requests' clock starts before the write (see Direction).
        sending = monotonic() if watching else 0.0
        try:
            if type(data) is list:
                sent = self._channel.sock.sendmsg(data)
            else:
                sent = self._channel.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            self._lost(error)
            return None
        if sent:
            counter = upstream.sent
            if not counter.bytes:
                counter.first = monotonic()
            counter.bytes += sent
            if counter.bytes == self._fed:
                self._received_when_written = upstream.received.bytes
            if self._turns and counter.bytes == self._turns[0]:
                self._gate_mark = upstream.received.bytes
            if watching:
                left = sent
                for part in data if type(data) is list else (data,):
                    observer.sent(part[:left], sending)
                    left -= len(part)
                    if left <= 0:
                        break
        return sent

    def write_waiting(self) -> None:
        """The wait is over (write delay, or spare time): write what queued up."""
        self._waiting = False
        if self._delay_timer is not None:
            self._delay_timer.stop()
        if self.state == "open" and not self._channel.waiting_to_write:
            self._write_queue()

    def _write_queue(self) -> None:
        """Write what queued up; the writer takes over what the shadow does not take."""
        self._writable()
        if (self._queue.size and self.alive and not self._waiting
                and (not self._turns or self._room())):
            self._channel.start_writing(self._writable)

    def _writable(self) -> None:
        queue = self._queue
        this_turn = _this_turn
        while queue.size:
            room = self._room() if self._turns else None
            if room == 0:  # the shadow has not answered the turn before yet
                self._channel.stop_writing()
                self._wait_for_turn()
                return
            iteration = self._loop.iteration
            if this_turn[0] != iteration:
                this_turn[0], this_turn[1] = iteration, 0
            left = _WRITTEN_PER_TURN - this_turn[1]
            if left <= 0:
                # Enough for this turn: the rest waits for spare time (_SpareTime), not
                # for the socket's next writable event: with many shadows behind, their
                # writers would each be called in every turn only to find nothing left.
                self._channel.stop_writing()
                if not self._waiting:
                    self._waiting = True
                    _spare_time().add(self)
                return
            pieces = queue.pieces(left if room is None else min(room, left))
            sent = self._send(pieces[0] if len(pieces) == 1 else pieces)
            if sent is None:
                return
            this_turn[1] += sent
            held = queue.held
            queue.consume(sent)
            BUDGET.queued -= held - queue.held
            if sent < sum(map(len, pieces)):
                return
        self._channel.stop_writing()
        if self._eof:
            self._pass_eof()

    # --- turns -----------------------------------------------------------------------------

    def _gate(self, offset: int) -> deque:
        """A turn starts at `offset` of the client stream; the turns waiting."""
        turns = self._turns
        if type(turns) is tuple:
            turns = self._turns = deque()
        turns.append(offset)
        return turns

    def _room(self) -> int:
        """How many more bytes the shadow may be given now (turns permitting)."""
        turns = self._turns
        written = self.upstream.sent.bytes
        while turns:
            if written < turns[0]:
                return turns[0] - written
            if self.upstream.received.bytes <= self._gate_mark and not self._read_now():
                return 0  # no answer since the turn before was written
            turns.popleft()  # answered: the next turn may go
            self._gate_mark = -1
        return 1 << 62

    def _wait_for_turn(self) -> None:
        """Wait for the shadow's answer (see _readable), at most shadow-turn-timeout."""
        self._calm = 0
        if self._lazy:
            # Turns need to see each answer: read them as they come (one syscall) until
            # the shadow keeps up again (_CALM_TURNS in a row: switching back and forth at
            # every turn would cost more than it saves).
            self._lazy = False
            self._set_low_water(1)
        if self._turn_timer is None:
            # Armed with again(), stopped when it fires: see _SpareTime.
            self._turn_timer = self._loop.timer(self._turn_timeout, self._turn_timeout)
        if not self._turn_timer.active:
            self._turn_timer.again(self._turn_timed_out)

    def _turn_timed_out(self) -> None:
        self._turn_timer.stop()
        if not self.alive or not self._turns or self._room():
            return
        # A shadow that does not answer in time does not follow the conversation (it
        # is not a replica of production, or it is stuck): stop keeping turns for this
        # connection, so that it gets the rest as a stream instead of one turn a timeout.
        self._stats.turn_timeouts += 1
        self._turns.clear()
        self._keeps_turns = False
        if self.state == "open" and not self._channel.waiting_to_write:
            self._write_queue()

    def _answered_turn(self) -> None:
        """The shadow answered: a turn waiting for it may be written."""
        if self._turn_timer is not None:
            self._turn_timer.stop()
        if self._queue.size and not self._channel.waiting_to_write and self._room():
            self._write_queue()

    def _pass_eof(self) -> None:
        if not self._written_eof:
            self._written_eof = True
            self._channel.half_close()
            self._maybe_done()

    # --- reading ---------------------------------------------------------------------------

    def _readable(self) -> None:
        arrived = 0.0
        try:
            if self._stamped:
                received, ancillary, _, _ = self._channel.sock.recvmsg_into(
                    _discard_buffers, STAMP_SPACE)
                arrived = arrival(ancillary)
            else:
                received = self._channel.sock.recv_into(discard_buffer)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(error)
            return
        if received == 0:
            self._channel.stop_reading()
            self._answered = True
            self._maybe_done()
            return
        counter = self.upstream.received
        observer = self.upstream.observer
        if not counter.bytes:
            counter.first = monotonic()
            self._read_lazily()
        counter.bytes += received
        if observer.watching:
            observer.received(memoryview(discard_buffer)[:received], arrived)
        if self._answers is not None:
            self._answers.put(bytes(memoryview(discard_buffer)[:received]))
        if self._turns:
            self._answered_turn()

    def _read_lazily(self) -> None:
        """Where nothing but the first answer byte's time is measured (a tcp-level
        shadow, no hook reading its answers): from now on, be woken once per 32 KiB of
        answers (or at EOF or an error), not per answer; a new turn reads what is there
        when it asks whether the shadow has answered (_read_now), and one that has to
        wait for the answer switches back (_wait_for_turn)."""
        if (not self.upstream.observer.watching and self._answers is None
                and self._keeps_turns):
            self._lazy = True
            self._set_low_water(_LAZY_READ)

    def _set_low_water(self, low_water: int) -> None:
        try:
            self._channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
        except OSError:
            pass

    def _read_now(self) -> int:
        """Read (and count) answers waiting below SO_RCVLOWAT: a turn asks whether the
        shadow has answered, and a non-blocking read takes what is there, however
        little. The count read, 0 when nothing was waiting (or when not reading lazily:
        then every answer has been read and counted already)."""
        if not self._lazy:
            return 0
        try:
            received = self._channel.sock.recv_into(discard_buffer)
        except OSError:
            return 0  # nothing there, or an error its reader will see
        self.upstream.received.bytes += received
        return received

    def _count_unread(self) -> None:
        """Count answers still waiting below SO_RCVLOWAT (bounded: the socket's buffer)."""
        for _ in range(64):
            try:
                received = self._channel.sock.recv_into(discard_buffer)
            except OSError:
                return
            if not received:
                return
            self.upstream.received.bytes += received

    def _deliver_answers(self) -> None:
        """Hand answers to the session's hooks, in this greenlet. What a hook left behind
        (a gevent.Timeout it did not cancel) comes out here: it is handed over too, as
        the chunk, for the session to close its connection; it must not reach gevent's
        hub, where a SystemExit would end the process."""
        try:
            while True:
                chunk = self._answers.get()
                if chunk is None:
                    break
                self._on_answer(self, chunk)
            self._on_answer(self, None)
        except GreenletExit:
            raise
        except BaseException as error:
            self._on_answer(self, error)

    # --- ending ----------------------------------------------------------------------------

    def _maybe_done(self) -> None:
        if self._written_eof and self._answered and self.alive:
            self._end("done")

    def _lost(self, error: OSError) -> None:
        if not self.alive:
            return
        self._stats.resets += 1
        if is_disconnect(error):
            log.info("%s: shadow %s: connection lost: %s", self._label, self.address,
                     error.strerror or error)
        else:
            log.warning("%s: shadow %s: %s", self._label, self.address, error)
        self._end("reset")

    def _end(self, state: str) -> None:
        """Final: close the connection, account for it, wake linger()."""
        if not self.alive:
            return
        self.state = state
        self.alive = False
        cause = self.why if state == "dropped" else "shadow-failed" if self._queue.size else None
        BUDGET.let_go(self, cause)
        if cause is not None:
            self._stats.drops[cause] = self._stats.drops.get(cause, 0) + 1
        if self._queue.size:  # else it holds nothing
            self._queue.clear()
        if self._send_buffer:
            BUDGET.release_send_buffer(self._send_buffer)
            self._send_buffer = 0
        for timer in (self._delay_timer, self._turn_timer):
            if timer is not None:
                timer.stop()
                timer.close()
        if self._channel is not None:
            self._channel.stop_reading()
            self._channel.stop_writing()
            if not self._answered:  # else its EOF was read: all before it was counted
                self._count_unread()
        self._reference_sent = self._reference.sent.bytes
        self.upstream.close(error=state == "reset", owed_answers=state in ("done", "timeout"))
        if self._answers is not None:
            self._answers.put(None)
        if self._ended is not None:
            self._ended.set()  # linger() waits in a greenlet
        elif self._settle is not None:
            self._settled()  # linger_then() waits in the hub
