"""protocols/shared.py: one framing of a client stream, followed by each backend, gives each
backend what a framer of its own fed with that backend's writes would give."""
from __future__ import annotations

import gc
import weakref

import pytest
from framing import FAST
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import FRAMERS, ProtocolError
from gproxyd.protocols.shared import SharedRequests

HTTP_REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n"
    b"Trailer: t\r\n\r\n",
    b"HEAD /d HTTP/1.0\nHost: x\n\n",         # bare LF line ends: the state machine
    b"\r\n",                                  # a stray blank line between requests
    b"GET /e HTTP/1.1\r\nX: folded\r\n  on\r\n\r\n",
]
HTTP_ENDINGS = [b"", b"CONNECT h:1 HTTP/1.1\r\n\r\ntunnel bytes", b"\x00garbage",
                b"GET /bad HTTP/9\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: z\r\n\r\n"]
REDIS_REQUESTS = [
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n",
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"PING\r\n",                              # inline
    b"*0\r\n",                                # no command
    b"*4\r\n$6\r\nLRANGE\r\n$1\r\nl\r\n$1\r\n0\r\n$2\r\n99\r\n",
]
REDIS_ENDINGS = [b"", b"*1\r\n#oops\r\n", b"*1\r\n$2\r\nxyz\r\n"]


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def new_framer(protocol: str):
    framer = FRAMERS[protocol][0](1024) if protocol == "http" else FRAMERS[protocol][0]()
    framer.ends = []
    return framer


def outcome(framer, chunk: bytes):
    """What feeding `chunk` gives: (requests, ends, in_message), or the requests
    completed before the error."""
    buf = bytearray(chunk)
    try:
        done = framer.feed(memoryview(buf))
    except ProtocolError as error:  # its message quotes what this chunk held: not compared
        framer.ends.clear()
        return "error", error.completed
    finally:
        buf[:] = b"\xa5" * len(buf)  # nothing of it may be kept by reference
    ends = list(framer.ends)
    framer.ends.clear()
    return done or [], ends, framer.in_message


@FAST
@given(protocol=st.sampled_from(["http", "redis"]),
       picks=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       ending=st.integers(0, 4),
       cuts=st.lists(st.lists(st.integers(0, 10_000), max_size=10), min_size=3, max_size=3),
       order=st.lists(st.integers(0, 3), max_size=200),
       max_ahead=st.sampled_from([1, 2, 1024]))
def test_each_follower_sees_what_a_framer_of_its_own_would(protocol, picks, ending, cuts,
                                                           order, max_ahead):
    """Three backends written the same stream in chunks of their own, in any order
    (production ahead, or a shadow; one far behind), one of them stopping early: each
    follower's requests, ends, in_message and error, write by write, are those of a
    framer of its own fed the same writes."""
    requests = HTTP_REQUESTS if protocol == "http" else REDIS_REQUESTS
    endings = HTTP_ENDINGS if protocol == "http" else REDIS_ENDINGS
    stream = b"".join(requests[p % len(requests)] for p in picks)
    stream += endings[ending % len(endings)]
    shared = SharedRequests(protocol, 1024, max_ahead)
    backends = []
    for points in cuts:
        follower = shared.follower()
        follower.ends = []
        backends.append({"follower": follower, "own": new_framer(protocol),
                         "chunks": cut(stream, points), "done": False})
    # The order of writes: the schedule, then whatever is left, backend by backend.
    schedule = [i for i in order if i < 3] + [0, 1, 2] * len(stream)
    stop_after = {3: 0}.get(order[0] if order else 0, None)  # sometimes one stops early
    for step, index in enumerate(schedule):
        backend = backends[index]
        if backend["done"] or not backend["chunks"]:
            continue
        if index == stop_after and step > len(schedule) // 3:
            backend["follower"].stop()
            backend["done"] = True
            continue
        chunk = backend["chunks"].pop(0)
        expected = outcome(backend["own"], chunk)
        follower = backend["follower"]
        got = outcome(follower, chunk)
        if got[0] == "error":
            follower.ends.clear()
        assert got == expected, (index, chunk)
        if expected[0] == "error":
            backend["done"] = True
        for other in backends:  # requests, and the ALONE mark after them
            assert len(other["follower"].queue) <= max_ahead + 1


@pytest.mark.parametrize("protocol, request_bytes", [
    ("http", b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("redis", b"*2\r\n$3\r\nGET\r\n$3\r\n%03d\r\n"),
])
def test_the_stream_is_framed_once_and_a_stalled_follower_holds_at_most_max_ahead(
        protocol, request_bytes):
    shared = SharedRequests(protocol, 1024, max_ahead=8)
    production, healthy, stalled = shared.follower(), shared.follower(), shared.follower()
    for number in range(100):
        chunk = request_bytes % number
        assert len(production.feed(chunk)) == 1
        assert len(healthy.feed(chunk)) == 1  # written after production: nothing framed again
        assert len(stalled.queue) <= 8 + 1  # and the ALONE mark
    assert shared.parses == 100
    # The stalled one catches up: the 8 it kept, then its own framer for the other 92.
    got = stalled.feed(b"".join(request_bytes % number for number in range(100)))
    assert len(got) == 100 and shared.parses == 100


def test_a_follower_nobody_stopped_goes_with_its_session_without_the_garbage_collector():
    """A shadow that never connected never stops its follower: nothing may hold a
    session's framing in a cycle."""
    gc.disable()
    try:
        shared = SharedRequests("http", 1024)
        production, never_connected = shared.follower(), shared.follower()
        production.feed(b"GET / HTTP/1.1\r\n\r\n" * 3)
        queue = weakref.ref(never_connected.queue)
        del shared, production, never_connected
        assert queue() is None
    finally:
        gc.enable()
