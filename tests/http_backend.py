"""A small HTTP/1.1 server for tests that send HTTP (gproxyctl replay, recording): reads
whole requests on kept-alive connections, answers each as told, and keeps them."""
from __future__ import annotations

import re

from gevent.pool import Pool
from gevent.server import StreamServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


def _ok(server, number, request):
    """200 with a 3-byte body (its head only, for HEAD)."""
    return OK[:OK.index(b"\r\n\r\n") + 4] if request.startswith(b"HEAD ") else OK


class HTTPServer:
    """Reads requests (head, then a Content-Length body) on kept-alive connections and
    answers each with `answer(server, connection_number, request) -> bytes | None`
    (None: close the connection without answering). Notes every request it read."""

    def __init__(self, answer=None, close_after: bool = False):
        self.answer = answer or _ok
        self.close_after = close_after  # close each connection after one answer
        self.requests: list[tuple[int, bytes]] = []
        self.connections = 0
        self.sockets: dict[int, object] = {}  # by connection number
        self._server = StreamServer(("127.0.0.1", 0), self._handle, spawn=Pool(2000))
        self._server.start()
        self.address = f"127.0.0.1:{self._server.server_port}"

    def _handle(self, sock, _peer):
        self.connections += 1
        number = self.connections
        self.sockets[number] = sock
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                data = sock.recv(65536)
                if not data:
                    sock.close()
                    return
                pending += data
            head, _, rest = pending.partition(b"\r\n\r\n")
            match = re.search(rb"\ncontent-length:\s*(\d+)", head, re.I)
            length = int(match.group(1)) if match else 0
            while len(rest) < length:
                rest += sock.recv(65536)
            request = head + b"\r\n\r\n" + rest[:length]
            pending = rest[length:]
            self.requests.append((number, request))
            answer = self.answer(self, number, request)
            if answer is None:
                sock.close()
                return
            sock.sendall(answer)
            if self.close_after:
                sock.close()
                return

    @property
    def replay_connections(self) -> int:
        """Connections that carried requests: gproxyctl replay's first connection only
        checks that the target is up."""
        return self.connections - 1

    def paths(self) -> list[bytes]:
        return [request.split(b" ", 2)[1] for _, request in self.requests]

    def stop(self):
        self._server.stop(timeout=1)
