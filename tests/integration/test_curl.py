"""curl through the installed daemon: keep-alive requests counted one by one on both sides."""
from __future__ import annotations

import shutil
import socket
import subprocess

import requests
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer
from service import GLOBAL, Daemon, free_port, route_section, wait_until


def _http_server(name: bytes) -> WSGIServer:
    def app(environ, start_response):
        body = name + b" " + environ["PATH_INFO"].encode() + b"\n"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    listening = gsocket.socket()
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    server = WSGIServer(listening, app, log=None, error_log=None)
    server.start()
    return server


def test_curl_keepalive_through_an_http_route_with_a_shadow(tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl is not installed (.ci/install-system-deps installs it)"
    production, candidate = _http_server(b"production"), _http_server(b"candidate")
    port, admin = free_port(), free_port()
    config = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}") + route_section(
        "web", port, f"127.0.0.1:{production.server_port}",
        shadow=f"127.0.0.1:{candidate.server_port}", protocol="http")
    daemon = Daemon(tmp_path, config).start()
    try:
        urls = [f"http://127.0.0.1:{port}/{n}" for n in range(3)]
        result = subprocess.run([curl, "-sS", "--http1.1", *urls], capture_output=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"production /0\nproduction /1\nproduction /2\n"

        def route():
            return requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()[
                "routes"]["web"]
        shadow = f"127.0.0.1:{candidate.server_port}"
        wait_until(lambda: route()["shadows"].get(shadow, {}).get("requests") == 3,
                   what="the shadow's 3 answers paired")
        stats = route()
        assert stats["connections"]["total"] == 1  # curl kept the connection alive
        assert stats["production"]["requests"] == 3
        assert stats["production"]["errors"] == 0
    finally:
        daemon.stop()
        production.stop()
        candidate.stop()
