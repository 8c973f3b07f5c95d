"""protocols/beanstalkd.py: command and reply framing, by example, by property, and
against a real beanstalkd.

Every stream goes through the framers and readers the way the relay hands it over: as
memoryviews of a buffer that is overwritten as soon as feed() returns.
"""
import os
import re
import shutil
import signal
import socket
import subprocess

import pytest
from backends import unused_port, wait_until
from framing import FAST, bytewise, feed, run, whole
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.protocols import ProtocolError
from gproxyd.protocols.beanstalkd import (
    MAX_JOB_SIZE,
    MAX_LINE,
    MAX_REPLY_LINE,
    Command,
    CommandReader,
    ReplyReader,
    RequestFramer,
    ResponseFramer,
    put_args,
)


def commands(chunks) -> tuple[list, str | None]:
    return run(RequestFramer(), chunks)


def replies(chunks) -> tuple[list, str | None]:
    """Replies, closing the connection at the end."""
    return run(ResponseFramer(), chunks, close=True)


def ends(framer, chunks) -> list:
    """Where, in the whole stream, the framer says messages end (up to where it stops)."""
    framer.ends = []
    found, offset = [], 0
    try:
        for chunk in chunks:
            feed(framer, chunk)
            found += [offset + end for end in framer.ends]
            framer.ends.clear()
            offset += len(chunk)
    except ProtocolError:
        found += [offset + end for end in framer.ends]
    return found


def raw(item) -> bytes:
    return item.raw if isinstance(item, Command) else item


def outcome(reader, chunks) -> tuple[list, bytes, bytes]:
    """(the messages a CommandReader or ReplyReader reads from `chunks`, fed as the relay
    does; all the bytes it passes through; what it still holds), checking that nothing
    was lost, reordered or returned out of place."""
    messages, passed = [], []
    for chunk in chunks:
        buf = bytearray(chunk)
        view = memoryview(buf)
        before = reader.passthrough
        got = reader.feed(view)
        view[:] = b"\xa5" * len(buf)  # nothing of it may be kept by reference
        assert isinstance(got, list)
        if before:
            assert got == ([chunk] if chunk else [])
            passed += got
        elif reader.passthrough:  # given up in this call: the rest is the last item
            messages += got[:-1]
            passed += got[-1:]
        else:
            messages += got
    kind = Command if isinstance(reader, CommandReader) else bytes
    assert all(type(message) is kind for message in messages)
    assert all(type(item) is bytes and item for item in passed)
    assert bool(passed) == reader.passthrough
    assert b"".join(raw(m) for m in messages + passed) + reader.pending == b"".join(chunks)
    return messages, b"".join(passed), reader.pending


def put(body: bytes, head: bytes = b"put 0 0 60") -> bytes:
    return head + b" %d\r\n" % len(body) + body + b"\r\n"


def job(word: bytes, body: bytes) -> bytes:
    """A reply carrying data: RESERVED/FOUND <id> <bytes>, or OK <bytes>."""
    head = word if word == b"OK" else word + b" 7"
    return head + b" %d\r\n" % len(body) + body + b"\r\n"


@st.composite
def splits(draw, data: bytes) -> list:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]


# --- commands, by example ---------------------------------------------------------------

GOOD_COMMANDS = [
    ("one line", b"reserve\r\n", ["reserve"]),
    ("pipeline", b"use t\r\n" + put(b"hello") + b"watch t\r\nreserve\r\ndelete 1\r\n",
     ["use", "put", "watch", "reserve", "delete"]),
    ("body holding CRLF and commands", put(b"reserve\r\nquit\r\n") + put(b"\r\n") + b"stats\r\n",
     ["put", "put", "stats"]),
    ("empty body", b"put 0 0 1 0\r\n\r\nstats\r\n", ["put", "stats"]),
    ("spaces, leading zeros, ttr 0", b"put  00 0  0   0003\r\nabc\r\n", ["put"]),
    ("largest values", b"put 4294967295 4294967295 4294967295 3\r\nabc\r\n", ["put"]),
    ("empty line", b"\r\n", [""]),
    ("unknown, no body", b"PUT 0 0 1 3\r\nput\r\nputx 1 2 3 4\r\n foo\r\n",
     ["PUT", "put", "putx", ""]),
    ("longest line", b"x" * (MAX_LINE - 2) + b"\r\n", ["x" * (MAX_LINE - 2)]),
    ("incomplete body", b"put 0 0 1 5\r\nhel", []),
    ("incomplete line", b"reser", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in GOOD_COMMANDS],
                         ids=[case[0] for case in GOOD_COMMANDS])
def test_good_commands(stream, expected, split):
    assert commands(split(stream)) == (expected, None)
    messages, passed, _ = outcome(CommandReader(), split(stream))
    assert ([command.name for command in messages], passed) == (expected, b"")


BAD_COMMANDS = [
    (b"x" * (MAX_LINE - 1) + b"\r\n", "line over 224 bytes"),
    (b"use " + b"a" * 300, "line over 224 bytes"),
    (b"foo\rbar\r\n", "CR not followed by LF"),
    (b"reserve\r\r\n", "CR not followed by LF"),
    (b"use a\nb\r\n", "bad command line b'use a\\nb'"),
    (b"list-tubes\x00\r\n", "bad command line b'list-tubes\\x00'"),
    (b"use \xe9\r\n", "bad command line b'use \\xe9'"),
    (b"put 0 0 1\r\n", "bad put line b'put 0 0 1'"),
    (b"put 0 0 1 3x\r\nabc\r\n", "bad put line b'put 0 0 1 3x'"),
    (b"put 0 0 1 3 \r\nabc\r\n", "bad put line b'put 0 0 1 3 '"),
    (b"put 4294967296 0 1 3\r\nabc\r\n", "bad put line b'put 4294967296 0 1 3'"),
    (b"put 0 0 1 +3\r\nabc\r\n", "bad put line b'put 0 0 1 +3'"),
    (b"put 0 0 1 -3\r\nabc\r\n", "bad put line b'put 0 0 1 -3'"),
    (b"put 0 0 1 3\r\nabcd\r\n", "job body not followed by CRLF"),
    (b"put 0 0 1 3\r\nabc\n", "job body not followed by CRLF"),
    (b"put 0 0 1 3\r\nabc\r\r", "job body not followed by CRLF"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", BAD_COMMANDS, ids=[m for _, m in BAD_COMMANDS])
def test_bad_commands(stream, message, split):
    framer = RequestFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
        for chunk in split(stream):
            feed(framer, chunk)
    with pytest.raises(ProtocolError, match="^framer used after it stopped$"):
        framer.feed(b"stats\r\n")


def test_commands_completed_before_garbage_ride_on_the_error():
    with pytest.raises(ProtocolError) as raised:
        RequestFramer().feed(b"use t\r\n" + put(b"x") + b"put 0 0 1\r\n")
    assert raised.value.completed == ["use", "put"]


def test_line_at_the_limit():
    line = b"x" * (MAX_LINE - 2) + b"\r\n"
    for cut in range(len(line) + 1):
        assert commands([line[:cut], line[cut:]]) == (["x" * (MAX_LINE - 2)], None)
    longer = b"x" + line
    for cut in range(len(longer) + 1):
        assert commands([longer[:cut], longer[cut:]]) == ([], "ProtocolError")


def test_current_and_in_message():
    framer = RequestFramer()
    assert (framer.current, framer.in_message) == (None, False)
    assert framer.feed(b"res") is None
    assert (framer.current, framer.in_message) == (None, True)
    assert framer.feed(b"erve\r\nput 0 0 1 3") == ["reserve"]
    assert (framer.current, framer.in_message) == (None, True)
    assert framer.feed(b"\r\nab") is None
    assert (framer.current, framer.in_message) == ("put", True)
    assert framer.feed(b"c\r") is None
    assert (framer.current, framer.in_message) == ("put", True)
    assert framer.feed(b"\n") == ["put"]
    assert (framer.current, framer.in_message) == (None, False)


def test_huge_body_is_counted_not_parsed():
    framer = RequestFramer()
    size = 10_000_000
    assert framer.feed(b"put 0 0 1 %d\r\n" % size) is None
    chunk = memoryview(bytearray(b"reserve\r\n" * 10000))
    fed = 0
    while fed + len(chunk) < size:
        assert framer.feed(chunk) is None
        fed += len(chunk)
    assert framer.feed(chunk[:size - fed]) is None
    assert framer.feed(b"\r\nstats\r\n") == ["put", "stats"]


@pytest.mark.parametrize("line, args", [
    (b"put 1 2 3 4", (1, 2, 3, 4)),
    (b"put 1 2 3 4\r\n", (1, 2, 3, 4)),
    (b"put  001 2   3 0", (1, 2, 3, 0)),
    (b"put 4294967295 4294967295 0 4294967295", (2**32 - 1, 2**32 - 1, 0, 2**32 - 1)),
    (b"put 4294967296 0 0 1", None),
    (b"put 0 0 0 4294967296", None),
    (b"put 0 0 0 " + b"9" * 30, None),
    (b"put 1 2 3", None),
    (b"put 1 2 3 4 5", None),
    (b"put 1 2 3 4 ", None),
    (b"put 1 2 3 4x", None),
    (b"put 1\t2 3 4", None),
    (b"put 1 2 3 -4", None),
    (b"put 1 2 3 +4", None),
    (b"put 1 2 3 0x4", None),
    (b"Put 1 2 3 4", None),
    (b" put 1 2 3 4", None),
    (b"put1 2 3 4", None),
    (b"reserve", None),
    (b"put 1 2 3 4\r\nbody", None),
])
def test_put_args(line, args):
    assert put_args(line) == args


def test_put_args_of_a_command():
    command, = CommandReader().feed(b"put 5 6 7 2\r\n\r\n\r\n")
    assert command == Command("put", ["5", "6", "7", "2"], b"put 5 6 7 2\r\n\r\n\r\n", b"\r\n")
    assert put_args(command) == (5, 6, 7, 2)
    assert put_args(Command("use", ["t"], b"use t\r\n")) is None


# --- CommandReader, by example ----------------------------------------------------------

def test_reader_keeps_pipelined_commands_whole():
    stream = b"use jobs\r\n" + put(b"a\r\nb") + b"watch  jobs\r\nreserve\r\n" + put(b"")
    expected = [
        Command("use", ["jobs"], b"use jobs\r\n"),
        Command("put", ["0", "0", "60", "4"], b"put 0 0 60 4\r\na\r\nb\r\n", b"a\r\nb"),
        Command("watch", ["jobs"], b"watch  jobs\r\n"),
        Command("reserve", [], b"reserve\r\n"),
        Command("put", ["0", "0", "60", "0"], b"put 0 0 60 0\r\n\r\n", b""),
    ]
    for split in (whole, bytewise):
        assert outcome(CommandReader(), split(stream)) == (expected, b"", b"")


def test_reader_holds_an_incomplete_command():
    reader = CommandReader()
    assert reader.feed(b"use t\r\nput 0 0 1 5\r\nhel") == [Command("use", ["t"], b"use t\r\n")]
    assert reader.pending == b"put 0 0 1 5\r\nhel"
    assert reader.feed(b"lo\r") == []
    assert reader.feed(b"\nres") == [
        Command("put", ["0", "0", "1", "5"], b"put 0 0 1 5\r\nhello\r\n", b"hello")]
    assert reader.pending == b"res"
    assert not reader.passthrough


READER_GIVES_UP = [
    ("line over 224 bytes", b"use " + b"a" * 300 + b"\r\nstats\r\n"),
    ("224 bytes without CRLF", b"x" * (MAX_LINE - 1)),
    ("CRLF past 224 bytes", b"x" * (MAX_LINE - 1) + b"\r\nstats\r\n"),
    ("CR without LF", b"foo\rbar\r\nstats\r\n"),
    ("put without arguments", b"put \r\nstats\r\n"),
    ("put with too few arguments", b"put 0 0 1\r\nab\r\n"),
    ("put with trailing garbage", b"put 0 0 1 2x\r\nab\r\n"),
    ("put with a trailing space", b"put 0 0 1 2 \r\nab\r\n"),
    ("put with pri 2**32", b"put 4294967296 0 1 2\r\nab\r\n"),
    ("put with a signed size", b"put 0 0 1 +2\r\nab\r\n"),
    ("put over max_body", b"put 0 0 1 %d\r\n" % (MAX_JOB_SIZE + 1)),
    ("body without CRLF", b"put 0 0 1 3\r\nabcd\r\nstats\r\n"),
    ("body with LF only", b"put 0 0 1 3\r\nabc\nstats\r\n"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream", [case[1] for case in READER_GIVES_UP],
                         ids=[case[0] for case in READER_GIVES_UP])
def test_reader_passes_through_what_it_cannot_follow(stream, split):
    before = b"use t\r\n" + put(b"job")
    reader = CommandReader()
    messages, passed, pending = outcome(reader, split(before + stream))
    assert [command.name for command in messages] == ["use", "put"]
    assert (passed, pending, reader.passthrough) == (stream, b"", True)
    # From then on every chunk goes through as it is.
    assert reader.feed(memoryview(b"reserve\r\n")) == [b"reserve\r\n"]
    assert reader.feed(b"") == []


def test_reader_max_body():
    assert outcome(CommandReader(max_body=3), [put(b"abc")])[:2] == (
        [Command("put", ["0", "0", "60", "3"], put(b"abc"), b"abc")], b"")
    assert outcome(CommandReader(max_body=2), [put(b"abc")])[:2] == ([], put(b"abc"))
    largest = put(b"x" * MAX_JOB_SIZE)
    assert outcome(CommandReader(), [largest])[0][0].body == b"x" * MAX_JOB_SIZE


def test_reader_does_not_judge_other_commands():
    """beanstalkd answers each of these lines once (UNKNOWN_COMMAND, BAD_FORMAT)."""
    stream = b"\r\nuse a\nb\r\nlist-tubes\x00\r\nfrob \xe9  x\r\nput\r\n"
    messages, passed, _ = outcome(CommandReader(), [stream])
    assert [(c.name, c.args) for c in messages] == [
        ("", []), ("use", ["a\nb"]), ("list-tubes\x00", []), ("frob", ["\xe9", "x"]),
        ("put", [])]
    assert passed == b""


# --- replies, by example ----------------------------------------------------------------

GOOD_REPLIES = [
    ("outcomes",
     b"INSERTED 1\r\nBURIED 2\r\nBURIED\r\nUSING default\r\nDEADLINE_SOON\r\nTIMED_OUT\r\n"
     b"NOT_FOUND\r\nDELETED\r\nRELEASED\r\nTOUCHED\r\nWATCHING 2\r\nNOT_IGNORED\r\n"
     b"KICKED 3\r\nKICKED\r\nPAUSED\r\n",
     [(word, False) for word in ["INSERTED", "BURIED", "BURIED", "USING", "DEADLINE_SOON",
                                 "TIMED_OUT", "NOT_FOUND", "DELETED", "RELEASED", "TOUCHED",
                                 "WATCHING", "NOT_IGNORED", "KICKED", "KICKED", "PAUSED"]]),
    ("errors",
     b"OUT_OF_MEMORY\r\nINTERNAL_ERROR\r\nBAD_FORMAT\r\nUNKNOWN_COMMAND\r\nEXPECTED_CRLF\r\n"
     b"JOB_TOO_BIG\r\nDRAINING\r\n",
     [(word, True) for word in ["OUT_OF_MEMORY", "INTERNAL_ERROR", "BAD_FORMAT",
                                "UNKNOWN_COMMAND", "EXPECTED_CRLF", "JOB_TOO_BIG", "DRAINING"]]),
    ("reserved", job(b"RESERVED", b"hello"), [("RESERVED", False)]),
    ("data holding replies", job(b"FOUND", b"INSERTED 1\r\nOK 3\r\n") + b"DELETED\r\n",
     [("FOUND", False), ("DELETED", False)]),
    ("yaml", job(b"OK", b"---\n- default\n- t\n"), [("OK", False)]),
    ("empty data", job(b"RESERVED", b"") + job(b"OK", b""), [("RESERVED", False), ("OK", False)]),
    ("every tube name byte", b"USING a-+/;.$_()Z9\r\n", [("USING", False)]),
    ("nothing", b"", []),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, expected", [case[1:] for case in GOOD_REPLIES],
                         ids=[case[0] for case in GOOD_REPLIES])
def test_good_replies(stream, expected, split):
    assert replies(split(stream)) == (expected, None)
    messages, passed, pending = outcome(ReplyReader(), split(stream))
    assert (len(messages), passed, pending) == (len(expected), b"", b"")


BAD_REPLIES = [
    (b"HTTP/1.1 200 OK\r\n", "bad reply line b'HTTP/1.1 200 OK'"),
    (b"inserted 1\r\n", "bad reply line b'inserted 1'"),
    (b"INSERTED\r\n", "bad reply line b'INSERTED'"),
    (b"INSERTED x\r\n", "bad reply line b'INSERTED x'"),
    (b"INSERTED 1 \r\n", "bad reply line b'INSERTED 1 '"),
    (b"RESERVED 1\r\n", "bad reply line b'RESERVED 1'"),
    (b"OK -1\r\n", "bad reply line b'OK -1'"),
    (b"OK 12345678901\r\n", "bad reply line b'OK 12345678901'"),
    (b"USING a b\r\n", "bad reply line b'USING a b'"),
    (b"\r\n", "bad reply line b''"),
    (b"NOT_FOUND\nDELETED\r\n", "bad reply line b'NOT_FOUND\\nDELETED'"),
    (b"OK 3\r\nabcd\r\n", "reply data not followed by CRLF"),
    (b"OK 3\r\nabc\nX", "reply data not followed by CRLF"),
    (b"DELETED\r\r\n", "CR not followed by LF"),
    (b"OK " + b"1" * MAX_REPLY_LINE, "line over 1024 bytes"),
]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("stream, message", BAD_REPLIES, ids=[m for _, m in BAD_REPLIES])
def test_bad_replies(stream, message, split):
    framer = ResponseFramer()
    with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
        for chunk in split(stream):
            feed(framer, chunk)
    reader = ReplyReader()
    before = b"USING t\r\n" + job(b"RESERVED", b"x")
    assert outcome(reader, split(before + stream))[:2] == (
        [b"USING t\r\n", job(b"RESERVED", b"x")], stream)
    assert reader.passthrough
    assert reader.feed(b"DELETED\r\n") == [b"DELETED\r\n"]


def test_reply_line_at_the_limit():
    line = b"USING " + b"t" * 200 + b"\r\n"
    assert replies(bytewise(line)) == ([("USING", False)], None)
    # A line beanstalkd never sends, but under the bound: framed, then found bad.
    assert replies([b"USING " + b"t" * (MAX_REPLY_LINE - 8) + b"\r\n"]) == ([], "ProtocolError")


@pytest.mark.parametrize("stream", [
    b"INSERTED", b"INSERTED 1\r", b"RESERVED 1 5\r\nhel", b"RESERVED 1 5\r\nhello",
    b"RESERVED 1 5\r\nhello\r",
])
def test_reply_cut_short(stream):
    framer = ResponseFramer()
    framer.feed(stream)
    with pytest.raises(ProtocolError, match="^connection closed in the middle of a reply$"):
        framer.close()
    reader = ReplyReader()
    assert (reader.feed(stream), reader.pending) == ([], stream)


def test_close_between_replies():
    framer = ResponseFramer()
    for request in ("use", "quit"):
        framer.expect(request)  # accepted; replies frame themselves
    assert framer.feed(b"USING t\r\n") == [("USING", False)]
    assert framer.close() is None


# --- generated streams ------------------------------------------------------------------

LINES = st.sampled_from([
    (b"reserve", "reserve", []), (b"reserve-with-timeout 0", "reserve-with-timeout", ["0"]),
    (b"use tube", "use", ["tube"]), (b"watch  a-b", "watch", ["a-b"]),
    (b"delete 12", "delete", ["12"]), (b"list-tubes", "list-tubes", []), (b"", "", []),
    (b"frobnicate x  y ", "frobnicate", ["x", "y"]), (b"put", "put", []), (b" x", "", ["x"]),
])
NUMBERS = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**32 - 1])
BODIES = st.binary(max_size=40) | st.sampled_from(
    [b"\r\n", b"\r", b"\n", b"put 0 0 1 1\r\nx\r\n", b"RESERVED 1 1\r\nx\r\n", b"x" * 300])


@st.composite
def command(draw) -> Command:
    """One command as a client sends it, as CommandReader should read it."""
    if draw(st.booleans()):
        line, name, args = draw(LINES)
        return Command(name, args, line + b"\r\n")
    args = [b"%d" % draw(NUMBERS) for _ in range(3)]
    body = draw(BODIES)
    args = [b"0" * draw(st.integers(0, 2)) + arg for arg in args] + [b"%d" % len(body)]
    line = b"put"
    for arg in args:
        line += b" " * draw(st.integers(1, 2)) + arg
    return Command("put", [arg.decode() for arg in args], line + b"\r\n" + body + b"\r\n", body)


REPLIES = st.sampled_from([
    b"INSERTED 1\r\n", b"BURIED\r\n", b"USING t\r\n", b"TIMED_OUT\r\n", b"NOT_FOUND\r\n",
    b"KICKED 2\r\n", b"WATCHING 1\r\n", b"BAD_FORMAT\r\n", b"JOB_TOO_BIG\r\n",
]) | st.builds(job, st.sampled_from([b"RESERVED", b"FOUND", b"OK"]), BODIES)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few bytes flipped, inserted or deleted: mostly-valid garbage."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["flip", "insert", "delete"]))
        if what == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
                [b"\r\n", b"\r", b"\n", b"put 0 0 1 ", b"1", b"OK 2\r\n", b"x" * 230]))
        elif at < len(data):
            if what == "flip":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at:at + draw(st.integers(1, 4))]
    return bytes(data)


def offsets(messages: list) -> list:
    """Where each of `messages` (bytes) ends in their concatenation."""
    found, at = [], 0
    for message in messages:
        at += len(message)
        found.append(at)
    return found


@FAST
@given(st.lists(command(), max_size=6), st.data())
def test_generated_commands(pipeline, data):
    """Pipelined commands yield their names, their ends, and (read) themselves, however
    they are split."""
    stream = b"".join(c.raw for c in pipeline)
    names = [c.name for c in pipeline]
    chunks = data.draw(splits(stream))
    assert commands(whole(stream)) == (names, None)
    assert commands(chunks) == (names, None)
    assert ends(RequestFramer(), chunks) == offsets([c.raw for c in pipeline])
    assert outcome(CommandReader(), chunks) == (pipeline, b"", b"")


@FAST
@given(st.lists(command(), max_size=6), st.data())
def test_generated_garbage_commands(pipeline, data):
    """Mangled pipelines: split or whole, the same commands and the same stop; the
    reader loses nothing."""
    stream = data.draw(mutated(b"".join(c.raw for c in pipeline)))
    chunks = data.draw(splits(stream))
    assert commands(chunks) == commands(whole(stream))
    assert ends(RequestFramer(), chunks) == ends(RequestFramer(), whole(stream))
    assert outcome(CommandReader(), chunks) == outcome(CommandReader(), whole(stream))


@FAST
@given(st.lists(REPLIES, max_size=8), st.data())
def test_generated_replies(pipeline, data):
    """Replies with data (holding CRLFs and reply lines) yield one reply each, their ends,
    and (read) their exact bytes, however they are split; mangled ones the same whole as
    split."""
    stream = b"".join(pipeline)
    words = [reply.split(b" ", 1)[0].split(b"\r")[0].decode() for reply in pipeline]
    words = [(word, word in ("BAD_FORMAT", "JOB_TOO_BIG")) for word in words]
    chunks = data.draw(splits(stream))
    assert replies(chunks) == (words, None)
    assert ends(ResponseFramer(), chunks) == offsets(pipeline)
    assert outcome(ReplyReader(), chunks) == (pipeline, b"", b"")
    garbage = data.draw(mutated(stream))
    chunks = data.draw(splits(garbage))
    assert replies(chunks) == replies(whole(garbage))
    assert ends(ResponseFramer(), chunks) == ends(ResponseFramer(), whole(garbage))
    assert outcome(ReplyReader(), chunks) == outcome(ReplyReader(), whole(garbage))


@FAST
@given(st.binary(max_size=400), st.data())
def test_random_bytes(stream, data):
    """Anything: the framers raise only ProtocolError, the readers keep every byte."""
    for prefix in (b"", b"put 0 0 1 3\r\n", b"RESERVED 1 3\r\n"):
        chunks = data.draw(splits(prefix + stream))
        commands(chunks)
        replies(chunks)
        assert outcome(CommandReader(), chunks) == outcome(CommandReader(), [b"".join(chunks)])
        assert outcome(ReplyReader(), chunks) == outcome(ReplyReader(), [b"".join(chunks)])


# --- against a real beanstalkd ----------------------------------------------------------

@pytest.fixture
def beanstalkd():
    """start(*options) -> (port, process) of a fresh beanstalkd on 127.0.0.1; all the
    ones started are stopped at the end."""
    binary = shutil.which("beanstalkd")
    assert binary, "beanstalkd is not installed (.ci/install-system-deps installs it)"
    started = []

    def start(*options: str) -> tuple[int, subprocess.Popen]:
        port = unused_port()
        process = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port), *options])
        started.append(process)
        wait_until(lambda: _accepts(port), timeout=10, what="beanstalkd up")
        return port, process

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def exchange(port: int, stream: bytes, done) -> bytes:
    """Send `stream` at once; return what beanstalkd answers, up to `done(answer)` or EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(stream)
        answer = b""
        while not done(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


SENTINEL = b"use sentinel\r\n"  # answered USING sentinel: all before it was answered


def until_sentinel(answer: bytes) -> bool:
    return answer.endswith(b"USING sentinel\r\n")


# (command, the first word of its reply), on a fresh server: job ids count from 1.
PIPELINE = [
    (b"use jobs\r\n", "USING"),
    (put(b"hello"), "INSERTED"),
    (put(b"a\r\nb\r\nreserve\r\n", b"put 1 0 60"), "INSERTED"),
    (put(b"", b"put 2 0 60"), "INSERTED"),
    (b"peek-ready\r\n", "FOUND"),
    (b"watch jobs\r\n", "WATCHING"),
    (b"ignore default\r\n", "WATCHING"),
    (b"ignore jobs\r\n", "NOT_IGNORED"),
    (b"reserve\r\n", "RESERVED"),
    (b"reserve-with-timeout 0\r\n", "RESERVED"),
    (b"reserve-job 3\r\n", "RESERVED"),
    (b"reserve-with-timeout 0\r\n", "TIMED_OUT"),
    (b"bury 1 0\r\n", "BURIED"),
    (b"kick 10\r\n", "KICKED"),
    (b"release 2 0 0\r\n", "RELEASED"),
    (b"touch 3\r\n", "TOUCHED"),
    (b"delete 3\r\n", "DELETED"),
    (b"delete 3\r\n", "NOT_FOUND"),
    (b"kick-job 2\r\n", "NOT_FOUND"),
    (b"stats-job 1\r\n", "OK"),
    (b"stats-tube jobs\r\n", "OK"),
    (b"stats\r\n", "OK"),
    (b"list-tubes\r\n", "OK"),
    (b"list-tube-used\r\n", "USING"),
    (b"list-tubes-watched\r\n", "OK"),
    (b"pause-tube jobs 0\r\n", "PAUSED"),
    (b"frobnicate\r\n", "UNKNOWN_COMMAND"),
    (b"\r\n", "UNKNOWN_COMMAND"),
    (b"use -bad\r\n", "BAD_FORMAT"),
    (put(b"x" * MAX_JOB_SIZE), "INSERTED"),
    (SENTINEL, "USING"),
]


def test_real_pipeline_one_reply_per_command(beanstalkd):
    port, _ = beanstalkd()
    stream = b"".join(command for command, _ in PIPELINE)
    names = [command.split(b" ", 1)[0].split(b"\r")[0].decode() for command, _ in PIPELINE]
    assert commands([stream]) == (names, None)
    assert [c.raw for c in outcome(CommandReader(), [stream])[0]] == [c for c, _ in PIPELINE]

    answer = exchange(port, stream, until_sentinel)
    expected = [(word, word in ("UNKNOWN_COMMAND", "BAD_FORMAT")) for _, word in PIPELINE]
    assert replies([answer]) == (expected, None)
    assert replies(bytewise(answer)) == (expected, None)
    found, passed, pending = outcome(ReplyReader(), [answer])
    assert (len(found), passed, pending) == (len(PIPELINE), b"", b"")
    assert outcome(ReplyReader(), bytewise(answer))[0] == found
    assert ends(ResponseFramer(), [answer]) == offsets(found)
    assert found[4] == b"FOUND 1 5\r\nhello\r\n"
    assert found[8] == b"RESERVED 1 5\r\nhello\r\n"
    assert found[9] == job(b"RESERVED", b"a\r\nb\r\nreserve\r\n").replace(b" 7 ", b" 2 ")
    assert found[10] == b"RESERVED 3 0\r\n\r\n"


# (stream; what beanstalkd -z 100 answers, a pattern (literal but for INSERTED's id); the
# commands CommandReader(max_body=100) reads before it passes the rest through, None when
# it reads them all; the commands RequestFramer completes; the error it stops with).
# The module docstring's account of the server, checked.
REAL_EDGES = [
    ("line over 224 bytes", b"use " + b"a" * 300 + b"\r\nlist-tube-used\r\n",
     b"BAD_FORMAT\r\nUSING default\r\n", [], [], "line over 224 bytes"),
    ("line of 224 bytes", b"x" * 222 + b"\r\nlist-tube-used\r\n",
     b"UNKNOWN_COMMAND\r\nUSING default\r\n", None, ["x" * 222, "list-tube-used"], None),
    ("CRLF across the 224-byte window", b"x" * 223 + b"\r\nlist-tube-used\r\n",
     b"BAD_FORMAT\r\n", [], [], "line over 224 bytes"),
    ("CR without LF", b"foo\rbar\r\n" + b"x" * 220 + b"\r\n",
     b"BAD_FORMAT\r\n", [], [], "CR not followed by LF"),
    ("body not followed by CRLF", b"put 0 0 1 3\r\nabcd\r\nlist-tube-used\r\n",
     b"EXPECTED_CRLF\r\nUNKNOWN_COMMAND\r\n", [], [], "job body not followed by CRLF"),
    ("put with trailing garbage", b"put 0 0 1 3x\r\nabc\r\n",
     b"BAD_FORMAT\r\nUNKNOWN_COMMAND\r\n", [], [], "bad put line b'put 0 0 1 3x'"),
    ("put with a trailing space", b"put 0 0 1 3 \r\nabc\r\n",
     b"BAD_FORMAT\r\nUNKNOWN_COMMAND\r\n", [], [], "bad put line b'put 0 0 1 3 '"),
    ("put with pri 2**32", b"put 4294967296 0 1 3\r\nabc\r\n",
     b"BAD_FORMAT\r\nUNKNOWN_COMMAND\r\n", [], [], "bad put line b'put 4294967296 0 1 3'"),
    ("put with a signed size", b"put 0 0 1 +3\r\nabc\r\n",
     b"BAD_FORMAT\r\nUNKNOWN_COMMAND\r\n", [], [], "bad put line b'put 0 0 1 +3'"),
    ("put with 3 arguments", b"put 0 0 1\r\n",
     b"BAD_FORMAT\r\n", [], [], "bad put line b'put 0 0 1'"),
    ("JOB_TOO_BIG", b"put 0 0 1 101\r\n" + b"x" * 101 + b"\r\nlist-tube-used\r\n",
     b"JOB_TOO_BIG\r\nUSING default\r\n", [], ["put", "list-tube-used"], None),
    ("JOB_TOO_BIG despite trailing garbage",
     b"put 0 0 1 101x\r\n" + b"x" * 101 + b"\r\nlist-tube-used\r\n",
     b"JOB_TOO_BIG\r\nUSING default\r\n", [], [], "bad put line b'put 0 0 1 101x'"),
    ("JOB_TOO_BIG drops the body unchecked",
     b"put 0 0 1 101\r\n" + b"x" * 103 + b"list-tube-used\r\n",
     b"JOB_TOO_BIG\r\nUSING default\r\n", [], [], "job body not followed by CRLF"),
    ("largest job", b"put 0 0 1 100\r\n" + b"x" * 100 + b"\r\n",
     rb"INSERTED [0-9]+\r\n", None, ["put"], None),
    ("ttr 0, leading zeros, runs of spaces", b"put  0 00  0 003\r\nabc\r\n",
     rb"INSERTED [0-9]+\r\n", None, ["put"], None),
    ("lines answered once each", b"\r\nput\r\nPUT 0 0 1 3\r\nlist-tubes\x00\r\nuse a\nb\r\n",
     b"UNKNOWN_COMMAND\r\n" * 3 + b"BAD_FORMAT\r\n" * 2, None, ["", "put", "PUT"],
     "bad command line b'list-tubes\\x00'"),
]


@pytest.mark.parametrize("stream, answer, read_before, framed, error",
                         [case[1:] for case in REAL_EDGES], ids=[case[0] for case in REAL_EDGES])
def test_real_edges(beanstalkd, stream, answer, read_before, framed, error):
    port, _ = beanstalkd("-z", "100")
    got = exchange(port, stream + SENTINEL, until_sentinel)
    assert re.fullmatch(answer + b"USING sentinel\r\n", got), got
    answered, stop = replies([got])
    assert stop is None

    reader = CommandReader(max_body=100)
    messages, passed, pending = outcome(reader, bytewise(stream))
    if read_before is None:  # read whole, every line a command
        assert (passed, pending) == (b"", b"")
        assert len(messages) == len(answered) - 1  # the sentinel's
    else:
        assert [c.name for c in messages] == read_before
        assert (passed, reader.passthrough) == (stream, True)

    for split in (whole, bytewise):
        assert commands(split(stream)) == (framed, error and "ProtocolError")
    if error:
        with pytest.raises(ProtocolError, match="^" + re.escape(error) + "$"):
            RequestFramer().feed(stream)


def test_real_draining(beanstalkd):
    """SIGUSR1 puts beanstalkd in drain mode: a put (its body read) gets DRAINING."""
    port, process = beanstalkd()
    os.kill(process.pid, signal.SIGUSR1)
    wait_until(lambda: b"\ndraining: true\n" in exchange(
        port, b"stats\r\n", lambda answer: replies([answer])[0]), timeout=10, what="draining")
    got = exchange(port, put(b"job") + SENTINEL, until_sentinel)
    assert got == b"DRAINING\r\nUSING sentinel\r\n"
    assert replies([got]) == ([("DRAINING", True), ("USING", False)], None)


def test_real_quit_is_not_answered(beanstalkd):
    port, _ = beanstalkd()
    stream = b"use t\r\nquit\r\nlist-tube-used\r\n"
    got = exchange(port, stream, lambda answer: False)  # until beanstalkd closes
    assert got == b"USING t\r\n"
    assert replies([got]) == ([("USING", False)], None)
    assert commands([stream]) == (["use", "quit", "list-tube-used"], None)
