"""HTTP/1.x framing for passive observers: where each request and each response ends (RFC 9112).

Only the start-line and header section (and chunk-size lines, trailer sections) are
buffered, up to `max_head` bytes each (MAX_HEAD unless the framer is given less: a
route's observe-max-header); bodies are never copied, only counted down.
Lines may end in CRLF or a bare LF (RFC 9112 section 2.2). Garbage is caught early: at
its first byte when no message can start with it, else at the end of its first line.
"""
from __future__ import annotations

import re
from collections import deque

from . import ProtocolError, Upgraded

MAX_HEAD = 64 * 1024  # default bytes of one header section, trailer section or chunk-size line

_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line ending a section (its first LF ends a line)
_BLANKS = re.compile(rb"[\r\n]*")
_LF = re.compile(rb"\n")
_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+")
# Field lines, each possibly continued by obs-fold lines, then the blank line.
_FIELD_LINES = re.compile(rb"(?:" + _TCHAR + rb"+:[^\n]*\n(?:[ \t][^\n]*\n)*)*\r?\n")
_FRAMING_FIELD = re.compile(
    rb"^(?:(content-length)|transfer-encoding):([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
_FOLD = re.compile(rb"\r?\n[ \t]+")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) [^ ]+ HTTP/1\.[0-9]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: .*)?", re.S)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?", re.S)
_MAX_LENGTH_DIGITS = 18  # a Content-Length beyond 10**18 bytes is garbage, not a body

# The fast path: a whole, plain head (CRLF line ends, no folding, at most one framing
# field) in one chunk, matched by one regular expression. Anything else takes the
# general state machine below, which accepts and rejects exactly as before.
_FAST_FIELDS = rb"(?:" + _TCHAR + rb"+:[^\r\n]*\r\n)*\r\n"
_FAST_REQUEST = re.compile(rb"(" + _TCHAR + rb"+) [^ \r\n]+ HTTP/1\.[0-9]\r\n" + _FAST_FIELDS)
_FAST_STATUS = re.compile(rb"HTTP/1\.[0-9] ([2-9][0-9]{2})(?: [^\r\n]*)?\r\n" + _FAST_FIELDS)
_FAST_FRAMING = re.compile(rb"\n(?:content-length|transfer-encoding):", re.I)
_FAST_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]{1,18})[ \t]*\r\n", re.I)

# Parser states.
_START = 0        # between messages (stray blank lines are skipped)
_LINE = 1         # in a start-line (buffered)
_HEAD = 2         # in a field section (buffered)
_BODY = 3         # counting down a Content-Length body
_SIZE = 4         # in a chunk-size line (buffered)
_DATA = 5         # counting down chunk data
_DATA_CR = 6      # expecting the CRLF after chunk data
_DATA_LF = 7
_TRAILER = 8      # in a trailer section (buffered)
_UNTIL_CLOSE = 9  # a response body delimited by the connection's close
_OPAQUE = 10      # past a CONNECT request: whatever follows is the tunnel's, or unknown
_FINISHED = 11    # raised or closed

# Body framing decided by a header section, besides a Content-Length (an int).
_CHUNKED = -1
_TO_CLOSE = -2


class _MessageFramer:
    """The state machine shared by both directions; subclasses parse the start-line."""

    __slots__ = ("_state", "_buf", "_max_head", "_fast_max", "_limit", "_left", "_item", "ends",
                 "starts")

    _FIRST_BYTES: frozenset  # the bytes a start-line can begin with
    _KIND: str               # "request" or "status", for error messages

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        """`max_head`: the most one start-line and header section together, one trailer
        section or one chunk-size line may take; past it, ProtocolError."""
        self._state = _START
        self._buf = bytearray()
        self._max_head = max_head
        self._fast_max = max_head - 8  # near the limit, the state machine decides (and counts)
        self._limit = max_head  # the most the block being buffered may take
        self._left = 0          # body or chunk bytes still to come
        self._item = None       # the message being framed, returned once its body ends
        # A list to track where messages end: feed() appends the offset, in the chunk
        # fed, just past each message it completes (for capturing whole answers).
        self.ends: list[int] | None = None
        # A list to track where messages start: feed() appends the offset just past each
        # message's first byte, from which in_message is true (a shared framing's).
        self.starts: list[int] | None = None

    def feed(self, data) -> list | None:
        """Follow `data`; return the messages completed in it, or None when there are none."""
        out = None
        pos = 0
        n = len(data)
        try:
            while pos < n:
                state = self._state
                if state == _BODY or state == _DATA:
                    left = self._left
                    if n - pos < left:
                        self._left = left - (n - pos)
                        break
                    pos += left
                    self._left = 0
                    if state == _DATA:
                        self._state = _DATA_CR
                    else:
                        out = self._complete(out, pos)
                elif state == _START:
                    pos = _BLANKS.match(data, pos).end()
                    if pos < n:
                        if self.starts is not None:
                            self.starts.append(pos + 1)
                        fast = self._fast(data, pos, out)
                        if fast is not None:
                            pos, out = fast
                            continue
                        if data[pos] not in self._FIRST_BYTES:
                            line = bytes(data[pos:pos + 60]).split(b"\n", 1)[0]
                            raise ProtocolError(f"bad {self._KIND} line {_strip_cr(line)!r}",
                                                at=pos + 1)
                        self._state = _LINE
                elif state == _LINE:
                    pos, line = self._take(data, pos, n, _LF)
                    if line is None:
                        break
                    self._start_line(_strip_cr(line[:-1]))
                    # The field section is buffered after an LF, as if the start-line's,
                    # so that an empty one ends at its first CRLF; the two share max_head.
                    self._buf.append(10)
                    self._limit = self._max_head - len(line) + 1
                    self._state = _HEAD
                elif state == _HEAD:
                    pos, block = self._take(data, pos, n, _HEAD_END)
                    if block is None:
                        break
                    out = self._fields(block, out, pos)
                elif state == _SIZE:
                    pos, line = self._take(data, pos, n, _LF)
                    if line is None:
                        break
                    line = line[:-2] if line[-2:] == b"\r\n" else line[:-1]
                    m = _CHUNK_SIZE.fullmatch(line)
                    if m is None:
                        raise ProtocolError(f"bad chunk-size line {line[:60]!r}")
                    size = int(m.group(1), 16)
                    if size:
                        self._left = size
                        self._state = _DATA
                    else:
                        self._buf.append(10)  # as for a field section
                        self._state = _TRAILER
                elif state == _DATA_CR or state == _DATA_LF:
                    byte = data[pos]
                    pos += 1
                    if byte == 10:
                        self._state = _SIZE
                    elif byte == 13 and state == _DATA_CR:
                        self._state = _DATA_LF
                    else:
                        raise ProtocolError("chunk data not followed by CRLF")
                elif state == _TRAILER:
                    pos, block = self._take(data, pos, n, _HEAD_END)
                    if block is None:
                        break
                    _check_fields(block)
                    out = self._complete(out, pos)
                elif state == _FINISHED:
                    raise ProtocolError("framer used after it stopped")
                else:  # _UNTIL_CLOSE, _OPAQUE: nothing to frame until the end
                    break
        except (ProtocolError, Upgraded) as exc:
            self._state = _FINISHED
            if exc.completed is None:
                exc.completed = out or []
            if exc.at is None:  # raised at the end of what it read
                exc.at = pos
            raise
        return out

    def _take(self, data, pos: int, n: int, end: re.Pattern) -> tuple[int, bytes | None]:
        """Buffer `data` from `pos` through the first match of `end`.

        Returns (position after the match, the buffered block), or (n, None) when the
        match is not in this chunk yet. Only the block is copied, never what follows it.
        """
        buf = self._buf
        room = self._limit - len(buf)
        stop = -1
        if buf:
            # The terminator may straddle the previous chunk and this one; the
            # buffer never holds a whole one, so any match here ends in `data`.
            tail = bytes(buf[-2:])
            m = end.search(tail + bytes(data[pos:pos + 2]))
            if m is not None:
                stop = pos + m.end() - len(tail)
                if stop - pos > room:
                    raise ProtocolError(f"header section or line over {self._max_head} bytes",
                                        at=stop)
        if stop < 0:
            m = end.search(data, pos, min(n, pos + room))
            if m is None:
                if n - pos >= room:
                    raise ProtocolError(f"header section or line over {self._max_head} bytes",
                                        at=pos + room)
                buf += data[pos:n]
                return n, None
            stop = m.end()
        buf += data[pos:stop]
        block = bytes(buf)
        buf.clear()
        self._limit = self._max_head
        return stop, block

    def _complete(self, out: list | None, end: int) -> list:
        """The message in _item ended at `end` in the chunk being fed."""
        self._state = _START
        if self.ends is not None:
            self.ends.append(end)
        if out is None:
            return [self._item]
        out.append(self._item)
        return out

    def _start_body(self, framing: int | None, out: list | None, end: int) -> list | None:
        """Enter the body state `framing` calls for; a message without a body completes
        (at `end`, where its head ended)."""
        if framing == _CHUNKED:
            self._state = _SIZE
        elif framing == _TO_CLOSE:
            self._state = _UNTIL_CLOSE
        elif framing:
            self._left = framing
            self._state = _BODY
        else:
            return self._complete(out, end)
        return out

    def _start_line(self, line: bytes) -> None:
        """Check a start-line (without its line end) and keep what it says in _item."""
        raise NotImplementedError

    def _fast(self, data, pos: int, out: list | None) -> tuple[int, list | None] | None:
        """Frame a plain head starting at `pos` in one go: (position after it, out), or
        None to leave it to the state machine."""
        raise NotImplementedError

    @staticmethod
    def _fast_framing(head: bytes) -> int | None | bool:
        """A plain head's Content-Length, None without one, False if it needs the
        general path (Transfer-Encoding, several framing fields, odd values)."""
        found = _FAST_FRAMING.findall(head)
        if not found:
            return None
        if len(found) > 1:
            return False
        m = _FAST_LENGTH.search(head)
        return int(m.group(1)) if m is not None else False

    def _fields(self, block: bytes, out: list | None, end: int) -> list | None:
        """Act on a whole field section: LF, field lines, blank line (ending at `end`)."""
        raise NotImplementedError


class RequestFramer(_MessageFramer):
    """Frames a client's requests; each completed request is its method ("GET", ...).

    A CONNECT request completes at the end of its header section; whatever the client
    sends after it belongs to the tunnel (or, if the CONNECT is refused, to requests
    this framer no longer follows): the ResponseFramer raises Upgraded on a 2xx.
    """

    __slots__ = ()
    _FIRST_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                             b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    _KIND = "request"

    @property
    def in_message(self) -> bool:
        """Some of a request has been seen, not all of it (its answer may come early)."""
        return self._state not in (_START, _FINISHED, _OPAQUE)

    @property
    def current(self) -> str | None:
        """The method of the request being framed once its request line is read, else None."""
        return None if self._state in (_START, _LINE, _OPAQUE, _FINISHED) else self._item

    def _start_line(self, line: bytes) -> None:
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            raise ProtocolError(f"bad request line {line[:60]!r}")
        self._item = m.group(1).decode("ascii")

    def _fast(self, data, pos: int, out: list | None) -> tuple[int, list | None] | None:
        m = _FAST_REQUEST.match(data, pos)
        if m is None or m.end() - pos > self._fast_max:
            return None
        head = m.group(0)
        length = self._fast_framing(head)
        method = m.group(1)
        if length is False or method == b"CONNECT":
            return None
        self._item = method.decode("ascii")
        return m.end(), self._start_body(length or 0, out, m.end())

    def _fields(self, block: bytes, out: list | None, end: int) -> list | None:
        framing = _body_framing(block, request=True)
        method = self._item
        if method == "CONNECT":
            out = self._complete(out, end)
            self._state = _OPAQUE
            return out
        # RFC 9112 section 6.3: a request without Content-Length or chunked has no body.
        return self._start_body(0 if framing is None else framing, out, end)


class ResponseFramer(_MessageFramer):
    """Frames a backend's responses; each completed one is ``(status, status >= 500)``.

    ``expect(method)`` must be called for each request, in order, before its response
    is fed: a response to HEAD has no body, a 2xx to CONNECT opens a tunnel. A response
    with no request expected is framed as if it answered a GET. Interim responses (1xx)
    are skipped, except 101 Switching Protocols which, like a 2xx to CONNECT, completes
    at the end of its header section and raises Upgraded.
    """

    __slots__ = ("_pending",)
    _FIRST_BYTES = frozenset(b"H")
    _KIND = "status"

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        super().__init__(max_head)
        self._pending = deque()

    def expect(self, request: str) -> None:
        """Queue the method of the next request the backend will answer."""
        self._pending.append(request)

    def expect_all(self, requests: list) -> None:
        """expect() each of `requests`, in order."""
        self._pending.extend(requests)

    def close(self) -> list | None:
        """The backend closed: complete a close-delimited response; raise if one was cut short."""
        state = self._state
        self._state = _FINISHED
        if state == _UNTIL_CLOSE:
            return [self._item]
        if state == _START or state == _FINISHED:
            return None
        raise ProtocolError("connection closed in the middle of a response", [])

    def _start_line(self, line: bytes) -> None:
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            raise ProtocolError(f"bad status line {line[:60]!r}")
        status = int(m.group(1))
        if status < 100:
            raise ProtocolError(f"bad status code {status:03d}")
        self._item = (status, status >= 500)

    def _fast(self, data, pos: int, out: list | None) -> tuple[int, list | None] | None:
        m = _FAST_STATUS.match(data, pos)  # final responses only: 1xx take the long way
        if m is None or m.end() - pos > self._fast_max:
            return None
        length = self._fast_framing(m.group(0))
        request = self._pending[0] if self._pending else None
        if length is False or request == "CONNECT":
            return None
        status = int(m.group(1))
        if self._pending:
            self._pending.popleft()
        self._item = (status, status >= 500)
        if request == "HEAD" or status == 204 or status == 304:
            return m.end(), self._complete(out, m.end())
        return m.end(), self._start_body(_TO_CLOSE if length is None else length, out,
                                         m.end())

    def _fields(self, block: bytes, out: list | None, end: int) -> list | None:
        framing = _body_framing(block, request=False)
        status = self._item[0]
        if status < 200 and status != 101:
            self._state = _START  # interim response: the final one is still to come
            return out
        request = self._pending.popleft() if self._pending else None
        if status == 101:
            raise Upgraded("101 Switching Protocols", self._complete(out, end))
        if request == "CONNECT" and status < 300:
            raise Upgraded(f"CONNECT answered {status}", self._complete(out, end))
        if request == "HEAD" or status == 204 or status == 304:
            return self._complete(out, end)
        return self._start_body(_TO_CLOSE if framing is None else framing, out, end)


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line[-1:] == b"\r" else line


def _body_framing(block: bytes, request: bool) -> int | None:
    """How the body after this field section is delimited (RFC 9112 section 6.3).

    `block` is an LF, the field lines and the blank line. Returns _CHUNKED, _TO_CLOSE,
    a Content-Length, or None when neither Transfer-Encoding nor Content-Length is
    present. Validates every field line.
    """
    _check_fields(block)
    lengths = []
    codings = []
    for m in _FRAMING_FIELD.finditer(block, 1):
        value = m.group(2)
        if b"\n" in value:
            value = _FOLD.sub(b" ", value)
        (lengths if m.group(1) else codings).append(value)
    if codings:
        names = []
        for value in codings:
            for coding in value.split(b","):
                coding = coding.split(b";", 1)[0].strip(b" \t\r").lower()
                if coding:
                    names.append(coding)
        chunked = names.count(b"chunked")
        if chunked > 1 or (chunked and names[-1] != b"chunked"):
            raise ProtocolError("chunked is not the final transfer coding, or is applied twice")
        if chunked:
            return _CHUNKED  # Transfer-Encoding wins over Content-Length
        if request:
            raise ProtocolError("request with a transfer coding other than chunked")
        return _TO_CLOSE
    if lengths:
        values = {v.strip(b" \t\r") for value in lengths for v in value.split(b",")}
        if len(values) != 1:
            raise ProtocolError("conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
            raise ProtocolError(f"bad Content-Length {value[:30]!r}")
        return int(value)
    return None


def _check_fields(block: bytes) -> None:
    """Raise unless `block` is an LF, well-formed field lines and the blank line."""
    if _FIELD_LINES.fullmatch(block, 1) is not None:
        return
    for i, line in enumerate(block[1:].split(b"\n")[:-2]):  # not the blank line
        line = _strip_cr(line)
        if line[:1] == b" " or line[:1] == b"\t":
            if i == 0:
                raise ProtocolError("whitespace before the first header field")
            continue
        name, colon, _ = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise ProtocolError(f"bad header line {line[:60]!r}")
    raise ProtocolError("bad header section")
