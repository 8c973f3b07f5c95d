"""protocols/http.py: HTTP/1.x request and response framing, by example and by property.

Every stream goes through the framers the way the relay hands it over: as memoryviews
of a buffer that is overwritten as soon as feed() returns.
"""
import re
import string

import pytest
from framing import FAST, bytewise, feed, run, whole
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import FRAMERS, ProtocolError, Upgraded
from gproxyd.protocols.http import MAX_HEAD, RequestFramer, ResponseFramer


def requests(chunks) -> tuple[list, str | None]:
    return run(RequestFramer(), chunks)


def responses(methods, chunks) -> tuple[list, str | None]:
    """Responses to `methods` (all expected first), including what close() completes."""
    framer = ResponseFramer()
    for method in methods:
        framer.expect(method)
    return run(framer, chunks, close=True)




def test_framers_are_registered():
    assert FRAMERS["http"] == (RequestFramer, ResponseFramer)


# --- requests, by example ---------------------------------------------------------------

GOOD_REQUESTS = [
    ("get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ["GET"]),
    ("no headers", b"GET / HTTP/1.1\r\n\r\n", ["GET"]),
    ("http/1.0", b"GET /x HTTP/1.0\r\n\r\n", ["GET"]),
    ("bare LF", b"HEAD /x HTTP/1.1\nHost: a\n\n", ["HEAD"]),
    ("content-length", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
     ["POST", "GET"]),
    ("body looks like a request",
     b"PUT / HTTP/1.1\r\ncontent-length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n", ["PUT"]),
    ("zero length", b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", ["POST"]),
    ("repeated equal lengths",
     b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nhi", ["POST"]),
    ("chunked with extensions and trailers",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5;a=b\r\nhello\r\nA ; n=\"v;x\"\r\n0123456789\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n"
     b"DELETE /x HTTP/1.1\r\n\r\n", ["POST", "DELETE"]),
    ("chunked wins over content-length",
     b"POST / HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", ["POST", "GET"]),
    ("transfer codings ending in chunked",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n"
     b"0\r\n\r\n", ["POST"]),
    ("chunked with bare LF", b"POST / HTTP/1.1\nTransfer-Encoding: chunked\n\n2\nhi\n0\n\n",
     ["POST"]),
    ("pipelined", b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nOPTIONS * HTTP/1.1\r\n\r\n",
     ["GET", "GET", "OPTIONS"]),
    ("blank lines between requests", b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
     ["GET", "GET"]),
    ("obs-fold", b"POST / HTTP/1.1\r\nContent-Length:\r\n 2\r\nX: a\r\n\tb\r\n\r\nhi", ["POST"]),
    ("upgrade is still a request",
     b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", ["GET"]),
    ("connect, then the tunnel",
     b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01 not http \r\n\r\n", ["CONNECT"]),
    ("incomplete", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhell", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in GOOD_REQUESTS],
                         ids=[case[0] for case in GOOD_REQUESTS])
def test_good_requests(stream, expected, split):
    assert requests(split(stream)) == (expected, None)


BAD_REQUESTS = [
    (b"HELLO\r\n\r\n", "bad request line b'HELLO'"),
    (b"GET /\r\n\r\n", "bad request line b'GET /'"),
    (b"GET / HTTP/2.0\r\n\r\n", "bad request line b'GET / HTTP/2.0'"),
    (b"GET  / HTTP/1.1\r\n\r\n", "bad request line b'GET  / HTTP/1.1'"),
    (b"G(T / HTTP/1.1\r\n\r\n", "bad request line"),
    (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", "bad header line b'Host a'"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "bad header line b'Host : a'"),
    (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "whitespace before the first header field"),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "conflicting Content-Length values"),
    (b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", "conflicting Content-Length values"),
    (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", "bad Content-Length b'+5'"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "bad Content-Length b'-1'"),
    (b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n", "bad Content-Length b''"),
    (b"POST / HTTP/1.1\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n", "bad Content-Length"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
     "request with a transfer coding other than chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
     "chunked is not the final transfer coding, or is applied twice"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
     "chunked is not the final transfer coding, or is applied twice"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
     "bad chunk-size line b'xyz'"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk-size line"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
     "bad chunk-size line"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiX\r\n",
     "chunk data not followed by CRLF"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\rX",
     "chunk data not followed by CRLF"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n",
     f"header section or line over {MAX_HEAD} bytes"),
    (b"GET /" + b"a" * MAX_HEAD, f"header section or line over {MAX_HEAD} bytes"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * MAX_HEAD,
     f"header section or line over {MAX_HEAD} bytes"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests(stream, message, split):
    framer = RequestFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        for chunk in split(stream):
            feed(framer, chunk)
    with pytest.raises(ProtocolError, match="framer used after it stopped"):
        framer.feed(b"GET / HTTP/1.1\r\n\r\n")


def test_header_section_at_the_limit():
    head = b"GET / HTTP/1.1\r\nX: "
    head += b"a" * (MAX_HEAD - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    assert requests([head]) == (["GET"], None)
    assert requests([head[:-3], head[-3:]]) == (["GET"], None)
    too_long = head[:-4] + b"a\r\n\r\n"
    assert requests([too_long]) == ([], "ProtocolError")
    assert requests([too_long[:-3], too_long[-3:]]) == ([], "ProtocolError")
    assert requests([too_long[:-2], too_long[-2:]]) == ([], "ProtocolError")


# A route's observe-max-header: the framers take the limit they are given. With 100
# bytes: start-line and fields share it, a trailer section or a chunk-size line has its
# own; a head of exactly 100 bytes passes, one more byte does not (whole or bytewise,
# fast path or state machine).
SMALL_LIMIT = 100
_AT_LIMIT = b"GET / HTTP/1.1\r\nX: " + b"a" * (SMALL_LIMIT - 23) + b"\r\n\r\n"
_RESPONSE_AT_LIMIT = b"HTTP/1.1 204 No Content\r\nX: " + b"a" * (SMALL_LIMIT - 32) + b"\r\n\r\n"
SMALL_LIMIT_CASES = [
    # id, framer, stream, what it completes, the error or None
    ("request head at the limit", RequestFramer, _AT_LIMIT, ["GET"], None),
    ("request head one over", RequestFramer, _AT_LIMIT[:-4] + b"a\r\n\r\n", [],
     "header section or line over 100 bytes"),
    ("request line alone over", RequestFramer, b"GET /" + b"a" * SMALL_LIMIT, [],
     "header section or line over 100 bytes"),
    ("the limit is per head", RequestFramer, _AT_LIMIT * 3, ["GET"] * 3, None),
    ("chunk-size line over", RequestFramer,
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * SMALL_LIMIT, [],
     "header section or line over 100 bytes"),
    ("trailer section over", RequestFramer,
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"t" * SMALL_LIMIT
     + b"\r\n\r\n", [], "header section or line over 100 bytes"),
    ("a body is not a head", RequestFramer,
     b"POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n" + b"b" * 500 + _AT_LIMIT,
     ["POST", "GET"], None),
    ("response head at the limit", ResponseFramer, _RESPONSE_AT_LIMIT, [(204, False)], None),
    ("response head one over", ResponseFramer, _RESPONSE_AT_LIMIT[:-4] + b"a\r\n\r\n", [],
     "header section or line over 100 bytes"),
    ("what came before is kept", ResponseFramer,
     b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nX: " + b"a" * SMALL_LIMIT,
     [(204, False)], "header section or line over 100 bytes"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("framer, stream, completed, message",
                         [case[1:] for case in SMALL_LIMIT_CASES],
                         ids=[case[0] for case in SMALL_LIMIT_CASES])
def test_a_smaller_header_limit(framer, stream, completed, message, split):
    assert len(_AT_LIMIT) == len(_RESPONSE_AT_LIMIT) == SMALL_LIMIT
    instance = framer(SMALL_LIMIT)
    if framer is ResponseFramer:
        instance.expect("GET")
        instance.expect("GET")
    got = []
    if message is None:
        for chunk in split(stream):
            got += feed(instance, chunk)
    else:
        with pytest.raises(ProtocolError, match="^" + re.escape(message)) as raised:
            for chunk in split(stream):
                got += feed(instance, chunk)
        got += raised.value.completed
    assert got == completed


def test_the_default_limit_is_max_head():
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 23) + b"\r\n\r\n"
    assert requests([head]) == (["GET"], None)
    assert run(RequestFramer(MAX_HEAD - 1), [head]) == ([], "ProtocolError")


@pytest.mark.parametrize("framer, stream, message", [
    (RequestFramer, b"\x16\x03\x01\x02\x00", "bad request line b'\\x16\\x03\\x01\\x02\\x00'"),
    (RequestFramer, b"HELLO there\r\n", "bad request line b'HELLO there'"),
    (ResponseFramer, b"\x00\x01\x02", "bad status line b'\\x00\\x01\\x02'"),
    (ResponseFramer, b"+OK\r\n", "bad status line b'+OK'"),
    (ResponseFramer, b"HTTP/1.1 200 OK, but\nthen", None),
])
def test_garbage_is_caught_early(framer, stream, message):
    """At its first byte if no message starts so, else at its first line's end: an
    observer must not wait for 64 KiB of a stream that is not HTTP."""
    if message is None:
        assert framer().feed(stream) is None
    else:
        with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
            framer().feed(stream)


def test_requests_completed_before_garbage_ride_on_the_error():
    framer = RequestFramer()
    with pytest.raises(ProtocolError) as raised:
        framer.feed(b"GET / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n\x00\x01\r\n\r\n")
    assert raised.value.completed == ["GET", "HEAD"]


def test_large_body_is_counted_not_parsed():
    framer = RequestFramer()
    assert framer.feed(b"PUT / HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n") is None
    chunk = memoryview(bytearray(b"GET / HTTP/1.1\r\n\r\n" * 1000))
    fed = 0
    while fed + len(chunk) < 10_000_000:
        assert framer.feed(chunk) is None
        fed += len(chunk)
    assert framer.feed(chunk[:10_000_000 - fed]) == ["PUT"]


# --- responses, by example --------------------------------------------------------------

GOOD_RESPONSES = [
    ("content-length", ["GET"], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", [(200, False)]),
    ("no reason phrase", ["GET"], b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n", [(404, False)]),
    ("server error", ["GET", "GET"],
     b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
     b"HTTP/1.1 503 Busy\r\ncontent-length: 1\r\n\r\nx",
     [(500, True), (503, True)]),
    ("chunked", ["GET"],
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\n", [(200, False)]),
    ("chunked wins", ["GET", "GET"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", [(200, False), (201, False)]),
    ("close-delimited", ["GET"], b"HTTP/1.1 200 OK\r\n\r\nall of it, to the end", [(200, False)]),
    ("http/1.0 close-delimited", ["GET"], b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n\r\n\r\n",
     [(200, False)]),
    ("transfer coding without chunked", ["GET"],
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 1\r\n\r\nabc", [(200, False)]),
    ("head has no body", ["HEAD", "GET"],
     b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
     [(200, False), (200, False)]),
    ("head with chunked", ["HEAD"],
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", [(200, False)]),
    ("204 and 304 have no body", ["DELETE", "GET", "GET"],
     b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", [(204, False), (304, False), (200, False)]),
    ("interim responses are skipped", ["POST"],
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
     b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", [(201, False)]),
    ("refused connect", ["CONNECT"],
     b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\nauth",
     [(407, False)]),
    ("no request expected", [], b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", [(200, False)]),
    ("bare LF", ["GET"], b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n1\nx\n0\n\n",
     [(200, False)]),
    ("nothing", ["GET"], b"", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("methods, stream, expected", [case[1:] for case in GOOD_RESPONSES],
                         ids=[case[0] for case in GOOD_RESPONSES])
def test_good_responses(methods, stream, expected, split):
    assert responses(methods, split(stream)) == (expected, None)


def test_close_delimited_response_completes_at_close():
    framer = ResponseFramer()
    framer.expect("GET")
    assert framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n"[:17]) is None
    assert framer.feed(b"\r\n\r\nbody") is None
    assert framer.close() == [(200, False)]


def test_close_between_responses_completes_nothing():
    framer = ResponseFramer()
    framer.expect("GET")
    framer.expect("GET")
    assert framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx") == [(200, False)]
    assert framer.close() is None


@pytest.mark.parametrize("stream", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nTrailer: x\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2",
])
def test_response_cut_short(stream):
    framer = ResponseFramer()
    framer.expect("GET")
    framer.feed(stream)
    with pytest.raises(ProtocolError, match="^connection closed in the middle of a response$"):
        framer.close()


BAD_RESPONSES = [
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line b'HTTP/1.1 2000 OK'"),
    (b"HTTP/1.1 OK\r\n\r\n", "bad status line"),
    (b"HTTP/2 200\r\n\r\n", "bad status line"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line b'SSH-2.0-OpenSSH'"),
    (b"HTTP/1.1 099 Odd\r\n\r\n", "bad status code 099"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "conflicting Content-Length values"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "bad Content-Length b'0x10'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk-size line"),
    (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", "bad header line b'broken'"),
]


@pytest.mark.parametrize("stream, message", BAD_RESPONSES, ids=[m for _, m in BAD_RESPONSES])
def test_bad_responses(stream, message):
    framer = ResponseFramer()
    framer.expect("GET")
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        framer.feed(stream)


@pytest.mark.parametrize("method, stream, message, status", [
    ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
     "101 Switching Protocols", 101),
    ("CONNECT", b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03",
     "CONNECT answered 200", 200),
    ("CONNECT", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 OK\r\n\r\n",
     "CONNECT answered 204", 204),
])
def test_upgraded(method, stream, message, status):
    """The response that leaves HTTP completes with its header section, on the exception."""
    for split in (whole, bytewise):
        framer = ResponseFramer()
        framer.expect(method)
        with pytest.raises(Upgraded, match="^" + message + "$") as raised:
            for chunk in split(stream):
                feed(framer, chunk)
        assert raised.value.completed == [(status, False)]


def test_responses_completed_before_the_upgrade_ride_on_it():
    framer = ResponseFramer()
    for method in ("GET", "HEAD", "GET"):
        framer.expect(method)
    with pytest.raises(Upgraded) as raised:
        framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 500 x\r\n\r\n"
                    b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert raised.value.completed == [(200, False), (500, True), (101, False)]


# --- generated streams ------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
EOL = st.sampled_from([b"\r\n", b"\n"])
FIELD_NAME = st.sampled_from([b"Host", b"content-type", b"X-Content-Length", b"Connection",
                              b"Transfer-Encodings", b"TE", b"a", TCHAR.encode()])
FIELD_VALUE = st.sampled_from([b"", b"0", b"chunked", b"close", b"a: b", b"x\t y", b"\xe9t\xe9"])
FIELDS = st.lists(st.tuples(FIELD_NAME, FIELD_VALUE), max_size=3)
BODY_BYTES = st.binary(max_size=200) | st.sampled_from(
    [b"GET / HTTP/1.1\r\n\r\n", b"0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"])


@st.composite
def chunked_body(draw, eol) -> bytes:
    parts = []
    for data in draw(st.lists(BODY_BYTES.filter(bool), max_size=3)):
        digits = draw(st.sampled_from(["x", "X", "04x"]))
        ext = draw(st.sampled_from([b"", b";a=b", b' ; n="v;x"', b";flag"]))
        parts.append(format(len(data), digits).encode() + ext + eol + data + eol)
    trailers = b"".join(name + b": " + value + eol for name, value in draw(FIELDS))
    return b"".join(parts) + b"0" + eol + trailers + eol


@st.composite
def framed_body(draw, eol, close_ok: bool) -> tuple[list, bytes]:
    """Framing fields and the body they frame; a body up to close only when `close_ok`."""
    kinds = ["length", "chunked"] + (["close"] if close_ok else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "length":
        body = draw(BODY_BYTES)
        return [(b"Content-Length", str(len(body)).encode())], body
    if kind == "chunked":
        fields = [(b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"gzip, Chunked"])))]
        if draw(st.booleans()):
            fields.append((b"content-length", b"1234"))  # chunked wins
        return fields, draw(chunked_body(eol))
    return draw(st.sampled_from([[], [(b"Transfer-Encoding", b"gzip")]])), draw(BODY_BYTES)


@st.composite
def message(draw, start_line: bytes, framing: list, body: bytes) -> bytes:
    eol = draw(EOL)
    fields = draw(FIELDS) + framing
    fields = draw(st.permutations(fields))
    head = start_line + eol + b"".join(name + b": " + value + eol for name, value in fields)
    return head + eol + body


@st.composite
def request_stream(draw) -> tuple[bytes, list]:
    """Pipelined requests (the last one possibly a CONNECT) and the methods they complete."""
    stream = b""
    methods = []
    for _ in range(draw(st.integers(0, 4))):
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "M-SEARCH"]))
        version = draw(st.sampled_from([b"1.1", b"1.0"]))
        kind = draw(st.sampled_from(["none", "length", "chunked"]))
        if kind == "none":
            framing, body = [], b""
        else:
            framing, body = draw(framed_body(draw(EOL), close_ok=False))
        start = method.encode() + b" /p?q=1 HTTP/" + version
        stream += draw(st.sampled_from([b"", b"\r\n"])) + draw(message(start, framing, body))
        methods.append(method)
    if draw(st.booleans()):
        stream += b"CONNECT h:443 HTTP/1.1\r\n\r\n" + draw(st.binary(max_size=50))
        methods.append("CONNECT")
    return stream, methods


@st.composite
def response_stream(draw) -> tuple[list, bytes, list]:
    """(methods to expect, the responses, what they complete); the last may end at close."""
    methods, stream, expected = [], b"", []
    count = draw(st.integers(0, 4))
    for i in range(count):
        method = draw(st.sampled_from(["GET", "HEAD", "POST"]))
        for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
            stream += draw(message(b"HTTP/1.1 %d Interim" % interim, [], b""))
        status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500, 502]))
        if method == "HEAD" or status in (204, 304):
            framing = draw(st.sampled_from([[], [(b"Content-Length", b"42")],
                                            [(b"Transfer-Encoding", b"chunked")]]))
            body = b""
        else:
            framing, body = draw(framed_body(draw(EOL), close_ok=i == count - 1))
        version = draw(st.sampled_from([b"1.1", b"1.0"]))
        reason = draw(st.sampled_from([b"", b" OK", b" Whatever it says"]))
        stream += draw(message(b"HTTP/" + version + b" %d" % status + reason, framing, body))
        methods.append(method)
        expected.append((status, status >= 500))
    return methods, stream, expected


@st.composite
def splits(draw, data: bytes) -> list:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few bytes flipped, inserted or deleted: mostly-valid garbage."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["flip", "insert", "delete"]))
        if what == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b"\r\n", b"\n", b":", b" ", b"0"]))
        elif at < len(data):
            if what == "flip":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at:at + draw(st.integers(1, 4))]
    return bytes(data)


@FAST
@given(st.data())
def test_generated_requests(data):
    """Valid pipelines yield exactly their methods, however they are split; the same
    streams with a few bytes mangled yield the same result whole as split."""
    stream, methods = data.draw(request_stream())
    assert requests(whole(stream)) == (methods, None)
    assert requests(data.draw(splits(stream))) == (methods, None)
    garbage = data.draw(mutated(stream))
    assert requests(data.draw(splits(garbage))) == requests(whole(garbage))


@FAST
@given(st.data())
def test_generated_responses(data):
    """Valid responses yield exactly their statuses, however they are split; the same
    streams with a few bytes mangled yield the same result whole as split."""
    methods, stream, expected = data.draw(response_stream())
    assert responses(methods, whole(stream)) == (expected, None)
    assert responses(methods, data.draw(splits(stream))) == (expected, None)
    garbage = data.draw(mutated(stream))
    assert responses(methods, data.draw(splits(garbage))) == responses(methods, whole(garbage))


@FAST
@given(st.binary(max_size=300), st.data())
def test_random_bytes_raise_only_protocol_errors(stream, data):
    # requests() and responses() let anything but ProtocolError and Upgraded through
    requests(data.draw(splits(stream)))
    methods = data.draw(st.lists(st.sampled_from(["GET", "HEAD", "CONNECT"]), max_size=3))
    responses(methods, data.draw(splits(stream)))
    responses(methods, data.draw(splits(b"HTTP/1.1 200 OK\r\n" + stream)))
    requests(data.draw(splits(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + stream)))
