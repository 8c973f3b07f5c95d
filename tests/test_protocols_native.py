"""protocols/native.py: llhttp (httptools) and hiredis in front of the Python framers give
what the Python framers give, on the Python framers' own tables and generated streams.

httptools and hiredis are needed here (pip install .[native]): without them these
tests fail, they are not skipped.
"""
from __future__ import annotations

import re

import pytest
import test_protocols_http as http_tests
import test_protocols_redis as redis_tests
from framing import FAST, bytewise, feed, run, whole
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import ProtocolError, Upgraded, native, new_framers
from gproxyd.protocols.http import MAX_HEAD

assert native.NATIVE == {"http": True, "redis": True}, \
    "httptools and hiredis must be installed for these tests (pip install .[native])"


def http_requests(chunks, max_head: int = MAX_HEAD):
    return run(native.HttpRequestFramer(max_head), chunks)


def http_responses(methods, chunks):
    framer = native.HttpResponseFramer()
    for method in methods:
        framer.expect(method)
    return run(framer, chunks, close=True)


def redis_commands(chunks):
    return run(native.RedisRequestFramer(), chunks)


# A RESP3 type byte where a value starts: the client sent HELLO (3) first.
RESP3 = re.compile(rb"(?:^|\n)[%~_,#(!=|>]")


def redis_replies(chunks, requests=()):
    """Replies as (is_error, ...): their types come from hiredis's values when a chunk
    holds several (see native.py); the first reply of a chunk keeps its type byte."""
    framer = native.RedisResponseFramer()
    if RESP3.search(b"".join(chunks)):
        framer.expect("HELLO")       # RESP3 comes only after HELLO 3...
        framer._py._pending.clear()  # ...whose own reply these streams do not hold
    for request in requests:
        framer.expect(request)
    items, error = run(framer, chunks, close=True)
    return [is_error for _, is_error in items], error


def python_replies(chunks, requests=()):
    items, error = redis_tests.replies(chunks, requests)
    return [is_error for _, is_error in items], error


def test_new_framers_put_the_c_parsers_in_front_unless_told_not_to():
    assert type(new_framers("http")[0]) is native.HttpRequestFramer
    assert type(new_framers("redis")[1]) is native.RedisResponseFramer
    assert type(new_framers("http", use_native=False)[0]) is http_tests.RequestFramer
    assert type(new_framers("redis", use_native=False)[1]) is redis_tests.ResponseFramer


# --- the Python framers' tables -----------------------------------------------------------

@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in http_tests.GOOD_REQUESTS],
                         ids=[case[0] for case in http_tests.GOOD_REQUESTS])
def test_good_requests(stream, expected, split):
    assert http_requests(split(stream)) == (expected, None)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", http_tests.BAD_REQUESTS,
                         ids=[m for _, m in http_tests.BAD_REQUESTS])
def test_bad_requests(stream, message, split):
    framer = native.HttpRequestFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        for chunk in split(stream):
            feed(framer, chunk)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("methods, stream, expected",
                         [case[1:] for case in http_tests.GOOD_RESPONSES],
                         ids=[case[0] for case in http_tests.GOOD_RESPONSES])
def test_good_responses(methods, stream, expected, split):
    assert http_responses(methods, split(stream)) == (expected, None)


@pytest.mark.parametrize("stream, message", http_tests.BAD_RESPONSES,
                         ids=[m for _, m in http_tests.BAD_RESPONSES])
def test_bad_responses(stream, message):
    framer = native.HttpResponseFramer()
    framer.expect("GET")
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        framer.feed(stream)


@pytest.mark.parametrize("method, stream", [
    ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"),
    ("CONNECT", b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03"),
])
def test_upgrades_are_left_to_python(method, stream):
    framer = native.HttpResponseFramer()
    framer.expect(method)
    with pytest.raises(Upgraded):
        framer.feed(stream)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in redis_tests.GOOD_COMMANDS],
                         ids=[case[0] for case in redis_tests.GOOD_COMMANDS])
def test_good_commands(stream, expected, split):
    assert redis_commands(split(stream)) == (expected, None)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", redis_tests.BAD_COMMANDS,
                         ids=[m for _, m in redis_tests.BAD_COMMANDS])
def test_bad_commands(stream, message, split):
    framer = native.RedisRequestFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        for chunk in split(stream):
            feed(framer, chunk)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in redis_tests.GOOD_REPLIES],
                         ids=[case[0] for case in redis_tests.GOOD_REPLIES])
def test_good_replies(stream, expected, split):
    assert redis_replies(split(stream)) == ([e for _, e in expected], None)


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", redis_tests.BAD_REPLIES,
                         ids=[m for _, m in redis_tests.BAD_REPLIES])
def test_bad_replies(stream, message, split):
    framer = native.RedisResponseFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message)):
        for chunk in split(stream):
            feed(framer, chunk)


def test_a_reply_past_max_depth_is_left_to_python():
    stream = b"*1\r\n" * (redis_tests.MAX_DEPTH + 1) + b"+x\r\n"
    with pytest.raises(ProtocolError, match="nested deeper than"):
        native.RedisResponseFramer().feed(stream)


@pytest.mark.parametrize("requests, stream", [
    (["SUBSCRIBE"], b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"),
    (["GET", "MONITOR"], b"$1\r\nx\r\n+OK\r\n"),
])
def test_leaving_request_reply_is_left_to_python(requests, stream):
    framer = native.RedisResponseFramer()
    for request in requests:
        framer.expect(request)
    with pytest.raises(Upgraded):
        framer.feed(stream)


# --- what the C parsers take, and what they leave ---------------------------------------

def test_whole_messages_go_to_the_c_parser_and_the_python_framer_stays_between_messages():
    requests = native.HttpRequestFramer()
    requests.ends, requests.starts = [], []
    for _ in range(5):
        assert requests.feed(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n") == ["GET"]
    assert requests._parser is not None and requests._misses == 0
    assert requests._py._state == 0 and requests.ends == [28] * 5 and requests.starts == [1] * 5
    commands = native.RedisRequestFramer()
    commands.ends, commands.starts = [], []
    assert commands.feed(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == ["GET"]
    assert (commands.ends, commands.starts, commands._misses) == ([20], [4], 0)
    replies = native.RedisResponseFramer()
    replies.expect("GET")
    replies.expect("SET")
    assert replies.feed(b"$1\r\nv\r\n+OK\r\n") == [("$", False), ("+", False)]  # Python's
    assert replies._parser is None
    for _ in range(16):
        replies.expect("GET")
    assert replies.feed(b"$1\r\nv\r\n" * 7 + b"-ERR x\r\n" + b"*2\r\n:1\r\n$-1\r\n" * 8) == \
        [("$", False)] * 7 + [("-", True)] + [("*", False)] * 8
    assert replies._misses == 0 and replies._parser is not None
    replies.expect("HELLO")  # RESP3 may follow: Python's from here on
    assert replies.feed(b"%1\r\n+proto\r\n:3\r\n") == [("%", False)]


@pytest.mark.parametrize("first, rest", [
    (b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab", b"cd"),     # a body in two writes
    (b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HT", b"TP/1.1\r\n\r\n"),
])
def test_a_chunk_that_is_not_whole_requests_goes_to_python_and_two_end_the_trying(first, rest):
    framer = native.HttpRequestFramer()
    whole_stream = run(http_tests.RequestFramer(), [first + rest])[0]
    got = (framer.feed(first) or []) + (framer.feed(rest) or [])
    assert got == whole_stream
    assert framer._misses == 1
    assert framer.feed(b"GET / HTTP/1.1\r\n\r\nGET") == ["GET"]  # one whole and a start
    assert framer._misses == 2
    assert framer.feed(b" / HTTP/1.1\r\n\r\n") == ["GET"]
    assert framer.feed(b"GET / HTTP/1.1\r\n\r\n") == ["GET"]
    assert framer._misses == 2 and framer._parser is None  # python's now


@pytest.mark.parametrize("side, message", [
    ("request", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("request", b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nab\n"),
    ("request", b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\n\r\n0\r\n\r\n"),
    ("response", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"),
    ("response", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
])
@pytest.mark.parametrize("after", [b"", b"\r", b"\r\n", b"\n\n"])
def test_a_message_ends_where_python_says_not_after_the_blank_lines_llhttp_takes(
        side, message, after):
    """Blank lines after a message belong to none: the end is the message's."""
    if side == "request":
        framer, python = native.HttpRequestFramer(), http_tests.RequestFramer()
    else:
        framer, python = native.HttpResponseFramer(), http_tests.ResponseFramer()
        framer.expect("GET")
        python.expect("GET")
    framer.ends, python.ends = [], []
    assert framer.feed(message + after) == python.feed(message + after)
    assert framer.ends == python.ends == [len(message)]


@pytest.mark.parametrize("stream", [
    b"*1\r\n$2\r\nxyz\r",               # hiredis takes "z\r" for the CRLF
    b"*2\r\n$3\r\nGET\r\n+k\r\n",       # a simple string for an argument
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$0\r\n",  # the last cut before its CRLF
])
def test_commands_hiredis_reads_laxly_are_left_to_python(stream):
    framer, python = native.RedisRequestFramer(), redis_tests.RequestFramer()
    assert run(framer, [stream]) == run(python, [stream])


def test_pipelined_small_commands_are_framed_in_one_pass_with_their_offsets():
    """Commands of up to 9 arguments of up to 99 bytes: one regular expression, with or
    without the offsets a shared framing wants."""
    pipeline = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" * 16
    framer = native.RedisRequestFramer()
    assert framer.feed(pipeline) == ["GET"] * 16 and framer._misses == 0
    framer.ends, framer.starts = [], []
    assert framer.feed(pipeline) == ["GET"] * 16 and framer._misses == 0
    assert framer.ends == [20 * i for i in range(1, 17)]
    assert framer.starts == [20 * i + 4 for i in range(16)]


def test_pipelined_commands_go_to_hiredis_unless_their_offsets_are_wanted():
    command = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\n" + b"v" * 100 + b"\r\n"
    framer = native.RedisRequestFramer()
    assert framer.feed(command * 16) == ["SET"] * 16 and framer._misses == 0
    framer.ends = []
    assert framer.feed(command * 16) == ["SET"] * 16 and framer._misses == 1
    assert framer.ends == [len(command) * i for i in range(1, 17)]


# --- generated streams --------------------------------------------------------------------

@FAST
@given(st.data())
def test_generated_http_streams(data):
    """However they are cut: valid streams give what the Python framers give; mangled
    ones too, but for what llhttp accepts whole that the Python framer would refuse."""
    stream, methods = data.draw(http_tests.request_stream())
    cuts = data.draw(http_tests.splits(stream))
    assert http_requests(cuts) == (methods, None)
    methods, stream, expected = data.draw(http_tests.response_stream())
    cuts = data.draw(http_tests.splits(stream))
    assert http_responses(methods, cuts) == (expected, None)


@FAST
@given(st.data())
def test_generated_redis_streams(data):
    stream, names = data.draw(redis_tests.command_stream())
    assert redis_commands(data.draw(redis_tests.splits(stream))) == (names, None)
    stream, expected = redis_tests.reply_stream(data.draw(redis_tests.CODES))
    cuts = data.draw(redis_tests.splits(stream))
    assert redis_replies(cuts) == python_replies(cuts) == ([e for _, e in expected], None)


RESP2_LEAVES = st.sampled_from([b"+OK\r\n", b"-ERR wrong\r\n", b":42\r\n", b":-1\r\n",
                                b"$3\r\nabc\r\n", b"$0\r\n\r\n", b"$-1\r\n", b"*-1\r\n",
                                b"*0\r\n", b"$5\r\n*2\r\n#\r\n"])
RESP2_REPLIES = st.recursive(
    RESP2_LEAVES, lambda inner: st.lists(inner, min_size=1, max_size=5).map(
        lambda items: b"*%d\r\n" % len(items) + b"".join(items)), max_leaves=40)


@FAST
@given(st.lists(RESP2_REPLIES, max_size=30), st.data())
def test_generated_resp2_replies_give_what_python_gives(stream, data):
    """What hiredis frames (whole RESP2 replies, up to a pipeline's worth in one chunk)."""
    stream = b"".join(stream)
    cuts = data.draw(redis_tests.splits(stream))
    assert redis_replies(cuts) == python_replies(cuts)
    assert redis_replies([stream]) == python_replies([stream])


@FAST
@given(st.binary(max_size=300), st.data())
def test_random_bytes_raise_only_protocol_errors(stream, data):
    http_requests(data.draw(http_tests.splits(stream)))
    http_responses(["GET"], data.draw(http_tests.splits(b"HTTP/1.1 200 OK\r\n" + stream)))
    redis_commands(data.draw(redis_tests.splits(b"*3\r\n$3\r\nSET\r\n" + stream)))
    redis_replies(data.draw(redis_tests.splits(stream)), ["GET", "SUBSCRIBE"])


def test_bytewise_and_whole_give_the_same_answer_ends():
    """ends, as a Capture uses them, at the same offsets whichever parser framed."""
    stream = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    framer = native.HttpResponseFramer()
    framer.ends = []
    framer.expect("GET")
    assert framer.feed(stream) == [(200, False)] and framer.ends == [len(stream)]
    framer = native.HttpResponseFramer()
    framer.ends = []
    framer.expect("GET")
    got = [item for chunk in bytewise(stream) for item in feed(framer, chunk)]
    assert got == [(200, False)] and framer.ends == [1]
