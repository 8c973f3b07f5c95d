"""The installed gproxyd between two HAProxies, speaking the PROXY protocol both ways:
haproxy (send-proxy-v2) -> gproxyd (accept-proxy, send-proxy) -> haproxy (accept-proxy,
send-proxy) -> a backend that records what it gets. The client's own address and port
must arrive at the end, and every byte exactly."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess

import pytest
from gevent.server import StreamServer
from service import GLOBAL, Daemon, free_port, route_section, send_and_read_to_eof, wait_until

from gproxyd.proxyproto import parse


class HeaderRecorder:
    """A backend that takes a PROXY header (kept parsed in `headers`), keeps the bytes
    after it in `data`, and echoes those bytes back."""

    def __init__(self, echo: bool = True):
        self.echo = echo
        self.headers = []
        self.data: list[bytearray] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _address):
        taken = bytearray()
        header = None
        with sock:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                taken += chunk
                if header is None:
                    header = parse(bytes(taken))
                    if header is None:
                        continue
                    self.headers.append(header)
                    del taken[:header.length]
                    self.data.append(taken)
                    chunk = bytes(taken)
                if self.echo and chunk:
                    sock.sendall(chunk)
            if header is None:
                self.headers.append(None)

    def stop(self):
        self.server.stop(timeout=1)


@pytest.fixture
def haproxy(tmp_path):
    """haproxy(name, config_body) -> a running haproxy with that config; stopped after."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.path.exists(binary), "haproxy is not installed (.ci/install-system-deps " \
                                   "installs the Debian package haproxy)"
    started = []

    def start(name: str, body: str) -> None:
        path = tmp_path / f"{name}.cfg"
        path.write_text("global\n    maxconn 100\n\ndefaults\n    mode tcp\n"
                        "    timeout connect 5s\n    timeout client 30s\n"
                        "    timeout server 30s\n\n" + body)
        check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        started.append(subprocess.Popen([binary, "-db", "-f", str(path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def wait_listening(port: int) -> None:
    """Until a socket listens on `port`, read from /proc/net/tcp: a probe connection
    would itself travel the chain and reach the recorders."""
    def listening():
        with open("/proc/net/tcp") as table:
            return any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A"
                       for fields in (line.split() for line in list(table)[1:]))
    wait_until(listening, what=f"something listening on port {port}")


def round_trip(port: int, payload: bytes) -> tuple[tuple[str, int], bytes]:
    """Send `payload`, half-close, read the echo to EOF: (our address, what came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        return sock.getsockname(), send_and_read_to_eof(sock, payload)


def test_haproxy_in_front_and_behind_the_client_address_and_bytes_arrive(
        tmp_path, haproxy):
    end = HeaderRecorder()
    shadow = HeaderRecorder(echo=False)
    back_port, gproxyd_port, front_port = free_port(), free_port(), free_port()
    haproxy("back", f"listen back\n    bind 127.0.0.1:{back_port} accept-proxy\n"
                    f"    server end {end.address} send-proxy\n")
    daemon = Daemon(tmp_path, GLOBAL + route_section(
        "web", gproxyd_port, f"127.0.0.1:{back_port}", shadow=shadow.address,
        accept_proxy="v2", send_proxy="v1", shadow_send_proxy="v2")).start()
    haproxy("front", f"listen front\n    bind 127.0.0.1:{front_port}\n"
                     f"    server gproxyd 127.0.0.1:{gproxyd_port} send-proxy-v2\n")
    try:
        wait_listening(back_port)
        wait_listening(front_port)
        payload = os.urandom(3 << 20)
        client, answer = round_trip(front_port, payload)
        assert hashlib.sha256(answer).hexdigest() == hashlib.sha256(payload).hexdigest(), \
            f"{len(answer)} bytes came back for {len(payload)}"

        # The end saw the client's own address and port, and haproxy's front as where it
        # connected: through two PROXY hops and gproxyd.
        header, = end.headers
        assert header.addresses.source == client
        assert header.addresses.destination == ("127.0.0.1", front_port)
        assert bytes(end.data[0]) == payload
        daemon.wait_log(f"route=web client=127.0.0.1:{client[1]} ")
        wait_until(lambda: shadow.headers and len(shadow.data[0]) == len(payload),
                   what="the shadow's copy")
        assert shadow.headers[0].version == 2
        assert shadow.headers[0].addresses.source == client
        assert bytes(shadow.data[0]) == payload
    finally:
        daemon.stop()
        end.stop()
        shadow.stop()


def test_a_client_without_a_header_is_closed_and_production_sees_nothing(tmp_path):
    end = HeaderRecorder()
    port = free_port()
    daemon = Daemon(tmp_path, GLOBAL + route_section("web", port, end.address,
                                                     accept_proxy="any")).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with the request unread: a reset
        daemon.wait_log("no PROXY header: the connection began with b'GET / HTTP/1.1")
        assert "; connection closed" in daemon.log()
        assert end.headers == []
    finally:
        daemon.stop()
        end.stop()
