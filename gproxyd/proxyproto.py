"""The PROXY protocol (HAProxy's, versions 1 and 2): parsing the header a proxy in front
puts before a client's bytes, building the one gproxyd puts before its own, and reading
a header off an accepted connection without taking a byte of what follows it.

Parsing is strict: a header that is not exactly what the specification allows is refused
(`Malformed`, whose text says what is wrong), never guessed at. A v2 header's TLVs are
checked to fit and skipped; the whole v2 header may be at most `V2_MAX_LENGTH` bytes.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable

V1_MAX_LENGTH = 107  # "PROXY TCP6 <39> <39> 65535 65535\r\n", from the specification
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 16 + 4096  # the fixed part, then addresses and TLVs: far above any seen
_V1_PREFIX = b"PROXY "
_V2_FIXED = struct.Struct("!12sBBH")
_V2_ADDRESSES = {  # family nibble -> (socket family, size of the address block)
    0x1: (socket.AF_INET, 12),
    0x2: (socket.AF_INET6, 36),
    0x3: (socket.AF_UNIX, 216),
}
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_STREAM = 0x1
_UNIX_PATH = 108


class Malformed(ValueError):
    """Not a PROXY header the route accepts; str() says what is wrong."""


@dataclass(frozen=True)
class Addresses:
    """A connection's two ends as the PROXY protocol carries them: `source` is the
    client's, `destination` the address the client connected to. For AF_INET and
    AF_INET6 each is (ip, port); for AF_UNIX a path (str)."""
    family: int
    source: tuple[str, int] | str
    destination: tuple[str, int] | str


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. `addresses` is None when the header gives none (v1 UNKNOWN, v2
    LOCAL or UNSPEC): the connection's own ends stand, as the specification says.
    `length` is how many bytes of the stream the header took."""
    version: int
    addresses: Addresses | None
    length: int
    local: bool = False  # v2 LOCAL: the proxy's own connection (a health check)


def parse(data: bytes, accept: str = "any") -> ProxyHeader | None:
    """The header at the start of `data`, or None when `data` is a proper beginning of
    one (then every byte of `data` belongs to the header: nothing of the client's can
    come before the header has ended). `accept`: "v1", "v2" or "any". Raises Malformed."""
    versions = ("v1", "v2") if accept == "any" else (accept,)
    if "v2" in versions and data[:12] == V2_SIGNATURE[:len(data[:12])]:
        return _parse_v2(data) if len(data) >= 16 else None
    if "v1" in versions and data[:6] == _V1_PREFIX[:len(data[:6])]:
        return _parse_v1(data) if len(data) >= 6 else None
    if accept == "v1" and data[:12] == V2_SIGNATURE[:len(data[:12])]:
        raise Malformed("a v2 PROXY header (expected v1: accept-proxy = v1)")
    if accept == "v2" and data[:6] == _V1_PREFIX[:len(data[:6])]:
        raise Malformed("a v1 PROXY header (expected v2: accept-proxy = v2)")
    raise Malformed(f"no PROXY header: the connection began with {bytes(data[:16])!r} "
                    f"(expected {_expected(versions)})")


def _expected(versions: tuple[str, ...]) -> str:
    return " or ".join({"v1": "'PROXY ...\\r\\n'", "v2": "the v2 signature"}[version]
                       for version in versions)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise Malformed(f"v1 PROXY header without CRLF in its first {V1_MAX_LENGTH} "
                            "bytes (expected at most 107 bytes ending in \\r\\n)")
        bare = data.find(b"\n")
        if bare >= 0 or b"\r" in data[:-1]:
            raise Malformed("v1 PROXY header with a bare CR or LF (expected one line "
                            "ending in \\r\\n)")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("v1 PROXY header with bytes that are not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The sender could not tell the addresses; the rest of the line is to be ignored.
        return ProxyHeader(1, None, end + 2)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise Malformed(f"bad v1 PROXY header {line!r} (expected 'PROXY TCP4|TCP6 "
                        "SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' or 'PROXY "
                        "UNKNOWN')")
    family = socket.AF_INET if fields[1] == "TCP4" else socket.AF_INET6
    source = _v1_ip(fields[2], family, line)
    destination = _v1_ip(fields[3], family, line)
    ports = [_v1_port(text, line) for text in fields[4:6]]
    return ProxyHeader(1, Addresses(family, (source, ports[0]), (destination, ports[1])),
                       end + 2)


def _v1_ip(text: str, family: int, line: str) -> str:
    # inet_pton is strict (no leading zeros, no zone) and far cheaper than ipaddress.
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        version = 4 if family == socket.AF_INET else 6
        raise Malformed(f"bad address {text!r} in v1 PROXY header {line!r} (expected an "
                        f"IPv{version} address for TCP{version})") from None


def _v1_port(text: str, line: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise Malformed(f"bad port {text!r} in v1 PROXY header {line!r} (expected 0-65535, "
                        "no leading zeros)")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    _, version_command, family_transport, length = _V2_FIXED.unpack_from(data)
    if version_command >> 4 != 2:
        raise Malformed(f"v2 PROXY header of version {version_command >> 4} (expected 2)")
    command = version_command & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise Malformed(f"v2 PROXY header with command {command} (expected 0 LOCAL or "
                        "1 PROXY)")
    if 16 + length > V2_MAX_LENGTH:
        raise Malformed(f"v2 PROXY header of {16 + length} bytes (expected at most "
                        f"{V2_MAX_LENGTH}: addresses and TLVs this long are refused)")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in _V2_ADDRESSES and family != 0:
        raise Malformed(f"v2 PROXY header with address family {family} (expected 0 UNSPEC, "
                        "1 INET, 2 INET6 or 3 UNIX)")
    if transport not in (0, _V2_STREAM, 2):
        raise Malformed(f"v2 PROXY header with transport {transport} (expected 0 UNSPEC, "
                        "1 STREAM or 2 DGRAM)")
    if len(data) < 16 + length:
        return None
    body = bytes(data[16:16 + length])
    if command == _V2_LOCAL or family == 0:
        # No addresses to use: the specification has the receiver skip the rest unread.
        return ProxyHeader(2, None, 16 + length, local=command == _V2_LOCAL)
    if transport != _V2_STREAM:
        raise Malformed("v2 PROXY header for a datagram or unspecified transport (expected "
                        "STREAM: this is a TCP connection)")
    socket_family, size = _V2_ADDRESSES[family]
    if length < size:
        raise Malformed(f"v2 PROXY header too short for its addresses: {length} bytes "
                        f"after the fixed part (expected at least {size})")
    _check_tlvs(body, size)
    if socket_family == socket.AF_UNIX:
        addresses = Addresses(socket_family, _unix_path(body[:_UNIX_PATH]),
                              _unix_path(body[_UNIX_PATH:2 * _UNIX_PATH]))
    else:
        width = 4 if socket_family == socket.AF_INET else 16
        source = socket.inet_ntop(socket_family, body[:width])
        destination = socket.inet_ntop(socket_family, body[width:2 * width])
        ports = struct.unpack_from("!HH", body, 2 * width)
        addresses = Addresses(socket_family, (source, ports[0]), (destination, ports[1]))
    return ProxyHeader(2, addresses, 16 + length)


def _check_tlvs(body: bytes, offset: int) -> None:
    """The TLVs after the addresses must fill the rest exactly: each a type, a 2-byte
    length and that many bytes. They are skipped, not interpreted."""
    while offset < len(body):
        if offset + 3 > len(body):
            raise Malformed(f"v2 PROXY header with a truncated TLV at byte {16 + offset} "
                            "(expected type, 2-byte length, value)")
        (tlv_length,) = struct.unpack_from("!H", body, offset + 1)
        if offset + 3 + tlv_length > len(body):
            raise Malformed(f"v2 PROXY header with a TLV of {tlv_length} bytes at byte "
                            f"{16 + offset} that overruns the header's "
                            f"{16 + len(body)} bytes")
        offset += 3 + tlv_length


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def build(version: str, addresses: Addresses | None) -> bytes:
    """The header to put before a connection's first byte: "v1" or "v2", for a
    connection between `addresses` (None, or ends of different families: the sender
    does not know them, v1 UNKNOWN or v2 PROXY UNSPEC)."""
    family = addresses.family if addresses is not None else socket.AF_UNSPEC
    if addresses is not None and family in (socket.AF_INET, socket.AF_INET6):
        both = (addresses.source[0], addresses.destination[0])
        if any(_family_of(ip) != family for ip in both):
            family = socket.AF_UNSPEC
    if version == "v1":
        if family not in (socket.AF_INET, socket.AF_INET6):
            return b"PROXY UNKNOWN\r\n"
        name = "TCP4" if family == socket.AF_INET else "TCP6"
        (source, source_port), (destination, destination_port) = (addresses.source,
                                                                  addresses.destination)
        return (f"PROXY {name} {source} {destination} {source_port} "
                f"{destination_port}\r\n").encode("ascii")
    if family in (socket.AF_INET, socket.AF_INET6):
        body = (socket.inet_pton(family, addresses.source[0])
                + socket.inet_pton(family, addresses.destination[0])
                + struct.pack("!HH", addresses.source[1], addresses.destination[1]))
        nibble = 0x1 if family == socket.AF_INET else 0x2
    elif family == socket.AF_UNIX:
        body = b"".join(path.encode()[:_UNIX_PATH - 1].ljust(_UNIX_PATH, b"\0")
                        for path in (addresses.source, addresses.destination))
        nibble = 0x3
    else:
        body, nibble = b"", 0x0
    transport = _V2_STREAM if nibble else 0x0
    return _V2_FIXED.pack(V2_SIGNATURE, 0x20 | _V2_PROXY, nibble << 4 | transport,
                          len(body)) + body


def _family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def describe(family: int, address) -> str:
    """An address as logs and hooks show a client: 192.0.2.7:41000, [2001:db8::7]:41000,
    or unix (a unix socket's client has no address worth naming)."""
    if family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    return "unix"


# --- reading a header off an accepted connection ----------------------------------------

class HeaderReader:
    """Reads the PROXY header from a just-accepted client Channel, by libev callbacks.

    Each readable event peeks at what arrived and takes off the socket only bytes that
    belong to the header; whatever the client sent after it stays in the socket for the
    relay. `on_done(header, None)` once the header is complete and valid, or
    `on_done(None, problem)` when it is malformed, missing (EOF) or not complete within
    `timeout`; called once, from the hub, unless cancel() comes first. The caller keeps
    the channel either way (closes it on a problem).
    """
    __slots__ = ("channel", "_accept", "_on_done", "_timer", "_taken")

    def __init__(self, channel, accept: str, timeout: float,
                 on_done: Callable[[ProxyHeader | None, str | None], None]):
        from gevent import get_hub  # the parser above needs no event loop
        self.channel = channel
        self._accept = accept
        self._on_done = on_done
        self._taken = b""
        self._timer = get_hub().loop.timer(timeout)
        self._timer.start(self._timed_out)
        channel.start_reading(self._readable)

    def _readable(self) -> None:
        sock = self.channel.sock
        try:
            peeked = sock.recv(V2_MAX_LENGTH, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as error:
            self._finish(None, f"client: {error.strerror or error}")
            return
        if not peeked:
            self._finish(None, "closed before its PROXY header was complete" if self._taken
                         else "closed without sending a PROXY header")
            return
        data = self._taken + peeked
        try:
            header = parse(data, self._accept)
        except Malformed as error:
            self._finish(None, str(error))
            return
        # Take what the peek showed to be header: all of it while the header goes on
        # (so the next readable event brings new bytes), else exactly up to its end.
        wanted = len(peeked) if header is None else header.length - len(self._taken)
        try:
            taken = sock.recv(wanted)
        except OSError as error:
            self._finish(None, f"client: {error.strerror or error}")
            return
        if len(taken) != wanted:  # the kernel showed those bytes: cannot happen
            self._finish(None, "client: its bytes changed between peek and read")
            return
        if header is None:
            self._taken = data
        else:
            self._finish(header, None)

    def _timed_out(self) -> None:
        self._finish(None, "no complete PROXY header within connect-timeout" if self._taken
                     else "sent no PROXY header within connect-timeout")

    def _finish(self, header: ProxyHeader | None, problem: str | None) -> None:
        on_done = self._on_done
        self.cancel()
        if on_done is not None:
            on_done(header, problem)

    def cancel(self) -> None:
        """Stop reading and waiting; on_done is not called."""
        self._on_done = None
        self._timer.stop()
        if not self.channel.closed:
            self.channel.stop_reading()
