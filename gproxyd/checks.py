"""What a config that parses can still get wrong about this host: the checks that make
`--check-config` catch what would fail (or misbehave) once it runs.

Each yields (key, problem) or (route, key, problem), the problem worded as config
errors are: what is wrong (what was expected). config.load_config turns them into
ConfigErrors with FILE:LINE.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from functools import lru_cache
from typing import Iterator

from .daemon import group_id, user_entry
from .dashboard import TokenError, read_token
from .settings import Address


def settings_problems(settings) -> Iterator[tuple[str, str]]:
    if settings.user and not _exists(user_entry, settings.user):
        yield "user", f"no such user {settings.user!r} on this host (expected a user in " \
                      "/etc/passwd, e.g. gproxyd)"
    if settings.group and not _exists(group_id, settings.group):
        yield "group", f"no such group {settings.group!r} on this host (expected a group " \
                       "in /etc/group)"
    if settings.admin is not None:
        problem = _unix_folder_problem(settings.admin)
        if problem:
            yield "admin", problem
    try:
        read_token(settings.admin_token)
    except TokenError as error:
        yield "admin-token", str(error).removeprefix("admin-token: ")


def route_problems(route) -> Iterator[tuple[str, str]]:
    """What is wrong within one route: its listen address, loops, a doubled backend."""
    problem = _unix_folder_problem(route.listen)
    if problem:
        yield "listen", problem
    if route.listen.family != socket.AF_UNIX and not route.listen.numeric and \
            not _ips(route.listen):
        yield "listen", f"cannot resolve {route.listen.host!r} (expected an IP address or " \
                        "a host name this host resolves)"
    if (route.listen_mode is not None or route.listen_owner) and \
            route.listen.family != socket.AF_UNIX:
        key = "listen-mode" if route.listen_mode is not None else "listen-owner"
        yield key, "only a unix:/path listen address has a file mode and owner (expected " \
                   "no listen-mode or listen-owner on a TCP listen address)"
    if route.listen_owner:
        user, _, group = route.listen_owner.partition(":")
        if not _exists(user_entry, user):
            yield "listen-owner", f"no such user {user!r} on this host"
        elif group and not _exists(group_id, group):
            yield "listen-owner", f"no such group {group!r} on this host"
    if route.source not in (None, "client") and not _is_local(route.source):
        yield "source", f"{route.source} is not an address of this host (expected one of " \
                        "its addresses, or source = client)"
    targets = [("production", route.production), *(("shadow", s) for s in route.shadow)]
    if route.baseline is not None:
        targets.append(("baseline", route.baseline))
    for key, target in targets:
        if _reaches(target, route.listen):
            yield key, f"{target} is this route's own listen address {route.listen}: " \
                       "every connection would come back to gproxyd in a loop until " \
                       "max-connections is used up (expected the backend's address)"
    seen: set = set()
    for shadow in route.shadow:
        if _same_backend(shadow, route.production):
            yield "shadow", f"{shadow} is production itself: every request would reach " \
                            "production twice, doubling its side effects (expected a " \
                            "separate backend)"
        elif shadow.sockaddr in seen:
            yield "shadow", f"{shadow} is listed twice (expected each shadow once)"
        seen.add(shadow.sockaddr)
    if (route.tls_cert or route.tls_key or route.production_tls or route.shadow_tls
            or route.tls_ca or route.tls_server_name or not route.tls_verify):
        from . import tls  # only for routes with TLS options: it brings ssl and gevent
        yield from tls.problems(route)


def clashes(routes, admin: Address | None) -> Iterator[tuple[object, str, str]]:
    """Listen addresses that cannot all be bound: two routes' (0.0.0.0:P takes P on
    every IPv4 address, so 127.0.0.1:P too), or the admin endpoint's on a route's."""
    for index, route in enumerate(routes):
        for earlier in routes[:index]:
            if overlaps(route.listen, earlier.listen):
                same = "is" if route.listen.sockaddr == earlier.listen.sockaddr else \
                    "overlaps"
                yield route, "listen", f"{route.listen} {same} route {earlier.name}'s " \
                                       f"listen address {earlier.listen} (expected one " \
                                       "route per address and port)"
        if admin is not None and overlaps(admin, route.listen):
            yield route, "admin", f"{admin} overlaps route {route.name}'s listen address " \
                                  f"{route.listen} (expected the admin endpoint on an " \
                                  "address and port of its own)"


# --- addresses ------------------------------------------------------------------------

def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _unix_folder_problem(address: Address) -> str:
    if address.family != socket.AF_UNIX:
        return ""
    folder = os.path.dirname(address.path) or "/"
    if os.path.isdir(folder):
        return ""
    return f"directory {folder} does not exist (expected the socket's directory to " \
           "exist, e.g. systemd's RuntimeDirectory=)"


@lru_cache(maxsize=256)
def _resolve(host: str, port: int, family: int) -> frozenset:
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(info[4][0] for info in found)


def _ips(address: Address, listening: bool = False) -> frozenset:
    """The IP addresses a TCP address stands for. A listen host name is bound in its
    Address's family; a backend's name may resolve to either."""
    if address.numeric:
        return frozenset({address.host})
    return _resolve(address.host, address.port,
                    address.family if listening else socket.AF_UNSPEC)


def _wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_unspecified


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


@lru_cache(maxsize=256)
def _is_local(ip: str) -> bool:
    """Whether `ip` is an address of this host: binding to it works only then."""
    try:
        with socket.socket(_family(ip), socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def overlaps(one: Address, other: Address) -> bool:
    """Whether binding both would fail with "address in use" (IPv6 listeners are
    bound IPv6-only, so [::]:P and 0.0.0.0:P coexist)."""
    if one.family == socket.AF_UNIX or other.family == socket.AF_UNIX:
        return one.family == other.family and one.path == other.path
    if one.port != other.port or one.port == 0:
        return False
    for a in _ips(one, listening=True):
        for b in _ips(other, listening=True):
            if _family(a) == _family(b) and (a == b or _wildcard(a) or _wildcard(b)):
                return True
    return False


def _reaches(target: Address, listen: Address) -> bool:
    """Whether connecting to `target` lands on the listener bound to `listen`."""
    if target.family == socket.AF_UNIX or listen.family == socket.AF_UNIX:
        return target.family == listen.family and target.path == listen.path
    if target.port != listen.port or listen.port == 0:
        return False
    bound = _ips(listen, listening=True)
    for ip in _ips(target):
        for where in bound:
            if _family(ip) != _family(where):
                continue
            if ip == where or (_wildcard(where) and (_wildcard(ip) or _is_local(ip))):
                return True
    return False


def _same_backend(one: Address, other: Address) -> bool:
    if one.family == socket.AF_UNIX or other.family == socket.AF_UNIX:
        return one.family == other.family and one.path == other.path
    return one.port == other.port and bool(_ips(one) & _ips(other))
