"""Scripted backends (gevent servers on 127.0.0.1:0, in this process) and the byte
patterns they and the clients exchange: each backend checks what it read itself and
keeps the verdicts, so a scenario compares both ends of every connection."""
from __future__ import annotations

import errno
import hashlib
import random
import socket
import struct
import zlib
from typing import Callable

import gevent
from gevent.event import AsyncResult
from gevent.server import StreamServer

CHUNK = 1 << 20


class Backend:
    """A StreamServer running HANDLE(sock) per connection; errors are counted, not raised
    into the hub."""

    def __init__(self, handle: Callable[[socket.socket], None], backlog: int = 4096):
        self.handle = handle
        self.connections = 0
        self.failures: list[str] = []
        self.server = StreamServer(("127.0.0.1", 0), self._serve, backlog=backlog)
        self.server.start()
        self.port = self.server.server_port
        self.address = f"127.0.0.1:{self.port}"

    def _serve(self, sock: socket.socket, _address) -> None:
        self.connections += 1
        try:
            self.handle(sock)
        except Exception as error:  # noqa: BLE001 - a peer's failure is a measured fact
            self.failures.append(f"{type(error).__name__}: {error}")
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


def read_to_eof(sock: socket.socket, sink: Callable[[memoryview], None] | None = None
                ) -> bytes | int:
    """Read until EOF; with SINK, hand it each chunk and return the byte count."""
    if sink is None:
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return total
        sink(view[:count])
        total += count


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- 1 GiB streams ---------------------------------------------------------------------------

class Stream:
    """SIZE bytes (a multiple of 1 MiB) from SEED: 1 MiB slices of one random block at a
    different offset each, so a lost, repeated or reordered MiB changes the hash."""

    def __init__(self, seed: int, size: int):
        self.block = memoryview(random.Random(seed).randbytes(CHUNK + 4096))
        self.chunks = size // CHUNK
        self.size = self.chunks * CHUNK
        self._digest = ""

    def chunk(self, index: int) -> memoryview:
        offset = (index * 1031) % 4096
        return self.block[offset:offset + CHUNK]

    def digest(self) -> str:
        if not self._digest:
            hasher = hashlib.sha256()
            for index in range(self.chunks):
                hasher.update(self.chunk(index))
            self._digest = hasher.hexdigest()
        return self._digest

    def send(self, sock: socket.socket) -> None:
        for index in range(self.chunks):
            sock.sendall(self.chunk(index))
        sock.shutdown(socket.SHUT_WR)


def hash_to_eof(sock: socket.socket) -> tuple[int, str]:
    hasher = hashlib.sha256()
    count = read_to_eof(sock, hasher.update)
    return count, hasher.hexdigest()


class BulkBackend(Backend):
    """Sends DOWN to each connection while reading it to EOF; RESULTS get (bytes read,
    sha256) per connection."""

    def __init__(self, down: Stream):
        self.down = down
        self.results: list[tuple[int, str]] = []
        super().__init__(self._bulk)

    def _bulk(self, sock: socket.socket) -> None:
        sender = gevent.spawn(self.down.send, sock)
        self.results.append(hash_to_eof(sock))
        sender.get(timeout=600)


# -- half-close patterns ---------------------------------------------------------------------

PATTERNS = ("client-first", "server-first", "both-at-once", "server-shuts-mid-upload",
            "empty-upload")
HEADER = struct.Struct("!BIII")   # pattern, connection id, up length, down length
BLOB = random.Random(15).randbytes(CHUNK + 65536)


def payload(ident: int, length: int, salt: int) -> bytes:
    offset = (ident * 131 + salt * 977) % 65536
    return BLOB[offset:offset + length]


class HalfCloseBackend(Backend):
    """Reads the client's header, then plays its side of the pattern it names; OK counts
    the connections whose upload arrived byte for byte, BAD says what was wrong."""

    def __init__(self):
        self.ok = 0
        self.bad: list[str] = []
        super().__init__(self._play)

    def _play(self, sock: socket.socket) -> None:
        head = b""
        while len(head) < HEADER.size:
            data = sock.recv(HEADER.size - len(head))
            if not data:
                self.bad.append(f"EOF inside the header after {len(head)} bytes")
                return
            head += data
        pattern, ident, up, down = HEADER.unpack(head)
        answer = payload(ident, down, 2)
        name = PATTERNS[pattern]
        if name == "client-first":
            got = read_to_eof(sock)
            sock.sendall(answer)
        elif name in ("server-first", "server-shuts-mid-upload"):
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
            got = read_to_eof(sock)
        else:   # both-at-once, empty-upload
            sender = gevent.spawn(sock.sendall, answer)
            got = read_to_eof(sock)
            sender.get(timeout=60)
        if got == payload(ident, up, 1):
            self.ok += 1
        else:
            self.bad.append(f"{name} #{ident}: upload {len(got)} bytes, expected {up}")


def half_close_client(port: int, ident: int, rng: random.Random) -> str:
    """One connection of a random pattern; '' when the download was exact, else why."""
    pattern = rng.randrange(len(PATTERNS))
    name = PATTERNS[pattern]
    up = 0 if name == "empty-upload" else rng.choice((1, 100, 4096, 65536, 262144,
                                                      rng.randrange(1, 300000)))
    down = rng.choice((0, 1, 1000, 65536, 200000, rng.randrange(0, 300000)))
    body, expected = payload(ident, up, 1), payload(ident, down, 2)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(HEADER.pack(pattern, ident, up, down))
        if name == "client-first":
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            got = read_to_eof(sock)
        elif name == "server-first":
            got = read_to_eof(sock)           # the server's EOF first, then the upload
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
        else:                                  # upload in pieces while reading
            def upload() -> None:
                for start in range(0, len(body), 16384):
                    sock.sendall(body[start:start + 16384])
                    if name == "server-shuts-mid-upload":
                        gevent.sleep(0.001)
                sock.shutdown(socket.SHUT_WR)
            sender = gevent.spawn(upload)
            got = read_to_eof(sock)
            sender.get(timeout=60)
    if got != expected:
        return f"{name} #{ident}: download {len(got)} bytes, expected {down}"
    return ""


# -- recorded exchanges (malformed protocol) -------------------------------------------------

class Recorder(Backend):
    """Each connection: read until the current case's request is in (or EOF), answer with
    its reply, half-close, read to EOF; what it read is put into the case's result."""

    def __init__(self):
        self.case: tuple[bytes, bytes, AsyncResult] | None = None
        super().__init__(self._record)

    def _record(self, sock: socket.socket) -> None:
        request, reply, result = self.case
        got = b""
        while len(got) < len(request):
            data = sock.recv(65536)
            if not data:
                break
            got += data
        try:
            sock.sendall(reply)
            sock.shutdown(socket.SHUT_WR)
            got += read_to_eof(sock)
        except OSError as error:
            got += f"<{errno.errorcode.get(error.errno, error.errno)}>".encode()
        result.set(got)


# -- the fuzzer's backend --------------------------------------------------------------------

class FuzzBackend(Backend):
    """Reads to EOF, then answers REPLIES[crc32(request) % len(REPLIES)] and closes: the
    client knows what to expect without a side channel, and a reply that is not the one
    its request picks means a byte was changed on the way, in either direction."""

    def __init__(self, replies: list[bytes]):
        self.replies = replies
        super().__init__(self._answer)

    def _answer(self, sock: socket.socket) -> None:
        request = read_to_eof(sock)
        sock.sendall(self.replies[zlib.crc32(request) % len(self.replies)])


# -- slow and silent backends --------------------------------------------------------------

class Stall(Backend):
    """The stalled shadow: accepts and never reads; it does not even notice the peer's
    FIN, so a half-close does not end it early. Each connection is closed HOLD seconds
    after its accept (or when stopped): longer than gproxyd's shadow-linger, short
    enough for this process's open-files limit when thousands a second arrive."""

    def __init__(self, hold: float = 3600.0):
        super().__init__(lambda sock: gevent.sleep(hold))


class Sink(Backend):
    """Reads and discards, never answers; counts the bytes."""

    def __init__(self):
        self.bytes = 0
        super().__init__(self._sink)

    def _sink(self, sock: socket.socket) -> None:
        def count(chunk: memoryview) -> None:
            self.bytes += len(chunk)
        try:
            read_to_eof(sock, count)
        except OSError:
            pass


class DeepReply(Backend):
    """Answers the first command of each connection with a RESP reply nested DEPTH arrays
    deep, then reads to EOF."""

    def __init__(self, depth: int):
        self.reply = b"*1\r\n" * depth + b":1\r\n"
        super().__init__(self._answer)

    def _answer(self, sock: socket.socket) -> None:
        if sock.recv(65536):
            sock.sendall(self.reply)
            read_to_eof(sock)
