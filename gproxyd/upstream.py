"""Upstream: a session's connection to one backend, production or a shadow.

What production and shadows share: connecting without blocking the client's path (libev
callbacks for a literal address, a greenlet for a host name, which needs the resolver),
the Channel once open, the bytes each way, the observer that pairs requests with
answers, and the accounting when it closes. What differs stays with the user: the
session relays production to the client, a ShadowSink queues and discards.
"""
from __future__ import annotations

import errno
from typing import Callable

from .channel import Channel, Connecting, connect, out_of_descriptors
from .observe import Exchanges
from .outages import OUTAGES
from .relay import Counter
from .settings import Address
from .stats import BackendStats
from .tls import Upgrade
from .transparent import BoundConnecting


class Upstream:
    """One backend connection: `connect()` it, use `channel`, then `close()` it.

    `sent` counts what was written to the backend (requests), `received` what it
    answered. Connect failures are counted in `stats` here, and outages logged (once
    each, see outages.py) under `role` ("route web: production").
    """
    __slots__ = ("address", "stats", "observer", "channel", "sent", "received", "role",
                 "_connecting", "_on_connected", "_closed", "preamble", "source", "tls")

    def __init__(self, address: Address, stats: BackendStats, observer: Exchanges,
                 role: str = "backend", preamble: bytes = b"",
                 source: tuple[str, bool] | None = None):
        """`preamble`: written first on the connection, counted nowhere (a PROXY header);
        `source`: (ip, transparent) to connect from (transparent: IP_TRANSPARENT, the ip
        need not be this host's)."""
        self.address = address
        self.preamble = preamble
        self.source = source
        self.role = role
        self.stats = stats
        self.observer = observer
        self.channel: Channel | None = None
        self.sent = Counter()
        self.received = Counter()
        self._connecting: Connecting | None = None
        self._on_connected: Callable[[OSError | None], None] | None = None
        self._closed = False
        self.tls: Upgrade | None = None  # production-tls, shadow-tls (tls.RouteTLS.secure)

    @property
    def connecting(self) -> bool:
        return self._on_connected is not None

    def connect(self, timeout: float, on_connected: Callable[[OSError | None], None],
                spawn: Callable, address: Address | None = None) -> None:
        """Connect to `address` (default: the one given at creation) without blocking;
        `on_connected(None)` once `channel` is open, or `on_connected(error)`, called
        once from the hub or from the greenlet `spawn` started, unless cancel() or
        close() comes first."""
        if address is not None:
            self.address = address
        self._on_connected = on_connected
        if self.source is not None:
            if self.address.numeric:
                self._connecting = BoundConnecting(self.address, timeout, *self.source,
                                                   self._connected)
            else:  # what a hook chose: config refuses host names with a source
                spawn(self._connected, None, OSError(
                    errno.EINVAL, f"cannot connect from {self.source[0]} to a host name"))
        elif self.address.numeric:
            self._connecting = Connecting(self.address, timeout, self._connected)
        else:
            spawn(self._connect_by_name, timeout)

    def _connect_by_name(self, timeout: float) -> None:
        try:
            channel = connect(self.address, timeout)
        except OSError as error:
            self._connected(None, error)
            return
        self._connected(channel, None)

    def _connected(self, channel: Channel | None, error: OSError | None) -> None:
        self._connecting = None
        on_connected, self._on_connected = self._on_connected, None
        if on_connected is None or self._closed:  # given up meanwhile
            if channel is not None:
                channel.close()
            return
        if channel is None:
            if out_of_descriptors(error):  # ours, not the backend's: counted apart
                self.stats.out_of_descriptors += 1
            else:
                self.stats.connect_failures += 1
                OUTAGES.failed(f"{self.role} {self.address}",
                               getattr(error, "strerror", None) or str(error) or "timed out")
            self.stats.errors += 1
            on_connected(error)
            return
        if self.preamble:
            error = self._send_preamble(channel)
            if error is not None:  # a failed connect, as if the connect itself had failed
                channel.close()
                self._on_connected = on_connected
                self._connected(None, error)
                return
        self.channel = channel
        if OUTAGES:  # something is down: was it this one?
            OUTAGES.recovered(f"{self.role} {self.address}")
        if self.tls is not None:
            self._secure(on_connected)
            return
        on_connected(None)

    def _send_preamble(self, channel: Channel) -> OSError | None:
        """Write the preamble into a fresh connection, whose send buffer has room for it
        all; what went wrong if it still failed (None: written)."""
        try:
            if channel.sock.send(self.preamble) == len(self.preamble):
                return None
            return OSError(errno.EAGAIN, "PROXY header not taken")
        except OSError as failure:
            return failure

    def cancel(self) -> None:
        """Stop connecting; on_connected is not called."""
        self._on_connected = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    def close(self, error: bool = False, owed_answers: bool = False) -> None:
        """Close the connection (once) and account for it in the observer and stats;
        `error`: it ended by a reset or failure; `owed_answers`: requests it has not
        answered are timeouts (see Exchanges.closed)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        if self.channel is not None:
            self.channel.close()
            self.observer.closed(self.sent, self.received, error, owed_answers)

    def _secure(self, on_connected: Callable[[OSError | None], None]) -> None:
        """The TLS handshake on the new connection: `channel` is the plaintext end of its
        bridge once it is done (tls.py); a failed handshake is a failed connect."""
        raw, self.channel = self.channel, None  # the bridge's until the handshake ends
        self._on_connected = on_connected  # still connecting: cancel() stops the handshake
        self._connecting = self.tls.secure(raw, self.address, self._secured)

    def _secured(self, plain: Channel | None, error: OSError | None) -> None:
        self._connecting = None
        on_connected, self._on_connected = self._on_connected, None
        if error is not None:
            self.stats.connect_failures += 1
            self.stats.errors += 1
            on_connected(error)
            return
        self.channel = plain
        on_connected(None)
