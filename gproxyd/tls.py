"""TLS on either side of a route: contexts from its options, handshakes, and the bridges
that let a session relay, observe and mirror plaintext.

A session never sees TLS. Each TLS connection (a client's, when the route has tls-cert;
production's with production-tls; a shadow's with shadow-tls) is bridged to one end of a
unix socket pair, a `BridgedChannel`, which the session uses as it would the connection's
own socket; a `Bridge` moves bytes between the pair's other end and the TLS connection,
through memory BIOs (ssl.SSLObject), with libev callbacks: no greenlet per connection,
and the session's relay, observers, comparison and hooks are the ones plain routes use.
Routes without TLS options never come here: their relay path (relay.py, splice for bulk)
is unchanged. The price on TLS routes is the pair's two extra syscalls per chunk each way,
besides the cryptography.

Who owns what: the Listener owns its route's `RouteTLS` (contexts built at start and at
each reload: new connections take the new one, live ones keep theirs) and counts failed
handshakes in its RouteStats; a Bridge owns the TLS socket and its end of the pair, and
is released by its BridgedChannel's close().
"""
from __future__ import annotations

import _socket
import errno
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from gevent import get_hub

from .channel import Channel
from .settings import Address

log = logging.getLogger("gproxyd.tls")

CHUNK = 64 * 1024  # at most this much is read, decrypted or encrypted in one callback
LOG_EVERY = 60.0  # seconds between two lines about one route side's failed handshakes

# Where ciphertext is read into the TLS layer and plaintext out of it: process-wide, as
# relay.py's shared buffer, since nothing is left in them across a wait (what a socket
# does not take is copied out first).
_cipher = bytearray(CHUNK)
_cipher_view = memoryview(_cipher)
_clear = bytearray(CHUNK)
_clear_view = memoryview(_clear)


class TLSProblem(Exception):
    """A route's TLS options that cannot be used: `key` names the option, `problem` says
    what is wrong, worded as config errors are (what was expected)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


# --- contexts ------------------------------------------------------------------------------

def uses_tls(route) -> bool:
    return bool(route.tls_cert or route.tls_key or route.production_tls or route.shadow_tls)


class _EncryptedKey(Exception):
    """Raised by the password callback: gproxyd never prompts for a passphrase."""


def _no_password():
    raise _EncryptedKey


def _common(context: ssl.SSLContext, route) -> None:
    """What both sides get: TLS 1.2 and up, OpenSSL's default cipher list (as the
    system's OpenSSL configuration shapes it), no renegotiation, and on http routes ALPN
    offering http/1.1 only: what the observers understand."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("DEFAULT")
    context.options |= ssl.OP_NO_RENEGOTIATION
    if route.protocol == "http":
        context.set_alpn_protocols(["http/1.1"])


def _read(key: str, path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError as error:
        raise TLSProblem(key, f"cannot read {path}: {error.strerror} (expected a PEM file "
                              "readable by gproxyd's user)") from None


def server_context(route) -> ssl.SSLContext:
    """The listen side's context (tls-cert, tls-key); TLSProblem if the pair is unusable."""
    certificate = _read("tls-cert", route.tls_cert)
    key_path = route.tls_key or route.tls_cert
    _read("tls-key" if route.tls_key else "tls-cert", key_path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=certificate)
    except (ssl.SSLError, ValueError):
        raise TLSProblem("tls-cert", f"no PEM certificate in {route.tls_cert} (expected "
                                     "-----BEGIN CERTIFICATE----- blocks: the server's "
                                     "certificate, then its chain)") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(context, route)
    key = "tls-key" if route.tls_key else "tls-cert"
    try:
        context.load_cert_chain(route.tls_cert, route.tls_key or None, password=_no_password)
    except _EncryptedKey:
        raise TLSProblem(key, f"the private key in {key_path} is encrypted (expected an "
                              "unencrypted key: gproxyd does not ask for a passphrase; "
                              "protect the file by its mode instead)") from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TLSProblem(key, f"the private key in {key_path} does not match the "
                                  f"certificate in {route.tls_cert} (expected the key the "
                                  "certificate was issued for)") from None
        raise TLSProblem(key, f"no PEM private key in {key_path} (expected a -----BEGIN "
                              "PRIVATE KEY----- block)") from None
    return context


def client_context(route) -> ssl.SSLContext:
    """The context towards production and shadows (production-tls, shadow-tls): verified
    against tls-ca (else the system's CAs) unless tls-verify is off."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(context, route)
    if not route.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif route.tls_ca:
        _read("tls-ca", route.tls_ca)
        try:
            context.load_verify_locations(cafile=route.tls_ca)
        except ssl.SSLError:
            raise TLSProblem("tls-ca", f"no PEM certificate in {route.tls_ca} (expected the "
                                       "CA certificates backends are verified with)") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def problems(route) -> Iterator[tuple[str, str]]:
    """(key, problem) for each thing wrong with a route's TLS options, files read as
    the daemon will read them (for --check-config and every reload)."""
    if route.tls_key and not route.tls_cert:
        yield "tls-key", "a key without a certificate (expected tls-cert too)"
    client_only = [name for name, given in (("tls-ca", route.tls_ca),
                                            ("tls-server-name", route.tls_server_name),
                                            ("tls-verify", not route.tls_verify)) if given]
    if client_only and not (route.production_tls or route.shadow_tls):
        yield client_only[0], "verifies the backends' TLS (expected production-tls = on or " \
                              "shadow-tls = on)"
    if route.tls_verify and not route.tls_server_name:
        shadows = (*route.shadow, *([route.baseline] if route.baseline else []))
        for key, on, address in (("production-tls", route.production_tls, route.production),
                                 *(("shadow-tls", route.shadow_tls, shadow)
                                   for shadow in shadows)):
            if on and address.family == socket.AF_UNIX:
                yield key, f"{address} has no host name to verify its certificate against " \
                           "(expected tls-server-name, or tls-verify = off)"
                break
    try:
        if route.tls_cert:
            server_context(route)
        if route.production_tls or route.shadow_tls:
            client_context(route)
    except TLSProblem as problem:
        yield problem.key, problem.problem


# --- failed handshakes: counted, logged at most once a minute ---------------------------

class HandshakeFailures:
    """One side of one route: each failed handshake is counted in `counts[side]` (the
    route's RouteStats.tls_handshake_failures); the first is logged, then at most one
    line each LOG_EVERY seconds with how many failed since."""

    def __init__(self, route_name: str, side: str, counts: dict):
        self.route_name, self.side, self.counts = route_name, side, counts
        counts.setdefault(side, 0)  # /metrics shows the route's sides from the start
        self._said = -LOG_EVERY
        self._unsaid = 0

    def failed(self, peer: str, reason: str) -> None:
        self.counts[self.side] += 1
        self._unsaid += 1
        now = time.monotonic()
        if now - self._said >= LOG_EVERY:
            log.warning("route %s: TLS handshake with %s %s failed: %s (%d since the last "
                        "line; logged at most once a minute, every failure is counted: "
                        "gproxyd_tls_handshake_failures_total)", self.route_name, self.side,
                        peer, reason, self._unsaid)
            self._said, self._unsaid = now, 0


def describe(error: BaseException) -> str:
    """A handshake failure in a few words."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        if error.reason:
            return error.reason.lower().replace("_", " ")
        return str(error.args[1] if len(error.args) > 1 else error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class HandshakeError(OSError):
    """A backend's TLS handshake failed; strerror says how (for the connection line)."""


# --- a route's TLS, as its listener holds it ------------------------------------------------

@dataclass(frozen=True)
class Upgrade:
    """How an Upstream (production or a shadow) turns its new connection into TLS."""
    context: ssl.SSLContext
    server_name: str  # SNI and the name verified; "" = the backend's own host
    timeout: float    # connect-timeout or shadow-connect-timeout, for the handshake
    failures: HandshakeFailures

    def secure(self, channel: Channel, address: Address,
               on_done: Callable[[Channel | None, OSError | None], None]) -> "Bridge":
        """Handshake on `channel` (just connected); `on_done(plaintext, None)` or
        `on_done(None, HandshakeError)` once, from the hub, unless the Bridge's cancel()
        comes first. A failure is counted here and logged (at most once a minute)."""
        name = self.server_name or (address.host if address.family != socket.AF_UNIX
                                    else "")

        def done(plain: Channel | None, error: BaseException | None) -> None:
            if error is None:
                on_done(plain, None)
                return
            reason = describe(error)
            self.failures.failed(str(address), reason)
            on_done(None, HandshakeError(errno.EPROTO, f"TLS handshake failed: {reason}"))

        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = self.context.wrap_bio(incoming, outgoing, server_hostname=name or None)
        return Bridge(channel, sslobj, incoming, outgoing, self.timeout, done)


class RouteTLS:
    """One route's TLS contexts and failure counters, built from its options (TLSProblem
    if a file is unusable). Immutable once built: a reload builds a new one."""

    def __init__(self, route, counts: dict):
        self.server = server_context(route) if route.tls_cert else None
        self.client_failures = HandshakeFailures(route.name, "client", counts) \
            if self.server is not None else None
        context = client_context(route) if route.production_tls or route.shadow_tls else None
        self.production = Upgrade(
            context, route.tls_server_name, route.connect_timeout,
            HandshakeFailures(route.name, "production", counts)) if route.production_tls \
            else None
        self.shadow = Upgrade(
            context, route.tls_server_name, route.shadow_connect_timeout,
            HandshakeFailures(route.name, "shadow", counts)) if route.shadow_tls else None

    def secure(self, session) -> None:
        """production-tls, shadow-tls: the session's backends are connected over TLS
        (before the session starts: nothing is connected yet)."""
        if self.production is not None:
            session.production.tls = self.production
        if self.shadow is not None:
            for sink in session.shadows:
                sink.upstream.tls = self.shadow

    def terminate(self, client: Channel, peer: str, timeout: float,
                  on_done: Callable[[Channel | None], None]) -> "Bridge":
        """Handshake with a client within `timeout`; `on_done(plaintext)` once it is
        done, or `on_done(None)` if it failed (from the hub, unless the Bridge's cancel()
        comes first). A failure is counted and logged (rate-limited), and closes that
        client only."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = self.server.wrap_bio(incoming, outgoing, server_side=True)
        failures = self.client_failures

        def done(plain: Channel | None, error: BaseException | None) -> None:
            if error is not None:
                failures.failed(peer, describe(error))
            on_done(plain)

        return Bridge(client, sslobj, incoming, outgoing, timeout, done)


# --- the bridge ----------------------------------------------------------------------------

class BridgedChannel(Channel):
    """The session's end of a bridged TLS connection: a plain Channel whose close() lets
    the bridge finish the TLS side (the rest written, close_notify) and whose reset()
    resets the TLS connection."""
    __slots__ = ("bridge",)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.bridge.release()

    def reset(self) -> None:
        if not self.closed:
            self.bridge.reset()
            super().close()


class Bridge:
    """One TLS connection (`raw`) and the plaintext pair end (`plain`) the session relays
    through, driven by libev callbacks.

    First the handshake, bounded by `timeout`: `on_ready(session_end, None)` or
    `on_ready(None, error)` is called once, from the hub (never from the constructor).
    Then both directions at once, each with backpressure (a destination that cannot take
    a chunk pauses its source) and half-close: the TLS peer's close_notify (or a TCP EOF
    without one) reaches the session as an EOF, and the session's EOF becomes a
    close_notify and a TCP half-close. The bridge closes both sockets when both
    directions are done, when either fails, or when the session's end is closed and what
    it wrote has been passed on (for at most `timeout`).
    """
    __slots__ = ("raw", "plain", "tls", "incoming", "outgoing", "timeout", "_on_ready",
                 "_timer", "_to_raw", "_to_plain", "_raw_waiting", "_in_done", "_out_eof",
                 "_out_done", "_released", "done")

    def __init__(self, raw: Channel, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, timeout: float,
                 on_ready: Callable[[Channel | None, BaseException | None], None]):
        self.raw, self.tls, self.incoming, self.outgoing = raw, sslobj, incoming, outgoing
        self.plain: Channel | None = None  # created once the handshake is done
        self.timeout = timeout
        self._on_ready = on_ready
        self._to_raw = b""     # ciphertext the TLS socket has not taken yet
        self._to_plain = b""   # plaintext the pair has not taken yet
        self._raw_waiting = False
        self._in_done = self._out_eof = self._out_done = self._released = False
        self.done = False
        loop = get_hub().loop
        self._timer = loop.timer(timeout)
        self._timer.start(self._handshake_timed_out)
        raw.start_reading(self._raw_readable)
        # The first flight (a client's hello) from the next loop turn: on_ready is never
        # called before the caller has the object.
        loop.run_callback(self._first_flight)

    # --- handshake -----------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_raw()
            return
        except ssl.SSLError:
            self._flush_raw_quietly()  # the alert tells the peer why
            raise
        self._timer.stop()
        self._flush_raw()
        pair = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        session_end = BridgedChannel(pair[0])
        session_end.bridge = self
        self.plain = Channel(pair[1])
        self.plain.start_reading(self._plain_readable)
        on_ready, self._on_ready = self._on_ready, None
        unsized = session_end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        on_ready(session_end, None)
        if self.done or session_end.closed:
            return
        # A shadow's send buffer is sized by shadow-memory (shadow.py) on the channel it
        # is given; the bytes it means to bound wait in the TLS socket's buffer here.
        sized = session_end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if sized != unsized:
            self.raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sized // 2)
        self._decrypt()  # what came with the handshake's last flight (a request)

    def _handshake_timed_out(self) -> None:
        self._fail(OSError(errno.ETIMEDOUT, "handshake timed out"))

    # --- callbacks: never let an error into the hub ---------------------------------------

    def _first_flight(self) -> None:
        if self.done:
            return
        try:
            self._handshake()
        except BaseException as error:  # noqa: BLE001 (any of them ends this connection only)
            self._fail(error)

    def _raw_readable(self) -> None:
        try:
            self._read_raw()
        except BaseException as error:  # noqa: BLE001
            self._fail(error)

    def _plain_readable(self) -> None:
        try:
            self._read_plain()
        except BaseException as error:  # noqa: BLE001
            self._fail(error)

    def _raw_writable(self) -> None:
        try:
            self._write_raw()
        except BaseException as error:  # noqa: BLE001
            self._fail(error)

    def _plain_writable(self) -> None:
        try:
            self._write_plain()
        except BaseException as error:  # noqa: BLE001
            self._fail(error)

    # --- TLS -> plaintext ---------------------------------------------------------------

    def _read_raw(self) -> None:
        try:
            received = self.raw.sock.recv_into(_cipher)
        except BlockingIOError:
            return
        if received:
            self.incoming.write(_cipher_view[:received])
        else:
            self.incoming.write_eof()
        if self._on_ready is not None:
            self._handshake()
        elif self._released:
            self.raw.stop_reading()  # the session is gone: what the peer says is dropped
        else:
            self._decrypt()

    def _decrypt(self) -> None:
        """Hand the session what TLS can decrypt, until it wants more ciphertext (reading
        goes on), the session's end is full (reading pauses until it has taken the
        rest), or the peer ended (close_notify, or a TCP EOF without one: an EOF all the
        same)."""
        read, send, incoming = self.tls.read, self.plain.sock.send, self.incoming
        while True:
            if not (incoming.pending or incoming.eof or self.tls.pending()):
                break  # nothing to decrypt: no need to have TLS say so with an exception
            try:
                count = read(CHUNK, _clear)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0
            if not count:
                self.raw.stop_reading()
                self._in_done = True
                self._end_in()
                break
            try:
                sent = send(_clear_view[:count])
            except BlockingIOError:
                sent = 0
            if sent < count:
                self._to_plain = _clear_view[sent:count].tobytes()
                self.raw.stop_reading()
                self.plain.start_writing(self._plain_writable)
                break
        if self.outgoing.pending and not self.done:
            self._flush_raw()  # what reading made TLS say (a key update's answer)

    def _write_plain(self) -> None:
        try:
            sent = self.plain.sock.send(self._to_plain)
        except BlockingIOError:
            return
        self._to_plain = self._to_plain[sent:]
        if self._to_plain:
            return
        self.plain.stop_writing()
        self.raw.start_reading(self._raw_readable)
        self._decrypt()  # what TLS still holds of what was read before the pause

    def _end_in(self) -> None:
        self.plain.half_close()
        self._finish_if_done()

    def _read_plain(self) -> bool:
        """Encrypt one chunk the session wrote; False when there was nothing to read."""
        try:
            received = self.plain.sock.recv_into(_clear)
        except BlockingIOError:
            return False
        if received:
            self.tls.write(_clear_view[:received])
            self._flush_raw()
            return True
        self.plain.stop_reading()
        self._out_eof = True
        try:
            self.tls.unwrap()  # sends close_notify; the peer's may come later, or never
        except ssl.SSLError:
            pass
        self._flush_raw()
        return True

    def _flush_raw(self) -> None:
        """Send what TLS has for the peer; while the socket cannot take it, pause the
        plaintext side (backpressure) and let the writable callback go on."""
        pending = self.outgoing.read()
        if pending:
            self._to_raw += pending
        if not self._raw_waiting:
            self._write_raw()

    def _flush_raw_quietly(self) -> None:
        try:
            self.raw.sock.send(self.outgoing.read())
        except OSError:
            pass

    def _write_raw(self) -> None:
        if self._to_raw:
            try:
                sent = self.raw.sock.send(self._to_raw)
            except BlockingIOError:
                sent = 0
            self._to_raw = self._to_raw[sent:]
            if self._to_raw:
                if not self._raw_waiting:
                    self._raw_waiting = True
                    self.raw.start_writing(self._raw_writable)
                    if self.plain is not None:
                        self.plain.stop_reading()
                return
        if self._raw_waiting:
            self._raw_waiting = False
            self.raw.stop_writing()
            if self.plain is not None and not self._out_eof:
                self.plain.start_reading(self._plain_readable)
        if self._out_eof and not self._out_done:
            self._out_done = True
            self.raw.half_close()
            self._finish_if_done()

    # --- ending --------------------------------------------------------------------------

    def _finish_if_done(self) -> None:
        if self._out_done and (self._in_done or self._released):
            self._close()

    def release(self) -> None:
        """The session closed its end: pass on what it wrote, close_notify, then close
        (within `timeout`, or the peer is cut off)."""
        if self.done or self._released:
            return
        self._released = True
        self._timer.stop()
        self._timer.start(self._close)  # a peer that never reads does not keep us
        try:
            if not self._out_eof:
                self.plain.stop_reading()
                while not self._out_eof and self._read_plain():
                    pass  # all of it is there already: the other end is closed
            self._finish_if_done()
        except BaseException as error:  # noqa: BLE001
            self._fail(error)

    @property
    def channel(self) -> Channel:
        """The TLS connection's own channel (as a PROXY header reader's: see drain)."""
        return self.raw

    def cancel(self) -> None:
        """Give up the handshake (the connection's user is going away); on_ready is not
        called."""
        self._on_ready = None
        self._close()

    def reset(self) -> None:
        """The session passes a reset on: reset the TLS connection too."""
        if not self.done:
            self._released = True
            self._close(reset=True)

    def _fail(self, error: BaseException) -> None:
        if self.done:
            return
        if self._on_ready is not None:
            on_ready, self._on_ready = self._on_ready, None
            self._close()
            on_ready(None, error)
            return
        log.debug("TLS connection failed: %s", describe(error))
        self._close()

    def _close(self, reset: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._timer.stop()
        self._timer.close()
        if reset:
            self.raw.reset()
        else:
            self.raw.close()
        if self.plain is not None:
            self.plain.close()
