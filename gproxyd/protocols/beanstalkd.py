"""beanstalkd framing: where each command and reply ends, for observers and for interceptors.

Two kinds of readers follow the beanstalkd protocol (doc/protocol.txt), as the server
itself frames a client's stream (prot.c):

- ``RequestFramer`` and ``ResponseFramer`` are passive framers with the contract of the
  other framers of this package: they buffer only lines and count job bodies down.
- ``CommandReader`` and ``ReplyReader`` keep every byte, for an interceptor that looks
  at (and may rewrite) whole commands and replies. What they cannot follow they hand
  back untouched, as plain bytes, from then on.

How beanstalkd 1.12 frames a client's stream (checked against the real server by
tests/test_protocols_beanstalkd.py; replies quoted byte for byte):

- A command line ends at its first CR, which must be followed by LF, and takes at most
  MAX_LINE = 224 bytes, CRLF included. An empty line is a command: ``UNKNOWN_COMMAND``.
- A longer line is dropped up to the next CRLF the server finds, scanning 224-byte
  windows, and answered with one ``BAD_FORMAT``: ``use <300 a>\\r\\nlist-tube-used\\r\\n``
  gets ``BAD_FORMAT\\r\\nUSING default\\r\\n``. A CRLF across two windows is not seen:
  ``<223 x>\\r\\nlist-tube-used\\r\\n`` gets ``BAD_FORMAT\\r\\n`` alone, the next command
  being taken for the end of the long line.
- A CR not followed by LF does not end the line, which then runs on until it is too long:
  ``foo\\rbar\\r\\n<220 x>\\r\\nuse s\\r\\n`` gets ``BAD_FORMAT\\r\\nUSING s\\r\\n``.
- ``put <pri> <delay> <ttr> <bytes>`` is well-formed when its four arguments are decimal
  digits (spaces before each, nothing after the last) of values below 2**32; a ttr of 0
  is accepted, and raised to 1. Then the server reads exactly <bytes> + 2 bytes:
  followed by CRLF, the job is queued (``INSERTED <id>``); otherwise the server answers
  ``EXPECTED_CRLF`` and reads its next command after those bytes:
  ``put 0 0 1 3\\r\\nabcd\\r\\nlist-tube-used\\r\\n`` gets
  ``EXPECTED_CRLF\\r\\nUNKNOWN_COMMAND\\r\\n`` (the command ``\\nlist-tube-used``).
- A put whose <bytes> exceed the server's max-job-size (``beanstalkd -z``, 65535 by
  default) has those <bytes> + 2 bytes dropped unchecked and is answered ``JOB_TOO_BIG``
  -- even when something follows <bytes> on the line. So with ``-z 100``,
  ``put 0 0 1 101x\\r\\n`` then 103 bytes then ``list-tube-used\\r\\n`` gets
  ``JOB_TOO_BIG\\r\\nUSING default\\r\\n``.
- Any other bad put line (missing or non-numeric arguments, a value of 2**32 or more,
  anything after a small enough <bytes>) is answered ``BAD_FORMAT`` and no body is read:
  what the client meant as the body is read as commands. ``put 0 0 1 3x\\r\\nabc\\r\\n``
  gets ``BAD_FORMAT\\r\\nUNKNOWN_COMMAND\\r\\n``. ``put`` alone is an unknown command.
- Every other line gets exactly one reply: ``UNKNOWN_COMMAND`` for a name the server
  does not know, ``BAD_FORMAT`` for bad arguments or a NUL in the line -- except ``quit``,
  after which the server closes the connection without a reply.
- Replies are lines, ``RESERVED <id> <bytes>``, ``FOUND <id> <bytes>`` and ``OK <bytes>``
  followed by <bytes> bytes of data and CRLF. None is sent unasked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import ProtocolError

MAX_LINE = 224         # beanstalkd's LINE_BUF_SIZE: one command line, its CRLF included
MAX_REPLY_LINE = 1024  # beanstalkd's own replies fit in 224 bytes too; some room to spare
MAX_JOB_SIZE = 65535   # beanstalkd's default max-job-size (-z)

_U32_MAX = 2**32 - 1
_CR = re.compile(rb"\r")
# read_u32() four times: spaces, then digits up to a non-digit; nothing may follow <bytes>.
_PUT = re.compile(rb"put +([0-9]+) +([0-9]+) +([0-9]+) +([0-9]+)")
_PRINTABLE = re.compile(rb"[ -~]*")
_TUBE = rb"[-+/;.$_()A-Za-z0-9]{1,200}"  # beanstalkd's NAME_CHARS, at most 200 of them
_REPLY = re.compile(
    rb"(?:(?:RESERVED|FOUND) [0-9]{1,20}|OK) ([0-9]{1,10})"  # the lines a body follows
    rb"|(?:INSERTED|WATCHING) [0-9]{1,20}|(?:BURIED|KICKED)(?: [0-9]{1,20})?"
    rb"|USING " + _TUBE +
    rb"|NOT_FOUND|DEADLINE_SOON|TIMED_OUT|DELETED|RELEASED|TOUCHED|NOT_IGNORED|PAUSED"
    rb"|OUT_OF_MEMORY|INTERNAL_ERROR|DRAINING|BAD_FORMAT|UNKNOWN_COMMAND|EXPECTED_CRLF"
    rb"|JOB_TOO_BIG")
# The replies that say the command failed, rather than reporting a normal outcome
# (NOT_FOUND, TIMED_OUT, DEADLINE_SOON, BURIED, ...).
ERRORS = frozenset({"OUT_OF_MEMORY", "INTERNAL_ERROR", "BAD_FORMAT", "UNKNOWN_COMMAND",
                    "EXPECTED_CRLF", "JOB_TOO_BIG", "DRAINING"})

# Framer states.
_LINE = 0     # in a line (buffered)
_BODY = 1     # counting down a job body
_BODY_CR = 2  # expecting the CRLF after it
_BODY_LF = 3
_FINISHED = 4  # raised or closed


def _line_end(held, data, pos: int, n: int, limit: int) -> int:
    """Where the line begun by `held` and continued at data[pos] (pos < n) ends in `data`:
    the offset just past its LF, or -1 when it goes on past `n` (hold data[pos:n] then).

    Raises ProtocolError when beanstalkd would not end the line at a CRLF within `limit`
    bytes: a CR not followed by LF, or `limit` - 1 bytes without a CR.
    """
    if held and held[-1] == 13:
        if data[pos] == 10:
            return pos + 1
        raise ProtocolError("CR not followed by LF")
    room = limit - 2 - len(held)  # bytes the line may still take before its CR
    m = _CR.search(data, pos, min(n, pos + room + 1))
    if m is None:
        if n - pos > room:
            raise ProtocolError(f"line over {limit} bytes")
        return -1
    cr = m.start()
    if cr + 1 == n:
        return -1  # held with the line: the next chunk says whether an LF follows
    if data[cr + 1] == 10:
        return cr + 2
    raise ProtocolError("CR not followed by LF")


def _take_line(buf: bytearray, data, pos: int, end: int) -> bytes:
    """The line begun in `buf` and ending at `end` (see _line_end), without its CRLF;
    `buf` is emptied."""
    if not buf:
        return bytes(data[pos:end - 2])
    if end == pos + 1:
        del buf[-1]  # the CR, held from the previous chunk
    else:
        buf += data[pos:end - 2]
    line = bytes(buf)
    buf.clear()
    return line


def _put_size(line: bytes) -> int | None:
    """The <bytes> of a put line (without its CRLF) beanstalkd reads a body after, else None."""
    args = put_args(line)
    return None if args is None else args[3]


def put_args(command: Command | bytes) -> tuple[int, int, int, int] | None:
    """(pri, delay, ttr, bytes) of a well-formed put, else None.

    `command` is a Command or a command line (with or without its CRLF). Well-formed is
    what beanstalkd reads a body after whatever its max-job-size: "put", then four
    values below 2**32, each after one or more spaces, in decimal digits, and nothing
    after the last. The values are as sent (beanstalkd raises a ttr of 0 to 1).
    """
    if isinstance(command, Command):
        line = command.raw.partition(b"\r\n")[0]
    else:
        line = bytes(command)
        if line[-2:] == b"\r\n":
            line = line[:-2]
    m = _PUT.fullmatch(line)
    if m is None:
        return None
    pri, delay, ttr, size = (int(value) for value in m.groups())
    if max(pri, delay, ttr, size) > _U32_MAX:
        return None
    return pri, delay, ttr, size


def _append(out: list | None, item) -> list:
    if out is None:
        return [item]
    out.append(item)
    return out


class RequestFramer:
    """Frames a client's commands; each completed one is its name as sent ("put", ...).

    The name is the line up to its first space (so "" for an empty line, which beanstalkd
    answers too). A put completes after its body and CRLF. ProtocolError, where the
    server's framing cannot be followed or the client is evidently lost: a line over
    MAX_LINE bytes or with a CR not followed by LF, a line with bytes other than
    printable ASCII, a put line that is not well-formed (see put_args: the client surely
    sent a body the server reads as commands), a body not followed by CRLF.
    """

    __slots__ = ("_state", "_buf", "_left", "ends")

    def __init__(self) -> None:
        self._state = _LINE
        self._buf = bytearray()  # the start of a line (at most MAX_LINE - 1 bytes)
        self._left = 0           # body bytes still to come
        # A list to track where commands end: feed() appends the offset, in the chunk
        # fed, just past each command it completes (for capturing whole commands).
        self.ends: list[int] | None = None

    @property
    def in_message(self) -> bool:
        """Some of a command has been seen, not all of it."""
        state = self._state
        return state == _BODY or state == _BODY_CR or state == _BODY_LF or (
            state == _LINE and bool(self._buf))

    @property
    def current(self) -> str | None:
        """"put" while a put's body is coming (its line was read), else None."""
        state = self._state
        return "put" if state == _BODY or state == _BODY_CR or state == _BODY_LF else None

    def feed(self, data) -> list | None:
        """Follow `data`; return the commands completed in it, or None when there are none."""
        out = None
        pos = 0
        n = len(data)
        try:
            while pos < n:
                state = self._state
                if state == _BODY:
                    left = self._left
                    if n - pos < left:
                        self._left = left - (n - pos)
                        break
                    pos += left
                    self._left = 0
                    if n - pos >= 2 and data[pos] == 13 and data[pos + 1] == 10:
                        pos += 2  # the common case, one state change instead of three
                        out = self._done(out, "put", pos)
                    else:
                        self._state = _BODY_CR
                elif state == _LINE:
                    buf = self._buf
                    end = _line_end(buf, data, pos, n, MAX_LINE)
                    if end < 0:
                        buf += data[pos:n]
                        break
                    line = _take_line(buf, data, pos, end)
                    pos = end
                    out = self._command(line, out, pos)
                elif state == _BODY_CR or state == _BODY_LF:
                    byte = data[pos]
                    pos += 1
                    if state == _BODY_CR and byte == 13:
                        self._state = _BODY_LF
                    elif state == _BODY_LF and byte == 10:
                        out = self._done(out, "put", pos)
                    else:
                        raise ProtocolError("job body not followed by CRLF")
                else:
                    raise ProtocolError("framer used after it stopped")
        except ProtocolError as exc:
            self._state = _FINISHED
            if exc.completed is None:
                exc.completed = out or []
            raise
        return out

    def _command(self, line: bytes, out: list | None, end: int) -> list | None:
        """A command line (without its CRLF) ended at `end`."""
        if _PRINTABLE.fullmatch(line) is None:
            raise ProtocolError(f"bad command line {line[:40]!r}")
        if line[:4] == b"put ":
            size = _put_size(line)
            if size is None:
                raise ProtocolError(f"bad put line {line[:40]!r}")
            self._left = size
            self._state = _BODY
            return out
        return self._done(out, line.split(b" ", 1)[0].decode("ascii"), end)

    def _done(self, out: list | None, name: str, end: int) -> list:
        self._state = _LINE
        if self.ends is not None:
            self.ends.append(end)
        return _append(out, name)


class ResponseFramer:
    """Frames a server's replies; each completed one is ``(word, is_error)``.

    ``word`` is the reply's first word ("INSERTED", "RESERVED", "NOT_FOUND", ...);
    ``is_error`` is true for the replies in ERRORS. ProtocolError on a line that is no
    beanstalkd reply, one over MAX_REPLY_LINE bytes, or data not followed by CRLF.
    """

    __slots__ = ("_state", "_buf", "_left", "_word", "ends")

    def __init__(self) -> None:
        self._state = _LINE
        self._buf = bytearray()  # the start of a reply line
        self._left = 0           # data bytes still to come
        self._word = None        # the reply whose data is coming
        # As RequestFramer.ends, for replies.
        self.ends: list[int] | None = None

    def expect(self, request: str) -> None:
        """Replies say where they end whatever they answer: nothing to remember.

        (``quit`` is never answered: the server closes the connection.)
        """

    def expect_all(self, requests: list) -> None:
        """Nothing to remember either."""

    def close(self) -> None:
        """The server closed: replies never end that way, so raise if one was cut short."""
        state = self._state
        self._state = _FINISHED
        if state == _FINISHED or (state == _LINE and not self._buf):
            return None
        raise ProtocolError("connection closed in the middle of a reply", [])

    def feed(self, data) -> list | None:
        """Follow `data`; return the replies completed in it, or None when there are none."""
        out = None
        pos = 0
        n = len(data)
        try:
            while pos < n:
                state = self._state
                if state == _BODY:
                    left = self._left
                    if n - pos < left:
                        self._left = left - (n - pos)
                        break
                    pos += left
                    self._left = 0
                    if n - pos >= 2 and data[pos] == 13 and data[pos + 1] == 10:
                        pos += 2
                        out = self._done(out, self._word, pos)
                    else:
                        self._state = _BODY_CR
                elif state == _LINE:
                    buf = self._buf
                    end = _line_end(buf, data, pos, n, MAX_REPLY_LINE)
                    if end < 0:
                        buf += data[pos:n]
                        break
                    line = _take_line(buf, data, pos, end)
                    pos = end
                    size = _reply_size(line)
                    word = line.split(b" ", 1)[0].decode("ascii")
                    if size is None:
                        out = self._done(out, word, pos)
                    else:
                        self._word = word
                        self._left = size
                        self._state = _BODY
                elif state == _BODY_CR or state == _BODY_LF:
                    byte = data[pos]
                    pos += 1
                    if state == _BODY_CR and byte == 13:
                        self._state = _BODY_LF
                    elif state == _BODY_LF and byte == 10:
                        out = self._done(out, self._word, pos)
                    else:
                        raise ProtocolError("reply data not followed by CRLF")
                else:
                    raise ProtocolError("framer used after it stopped")
        except ProtocolError as exc:
            self._state = _FINISHED
            if exc.completed is None:
                exc.completed = out or []
            raise
        return out

    def _done(self, out: list | None, word: str, end: int) -> list:
        self._state = _LINE
        if self.ends is not None:
            self.ends.append(end)
        return _append(out, (word, word in ERRORS))


def _reply_size(line: bytes) -> int | None:
    """The size of the data after a reply line (without its CRLF), None if none follows."""
    m = _REPLY.fullmatch(line)
    if m is None:
        raise ProtocolError(f"bad reply line {line[:40]!r}")
    size = m.group(1)
    return None if size is None else int(size)


# --- readers that keep every byte ---------------------------------------------------------

@dataclass(slots=True)
class Command:
    """One client command as beanstalkd frames it."""

    name: str                  # the line up to its first space, as sent ("put", "reserve", ...)
    args: list[str]            # the words after it (split at runs of spaces)
    raw: bytes                 # every byte of it: the line and CRLF, for a put its body and CRLF
    body: bytes | None = None  # a put's job data, without the CRLF after it

    @classmethod
    def _from(cls, line: bytes, raw: bytes, body: bytes | None = None) -> Command:
        """The command on `line` (without its CRLF); latin-1 keeps any byte as one char."""
        name, _, rest = line.decode("latin-1").partition(" ")
        return cls(name, [word for word in rest.split(" ") if word], raw, body)


class _Reader:
    """What both readers share: a held incomplete message, and giving up for good."""

    __slots__ = ("passthrough", "_held", "_need", "_line")

    def __init__(self) -> None:
        self.passthrough = False  # True once the stream could not be followed
        self._held = bytearray()  # the incomplete message's bytes from earlier chunks
        self._need = 0            # its whole length once its line announced data, else 0
        self._line = 0            # that line's length, CRLF included

    @property
    def pending(self) -> bytes:
        """The bytes of an incomplete message held back (b"" between messages)."""
        return bytes(self._held)

    def _give_up(self, out: list, head: bytes, data, pos: int) -> list:
        """Stop interpreting: `head` (what the message that could not be followed took
        so far) and the rest of `data` from `pos` go out as one bytes item."""
        self.passthrough = True
        self._held = bytearray()
        self._need = 0
        out.append(head + bytes(data[pos:]))
        return out

    def _read(self, data, limit: int, size_of) -> list:
        """Split `data` into messages (via _message) and bytes; `size_of(line)` is the
        length of the data after a line (without its CRLF), None for none, or raises
        ProtocolError when the stream cannot be followed from that line on."""
        n = len(data)
        if self.passthrough:
            return [bytes(data)] if n else []
        out = []
        held = self._held
        pos = 0
        while pos < n:
            if self._need:
                take = min(self._need - len(held), n - pos)
                held += data[pos:pos + take]
                pos += take
                if len(held) < self._need:
                    break
                raw = bytes(held)
                held.clear()
                self._need = 0
                if raw[-2:] != b"\r\n":
                    return self._give_up(out, raw, data, pos)
                out.append(self._message(raw[:self._line - 2], raw, raw[self._line:-2]))
                continue
            try:
                end = _line_end(held, data, pos, n, limit)
            except ProtocolError:
                return self._give_up(out, bytes(held), data, pos)
            if end < 0:
                held += data[pos:n]
                break
            if held:
                held += data[pos:end]
                raw_line = bytes(held)
                held.clear()
            else:
                raw_line = bytes(data[pos:end])
            pos = end
            line = raw_line[:-2]
            try:
                size = size_of(line)
            except ProtocolError:
                return self._give_up(out, raw_line, data, pos)
            if size is None:
                out.append(self._message(line, raw_line, None))
            elif n - pos >= size + 2:  # the whole data is in this chunk
                raw = raw_line + bytes(data[pos:pos + size + 2])
                pos += size + 2
                if raw[-2:] != b"\r\n":
                    return self._give_up(out, raw, data, pos)
                out.append(self._message(line, raw, raw[len(raw_line):-2]))
            else:
                held += raw_line
                held += data[pos:n]
                self._need = len(raw_line) + size + 2
                self._line = len(raw_line)
                break
        return out

    def _message(self, line: bytes, raw: bytes, body: bytes | None):
        raise NotImplementedError


class CommandReader(_Reader):
    """Splits a client's stream into Commands, keeping every byte, for an interceptor.

    ``feed(data)`` returns the commands completed in `data`, in order; an incomplete one
    is held back (at most a line, or a put's line, body and CRLF). When the stream stops
    looking like well-formed commands as beanstalkd frames them -- a line over MAX_LINE
    bytes or with a CR not followed by LF, a put line that is not well-formed (see
    put_args) or whose <bytes> exceed `max_body`, a put body not followed by CRLF --
    everything from that command on is returned as one plain ``bytes`` item, last in the
    list, ``passthrough`` becomes True, and every later call returns ``[bytes(data)]``
    (``[]`` for no data): the caller passes those through to beanstalkd untouched and
    stops interpreting the connection. Nothing is lost or reordered: the raw bytes of
    every item, in order, then ``pending``, are exactly what was fed.

    Commands other than put are not checked further: beanstalkd answers each line,
    whatever it holds, with exactly one reply (quit excepted).
    """

    __slots__ = ("max_body",)

    def __init__(self, max_body: int = MAX_JOB_SIZE) -> None:
        super().__init__()
        self.max_body = max_body  # a put announcing more is passed through, not parsed

    def feed(self, data) -> list[Command | bytes]:
        """Complete commands in `data`, in order, then possibly the bytes passed through."""
        return self._read(data, MAX_LINE, self._body_size)

    def _body_size(self, line: bytes) -> int | None:
        if line[:4] != b"put ":
            return None
        size = _put_size(line)
        if size is None or size > self.max_body:
            raise ProtocolError("put not followed")
        return size

    def _message(self, line: bytes, raw: bytes, body: bytes | None) -> Command:
        return Command._from(line, raw, body)


class ReplyReader(_Reader):
    """Splits a server's stream into whole replies, each its exact bytes (a reply line,
    and for RESERVED, FOUND and OK their data and its CRLF), for an interceptor.

    An incomplete reply is held back: at most MAX_REPLY_LINE bytes of line plus the data
    it announces. If the stream is no beanstalkd replies (an unknown or bad reply line,
    a line over MAX_REPLY_LINE bytes, data not followed by CRLF), the reader gives up
    as CommandReader does: everything from that reply on is the last item of the list,
    ``passthrough`` becomes True, and every later call returns ``[bytes(data)]``.
    """

    __slots__ = ()

    def feed(self, data) -> list[bytes]:
        """Complete replies in `data`, in order, then possibly the bytes passed through."""
        return self._read(data, MAX_REPLY_LINE, _reply_size)

    def _message(self, line: bytes, raw: bytes, body: bytes | None) -> bytes:
        return raw
