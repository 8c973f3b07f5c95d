"""Redis framing for passive observers: where each command and each reply ends (RESP2 and RESP3).

Only lines are buffered (a type byte and its payload, a length, an inline command), up
to MAX_LINE bytes each; bulk string contents are counted down, never copied, except
the first NAME_MAX bytes of a command's name. Aggregates nest up to MAX_DEPTH deep on
an explicit stack of remaining element counts; a deeper reply is not followed
(ProtocolError: the observer falls back), so neither memory nor time per reply grows
with its depth.
"""
from __future__ import annotations

import re
from collections import deque
from itertools import islice, repeat

from . import ProtocolError, Upgraded

MAX_LINE = 64 * 1024  # the same bound Redis puts on inline commands and length lines
NAME_MAX = 64         # bytes of a command name kept; longer names are truncated
MAX_DEPTH = 128       # aggregates open at once in one reply (attributes included)

_LF = re.compile(rb"\n")
_MAX_DIGITS = 18  # lengths and counts; more is garbage (and beyond int() limits soon)
_INTEGER = re.compile(rb"[-+]?[0-9]+")

# Parser states.
_LINE = 0      # expecting a line: a command, an argument's length, a reply's type line
_BULK = 1      # counting down a bulk string's contents
_BULK_END = 2  # expecting the CRLF after them
_FINISHED = 3  # raised or closed

_TYPES = {byte: chr(byte) for byte in b"+-:_,#($!=*~>%|"}
_SIMPLE = frozenset(b"+-:_,#(")  # one line each
_BLOBS = frozenset(b"$!=")       # a length line, then that many bytes and CRLF
_AGGREGATE_WIDTH = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}
_ATTRIBUTE = ord("|")
_NULLABLE = frozenset(b"$*")     # RESP2's $-1 and *-1
_ERRORS = ("-", "!")
# Commands after whose reply the connection stops pairing requests with replies:
# subscribed clients receive messages nobody asked for, MONITOR streams forever.
_LEAVES_REQUEST_REPLY = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"})


def _small_bulk(byte: bytes = rb".") -> bytes:
    """A bulk string of 0 to 99 bytes, its length line included: the length's digits as
    a trie, each leading to exactly that many bytes of contents (each matching `byte`),
    then CRLF."""
    branches = [rb"0\r\n"]
    for first in range(1, 10):
        tails = [rb"\r\n%s{%d}" % (byte, first)]
        tails += [rb"%d\r\n%s{%d}" % (second, byte, first * 10 + second)
                  for second in range(10)]
        branches.append(b"%d(?:" % first + b"|".join(tails) + b")")
    return rb"\$(?:" + b"|".join(branches) + rb")\r\n"


# The fast path through big aggregates (LRANGE, HGETALL, SMEMBERS): runs of small
# elements -- bulk strings up to 99 bytes, nulls, integers, short simple strings and
# doubles -- are matched 256, 16 or 1 at a time by one regular expression, and counted.
# It accepts a subset of what the line-by-line path does (CRLF line ends, no leading
# zeros, lines far below MAX_LINE); anything else is left to that path, which decides.
_ELEMENT = (rb"(?:" + _small_bulk() + rb"|\$-1\r\n|:[-+]?[0-9]{1,20}\r\n"
            rb"|[+,][^\r\n]{0,100}\r\n|_\r\n)")
_RUNS = tuple((block, re.compile(_ELEMENT + rb"{%d}" % block, re.S)) for block in (256, 16, 1))
# Whole commands in a chunk of at most this many bytes are framed in one pass (a copy of
# the chunk is searched: find() is not a memoryview's).
_WHOLE_COMMANDS_MAX = 16 * 1024
# The most common commands -- 1 to 9 bulk strings of up to 99 bytes each, the first (the
# name) without a CR -- framed by one regular expression, a chunk of them in one
# findall(): its group is the first NAME_MAX bytes of each command's name. A subset of
# what _whole() accepts; anything else is left to it. Anything else where a command
# should start is matched, to the end of the chunk, as an empty name (never a key of
# _NAMES): a chunk is whole commands when no name found is empty, which needs no
# tuple per command nor their lengths added up. (The arguments are written out, not
# repeated with {n}: ~15% faster to match, ~40 ms more to compile at start-up.)
_SMALL_COMMAND = re.compile(
    rb"\*(?=[1-9]\r\n\$[0-9]{1,2}\r\n([^\r]{0,%d}))(?:" % NAME_MAX
    + b"|".join(rb"%d\r\n%s%s" % (count, _small_bulk(rb"[^\r]"),
                                    b"(?:%s)" % _small_bulk() * (count - 1))
                for count in range(1, 10))
    + rb")|.+", re.S)
# Command names as read -> as framers give them (a client uses a few).
_NAMES: dict[bytes, str] = {}
_NAMES_KEPT = 1024
# The header of an array whose first element is a bulk string, and that element's
# length line: an array of bulk strings of one length is framed by a few slices (LRANGE).
_ARRAY_HEAD = re.compile(rb"\*([1-9][0-9]{0,8})\r\n\$(0|[1-9][0-9]{0,8})\r\n")
# The most common replies in one piece (+OK, -ERR ..., :1, a GET's bulk string, a null),
# in a chunk of at most _WHOLE_MAX bytes, framed in one step: a subset of what the
# line-by-line path accepts.
_WHOLE_MAX = 512
_WHOLE_ITEMS = {kind: (chr(kind), kind == 45) for kind in b"+-:$"}  # what each completes
_WHOLE_REPLY = re.compile(rb"(?:[+-][^\r\n]*|:[-+]?[0-9]{1,18}|\$-1|\$([0-9]{1,18})\r\n(.*))\r\n",
                          re.S)

# Chunks of several short replies (a pipeline's answers: +OK, -ERR ..., :1, a GET's
# bulk string, a null), in a chunk of at most _WHOLE_COMMANDS_MAX bytes, framed by one
# findall(): its group is each reply's type byte. Anything else where a reply should
# start is matched, to the end of the chunk, as an empty group (which _RUN_ITEMS does
# not hold): so a chunk is whole replies when every group found is a type. A subset of
# what the line-by-line path accepts (CRLF line ends, bulk strings of up to 99 bytes).
_REPLY_RUN = re.compile(rb"(?=([-+:$]))(?:[-+][^\r\n]*\r\n|:[-+]?[0-9]{1,18}\r\n|\$-1\r\n|"
                        + _small_bulk() + rb")|.+", re.S)
_RUN_ITEMS = {kind: (chr(kind[0]), kind == b"-") for kind in (b"+", b"-", b":", b"$")}
# A pipeline's answers of one type, none an error (a run of SETs' +OK, of GETs' bulk
# strings of up to 99 bytes or nulls, of INCRs' integers): checked 16, 4 or 1 at a time
# by a regular expression, with no object per reply. A subset of _REPLY_RUN's.
_SAME_REPLIES = {
    kind: tuple((block, re.compile(rb"(?:%s){%d}" % (element, block), re.S))
                for block in (16, 4, 1))
    for kind, element in ((ord("+"), rb"\+[^\r\n]*\r\n"), (ord(":"), rb":[-+]?[0-9]{1,18}\r\n"),
                          (ord("$"), rb"(?:\$-1\r\n|" + _small_bulk() + rb")"))}
_SAME_ITEMS = {kind: (chr(kind), False) for kind in _SAME_REPLIES}


class _LineFramer:
    """What both directions share: the state, and a line buffer bounded by MAX_LINE."""

    __slots__ = ("_state", "_buf", "_left", "ends")

    def __init__(self) -> None:
        self._state = _LINE
        self._buf = bytearray()
        self._left = 0  # bulk string bytes still to come
        # A list to track where messages end: feed() appends the offset, in the chunk
        # fed, just past each message it completes (for capturing whole answers).
        self.ends: list[int] | None = None

    def _done(self, out: list | None, item, end: int) -> list:
        """A message ended at `end` in the chunk being fed: add it to `out`."""
        if self.ends is not None:
            self.ends.append(end)
        return _append(out, item)

    def _line(self, data, pos: int, n: int) -> tuple[int, bytes | None]:
        """Read one line from `data` at `pos`, without its CRLF (or bare LF).

        Returns (position after the line, the line), or (n, None) when the line does
        not end in this chunk; its start is kept for the next one.
        """
        buf = self._buf
        room = MAX_LINE - len(buf)
        m = _LF.search(data, pos, min(n, pos + room))
        if m is None:
            if n - pos >= room:
                raise ProtocolError(f"line over {MAX_LINE} bytes", at=pos + room)
            buf += data[pos:n]
            return n, None
        stop = m.end()
        if buf:
            buf += data[pos:stop - 1]
            line = bytes(buf)
            buf.clear()
        else:
            line = bytes(data[pos:stop - 1])
        return stop, (line[:-1] if line[-1:] == b"\r" else line)


class RequestFramer(_LineFramer):
    """Frames a client's commands; each completed one is its name, upper-cased ("GET", ...).

    Commands are arrays of bulk strings or inline lines, as Redis reads them: an
    empty array or a blank inline line is no command (Redis does not answer it).
    """

    __slots__ = ("_args", "_name", "_keep", "starts")

    def __init__(self) -> None:
        super().__init__()
        # A list to track where commands start: feed() appends the offset just past each
        # command's array header, from which in_message is true (a shared framing's).
        self.starts: list[int] | None = None
        self._args = 0     # arguments of the current command still to come; 0 between commands
        self._name = None  # the start of the current command's first argument
        self._keep = 0     # bytes of the bulk string being read still to add to _name

    @property
    def in_message(self) -> bool:
        """Some of a command has been seen, not all of it."""
        return self._args > 0

    @property
    def current(self) -> str | None:
        """The name of the command being framed once its first argument is read, else None."""
        if self._args and self._name is not None and not self._keep:
            return _command(self._name)
        return None

    def feed(self, data) -> list | None:
        """Follow `data`; return the commands completed in it, or None when there are none."""
        n = len(data)
        if (n and n <= _WHOLE_COMMANDS_MAX and self._state == _LINE and not self._args
                and not self._buf and data[0] == 42):
            out = self._small(data, n)
            if out is None:
                out = self._whole(bytes(data), n)
            if out is not None:
                return out
        out = None
        pos = 0
        try:
            while pos < n:
                state = self._state
                if state == _BULK:
                    left = self._left
                    take = left if left < n - pos else n - pos
                    if self._keep:
                        keep = self._keep if self._keep < take else take
                        self._name += data[pos:pos + keep]
                        self._keep -= keep
                    pos += take
                    self._left = left - take
                    if take < left:
                        break
                    if n - pos >= 2 and data[pos] == 13 and data[pos + 1] == 10:
                        pos += 2  # the common case, without buffering an empty line
                        out = self._argument_done(out, pos)
                    else:
                        self._state = _BULK_END
                elif state == _LINE:
                    pos, line = self._line(data, pos, n)
                    if line is None:
                        break
                    if self._args:
                        if line[:1] != b"$":
                            raise ProtocolError(f"expected '$' in a command, got {line[:1]!r}")
                        size = _length(line)
                        if size < 0:
                            raise ProtocolError(f"bad bulk string length {line[:30]!r}")
                        if self._name is None:
                            self._name = bytearray()
                            self._keep = size if size < NAME_MAX else NAME_MAX
                        self._left = size
                        self._state = _BULK
                    elif line[:1] == b"*":
                        count = _length(line)
                        if count > 0:
                            self._args = count
                            self._name = None
                            if self.starts is not None:
                                self.starts.append(pos)
                    else:
                        words = line.split(None, 1)
                        if words:
                            if self.starts is not None:  # in no message before its end
                                self.starts.append(pos)
                            out = self._done(out, _command(words[0][:NAME_MAX]), pos)
                elif state == _BULK_END:
                    pos, line = self._line(data, pos, n)
                    if line is None:
                        break
                    if line:
                        raise ProtocolError("bulk string not followed by CRLF")
                    out = self._argument_done(out, pos)
                else:
                    raise ProtocolError("framer used after it stopped")
        except (ProtocolError, Upgraded) as exc:
            self._state = _FINISHED
            if exc.completed is None:
                exc.completed = out or []
            if exc.at is None:  # raised at the end of what it read
                exc.at = pos
            raise
        return out

    def _small(self, data, n: int) -> list | None:
        """`data` (not empty) as whole commands of the most common kind (see
        _SMALL_COMMAND), framed by one regular expression: the commands, or None to
        leave the chunk to _whole()."""
        if self.ends is not None or self.starts is not None:
            return self._small_at(data, n)
        found = _SMALL_COMMAND.findall(data)
        if len(found) == 1:  # request-reply: no list of names to map
            name = found[0]
            return [_NAMES.get(name) or _name(name)] if name else None
        try:
            return list(map(_NAMES.__getitem__, found))
        except KeyError:  # a name not seen yet, or not whole commands
            if b"" in found:  # (or a command with an empty name)
                return None
            return list(map(_name, found))

    def _small_at(self, data, n: int) -> list | None:
        """_small(), with where each command starts and ends."""
        one = _SMALL_COMMAND.match(data)
        name = one[1]
        if not name:
            return None
        out = [_NAMES.get(name) or _name(name)]
        end = one.end()
        if end == n:
            if self.ends is not None:
                self.ends.append(n)
            if self.starts is not None:
                self.starts.append(4)  # past "*N\r\n"
            return out
        starts = [4]
        ends = [end]
        for match in _SMALL_COMMAND.finditer(data, end):
            name = match[1]
            if not name:
                return None
            out.append(_NAMES.get(name) or _name(name))
            start, end = match.span()
            starts.append(start + 4)
            ends.append(end)
        if self.ends is not None:
            self.ends += ends
        if self.starts is not None:
            self.starts += starts
        return out

    def _whole(self, data: bytes, n: int) -> list | None:
        """`data` as whole commands of bulk strings (arrays of "$" lines, CRLF line ends),
        framed in one pass: the commands, or None to leave the chunk to the line-by-line
        path, which decides (anything else, or a command cut short)."""
        out = []
        ends = []
        starts = []
        pos = 0
        find = data.find
        while pos < n:
            if data[pos] != 42:  # "*"
                return None
            eol = find(b"\r\n", pos)
            digits = data[pos + 1:eol]
            if eol < 0 or not digits.isdigit() or len(digits) > _MAX_DIGITS:
                return None
            count = int(digits)
            if count <= 0:
                return None
            pos = eol + 2
            starts.append(pos)
            name = None
            for _ in range(count):
                if pos >= n or data[pos] != 36:  # "$"
                    return None
                eol = find(b"\r\n", pos)
                digits = data[pos + 1:eol]
                if eol < 0 or not digits.isdigit() or len(digits) > _MAX_DIGITS:
                    return None
                pos = eol + 2 + int(digits)
                if data[pos:pos + 2] != b"\r\n":
                    return None
                if name is None:
                    name = data[eol + 2:min(pos, eol + 2 + NAME_MAX)]
                pos += 2
            out.append(_command(name))
            ends.append(pos)
        if self.ends is not None:
            self.ends += ends
        if self.starts is not None:
            self.starts += starts
        return out

    def _argument_done(self, out: list | None, end: int) -> list | None:
        self._state = _LINE
        self._args -= 1
        if self._args:
            return out
        return self._done(out, _command(self._name), end)


class ResponseFramer(_LineFramer):
    """Frames a server's replies; each completed one is ``(type, is_error)``.

    ``type`` is the reply's first byte ("+", "-", "$", "*", "%", ...); ``is_error`` is
    true for "-" and RESP3's "!". Attributes ("|") precede a reply and are not one;
    push messages (">") are out of band and complete nothing. After the reply to
    SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE or MONITOR (as named to ``expect()``), replies no
    longer answer requests one for one: the framer raises Upgraded, that reply last in
    its ``completed`` (under RESP3 the subscription's confirming push counts as the reply).
    """

    __slots__ = ("_counts", "_attributes", "_top", "_pending")

    def __init__(self) -> None:
        super().__init__()
        self._counts = []      # elements still to come in each open aggregate, outermost first
        self._attributes = []  # whether each open aggregate is an attribute
        self._top = None       # type of the top-level reply being read
        self._pending = deque()

    def expect(self, request: str) -> None:
        """Queue the name of the next command the server will answer."""
        self._pending.append(request)

    def expect_all(self, requests: list) -> None:
        """expect() each of `requests`, in order."""
        self._pending.extend(requests)

    def close(self) -> None:
        """The server closed: replies never end that way, so raise if one was cut short."""
        state = self._state
        self._state = _FINISHED
        if state == _FINISHED or (state == _LINE and not self._buf and not self._counts):
            return None
        raise ProtocolError("connection closed in the middle of a reply", [])

    def feed(self, data) -> list | None:
        """Follow `data`; return the replies completed in it, or None when there are none."""
        n = len(data)
        if n and self._state == _LINE and not self._buf and not self._counts:
            if data[0] == 42:  # "*"
                out = self._array(data, n)
                if out is not None:
                    return out
            else:
                if n <= _WHOLE_MAX:
                    whole = _WHOLE_REPLY.fullmatch(data)
                    if whole is not None:
                        out = self._whole(data, whole)
                        if out is not None:
                            return out
                if n <= _WHOLE_COMMANDS_MAX and self.ends is None:
                    out = self._same(data, n)
                    if out is None:
                        out = self._replies(data)
                    if out is not None:
                        return out
        out = None
        pos = 0
        try:
            while pos < n:
                state = self._state
                if state == _BULK:
                    left = self._left
                    if n - pos < left:
                        self._left = left - (n - pos)
                        break
                    pos += left
                    self._left = 0
                    if n - pos >= 2 and data[pos] == 13 and data[pos + 1] == 10:
                        pos += 2  # the common case, without buffering an empty line
                        self._state = _LINE
                        out = self._element_done(out, pos)
                    else:
                        self._state = _BULK_END
                elif state == _LINE:
                    counts = self._counts
                    if counts and counts[-1] > 1 and not self._buf:
                        pos = self._skip_elements(data, pos, counts)
                        if pos == n:
                            break
                    pos, line = self._line(data, pos, n)
                    if line is None:
                        break
                    out = self._type_line(line, out, pos)
                elif state == _BULK_END:
                    pos, line = self._line(data, pos, n)
                    if line is None:
                        break
                    if line:
                        raise ProtocolError("bulk string not followed by CRLF")
                    self._state = _LINE
                    out = self._element_done(out, pos)
                else:
                    raise ProtocolError("framer used after it stopped")
        except (ProtocolError, Upgraded) as exc:
            self._state = _FINISHED
            if exc.completed is None:
                exc.completed = out or []
            raise
        return out

    def _whole(self, data, whole: re.Match) -> list | None:
        """`data` is one whole short reply (see _WHOLE_REPLY): frame it in one step, or
        None to leave it to the line-by-line path (a bulk string of another length, a
        reply to a command that leaves request-reply)."""
        size = whole.group(1)
        if size is not None and int(size) != whole.end(2) - whole.start(2):
            return None
        pending = self._pending
        if pending:
            if pending[0] in _LEAVES_REQUEST_REPLY:
                return None
            pending.popleft()
        if self.ends is not None:
            self.ends.append(len(data))
        return [_WHOLE_ITEMS[data[0]]]

    def _same(self, data, n: int) -> list | None:
        """`data` as the answers to every request expected, two or more, all of one
        type and none an error (see _SAME_REPLIES): the replies, or None to leave the
        chunk to the other paths (anything else, an answer to a command that leaves
        request-reply). No offsets: a framer that wants them does not call this."""
        pending = self._pending
        count = len(pending)
        runs = _SAME_REPLIES.get(data[0])
        if count < 2 or runs is None:
            return None
        pos = 0
        left = count
        for block, run in runs:
            while left >= block:
                match = run.match(data, pos)
                if match is None:
                    return None
                pos = match.end()
                left -= block
        if pos != n or not _LEAVES_REQUEST_REPLY.isdisjoint(pending):
            return None
        pending.clear()
        return [_SAME_ITEMS[data[0]]] * count

    def _replies(self, data) -> list | None:
        """`data` as whole short replies (see _REPLY_RUN), framed by one regular
        expression: the replies, or None to leave the chunk to the line-by-line path
        (anything else, a reply to a command that leaves request-reply). No offsets:
        a framer that wants them (`ends`) does not call this."""
        try:
            out = list(map(_RUN_ITEMS.__getitem__, _REPLY_RUN.findall(data)))
        except KeyError:  # not whole short replies
            return None
        pending = self._pending
        count = len(out)
        if count >= len(pending):
            if not _LEAVES_REQUEST_REPLY.isdisjoint(pending):
                return None
            pending.clear()
        else:
            if not _LEAVES_REQUEST_REPLY.isdisjoint(islice(pending, count)):
                return None
            popleft = pending.popleft
            for _ in repeat(None, count):
                popleft()
        return out

    def _array(self, data, n: int) -> list | None:
        """`data` as one whole array of bulk strings of one length (LRANGE over values
        of one size), framed by a few slices, each of one byte of every element's
        framing; or None to leave it to the line-by-line path (anything else, a reply
        to a command that leaves request-reply)."""
        head = _ARRAY_HEAD.match(data)
        if head is None:
            return None
        digits = head.group(2)
        width = int(digits) + len(digits) + 5  # "$", the length, CRLF, contents, CRLF
        first = head.start(2) - 1
        count = int(head.group(1))
        if first + count * width != n:
            return None
        pending = self._pending
        if pending and pending[0] in _LEAVES_REQUEST_REPLY:
            return None
        body = bytes(data[first:])
        for offset, byte in _framing(digits, width):
            if body[offset::width] != byte * count:  # not that byte in every element
                return None
        if pending:
            pending.popleft()
        return self._done(None, ("*", False), n)

    @staticmethod
    def _skip_elements(data, pos: int, counts: list) -> int:
        """Skip the small elements at `pos` (see _RUNS), all but the last of the innermost
        open aggregate (the line-by-line path closes it); return where they end."""
        left = counts[-1] - 1
        start = left
        for block, run in _RUNS:
            while left >= block:
                m = run.match(data, pos)
                if m is None:
                    break
                pos = m.end()
                left -= block
        if left != start:
            counts[-1] = left + 1
        return pos

    def _type_line(self, line: bytes, out: list | None, end: int) -> list | None:
        kind = line[0] if line else -1
        name = _TYPES.get(kind)
        if name is None:
            raise ProtocolError(f"unknown RESP type byte {line[:1]!r}")
        if not self._counts and kind != _ATTRIBUTE:
            self._top = name
        if kind in _SIMPLE:
            _check_simple(kind, line)
            return self._element_done(out, end)
        size = _length(line)
        if kind in _BLOBS:
            if size >= 0:
                self._left = size
                self._state = _BULK
            elif size == -1 and kind in _NULLABLE:
                return self._element_done(out, end)
            else:
                raise ProtocolError(f"bad length {line[:30]!r}")
            return out
        if size > 0:
            if len(self._counts) >= MAX_DEPTH:
                raise ProtocolError(f"reply nested deeper than {MAX_DEPTH}")
            self._counts.append(size * _AGGREGATE_WIDTH[kind])
            self._attributes.append(kind == _ATTRIBUTE)
            return out
        if size == 0 or (size == -1 and kind in _NULLABLE):
            # An empty attribute annotates nothing; any other empty aggregate is an element.
            return out if kind == _ATTRIBUTE else self._element_done(out, end)
        raise ProtocolError(f"bad length {line[:30]!r}")

    def _element_done(self, out: list | None, end: int) -> list | None:
        """One value ended (at `end`): close the aggregates it completes; maybe a whole reply."""
        counts = self._counts
        while counts:
            counts[-1] -= 1
            if counts[-1]:
                return out
            counts.pop()
            if self._attributes.pop():
                return out  # an attribute is not an element of its parent, nor a reply
        top = self._top
        self._top = None
        pending = self._pending
        if top == ">":
            # RESP3 confirms subscriptions with pushes, not replies: the push answers.
            if pending and pending[0] in _LEAVES_REQUEST_REPLY:
                raise Upgraded(f"{pending[0]}: replies no longer answer requests",
                               self._done(out, (top, False), end))
            return out
        request = pending.popleft() if pending else None
        is_error = top in _ERRORS
        out = self._done(out, (top, is_error), end)
        if request in _LEAVES_REQUEST_REPLY and not is_error:
            raise Upgraded(f"{request}: replies no longer answer requests", out)
        return out


# A bulk string's length digits -> (offset, byte) of each byte of its framing
_FRAMINGS: dict[bytes, tuple] = {}
_FRAMINGS_KEPT = 256


def _framing(digits: bytes, width: int) -> tuple:
    """Where each byte of the framing of a bulk string of `width` bytes in all, whose
    length is `digits`, is, and what it is: "$", the digits, CRLF; CRLF at its end."""
    framing = _FRAMINGS.get(digits)
    if framing is None:
        line = b"$" + digits + b"\r\n"
        framing = (*((offset, line[offset:offset + 1]) for offset in range(len(line))),
                   (width - 2, b"\r"), (width - 1, b"\n"))
        if len(_FRAMINGS) < _FRAMINGS_KEPT:
            _FRAMINGS[digits] = framing
    return framing


def _append(out: list | None, item) -> list:
    if out is None:
        return [item]
    out.append(item)
    return out


def _command(name) -> str:
    return name.decode("latin-1").upper()


def _name(name: bytes) -> str:
    """_command(name), remembered for the next time (up to _NAMES_KEPT names)."""
    command = _NAMES.get(name)
    if command is None:
        command = _command(name)
        if name and len(_NAMES) < _NAMES_KEPT:  # never b"": see _SMALL_COMMAND
            _NAMES[name] = command
    return command


def _length(line: bytes) -> int:
    """The signed decimal after a line's type byte, as strictly as Redis reads it."""
    digits = line[2:] if line[1:2] == b"-" else line[1:]
    if not digits.isdigit() or len(digits) > _MAX_DIGITS:  # isdigit: ASCII only, no sign
        raise ProtocolError(f"bad length {line[:30]!r}")
    return int(line[1:])


def _check_simple(kind: int, line: bytes) -> None:
    if kind == 58 or kind == 40:  # ":" integer, "(" big number
        ok = _INTEGER.fullmatch(line, 1) is not None
    elif kind == 95:  # "_" null
        ok = len(line) == 1
    elif kind == 35:  # "#" boolean
        ok = line[1:] == b"t" or line[1:] == b"f"
    else:
        ok = True
    if not ok:
        raise ProtocolError(f"bad {chr(kind)!r} reply {line[:30]!r}")
