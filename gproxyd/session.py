"""Session: one client connection, relayed to production and mirrored to shadows.

Without hooks a session needs no greenlet: `start()` (called in the hub by the
listener) connects production and relays both ways with libev callbacks (relay.Relay);
shadows and the observer see each client chunk through a non-blocking tap. With hooks
(user code that may block) or a host-name production, `run()` does the same work in a
greenlet, hooked directions as copy_pumps in greenlets of their own.

The session owns both channels and its shadow sinks: `on_end` is called when client
and production are closed, and `finish()` lingers for the shadows and logs the line.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import gevent
from gevent.lock import Semaphore

from .config import Route
from .hooks import Connection, HookSet, hook_failure
from .observe import Exchanges
from .relay import (
    EOF,
    Broken,
    Channel,
    Connecting,
    Counter,
    Relay,
    connect,
    copy_pump,
    is_disconnect,
)
from .settings import BadValue, address
from .shadow import ShadowSink
from .stats import RouteStats

log = logging.getLogger("gproxyd.session")


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


_FAILED = object()  # a hook raised: the session is being closed


class Session:
    __slots__ = ("route", "client", "peer", "stats", "production", "observer", "shadows",
                 "up", "down", "started", "reason", "_idle_mark", "_production_failed",
                 "hooks", "conn", "_client_writes", "_production_done", "_on_end",
                 "_connecting")

    def __init__(self, route: Route, client: Channel, peer: str, stats: RouteStats,
                 mirror: bool, hooks: HookSet | None = None):
        self.route = route  # the route as it was when accepted; reloads don't change it
        self.client = client
        self.peer = peer
        self.stats = stats
        self.production: Channel | None = None
        label = f"route {route.name} client {peer}"
        self.observer = Exchanges(route.protocol, stats.production, stats, label)
        self.shadows: list[ShadowSink] = []
        self.up = Counter()    # client -> production
        self.down = Counter()  # production -> client
        self.started = time.monotonic()
        self.reason = ""
        self._idle_mark = (0, self.started)
        self._production_failed = False
        self.hooks = hooks
        self.conn: Connection | None = None
        self._connecting: Connecting | None = None
        # With hooks, conn.reply() writes to the client from other greenlets than the
        # relay's: all client writes then go through this lock, one at a time.
        self._client_writes = Semaphore() if self.hooks else None
        self._production_done = False
        if mirror:
            on_answer = self._shadow_answer if self.hooks else None
            self.shadows = [
                ShadowSink(address, route.shadow_buffer, route.shadow_connect_timeout,
                           stats.shadow(address.text),
                           Exchanges(route.protocol, stats.shadow(address.text), stats,
                                     f"{label} shadow {address}"), label, on_answer,
                           route.shadow_write_delay)
                for address in route.shadow]
        if self.hooks:
            self.conn = Connection(route.name, peer,
                                   ["production"] + [sink.address.text for sink in self.shadows],
                                   route.production.text, self._reply, self._closed_by_hook)

    # --- lifecycle ---------------------------------------------------------------------

    def run(self, on_end: Callable[["Session"], None]) -> None:
        """Connect production and relay (in the greenlet the listener gave it).

        `on_end(self)` is called once, when client and production are closed. A route
        without hooks is relayed by libev callbacks: run() returns as soon as they are
        started and on_end comes later from the hub, so an idle connection holds no
        greenlet. With hooks (user code that may block), run() relays to the end.
        The client's connection lives as long as production's: shadows still running
        are left to `finish()`.
        """
        self._on_end = on_end
        handed_over = False
        try:
            if self.hooks and self.hooks.on_connect:
                if self._call("on_connect", self.hooks.on_connect, self.conn) is _FAILED:
                    return
                if self.reason:  # the hook closed the connection
                    return
            self.production = self._connect_production()
            if self.production is None:
                self._production_finished()
                return
            if self.hooks is None:
                self._relay_by_callbacks()
                handed_over = True
            else:
                self._relay_hooked()
        finally:
            if not handed_over:
                self._end()

    @property
    def needs_greenlet(self) -> bool:
        """Hooks may block, and a host name needs the resolver: run() in a greenlet.
        Otherwise start() it from the hub."""
        return self.hooks is not None or not self.route.production.numeric

    def start(self, on_end: Callable[["Session"], None]) -> None:
        """Like run(), without a greenlet (see needs_greenlet): libev callbacks connect
        production, then relay; `on_end(self)` comes from the hub when done."""
        self._on_end = on_end
        self._connecting = Connecting(self.route.production, self.route.connect_timeout,
                                      self._production_connected)

    def _production_connected(self, channel: Channel | None, error: OSError | None) -> None:
        self._connecting = None
        if channel is None:
            self._production_unreachable(self.route.production, error)
            self._end()
        elif self.reason:  # aborted while connecting
            channel.close()
            self._end()
        else:
            self.production = channel
            self._relay_by_callbacks()

    def _production_unreachable(self, target, error: OSError) -> None:
        self.stats.production.connect_failures += 1
        self.stats.production.errors += 1
        self.reason = f"production {target} unreachable: {_describe(error)}"

    def _end(self) -> None:
        self._close()
        self._on_end(self)

    def _connect_production(self) -> Channel | None:
        addresses = [self.route.production]
        if self.conn is not None and self.conn.production != self.route.production.text:
            chosen = self.conn.production
            try:
                addresses = [address(text) for text in
                             ([chosen] if isinstance(chosen, str) else list(chosen))]
            except (BadValue, TypeError) as error:
                self.reason = f"hook on_connect set a bad production: {error}"
                log.error("route %s client %s: %s", self.route.name, self.peer, self.reason)
                return None
        for target in addresses:
            try:
                channel = connect(target, self.route.connect_timeout)
                if self.conn is not None:
                    self.conn.production = target.text  # hooks see where it went
                return channel
            except OSError as error:
                self._production_unreachable(target, error)
        return None

    def abort(self, reason: str) -> None:
        """End the session now, from any greenlet: both directions see EOF and stop."""
        if not self.reason:
            self.reason = reason
        self.client.abort()
        if self._connecting is not None:  # started without a greenlet, still connecting
            self._connecting.cancel()
            self._connecting = None
            self._end()
            return
        if self.production is not None:
            self.production.abort()
        for sink in self.shadows:
            sink.finish()

    def idle_seconds(self, now: float) -> float:
        """How long no byte has moved either way, as seen at successive calls."""
        moved = self.up.bytes + self.down.bytes
        if moved != self._idle_mark[0]:
            self._idle_mark = (moved, now)
        return now - self._idle_mark[1]

    # --- the two directions ------------------------------------------------------------

    def _relay_by_callbacks(self) -> None:
        """No hooks: libev callbacks relay both ways; taps feed shadows and observers."""
        up = (self.client, self.production, self.up,
              self._mirror if self.shadows or self.observer.framed else None,
              self._client_eof)
        down = (self.production, self.client, self.down,
                self._observe_answer if self.observer.framed else None)
        Relay(up, down).start(self._relayed)

    def _relayed(self, failure: Broken | None) -> None:
        if failure is not None:
            self._fail(failure)
        self._end()

    def _relay_hooked(self) -> None:
        """With hooks: production -> client runs a copy_pump in a second greenlet,
        writing under the lock conn.reply() uses; client -> production does too when
        there is an on_data hook, else a Relay direction this greenlet waits on."""
        downstream = gevent.spawn(self._relay_down)
        if self.hooks.on_data:
            self._run(lambda: copy_pump(self.client, self.production, self.up,
                                        self._upstream_hooked, self._client_eof))
        else:
            self._run(Relay((self.client, self.production, self.up,
                             self._mirror if self.shadows or self.observer.framed else None,
                             self._client_eof)))
        downstream.join()

    def _relay_down(self) -> None:
        # The hooked downstream writes to the client itself (_write_client), under the
        # same lock as conn.reply().
        self._run(lambda: copy_pump(self.production, self.client, self.down,
                                    self._downstream_hooked, self._production_finished))
        self._production_finished()

    def _production_finished(self) -> None:
        """on_finish(conn, "production"), once: before the client is half-closed if
        production ended normally (so the hook may still reply), else at the end."""
        if self._production_done:
            return
        self._production_done = True
        if self.hooks is not None and self.hooks.on_finish:
            self._call("on_finish", self.hooks.on_finish, self.conn, "production")

    def _run(self, relay) -> None:
        """Run a Relay or a pump; a failure aborts the session."""
        try:
            failure = relay.run() if isinstance(relay, Relay) else relay()
        except Broken as broken:
            failure = broken
        if isinstance(failure, Broken):
            self._fail(failure)

    def _mirror(self, chunk) -> None:
        for sink in self.shadows:
            sink.feed(chunk)
        if self.observer.framed:
            self.observer.sent(chunk)

    def _observe_answer(self, chunk) -> None:
        if self.observer.framed:  # not after a fallback to tcp-level measurement
            self.observer.received(chunk)

    # --- with hooks ----------------------------------------------------------------------

    def _call(self, name: str, hook, *args):
        """Run a hook; if it raises, log it, close the connection and return _FAILED."""
        try:
            return hook(*args)
        except Exception as error:  # a user hook: anything may come out of it
            hook_failure(self.hooks, name, self.route.name, self.peer, error)
            self.abort(f"hook {name} failed: {type(error).__name__}")
            return _FAILED

    def _upstream_hooked(self, chunk):
        result = self._call("on_data", self.hooks.on_data, self.conn, bytes(chunk))
        if result is None or result is _FAILED:
            return None
        if not self._check("on_data", result, bytes, bytearray, tuple, dict):
            return None
        if isinstance(result, dict):
            for sink in self.shadows:
                if result.get(sink.address.text):
                    sink.feed(result[sink.address.text])
            result = result.get("production")
            if result and self.observer.framed:
                self.observer.sent(result)
            return result or None
        targets = None
        if isinstance(result, tuple):
            result, targets = result
        if not result:
            return None
        for sink in self.shadows:
            if targets is None or sink.address.text in targets:
                sink.feed(result)
        if targets is not None and "production" not in targets:
            return None
        if self.observer.framed:
            self.observer.sent(result)
        return result

    def _downstream_hooked(self, chunk):
        if self.observer.framed:
            self.observer.received(chunk)
        result = chunk
        if self.hooks.on_response:
            result = self._call("on_response", self.hooks.on_response, self.conn,
                                "production", bytes(chunk))
            if result is _FAILED or not self._check("on_response", result, bytes):
                return None
        if result:
            try:
                self._write_client(result)
            except OSError as error:
                raise Broken(self.client, error) from None
        return None

    def _write_client(self, data) -> None:
        with self._client_writes:
            self.client.sendall(data)

    def _check(self, name, value, *types) -> bool:
        if value is None or isinstance(value, types):
            return True
        error = TypeError(f"{name} returned {type(value).__name__} (expected "
                          f"{' or '.join(t.__name__ for t in types)} or None)")
        hook_failure(self.hooks, name, self.route.name, self.peer, error)
        self.abort(f"hook {name} failed: TypeError")
        return False

    def _shadow_answer(self, sink: ShadowSink, chunk) -> None:
        """A shadow's answer (in its reader greenlet), or its end when chunk is None."""
        if chunk is None:
            if self.hooks.on_finish:
                self._call("on_finish", self.hooks.on_finish, self.conn, sink.address.text)
        elif self.hooks.on_response:
            self._call("on_response", self.hooks.on_response, self.conn, sink.address.text,
                       bytes(chunk))

    def _reply(self, data: bytes) -> None:
        try:
            self._write_client(data)
        except OSError as error:
            self.abort(f"client {_describe(error)}")

    def _closed_by_hook(self) -> None:
        self.abort("closed by hook")

    def _client_eof(self) -> None:
        for sink in self.shadows:
            sink.finish()

    def _fail(self, broken: Broken) -> None:
        if broken.channel is self.production:
            self._production_failed = True
            self.stats.production.resets += 1
        side = "production" if broken.channel is self.production else "client"
        if not is_disconnect(broken.error):
            log.warning("route %s client %s: %s: %s", self.route.name, self.peer, side,
                        _describe(broken.error))
        self.abort(f"{side}: {_describe(broken.error)}")

    def _close(self) -> None:
        self.client.close()
        if self.production is None:
            return
        self.production.close()
        self.observer.closed(self.up, self.down, error=self._production_failed)

    def finish(self) -> None:
        """After run(): give shadows their linger time, then log the connection's line."""
        deadline = time.monotonic() + self.route.shadow_linger  # one for all shadows
        for sink in self.shadows:
            sink.linger(max(0.0, deadline - time.monotonic()))
        if log.isEnabledFor(logging.INFO):
            shadows = "".join(f" shadow[{sink.address}]={sink.state}" for sink in self.shadows)
            log.info("route=%s client=%s production=%s duration=%.3fs up=%d down=%d%s "
                     "close=%s", self.route.name, self.peer, self.route.production,
                     time.monotonic() - self.started, self.up.bytes, self.down.bytes,
                     shadows, self.reason or EOF)

