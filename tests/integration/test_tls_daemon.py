"""TLS through the installed daemon: curl and Python clients through a terminating http
route to a plain and to a TLS production, a shadow over TLS with its answers paired,
verification failures counted and logged while the daemon serves on, certificate
rotation by SIGHUP under a live keep-alive connection, and bad pairs refused by
--check-config (78) and by a reload (the old certificate stays)."""
from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import requests
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer
from service import GLOBAL, free_port, gproxyd_command, route_section, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tls_certs  # noqa: E402  (tests/: certificates by the openssl command)


def _http_server(name: bytes, pair: tls_certs.Pair | None = None) -> WSGIServer:
    """An HTTP/1.1 server answering `NAME PATH`; HTTPS with `pair`."""
    def app(environ, start_response):
        body = name + b" " + environ["PATH_INFO"].encode() + b"\n"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    listening = gsocket.socket()
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    tls = {}
    if pair is not None:
        tls["ssl_context"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls["ssl_context"].load_cert_chain(str(pair.cert), str(pair.key))
    server = WSGIServer(listening, app, log=None, error_log=None, **tls)
    server.start()
    return server


def _curl(*args: str) -> subprocess.CompletedProcess:
    curl = shutil.which("curl")
    assert curl, "curl is not installed (.ci/install-system-deps installs it)"
    return subprocess.run([curl, "-sS", "--http1.1", *args], capture_output=True, timeout=30)


def _route_stats(admin: int, name: str) -> dict:
    return requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()["routes"][name]


def _metric(admin: int, line_start: str) -> float | None:
    text = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def _global(admin: int) -> str:
    return GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}")


def _served_serial(port: int, ca: tls_certs.Pair) -> int:
    context = ssl.create_default_context(cafile=str(ca.cert))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="localhost") as client:
        return tls_certs.serial_of(client.getpeercert(True))


def test_curl_and_python_through_a_terminating_route_to_plain_and_tls_production(
        tmp_path, daemons):
    ca = tls_certs.make_ca(tmp_path)
    server = tls_certs.make_server(tmp_path, ca)
    backend = tls_certs.make_server(tmp_path, ca, "backend", serial=7)
    plain, secure = _http_server(b"plain"), _http_server(b"secure", backend)
    web, web_tls, admin = free_port(), free_port(), free_port()
    files = {"tls_cert": str(server.cert), "tls_key": str(server.key), "protocol": "http"}
    config = _global(admin) + route_section(
        "web", web, f"127.0.0.1:{plain.server_port}", **files) + route_section(
        "web-tls", web_tls, f"localhost:{secure.server_port}", production_tls="on",
        tls_ca=str(ca.cert), **files)
    daemon = daemons(tmp_path, config).start()
    try:
        for port, name in ((web, b"plain"), (web_tls, b"secure")):
            urls = [f"https://localhost:{port}/{n}" for n in range(3)]
            result = _curl("--cacert", str(ca.cert), *urls)
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"".join(name + f" /{n}\n".encode() for n in range(3))
            with requests.Session() as session:  # one kept-alive connection
                for number in range(2):
                    answer = session.get(f"https://127.0.0.1:{port}/py{number}",
                                         verify=str(ca.cert), timeout=10)
                    assert answer.text == name.decode() + f" /py{number}\n"
        for route in ("web", "web-tls"):
            stats = _route_stats(admin, route)
            assert stats["connections"]["total"] == 2  # curl's and requests' connections
            assert stats["production"]["requests"] == 5  # the observer saw plaintext
            assert stats["production"]["errors"] == 0
        assert _route_stats(admin, "web-tls")["tls_handshake_failures"] == {
            "client": 0, "production": 0}
        # curl with the wrong CA: its failure, not gproxyd's; counted as a client's.
        refused = _curl("--cacert", str(backend.cert), f"https://localhost:{web}/")
        assert refused.returncode == 60, refused  # peer certificate cannot be authenticated
        wait_until(lambda: _metric(admin, 'gproxyd_tls_handshake_failures_total{route="web",'
                                          'side="client"}') == 1, what="the client's failure")
    finally:
        daemon.stop()
        plain.stop()
        secure.stop()


def test_verification_failures_are_counted_and_logged_and_the_daemon_serves_on(
        tmp_path, daemons):
    ca = tls_certs.make_ca(tmp_path)
    other_ca = tls_certs.make_ca(tmp_path, "other-ca")
    backend = tls_certs.make_server(tmp_path, ca, "backend")
    secure = _http_server(b"secure", backend)
    wrong_ca, wrong_name, good, admin = free_port(), free_port(), free_port(), free_port()
    production = f"127.0.0.1:{secure.server_port}"
    config = _global(admin) + route_section(
        "wrong-ca", wrong_ca, production, production_tls="on", tls_ca=str(other_ca.cert),
        protocol="http") + route_section(
        "wrong-name", wrong_name, production, production_tls="on", tls_ca=str(ca.cert),
        tls_server_name="db.internal", protocol="http") + route_section(
        "good", good, production, production_tls="on", tls_ca=str(ca.cert), protocol="http")
    daemon = daemons(tmp_path, config).start()
    try:
        for port in (wrong_ca, wrong_name, wrong_ca):
            result = _curl(f"http://127.0.0.1:{port}/")
            assert result.returncode != 0 and result.stdout == b""
        assert requests.get(f"http://127.0.0.1:{good}/fine", timeout=10).text == \
            "secure /fine\n"
        wait_until(lambda: _metric(admin, 'gproxyd_tls_handshake_failures_total{'
                                          'route="wrong-ca",side="production"}') == 2,
                   what="two failures on wrong-ca")
        assert _metric(admin, 'gproxyd_tls_handshake_failures_total{route="wrong-name",'
                              'side="production"}') == 1
        assert _route_stats(admin, "wrong-ca")["production"]["connect_failures"] == 2
        daemon.wait_log("route wrong-ca: TLS handshake with production")
        log = daemon.log()
        assert log.count("route wrong-ca: TLS handshake with production") == 1  # once a minute
        assert "certificate verify failed: unable to get local issuer certificate" in log
        assert "route wrong-name: TLS handshake with production 127.0.0.1:" in log
        assert "Hostname mismatch, certificate is not valid for 'db.internal'" in log
        assert "Traceback" not in log
        assert daemon.process.poll() is None
    finally:
        daemon.stop()
        secure.stop()


def test_a_tls_shadow_gets_the_requests_and_both_sides_are_paired(tmp_path, daemons):
    ca = tls_certs.make_ca(tmp_path)
    server = tls_certs.make_server(tmp_path, ca)
    backend = tls_certs.make_server(tmp_path, ca, "backend")
    production, candidate = _http_server(b"production"), _http_server(b"candidate", backend)
    port, admin = free_port(), free_port()
    shadow = f"127.0.0.1:{candidate.server_port}"
    config = _global(admin) + route_section(
        "web", port, f"127.0.0.1:{production.server_port}", shadow=shadow, protocol="http",
        tls_cert=str(server.cert), tls_key=str(server.key), shadow_tls="on",
        tls_ca=str(ca.cert), compare="status")
    daemon = daemons(tmp_path, config).start()
    try:
        urls = [f"https://localhost:{port}/{n}" for n in range(4)]
        result = _curl("--cacert", str(ca.cert), *urls)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"".join(f"production /{n}\n".encode() for n in range(4))
        wait_until(lambda: _route_stats(admin, "web")["shadows"].get(shadow, {}).get(
            "requests") == 4, what="the shadow's 4 answers paired")
        stats = _route_stats(admin, "web")
        assert stats["production"]["requests"] == 4
        assert stats["shadows"][shadow]["compared"] == 4
        assert stats["shadows"][shadow]["mismatches"] == 0  # same status: 200
        assert stats["tls_handshake_failures"] == {"client": 0, "shadow": 0}
    finally:
        daemon.stop()
        production.stop()
        candidate.stop()


def test_sighup_rotates_the_certificate_under_a_live_keepalive_connection(
        tmp_path, daemons):
    ca = tls_certs.make_ca(tmp_path)
    first = tls_certs.make_server(tmp_path, ca, "first", serial=1)
    second = tls_certs.make_server(tmp_path, ca, "second", serial=2)
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    plain = _http_server(b"plain")
    port, admin = free_port(), free_port()
    config = _global(admin) + route_section(
        "web", port, f"127.0.0.1:{plain.server_port}", protocol="http",
        tls_cert=str(cert), tls_key=str(key))
    daemon = daemons(tmp_path, config).start()
    try:
        assert _served_serial(port, ca) == 1
        live = requests.Session()
        assert live.get(f"https://localhost:{port}/before", verify=str(ca.cert),
                        timeout=10).text == "plain /before\n"
        cert.write_bytes(second.cert.read_bytes())
        key.write_bytes(second.key.read_bytes())
        daemon.reload()
        assert _served_serial(port, ca) == 2
        # The live connection kept its TLS session (and certificate) and serves on.
        assert live.get(f"https://localhost:{port}/after", verify=str(ca.cert),
                        timeout=10).text == "plain /after\n"
        assert _route_stats(admin, "web")["connections"]["total"] == 3  # one was reused

        # A key that does not match: the reload fails with the reason, serial 2 stays.
        key.write_bytes(first.key.read_bytes())
        daemon.reload()
        status = wait_until(
            lambda: (found := requests.get(f"http://127.0.0.1:{admin}/stats",
                                           timeout=5).json()["reload"])["ok"] is False
            and found, what="the failed reload in /stats")
        assert re.search(r"gproxyd.conf:\d+: tls-key: the private key in .*live.key does "
                         r"not match the certificate in .*live.crt", status["error"])
        assert _served_serial(port, ca) == 2
        assert live.get(f"https://localhost:{port}/still", verify=str(ca.cert),
                        timeout=10).text == "plain /still\n"
        live.close()
    finally:
        daemon.stop()
        plain.stop()


def test_check_config_refuses_a_mismatched_pair_with_file_line_and_reason(tmp_path):
    ca = tls_certs.make_ca(tmp_path)
    server = tls_certs.make_server(tmp_path, ca)
    other = tls_certs.make_server(tmp_path, ca, "other", serial=3)
    path = tmp_path / "gproxyd.conf"
    path.write_text("[gproxyd]\nadmin = off\n\n" + route_section(
        "web", free_port(), "127.0.0.1:9", tls_cert=str(server.cert),
        tls_key=str(other.key)))
    result = subprocess.run(gproxyd_command() + ["--check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert result.stderr == (f"gproxyd: {path}:8: tls-key: the private key in {other.key} "
                             f"does not match the certificate in {server.cert} (expected "
                             "the key the certificate was issued for)\n")
    path.write_text(path.read_text().replace(str(other.key), str(server.key)))
    result = subprocess.run(gproxyd_command() + ["--check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_workers_terminate_tls_and_their_failures_are_summed(tmp_path, daemons):
    ca = tls_certs.make_ca(tmp_path)
    server = tls_certs.make_server(tmp_path, ca)
    plain = _http_server(b"plain")
    port, admin = free_port(), free_port()
    config = _global(admin).replace("[gproxyd]\n", "[gproxyd]\nworkers = 2\n") + \
        route_section("web", port, f"127.0.0.1:{plain.server_port}", protocol="http",
                      tls_cert=str(server.cert), tls_key=str(server.key))
    daemon = daemons(tmp_path, config).start()
    try:
        for number in range(6):  # new connections: both workers take some
            answer = requests.get(f"https://localhost:{port}/{number}", verify=str(ca.cert),
                                  timeout=10, headers={"Connection": "close"})
            assert answer.text == f"plain /{number}\n"
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
                assert sock.recv(100) == b""
        wait_until(lambda: _route_stats(admin, "web")["tls_handshake_failures"] == {
            "client": 4}, what="the 4 failures summed over the workers")
        assert _route_stats(admin, "web")["production"]["requests"] == 6
    finally:
        daemon.stop()
        plain.stop()
