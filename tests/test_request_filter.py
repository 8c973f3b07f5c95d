"""request_filter.py and the framers' message ends: whole requests pass or not, however
the stream is cut, and every message's end is reported where it is."""
from __future__ import annotations

import pytest
from framing import FAST
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import FRAMERS
from gproxyd.request_filter import RequestFilter

HTTP_REQUESTS = {
    "GET": b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    "HEAD": b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST": b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
    "PUT": b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "DELETE": b"DELETE /d HTTP/1.1\r\nHost: x\r\n\r\n",
}


def resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


REDIS_REQUESTS = {
    "GET": resp(b"GET", b"key"),
    "SET": resp(b"SET", b"key", b"x" * 300),
    "HGETALL": resp(b"HGETALL", b"h"),
    "INCR": resp(b"INCR", b"n"),
    "MULTI": resp(b"MULTI"),
    "EXEC": resp(b"EXEC"),
    "PING": b"PING\r\n",  # inline
}


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def through(request_filter: RequestFilter, chunks: list[bytes]) -> bytes:
    out = []
    for chunk in chunks:
        buf = bytearray(chunk)
        view = memoryview(buf)
        data = request_filter.feed(view)
        if data is not None:
            out.append(bytes(data))  # the caller writes (or copies) it before the next chunk
        view[:] = b"\xa5" * len(buf)
    return b"".join(out)


@FAST
@given(names=st.lists(st.sampled_from(sorted(HTTP_REQUESTS)), min_size=1, max_size=8),
       points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_http_requests_pass_whole_or_not_at_all(names, points):
    decisions = []
    stream = b"".join(HTTP_REQUESTS[name] for name in names)
    passed = through(RequestFilter("http", ("GET", "HEAD"), decisions.append),
                     cut(stream, points))
    admitted = [name in ("GET", "HEAD") for name in names]
    assert decisions == admitted
    assert passed == b"".join(HTTP_REQUESTS[n] for n, ok in zip(names, admitted, strict=True)
                              if ok)


@FAST
@given(names=st.lists(st.sampled_from(sorted(REDIS_REQUESTS)), min_size=1, max_size=10),
       points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_redis_read_only_commands_pass_and_transactions_stay_away(names, points):
    decisions = []
    stream = b"".join(REDIS_REQUESTS[name] for name in names)
    passed = through(RequestFilter("redis", ("readonly",), decisions.append),
                     cut(stream, points))
    admitted, inside = [], False
    for name in names:
        if inside:
            inside = name != "EXEC"
            admitted.append(False)
        elif name == "MULTI":
            inside = True
            admitted.append(False)
        else:
            admitted.append(name in ("GET", "HGETALL", "PING"))
    assert decisions == admitted
    assert passed == b"".join(REDIS_REQUESTS[n] for n, ok in zip(names, admitted, strict=True)
                              if ok)


def test_a_large_upload_streams_through_once_its_method_is_known():
    """Decided at the request line: the body is passed (or not) chunk by chunk, never held."""
    decisions = []
    request_filter = RequestFilter("http", ("POST",), decisions.append)
    head = b"POST /big HTTP/1.1\r\nContent-Length: 3000000\r\n\r\n"
    assert request_filter.feed(b"POS") is None  # not known yet: held
    assert decisions == []
    assert bytes(request_filter.feed(head[3:] + b"x" * 1000)) == head + b"x" * 1000
    assert decisions == [True]
    assert bytes(request_filter.feed(b"y" * 65536)) == b"y" * 65536
    dropping = RequestFilter("http", ("GET",), decisions.append)
    assert dropping.feed(head + b"x" * 1000) is None
    assert dropping.feed(b"y" * 65536) is None
    assert decisions == [True, False]


def test_a_connect_tunnel_or_garbage_stops_the_filter():
    decisions = []
    request_filter = RequestFilter("http", ("GET",), decisions.append)
    tunnel = b"CONNECT example.org:443 HTTP/1.1\r\n\r\n"
    assert bytes(request_filter.feed(HTTP_REQUESTS["GET"] + tunnel + b"\x16\x03\x01")) == \
        HTTP_REQUESTS["GET"]
    assert request_filter.stopped and decisions == [True, False]
    assert request_filter.feed(HTTP_REQUESTS["GET"]) is None
    garbled = RequestFilter("http", ("GET",), decisions.append)
    assert garbled.feed(b"\x00\x01 not http\r\n") is None
    assert garbled.stopped


@pytest.mark.parametrize("protocol, messages", [
    ("http", list(HTTP_REQUESTS.values())),
    ("redis", list(REDIS_REQUESTS.values())),
])
@FAST
@given(points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10))
def test_framers_report_where_each_request_ends(protocol, messages, points):
    framer = FRAMERS[protocol][0]()
    framer.ends = []
    stream = b"".join(messages)
    offset, found = 0, []
    for chunk in cut(stream, points):
        framer.feed(chunk)
        found += [offset + end for end in framer.ends]
        framer.ends.clear()
        offset += len(chunk)
    expected, total = [], 0
    for message in messages:
        total += len(message)
        expected.append(total)
    assert found == expected


@FAST
@given(points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10))
def test_framers_report_where_each_response_ends(points):
    answers = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 204 No Content\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"]
    framer = FRAMERS["http"][1]()
    framer.ends = []
    for _ in answers:
        framer.expect("GET")
    offset, found = 0, []
    for chunk in cut(b"".join(answers), points):
        framer.feed(chunk)
        found += [offset + end for end in framer.ends]
        framer.ends.clear()
        offset += len(chunk)
    assert found == [len(answers[0]), len(answers[0]) + len(answers[1]),
                     sum(map(len, answers))]
