"""Small in-process backends for the tests: gevent servers on loopback, ::1 or a unix socket.

Every server listens on port 0 (or a fresh unix path), runs its handler in a greenlet
per connection, records what each connection did in a `Conn`, and stops cleanly with
`stop()` (open connections are closed). They assume a monkey-patched process
(tests/conftest.py patches before anything else is imported).

Handlers:
- `echo`: sends back every byte it reads; closes after the client's EOF.
- `sink`: hashes what it reads (sha256), notes the client's EOF; optionally answers
  each chunk, answers after the EOF (after a delay), or holds the connection open.
- `stall`: accepts and never reads.
- `closer`: closes at once (or after some bytes), with a FIN or (reset=True) an RST.
- `reply_then_half_close`: sends a greeting, half-closes, then reads to EOF.
- `dies_after`: reads some bytes, then closes (an RST, as unread bytes are pending).
- `firehose`: sends a block over and over and counts what the kernel accepted.

Then the client side: `wait_until()` (every wait in the tests is bounded), exact reads,
and `connection_lines()`, which parses gproxyd's per-connection log line.
"""
from __future__ import annotations

import hashlib
import re
import socket
import struct
import time

import gevent
import redis
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

CHUNK = 256 * 1024


class Conn:
    """What one accepted connection saw. Its handler fills it in as it goes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.hasher = hashlib.sha256()
        self.received = 0
        self.reads: list[int] = []  # the size of each recv, in order
        self.sent = 0
        self.eof = Event()       # the client's EOF arrived
        self.done = Event()      # the handler returned (the socket is closed)
        self.error: BaseException | None = None
        self.eof_at: float | None = None

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()

    def take(self, data: bytes) -> None:
        self.hasher.update(data)
        self.received += len(data)
        self.reads.append(len(data))

    def read_to_eof(self, reply_each: bytes = b"") -> None:
        while True:
            data = self.sock.recv(CHUNK)
            if not data:
                self.eof_at = time.monotonic()
                self.eof.set()
                return
            self.take(data)
            if reply_each:
                self.sock.sendall(reply_each)
                self.sent += len(reply_each)


class Backend:
    """A started server; `address` is its config text, `sockaddr` what clients connect to."""

    def __init__(self, handler, family: str = "tcp4", path: str = "", port: int = 0,
                 backlog: int = 1024):
        self.handler = handler
        self.conns: list[Conn] = []
        self.accepted = Event()
        if family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            self.sockaddr = path
            self.address = f"unix:{path}"
        else:
            host = "::1" if family == "tcp6" else "127.0.0.1"
            sock = socket.socket(socket.AF_INET6 if family == "tcp6" else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            self.sockaddr = sock.getsockname()[:2]
            port = self.sockaddr[1]
            self.address = f"[{host}]:{port}" if family == "tcp6" else f"{host}:{port}"
        sock.listen(backlog)
        self.family = family
        self._server = StreamServer(sock, self._handle, spawn=Pool())
        self._server.start()

    def _handle(self, sock: socket.socket, _address) -> None:
        conn = Conn(sock)
        self.conns.append(conn)
        self.accepted.set()
        try:
            self.handler(conn)
        except OSError as error:
            conn.error = error
        finally:
            conn.done.set()

    def stop(self) -> None:
        self._server.stop(timeout=0)


# --- handlers ----------------------------------------------------------------------------

def echo(conn: Conn) -> None:
    sock = conn.sock
    while True:
        data = sock.recv(CHUNK)
        if not data:
            conn.eof_at = time.monotonic()
            conn.eof.set()
            return
        conn.take(data)
        sock.sendall(data)
        conn.sent += len(data)


def sink(reply_each: bytes = b"", reply_at_eof: bytes = b"", delay: float = 0.0,
         hold: bool = False):
    """Hash what arrives; answer each chunk and/or after the EOF; `hold` keeps it open."""
    def handle(conn: Conn) -> None:
        conn.read_to_eof(reply_each)
        if delay:
            gevent.sleep(delay)
        if reply_at_eof:
            conn.sock.sendall(reply_at_eof)
            conn.sent += len(reply_at_eof)
        if hold:
            Event().wait()  # until stop() kills it
    return handle


def recording(reply_each: bytes | None = b""):
    """Keep every byte read in conn.data (and hash it) until the EOF; answer each chunk
    with `reply_each` (None: echo it)."""
    def handle(conn: Conn) -> None:
        conn.data = bytearray()
        while True:
            data = conn.sock.recv(CHUNK)
            if not data:
                conn.eof.set()
                return
            conn.take(data)
            conn.data += data
            answer = data if reply_each is None else reply_each
            if answer:
                conn.sock.sendall(answer)
    return handle


def received(server: "Backend") -> bytes:
    """Everything the `recording` connections of `server` have read so far."""
    return b"".join(bytes(getattr(conn, "data", b"")) for conn in server.conns)


def stall(conn: Conn) -> None:
    Event().wait()  # accept, never read; stop() closes it


def closer(reset: bool = False, after: int = 0):
    """Close after reading `after` bytes (at once by default): a FIN, or an RST if `reset`."""
    def handle(conn: Conn) -> None:
        while conn.received < after:
            data = conn.sock.recv(after - conn.received)
            if not data:
                break
            conn.take(data)
        if reset:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
    return handle


def reply_then_half_close(greeting: bytes):
    """Send `greeting`, half-close (our EOF), then go on reading the client to its EOF."""
    def handle(conn: Conn) -> None:
        conn.sock.sendall(greeting)
        conn.sent += len(greeting)
        conn.sock.shutdown(socket.SHUT_WR)
        conn.read_to_eof()
    return handle


def dies_after(limit: int):
    """Read about `limit` bytes, then close while more is arriving (the peer sees an RST)."""
    def handle(conn: Conn) -> None:
        while conn.received < limit:
            data = conn.sock.recv(min(CHUNK, limit - conn.received))
            if not data:
                return
            conn.take(data)
        conn.sock.close()
    return handle


def firehose(block: bytes):
    """Send `block` again and again until the peer goes away; `conn.sent` counts it.

    The stream is exactly `block * n` (a partial send resumes where it stopped).
    """
    def handle(conn: Conn) -> None:
        view, offset = memoryview(block), 0
        while True:
            sent = conn.sock.send(view[offset:])
            conn.sent += sent
            offset = (offset + sent) % len(block)
    return handle


# --- addresses nobody answers -------------------------------------------------------------

def unused_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (a connect is refused)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class BlackHole:
    """A loopback listener whose accept queue is full: new SYNs go unanswered, so a
    connect to it neither succeeds nor is refused, it times out."""

    def __init__(self):
        self._listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listening.bind(("127.0.0.1", 0))
        self._listening.listen(0)
        self.sockaddr = self._listening.getsockname()
        self.address = f"127.0.0.1:{self.sockaddr[1]}"
        self._fillers: list[socket.socket] = []
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            try:
                filler.connect(self.sockaddr)
            except (socket.timeout, TimeoutError):
                filler.close()
                return  # the queue is full
            self._fillers.append(filler)
        self.stop()
        raise RuntimeError("could not fill a listen(0) accept queue on 127.0.0.1")

    def stop(self) -> None:
        for sock in self._fillers + [self._listening]:
            sock.close()


# --- waiting and client-side helpers ------------------------------------------------------

def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01, what: str = ""):
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    with gevent.Timeout(timeout, False):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: {what or predicate}")


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    parts, left = [], count
    while left:
        data = sock.recv(min(left, CHUNK))
        if not data:
            raise AssertionError(f"EOF after {count - left} of {count} bytes")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def recv_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return b"".join(parts)
        parts.append(data)


def hash_to_eof(sock: socket.socket) -> tuple[str, int]:
    """sha256 and length of everything read until EOF."""
    hasher, total = hashlib.sha256(), 0
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return hasher.hexdigest(), total
        hasher.update(data)
        total += len(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sees_eof(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the peer closed (EOF or reset) within `timeout`; False if still open."""
    before = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False
    finally:
        sock.settimeout(before)


def peer_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the peer has closed its socket (not just half-closed) within `timeout`.

    After the peer's EOF a read says nothing more; a write does: a closed peer answers
    it with an RST, and the next write fails. The probe bytes are sent to the peer.
    """
    with gevent.Timeout(timeout, False):
        while True:
            try:
                sock.send(b"?")
            except OSError:
                return True
            gevent.sleep(0.02)
    return False


# --- the per-connection log line ---------------------------------------------------------

_CONNECTION_LINE = re.compile(
    r"^route=(?P<route>\S+) client=(?P<client>\S+) production=(?P<production>\S+) "
    r"duration=(?P<duration>[0-9.]+)s up=(?P<up>[0-9]+) down=(?P<down>[0-9]+)"
    r"(?P<shadows>(?: shadow\[\S+?\]=\w+(?:\(\S+?\))?)*) close=(?P<close>.+)$")
_SHADOW_STATE = re.compile(r"shadow\[(\S+?)\]=(\w+)")
_SHADOW_WHY = re.compile(r"shadow\[(\S+?)\]=\w+\((\S+?)\)")


def connection_lines(caplog) -> list[dict]:
    """The per-connection log lines so far, parsed into their fields."""
    found = []
    for record in caplog.records:
        match = _CONNECTION_LINE.match(record.getMessage())
        if match:
            fields = match.groupdict()
            fields["up"], fields["down"] = int(fields["up"]), int(fields["down"])
            fields["duration"] = float(fields["duration"])
            fields["why"] = dict(_SHADOW_WHY.findall(fields["shadows"]))
            fields["shadows"] = dict(_SHADOW_STATE.findall(fields["shadows"]))
            fields["level"] = record.levelname
            found.append(fields)
    return found


def wait_for_lines(caplog, count: int = 1, timeout: float = 5.0) -> list[dict]:
    return wait_until(lambda: len(connection_lines(caplog)) >= count and connection_lines(caplog),
                      timeout, what=f"{count} connection log line(s)")


def redis_pings(client) -> bool:
    """Whether a redis-py client's server answers PING."""
    try:
        return client.ping()
    except redis.exceptions.ConnectionError:
        return False


def json_server(price_of=lambda item: 10, noisy: tuple[str, ...] = (), encoding: str = "",
                chunked: bool = False, delay: float = 0.0, seen: list | None = None):
    """A keep-alive pywsgi server (started; `address` is "127.0.0.1:PORT") answering
    /items/N with a JSON item (Content-Type application/json). `noisy`: fields holding a
    fresh random id in every answer, as real services stamp theirs; `encoding` "gzip":
    the body gzipped; `chunked`: no Content-Length (pywsgi sends it chunked); `delay`:
    seconds before each answer; `seen`: the methods received, in order."""
    import gzip
    import json
    import uuid

    import gevent
    from gevent import socket as gsocket
    from gevent.pywsgi import WSGIServer

    def app(environ, start_response):
        environ["wsgi.input"].read()
        if seen is not None:
            seen.append(environ["REQUEST_METHOD"])
        if delay:
            gevent.sleep(delay)
        item = int(environ["PATH_INFO"].rsplit("/", 1)[-1] or 0)
        document = {"id": item, "name": f"item {item}", "price": price_of(item),
                    "tags": ["a", "b"]}
        document.update((field, uuid.uuid4().hex) for field in noisy)
        body = json.dumps(document).encode()
        headers = [("Content-Type", "application/json")]
        if encoding:
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        if not chunked:
            headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        # pywsgi would send the body after a HEAD's head too.
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]
    listening = gsocket.socket()
    # pywsgi writes head and body apart: without NODELAY, Nagle and delayed ACKs add 40 ms.
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    server = WSGIServer(listening, app, log=None, error_log=None)
    server.start()
    server.address = f"127.0.0.1:{server.server_port}"
    return server

