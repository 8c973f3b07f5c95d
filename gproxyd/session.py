"""Session: one client connection, relayed to production and mirrored to shadows.

A session runs one way: the listener calls `start()` from the hub. Production is an
Upstream, connected by libev callbacks (a greenlet only for a host name); once it is
open, a route without hooks is relayed both ways by libev callbacks (relay.Relay),
shadows and the observer seeing each client chunk through a non-blocking tap, and
holds no greenlet at all. With hooks (user code that may block), the hooked steps run
in greenlets of the session's (`spawn`): on_connect before production is connected,
then the hooked directions as copy_pumps; the HookDispatch calls the hooks and routes
what they return. Whatever a hook raises, or leaves behind in those greenlets (a
gevent.Timeout it did not cancel), closes that session only.

The session owns the client's channel, production and its shadow sinks: `on_end` is
called once, when client and production are closed, and `finish()` lingers for the
shadows and logs the connection's line.
"""
from __future__ import annotations

import errno
import logging
import time
from functools import partial
from typing import Callable

import gevent
from gevent.lock import Semaphore
from greenlet import GreenletExit

from .channel import Channel, is_disconnect, out_of_descriptors
from .compare import HEAD_ROOM, PRODUCTION, REQUEST_KEPT, Capture, Comparison
from .config import Route
from .hooks import HookDispatch, HookSet
from .interceptors.beanstalkd import Archive, Interception
from .observe import Exchanges, new_shared
from .relay import EOF, Broken, Direction, Relay, copy_pump
from .request_filter import RequestFilter
from .settings import Address
from .shadow import ShadowSink
from .stats import RouteStats
from .transparent import Endpoints
from .upstream import Upstream

log = logging.getLogger("gproxyd.session")


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class Session:
    __slots__ = ("route", "client", "peer", "stats", "production", "shadows", "started",
                 "reason", "dispatch", "_spawn", "_idle_bytes", "_idle_since", "_production_failed",
                 "_client_writes", "_production_done", "_on_end", "_candidates",
                 "_answered_mark", "_filter", "_archive", "_destination", "_unsettled")

    def __init__(self, route: Route, client: Channel, peer: str, stats: RouteStats,
                 mirror: bool, hooks: HookSet | None = None, spawn: Callable = gevent.spawn,
                 archive: Archive | None = None, endpoints: Endpoints | None = None):
        """`hooks`: the route's, loaded; `spawn` starts the session's greenlets (the
        listener's pool, so that draining waits for them); `archive`: the route's
        beanstalkd archive, which then answers some commands itself (Interception);
        `endpoints`: who the client is and where it was going (transparent.endpoints),
        for original-dst, source and send-proxy."""
        self.route = route  # the route as it was when accepted; reloads don't change it
        self.client = client
        self.peer = peer
        self.stats = stats
        self._spawn = spawn
        label = f"route {route.name} client {peer}"
        # Production and the shadows are written the same client bytes (no filter, no
        # hooks, no archive): their observers follow one framing of them.
        shared = (new_shared(route.protocol, route.observe_max_header)
                  if mirror and (route.shadow or route.baseline is not None)
                  and hooks is None and archive is None and not route.shadow_filter else None)
        self.production = Upstream(route.production, stats.production,
                                   Exchanges(route.protocol, stats.production, stats, label,
                                             route.observe_max_header, shared),
                                   f"route {route.name}: production")
        self.started = time.monotonic()
        self.reason = ""
        # Bytes moved and since when, as idle_seconds() last saw them (two numbers, not
        # a tuple: nothing for the cycle collector to track while the connection lives).
        self._idle_bytes, self._idle_since = 0, self.started
        self._production_failed = False
        self._production_done = False
        self._candidates: list[Address] | tuple = ()  # production's addresses left
        self._answered_mark = 0  # production's answer bytes at the client's last chunk
        self._on_end: Callable[["Session"], None] | None = None
        self._archive = archive
        # production = original-dst: the address this client dialled, else production's.
        self._destination = endpoints.production if endpoints is not None and \
            endpoints.production is not None else route.production
        self.dispatch: HookDispatch | None = None
        # With hooks, conn.reply() writes to the client from other greenlets than the
        # relay's: all client writes then go through this lock, one at a time.
        self._client_writes: Semaphore | None = None
        shadows = route.shadow if mirror else ()
        if route.baseline is not None and mirror:
            shadows = (*shadows, route.baseline)
        if hooks is not None:
            self.dispatch = HookDispatch(hooks, route.name, peer, self._destination.text,
                                         [address.text for address in shadows],
                                         self._reply, self.abort)
            self._client_writes = Semaphore()
        sinks = []
        for address in shadows:
            backend = stats.shadow(address.text)
            sinks.append(ShadowSink(
                Upstream(address, backend,
                         Exchanges(route.protocol, backend, stats,
                                   f"{label} shadow {address.text}", route.observe_max_header,
                                   shared),
                         f"route {route.name}: shadow"),
                route, label, spawn, self.production,
                self._shadow_answer if hooks is not None else None))
        # Without shadows, the empty tuple every session shares: no list kept (and
        # tracked by the cycle collector) a connection.
        self.shadows: list[ShadowSink] | tuple[()] = sinks or ()
        self._filter: RequestFilter | None = None
        if self.shadows and self.production.observer.watching:
            comparison = self._pair_answers()
            if route.shadow_filter:
                self._filter = RequestFilter(route.protocol, route.shadow_filter,
                                             comparison.decided)
        if endpoints is not None:
            self._connect_as(endpoints)

    def _connect_as(self, endpoints: Endpoints) -> None:
        """Where production and shadows are connected from and what PROXY header each
        gets first: set before any of them can be connected (a connect answers from a
        later turn of the loop)."""
        route = self.route
        self.production.address = self._destination
        if route.source == "client":
            if endpoints.client_ip is not None:  # else (a unix client): from our own
                self.production.source = (endpoints.client_ip, True)
        elif route.source is not None:
            self.production.source = (route.source, False)
        if route.send_proxy != "off":
            self.production.preamble = endpoints.proxy_header(route.send_proxy)
        if route.shadow_send_proxy != "off":
            header = endpoints.proxy_header(route.shadow_send_proxy)
            for sink in self.shadows:
                sink.upstream.preamble = header

    def _pair_answers(self) -> Comparison:
        """Hand production's answers and each shadow's to one Comparison (compare.py)."""
        route = self.route
        comparison = Comparison(route, self.stats, [sink.name for sink in self.shadows])
        protocol = route.protocol
        rules = comparison.rules
        if rules is None:
            capture = None
        elif rules.mode == "status":  # the head is all it reads: no body kept, no hash
            capture = partial(Capture, protocol, HEAD_ROOM, digest=False)
        else:
            capture = partial(Capture, protocol, route.compare_max_body + HEAD_ROOM)
        self.production.observer.compare_in(
            comparison, PRODUCTION, capture and capture(),
            capture and Capture(protocol, REQUEST_KEPT, digest=False))
        for sink in self.shadows:
            sink.upstream.observer.compare_in(comparison, sink.name, capture and capture())
        return comparison

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, on_end: Callable[["Session"], None]) -> None:
        """Connect production, then relay; called once, from the hub. `on_end(self)` is
        called once, when client and production are closed; shadows still running are
        left to `finish()`."""
        self._on_end = on_end
        if self.dispatch is not None and self.dispatch.hooks.on_connect is not None:
            self._spawn(self._hooked_connect)
        else:
            self.production.connect(self.route.connect_timeout, self._production_connected,
                                    self._spawn, self._destination)

    def _hooked_connect(self) -> None:
        candidates = self.dispatch.connect(self._destination)
        if candidates is None or self.reason:  # failed, refused, or closed by the hook
            self._end()
        else:
            self._connect(candidates)

    def _connect(self, candidates: list[Address]) -> None:
        """Try each production address in turn until one accepts."""
        self._candidates = candidates
        self.production.connect(self.route.connect_timeout, self._production_connected,
                                self._spawn, self._candidates.pop(0))

    def _production_connected(self, error: OSError | None) -> None:
        if error is not None:
            if out_of_descriptors(error):
                self.reason = "out of file descriptors: production not tried (raise the " \
                              "open-files limit: LimitNOFILE, ulimit -n)"
            else:
                self.reason = f"production {self.production.address} unreachable: " \
                              f"{_describe(error)}"
            if self._candidates:
                self.production.connect(self.route.connect_timeout,
                                        self._production_connected, self._spawn,
                                        self._candidates.pop(0))
                return
            if self.dispatch is not None:
                self._spawn(self._unreachable_hooked)
            else:
                self._end()
            return
        if self.dispatch is not None:
            self.dispatch.conn.production = self.production.address.text  # hooks see it
            self._spawn(self._relay_hooked)
            return
        if self._archive is not None:
            self._spawn(self._relay_intercepted)
            return
        observer = self.production.observer
        if observer.watching:
            self.production.channel.stamp_arrivals()  # answers timed as they arrived
        # With nothing to mirror, the observer's own methods are the taps: one Python
        # call less a chunk each way (watching never changes on a connection).
        watching = observer.watching
        if self.shadows:
            up = Direction(self.client, self.production.channel, self.production.sent,
                           self._mirror, self._client_eof, clocked=watching)
        else:
            up = Direction(self.client, self.production.channel, self.production.sent,
                           observer.sent if watching else None, clocked=watching)
        down = Direction(self.production.channel, self.client, self.production.received,
                         observer.received if watching else None, stamped=watching)
        Relay(up, down).start(self._end)

    def _end(self, failure: Broken | None = None) -> None:
        """Close client and production and call on_end, once; `failure`: what ended the
        relay, if it failed."""
        if failure is not None:
            self._fail(failure)
        on_end, self._on_end = self._on_end, None
        if on_end is not None:  # once
            self.client.close()
            self.production.close(error=self._production_failed)
            on_end(self)

    def abort(self, reason: str) -> None:
        """End the session now, from any greenlet: both directions see EOF and stop."""
        if not self.reason:
            self.reason = reason
        self.client.abort()
        if self.production.connecting:
            self.production.cancel()
            self._end()
            return
        if self.production.channel is not None:
            self.production.channel.abort()
        for sink in self.shadows:
            sink.finish()

    def idle_seconds(self, now: float) -> float:
        """How long no byte has moved either way, as seen at successive calls."""
        moved = self.production.sent.bytes + self.production.received.bytes
        if moved != self._idle_bytes:
            self._idle_bytes, self._idle_since = moved, now
        return now - self._idle_since

    # --- without hooks: libev callbacks ------------------------------------------------

    def _new_turn(self) -> bool:
        """Production has answered since the client's last chunk: this one starts a new
        turn of the conversation (shadows get it once they have answered too)."""
        answered = self.production.received.bytes
        if answered == self._answered_mark:
            return False
        self._answered_mark = answered
        return True

    def _mirror(self, chunk, sending: float = 0.0) -> None:
        # Production's request clock first (`sending`: when it was written, just before
        # this tap); a shadow's write (a syscall that may wake the shadow) must not count
        # against it.
        observer = self.production.observer
        if observer.watching:
            observer.sent(chunk, sending)
        if self.shadows:
            answered = self.production.received.bytes  # _new_turn(), inline: every chunk
            new_turn = answered != self._answered_mark
            self._answered_mark = answered
            if self._filter is not None:
                self._feed_filtered(chunk, new_turn)
                return
            for sink in self.shadows:
                sink.feed(chunk, new_turn)

    def _feed_filtered(self, chunk, new_turn: bool) -> None:
        """Mirror what the shadow-filter lets through; end the shadows' streams if it
        had to stop."""
        request_filter = self._filter
        if request_filter.stopped:
            return
        data = request_filter.feed(chunk)
        for sink in self.shadows:
            if data:
                sink.feed(data, new_turn)
            if request_filter.stopped:
                sink.finish()

    def _client_eof(self) -> None:
        for sink in self.shadows:
            sink.finish()

    # --- with an archive: greenlets -----------------------------------------------------

    def _relay_intercepted(self) -> None:
        """Both directions as copy_pumps through an Interception, which may answer the
        client itself (store calls block only these greenlets)."""
        interception = Interception(self._archive, self._write_intercepted)
        observer = self.production.observer

        def upstream(chunk):
            data = interception.from_client(chunk)
            if data and observer.watching:
                observer.sent(data)
            return data

        def downstream(chunk):
            if observer.watching:
                observer.received(chunk)
            interception.from_production(chunk)

        production = self.production.channel
        try:
            replies = self._spawn(self._pump, production, self.client, self.production.received,
                                  downstream, _nothing)
            self._pump(self.client, production, self.production.sent, upstream,
                       self._client_eof)
            replies.join()
        finally:
            self._end()

    def _write_intercepted(self, data: bytes) -> None:
        try:
            self.client.flush(data)
        except OSError as error:
            raise Broken(self.client, error) from None

    # --- with hooks: greenlets ---------------------------------------------------------

    def _unreachable_hooked(self) -> None:
        try:
            self._production_finished()
        finally:
            self._end()

    def _relay_hooked(self) -> None:
        """production -> client runs a copy_pump in a greenlet of its own, writing under
        the lock conn.reply() uses; client -> production does too when there is an
        on_data hook, else a Relay direction this greenlet waits on."""
        downstream = self._spawn(self._relay_down)
        try:
            self._contained(self._relay_up)
        finally:
            downstream.join()  # it ends soon: whatever ended this side aborted the session
            self._end()

    def _relay_up(self) -> None:
        production = self.production.channel
        if self.dispatch.sees_client_data:
            self._pump(self.client, production, self.production.sent,
                       self._upstream_hooked, self._client_eof)
            return
        observer = self.production.observer
        failure = Relay(Direction(
            self.client, production, self.production.sent,
            self._mirror if self.shadows or observer.watching else None,
            self._client_eof)).run()
        if failure is not None:
            self._fail(failure)

    def _relay_down(self) -> None:
        self._contained(self._pump, self.production.channel, self.client,
                        self.production.received, self._downstream_hooked,
                        self._production_finished)
        self._production_finished()

    def _contained(self, relay: Callable, *args) -> None:
        """Relay one direction of a hooked session: what comes out of it, other than its
        greenlet being killed, closes this connection only (HookDispatch.stray). Hooks
        ran in this greenlet and may have left something behind (a gevent.Timeout they
        did not cancel); nothing of theirs may reach gevent's hub, where a SystemExit
        would end the process."""
        try:
            relay(*args)
        except GreenletExit:
            self.abort("stopped")
            raise
        except BaseException as error:
            self.dispatch.stray(error)

    def _pump(self, src: Channel, dst: Channel, counter, on_chunk, on_eof) -> None:
        """A copy_pump until EOF; a failure aborts the session."""
        try:
            copy_pump(src, dst, counter, on_chunk, on_eof)
        except Broken as broken:
            self._fail(broken)

    def _production_finished(self) -> None:
        """on_finish(conn, "production"), once: before the client is half-closed if
        production ended normally (so the hook may still reply), else at the end."""
        if not self._production_done:
            self._production_done = True
            self.dispatch.finish("production")

    def _upstream_hooked(self, chunk):
        routed = self.dispatch.client_data(chunk)
        if not routed:
            return None
        new_turn = self._new_turn()
        for sink in self.shadows:
            data = routed.get(sink.name)
            if data:
                sink.feed(data, new_turn)
        data = routed.get("production")
        if data and self.production.observer.watching:
            self.production.observer.sent(data)
        return data or None

    def _downstream_hooked(self, chunk):
        observer = self.production.observer
        if observer.watching:
            observer.received(chunk)
        data = self.dispatch.response("production", chunk)
        if data:
            try:
                self._write_client(data)
            except OSError as error:
                raise Broken(self.client, error) from None
        return None

    def _write_client(self, data) -> None:
        with self._client_writes:
            self.client.flush(data)

    def _shadow_answer(self, sink: ShadowSink, chunk) -> None:
        """A shadow's answer (in its reader greenlet), its end when chunk is None, or
        what a hook left behind in that greenlet (an exception: see HookDispatch.stray)."""
        if chunk is None:
            self.dispatch.finish(sink.name)
        elif isinstance(chunk, BaseException):
            self.dispatch.stray(chunk)
        else:
            self.dispatch.response(sink.name, chunk)

    def _reply(self, data: bytes) -> None:
        try:
            self._write_client(data)
        except OSError as error:
            self.abort(f"client {_describe(error)}")

    # --- ending ------------------------------------------------------------------------

    def _fail(self, broken: Broken) -> None:
        production = broken.channel is self.production.channel
        if production:
            self._production_failed = True
            self.stats.production.resets += 1
        if broken.error.errno == errno.ECONNRESET:
            # Pass the reset on: a FIN would make a truncated answer (or request) look
            # complete to the other side.
            other = self.client if production else self.production.channel
            if other is not None:
                other.reset()
        side = "production" if production else "client"
        if not is_disconnect(broken.error):
            log.warning("route %s client %s: %s: %s", self.route.name, self.peer, side,
                        _describe(broken.error))
        self.abort(f"{side}: {_describe(broken.error)}")

    def finish(self) -> None:
        """After on_end: give shadows their linger time, then log the connection's line."""
        if self.shadows:
            deadline = time.monotonic() + self.route.shadow_linger  # one for all shadows
            for sink in self.shadows:
                sink.linger(max(0.0, deadline - time.monotonic()))
        if log.isEnabledFor(logging.INFO):
            self._log_line()

    def finish_then(self, on_done: Callable[[], None]) -> None:
        """finish() without blocking, from the hub, for a session without hooks:
        `on_done()` once every shadow's outcome is decided and the line is logged."""
        # One count per shadow, and one for this call: done once all have settled.
        self._unsettled = len(self.shadows) + 1
        if self.shadows:
            deadline = time.monotonic() + self.route.shadow_linger  # one for all shadows
            settled = partial(self._settled, on_done)
            for sink in self.shadows:
                sink.linger_then(max(0.0, deadline - time.monotonic()), settled)
        self._settled(on_done)

    def _settled(self, on_done: Callable[[], None]) -> None:
        self._unsettled -= 1
        if not self._unsettled:
            if log.isEnabledFor(logging.INFO):
                self._log_line()
            on_done()

    def _log_line(self) -> None:
        """The connection's line (the caller has checked that INFO is logged)."""
        duration = time.monotonic() - self.started
        shadows = "".join(f" shadow[{sink.address}]={sink.state}"
                          + (f"({sink.why})" if sink.why else "") for sink in self.shadows)
        # The same as keys of their own, for log-format = json.
        fields = {"route": self.route.name, "client": self.peer,
                  "production": self._destination.text,
                  "duration": round(duration, 6), "up": self.production.sent.bytes,
                  "down": self.production.received.bytes,
                  "shadows": {sink.address.text: {"outcome": sink.state,
                                                  "why": sink.why or None}
                              for sink in self.shadows},
                  "close": self.reason or EOF}
        log.info("route=%s client=%s production=%s duration=%.3fs up=%d down=%d%s "
                 "close=%s", self.route.name, self.peer, self._destination,
                 duration, self.production.sent.bytes,
                 self.production.received.bytes, shadows, self.reason or EOF,
                 extra={"fields": fields})


def _nothing() -> None:
    """An on_eof with nothing to do."""
