"""What a replay sends: requests from a record file, a URL list or an access log.

A record file's requests are sent as recorded, byte for byte, Host header included (the
target sees what the recorded client sent through gproxyd, so name-based virtual hosts
keep working). Requests made from a URL list or an access log are `GET PATH HTTP/1.1`
with `Host:` the target as given to --target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import __version__
from ..recordfile import RecordFileError, RecordReader


class SourceError(Exception):
    """An input that cannot be replayed; str() is one line naming the file."""


@dataclass(frozen=True)
class Request:
    data: bytes   # what is written to the connection
    method: str   # for framing the answer: an answer to HEAD has no body
    close: bool   # the request says Connection: close: its connection is not reused


@dataclass(frozen=True)
class Source:
    """The requests of one input, in order, and (record files only) when each arrived."""
    name: str                        # for messages: the file and what it holds
    paths: tuple[bytes, ...] | None  # URL list, access log: request-targets to GET
    recorded: tuple[Request, ...]    # record file: the requests as recorded
    times: tuple[float, ...] | None  # record file: Unix time each request began arriving

    def requests_for(self, host: str) -> tuple[Request, ...]:
        """The requests to send to a target whose Host header value is HOST."""
        if self.paths is None:
            return self.recorded
        agent = f"gproxyctl-replay/{__version__}".encode()
        return tuple(Request(b"GET " + path + b" HTTP/1.1\r\nHost: " + host.encode() +
                             b"\r\nUser-Agent: " + agent + b"\r\nAccept: */*\r\n\r\n",
                             "GET", False) for path in self.paths)


_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) [^ \r\n]+ HTTP/1\.([0-9])\r?\n")
_CONNECTION = re.compile(rb"\nconnection:([^\r\n]*)", re.I)
_HEAD_END = re.compile(rb"\r?\n\r?\n")  # lines may end in a bare LF (RFC 9112 2.2)


def parse_request(data: bytes) -> Request | None:
    """DATA as a Request, or None when it does not start with an HTTP/1.x request line."""
    match = _REQUEST_LINE.match(data)
    if match is None:
        return None
    end = _HEAD_END.search(data)
    head = data if end is None else data[:end.start()]
    options = b",".join(m.group(1) for m in _CONNECTION.finditer(head)).lower()
    tokens = {token.strip() for token in options.split(b",")}
    # HTTP/1.0 closes after each answer unless the request asks to keep alive.
    close = b"close" in tokens or (match.group(2) == b"0" and b"keep-alive" not in tokens)
    return Request(data, match.group(1).decode("ascii"), close)


def read_record_file(path: str) -> Source:
    """A record file's requests. Raises SourceError."""
    reader = RecordReader(path)
    requests, times = [], []
    try:
        for number, record in enumerate(reader, 1):
            request = parse_request(record.data)
            if request is None:
                raise SourceError(f"{path}: record {number} is not an HTTP/1.x request "
                                  f"(starts {record.data[:40]!r})")
            requests.append(request)
            times.append(record.time)
    except RecordFileError as error:
        raise SourceError(str(error)) from None
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror}") from None
    if not requests:
        raise SourceError(f"{path}: no whole record in it (expected a record file with "
                          "requests in it)")
    return Source(f"{path} ({len(requests)} recorded requests)", None, tuple(requests),
                  tuple(times))


def _request_target(text: str) -> str | None:
    """'/path?q' or 'http://host/path?q' -> '/path?q'; None if it is neither."""
    if text.startswith("/"):
        target = text
    else:
        match = re.match(r"^https?://[^/\s]+(/\S*)?$", text, re.I)
        if match is None:
            return None
        target = match.group(1) or "/"
    if any(character.isspace() for character in target):
        return None
    return target


def read_url_list(path: str) -> Source:
    """Paths to GET, one a line; blank lines and lines starting with # are skipped."""
    paths = []
    for number, line in enumerate(_lines(path, "utf-8"), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        target = _request_target(text)
        if target is None:
            raise SourceError(f"{path}:{number}: bad URL {text[:60]!r} (expected a path "
                              "starting with / or an http:// URL, one a line)")
        paths.append(target.encode("utf-8", "surrogateescape"))
    if not paths:
        raise SourceError(f"{path}: no URLs in it (expected one path a line, e.g. /index.html)")
    return Source(f"{path} ({len(paths)} URLs)", tuple(paths), (), None)


# nginx's and Apache's combined format (and the common format, its first seven fields):
# host ident user [time] "request" status bytes ["referer" "user-agent"]
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_LOG_LINE = re.compile(r'^\S+ \S+ .*?\[[^\]]+\] ' + _QUOTED + r' (?:\d{3}|-) (?:\d+|-)'
                       r'(?: ' + _QUOTED + ' ' + _QUOTED + r')?(?: .*)?$')
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})|\\(.)")


def _unescape(text: str) -> str:
    r"""A logged request line as the client sent it: nginx writes \xHH, Apache \" and \\."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else m.group(2), text)


def read_access_log(path: str) -> Source:
    """The GET requests of an nginx/Apache combined (or common) format access log, in order.

    Lines of other methods, and logged requests that are not a request line (nginx logs
    "-" or the raw bytes of a TLS hello), are skipped; a line that is not in the format
    at all is an error."""
    paths, skipped = [], 0
    # Latin-1 maps each byte to one character and back: a logged \xHH is that byte again.
    for number, line in enumerate(_lines(path, "latin-1"), 1):
        if not line.strip():
            continue
        match = _LOG_LINE.match(line.rstrip("\r\n"))
        if match is None:
            raise SourceError(f"{path}:{number}: not a combined or common log format line "
                              f"({line.strip()[:60]!r})")
        parts = _unescape(match.group(1)).split(" ")
        target = _request_target(parts[1]) if len(parts) == 3 and parts[0] == "GET" and \
            parts[2].startswith("HTTP/") else None
        if target is None:
            skipped += 1
            continue
        paths.append(target.encode("latin-1"))
    if not paths:
        raise SourceError(f"{path}: no GET requests in it (expected an nginx or Apache "
                          "access log in combined format)")
    other = f", {skipped} other lines skipped" if skipped else ""
    return Source(f"{path} ({len(paths)} GET requests{other})", tuple(paths), (), None)


def _lines(path: str, encoding: str) -> list[str]:
    try:
        with open(path, encoding=encoding, errors="surrogateescape") as handle:
            return handle.readlines()
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror}") from None


def load(record_file: str | None, urls: str | None, access_log: str | None) -> Source:
    """The one source given. Raises SourceError."""
    if record_file:
        return read_record_file(record_file)
    if urls:
        return read_url_list(urls)
    return read_access_log(access_log)
