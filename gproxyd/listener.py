"""Listener: one route's listening socket, gevent server and pool; owns its sessions.

The lifecycle (lifecycle/serving.py) creates a Listener per listen address, may swap
its route and hooks on reload (`update()`: new connections use the new route, live ones
keep theirs), and ends it with `close()` (stop accepting) followed by `drain()` (let
live sessions finish).

A listener also owns its route's per-process services, started and stopped with it and
kept across reloads that keep them: the beanstalkd archive and the request recorder
(record.py), which it wires into each session's production observer.
"""
from __future__ import annotations

import _socket
import dataclasses
import errno
import logging
import os
import random
import socket
import stat
import sys
import time
from collections import deque

import gevent
from gevent.event import Event
from gevent.monkey import get_original
from gevent.pool import Pool
from gevent.server import StreamServer

from .channel import Channel
from .config import Route
from .daemon import group_id, user_entry
from .hooks import HookSet
from .interceptors.archive import ArchiveError
from .interceptors.beanstalkd import Archive
from .proxyproto import HeaderReader, ProxyHeader
from .record import Recorder, RecordError, Recording
from .session import Session
from .settings import ORIGINAL_DST, Address
from .stats import RecordStats, RouteStats
from .tls import Bridge, RouteTLS, TLSProblem, uses_tls
from .transparent import RefusalLog, Refused, endpoints, listen_transparently

log = logging.getLogger("gproxyd.listener")

# The standard library's class even after monkey-patching: the server accepts from it
# without gevent's wrapper, and wraps nothing.
_StdlibSocket = get_original("socket", "socket")
_INET = socket.AF_INET
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKLOG = 4096
_ACCEPT_PAUSE = 0.1  # seconds without accepting after running out of descriptors


class ListenError(Exception):
    """A listen address that cannot be bound; str() says why and what to do."""


def bind(address: Address, reuse_port: bool = False, mode: int | None = None,
         owner: str = "") -> socket.socket:
    """A non-blocking listening socket for `address`, or ListenError with cause and hint.

    `reuse_port`: SO_REUSEPORT, so several sockets (one per worker) share the address.
    `mode`, `owner` ("user" or "user:group"): a unix socket file's (listen-mode,
    listen-owner), set before it listens, so no client connects under the umask's mode.
    """
    sock = _StdlibSocket(address.family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(address.path)
            sock.bind(address.sockaddr)
            _set_mode_and_owner(address.path, mode, owner)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address.sockaddr)
        sock.listen(_BACKLOG)
    except OSError as error:
        sock.close()
        hint = {
            errno.EACCES: " (run as root or grant CAP_NET_BIND_SERVICE)",
            errno.EADDRINUSE: " (another process listens there)",
            errno.EADDRNOTAVAIL: " (no interface of this host has that address)",
        }.get(error.errno, "")
        raise ListenError(f"cannot listen on {address}: {error.strerror}{hint}") from None
    return sock


def _set_mode_and_owner(path: str, mode: int | None, owner: str) -> None:
    if owner:
        user, _, group = owner.partition(":")
        try:
            uid = user_entry(user).pw_uid
        except KeyError:
            raise OSError(errno.EINVAL, f"listen-owner: no such user {user!r}") from None
        try:
            gid = group_id(group) if group else -1
        except KeyError:
            raise OSError(errno.EINVAL, f"listen-owner: no such group {group!r}") from None
        os.chown(path, uid, gid)
    if mode is not None:
        os.chmod(path, mode)


def adopt_listening(fd: int) -> socket.socket:
    """A listening socket inherited as a file descriptor (a worker's), non-blocking."""
    sock = _StdlibSocket(fileno=fd)
    sock.setblocking(False)
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file nobody listens on is left over from a crash: remove it."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _peer_name(family: int, address) -> str:
    if family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    return "unix"


def _needs_endpoints(route: Route) -> bool:
    """Whether a connection's ends must be known beyond the socket's peer address."""
    return route.accept_proxy != "off" or route.production is ORIGINAL_DST or \
        route.source is not None or route.send_proxy != "off" or \
        route.shadow_send_proxy != "off"


class _Server(StreamServer):
    """A StreamServer that hands out plain sockets and survives running out of fds."""

    _last_warning = 0.0

    def __init__(self, listening: socket.socket, handle, **kwargs):
        super().__init__(listening, handle, **kwargs)
        # Plain ints, read once: socket.socket's family and type properties build an
        # enum at every access, which would be once per accepted connection.
        self._family, self._type = int(listening.family), int(listening.type)
        # Restarts accepting after a pause. Armed with again(), stopped when it fires:
        # start() on a libev timer that has fired once fires at the next loop turn.
        self._resume = self.loop.timer(_ACCEPT_PAUSE, _ACCEPT_PAUSE)

    def _do_read(self) -> None:
        """gevent's accept loop, for this server: no pool (never full), so no full()
        before each accept, and the accept and the handler called in place (three
        method calls less a connection). The rest as gevent's: up to max_accept
        connections a readable event; an error reported, and accepting paused for
        `delay`, which doubles while errors follow each other (out of descriptors
        excepted: _pause_accepting); the handler owns the socket (plain, unwrapped)."""
        accept, handle = self.socket._accept, self._handle
        family, kind = self._family, self._type
        for _ in range(self.max_accept):
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(error)
                    return
                self.loop.handle_error(self, *sys.exc_info())
                if self.is_fatal_error(error):
                    self.close()
                    sys.stderr.write(f"ERROR: {self} failed with {error}\n")
                    return
                self._back_off()
                return
            self.delay = self.min_delay
            try:
                handle(_socket.socket(family, kind, 0, fd), address)
            except BaseException:
                self.loop.handle_error(((address,), self), *sys.exc_info())
                self._back_off()
                return

    def _back_off(self) -> None:
        if self.delay >= 0:
            self.stop_accepting()
            self._timer = self.loop.timer(self.delay)
            self._timer.start(self._start_accepting_if_started)
            self.delay = min(self.max_delay, self.delay * 2)

    def _pause_accepting(self, error: OSError) -> None:
        # Accepting again at once would spin: the pending connection stays readable.
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.error("cannot accept on %s: %s (raise the open-files limit, e.g. "
                      "LimitNOFILE=, or lower max-connections); pausing accepts",
                      self.address, error.strerror)
        self.stop_accepting()
        self._resume.again(self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume.stop()
        if self.started and not self.closed:
            self.start_accepting()

    def close(self) -> None:
        self._resume.stop()
        super().close()


class Listener:
    """Accepts connections for one route and runs a Session for each."""

    def __init__(self, route: Route, stats: RouteStats | None = None,
                 sock: socket.socket | None = None, hooks: HookSet | None = None):
        """`hooks`: the route's hooks, imported by the caller (hooks.load_route_hooks)."""
        self.route = route
        self.hooks = hooks
        # Accepted connections go straight to their session: no PROXY header to read,
        # no ends to learn beyond the peer's address (TLS is asked per connection).
        self._direct = route.accept_proxy == "off" and not _needs_endpoints(route)
        self.stats = stats or RouteStats()
        self._read_stats_with(route)
        self.archive = Archive(route, self.stats) if route.archive else None
        self.stats.archive = self.archive.url if self.archive is not None else ""
        self.recorder: Recorder | None = None  # started with the listener
        self.sessions: set[Session] = set()
        self._no_sessions = Event()
        self._no_sessions.set()
        # Ended sessions whose shadows linger (in the hub, see Session.finish_then).
        self._lingering = 0
        self._none_lingering = Event()
        self._none_lingering.set()
        self._sampler = random.Random(route.shadow_seed)
        self._on_session_end = self._ended  # bound once, not a method object a session
        self._listening = sock or bind(route.listen, mode=route.listen_mode,
                                       owner=route.listen_owner)
        # The server calls _handle in the hub, with no greenlet: most sessions never need
        # one. Those that do (hooks, host names) and lingering shadows run in this pool.
        self._greenlets = Pool()
        self._spawn = self._greenlets.spawn  # bound once, not a method object a session
        self._server = _Server(self._listening, self._handle, spawn=None)
        self._reaper: gevent.Greenlet | None = None
        self._last_rejection_log = 0.0
        self.tls: RouteTLS | None = None  # read in start() and at each reload
        # accept-proxy: connections whose PROXY header is still awaited. They count
        # against max-connections and are waited for by drain() like sessions.
        self._handshakes: set[HeaderReader | Bridge] = set()  # and TLS handshakes
        self._refusals = RefusalLog()
        if route.listen_transparent:
            self._set_transparent(route)

    def _set_transparent(self, route: Route) -> None:
        """At start the daemon has done it before the privilege drop (cli.py);
        a route added by a reload needs CAP_NET_ADMIN kept, and without it serves
        without: said in the log, since nothing here may fail a reload half-way."""
        problem = listen_transparently(self._listening, route.listen)
        if problem:
            log.error("route %s: %s; connections a TPROXY rule diverts will not reach it "
                      "until gproxyd is restarted", route.name, problem)

    @property
    def address(self) -> Address:
        return self.route.listen

    @property
    def bound(self):
        """The address actually bound (with the port the kernel chose for port 0)."""
        return self._listening.getsockname()

    def start(self, required: bool = True) -> None:
        """Start accepting. If the route's archive or record file cannot be opened: raise
        ArchiveError or RecordError, or, unless `required`, say so and go on without
        (puts are relayed to beanstalkd as they are; requests are not recorded).
        TLS files that cannot be used raise TLSProblem, or, unless `required`, the route
        is not served until a reload brings usable ones."""
        if uses_tls(self.route):
            try:
                self.tls = RouteTLS(self.route, self.stats.tls_handshake_failures)
            except TLSProblem as problem:
                if required:
                    raise
                log.error("route %s: %s; not accepting connections until a reload brings "
                          "usable files", self.route.name, problem)
                return
        if self.archive is not None:
            try:
                self.archive.start()
            except ArchiveError as error:
                if required:
                    raise
                log.error("route %s: archive: %s; puts are relayed to beanstalkd as they "
                          "are", self.route.name, error)
                self.archive = None
                self.stats.archive = ""
        if self.route.record:
            try:
                self._start_recorder(self.route)
            except RecordError as error:
                if required:
                    if self.archive is not None:
                        self.archive.stop()
                    raise
                log.error("route %s: record: %s; not recording", self.route.name, error)
        self._server.start()
        self._reaper = gevent.spawn(self._reap_idle)

    def update(self, route: Route, hooks: HookSet | None = None) -> None:
        """Use `route` and `hooks` for connections accepted from now on."""
        if route.shadow_seed != self.route.shadow_seed:
            self._sampler = random.Random(route.shadow_seed)
        self._update_tls(route)
        self._update_archive(route)
        self._update_recorder(route)
        self._read_stats_with(route)
        if route.listen_transparent and not self.route.listen_transparent:
            self._set_transparent(route)
        self.route, self.hooks = route, hooks
        self._direct = route.accept_proxy == "off" and not _needs_endpoints(route)

    def _read_stats_with(self, route: Route) -> None:
        """What the route's numbers are read with: kept by its stats, which outlive
        reloads, so a reload changes them too."""
        stats = self.stats
        stats.baseline = route.baseline.text if route.baseline is not None else ""
        stats.verdict_threshold = route.verdict_threshold
        if stats.samples.maxlen != route.compare_samples:
            stats.samples = deque(stats.samples, maxlen=route.compare_samples)

    def _update_tls(self, route: Route) -> None:
        """Certificates and keys are read again at every reload (rotation): new
        connections use the new contexts, live ones keep theirs. Files that cannot be
        used (changed since load_config checked them) leave the old contexts in use."""
        if not uses_tls(route):
            self.tls = None
            return
        try:
            self.tls = RouteTLS(route, self.stats.tls_handshake_failures)
        except TLSProblem as problem:
            log.error("route %s: %s; %s", route.name, problem,
                      "keeping the TLS files read before" if self.tls is not None
                      else "not accepting connections")
            return
        if self._reaper is None:  # not started for want of usable files: now they are
            self._server.start()
            self._reaper = gevent.spawn(self._reap_idle)

    def _update_archive(self, route: Route) -> None:
        """A changed archive URL opens the new store; one that cannot be opened leaves
        the route on the old one (and says so). Live sessions keep the store they use."""
        old = self.archive
        if old is not None and route.archive == old.route.archive:
            old.route = route
            return
        new = Archive(route, self.stats) if route.archive else None
        if new is not None:
            try:
                new.start()
            except ArchiveError as error:
                log.error("route %s: archive: %s; %s", route.name, error,
                          f"keeping {old.url}" if old is not None else "puts are relayed "
                          "to beanstalkd as they are")
                if old is not None:  # the rest of the new route applies all the same
                    old.route = dataclasses.replace(route, archive=old.route.archive)
                return
        if old is not None:
            # Sessions accepted before keep using its store (closed with it when they
            # are gone); only one injector per route and process.
            old.stop_injecting()
        self.archive = new
        self.stats.archive = new.url if new is not None else ""

    def _start_recorder(self, route: Route) -> None:
        """Record to route.record from now on (RecordError if it cannot be opened); the
        counters carry on across a change of file."""
        recorder = Recorder(route, self.stats.record or RecordStats())
        recorder.start()
        self.recorder = recorder
        self.stats.record = recorder.stats
        recorder.stats.file = recorder.path

    def _update_recorder(self, route: Route) -> None:
        """A reload: the same file keeps its recorder (open file, queue, counters) with
        the new sampling, masking and rotation; another file is opened and the old
        recorder stopped once it has written what it holds; no file stops recording.
        A file that cannot be opened leaves the route recording to the old file, or not
        at all (and says so)."""
        old = self.recorder
        if old is not None and route.record == old.path:
            old.configure(route)
            return
        if route.record:
            try:
                self._start_recorder(route)
            except RecordError as error:
                log.error("route %s: record: %s; %s", route.name, error,
                          f"recording on to {old.path}" if old is not None
                          else "not recording")
                if old is not None:  # the rest of the new route applies all the same
                    old.configure(route)
                return
        else:
            self.recorder = None
            self.stats.record = None
        if old is not None:
            gevent.spawn(old.stop)  # sessions ask for the recorder at each request

    def _current_recorder(self) -> Recorder | None:
        return self.recorder

    def close(self, remove_path: bool = True) -> None:
        """Stop accepting; live sessions go on (see drain()). A unix socket's file goes
        too, unless `remove_path` is False (another process serves the same socket)."""
        self._server.close()
        if remove_path and self.route.listen.family == socket.AF_UNIX:
            try:
                os.unlink(self.route.listen.path)
            except OSError:
                pass

    def drain(self, timeout: float | None) -> int:
        """Wait up to `timeout` (None: as long as it takes) for live sessions; abort the rest.

        Returns how many sessions had to be aborted.
        """
        self._no_sessions.wait(timeout)
        for handshake in list(self._handshakes):
            handshake.cancel()
            handshake.channel.close()
        self._handshakes.clear()
        leftover = list(self.sessions)
        for session in leftover:
            session.abort("stopped: drain-timeout passed")
        if leftover:
            self._no_sessions.wait(self.route.shadow_linger + 1)
        # Shadows lingering after their session: in the hub, and in greenlets (hooks).
        deadline = time.monotonic() + self.route.shadow_linger + 1
        self._none_lingering.wait(self.route.shadow_linger + 1)
        self._greenlets.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._reaper is not None:
            self._reaper.kill(block=False)
        if self.archive is not None:
            self.archive.stop()
        if self.recorder is not None:
            self.recorder.stop()  # what the sessions sent is written before the process ends
        return len(leftover)

    # --- per connection ------------------------------------------------------------------

    def _handle(self, sock: socket.socket, address) -> None:
        route = self.route
        if len(self.sessions) + len(self._handshakes) >= route.max_connections:
            sock.close()
            self.stats.rejected += 1
            now = time.monotonic()
            if now - self._last_rejection_log > 10:
                self._last_rejection_log = now
                log.warning("route %s: max-connections (%d) reached; closing new clients "
                            "(%d so far)", route.name, route.max_connections,
                            self.stats.rejected)
            return
        try:
            channel = Channel(sock)
        except BaseException:
            sock.close()
            raise
        if self._direct and (self.tls is None or self.tls.server is None):
            # _admit() without its steps: peer as _peer_name() writes it
            self._open(route, channel, f"{address[0]}:{address[1]}" if sock.family == _INET
                       else _peer_name(sock.family, address), None, self.tls)
        elif route.accept_proxy != "off":
            self._await_header(route, channel, address)
        else:
            self._admit(route, channel, address, None)

    def _await_header(self, route: Route, channel: Channel, address) -> None:
        def done(header: ProxyHeader | None, problem: str | None) -> None:
            self._handshakes.discard(reader)
            if header is None:
                self._refuse(route, channel, _peer_name(channel.sock.family, address),
                             problem)
            else:
                self._admit(route, channel, address, header)
            if not self.sessions and not self._handshakes:
                self._no_sessions.set()
        reader = HeaderReader(channel, route.accept_proxy, route.connect_timeout, done)
        self._handshakes.add(reader)
        self._no_sessions.clear()

    def _refuse(self, route: Route, channel: Channel, client: str, problem: str) -> None:
        """Close a connection that cannot be served (no valid PROXY header, an
        original destination that loops); said in the log at most every 10 s."""
        channel.close()
        self.stats.refused += 1
        self._refusals.add(route.name, client, problem)

    def _admit(self, route: Route, channel: Channel, address,
               header: ProxyHeader | None) -> None:
        """Start the session of an accepted connection (whose PROXY header, if the route
        takes one, has been read)."""
        sock = channel.sock
        try:
            found = endpoints(route, sock, address, header) if _needs_endpoints(route) \
                else None
        except Refused as refused:
            self._refuse(route, channel, _peer_name(sock.family, address), str(refused))
            return
        peer = found.client if found is not None else _peer_name(sock.family, address)
        tls = self.tls
        if tls is not None and tls.server is not None:
            # tls-cert: the session starts on the plaintext once the handshake is done;
            # until then the connection counts as a handshake (max-connections, drain).
            def done(plain: Channel | None) -> None:
                self._handshakes.discard(bridge)
                if plain is not None:
                    self._open(route, plain, peer, found, tls)
                if not self.sessions and not self._handshakes:
                    self._no_sessions.set()
            bridge = tls.terminate(channel, peer, route.connect_timeout, done)
            self._handshakes.add(bridge)
            self._no_sessions.clear()
            return
        self._open(route, channel, peer, found, tls)

    def _open(self, route: Route, channel: Channel, peer: str, found,
              tls: RouteTLS | None) -> None:
        """Start the session of an accepted, admitted connection."""
        mirror = bool(route.shadow) and (route.shadow_sample >= 1.0 or
                                         self._sampler.random() < route.shadow_sample)
        try:
            session = Session(route, channel, peer,
                              self.stats, mirror, self.hooks, self._spawn,
                              self.archive if route.archive else None, found)
        except BaseException:
            channel.close()  # the session would own it, and there is none
            raise
        if self.recorder is not None:
            session.production.observer.record_in(Recording(self._current_recorder))
        self.sessions.add(session)
        self._no_sessions.clear()
        self.stats.active += 1
        self.stats.total += 1
        if tls is not None:
            tls.secure(session)  # production-tls, shadow-tls
        session.start(self._on_session_end)

    def _ended(self, session: Session) -> None:
        """A session closed its client and production (maybe from a libev callback)."""
        self.sessions.discard(session)
        self.stats.active -= 1
        if not self.sessions and not self._handshakes:
            self._no_sessions.set()
        if not session.shadows:
            session.finish()
        elif session.dispatch is None:  # the shadows linger in the hub; drain waits
            self._lingering += 1
            self._none_lingering.clear()
            session.finish_then(self._settled)
        else:  # with hooks, a shadow's answers may still be on their way to them:
            self._greenlets.spawn(session.finish)  # linger in a greenlet drain waits for

    def _settled(self) -> None:
        """An ended session's shadows are all decided."""
        self._lingering -= 1
        if not self._lingering:
            self._none_lingering.set()

    def _reap_idle(self) -> None:
        while True:
            gevent.sleep(max(0.05, min(1.0, self.route.idle_timeout / 4)))
            now = time.monotonic()
            for session in list(self.sessions):
                if session.idle_seconds(now) >= session.route.idle_timeout:
                    session.abort("idle-timeout")
