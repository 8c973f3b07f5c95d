"""The record file: sampled client requests, appended by gproxyd, read by gproxyctl replay.

Format, version 1 (all integers big-endian):

    file    = header record*
    header  = "GPXREC" 0x00 0x01                  8 bytes: magic, then the version
    record  = time length crc32 payload
    time    = IEEE 754 double                     Unix time the request began arriving
    length  = unsigned 32-bit                     bytes of payload
    crc32   = unsigned 32-bit                     zlib.crc32 of time's 8 bytes + payload
    payload = the request's raw bytes             head and body, as the client sent them

Each record is written with one append, so a crash or `kill -9` can only leave the last
record incomplete: readers stop at the first record that is short or whose checksum does
not match, and every record before it is whole.
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

MAGIC = b"GPXREC\x00"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
_RECORD = struct.Struct(">dII")
MAX_RECORD = 64 * 1024 * 1024  # a length above this is a torn or foreign file, not a request

# Header fields whose values are credentials: replaced unless record-secrets = keep.
SECRET_FIELDS = (b"authorization", b"proxy-authorization", b"cookie")
PLACEHOLDER = b"gproxyd-masked"
_FIELD = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class RecordFileError(Exception):
    """A file that is not a record file, or of a version this gproxyd cannot read."""


@dataclass(frozen=True)
class Record:
    time: float
    data: bytes


def encode(time: float, data: bytes) -> bytes:
    """One record's bytes, as appended."""
    stamp = struct.pack(">d", time)
    return _RECORD.pack(time, len(data), zlib.crc32(data, zlib.crc32(stamp))) + data


def mask_secrets(request: bytes) -> bytes:
    """The request with the values of Authorization, Proxy-Authorization and Cookie
    header fields replaced by PLACEHOLDER (their continuation lines, if folded, removed);
    the body and other fields are unchanged. Lines may end in CRLF or a bare LF."""
    head_end = _HEAD_END.search(request)
    # The head with its last line's end (so that each line carries its own), the rest
    # from the blank line on.
    cut = request.index(b"\n", head_end.start()) + 1 if head_end else len(request)
    head, rest = request[:cut], request[cut:]
    lines = head.split(b"\n")
    kept = lines[:1]
    in_secret = changed = False
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the field above
            if in_secret:
                changed = True
                continue
        else:
            match = _FIELD.match(line)
            in_secret = match is not None and match.group(1).lower() in SECRET_FIELDS
            if in_secret:
                line = match.group(1) + b": " + PLACEHOLDER + (b"\r" if line.endswith(b"\r")
                                                              else b"")
                changed = True
        kept.append(line)
    return b"\n".join(kept) + rest if changed else request


class RecordWriter:
    """Appends records to PATH, rotating it to PATH.1 (PATH.2, ...) past max_size.

    Blocking file I/O: the daemon calls it from a thread, never from the event loop.
    One writer per file: processes sharing a file must take turns around append() and
    rotate() (record.py holds an flock on PATH.lock), or two could rotate at once.
    """

    def __init__(self, path: str, max_size: int, keep: int, mode: int = 0o640):
        self.path, self.max_size, self.keep, self.mode = path, max_size, keep, mode
        self._fd = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           self.mode)
        self.size = os.fstat(self._fd).st_size
        if self.size == 0:
            self._write(HEADER)
        else:
            with open(self.path, "rb") as handle:
                if handle.read(len(HEADER)) != HEADER:
                    os.close(self._fd)
                    self._fd = -1
                    raise RecordFileError(f"{self.path} exists and is not a version "
                                          f"{VERSION} record file (expected a record file "
                                          "or a new path)")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def append(self, time: float, data: bytes) -> None:
        """Append one record. If the write fails part way (a full disk, a file size
        limit), what was written of it is cut off again, so that the records appended
        after it stay readable, and the error raised."""
        before = self.size
        try:
            self._write(encode(time, data))
        except OSError:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                pass  # the reader still stops cleanly at the torn record
            self.size = before
            raise
        if self.size >= self.max_size:
            self.rotate()

    def rotate(self) -> None:
        """PATH becomes PATH.1, PATH.1 becomes PATH.2, ...; at most `keep` are kept."""
        self.close()
        if self.keep == 0:
            os.unlink(self.path)
        else:
            oldest = f"{self.path}.{self.keep}"
            if os.path.exists(oldest):
                os.unlink(oldest)
            for number in range(self.keep - 1, 0, -1):
                if os.path.exists(f"{self.path}.{number}"):
                    os.rename(f"{self.path}.{number}", f"{self.path}.{number + 1}")
            os.rename(self.path, f"{self.path}.1")
        self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RecordReader:
    """Iterates the whole records of a file; `torn` is the bytes ignored at its end (a
    record cut short by a crash), known once iteration has finished."""

    def __init__(self, path: str):
        self.path = path
        self.torn = 0

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, "rb") as handle:
            header = handle.read(len(HEADER))
            if header[:len(MAGIC)] != MAGIC:
                raise RecordFileError(f"{self.path} is not a gproxyd record file (expected "
                                      "one written by record =)")
            if header[len(MAGIC):] != bytes([VERSION]):
                raise RecordFileError(f"{self.path} is a record file of another version "
                                      f"(expected version {VERSION})")
            while True:
                head = handle.read(_RECORD.size)
                if not head:
                    return
                if len(head) < _RECORD.size:
                    self.torn = len(head)
                    return
                time, length, checksum = _RECORD.unpack(head)
                data = handle.read(length) if length <= MAX_RECORD else b""
                stamp = head[:8]
                if len(data) < length or length > MAX_RECORD or \
                        zlib.crc32(data, zlib.crc32(stamp)) != checksum:
                    self.torn = _RECORD.size + len(data) + len(handle.read())
                    return
                yield Record(time, data)


def read_records(path: str) -> Iterator[Record]:
    """The whole records of PATH, oldest first."""
    return iter(RecordReader(path))
