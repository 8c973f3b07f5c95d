"""Framers in C for the common case: llhttp (httptools) and hiredis's reader, in front of
the pure-Python framers, which stay the state of record.

A chunk that starts where a message starts (the Python framer between messages) and
holds whole messages only -- the request-reply case: one request per write, one answer
per write -- is framed by the C parser, and the Python framer is left as it was: between
messages. Any other chunk goes to the Python framer, which decides: a message cut across
chunks, several HTTP messages in one chunk (pipelining), several Redis messages when the
offsets where each ends are wanted (`ends`, `starts`), interim (1xx) and upgrade
answers, an answer to HEAD or CONNECT, short Redis replies (Python is as fast), replies
after HELLO (RESP3, which hiredis reads otherwise), subscriptions, anything the C
parser rejects. A framer whose chunks miss twice stops trying the C parser: its
connection does not fit it. Three Redis cases go to the Python framer's one-pass scans
before hiredis, which are faster still: whole commands of up to 9 short arguments (one
regular expression per chunk, offsets included), an array of bulk strings of one
length (LRANGE: a slice per framing byte, no object per element), and the answers to
every command expected, all of one type and none an error (a pipeline of SETs or
GETs: a regular expression 16 replies at a time, no object per reply).

Where the C parsers are more lenient than the Python framers, the checks here close
the gaps known (the request and status lines, commands of bulk strings only, RESP2
only, nesting); the Python framers' tables of good and bad input hold for both
(tests/test_protocols_native.py). Two differences remain, both in Redis replies: their
types are what hiredis's values say when several come in one chunk (a simple string
reads as "$"; nothing but the is_error flag is used of them), and hiredis takes any two
bytes after a bulk string's contents for its CRLF, so a reply malformed just there is
counted where the Python framer would fall back to tcp-level measurement (commands are
checked for it here: a request stream is the client's, a reply stream a server's).

NATIVE says whether both are importable; each protocol checks its own.
"""
from __future__ import annotations

import re
from itertools import islice, repeat

from . import http, redis

try:
    import httptools
except ImportError:  # optional: pip install gproxyd[native]
    httptools = None
try:
    import hiredis
except ImportError:  # optional: pip install gproxyd[native]
    hiredis = None

NATIVE = {"http": httptools is not None, "redis": hiredis is not None}
_HTTP_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade) if httptools else ()
_NO_BODY_KNOWN = frozenset({"HEAD", "CONNECT"})  # llhttp cannot be told a request's method
# Replies the Python framer follows about as fast: one short one, not an array.
SHORT_REPLY = 64
MISSES = 2             # chunks the C parser may not fit before a framer stops trying it
MAX_NATIVE = 64 * 1024  # larger chunks carry large values: hiredis would copy them
# Searched with re: chunks are memoryviews, which have no find() or count().
_HEAD_END = re.compile(rb"\r\n\r\n")
_LINE_END = re.compile(rb"\n")
# What llhttp lets pass and the Python framer does not: other versions, extra spaces.
_REQUEST_LINE = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[0-9]\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}[ \r]")
_AGGREGATE = re.compile(rb"\*")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]{1,18})[ \t]*\r\n", re.I)
_CHUNKED_END = re.compile(rb"\r\n0\r\n\r\n\Z")


class _Counts:
    """llhttp's callbacks: messages begun and completed in the chunk being fed."""

    __slots__ = ("begun", "completed")

    def __init__(self) -> None:
        self.begun = self.completed = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_message_complete(self) -> None:
        self.completed += 1


class _Native:
    """What the four wrappers share: the Python framer (`_py`) and the misses."""

    __slots__ = ("_py", "_parser", "_misses")

    @property
    def ends(self) -> list[int] | None:
        return self._py.ends

    @ends.setter
    def ends(self, value: list[int] | None) -> None:
        self._py.ends = value

    def _miss(self, data) -> list | None:
        """The C parser did not fit this chunk: the Python framer frames it."""
        self._parser = None
        self._misses += 1
        return self._py.feed(data)


class _NativeRequests(_Native):
    """What the two request wrappers also pass through to the Python framer."""

    __slots__ = ()

    @property
    def starts(self) -> list[int] | None:
        return self._py.starts

    @starts.setter
    def starts(self, value: list[int] | None) -> None:
        self._py.starts = value

    @property
    def in_message(self) -> bool:
        return self._py.in_message

    @property
    def current(self) -> str | None:
        return self._py.current


class HttpRequestFramer(_NativeRequests):
    """http.RequestFramer, with llhttp for a chunk that is one whole request."""

    __slots__ = ("_counts",)

    def __init__(self, max_head: int = http.MAX_HEAD) -> None:
        self._py = http.RequestFramer(max_head)
        self._parser = None
        self._misses = 0
        self._counts = _Counts()

    def feed(self, data) -> list | None:
        py = self._py
        n = len(data)
        # _START is 0; a head can only pass max_head in a chunk longer than that
        if (py._state or self._misses >= MISSES or n > MAX_NATIVE
                or _REQUEST_LINE.match(data) is None
                or (n > py._fast_max and _HEAD_END.search(data, 0, py._fast_max) is None)):
            return py.feed(data)
        parser = self._parser
        counts = self._counts
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(counts)
        counts.begun = counts.completed = 0
        try:
            parser.feed_data(data)
        except _HTTP_ERRORS:
            return self._miss(data)
        if counts.completed != 1 or counts.begun != 1 or not _ends_at_end(data, n):
            return self._miss(data)
        if py.ends is not None:
            py.ends.append(n)
        if py.starts is not None:
            py.starts.append(1)
        return [parser.get_method().decode("ascii")]


def _ends_at_end(data, n: int) -> bool:
    """Whether the one message llhttp completed in `data` ends at its end: llhttp also
    takes the blank lines after a message, which the Python framer leaves to none."""
    if data[n - 1] not in b"\r\n":
        return True
    head = _HEAD_END.search(data)
    if head is None:
        return False
    head = head.end()
    if head == n:
        return True  # no body
    length = _CONTENT_LENGTH.search(data, 0, head)
    if length is not None:
        return head + int(length.group(1)) == n
    return _CHUNKED_END.search(data, head) is not None


class HttpResponseFramer(_Native):
    """http.ResponseFramer, with llhttp for a chunk that is one whole final answer to a
    request other than HEAD or CONNECT."""

    __slots__ = ("_counts", "expect", "expect_all")

    def __init__(self, max_head: int = http.MAX_HEAD) -> None:
        self._py = http.ResponseFramer(max_head)
        self._parser = None
        self._misses = 0
        self._counts = _Counts()
        # expect(method): what http.ResponseFramer.expect does, without a call of ours
        self.expect = self._py._pending.append
        self.expect_all = self._py._pending.extend

    def close(self) -> list | None:
        return self._py.close()

    def feed(self, data) -> list | None:
        py = self._py
        pending = py._pending
        n = len(data)
        if (py._state or self._misses >= MISSES or n > MAX_NATIVE
                or (pending and pending[0] in _NO_BODY_KNOWN)
                or _STATUS_LINE.match(data) is None
                or (n > py._fast_max and _HEAD_END.search(data, 0, py._fast_max) is None)):
            return py.feed(data)
        parser = self._parser
        counts = self._counts
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(counts)
        counts.begun = counts.completed = 0
        try:
            parser.feed_data(data)
        except _HTTP_ERRORS:
            return self._miss(data)
        status = parser.get_status_code()
        if (counts.completed != 1 or counts.begun != 1 or status < 200
                or not _ends_at_end(data, n)):
            return self._miss(data)
        if pending:
            pending.popleft()
        if py.ends is not None:
            py.ends.append(n)
        return [(status, status >= 500)]


class RedisRequestFramer(_NativeRequests):
    """redis.RequestFramer, with hiredis for a chunk of whole commands (arrays of bulk
    strings); of one command only when their offsets are wanted."""

    __slots__ = ()

    def __init__(self) -> None:
        self._py = redis.RequestFramer()
        self._parser = None
        self._misses = 0

    def feed(self, data) -> list | None:
        py = self._py
        n = len(data)
        if (py._state != redis._LINE or py._args or py._buf or self._misses >= MISSES
                or not n or n > MAX_NATIVE or data[0] != 42):
            return py.feed(data)
        if n <= redis._WHOLE_COMMANDS_MAX:
            commands = py._small(data, n)  # the most common commands: faster still
            if commands is not None:
                return commands
        reader = self._parser
        if reader is None:
            reader = self._parser = _reader()
        try:
            reader.feed(data)
            commands = []
            # Every argument a bulk string ("$", its length, CRLF, its bytes, CRLF: hiredis
            # also reads "+x" or ":1" as arguments, and takes any two bytes for the
            # CRLF after a bulk string's), the chunk exactly the commands.
            # (An index past the chunk raises IndexError: a miss too.)
            pos = 0
            while True:
                command = reader.gets()
                if command is False:
                    break
                if type(command) is not list or not command:
                    return self._miss(data)
                size = len(command)
                pos += 4 if size < 10 else 3 + len(str(size))  # "*", its digits, CRLF
                for argument in command:
                    if type(argument) is not bytes or data[pos] != 36:
                        return self._miss(data)
                    size = len(argument)
                    pos += size + (6 if size < 10 else 7 if size < 100 else
                                   5 + len(str(size)))
                    if data[pos - 1] != 10 or data[pos - 2] != 13:
                        return self._miss(data)
                commands.append(redis._name(command[0][:redis.NAME_MAX]))
            if pos != n or not _idle(reader):
                return self._miss(data)
        except (hiredis.ProtocolError, IndexError):
            return self._miss(data)
        if len(commands) > 1 and (py.ends is not None or py.starts is not None):
            return self._miss(data)
        if py.ends is not None:
            py.ends.append(n)
        if py.starts is not None:
            py.starts.append(_LINE_END.search(data).end())  # past the array's header
        return commands


# hiredis's values -> (the RESP2 type that gives them, is_error), for replies after the
# first of a chunk
_REPLY_ERROR = ("-", True)
_REPLIES = {bytes: ("$", False), int: (":", False), list: ("*", False),
            type(None): ("$", False)}
if hiredis is not None:
    _REPLIES[hiredis.ReplyError] = _REPLY_ERROR


class RedisResponseFramer(_Native):
    """redis.ResponseFramer, with hiredis for a chunk of whole RESP2 replies (of one only
    when their offsets are wanted; not a short one, which Python frames as fast), none
    nested deeper than MAX_DEPTH, none answering a command that leaves request-reply,
    until the client sends HELLO."""

    __slots__ = ()

    def __init__(self) -> None:
        self._py = redis.ResponseFramer()
        self._parser = None
        self._misses = 0

    def expect(self, request: str) -> None:
        if request == "HELLO":
            # Perhaps RESP3, which hiredis reads otherwise than the Python framer (a
            # false boolean looks like no reply, attributes and pushes like replies);
            # a server speaks it only after HELLO 3.
            self._misses = MISSES
        self._py._pending.append(request)

    def expect_all(self, requests: list) -> None:
        if "HELLO" in requests:
            self._misses = MISSES  # see expect()
        self._py._pending.extend(requests)

    def close(self) -> None:
        return self._py.close()

    def feed(self, data) -> list | None:
        py = self._py
        n = len(data)
        if ((n < SHORT_REPLY and (not n or data[0] != 42)) or self._misses >= MISSES
                or py._state != redis._LINE or py._buf or py._counts or n > MAX_NATIVE
                or data[0] not in _FIRST):
            return py.feed(data)
        if data[0] == 42:  # "*": an array of bulk strings of one length is faster so
            out = py._array(data, n)
            if out is not None:
                return out
        elif py.ends is None:  # a pipeline's answers of one type: faster so
            out = py._same(data, n)
            if out is not None:
                return out
        if n > 4 * redis.MAX_DEPTH and _aggregates(data) > redis.MAX_DEPTH:
            return py.feed(data)
        reader = self._parser
        if reader is None:
            reader = self._parser = _reader()
        error = hiredis.ReplyError
        try:
            reader.feed(data)
            replies = []
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                replies.append(reply)
            if not replies or not _idle(reader):
                return self._miss(data)
        except hiredis.ProtocolError:
            return self._miss(data)
        pending = py._pending
        count = len(replies)
        if count > 1 and py.ends is not None:
            return self._miss(data)
        answered = pending if count >= len(pending) else islice(pending, count)
        if not redis._LEAVES_REQUEST_REPLY.isdisjoint(answered):
            return self._miss(data)
        try:
            out = list(map(_REPLIES.__getitem__, map(type, replies)))
        except KeyError:  # a ReplyError of another class: what isinstance() says
            out = [_REPLY_ERROR if isinstance(reply, error) else
                   _REPLIES.get(type(reply), _REPLIES[bytes]) for reply in replies]
        out[0] = (chr(data[0]), out[0][1])
        if count >= len(pending):
            pending.clear()
        else:
            popleft = pending.popleft
            for _ in repeat(None, count):
                popleft()
        if py.ends is not None:
            py.ends.append(n)
        return out


_FIRST = frozenset(b"+-:$*")  # RESP2's first bytes


# What a reader may keep of its buffer between chunks (hiredis's default: 16 KiB),
# per connection and direction.
READER_KEEPS = 4096


def _reader():
    reader = hiredis.Reader()
    reader.setmaxbuf(READER_KEEPS)
    return reader


def _idle(reader) -> bool:
    """Whether hiredis's reader is between messages: it keeps a reply it has begun to
    itself (has_data() is false once the bytes are in its tree), but a probe reads as
    a reply of its own, the integer 7, only between messages (in a bulk string it is
    contents, or the two bytes after them, which hiredis does not check; in an array,
    an element; after half a line, garbage)."""
    reader.feed(b":7\r\n")
    return reader.gets() == 7


def _aggregates(data) -> int:
    """Bytes that may open an array: a bound on how deep a reply in `data` nests."""
    return len(_AGGREGATE.findall(data))  # RESP2's only aggregate


# protocol -> the wrapper classes, each taking max_head (the Redis ones ignore it)
REQUEST_FRAMERS = {"http": HttpRequestFramer, "redis": lambda max_head: RedisRequestFramer()}
RESPONSE_FRAMERS = {"http": HttpResponseFramer,
                    "redis": lambda max_head: RedisResponseFramer()}
