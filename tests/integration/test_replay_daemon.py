"""A recording made by the installed daemon, replayed by the installed `gproxyctl replay`:
the backend gets again, byte for byte, what the daemon recorded of the clients' requests,
at the rate asked for."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from http_backend import HTTPServer
from service import GLOBAL, free_port, route_section, wait_until

from gproxyd.recordfile import RecordReader

GPROXYCTL = os.path.join(os.path.dirname(sys.executable), "gproxyctl")
REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\n\r\n",
    b"POST /cart HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 7\r\n\r\nitem=42",
    b"GET /b?page=2 HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\n\r\n",
    b"HEAD /c HTTP/1.1\r\nHost: shop.example\r\n\r\n",
]


def _send_through(port: int, requests: list[bytes]) -> None:
    """The requests on one kept-alive connection, each answer read before the next."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for request in requests:
            sock.sendall(request)
            answer = b""
            while not (answer.endswith(b"ok\n") or
                       (request.startswith(b"HEAD ") and answer.endswith(b"\r\n\r\n"))):
                data = sock.recv(65536)
                assert data, "gproxyd closed the connection"
                answer += data


def test_the_daemons_recording_replays_byte_for_byte(tmp_path, daemons):
    backend = HTTPServer()
    try:
        port = free_port()
        recording = tmp_path / "requests.rec"
        daemon = daemons(tmp_path, GLOBAL + route_section(
            "web", port, backend.address, protocol="http", record=str(recording))).start()
        _send_through(port, REQUESTS)
        wait_until(lambda: recording.exists() and
                   len(list(RecordReader(str(recording)))) == len(REQUESTS),
                   what="the four requests recorded")
        daemon.stop()
        recorded = [record.data for record in RecordReader(str(recording))]
        assert recorded == REQUESTS
        backend.requests.clear()
        out = tmp_path / "rows.json"
        process = subprocess.run(
            [GPROXYCTL, "replay", str(recording), "--target", backend.address, "--rates",
             "8", "--runs", "1", "--duration", "1s", "--json", str(out)],
            capture_output=True, text=True, timeout=30)
        assert process.returncode == 0, process.stderr
        (row,) = json.loads(out.read_text())
        assert row["answered"] == row["status_2xx"] == 8 and row["errors"] == 0
        assert [request for _, request in backend.requests] == REQUESTS * 2
        assert "knee: 8.0 req/s" in process.stdout
    finally:
        backend.stop()
