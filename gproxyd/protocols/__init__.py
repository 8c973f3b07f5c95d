"""Passive protocol framers: find where each request and each response ends, never change bytes.

Each direction of one connection to one backend gets its own framer instance. The
observer feeds it copies of the bytes as they pass:

- ``RequestFramer().feed(data)`` returns None when no request was completed by this
  chunk, else the list of requests completed in it, in order (HTTP: the method;
  Redis: the command name, upper-cased).
- ``ResponseFramer().expect(request)`` is called once for every request the
  RequestFramer produced, in order, before the response bytes for it are fed
  (``expect_all(requests)``: the same for a list of them, in one call);
  ``.feed(data)`` returns None or the list of ``(status, is_error)`` responses completed
  in the chunk; ``.close()`` is called at the backend's EOF and completes a response
  delimited by the connection's close.

``data`` may be a memoryview that is overwritten after the call: framers copy only the
few bytes they must (header lines, length lines), never bodies, so memory per framer
is bounded by the line/header limits (HTTP: the route's observe-max-header; Redis:
64 KiB lines and at most MAX_DEPTH open nested aggregates, one small int each), plus
the queue of requests expected.

When a framer raises, whatever it completed earlier in the same ``feed()`` call is on
the exception's ``completed`` attribute (a list, possibly empty) -- for Upgraded, ending
with the response that left the protocol (HTTP's 101 or 2xx to CONNECT, the reply to a
Redis SUBSCRIBE or MONITOR) -- and the framer is finished: any further call raises
ProtocolError. A RequestFramer's ProtocolError also says, in ``at``, how far into the
chunk the framer had to read to know (the same offset in the stream however it is
cut into chunks), and a RequestFramer with a ``starts`` list appends, for each request,
the offset in the chunk from which ``in_message`` is true: with both, one framing of a
client stream serves every backend it is written to (shared.py).
"""
from __future__ import annotations


class _FramingStop(Exception):
    """Base of the two ways a framer stops following a stream."""

    def __init__(self, message: str, completed: list | None = None,
                 at: int | None = None) -> None:
        super().__init__(message)
        self.completed = completed
        self.at = at


class ProtocolError(_FramingStop):
    """The stream cannot be followed (garbage, unknown framing)."""


class Upgraded(_FramingStop):
    """The connection left the protocol (HTTP 101 Upgrade, CONNECT 2xx): measure it as tcp
    from here on."""


# The framer modules import the exceptions above, so they come after them.
from . import beanstalkd, http, native, redis  # noqa: E402

FRAMERS = {
    "http": (http.RequestFramer, http.ResponseFramer),
    "redis": (redis.RequestFramer, redis.ResponseFramer),
    "beanstalkd": (beanstalkd.RequestFramer, beanstalkd.ResponseFramer),
}
# The protocols whose RequestFramer reports `starts` and `at` (see above).
SHAREABLE = frozenset({"http", "redis"})


def new_framers(protocol: str, max_head: int = http.MAX_HEAD, shared=None,
                use_native: bool = True) -> tuple | None:
    """A fresh (RequestFramer, ResponseFramer) pair for one connection to one backend, or
    None for a protocol without framers (tcp). `max_head` bounds what an HTTP framer
    buffers for one header section; the line-based protocols keep their own bounds.
    With `shared` (a shared.SharedRequests of the same protocol), the requests are a
    follower of that framing instead of a framer of their own. The framers have the
    C parsers in front (native.py) where they are installed, unless not `use_native`."""
    if protocol not in FRAMERS:
        return None
    requests = (shared.follower() if shared is not None
                else new_request_framer(protocol, max_head, use_native))
    if use_native and native.NATIVE.get(protocol):
        responses = native.RESPONSE_FRAMERS[protocol](max_head)
    else:
        responses = _python(FRAMERS[protocol][1], protocol, max_head)
    return requests, responses


def new_request_framer(protocol: str, max_head: int = http.MAX_HEAD,
                       use_native: bool = True):
    """A RequestFramer for one client stream (see new_framers)."""
    if use_native and native.NATIVE.get(protocol):
        return native.REQUEST_FRAMERS[protocol](max_head)
    return _python(FRAMERS[protocol][0], protocol, max_head)


def _python(framer: type, protocol: str, max_head: int):
    return framer(max_head) if protocol == "http" else framer()
