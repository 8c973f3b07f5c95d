"""Channel: one socket of a session on the gevent hub, with a transport API.

Sockets here are plain non-blocking `_socket.socket`s with our own libev watchers, not
gevent socket objects: it saves a layer of Python per chunk on the hot path. Everything
that touches a socket's watchers goes through Channel's transport API, in the spirit of
asyncio's flow-control transports:

- callbacks, for code that runs in the hub and never blocks (Relay, ShadowSink):
  `start_reading(callback)` / `stop_reading()`, `start_writing(callback)` /
  `stop_writing()` (the "writable" notification: called while the socket has room, for
  the rest of a write it did not take at once), `waiting_to_write`;
- waits, for code that runs in a greenlet and may block (hooked sessions):
  `wait_readable()`, `flush(data)`;
- both: `half_close()`, `abort()`, `close()`.

The bytes themselves are read and written on `sock` (and `fd`, for splice) directly:
one syscall per chunk, no Python in between.

`Connecting` opens a Channel without blocking (libev callbacks), `connect()` from a
greenlet (host names need the resolver).
"""
from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
from time import monotonic, time
from typing import Callable

import gevent
from gevent import get_hub
from gevent.hub import Waiter

from .settings import Address


class Channel:
    """One socket of a session, driven non-blocking on the gevent hub.

    The Channel owns its socket: `close()` closes it. `abort()` may be called from any
    greenlet: it shuts the socket down both ways, which wakes every greenlet waiting on
    it (their reads see EOF, their writes fail), so no greenlet has to be killed.
    Each direction has one user at a time: one reader callback or waiting greenlet, one
    writer callback or waiting greenlet.

    Each watcher is made when it is first needed (making one costs a syscall: gevent
    checks the descriptor): most client sockets never wait to write.
    """
    __slots__ = ("sock", "fd", "_hub", "_reader", "_writer", "closed")

    def __init__(self, sock: socket.socket):
        if sock.gettimeout() != 0.0:  # not made with SOCK_NONBLOCK
            sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self._hub = get_hub()
        self._reader = None
        self._writer = None
        self.closed = False
        if sock.family != socket.AF_UNIX:
            # Cut-through: a small write goes out now, not after Nagle's delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- callbacks (in the hub; they must not block) -------------------------------------

    def start_reading(self, callback: Callable[[], None]) -> None:
        """Call `callback()` each time the socket is readable (data, EOF or an error)."""
        reader = self._reader
        if reader is None:
            reader = self._watch_reads()
        reader.start(callback)

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.stop()

    def start_writing(self, callback: Callable[[], None]) -> None:
        """Call `callback()` each time the socket can take more bytes, until stop_writing():
        how the rest of a write that did not fit is written when the peer has read."""
        writer = self._writer
        if writer is None:
            writer = self._watch_writes()
        writer.start(callback)

    def stop_writing(self) -> None:
        if self._writer is not None:
            self._writer.stop()

    @property
    def waiting_to_write(self) -> bool:
        """A writer waits for room (start_writing is in effect, or a greenlet flushes)."""
        return self._writer is not None and self._writer.active

    @property
    def read_pending(self) -> bool:
        """The loop found the socket readable in this turn and has yet to call the reader
        callback."""
        return self._reader is not None and self._reader.pending

    def _watch_reads(self):
        if self.closed:  # its descriptor may be another socket's by now
            raise _closed_error()
        self._reader = reader = self._hub.loop.io(self.fd, _READ)
        return reader

    def _watch_writes(self):
        if self.closed:
            raise _closed_error()
        self._writer = writer = self._hub.loop.io(self.fd, _WRITE)
        return writer

    def _watch_connect(self, callback: Callable[[int], None]) -> None:
        """Call `callback(events)` once a non-blocking connect has ended (Connecting):
        WRITE alone is a connect that worked; READ too, a failed one (an error makes the
        socket readable) or data already there. The watcher is the reader's afterwards
        (Connecting._writable makes it one): one watcher and one fcntl (gevent checks
        each new watcher's descriptor) less a connection."""
        self._reader = reader = self._hub.loop.io(self.fd, _READ | _WRITE)
        reader.start(callback, pass_events=True)

    def stamp_arrivals(self) -> None:
        """Have the kernel stamp each arriving segment (SO_TIMESTAMPNS): read with
        recvmsg_into(..., STAMP_SPACE), arrival() says when the data arrived."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            pass  # arrival() falls back to the time of the read

    # --- waits (in a greenlet) -----------------------------------------------------------

    def wait_readable(self) -> None:
        self._hub.wait(self._reader if self._reader is not None else self._watch_reads())

    def flush(self, data) -> None:
        """Write all of `data`, waiting (cooperatively) while the peer is slow to read."""
        view = memoryview(data)
        send = self.sock.send
        while view:
            try:
                sent = send(view)
            except BlockingIOError:
                self._hub.wait(self._writer if self._writer is not None
                               else self._watch_writes())
                continue
            view = view[sent:]

    # --- ending --------------------------------------------------------------------------

    def half_close(self) -> None:
        """Pass an EOF on: the peer reads end-of-stream; we may still read from it."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the other direction reports it

    def abort(self) -> None:
        """Stop all traffic both ways now; wakes any greenlet blocked on this socket."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0): a reset on one side of a
        session is passed on as a reset, so a truncated answer never looks complete."""
        if not self.closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            except OSError:
                pass
            self.close()

    def close(self) -> None:
        """Close the socket; a greenlet still waiting on it gets OSError(EBADF)."""
        if not self.closed:
            self.closed = True
            # A stopped watcher (no callback: most, by the time a connection closes)
            # needs nothing more: an io watcher's close() is its stop().
            if self._reader is not None and self._reader.callback is not None:
                self._release(self._reader)
            if self._writer is not None and self._writer.callback is not None:
                self._release(self._writer)
            self.sock.close()

    def _release(self, watcher) -> None:
        if hasattr(getattr(watcher.callback, "__self__", None), "throw"):
            self._hub.cancel_wait(watcher, _closed_error(), True)  # a greenlet
        else:
            watcher.stop()  # a callback's


# SO_TIMESTAMPNS (= SCM_TIMESTAMPNS), which the socket module does not name: the kernel's
# receive time of the latest segment a read returned, as CLOCK_REALTIME seconds and ns.
_SO_TIMESTAMPNS = 35
STAMP_SPACE = socket.CMSG_SPACE(16)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s
_TIMESPEC = struct.Struct("qq")
_READ, _WRITE = 1, 2  # libev's EV_READ, EV_WRITE


def arrival(ancillary: list) -> float:
    """When the bytes of a stamped read arrived, on time.monotonic()'s clock (the time of
    the read when there is no stamp). Residual error: the two clocks read here differ by
    well under a microsecond; an NTP step between stamp and read shifts it by the step."""
    for level, kind, data in ancillary:
        if kind == _SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return monotonic() - (time() - (seconds + nanoseconds * 1e-9))
    return monotonic()


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "socket closed while in use")


_NEW_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # a connect's socket


class Connecting:
    """A non-blocking connect to a literal address, driven by libev callbacks.

    `on_done(channel, None)` or `on_done(None, error)` is called exactly once, from the
    hub (never before the constructor has returned, so the caller may keep the object
    first), unless `cancel()` comes first. Host names need the resolver: use
    connect() in a greenlet.
    """
    __slots__ = ("_channel", "_timer", "_on_done", "_outcome")

    def __init__(self, address: Address, timeout: float,
                 on_done: Callable[[Channel | None, OSError | None], None]):
        self._on_done = on_done
        loop = get_hub().loop
        try:
            self._channel = Channel(_socket.socket(address.family, _NEW_STREAM))
        except OSError as error:  # out of file descriptors, typically
            self._channel = None
            self._answer_soon(loop, error.errno or errno.EMFILE, error)
            return
        code = self._channel.sock.connect_ex(address.sockaddr)
        if code == errno.EINPROGRESS or code == errno.EAGAIN:
            self._channel._watch_connect(self._writable)
            self._timer = loop.timer(timeout)
            self._timer.start(self._timed_out)
        else:  # the kernel answered at once (a unix socket, a refused local port)
            self._answer_soon(loop, code)

    def _answer_soon(self, loop, code: int, error: OSError | None = None) -> None:
        # Called back from the next loop turn, not from inside the constructor: the
        # caller's state is then complete (no half-built session sees its own answer).
        self._outcome = (code, error)
        self._timer = loop.timer(0)
        self._timer.start(self._answer)

    def _answer(self) -> None:
        self._timer.stop()
        code, error = self._outcome
        if error is not None:
            self._on_done(None, error)
        else:
            self._finish(code)

    def cancel(self) -> None:
        """Give up (the caller is going away); on_done is not called."""
        self._timer.stop()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _stop(self) -> None:
        self._channel.stop_reading()
        self._channel.stop_writing()
        self._timer.stop()

    def _writable(self, events: int = 0) -> None:
        """The connect has ended. `events`: libev's (see Channel._watch_connect); without
        them (a watcher of writes only), or with READ among them, SO_ERROR says how."""
        self._timer.stop()
        channel = self._channel
        watcher = channel._reader
        if watcher is not None:  # else the connect was watched by a writer
            watcher.stop()
            watcher.events = _READ  # the reader's from now on
        if events == _WRITE:  # connected: a failed connect is readable too (EPOLLERR)
            self._channel = None
            self._on_done(channel, None)
            return
        channel.stop_writing()
        self._finish(channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _timed_out(self) -> None:
        self._stop()
        self._finish(errno.ETIMEDOUT)

    def _finish(self, code: int) -> None:
        channel, self._channel = self._channel, None
        if code:
            channel.close()
            self._on_done(None, OSError(code, os.strerror(code)))
        else:
            self._on_done(channel, None)


def connect(address: Address, timeout: float) -> Channel:
    """Open a TCP or unix connection within `timeout` seconds (blocks the calling
    greenlet); raise OSError if not. Only host names ask the resolver."""
    if not address.numeric:
        with gevent.Timeout(timeout, socket.timeout(errno.ETIMEDOUT, "connect timed out")):
            family, _, _, _, sockaddr = socket.getaddrinfo(
                address.host, address.port, 0, socket.SOCK_STREAM)[0]
        address = Address(address.text, family, host=sockaddr[0], port=sockaddr[1])
    waiter = Waiter()
    connecting = Connecting(address, timeout, lambda *outcome: waiter.switch(outcome))
    try:
        channel, error = waiter.get()
    except BaseException:  # killed while connecting
        connecting.cancel()
        raise
    if error is not None:
        raise error
    return channel


def out_of_descriptors(error: BaseException | None) -> bool:
    """This process (EMFILE) or the system (ENFILE) has no file descriptor left."""
    return isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)


def is_disconnect(error: BaseException) -> bool:
    """An ordinary way for a peer to go away (not worth a traceback)."""
    return isinstance(error, OSError) and error.errno in (
        errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNABORTED,
        errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBADF)
