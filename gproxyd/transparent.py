"""Linux transparent proxying and who a connection is from: the destination a redirected
client originally dialled (SO_ORIGINAL_DST, or the local address of a TPROXY-diverted
socket), connecting to production from a chosen source address (IP_TRANSPARENT for the
client's own), and each accepted connection's ends as logs, hooks and PROXY headers use
them (from the socket, or from the PROXY header a proxy in front sent).
"""
from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from gevent import get_hub

from .channel import Channel, Connecting
from .proxyproto import Addresses, ProxyHeader, build, describe
from .settings import ORIGINAL_DST, Address

log = logging.getLogger("gproxyd.listener")

# From <linux/netfilter_ipv4.h>, <linux/netfilter_ipv6/ip6_tables.h>, <linux/in.h> and
# <linux/in6.h>: the socket module names only some of them.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")


class Refused(Exception):
    """This connection cannot be served as the route says; str() says why (logged)."""


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT): a listener takes connections TPROXY diverts to
    it; an outgoing socket may bind an address that is not this host's. Needs
    CAP_NET_ADMIN (or CAP_NET_RAW); raises PermissionError without."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def listen_transparently(sock: socket.socket, listen: Address) -> str | None:
    """IP_TRANSPARENT on a listening socket (listen-transparent), so that it accepts what
    TPROXY rules divert to it. Returns what went wrong, with the hint, or None."""
    level, option = (SOL_IPV6, IPV6_TRANSPARENT) if sock.family == socket.AF_INET6 \
        else (socket.SOL_IP, IP_TRANSPARENT)
    if sock.getsockopt(level, option):
        return None  # set before the privilege drop, or by the process that bound it
    try:
        sock.setsockopt(level, option, 1)
    except OSError as error:
        return f"cannot listen transparently on {listen}: {error.strerror} " \
               "(listen-transparent needs CAP_NET_ADMIN)"
    return None


def original_destination(sock: socket.socket, diverted: bool) -> tuple[str, int]:
    """Where the client of an accepted socket meant to connect. `diverted` (TPROXY,
    listen-transparent): the socket's own local address is it. Else the address a NAT
    REDIRECT or DNAT rule rewrote, from conntrack; OSError (ENOENT) without one."""
    if diverted:
        return sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, packed = _SOCKADDR_IN6.unpack_from(raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    port, packed = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntop(socket.AF_INET, packed), port


@lru_cache(maxsize=256)
def _is_local(ip: str) -> bool:
    """Whether `ip` is an address of this host (binding to it without IP_TRANSPARENT
    works only then)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def loops(destination: tuple[str, int], listen: Address) -> bool:
    """Whether connecting to `destination` would land on the listener bound to `listen`:
    a client that dialled gproxyd itself, with no rule diverting it."""
    if listen.family == socket.AF_UNIX or destination[1] != listen.port:
        return False
    ip = ipaddress.ip_address(destination[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if listen.numeric and str(ip) == listen.host:
        return True
    # A wildcard (or a host name, not resolved on the hub) listens on this host's
    # addresses: the destination loops if it is one of them.
    anywhere = not listen.numeric or ipaddress.ip_address(listen.host).is_unspecified
    return anywhere and _is_local(str(ip))


def _address(ip: str, port: int) -> Address:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return Address(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}",
                   family, host=ip, port=port)


@dataclass(frozen=True)
class Endpoints:
    """Who an accepted connection is from and where it goes. `client`: as logs and
    hooks show it; `addresses`: its two ends for a PROXY header towards backends (None:
    unknown); `client_ip`: for source = client (None: not an IP client); `production`:
    the original destination when production = original-dst, else None."""
    client: str
    addresses: Addresses | None
    client_ip: str | None
    production: Address | None

    def proxy_header(self, version: str) -> bytes:
        """The PROXY header ("v1" or "v2") that tells a backend about this connection."""
        return build(version, self.addresses)


def endpoints(route, sock: socket.socket, peer, header: ProxyHeader | None) -> Endpoints:
    """The Endpoints of a connection accepted on `route`'s listener from `peer`, after
    its PROXY `header` if the route takes one (its addresses replace the socket's; a
    header without addresses, v1 UNKNOWN or v2 LOCAL, leaves the socket's). Raises
    Refused when production = original-dst has no destination, or one that loops."""
    family = sock.family
    given = header.addresses if header is not None else None
    if given is not None:
        addresses = given
    elif family == socket.AF_UNIX:
        addresses = None
    elif route.send_proxy != "off" or route.shadow_send_proxy != "off":
        addresses = Addresses(family, peer[:2], sock.getsockname()[:2])
    else:
        addresses = Addresses(family, peer[:2], ("", 0))  # the destination is not needed
    ip_client = addresses is not None and addresses.family != socket.AF_UNIX
    client = describe(addresses.family, addresses.source) if ip_client else "unix"
    production = None
    if route.production is ORIGINAL_DST:
        if given is not None and given.family != socket.AF_UNIX:
            destination = given.destination
        else:
            try:
                destination = original_destination(sock, route.listen_transparent)
            except OSError as error:
                if error.errno == errno.ENOENT:
                    raise Refused("production = original-dst: the connection was not "
                                  "redirected (no REDIRECT/DNAT rule or conntrack entry for "
                                  "it)") from None
                raise Refused(f"production = original-dst: {error.strerror}") from None
        if loops(destination, route.listen):
            raise Refused(f"production = original-dst: the client dialled "
                          f"{_address(*destination)}, gproxyd's own listen address "
                          f"{route.listen}, which would loop (divert only traffic for other "
                          "addresses to gproxyd)")
        production = _address(*destination)
        if given is None and addresses is not None:
            # Headers sent on name where the client was going, not where it was diverted.
            addresses = Addresses(addresses.family, addresses.source, destination)
    return Endpoints(client, addresses, addresses.source[0] if ip_client else None,
                     production)


class RefusalLog:
    """One warning line for a refused connection (no valid PROXY header, an original
    destination that loops), then at most one every `every` seconds with how many were
    refused meanwhile: a scan or a misrouted client must not flood the log."""
    __slots__ = ("every", "_last", "_since")

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last = -every
        self._since = 0

    def add(self, route: str, client: str, problem: str) -> None:
        now = time.monotonic()
        self._since += 1
        if now - self._last < self.every:
            return
        more = f" ({self._since - 1} more refused since the last such line)" \
            if self._since > 1 else ""
        log.warning("route %s client %s: %s; connection closed%s", route, client, problem,
                    more)
        self._last, self._since = now, 0


class BoundConnecting(Connecting):
    """A Connecting (non-blocking, libev callbacks) from a chosen local address:
    `source` is an IP bound with port 0 (the kernel picks the port); `transparent` sets
    IP_TRANSPARENT first, so it may be an address that is not this host's (the
    client's, source = client)."""
    __slots__ = ()

    def __init__(self, address: Address, timeout: float, source: str, transparent: bool,
                 on_done: Callable[[Channel | None, OSError | None], None]):
        self._on_done = on_done
        loop = get_hub().loop
        self._channel = None
        source_family = socket.AF_INET6 if ":" in source else socket.AF_INET
        if source_family != address.family:
            self._answer_soon(loop, errno.EAFNOSUPPORT, OSError(
                errno.EAFNOSUPPORT, f"cannot connect from {source} to {address}: not the "
                "same IP version"))
            return
        try:
            sock = _socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as error:  # out of file descriptors, typically
            self._answer_soon(loop, error.errno or errno.EMFILE, error)
            return
        try:
            if transparent:
                set_transparent(sock)
            sock.bind((source, 0))
        except OSError as error:
            sock.close()
            hint = " (needs CAP_NET_ADMIN: see Transparent mode)" \
                if error.errno == errno.EPERM else ""
            self._answer_soon(loop, error.errno, OSError(
                error.errno, f"cannot connect from {source}: {error.strerror}{hint}"))
            return
        self._channel = Channel(sock)
        code = sock.connect_ex(address.sockaddr)
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            self._channel.start_writing(self._writable)
            self._timer = loop.timer(timeout)
            self._timer.start(self._timed_out)
        else:
            self._answer_soon(loop, code)
