"""protocols/redis.py: RESP2/RESP3 command and reply framing, by example and by property.

Every stream goes through the framers the way the relay hands it over: as memoryviews
of a buffer that is overwritten as soon as feed() returns.
"""
import re
import tracemalloc

import pytest
from framing import FAST, bytewise, feed, run, whole
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import FRAMERS, ProtocolError, new_request_framer
from gproxyd.protocols.redis import (
    MAX_DEPTH,
    MAX_LINE,
    NAME_MAX,
    RequestFramer,
    ResponseFramer,
)


def commands(chunks) -> tuple[list, str | None]:
    return run(RequestFramer(), chunks)


def replies(chunks, requests=()) -> tuple[list, str | None]:
    """Replies (to `requests`, all expected first), closing the connection at the end."""
    framer = ResponseFramer()
    for request in requests:
        framer.expect(request)
    return run(framer, chunks, close=True)




def framed_both_ways(requests, stream: bytes) -> tuple:
    """`stream` fed to a fresh framer expecting `requests`, whole and then byte by byte
    (which never takes the one-chunk paths): (replies, error, replies still expected)
    each way, and the ends the whole way reported."""
    results = []
    for split in (whole, bytewise):
        framer = ResponseFramer()
        framer.ends = []
        for request in requests:
            framer.expect(request)
        items, error = run(framer, split(stream))
        results.append(((items, error, len(framer._pending)), framer.ends))
    (whole_way, ends), (byte_way, _) = results
    return whole_way, byte_way, ends


def bulk(data: bytes, kind: bytes = b"$") -> bytes:
    return kind + b"%d\r\n" % len(data) + data + b"\r\n"


def test_framers_are_registered():
    assert FRAMERS["redis"] == (RequestFramer, ResponseFramer)


# --- commands, by example ---------------------------------------------------------------

GOOD_COMMANDS = [
    ("array", b"*2\r\n$3\r\nget\r\n$1\r\nk\r\n", ["GET"]),
    ("inline", b"PING\r\n", ["PING"]),
    ("inline with arguments, bare LF", b"set k v\n", ["SET"]),
    ("inline with leading blanks", b"  \tdel k\r\n", ["DEL"]),
    ("pipeline", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nping\r\n",
     ["SET", "GET", "PING"]),
    ("arguments that look like commands",
     b"*3\r\n$3\r\nSET\r\n" + bulk(b"*1\r\n$4\r\nPING\r\n") + bulk(b"\r\n") + b"exec\r\n",
     ["SET", "EXEC"]),
    ("empty argument", b"*2\r\n$4\r\necho\r\n$0\r\n\r\n", ["ECHO"]),
    ("empty name", b"*1\r\n$0\r\n\r\n", [""]),
    ("no command: empty arrays, blank lines", b"*0\r\n*-1\r\n\r\n \t \r\n\n", []),
    ("long names are cut", b"*1\r\n" + bulk(b"x" * 100), ["X" * NAME_MAX]),
    ("incomplete", b"*2\r\n$3\r\nGET\r\n$1\r\n", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in GOOD_COMMANDS],
                         ids=[case[0] for case in GOOD_COMMANDS])
def test_good_commands(stream, expected, split):
    assert commands(split(stream)) == (expected, None)


BAD_COMMANDS = [
    (b"*x\r\n", "bad length b'*x'"),
    (b"*1 \r\n", "bad length b'*1 '"),
    (b"*+1\r\n", "bad length b'*+1'"),
    (b"*1234567890123456789\r\n", "bad length b'*1234567890123456789'"),
    (b"*1\r\n+GET\r\n", "expected '$' in a command, got b'+'"),
    (b"*2\r\n$3\r\nGET\r\nk\r\n", "expected '$' in a command, got b'k'"),
    (b"*1\r\n$-1\r\n", "bad bulk string length b'$-1'"),
    (b"*1\r\n$3\r\nGETX\r\n", "bulk string not followed by CRLF"),
    (b"GET " + b"k" * MAX_LINE + b"\r\n", f"line over {MAX_LINE} bytes"),
    (b"*1\r\n$" + b"1" * MAX_LINE, f"line over {MAX_LINE} bytes"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", BAD_COMMANDS, ids=[m for _, m in BAD_COMMANDS])
def test_bad_commands(stream, message, split):
    framer = RequestFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
        for chunk in split(stream):
            feed(framer, chunk)
    with pytest.raises(ProtocolError, match="^framer used after it stopped$"):
        framer.feed(b"PING\r\n")


def test_commands_completed_before_garbage_ride_on_the_error():
    with pytest.raises(ProtocolError) as raised:
        RequestFramer().feed(b"PING\r\n*1\r\n$4\r\nQUIT\r\n*?\r\n")
    assert raised.value.completed == ["PING", "QUIT"]


def test_line_at_the_limit():
    line = b"GET " + b"k" * (MAX_LINE - 6) + b"\r\n"
    assert len(line) == MAX_LINE
    assert commands([line]) == (["GET"], None)
    assert commands([line[:-1], line[-1:]]) == (["GET"], None)
    assert commands([line[:-2] + b"kk\r\n"]) == ([], "ProtocolError")


def test_huge_argument_is_counted_not_parsed():
    framer = RequestFramer()
    size = 10_000_000
    assert framer.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % size) is None
    chunk = memoryview(bytearray(b"*1\r\n$4\r\nPING\r\n" * 10000))
    fed = 0
    while fed + len(chunk) < size:
        assert framer.feed(chunk) is None
        fed += len(chunk)
    assert framer.feed(chunk[:size - fed]) is None
    assert framer.feed(b"\r\nPING\r\n") == ["SET", "PING"]


# --- replies, by example ----------------------------------------------------------------

GOOD_REPLIES = [
    ("simple string", b"+OK\r\n", [("+", False)]),
    ("error", b"-ERR unknown command 'x'\r\n", [("-", True)]),
    ("integer", b":-42\r\n:+7\r\n", [(":", False), (":", False)]),
    ("bulk string", b"$5\r\nhello\r\n$0\r\n\r\n", [("$", False), ("$", False)]),
    ("bulk string holding replies", bulk(b"+OK\r\n-ERR\r\n*2\r\n"), [("$", False)]),
    ("null bulk string", b"$-1\r\n", [("$", False)]),
    ("array", b"*2\r\n$1\r\na\r\n:1\r\n", [("*", False)]),
    ("empty and null arrays", b"*0\r\n*-1\r\n", [("*", False), ("*", False)]),
    ("nested, with an error inside", b"*2\r\n*2\r\n+a\r\n*1\r\n-ERR in there\r\n:3\r\n",
     [("*", False)]),
    ("exec", b"*3\r\n+OK\r\n-ERR wrong\r\n$-1\r\n", [("*", False)]),
    ("null", b"_\r\n", [("_", False)]),
    ("doubles", b",3.14\r\n,-inf\r\n,nan\r\n,1e10\r\n", [(",", False)] * 4),
    ("booleans", b"#t\r\n#f\r\n", [("#", False)] * 2),
    ("big number", b"(3492890328409238509324850943850943825024385\r\n(-1\r\n", [("(", False)] * 2),
    ("blob error", b"!21\r\nSYNTAX invalid syntax\r\n", [("!", True)]),
    ("verbatim string", b"=15\r\ntxt:Some string\r\n", [("=", False)]),
    ("map", b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", [("%", False)]),
    ("empty map", b"%0\r\n", [("%", False)]),
    ("set", b"~3\r\n+a\r\n+b\r\n_\r\n", [("~", False)]),
    ("attribute before a reply",
     b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
     b"*2\r\n:2039123\r\n:9543892\r\n", [("*", False)]),
    ("attribute before an error", b"|1\r\n+k\r\n+v\r\n-ERR x\r\n", [("-", True)]),
    ("attribute inside an array", b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n+OK\r\n",
     [("*", False), ("+", False)]),
    ("attribute inside an attribute", b"|1\r\n|1\r\n+a\r\n+b\r\n+k\r\n+v\r\n:1\r\n",
     [(":", False)]),
    ("empty attribute", b"|0\r\n+OK\r\n", [("+", False)]),
    ("push messages are skipped",
     b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n+OK\r\n>2\r\n+invalidate\r\n*-1\r\n:1\r\n",
     [("+", False), (":", False)]),
    ("attributed push", b"|1\r\n+a\r\n+b\r\n>1\r\n+x\r\n$-1\r\n", [("$", False)]),
    ("bare LF", b"+OK\n$2\nhi\n", [("+", False), ("$", False)]),
    ("nothing", b"", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in GOOD_REPLIES],
                         ids=[case[0] for case in GOOD_REPLIES])
def test_good_replies(stream, expected, split):
    assert replies(split(stream)) == (expected, None)


BAD_REPLIES = [
    (b"?\r\n", "unknown RESP type byte b'?'"),
    (b"\r\n", "unknown RESP type byte b''"),
    (b"OK\r\n", "unknown RESP type byte b'O'"),
    (b"$abc\r\n", "bad length b'$abc'"),
    (b"$-2\r\n", "bad length b'$-2'"),
    (b"*-2\r\n", "bad length b'*-2'"),
    (b"%-1\r\n", "bad length b'%-1'"),
    (b"!-1\r\n", "bad length b'!-1'"),
    (b"*?\r\n", "bad length b'*?'"),
    (b":12a\r\n", "bad ':' reply b':12a'"),
    (b"(\r\n", "bad '(' reply b'('"),
    (b"_x\r\n", "bad '_' reply b'_x'"),
    (b"#x\r\n", "bad '#' reply b'#x'"),
    (b"$2\r\nabc\r\n", "bulk string not followed by CRLF"),
    (b"*2\r\n+a\r\n\x00\r\n", "unknown RESP type byte b'\\x00'"),
    (b"+" + b"x" * MAX_LINE + b"\r\n", f"line over {MAX_LINE} bytes"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", BAD_REPLIES, ids=[m for _, m in BAD_REPLIES])
def test_bad_replies(stream, message, split):
    framer = ResponseFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
        for chunk in split(stream):
            feed(framer, chunk)


@pytest.mark.parametrize("stream", [
    b"+OK", b"$5\r\nhel", b"$5\r\nhello", b"*2\r\n:1\r\n", b"|1\r\n+a\r\n",
    b"*1\r\n|1\r\n+a\r\n+b\r\n",
])
def test_reply_cut_short(stream):
    framer = ResponseFramer()
    framer.feed(stream)
    with pytest.raises(ProtocolError, match="^connection closed in the middle of a reply$"):
        framer.close()


def test_close_between_replies():
    framer = ResponseFramer()
    assert framer.feed(b"+OK\r\n") == [("+", False)]
    assert framer.close() is None


def test_nesting_up_to_max_depth_is_followed():
    stream = b"*1\r\n" * (MAX_DEPTH // 2) + b"%1\r\n" * (MAX_DEPTH // 2) + b"+k\r\n" \
        + b":1\r\n" * (MAX_DEPTH // 2)
    assert replies([stream]) == ([("*", False)], None)
    assert replies(bytewise(stream)) == ([("*", False)], None)
    assert replies([b"*1\r\n" * MAX_DEPTH + b"+OK\r\n", b"+OK\r\n"]) == (
        [("*", False), ("+", False)], None)
    # Depth is how many aggregates are open at once, not how many a reply holds.
    wide = b"*%d\r\n" % 1000 + (b"*1\r\n" * (MAX_DEPTH - 1) + b":1\r\n") * 1000
    assert replies([wide]) == ([("*", False)], None)


@pytest.mark.parametrize("stream", [
    b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n",
    b"%1\r\n+k\r\n" * (MAX_DEPTH + 1) + b":1\r\n",
    b"~1\r\n" * MAX_DEPTH + b"|1\r\n+k\r\n+v\r\n:1\r\n",
    b">1\r\n" + b"*1\r\n" * MAX_DEPTH + b":1\r\n",
], ids=["arrays", "maps", "attribute and sets", "push"])
def test_nesting_deeper_than_max_depth_is_not_followed(stream):
    for split in (whole, bytewise):
        framer = ResponseFramer()
        message = f"^reply nested deeper than {MAX_DEPTH}$"
        with pytest.raises(ProtocolError, match=message) as raised:
            for chunk in split(stream):
                feed(framer, chunk)
        assert raised.value.completed == []


def test_a_reply_a_million_deep_costs_no_more_than_max_depth():
    """The issue's case (a reply nested 5M deep cost 10.7 s and 76 MiB): the framer
    gives up at MAX_DEPTH + 1, having held MAX_DEPTH counts, within its first chunk."""
    stream = b"*1\r\n" * 1_000_000 + b":1\r\n"
    chunks = [memoryview(stream)[at:at + 65536] for at in range(0, len(stream), 65536)]
    framer = ResponseFramer()
    framer.expect("EVAL")
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"^reply nested deeper than {MAX_DEPTH}$"):
            for chunk in chunks:
                framer.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunk is chunks[0]
    assert len(framer._counts) == MAX_DEPTH
    assert peak < 64 * 1024, peak


def test_huge_bulk_string_is_counted_not_parsed():
    framer = ResponseFramer()
    size = 10_000_000
    assert framer.feed(b"*2\r\n$%d\r\n" % size) is None
    chunk = memoryview(bytearray(b"+OK\r\n" * 50000))
    fed = 0
    while fed + len(chunk) < size:
        assert framer.feed(chunk) is None
        fed += len(chunk)
    assert framer.feed(chunk[:size - fed]) is None
    assert framer.feed(b"\r\n:1\r\n+OK\r\n") == [("*", False), ("+", False)]


# --- big aggregates of small elements (the fast path) ---------------------------------

SMALL_ELEMENTS = st.one_of(
    st.binary(max_size=120).map(bulk),   # both sides of the 99-byte fast-path bound
    st.sampled_from([b"$-1\r\n", b"_\r\n", b":0\r\n", b":-17\r\n", b"+OK\r\n",
                     b",3.14\r\n", b"$03\r\nabc\r\n", b"$2\nab\r\n", b"$1\r\na\n",
                     b"+" + b"x" * 150 + b"\r\n", b":" + b"9" * 30 + b"\r\n",
                     b"*2\r\n$1\r\na\r\n:1\r\n", b"%1\r\n+k\r\n$1\r\nv\r\n",
                     b"|1\r\n+a\r\n+b\r\n$1\r\nx\r\n", b"-ERR x\r\n"]))


def ends_of(chunks) -> list:
    """Where each reply ends (the capture's view), as offsets in the whole stream."""
    framer = ResponseFramer()
    framer.ends = []
    ends, offset = [], 0
    try:
        for chunk in chunks:
            framer.ends.clear()
            feed(framer, chunk)
            ends += [offset + end for end in framer.ends]
            offset += len(chunk)
    except ProtocolError as error:
        ends += [offset + end for end in framer.ends]
        return ends + [str(error)]
    return ends


@FAST
@given(st.data())
def test_big_aggregates_of_small_elements(data):
    """Arrays, sets and maps of hundreds of small elements (LRANGE, SMEMBERS, HGETALL)
    frame exactly as byte by byte, where no run of elements can be matched at once:
    the same replies, ending at the same offsets, the same errors."""
    replies_ = []
    for _ in range(data.draw(st.integers(1, 3))):
        elements = data.draw(st.lists(SMALL_ELEMENTS, min_size=1, max_size=600))
        kind = data.draw(st.sampled_from([b"*", b"~", b"%"]))
        if kind == b"%" and len(elements) % 2:
            elements.append(b":1\r\n")
        count = len(elements) // 2 if kind == b"%" else len(elements)
        replies_.append(kind + b"%d\r\n" % count + b"".join(elements))
    stream = b"".join(replies_) + b"+OK\r\n"
    if data.draw(st.booleans()):
        stream = data.draw(mutated(stream))
    slow = replies(bytewise(stream))
    assert replies(whole(stream)) == slow
    assert replies(data.draw(splits(stream))) == slow
    assert ends_of(whole(stream)) == ends_of(bytewise(stream))


def test_an_lrange_of_a_million_is_framed():
    values = [b"v%d" % i for i in range(1_000_000)]
    stream = b"*%d\r\n" % len(values) + b"".join(bulk(value) for value in values) + b"+OK\r\n"
    chunks = [stream[at:at + 65536] for at in range(0, len(stream), 65536)]
    assert replies(chunks) == ([("*", False), ("+", False)], None)
    assert replies(chunks[:-1]) == ([], "ProtocolError")  # cut short: close() says so


@pytest.mark.parametrize("requests, stream, completed", [
    (["SUBSCRIBE"], b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n*3\r\n$7\r\nmessage\r\n",
     [("*", False)]),
    (["GET", "PSUBSCRIBE"], b"$-1\r\n*3\r\n$10\r\npsubscribe\r\n$2\r\nc*\r\n:1\r\n",
     [("$", False), ("*", False)]),
    (["SUBSCRIBE"], b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",  # RESP3: a push
     [(">", False)]),
    (["MONITOR"], b"+OK\r\n+1339518083.107412 [0 127.0.0.1:60866] \"keys\" \"*\"\r\n",
     [("+", False)]),
])
def test_leaving_request_reply(requests, stream, completed):
    for split in (whole, bytewise):
        assert replies(split(stream), requests) == (completed, "Upgraded")


def test_refused_subscribe_stays_request_reply():
    assert replies([b"-ERR wrong number of arguments\r\n+PONG\r\n"], ["SUBSCRIBE", "PING"]) == (
        [("-", True), ("+", False)], None)


# --- generated streams ------------------------------------------------------------------

NAMES = st.sampled_from([b"get", b"SET", b"Ping", b"hGetAll", b"client", b"x"])
WORDS = st.lists(st.sampled_from([b"k", b"value", b"0", b"-1", b"\xe9", b"a:b"]), max_size=3)
BLOBS = st.binary(max_size=40) | st.sampled_from([b"\r\n", b"+OK\r\n", b"*1\r\n$4\r\nPING\r\n"])
EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def command(draw) -> tuple[bytes, list]:
    """One command as a client sends it, and the name it completes (none for no-ops)."""
    kind = draw(st.sampled_from(["array", "array", "inline", "nothing"]))
    if kind == "nothing":
        return draw(st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b" \n"])), []
    name = draw(NAMES)
    if kind == "inline":
        return b" ".join([name] + draw(WORDS)) + draw(EOL), [name.decode().upper()]
    args = [name] + draw(st.lists(BLOBS, max_size=3))
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args), [name.decode().upper()]


@st.composite
def command_stream(draw) -> tuple[bytes, list]:
    stream, names = b"", []
    for data, name in draw(st.lists(command(), max_size=5)):
        stream += data
        names += name
    return stream, names


# Replies are built from a flat list of small integers (cheap to draw, quick to shrink):
# a code below len(LEAVES) is that leaf; above, an aggregate header (kind and size).
LEAVES = [
    (b"+OK\r\n", "+"), (b"+\r\n", "+"), (b"-ERR x\r\n", "-"), (b":-12\r\n", ":"),
    (b"$-1\r\n", "$"), (bulk(b""), "$"), (bulk(b"+OK\r\n*1\r\n"), "$"),
    (bulk(b"\r\n\x00\xff"), "$"),
    (b"*-1\r\n", "*"), (b"_\r\n", "_"), (b",-1.5e3\r\n", ","), (b"#f\r\n", "#"),
    (b"(-1234567890123456789012\r\n", "("), (bulk(b"SYNTAX x", b"!"), "!"),
    (bulk(b"txt:a\r\nb", b"="), "="),
]
AGGREGATES = [b"*", b"~", b"%", b"|", b">"]  # "%" and "|" count pairs; ">" only at top level
MAX_SIZE = 4
CODES = st.lists(st.integers(0, len(LEAVES) + len(AGGREGATES) * MAX_SIZE - 1), max_size=40)


def resp_value(codes: list, top: bool, depth: int = 0) -> tuple[bytes, str]:
    """Encode one value (attributes included) from `codes`, consumed from the end."""
    code = codes.pop() if codes else 0
    if code < len(LEAVES) or depth > 6:
        return LEAVES[code % len(LEAVES)]
    kind, size = divmod(code - len(LEAVES), MAX_SIZE)
    kind = AGGREGATES[kind]
    if kind == b">" and not top:
        kind = b"*"
    count = size * 2 if kind in (b"%", b"|") else size
    data = kind + b"%d\r\n" % size
    for _ in range(count):
        data += resp_value(codes, False, depth + 1)[0]
    if kind == b"|":
        value, value_kind = resp_value(codes, top, depth + 1)  # what the attribute annotates
        return data + value, value_kind
    return data, kind.decode()


def reply_stream(codes: list) -> tuple[bytes, list]:
    """Replies and pushes, and the (type, is_error) each reply completes."""
    codes = codes[::-1]
    stream, expected = b"", []
    while codes:
        data, kind = resp_value(codes, True)
        stream += data
        if kind != ">":
            expected.append((kind, kind in "-!"))
    return stream, expected


def test_reply_stream_generator():
    """The generator itself, on a known input: [|1 + (- :) *2 (>0 -> *0) $-1], >1 +OK, +OK."""
    codes = [len(LEAVES) + 3 * MAX_SIZE + 1, 2, 3, len(LEAVES) + 2, len(LEAVES) + 4 * MAX_SIZE,
             4, len(LEAVES) + 4 * MAX_SIZE + 1, 0, 0]
    assert reply_stream(codes) == (
        b"|1\r\n-ERR x\r\n:-12\r\n*2\r\n*0\r\n$-1\r\n>1\r\n+OK\r\n+OK\r\n",
        [("*", False), ("+", False)])


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
                [b"\r\n", b"\n", b"*1\r\n", b"$", b"|1\r\n", b">1\r\n", b"0"]))
        elif at < len(data):
            if what == "flip":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at:at + draw(st.integers(1, 4))]
    return bytes(data)


@FAST
@given(st.data())
def test_generated_commands(data):
    """Valid pipelines yield exactly their command names, however they are split; the
    same streams with a few bytes mangled yield the same result whole as split."""
    stream, names = data.draw(command_stream())
    assert commands(whole(stream)) == (names, None)
    assert commands(data.draw(splits(stream))) == (names, None)
    garbage = data.draw(mutated(stream))
    assert commands(data.draw(splits(garbage))) == commands(whole(garbage))


@FAST
@given(st.data())
def test_generated_replies(data):
    """Valid replies (nested, attributed, with pushes) yield exactly their types, however
    they are split; mangled ones yield the same result whole as split."""
    stream, expected = reply_stream(data.draw(CODES))
    assert replies(whole(stream)) == (expected, None)
    assert replies(data.draw(splits(stream))) == (expected, None)
    garbage = data.draw(mutated(stream))
    assert replies(data.draw(splits(garbage))) == replies(whole(garbage))


@FAST
@given(st.binary(max_size=300), st.data())
def test_random_bytes_raise_only_protocol_errors(stream, data):
    # commands() and replies() let anything but ProtocolError and Upgraded through
    commands(data.draw(splits(stream)))
    commands(data.draw(splits(b"*3\r\n$3\r\nSET\r\n" + stream)))
    requests = data.draw(st.lists(st.sampled_from(["GET", "SUBSCRIBE", "MONITOR"]), max_size=3))
    replies(data.draw(splits(stream)), requests)
    replies(data.draw(splits(b"*2\r\n|1\r\n" + stream)), requests)


def test_close_after_whole_replies_completes_nothing():
    framer = ResponseFramer()
    framer.expect("GET")
    assert feed(framer, b"+OK\r\n") == [("+", False)]
    assert framer.close() is None


@pytest.mark.parametrize("requests, reply", [
    (["SET"], b"+OK\r\n"), (["GET"], b"-ERR wrong type\r\n"), (["INCR"], b":-12\r\n"),
    (["GET"], b"$3\r\nxxx\r\n"), (["GET"], b"$0\r\n\r\n"), (["GET"], b"$-1\r\n"),
    (["GET"], b"$5\r\na\r\nb\r\n\r\n"),           # CRLF inside the value
    (["GET"], b"$4\r\nxxx\r\n"),                  # shorter than its length: not whole
    (["GET"], b"+OK\r\n+OK\r\n"),                 # two replies
    (["MONITOR"], b"+OK\r\n"), (["SUBSCRIBE"], b"-ERR no\r\n"),
    ([], b"+PONG\r\n"), (["GET"], b"+a\rb\r\n"), (["GET"], b":" + b"9" * 19 + b"\r\n"),
])
def test_a_whole_short_reply_in_one_chunk_frames_as_line_by_line(requests, reply):
    """The one-step path for a short reply in one chunk gives what feeding it byte by
    byte gives (which never takes that path), ends and errors included."""
    whole_way, byte_way, _ = framed_both_ways(requests, reply)
    assert whole_way == byte_way


@pytest.mark.parametrize("stream", [
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nxxx\r\n" * 3,
    b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n",        # CRLF inside an argument
    b"*2\r\n$03\r\nGET\r\n$1\r\nk\r\n",           # a leading zero
    b"*1\r\n$2\r\nxyz\r\n",                        # no CRLF after the contents
    b"*1\r\n$2\r\nxy\r\n*1\r\n$4\r\nPI",           # the second cut short
    b"*2\r\n$3\r\nGET\r\n:1\r\n", b"*1\r\n+PING\r\n", b"*0\r\n*1\r\n$4\r\nPING\r\n",
    b"*1\r\n$" + b"9" * 19 + b"\r\n", b"*1\r\n$-1\r\n",
])
def test_whole_commands_in_one_chunk_frame_as_line_by_line(stream):
    """The one-pass path for whole commands in one chunk gives what feeding them byte
    by byte gives (which never takes that path), ends, starts and errors included."""
    results = []
    for split in (whole, bytewise):
        framer = RequestFramer()
        framer.ends, framer.starts = [], []
        items, error = run(framer, split(stream))
        results.append((items, error, framer.in_message))
    assert results[0] == results[1]


def _array(*elements: bytes) -> bytes:
    return b"*%d\r\n" % len(elements) + b"".join(bulk(element) for element in elements)


@pytest.mark.parametrize("requests, stream", [
    (["LRANGE"], _array(*[b"xxx"] * 100)),
    (["LRANGE"], _array(b"")), (["LRANGE"], _array(b"a" * 1000, b"b" * 1000)),
    (["LRANGE"], _array(b"$3\r\nxxx", b"\r\n*1\r\n$3", b"\r\n\r\n\r\n\r")),  # framing inside
    (["LRANGE"], _array(b"abc", b"de")),                # another length
    (["LRANGE"], _array(b"abc", b"def")[:-2] + b"\n\n"),  # no CRLF after the last
    (["LRANGE"], b"*2\r\n$03\r\nabc\r\n$03\r\ndef\r\n"),  # leading zeros
    (["LRANGE"], b"*02\r\n" + bulk(b"abc") * 2),
    (["LRANGE"], b"*3\r\n" + bulk(b"abc") * 2),         # fewer elements than counted
    (["LRANGE"], b"*1\r\n" + bulk(b"abc") * 2),         # more: a reply after it
    (["LRANGE", "GET"], _array(b"abc", b"def") + bulk(b"ghi")),
    (["LRANGE"], b"*2\r\n$3\r\nabc\r\n$3\r\nde\r\n\r\n"),  # a CRLF where contents go
    (["SUBSCRIBE"], _array(b"subscribe", b"ch")), ([], _array(b"x")),
    (["LRANGE"], b"*2\r\n$1\r\na\r\n:1\r\n"), (["HGETALL"], b"*2\r\n$-1\r\n$-1\r\n"),
])
def test_an_array_of_bulk_strings_of_one_length_frames_as_line_by_line(requests, stream):
    """The few-slices path for an array of bulk strings of one length in one chunk
    gives what feeding it byte by byte gives (which never takes that path)."""
    whole_way, byte_way, ends = framed_both_ways(requests, stream)
    assert whole_way == byte_way
    if whole_way[:2] == ([("*", False)], None):
        assert ends == [len(stream)]


@FAST
@given(st.integers(1, 20), st.integers(0, 12), st.data())
def test_generated_arrays_of_one_length_frame_as_line_by_line(count, size, data):
    """Arrays of bulk strings of one length, valid and mangled, whole: as byte by byte."""
    elements = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(count)]
    valid = _array(*elements)
    for stream in (valid, data.draw(mutated(valid))):
        assert replies(whole(stream), ["LRANGE"]) == replies(bytewise(stream), ["LRANGE"])
    assert replies(whole(valid), ["LRANGE"]) == ([("*", False)], None)


@pytest.mark.parametrize("stream", [
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nxxx\r\n" * 16,
    b"*1\r\n$3\r\nG\rT\r\n",                             # a CR in the name
    b"*1\r\n$70\r\n" + b"N" * 70 + b"\r\n",              # a name past NAME_MAX
    b"*10\r\n" + b"$1\r\nx\r\n" * 10,                    # more arguments than 9
    b"*2\r\n$3\r\nSET\r\n$100\r\n" + b"v" * 100 + b"\r\n",  # an argument of 100 bytes
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nxyz",  # garbage after
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",  # inline
    b"*2\r\n$3\r\nGET\r\n$2\r\n*2\r\n",                  # an argument that looks like a command
    b"*1\r\n$0\r\n\r\n" * 2,                            # empty names
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$0\r\n\r\n*1\r\n$4\r\nPING\r\n",
    b"*1\r\n$0\r\n\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$150\r\n",  # cut short
    b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nSET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n",  # too few
])
@pytest.mark.parametrize("positions", [True, False])
def test_the_most_common_commands_in_one_chunk_frame_as_line_by_line(stream, positions):
    """The one-regular-expression path (commands of up to 9 arguments of up to 99
    bytes) gives what feeding byte by byte gives, ends and starts included (framed
    with them and without)."""
    results = []
    for split in (whole, bytewise):
        framer = RequestFramer()
        if positions:
            framer.ends, framer.starts = [], []
        items, error = run(framer, split(stream))
        results.append((items, error, framer.in_message,
                        framer.ends if split is whole else None,
                        framer.starts if split is whole else None))
    assert results[0][:3] == results[1][:3]
    if positions and results[0][1] is None and stream.startswith(b"*3"):
        assert results[0][3] == [29 * i for i in range(1, 17)]
        assert results[0][4] == [29 * i + 4 for i in range(16)]


def test_a_command_with_an_empty_name_does_not_let_garbage_pass_later():
    """The one-expression path takes a chunk as whole commands when every name it
    finds is known; what is not a command is found as an empty name, so an empty name
    framed earlier must not become a known one."""
    for framer in (RequestFramer(), new_request_framer("redis")):  # with hiredis's too
        assert framer.feed(b"*1\r\n$0\r\n\r\n" * 2) == ["", ""]
        with pytest.raises(ProtocolError):
            framer.feed(b"*1\r\n$3\r\nGET\r\n*1\r\n$2\r\nxyz\r\n")


def _short_replies_both_ways(requests, stream: bytes) -> tuple:
    """`stream` fed to a fresh framer expecting `requests` (no offsets wanted), whole
    and byte by byte: (replies, error, replies still expected) each way."""
    results = []
    for split in (whole, bytewise):
        framer = ResponseFramer()
        for request in requests:
            framer.expect(request)
        items, error = run(framer, split(stream))
        results.append((items, error, len(framer._pending)))
    return results


@pytest.mark.parametrize("requests, stream", [
    (["SET"] * 16, b"+OK\r\n" * 16),
    (["GET"] * 16, b"$3\r\nxxx\r\n" * 16),
    (["SET", "INCR", "GET", "GET", "DEL"],
     b"+OK\r\n-ERR value is not an integer\r\n$-1\r\n$0\r\n\r\n:1\r\n"),
    (["GET"] * 3, b"$4\r\n\r\n\r\n\r\n$2\r\n+O\r\n:-12\r\n"),    # framing in the contents
    (["GET"] * 2, b"+OK\r\n+OK\r\n+OK\r\n"),                     # more replies than asked
    ([], b"+OK\r\n:1\r\n"),
    (["GET", "SUBSCRIBE", "GET"], b"+OK\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n+OK\r\n"),
    (["GET", "MONITOR", "GET"], b"+OK\r\n+OK\r\n+OK\r\n"),       # leaves request-reply
    (["GET", "SUBSCRIBE"], b"+OK\r\n-ERR no\r\n"),               # a refused SUBSCRIBE stays
    (["GET"] * 2, b"+OK\r\n+OK\r"), (["GET"] * 2, b"+OK\r\n$3\r\nxx\r\n"),  # cut short, too short
    (["GET"] * 2, b"+OK\r\n$100\r\n" + b"v" * 100 + b"\r\n"),   # a bulk string of 100 bytes
    (["GET"] * 2, b"+OK\r\n:0x1\r\n"), (["GET"] * 2, b"+OK\n+OK\n"),  # bad integer, bare LF
    (["GET"] * 2, b"+O\rK\r\n+OK\r\n"), (["GET"] * 2, b"+OK\r\n_\r\n"),  # a CR, RESP3's null
    (["GET"] * 2, b":1\r\n$03\r\nabc\r\n"), (["GET"] * 2, b":1\r\n|1\r\n+a\r\n+b\r\n+OK\r\n"),
])
def test_short_replies_in_one_chunk_frame_as_line_by_line(requests, stream):
    """The one-expression path for a chunk of short replies (a pipeline's answers)
    gives what feeding them byte by byte gives (which never takes that path)."""
    whole_way, byte_way = _short_replies_both_ways(requests, stream)
    assert whole_way == byte_way


# Mostly a line's text, sometimes with a CR or LF in it.
_LINE_TEXT = (st.binary(max_size=20).map(lambda text: text.replace(b"\r", b"").replace(b"\n", b""))
              | st.binary(max_size=5))
SHORT_REPLY = st.one_of(
    st.builds(lambda text: b"+" + text + b"\r\n", _LINE_TEXT),
    st.builds(lambda text: b"-ERR " + text + b"\r\n", _LINE_TEXT),
    st.builds(lambda number: b":%d\r\n" % number, st.integers(-10**18, 10**18)),
    st.builds(lambda data: bulk(data), st.binary(max_size=120)),
    st.just(b"$-1\r\n"))


@FAST
@given(st.lists(SHORT_REPLY, min_size=1, max_size=20), st.data())
def test_generated_short_replies_in_one_chunk_frame_as_line_by_line(parts, data):
    """Runs of short replies, valid and mangled, answering requests that may leave
    request-reply, whole in one chunk: as byte by byte."""
    requests = data.draw(st.lists(st.sampled_from(["GET", "SET", "SUBSCRIBE", "MONITOR"]),
                                  max_size=len(parts) + 1))
    valid = b"".join(parts)
    for stream in (valid, data.draw(mutated(valid))):
        whole_way, byte_way = _short_replies_both_ways(requests, stream)
        assert whole_way == byte_way


@pytest.mark.parametrize("requests, stream", [
    (["INCR"] * 21, b"".join(b":%d\r\n" % number for number in range(-10, 11))),
    (["GET"] * 5, b"$3\r\nabc\r\n$-1\r\n$0\r\n\r\n$2\r\n\r\n\r\n$99\r\n" + b"v" * 99 + b"\r\n"),
    (["SET"] * 15, b"+OK\r\n" * 16), (["SET"] * 17, b"+OK\r\n" * 16),  # one more, one fewer
    (["SET"] * 7 + ["SUBSCRIBE"] + ["SET"] * 8, b"+OK\r\n" * 16),
    (["MONITOR", "GET"], b"+OK\r\n+OK\r\n"),
    (["GET"] * 4, b"$3\r\nabc\r\n" * 3 + b"$100\r\n" + b"v" * 100 + b"\r\n"),
    (["GET"] * 4, b"$3\r\nabc\r\n" * 3 + b"+OK\r\n"), (["SET"] * 4, b"+OK\r\n" * 3 + b"-ERR\r\n"),
    (["SET"] * 2, b"+OK\r\n+OK"), (["SET"] * 2, b"+OK\r\n+OK\r\n\r\n"),
])
def test_answers_of_one_type_in_one_chunk_frame_as_line_by_line(requests, stream):
    """The few-matches path for a chunk answering every request expected with replies
    of one type, none an error, gives what feeding them byte by byte gives."""
    whole_way, byte_way = _short_replies_both_ways(requests, stream)
    assert whole_way == byte_way


@FAST
@given(st.sampled_from([b"+", b":", b"$"]), st.integers(1, 40), st.data())
def test_generated_answers_of_one_type_frame_as_line_by_line(kind, count, data):
    """Runs of replies of one type answering as many requests (some of which may leave
    request-reply), valid and mangled, whole in one chunk: as byte by byte."""
    one = {b"+": SHORT_REPLY.filter(lambda reply: reply[:1] == b"+"),
           b":": st.builds(lambda number: b":%d\r\n" % number, st.integers(-10**18, 10**18)),
           b"$": st.builds(lambda data: bulk(data), st.binary(max_size=100)) | st.just(b"$-1\r\n")}
    valid = b"".join(data.draw(one[kind]) for _ in range(count))
    requests = ["GET"] * count
    if data.draw(st.booleans()):
        requests[data.draw(st.integers(0, count - 1))] = data.draw(
            st.sampled_from(["SUBSCRIBE", "MONITOR"]))
    for stream in (valid, data.draw(mutated(valid))):
        whole_way, byte_way = _short_replies_both_ways(requests, stream)
        assert whole_way == byte_way
