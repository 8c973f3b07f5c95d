"""Session: one client connection, relayed to production and mirrored to shadows.

A session runs in the greenlet its listener spawned for the connection (`run()`):
that greenlet connects production, then relays client -> production itself while a
second greenlet relays production -> client. The session owns both channels and its
shadow sinks, and has closed all of them when `run()` returns.
"""
from __future__ import annotations

import logging
import time

import gevent

from .config import Route
from .relay import (EOF, Channel, Counter, connect, copy_pump, is_disconnect,
                    splice_pump)
from .shadow import ShadowSink
from .stats import RouteStats

log = logging.getLogger("gproxyd.session")


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class Session:
    __slots__ = ("route", "client", "peer", "stats", "production", "shadows", "up", "down",
                 "started", "reason", "_idle_mark")

    def __init__(self, route: Route, client: Channel, peer: str, stats: RouteStats,
                 mirror: bool):
        self.route = route  # the route as it was when accepted; reloads don't change it
        self.client = client
        self.peer = peer
        self.stats = stats
        self.production: Channel | None = None
        self.shadows: list[ShadowSink] = []
        self.up = Counter()    # client -> production
        self.down = Counter()  # production -> client
        self.started = time.monotonic()
        self.reason = ""
        self._idle_mark = (0, self.started)
        if mirror:
            label = f"route {route.name} client {peer}"
            self.shadows = [
                ShadowSink(address, route.shadow_buffer, route.shadow_connect_timeout,
                           stats.shadow(address.text), label)
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
                self.stats.production_errors += 1
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

    def idle_seconds(self, now: float) -> float:
        """How long no byte has moved either way, as seen at successive calls."""
        moved = self.up.bytes + self.down.bytes
        if moved != self._idle_mark[0]:
            self._idle_mark = (moved, now)
        return now - self._idle_mark[1]

    # --- the two directions ------------------------------------------------------------

    def _relay_up(self) -> None:
        try:
            if self.shadows:
                copy_pump(self.client, self.production, self.up, self._mirror, self._mirror_eof)
            else:
                splice_pump(self.client, self.production, self.up)
        except OSError as error:
            self._fail("client -> production", error)

    def _relay_down(self) -> None:
        try:
            splice_pump(self.production, self.client, self.down)
        except OSError as error:
            self._fail("production -> client", error)

    def _mirror(self, chunk) -> None:
        for sink in self.shadows:
            sink.feed(chunk)

    def _mirror_eof(self) -> None:
        for sink in self.shadows:
            sink.finish()

    def _fail(self, direction: str, error: OSError) -> None:
        if not is_disconnect(error):
            log.warning("route %s client %s: %s: %s", self.route.name, self.peer, direction,
                        _describe(error))
        self.abort(f"{direction}: {_describe(error)}")

    def _close(self) -> None:
        self.client.close()
        if self.production is not None:
            self.production.close()
        self.stats.bytes_up += self.up.bytes
        self.stats.bytes_down += self.down.bytes

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
