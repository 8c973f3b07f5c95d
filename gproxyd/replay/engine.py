"""The open-loop sender: one run of a schedule against one target, and its raw numbers.

Requests leave when the schedule says, whether or not earlier ones were answered: the
scheduler hands each due request to a pool of HTTP/1.1 keep-alive connections. A request
takes an idle connection, else a new one is opened while fewer than `connections` are
open, else it waits in line for the next connection to come free. Its latency is counted
from the time it was due, so a wait for a connection, like a slow answer, shows in it.

A request that has no whole answer `timeout` after it was due is a timeout (one still
in line by then is not sent at all); an answer's end is found by gproxyd's own HTTP/1.1
response framer (Content-Length, chunked, until close; no body for HEAD, 204 and 304).
"""
from __future__ import annotations

import errno
import re
import socket as stdlib_socket
from time import monotonic
from typing import Callable

from gevent import socket
from gevent.event import Event
from gevent.pool import Group
from gevent.queue import Queue

from ..protocols import ProtocolError
from ..protocols.http import ResponseFramer
from .schedule import Clock, Schedule
from .sources import Request

_BUFFER = 64 * 1024
_MAX_HEAD = 64 * 1024
_HEAD_END = b"\r\n\r\n"
_CONNECTION = re.compile(rb"\nconnection:([^\r\n]*)", re.I)
_DRAIN_SLACK = 1.0  # seconds past the last deadline before stragglers are cut off


class Tally:
    """One run's raw numbers, filled in as its requests finish."""

    __slots__ = ("started", "duration", "scheduled", "sent", "answered", "errors", "timeouts",
                 "statuses", "bytes_out", "bytes_in", "latencies", "lags", "error_kinds",
                 "last_activity", "outstanding")

    def __init__(self, started: float, duration: float) -> None:
        self.started = started        # time.monotonic() of offset 0
        self.duration = duration      # the schedule's length in seconds
        self.scheduled = 0            # requests that fell due
        self.sent = 0                 # requests written whole to a connection
        self.answered = 0             # requests with a whole answer in time (any status)
        self.errors = 0               # refused, reset, closed early, an answer that isn't HTTP
        self.timeouts = 0
        self.statuses = [0] * 10      # answers by status // 100
        self.bytes_out = 0
        self.bytes_in = 0
        self.latencies: list[float] = []  # seconds from due to answered, answered ones only
        self.lags: list[float] = []       # seconds each request left the scheduler late
        self.error_kinds: dict[str, int] = {}
        self.last_activity = started  # the last send or answer
        self.outstanding = 0          # due and not finished yet

    @property
    def elapsed(self) -> float:
        """The run's time: its schedule, or longer while answers were still coming in."""
        return max(self.duration, self.last_activity - self.started)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _ClosedEarly(Exception):
    """The server closed the connection before any byte of the answer."""


class _Stale(Exception):
    """A kept-alive connection turned out closed before any byte of the answer: the
    server closed it while it was idle. The request is retried once on a new one."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection closed while idle")
        self.sent = sent


def _connection_closes(head: bytes) -> bool:
    """Whether the answer whose head is HEAD ends its connection (Connection: close, or
    HTTP/1.0 without keep-alive)."""
    options = b",".join(m.group(1) for m in _CONNECTION.finditer(head)).lower()
    if b"close" in options:
        return True
    return head.startswith(b"HTTP/1.0") and b"keep-alive" not in options


def connect(address, timeout: float) -> socket.socket:
    """A connected socket to ADDRESS (settings.Address), TCP_NODELAY on TCP."""
    if not address.numeric:
        # A name goes through the resolver (gevent's runs getaddrinfo in a thread).
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    else:
        # A literal IP or a unix path: no resolver round trip on every new connection.
        sock = socket.socket(address.family, stdlib_socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.sockaddr)
        except BaseException:
            sock.close()
            raise
    if address.family != stdlib_socket.AF_UNIX:
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
    return sock


class Connection:
    """One kept-alive connection; one request at a time (no pipelining)."""

    __slots__ = ("sock", "framer", "buffer", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.framer = ResponseFramer()
        self.buffer = bytearray(_BUFFER)
        self.used = False  # an answer came back on it: it may have gone stale since

    def exchange(self, request: Request, deadline: float, tally: Tally) -> tuple[int, bool]:
        """Sends REQUEST and reads its whole answer by DEADLINE: (status, whether the
        connection must be closed after it). Raises TimeoutError, OSError, ProtocolError
        or _Stale."""
        sock = self.sock
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        try:
            sock.sendall(request.data)
        except (BrokenPipeError, ConnectionResetError):
            if self.used:
                raise _Stale(sent=False) from None
            raise
        tally.sent += 1
        tally.bytes_out += len(request.data)
        tally.last_activity = monotonic()
        framer = self.framer
        framer.expect(request.method)
        buffer = self.buffer
        view = memoryview(buffer)
        head = b""
        got = 0
        while True:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            try:
                size = sock.recv_into(buffer)
            except ConnectionResetError:
                if got == 0 and self.used:
                    raise _Stale(sent=True) from None
                raise
            if size == 0:
                if got == 0 and self.used:
                    raise _Stale(sent=True)
                if got == 0:
                    raise _ClosedEarly
                done = framer.close()  # ProtocolError if the answer was cut short
                return done[0][0], True
            got += size
            tally.bytes_in += size
            chunk = view[:size]
            if len(head) < _MAX_HEAD and _HEAD_END not in head:
                head += chunk
            done = framer.feed(chunk)
            if done:
                self.used = True
                return done[0][0], _connection_closes(head.split(_HEAD_END, 1)[0])

    def close(self) -> None:
        self.sock.close()


def _error_kind(error: OSError) -> str:
    """'Connection refused', ...: what the counts of errors are grouped by."""
    if error.strerror:
        return error.strerror
    if error.errno:
        return errno.errorcode.get(error.errno, str(error.errno))
    return str(error) or type(error).__name__


def send(address, connection: Connection | None, request: Request, due: float,
         timeout: float, tally: Tally) -> tuple[Connection | None, int | str]:
    """Sends REQUEST, due at DUE, on CONNECTION (None: a new one to ADDRESS) and counts
    its outcome in TALLY. Returns the connection to keep for the next request (None if
    it was closed) and the outcome: the answer's status, "timeout", or what went wrong.

    A kept-alive connection found closed before any byte of the answer is replaced by a
    new one once (the server may close an idle connection at any time)."""
    deadline = due + timeout
    retried = False
    while True:
        now = monotonic()
        if now >= deadline:
            tally.timeouts += 1
            if connection is not None:
                connection.close()
            return None, "timeout"
        if connection is None:
            try:
                connection = Connection(connect(address, deadline - now))
            except TimeoutError:
                tally.timeouts += 1
                return None, "timeout"
            except OSError as error:
                kind = f"connect: {_error_kind(error)}"
                tally.error(kind)
                return None, kind
        try:
            status, closes = connection.exchange(request, deadline, tally)
        except _Stale as stale:
            connection.close()
            connection = None
            if stale.sent:
                tally.sent -= 1
                tally.bytes_out -= len(request.data)
            if not retried:
                retried = True
                continue
            kind = "closed before answering"
        except _ClosedEarly:
            kind = "closed before answering"
        except TimeoutError:
            tally.timeouts += 1
            connection.close()
            return None, "timeout"
        except ProtocolError as error:
            kind = f"bad answer: {error}"
        except OSError as error:
            kind = _error_kind(error)
        else:
            finished = monotonic()
            tally.answered += 1
            tally.latencies.append(finished - due)
            tally.statuses[min(status // 100, 9)] += 1
            tally.last_activity = finished
            if closes or request.close:
                connection.close()
                return None, status
            return connection, status
        tally.error(kind)
        if connection is not None:
            connection.close()
        return None, kind


class _Pool:
    """The connections of one run: opened on demand up to LIMIT, each a greenlet taking
    due requests from one line (FIFO)."""

    def __init__(self, address, limit: int, timeout: float, tally: Tally) -> None:
        self.address, self.limit, self.timeout, self.tally = address, limit, timeout, tally
        self._line: Queue = Queue()
        self._group = Group()
        self.open = 0   # connection greenlets alive
        self.idle = 0   # of those, waiting for a request
        self.scheduling_done = False
        self.drained = Event()

    def submit(self, due: float, request: Request) -> None:
        self.tally.outstanding += 1
        self._line.put((due, request))
        # Requests in line beyond the greenlets already waiting for one: open another.
        if self._line.qsize() > self.idle and self.open < self.limit:
            self.open += 1
            self._group.spawn(self._work)

    def _work(self) -> None:
        connection = None
        try:
            while True:
                self.idle += 1
                try:
                    item = self._line.get()
                finally:
                    self.idle -= 1
                if item is None:
                    return
                try:
                    connection = self._serve(connection, *item)
                finally:
                    self._finished()
        finally:
            self.open -= 1
            if connection is not None:
                connection.close()

    def _finished(self) -> None:
        tally = self.tally
        tally.outstanding -= 1
        if tally.outstanding == 0 and self.scheduling_done:
            self.drained.set()

    def _serve(self, connection: Connection | None, due: float,
               request: Request) -> Connection | None:
        connection, _ = send(self.address, connection, request, due, self.timeout,
                             self.tally)
        return connection

    def drain(self, until: float) -> None:
        """Waits until every submitted request has finished (at most until UNTIL)."""
        self.scheduling_done = True
        if self.tally.outstanding:
            self.drained.wait(max(0.0, until - monotonic()))

    def close(self) -> None:
        """Ends every connection greenlet; stragglers are killed."""
        for _ in range(self.open):
            self._line.put(None)
        self._group.join(timeout=0.5)
        self._group.kill(block=True, timeout=1.0)


def run(address, requests: tuple[Request, ...], schedule: Schedule, *, duration: float,
        connections: int, timeout: float,
        on_start: Callable[[Tally], None] | None = None) -> Tally:
    """Sends REQUESTS to ADDRESS as SCHEDULE says and returns the run's Tally.

    Blocks the calling greenlet for the run (about DURATION, plus up to TIMEOUT for the
    last answers). Killing that greenlet ends the run: its connections are closed.
    ON_START is given the Tally before the first request, for live progress."""
    clock = Clock()
    start = monotonic() + 0.002  # a little ahead: the first request must not start late
    tally = Tally(start, duration)
    pool = _Pool(address, connections, timeout, tally)
    if on_start is not None:
        on_start(tally)
    last_due = start
    try:
        lags = tally.lags
        for offset, index in schedule:
            due = start + offset
            clock.sleep_until(due)
            lags.append(monotonic() - due)
            tally.scheduled += 1
            pool.submit(due, requests[index])
            last_due = due
        # A schedule ends with its last request, up to one interval before `duration`.
        clock.sleep_until(start + duration)
        pool.drain(last_due + timeout + _DRAIN_SLACK)
    finally:
        clock.close()
        pool.close()
    return tally


def reachable(address, timeout: float) -> str | None:
    """None if a connection to ADDRESS can be opened, else why not."""
    try:
        connect(address, timeout).close()
    except TimeoutError:
        return f"no connection within {timeout:g} s"
    except OSError as error:
        return _error_kind(error)
    return None

