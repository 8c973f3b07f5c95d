"""Shadow filters: which of a client's requests reach the shadows (shadow-filter).

A RequestFilter follows the client's stream with a request framer of its own and lets
through whole requests only: HTTP requests whose method is listed, or Redis commands
that only read. It decides on each request as soon as its method (command name) is
known, so a large request streams through without being held; only the bytes before
that point (a request line, a command's first argument: at most 64 KiB) wait. Every
decision is reported in request order to `on_decision(mirrored)`, so that production's
answers are paired only with the requests the shadows got (compare.Comparison). A
stream the filter cannot follow (garbage, or a CONNECT tunnel) stops it: from then on
nothing more is mirrored, and the caller ends the shadows' streams.
"""
from __future__ import annotations

import logging
from typing import Callable

from .protocols import FRAMERS, ProtocolError

log = logging.getLogger("gproxyd.shadow")

# Redis commands flagged "readonly" in Redis's command table (7.x), and the connection
# commands a shadow needs to read what production reads (SELECT: the same database).
REDIS_READONLY = frozenset("""
    BITCOUNT BITFIELD_RO BITPOS DBSIZE DUMP EVALSHA_RO EVAL_RO EXISTS EXPIRETIME FCALL_RO
    GEODIST GEOHASH GEOPOS GEORADIUSBYMEMBER_RO GEORADIUS_RO GEOSEARCH GET GETBIT GETRANGE
    HEXISTS HGET HGETALL HKEYS HLEN HMGET HRANDFIELD HSCAN HSTRLEN HVALS KEYS LCS LINDEX LLEN
    LPOS LRANGE MGET PEXPIRETIME PFCOUNT PTTL RANDOMKEY SCAN SCARD SDIFF SINTER SINTERCARD
    SISMEMBER SMEMBERS SMISMEMBER SORT_RO SRANDMEMBER SSCAN STRLEN SUBSTR SUNION TOUCH TTL
    TYPE XINFO XLEN XPENDING XRANGE XREVRANGE ZCARD ZCOUNT ZDIFF ZINTER ZINTERCARD ZLEXCOUNT
    ZMSCORE ZRANDMEMBER ZRANGE ZRANGEBYLEX ZRANGEBYSCORE ZRANK ZREVRANGE ZREVRANGEBYLEX
    ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE ZUNION
    AUTH ECHO HELLO PING SELECT
""".split())
_TRANSACTION_ENDS = frozenset({"EXEC", "DISCARD"})


class RequestFilter:
    """One client connection's shadow filter. `admitted`: the route's shadow-filter
    (HTTP methods, or ("readonly",) on a redis route). `on_decision(mirrored)` is called
    once per request, in order. Once `stopped`, feed() passes nothing."""

    __slots__ = ("_framer", "_protocol", "_methods", "_held", "_current", "_transaction",
                 "_on_decision", "stopped")

    def __init__(self, protocol: str, admitted: tuple[str, ...],
                 on_decision: Callable[[bool], None]):
        self._framer = FRAMERS[protocol][0]()
        self._framer.ends = []
        self._protocol = protocol
        self._methods = frozenset(admitted)
        self._held = bytearray()  # the start of a request not decided yet
        self._current: bool | None = None  # the decision on the request in progress
        self._transaction = False  # redis: between MULTI and EXEC/DISCARD
        self._on_decision = on_decision
        self.stopped = False

    def feed(self, chunk) -> bytes | None:
        """What of `chunk` the shadows get (None: nothing)."""
        if self.stopped:
            return None
        framer = self._framer
        try:
            done = framer.feed(chunk)
        except ProtocolError as error:
            self.stopped = True
            log.debug("shadow-filter cannot follow the client's requests (%s): mirroring "
                      "stops for this connection", error)
            return None
        out: list = []
        start = 0
        for index, end in enumerate(framer.ends):
            decision = self._current
            if decision is None:
                decision = self._decide(done[index])
            self._pass(out, chunk[start:end], decision)
            self._current = None
            start = end
        framer.ends.clear()
        if start < len(chunk) and not self.stopped:
            if self._current is None:
                name = framer.current
                if name is not None:
                    self._current = self._decide(name)
            if self._current is None:
                self._held += chunk[start:]
            else:
                self._pass(out, chunk[start:], self._current)
        if not out:
            return None
        return out[0] if len(out) == 1 else b"".join(out)

    def _pass(self, out: list, part, mirrored: bool) -> None:
        """`part` of the request in progress goes to the shadows if `mirrored`; so does
        what was held of it."""
        if mirrored:
            if self._held:
                out.append(bytes(self._held))
            out.append(part)
        self._held.clear()

    def _decide(self, name: str) -> bool:
        if self._protocol == "redis":
            mirrored = False
            if self._transaction:
                self._transaction = name not in _TRANSACTION_ENDS
            elif name == "MULTI":
                self._transaction = True
            else:
                mirrored = name in REDIS_READONLY
        else:
            mirrored = name in self._methods
            # What follows a CONNECT is a tunnel, not requests: nothing more to filter.
            self.stopped = name == "CONNECT"
        self._on_decision(mirrored)
        return mirrored
