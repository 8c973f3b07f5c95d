"""Session: one client connection, relayed to production and mirrored to shadows.

A session runs in the greenlet its listener spawned for the connection (`run()`):
that greenlet connects production, then relays client -> production itself while a
second greenlet relays production -> client. The session owns both channels and its
shadow sinks, and has closed all of them when `finish()` returns.

Each direction takes the cheapest path that serves the route: `splice` when nothing
needs to see the bytes, `recv_into` a reused buffer when shadows or an observer do.
"""
from __future__ import annotations

import logging
import time

import gevent

from .config import Route
from .observe import Exchanges
from .relay import EOF, Broken, Channel, Counter, connect, copy_pump, is_disconnect, splice_pump
from .shadow import ShadowSink
from .stats import RouteStats

log = logging.getLogger("gproxyd.session")


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class Session:
    __slots__ = ("route", "client", "peer", "stats", "production", "observer", "shadows",
                 "up", "down", "started", "reason", "_idle_mark", "_production_failed")

    def __init__(self, route: Route, client: Channel, peer: str, stats: RouteStats,
                 mirror: bool):
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
        if mirror:
            self.shadows = [
                ShadowSink(address, route.shadow_buffer, route.shadow_connect_timeout,
                           stats.shadow(address.text),
                           Exchanges(route.protocol, stats.shadow(address.text), stats,
                                     f"{label} shadow {address}"), label)
                for address in route.shadow]

    # --- lifecycle ---------------------------------------------------------------------

    def run(self) -> None:
        """Relay until both directions are done or one fails; close client and production.

        The client's connection lives as long as production's: shadows still running
        are left to `finish()`.
        """
        try:
            try:
                self.production = connect(self.route.production, self.route.connect_timeout)
            except OSError as error:
                self.stats.production.connect_failures += 1
                self.stats.production.errors += 1
                self.reason = f"production unreachable: {_describe(error)}"
                return
            downstream = gevent.spawn(self._relay_down)
            self._relay_up()
            downstream.join()
        finally:
            self._close()

    def abort(self, reason: str) -> None:
        """End the session now, from any greenlet: both directions see EOF and stop."""
        if not self.reason:
            self.reason = reason
        self.client.abort()
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

    def _relay_up(self) -> None:
        try:
            if self.shadows or self.observer.framed:
                copy_pump(self.client, self.production, self.up, self._upstream_chunk,
                          self._client_eof)
            else:
                splice_pump(self.client, self.production, self.up)
        except Broken as broken:
            self._fail("client -> production", broken)

    def _relay_down(self) -> None:
        try:
            if self.observer.framed:
                copy_pump(self.production, self.client, self.down, self._downstream_chunk,
                          _nothing)
            else:
                splice_pump(self.production, self.client, self.down)
        except Broken as broken:
            self._fail("production -> client", broken)

    def _upstream_chunk(self, chunk):
        for sink in self.shadows:
            sink.feed(chunk)
        if self.observer.framed:
            self.observer.sent(chunk)
        return chunk

    def _downstream_chunk(self, chunk):
        self.observer.received(chunk)
        return chunk

    def _client_eof(self) -> None:
        for sink in self.shadows:
            sink.finish()

    def _fail(self, direction: str, broken: Broken) -> None:
        if broken.channel is self.production:
            self._production_failed = True
            self.stats.production.resets += 1
        if not is_disconnect(broken.error):
            log.warning("route %s client %s: %s: %s", self.route.name, self.peer, direction,
                        _describe(broken.error))
        side = "production" if broken.channel is self.production else "client"
        self.abort(f"{side} {_describe(broken.error)}")

    def _close(self) -> None:
        self.client.close()
        if self.production is None:
            return
        self.production.close()
        self.observer.closed(self.up, self.down, error=self._production_failed)

    def finish(self) -> None:
        """After run(): give shadows their linger time, then log the connection's line."""
        for sink in self.shadows:
            sink.linger(self.route.shadow_linger)
        if log.isEnabledFor(logging.INFO):
            shadows = "".join(f" shadow[{sink.address}]={sink.state}" for sink in self.shadows)
            log.info("route=%s client=%s production=%s duration=%.3fs up=%d down=%d%s "
                     "close=%s", self.route.name, self.peer, self.route.production,
                     time.monotonic() - self.started, self.up.bytes, self.down.bytes,
                     shadows, self.reason or EOF)


def _nothing() -> None:
    pass
