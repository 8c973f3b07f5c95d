"""Answer comparison: does a shadow's answer equal production's, and where do they differ.

Pure functions over answers as captured from the wire (compare.Capture): an HTTP/1.x
response, or one RESP2/RESP3 reply. HTTP answers are compared by status, by the header
fields a route names, then by body: transfer framing undone (chunks joined), gzip and
deflate decoded within a bound, JSON compared structurally (key order, whitespace and
the spelling of numbers aside), anything else byte by byte. Redis replies are parsed
into trees and compared element by element. Bodies over the route's bound are compared
by length and hash only. Nothing here raises on garbage: what does not parse is
compared as bytes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass

DIGEST_SIZE = 16  # blake2b digest_size used for oversized bodies
MAX_PATHS = 20    # differing paths reported by one comparison, at most


@dataclass(frozen=True)
class Rules:
    """What counts as a difference on a route."""

    mode: str = "body"             # "body": status + body (http) / whole reply (redis);
                                   # "status": http status only (redis: same as "body")
    headers: tuple[str, ...] = ()  # header field names compared too (stored lower-case)
    ignore: tuple[str, ...] = ()   # JSON path patterns never counted (see matches())
    max_body: int = 1 << 20        # bodies beyond this are compared by length and digest only
    max_decoded: int = 8 << 20     # most bytes gzip/deflate may decode to; beyond: the encoded
                                   # bytes are compared

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple(name.lower() for name in self.headers))


@dataclass(slots=True)
class Answer:
    """One answer as captured.

    `raw` is what came over the wire: for http any interim 1xx heads, the final head,
    then the body as transferred (chunked framing included); for redis the reply. An
    answer too big to keep has a `digest`: blake2b (DIGEST_SIZE) of the whole body as
    transferred (the bytes from body_start() on), `body_length` is that body's length,
    and `raw` holds only the head and the first bytes of the body.
    """

    raw: bytes
    body_length: int = -1
    digest: bytes | None = None


@dataclass
class Difference:
    """Where two answers differ: at most MAX_PATHS paths, in document order.

    Paths: "status", "header <name>", "body" (bodies compared as bytes; `offset` is
    where they first differ), "length" and "body" (oversized bodies, no offset), JSON
    paths such as "$.items[3].price"; for redis "reply" (the top-level reply, or all of
    it when it does not parse: then with `offset`), "length" and "reply" (oversized), and
    "[2]", "[2][0]", "[name]" inside arrays, sets, pushes and maps.
    """

    paths: list[str]
    offset: int | None = None


def body_start(protocol: str, raw: bytes | bytearray | memoryview) -> int:
    """Offset where the body begins in `raw`: for http just past the blank line ending the
    final head (interim 1xx heads skipped; 101 is final), or len(raw) if that head is not
    complete in `raw`; for redis 0."""
    if protocol == "http":
        return _final_head(raw)[1]
    if protocol == "redis":
        return 0
    raise ValueError(f"no answers to compare in {protocol!r}")


def compare(protocol: str, rules: Rules, production: Answer, shadow: Answer) -> Difference | None:
    """None when the two answers are equal under `rules`, else where they differ.

    A body (http) or reply (redis) is compared by length and digest when either answer
    has a digest or either is longer than rules.max_body. Never raises on garbage: an
    HTTP answer without a readable, complete final head, or a redis reply that does not
    parse, is compared as bytes, all of `raw` ("body" or "reply", with the offset in
    `raw`).
    """
    if protocol == "http":
        paths, offset = _compare_http(rules, production, shadow)
    elif protocol == "redis":
        paths, offset = _compare_redis(rules, production, shadow)
    else:
        raise ValueError(f"no answers to compare in {protocol!r}")
    return Difference(paths[:MAX_PATHS], offset) if paths else None


def generalise(path: str) -> str:
    """The path with every index made "any": "$.items[3].price" -> "$.items[*].price",
    "[2][0]" -> "[*][*]" (quoted JSON keys are left alone)."""
    if "[" not in path:
        return path
    return _INDEX.sub(lambda m: m.group(1) or "[*]", path)


def matches(pattern: str, path: str) -> bool:
    """Does the JSON path pattern cover `path`? "*" matches any one index or key
    ("$.items[*].x" covers "$.items[3].x", "$.*.id" covers "$.a.id"); a pattern covers
    everything below what it names too ("$.meta" covers "$.meta.time" and "$.meta[0]").
    Text that is not a JSON path only matches itself."""
    wanted, got = _segments(pattern), _segments(path)
    if wanted is None or got is None:
        return pattern == path
    return _covers(wanted, got)


def describe_answer(protocol: str, answer: Answer, limit: int = 200) -> dict:
    """An answer for a mismatch sample: {"status": the HTTP status or None, "body": text}.

    For http the body is its first `limit` characters, chunks joined and gzip/deflate
    undone (as much as `raw` holds), decoded as UTF-8 with replacement characters. For
    redis it is a short rendering of the reply: '"bar"', '(integer) 3', '(error) ERR x',
    '["a", "b"]', cut to `limit`.
    """
    raw = answer.raw
    if protocol == "redis":
        tree = _reply(raw)
        text = _render(tree, limit) if tree is not None else _text(raw, limit)
        return {"status": None, "body": text[:limit]}
    if protocol != "http":
        raise ValueError(f"no answers to describe in {protocol!r}")
    response = _Response.parse(raw)
    if response.status is None:
        return {"status": None, "body": _text(raw, limit)}
    body = response.body()
    decoded = _decode(body, response.codings(), 4 * limit)  # 4: UTF-8's longest character
    if decoded is not None:
        body = decoded[0]
    return {"status": response.status, "body": _text(body, limit)}


def describe_request(protocol: str, raw: bytes, limit: int = 200) -> str:
    """A request for a mismatch sample, in at most `limit` characters: for http its request
    line ("GET /a?b=1 HTTP/1.1"); for redis the command as words ("SET key value"), long
    arguments cut ("..."). `raw` is the request's first bytes and may end anywhere: a
    command cut short ends in "..."."""
    if protocol == "http":
        start = _BLANKS.match(raw).end()
        line = raw[start:start + 4 * limit].split(b"\n", 1)[0]
        return _text(line[:-1] if line.endswith(b"\r") else line, limit)
    if protocol == "redis":
        words, cut = _command_words(raw, limit)
        if cut:
            words.append("...")
        return " ".join(words)[:limit]
    raise ValueError(f"no requests to describe in {protocol!r}")


# --- HTTP --------------------------------------------------------------------------------

_BLANKS = re.compile(rb"[\r\n]*")
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line ending a head (its first LF ends a line)
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?=[ \t\r\n])")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\n]*)?\r?\n")
_LENGTH = re.compile(r"[0-9]{1,18}")
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def _final_head(raw) -> tuple[int, int, int | None]:
    """(where the final head starts, where its body starts, its status): the body starts
    at len(raw) when the head is not complete, and the status is None then, or when the
    head is not an HTTP response's."""
    pos = 0
    while True:
        pos = _BLANKS.match(raw, pos).end()
        end = _HEAD_END.search(raw, pos)
        if end is None:
            return pos, len(raw), None
        m = _STATUS_LINE.match(raw, pos)
        status = int(m.group(1)) if m is not None else None
        if status is None or not 100 <= status < 200 or status == 101:
            return pos, end.end(), status
        pos = end.end()


@dataclass(slots=True)
class _Response:
    """An HTTP answer, read as far as comparing needs."""

    raw: bytes
    status: int | None      # None: not an HTTP response, or its head is not complete
    fields: dict[str, str]  # lower-case name -> value (repeated fields joined by ", ")
    start: int              # where the body starts in raw

    @classmethod
    def parse(cls, raw: bytes) -> _Response:
        head, start, status = _final_head(raw)
        fields = _fields(raw[head:start]) if status is not None else {}
        return cls(raw, status, fields, start)

    def body(self) -> bytes:
        """The body as sent, with the transfer framing undone (chunks joined, trailers
        left out): as much of it as raw holds. Chunking that does not parse is left in."""
        raw, start = self.raw, self.start
        coding = self.fields.get("transfer-encoding")
        if coding is not None:
            if coding.rpartition(",")[2].strip().lower() == "chunked":
                body = _dechunk(raw, start)
                if body is not None:
                    return body
            return raw[start:]
        length = self.fields.get("content-length", "").partition(",")[0].strip()
        if _LENGTH.fullmatch(length):
            return raw[start:start + int(length)]
        return raw[start:]

    def codings(self) -> tuple[str, ...]:
        """The content codings applied, in the order they were applied."""
        return tuple(coding for coding in (part.strip().lower() for part in
                                           self.fields.get("content-encoding", "").split(","))
                     if coding and coding != "identity")

    def is_json(self) -> bool:
        kind = self.fields.get("content-type", "").partition(";")[0].strip().lower()
        return kind == "application/json" or kind.endswith("+json")


def _fields(head: bytes) -> dict[str, str]:
    """The header fields of a head (start-line, field lines, blank line); obs-fold
    continuations are joined with a space, lines without a colon skipped."""
    fields: dict[str, str] = {}
    name = None
    for line in head.split(b"\n")[1:]:
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            break
        if line[:1] == b" " or line[:1] == b"\t":
            if name is not None:
                fields[name] += " " + line.strip().decode("latin-1")
            continue
        key, colon, value = line.partition(b":")
        if not colon:
            name = None
            continue
        name = key.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        fields[name] = fields[name] + ", " + text if name in fields else text
    return fields


def _dechunk(raw: bytes, pos: int) -> bytes | None:
    """The chunks' payloads from `pos` on, joined: up to the last chunk or as far as raw
    goes. None if the framing is not chunked encoding."""
    parts = []
    n = len(raw)
    while pos < n:
        m = _CHUNK_SIZE.match(raw, pos)
        if m is None:
            if raw.find(b"\n", pos) < 0:
                break  # a chunk-size line cut short
            return None
        size = int(m.group(1), 16)
        if size == 0:
            break
        pos = m.end() + size
        parts.append(raw[m.end():pos])
        if raw[pos:pos + 2] == b"\r\n":
            pos += 2
        elif raw[pos:pos + 1] == b"\n":
            pos += 1
        elif pos + 1 < n:  # else the body was cut short in the chunk or its CRLF
            return None
    return b"".join(parts)


def _decode(body: bytes, codings: tuple[str, ...], limit: int) -> tuple[bytes, bool] | None:
    """`body` with its gzip/deflate content codings undone, in at most `limit` bytes per
    step: (the decoded bytes, whether that is all of them). None when a coding is not
    gzip or deflate, or its data is not a valid stream."""
    complete = True
    for coding in reversed(codings):
        if coding == "gzip" or coding == "x-gzip":
            wbits = _GZIP_WBITS
        elif coding == "deflate":
            # RFC 9110's deflate is the zlib format, but some servers send raw deflate.
            zlib_header = len(body) >= 2 and body[0] & 0x0F == 8 and (
                body[0] << 8 | body[1]) % 31 == 0
            wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
        else:
            return None
        inflated = _inflate(body, wbits, limit)
        if inflated is None:
            return None
        body, whole = inflated
        complete = complete and whole
    return body, complete


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bool] | None:
    """Inflate `data` into at most `limit` bytes: (the output, whether it is all of it:
    every stream ended, nothing follows). None if `data` is not a valid stream.

    decompress()'s max_length keeps memory to the bound whatever the stream expands to.
    """
    out = []
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit - size + 1)
        except zlib.error:
            return None
        out.append(piece)
        size += len(piece)
        if size > limit or not inflater.eof:
            return b"".join(out)[:limit], False
        data = inflater.unused_data
        if data and wbits != _GZIP_WBITS:  # only gzip has streams of several members
            return b"".join(out), False
    return b"".join(out), True


def _compare_http(rules: Rules, production: Answer,
                  shadow: Answer) -> tuple[list[str], int | None]:
    if production.raw == shadow.raw and production.digest is None and shadow.digest is None:
        # Byte for byte the same (an A/A pair, or any two answers with no per-answer
        # header such as a Date that changed in between): equal under any rules, at the
        # cost of one memcmp instead of parsing both heads (~10 us in Python).
        return [], None
    mine, theirs = _Response.parse(production.raw), _Response.parse(shadow.raw)
    digested = production.digest is not None or shadow.digest is not None
    if not digested and (mine.status is None or theirs.status is None):
        return _bytes_paths("body", production.raw, shadow.raw)
    paths = ["status"] if mine.status != theirs.status else []
    paths += [f"header {name}" for name in rules.headers
              if mine.fields.get(name) != theirs.fields.get(name)]
    if rules.mode != "body":
        return paths, None
    if digested or max(len(production.raw) - mine.start,
                       len(shadow.raw) - theirs.start) > rules.max_body:
        return paths + _digest_paths("body", production, mine.start, shadow, theirs.start), None
    mine_body, their_body = mine.body(), theirs.body()
    if mine_body == their_body and mine.codings() == theirs.codings():
        return paths, None  # the common case, without decoding
    mine_body = _payload(mine_body, mine.codings(), rules.max_decoded)
    their_body = _payload(their_body, theirs.codings(), rules.max_decoded)
    if mine_body == their_body:
        return paths, None
    if mine.is_json() or theirs.is_json():
        try:
            documents = json.loads(mine_body), json.loads(their_body)
        except (ValueError, RecursionError):
            pass  # not JSON after all: compared as bytes
        else:
            room = MAX_PATHS - len(paths)
            return paths + _json_paths(*documents, _patterns(rules.ignore), room), None
    body_paths, offset = _bytes_paths("body", mine_body, their_body)
    return paths + body_paths, offset


def _payload(body: bytes, codings: tuple[str, ...], limit: int) -> bytes:
    """The decoded body if it decodes whole within `limit`, else the body as encoded."""
    if not codings:
        return body
    decoded = _decode(body, codings, limit)
    return decoded[0] if decoded is not None and decoded[1] else body


# --- both protocols ----------------------------------------------------------------------

def _bytes_paths(path: str, a: bytes, b: bytes) -> tuple[list[str], int | None]:
    """([path], where a and b first differ), or ([], None) when they are equal."""
    if a == b:
        return [], None
    n = min(len(a), len(b))
    step = 4096  # compare blocks at C speed; look byte by byte only in the one that differs
    for block in range(0, n, step):
        if a[block:block + step] != b[block:block + step]:
            for i in range(block, min(block + step, n)):
                if a[i] != b[i]:
                    return [path], i
    return [path], n


def _digest_paths(path: str, production: Answer, production_start: int,
                  shadow: Answer, shadow_start: int) -> list[str]:
    """Oversized bodies: ["length"] or [path] where they differ, [] if they do not."""
    mine = _sized(production, production_start)
    theirs = _sized(shadow, shadow_start)
    if mine[0] != theirs[0]:
        return ["length"]
    return [path] if mine[1] != theirs[1] else []


def _sized(answer: Answer, start: int) -> tuple[int, bytes]:
    """(length, digest) of an answer's body as transferred."""
    if answer.digest is not None:
        return answer.body_length, answer.digest
    body = memoryview(answer.raw)[start:]
    return len(body), hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest()


def _text(data: bytes, limit: int) -> str:
    return data[:4 * limit].decode("utf-8", "replace")[:limit]


# --- JSON --------------------------------------------------------------------------------

_ABSENT = object()  # the value on the side where a key or index does not exist
_ANY = object()     # a pattern's "*"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEGMENT = re.compile(r'\.([A-Za-z_][A-Za-z0-9_]*|\*)|\[([0-9]{1,18}|\*)\]'
                      r'|\[("(?:[^"\\]|\\.)*")\]')
_INDEX = re.compile(r'("(?:[^"\\]|\\.)*")|\[[0-9]+\]')


def _json_paths(a, b, patterns: tuple[tuple, ...], room: int) -> list[str]:
    """The deepest paths where documents a and b differ, in document order (a's keys, then
    keys only b has), but those `patterns` cover; at most `room` of them.

    A walk on an explicit stack, so that any depth json.loads accepts is fine. Each node
    knows its path as (parent node, key or index), spelled out only where it differs.
    """
    paths: list[str] = []
    stack = [(a, b, None)]
    while stack:
        a, b, node = stack.pop()
        kind = _json_kind(a)
        if kind is _json_kind(b):
            if kind is dict:
                children = [(value, other, (node, key)) for key, value in a.items()
                            if _unsettled(value, other := b.get(key, _ABSENT))]
                children += [(_ABSENT, value, (node, key)) for key, value in b.items()
                             if key not in a]
                stack.extend(reversed(children))
                continue
            if kind is list:
                children = [(value, other, (node, i)) for i, (value, other)
                            in enumerate(zip(a, b, strict=False)) if _unsettled(value, other)]
                common = min(len(a), len(b))
                children += [(a[i], _ABSENT, (node, i)) for i in range(common, len(a))]
                children += [(_ABSENT, b[i], (node, i)) for i in range(common, len(b))]
                stack.extend(reversed(children))
                continue
            if a == b or (kind is float and a != a and b != b):  # NaN is NaN here
                continue
        segments = _unlink(node)
        if any(_covers(pattern, segments) for pattern in patterns):
            continue
        paths.append(_json_path(segments))
        if len(paths) >= room:
            break
    return paths


def _unsettled(a, b) -> bool:
    """Whether two values need a closer look: not the same plain value of the same type
    (the cheap test settles most of an object's or array's members without a stack entry)."""
    kind = type(a)
    return kind is not type(b) or kind is dict or kind is list or a != b


def _json_kind(value) -> type:
    """The type a JSON value is compared as: numbers by value, so 1 equals 1.0."""
    kind = type(value)
    return float if kind is int else kind  # bool is not int here: true differs from 1


def _unlink(node) -> tuple:
    segments = []
    while node is not None:
        node, segment = node
        segments.append(segment)
    return tuple(reversed(segments))


def _json_path(segments: tuple) -> str:
    parts = ["$"]
    for segment in segments:
        if type(segment) is int:
            parts.append(f"[{segment}]")
        elif _IDENTIFIER.fullmatch(segment):
            parts.append("." + segment)
        else:
            parts.append("[" + json.dumps(segment, ensure_ascii=False) + "]")
    return "".join(parts)


@functools.lru_cache(maxsize=256)
def _segments(path: str) -> tuple | None:
    """A JSON path as keys (str), indices (int) and _ANY; None if it is not one."""
    if path[:1] != "$":
        return None
    segments = []
    pos = 1
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None:
            return None
        key, index, quoted = m.groups()
        if key is not None:
            segments.append(_ANY if key == "*" else key)
        elif index is not None:
            segments.append(_ANY if index == "*" else int(index))
        else:
            try:
                segments.append(json.loads(quoted))
            except ValueError:
                return None
        pos = m.end()
    return tuple(segments)


def _patterns(ignore: tuple[str, ...]) -> tuple[tuple, ...]:
    return tuple(segments for segments in map(_segments, ignore) if segments is not None)


def _covers(pattern: tuple, segments: tuple) -> bool:
    return len(pattern) <= len(segments) and all(
        wanted is _ANY or wanted == got for wanted, got in zip(pattern, segments, strict=False))


# --- Redis -------------------------------------------------------------------------------

# A reply is a tree of (type, value): ("+", b"OK"), ("-", b"ERR x") for "-" and "!",
# (":", 3), ("(", 3), (",", 1.5), ("#", True), ("_", None) for every null, ("$", b"bar"),
# ("=", b"txt:..."), ("*" or "~" or ">", (element, ...)), ("%", ((key, value), ...)).
_MAX_DEPTH = 64  # nesting beyond this is garbage here, compared as bytes
_AGGREGATES = {"*": 1, "~": 1, ">": 1, "%": 2, "|": 2}  # type -> values per element
_RESP_INTEGER = re.compile(rb"[-+]?[0-9]{1,20}")
_NULL = ("_", None)
_MISSING = ("", None)  # the value on the side where an index or a key does not exist
_ARG_MAX = 40  # characters of one command argument shown in a sample
_BULK_LENGTH = re.compile(rb"\$([0-9]{1,18})\r?\n")
_ARRAY_LENGTH = re.compile(rb"\*([0-9]{1,18})\r?\n")


class _Garbage(Exception):
    """The bytes are not a RESP reply."""


def _reply(raw: bytes) -> tuple | None:
    """The reply in raw, or None if raw is not exactly one. Push messages before it are out
    of band and skipped (a push alone is the reply: it answers SUBSCRIBE under RESP3)."""
    try:
        value, pos = _resp_value(raw, 0, 0)
        while pos < len(raw) and value[0] == ">":
            value, pos = _resp_value(raw, pos, 0)
    except _Garbage:
        return None
    return value if pos == len(raw) else None


def _resp_value(raw: bytes, pos: int, depth: int) -> tuple[tuple, int]:
    """The value starting at `pos` (past any attributes) and where it ends."""
    while True:
        end = raw.find(b"\n", pos)
        if end < 0 or end == pos:
            raise _Garbage
        line = raw[pos + 1:end - 1] if raw[end - 1] == 13 else raw[pos + 1:end]
        kind = chr(raw[pos])
        pos = end + 1
        if kind == "+":
            return ("+", line), pos
        if kind == "-":
            return ("-", line), pos
        if kind == ":" or kind == "(":
            return (kind, _resp_integer(line)), pos
        if kind == "_" and not line:
            return _NULL, pos
        if kind == "#" and (line == b"t" or line == b"f"):
            return ("#", line == b"t"), pos
        if kind == ",":
            try:
                return (",", float(line)), pos
            except ValueError:
                raise _Garbage from None
        size = _resp_integer(line)
        if size == -1 and (kind == "$" or kind == "*"):
            return _NULL, pos
        if size < 0:
            raise _Garbage
        if kind == "$" or kind == "!" or kind == "=":
            data = raw[pos:pos + size]
            pos += size
            if len(data) < size:
                raise _Garbage
            if raw[pos:pos + 2] == b"\r\n":
                pos += 2
            elif raw[pos:pos + 1] == b"\n":
                pos += 1
            else:
                raise _Garbage
            return ("-" if kind == "!" else kind, data), pos
        width = _AGGREGATES.get(kind)
        if width is None or depth >= _MAX_DEPTH:
            raise _Garbage
        values = []
        for _ in range(size * width):  # each value takes a line at least: bounded by raw
            value, pos = _resp_value(raw, pos, depth + 1)
            values.append(value)
        if kind != "|":
            if width == 2:
                return (kind, tuple(zip(values[::2], values[1::2], strict=True))), pos
            return (kind, tuple(values)), pos
        # An attribute annotates the value that follows it: skipped, that value is read.


def _resp_integer(line: bytes) -> int:
    if _RESP_INTEGER.fullmatch(line) is None:
        raise _Garbage
    return int(line)


def _compare_redis(rules: Rules, production: Answer,
                   shadow: Answer) -> tuple[list[str], int | None]:
    if (production.digest is not None or shadow.digest is not None
            or max(len(production.raw), len(shadow.raw)) > rules.max_body):
        return _digest_paths("reply", production, 0, shadow, 0), None
    if production.raw == shadow.raw:
        return [], None
    mine, theirs = _reply(production.raw), _reply(shadow.raw)
    if mine is None or theirs is None:
        return _bytes_paths("reply", production.raw, shadow.raw)
    paths: list[str] = []
    _resp_paths(mine, theirs, "", paths)
    return paths, None


def _resp_paths(a: tuple, b: tuple, path: str, paths: list[str]) -> None:
    """Add the deepest paths under `path` where replies a and b differ to `paths` (up to
    MAX_PATHS): positions in arrays and pushes, keys in maps; a set differs only if its
    members do, in any order."""
    if a == b or len(paths) >= MAX_PATHS:
        return
    kind = a[0]
    if kind != b[0] or kind not in _AGGREGATES:
        paths.append(path or "reply")
        return
    if kind == "%":
        mine, theirs = dict(a[1]), dict(b[1])
        for key, value in a[1]:
            _resp_paths(value, theirs.get(key, _MISSING), f"{path}[{_key_text(key)}]", paths)
        for key, value in b[1]:
            if key not in mine:
                _resp_paths(_MISSING, value, f"{path}[{_key_text(key)}]", paths)
        return
    if kind == "~" and Counter(a[1]) == Counter(b[1]):
        return
    mine, theirs = a[1], b[1]
    for i in range(max(len(mine), len(theirs))):
        _resp_paths(mine[i] if i < len(mine) else _MISSING,
                    theirs[i] if i < len(theirs) else _MISSING, f"{path}[{i}]", paths)


def _key_text(key: tuple) -> str:
    """A map key as a path shows it: strings as their text, numbers as digits."""
    kind, value = key
    if type(value) is bytes:
        return value.decode("utf-8", "replace")
    if kind == ":" or kind == "(" or kind == ",":
        return str(value)
    return _render(key, 100)


def _render(tree: tuple, limit: int) -> str:
    """A reply as redis-cli would show it, roughly; aggregates stop once past `limit`."""
    kind, value = tree
    if kind == "$" or kind == "=":
        if kind == "=" and value[3:4] == b":":
            value = value[4:]  # a verbatim string's format ("txt:") is not the text
        return json.dumps(value[:4 * limit].decode("utf-8", "replace"), ensure_ascii=False)
    if kind == "+":
        return value[:4 * limit].decode("utf-8", "replace")
    if kind == "-":
        return "(error) " + value[:4 * limit].decode("utf-8", "replace")
    if kind == ":":
        return f"(integer) {value}"
    if kind == "(":
        return f"(big number) {value}"
    if kind == ",":
        return f"(double) {value!r}"
    if kind == "#":
        return "(true)" if value else "(false)"
    if kind == "_":
        return "(nil)"
    parts = []
    size = 0
    for element in value:
        if kind == "%":
            part = f"{_render(element[0], limit)}: {_render(element[1], limit)}"
        else:
            part = _render(element, limit)
        parts.append(part)
        size += len(part) + 2
        if size > limit:
            break
    opening, closing = "{}" if kind == "%" or kind == "~" else "[]"
    return opening + ", ".join(parts) + closing


def _command_words(raw: bytes, limit: int) -> tuple[list[str], bool]:
    """The words of the command `raw` starts with (an array of bulk strings, or an inline
    command), as many as `limit` characters show, and whether the command goes on past
    them (a word cut short shows that itself, ending in "...")."""
    if raw[:1] != b"*":
        line, newline, _ = raw[:4 * limit].partition(b"\n")
        return [_word(word, False) for word in line.split()], not newline
    m = _ARRAY_LENGTH.match(raw)
    if m is None:
        return [], True
    words = []
    pos = m.end()
    shown = 0
    for _ in range(int(m.group(1))):
        m = _BULK_LENGTH.match(raw, pos)
        if m is None:
            return words, True
        end = m.end() + int(m.group(1))
        if end > len(raw):
            words.append(_word(raw[m.end():m.end() + 4 * _ARG_MAX], True))
            return words, False
        words.append(_word(raw[m.end():end], False))
        shown += len(words[-1]) + 1
        if shown > limit:
            return words, True
        pos = end + 2
    return words, False


def _word(data: bytes, cut: bool) -> str:
    """One argument as text: quoted if it has blanks, quotes or control characters;
    "..." where it was cut."""
    text = data[:4 * _ARG_MAX].decode("utf-8", "replace")
    if cut or len(text) > _ARG_MAX:
        text = text[:_ARG_MAX] + "..."
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)
