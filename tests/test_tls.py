"""tls.py: TLS options checked as config errors, termination on the listen side,
production-tls and shadow-tls, failed handshakes counted and logged, rotation on reload.

Certificates are made by the openssl command line for each test (tests/tls_certs.py);
clients and TLS backends are the ssl module's (gevent's, monkey-patched), over loopback.
"""
import hashlib
import logging
import os
import socket
import ssl
import textwrap
from pathlib import Path

import gevent
import gevent.event
import pytest
import tls_certs
from backends import recv_exactly, sees_eof, wait_for_lines, wait_until
from gevent.server import StreamServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from gproxyd.admin import metrics_text
from gproxyd.channel import connect
from gproxyd.config import ConfigError, load_config, make_route
from gproxyd.stats import RouteStats
from gproxyd.tls import LOG_EVERY, HandshakeFailures, RouteTLS


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate it signed (SAN 127.0.0.1, localhost; serial 1) and an
    unrelated CA."""
    class Pki:
        ca = tls_certs.make_ca(tmp_path)
        server = tls_certs.make_server(tmp_path, ca)
        other_ca = tls_certs.make_ca(tmp_path, "other-ca")
        directory = tmp_path
    return Pki


def client_context(pki, alpn=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_connect(proxied, pki, server_name="localhost", alpn=None) -> ssl.SSLSocket:
    raw = socket.create_connection(proxied.sockaddr, timeout=10)
    return client_context(pki, alpn).wrap_socket(raw, server_hostname=server_name)


class TLSBackend:
    """A TLS server on 127.0.0.1:0 that echoes (or records and answers) what it reads."""

    def __init__(self, pair, answer: bytes | None = None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pair.cert), str(pair.key))
        self.answer, self.data, self.handshakes = answer, bytearray(), 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle, ssl_context=context)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _peer):
        self.handshakes += 1
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                self.data += data
                sock.sendall(data if self.answer is None else self.answer)
        except (OSError, ssl.SSLError):
            return
        finally:
            sock.close()

    def stop(self):
        self.server.stop(timeout=0)


@pytest.fixture
def tls_backends():
    started = []

    def start(pair, answer=None):
        started.append(TLSBackend(pair, answer))
        return started[-1]
    yield start
    for backend in started:
        backend.stop()


def read_until(sock, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        data = sock.recv(65536)
        assert data, f"EOF after {len(got)} of {count} bytes"
        got += data
    return bytes(got)


# --- config: every problem is a FILE:LINE error with the reason ----------------------------

def write_config(tmp_path, route_lines: str) -> str:
    path = tmp_path / "gproxyd.conf"
    path.write_text("[gproxyd]\nadmin = off\n\n[route web]\nlisten = 127.0.0.1:8443\n"
                    "production = 127.0.0.1:9\n" + textwrap.dedent(route_lines))
    return str(path)


def config_error(tmp_path, route_lines: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, route_lines), [], {})
    return str(caught.value)


def test_bad_tls_files_are_config_errors_naming_file_line_and_reason(pki, tmp_path):
    ca, server, other = pki.ca, pki.server, pki.other_ca
    encrypted = tmp_path / "encrypted.key"
    tls_certs._openssl("genrsa", "-aes128", "-passout", "pass:secret", "-out", str(encrypted),
                       "2048", cwd=tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    path = str(tmp_path / "gproxyd.conf")
    table = [
        (f"tls-cert = {server.cert}\ntls-key = {other.key}\n",
         f"{path}:8: tls-key: the private key in {other.key} does not match the certificate "
         f"in {server.cert} (expected the key the certificate was issued for)"),
        (f"tls-cert = {tmp_path}/missing.crt\ntls-key = {server.key}\n",
         f"{path}:7: tls-cert: cannot read {tmp_path}/missing.crt: No such file or directory "
         "(expected a PEM file readable by gproxyd's user)"),
        (f"tls-cert = {junk}\ntls-key = {server.key}\n",
         f"{path}:7: tls-cert: no PEM certificate in {junk} (expected -----BEGIN "
         "CERTIFICATE----- blocks: the server's certificate, then its chain)"),
        (f"tls-cert = {server.cert}\ntls-key = {junk}\n",
         f"{path}:8: tls-key: no PEM private key in {junk} (expected a -----BEGIN PRIVATE "
         "KEY----- block)"),
        (f"tls-cert = {server.cert}\n",
         f"{path}:7: tls-cert: no PEM private key in {server.cert} (expected a -----BEGIN "
         "PRIVATE KEY----- block)"),
        (f"tls-cert = {server.cert}\ntls-key = {encrypted}\n",
         f"{path}:8: tls-key: the private key in {encrypted} is encrypted (expected an "
         "unencrypted key: gproxyd does not ask for a passphrase; protect the file by its "
         "mode instead)"),
        (f"tls-key = {server.key}\n",
         f"{path}:7: tls-key: a key without a certificate (expected tls-cert too)"),
        (f"tls-ca = {ca.cert}\n",
         f"{path}:7: tls-ca: verifies the backends' TLS (expected production-tls = on or "
         "shadow-tls = on)"),
        (f"production-tls = on\ntls-ca = {junk}\n",
         f"{path}:8: tls-ca: no PEM certificate in {junk} (expected the CA certificates "
         "backends are verified with)"),
        ("tls-cert = server.crt\n",
         f"{path}:7: tls-cert: bad path 'server.crt' (expected an absolute path, e.g. "
         "/var/lib/gproxyd/web.rec)"),
        ("production-tls = maybe\n",
         f"{path}:7: production-tls: bad boolean 'maybe' (expected yes or no)"),
    ]
    for lines, expected in table:
        assert config_error(tmp_path, lines) == expected, lines


def test_a_unix_backend_needs_a_server_name_to_be_verified(pki, tmp_path):
    path = write_config(tmp_path, "production-tls = on\n")
    text = open(path).read().replace("production = 127.0.0.1:9",
                                     "production = unix:/run/app.sock")
    open(path, "w").write(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], {})
    assert str(caught.value) == (f"{path}:7: production-tls: unix:/run/app.sock has no host "
                                 "name to verify its certificate against (expected "
                                 "tls-server-name, or tls-verify = off)")
    open(path, "a").write("tls-server-name = app.internal\n")
    assert load_config(path, [], {}).routes[0].tls_server_name == "app.internal"


def test_a_good_pair_loads_and_the_key_may_be_in_the_certificate_file(pki, tmp_path):
    config = load_config(write_config(tmp_path, f"tls-cert = {pki.server.cert}\n"
                                                f"tls-key = {pki.server.key}\n"
                                                "production-tls = on\n"
                                                f"tls-ca = {pki.ca.cert}\n"), [], {})
    route = config.routes[0]
    assert (route.production_tls, route.shadow_tls, route.tls_verify) == (True, False, True)
    both = tmp_path / "both.pem"
    both.write_text(pki.server.cert.read_text() + pki.server.key.read_text())
    assert load_config(write_config(tmp_path, f"tls-cert = {both}\n"), [], {}).routes[0] \
        .tls_cert == str(both)


# --- terminating TLS on the listen side ----------------------------------------------------

def test_a_terminating_route_relays_plaintext_both_ways_with_backpressure(
        pki, servers, proxy):
    production = servers.echo()
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    client = tls_connect(proxied, pki)
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    client.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"
    # 4 MiB each way at once: the echo can only answer as fast as the client reads.
    payload = os.urandom(4 * 2 ** 20)
    writer = gevent.spawn(client.sendall, payload)
    assert hashlib.sha256(read_until(client, len(payload))).hexdigest() == \
        hashlib.sha256(payload).hexdigest()
    writer.get(timeout=10)
    conn, = production.conns
    assert conn.received == len(payload) + 5  # production got plaintext, nothing else
    client.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session to end")
    assert proxied.stats.tls_handshake_failures == {"client": 0}


def test_half_close_passes_through_the_tls_side_both_ways(pki, servers, proxy):
    production = servers.sink(reply_at_eof=b"answer after your EOF")
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    # close_notify and a FIN reach production as an EOF; its answer comes back, then
    # gproxyd's close_notify once production has closed.
    assert half_closing_exchange(proxied, pki, b"request") == b"answer after your EOF"
    assert production.conns[0].received == 7


def half_closing_exchange(proxied, pki, request: bytes) -> bytes:
    """A TLS client (memory BIOs, to hold on to the half-closed connection) that sends
    `request`, then close_notify and its FIN, and reads the answer up to gproxyd's
    close_notify."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.create_connection(proxied.sockaddr, timeout=10)

    def send_what_tls_has():
        data = outgoing.read()
        if data:
            sock.sendall(data)

    def feed() -> None:
        data = sock.recv(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            send_what_tls_has()
            feed()
    tls.write(request)
    try:
        tls.unwrap()
    except ssl.SSLWantReadError:
        pass  # close_notify sent; gproxyd's comes after the answer
    send_what_tls_has()
    sock.shutdown(socket.SHUT_WR)
    answer = bytearray()
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            feed()
            continue
        except ssl.SSLZeroReturnError:
            chunk = b""
        if not chunk:
            sock.close()
            return bytes(answer)
        answer += chunk


def test_alpn_offers_http11_on_http_routes_only(pki, servers, proxy):
    production = servers.echo()
    files = {"tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key)}
    http = proxy(production, protocol="http", **files)
    tcp = proxy(production, **files)
    assert tls_connect(http, pki, alpn=["h2", "http/1.1"]).selected_alpn_protocol() == \
        "http/1.1"
    assert tls_connect(tcp, pki, alpn=["h2", "http/1.1"]).selected_alpn_protocol() is None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_below_12_and_plaintext_clients_fail_counted_logged_and_the_route_serves_on(
        pki, servers, proxy, caplog):
    production = servers.echo()
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    old = client_context(pki)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    raw = socket.create_connection(proxied.sockaddr, timeout=10)
    with pytest.raises((ssl.SSLError, OSError)):
        old.wrap_socket(raw, server_hostname="localhost")
    plain = socket.create_connection(proxied.sockaddr, timeout=10)
    plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sees_eof(plain, timeout=5)
    wait_until(lambda: proxied.stats.tls_handshake_failures["client"] == 2,
               what="both failures counted")
    warnings = [record.getMessage() for record in caplog.records
                if record.name == "gproxyd.tls"]
    assert len(warnings) == 1, warnings  # the second within the minute: counted only
    assert warnings[0].startswith("route test: TLS handshake with client 127.0.0.1:")
    assert production.conns == []  # nothing reached production
    client = tls_connect(proxied, pki)
    client.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"


def test_a_client_that_never_finishes_the_handshake_is_closed_after_connect_timeout(
        pki, servers, proxy):
    proxied = proxy(servers.echo(), tls_cert=str(pki.server.cert),
                    tls_key=str(pki.server.key), connect_timeout="300ms")
    silent = socket.create_connection(proxied.sockaddr, timeout=10)
    assert sees_eof(silent, timeout=5)
    assert proxied.stats.tls_handshake_failures["client"] == 1


def test_handshake_failures_are_logged_once_a_minute_with_the_count_between(caplog):
    caplog.set_level(logging.WARNING, logger="gproxyd.tls")
    counts = {}
    failures = HandshakeFailures("web", "client", counts)
    assert counts == {"client": 0}
    for _ in range(3):
        failures.failed("127.0.0.1:1", "wrong version number")
    failures._said -= LOG_EVERY  # a minute later
    failures.failed("127.0.0.1:2", "wrong version number")
    lines = [record.getMessage() for record in caplog.records]
    assert counts == {"client": 4}
    assert len(lines) == 2
    assert "(1 since the last line;" in lines[0] and "(3 since the last line;" in lines[1]


# --- towards production and shadows ----------------------------------------------------------

def test_production_tls_re_encrypts_a_terminated_client_towards_production(
        pki, proxy, tls_backends):
    production = tls_backends(pki.server)
    proxied = proxy(production.address, tls_cert=str(pki.server.cert),
                    tls_key=str(pki.server.key), production_tls="on", tls_ca=str(pki.ca.cert))
    client = tls_connect(proxied, pki)
    payload = os.urandom(300_000)
    writer = gevent.spawn(client.sendall, payload)
    assert read_until(client, len(payload)) == payload
    writer.get(timeout=10)
    assert bytes(production.data) == payload
    assert proxied.stats.tls_handshake_failures == {"client": 0, "production": 0}


def test_production_tls_from_a_plaintext_client(pki, proxy, tls_backends):
    production = tls_backends(pki.server)
    proxied = proxy(production.address, production_tls="on", tls_ca=str(pki.ca.cert))
    client = proxied.connect()
    client.sendall(b"in the clear to gproxyd")
    assert recv_exactly(client, 23) == b"in the clear to gproxyd"


@pytest.mark.parametrize("options, reason", [
    ({"tls_ca": "other"}, "certificate verify failed: unable to get local issuer certificate"),
    ({"tls_ca": "ca", "tls_server_name": "wrong.example"},
     "certificate verify failed: Hostname mismatch, certificate is not valid for "
     "'wrong.example'."),
])
def test_a_production_that_fails_verification_is_counted_logged_and_closes_that_client(
        pki, proxy, tls_backends, caplog, options, reason):
    production = tls_backends(pki.server)
    options = dict(options, tls_ca=str({"ca": pki.ca, "other": pki.other_ca}[
        options["tls_ca"]].cert))
    proxied = proxy(production.address, production_tls="on", **options)
    client = proxied.connect()
    client.sendall(b"x")
    assert sees_eof(client, timeout=5)
    line, = wait_for_lines(caplog)
    assert line["close"] == f"production {production.address} unreachable: TLS handshake " \
                            f"failed: {reason}"
    stats = proxied.stats
    assert stats.tls_handshake_failures == {"production": 1}
    assert (stats.production.connect_failures, stats.production.errors) == (1, 1)
    warning, = [record.getMessage() for record in caplog.records
                if record.name == "gproxyd.tls"]
    assert warning.startswith(f"route test: TLS handshake with production "
                              f"{production.address} failed: {reason} (1 since")
    assert production.data == b""  # nothing was sent to an unverified production


def test_tls_verify_off_accepts_any_certificate(pki, proxy, tls_backends):
    production = tls_backends(pki.server)
    proxied = proxy(production.address, production_tls="on", tls_verify="off")
    client = proxied.connect()
    client.sendall(b"anyone")
    assert recv_exactly(client, 6) == b"anyone"


def test_a_tls_shadow_gets_the_plaintext_re_encrypted_and_answers_are_paired(
        pki, servers, proxy, tls_backends):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    production = tls_backends(pki.server, answer=answer)
    shadow = tls_backends(pki.server, answer=answer)
    proxied = proxy(production.address, shadow=[shadow.address], protocol="http",
                    tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                    production_tls="on", shadow_tls="on", tls_ca=str(pki.ca.cert))
    client = tls_connect(proxied, pki)
    assert client.selected_alpn_protocol() is None  # the client offered none
    requests = b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in range(3))
    for number in range(3):
        request = f"GET /{number} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        client.sendall(request)
        assert read_until(client, len(answer)) == answer
    wait_until(lambda: bytes(shadow.data) == requests, what="the shadow's copy")
    stats = proxied.stats
    wait_until(lambda: stats.shadow(shadow.address).requests == 3,
               what="the shadow's 3 answers paired")
    assert stats.production.requests == 3
    assert stats.tls_handshake_failures == {"client": 0, "production": 0, "shadow": 0}


def test_a_shadow_failing_verification_is_counted_and_production_serves_on(
        pki, proxy, tls_backends, servers):
    production = servers.echo()
    shadow = tls_backends(pki.server)
    proxied = proxy(production, shadow=[shadow.address], shadow_tls="on",
                    tls_ca=str(pki.other_ca.cert))
    client = proxied.connect()
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    wait_until(lambda: proxied.stats.tls_handshake_failures.get("shadow") == 1,
               what="the shadow's failure counted")
    assert shadow.data == b""


# --- reload: rotation ------------------------------------------------------------------------

def test_a_reload_rotates_the_certificate_for_new_connections_only(pki, servers, proxy,
                                                                   tmp_path):
    production = servers.echo()
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    proxied = proxy(production, tls_cert=str(cert), tls_key=str(key))
    live = tls_connect(proxied, pki)
    assert tls_certs.serial_of(live.getpeercert(True)) == 1
    renewed = tls_certs.make_server(tmp_path, pki.ca, "renewed", serial=2)
    cert.write_bytes(renewed.cert.read_bytes())
    key.write_bytes(renewed.key.read_bytes())
    route = proxied.listener.route
    proxied.listener.update(make_route("test", listen="127.0.0.1:0",
                                       production=route.production.text,
                                       tls_cert=str(cert), tls_key=str(key)))
    fresh = tls_connect(proxied, pki)
    assert tls_certs.serial_of(fresh.getpeercert(True)) == 2
    for client in (live, fresh):
        client.sendall(b"still")
        assert recv_exactly(client, 5) == b"still"
    # Files that cannot be used (a half-written key) keep the contexts read before.
    key.write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")
    proxied.listener.update(make_route("test", listen="127.0.0.1:0",
                                       production=route.production.text,
                                       tls_cert=str(cert), tls_key=str(key)))
    assert tls_certs.serial_of(tls_connect(proxied, pki).getpeercert(True)) == 2


# --- /metrics --------------------------------------------------------------------------------

def test_handshake_failures_are_a_counter_family_by_route_and_side():
    routes = {"web": RouteStats(tls_handshake_failures={"client": 3, "production": 1}),
              "plain": RouteStats()}
    text = metrics_text(routes)
    assert 'gproxyd_tls_handshake_failures_total{route="web",side="client"} 3.0\n' in text.decode()
    assert 'route="plain",side=' not in text.decode()

    class Reference:
        def collect(self):
            family = CounterMetricFamily(
                "gproxyd_tls_handshake_failures",
                "TLS handshakes that failed (a timeout, a verification failure, no shared "
                "protocol), by side: client (tls-cert), production (production-tls) or "
                "shadow (shadow-tls)", labels=["route", "side"])
            family.add_metric(["web", "client"], 3)
            family.add_metric(["web", "production"], 1)
            yield family
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    expected = generate_latest(registry)
    assert text.endswith(expected)
    assert metrics_text({"plain": RouteStats()}).count(b"tls") == 0


# --- resets ----------------------------------------------------------------------------------

def test_a_production_reset_reaches_the_tls_client_as_a_reset(pki, servers, proxy):
    production = servers.dies_after(4)  # reads 4 bytes, then closes with bytes unread: RST
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    client = tls_connect(proxied, pki)
    client.sendall(b"1234" + b"x" * 100_000)
    # Read below TLS: the ssl module reports a reset as a plain EOF.
    below = socket.socket(fileno=client.detach())
    with pytest.raises(ConnectionResetError):
        while below.recv(65536):
            pass
    below.close()


# --- the example config ----------------------------------------------------------------------

def test_the_example_config_loads_with_real_files_in_place_of_its_paths(pki, tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / "tls.conf").read_text()
    for name, path in (("api.crt", pki.server.cert), ("api.key", pki.server.key),
                       ("internal-ca.crt", pki.ca.cert)):
        assert f"/etc/gproxyd/tls/{name}" in text
        text = text.replace(f"/etc/gproxyd/tls/{name}", str(path))
    config_path = tmp_path / "tls.conf"
    config_path.write_text(text)
    route, = load_config(str(config_path), [], {}).routes
    assert (route.protocol, route.production_tls, route.shadow_tls, route.tls_verify,
            route.tls_server_name) == ("http", True, True, True, "api.internal")


def test_a_slow_production_pauses_the_tls_client_and_every_byte_arrives(pki, serve, proxy):
    def late_reader(conn):
        gevent.sleep(0.5)  # meanwhile the pair and the sockets fill up: reading pauses
        conn.read_to_eof()
        conn.sock.sendall(conn.sha256.encode())

    production = serve(late_reader)
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    payload = os.urandom(8 * 2 ** 20)
    answer = half_closing_exchange(proxied, pki, payload)
    assert answer == hashlib.sha256(payload).hexdigest().encode()


def test_hooks_see_and_change_the_plaintext_of_a_terminated_route(pki, servers, proxy):
    class Upper:
        def on_data(self, conn, data):
            return bytes(data).upper()

    production = servers.echo()
    proxied = proxy(production, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                    hooks=Upper())
    client = tls_connect(proxied, pki)
    client.sendall(b"shout this")
    assert recv_exactly(client, 10) == b"SHOUT THIS"


def test_a_proxy_header_comes_before_the_handshake_and_names_the_client(
        pki, servers, proxy, caplog):
    production = servers.echo()
    proxied = proxy(production, accept_proxy="v1", tls_cert=str(pki.server.cert),
                    tls_key=str(pki.server.key))
    raw = socket.create_connection(proxied.sockaddr, timeout=10)
    raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 443\r\n")
    client = client_context(pki).wrap_socket(raw, server_hostname="localhost")
    client.sendall(b"behind a balancer")
    assert recv_exactly(client, 17) == b"behind a balancer"
    client.close()
    line, = wait_for_lines(caplog)
    assert line["client"] == "192.0.2.7:51234"


def test_send_proxy_goes_before_the_handshake_towards_a_tls_production(pki, proxy):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    headers = []

    def handle(sock, _peer):
        line = b""
        while not line.endswith(b"\r\n"):
            line += sock.recv(1)
        headers.append(line)
        with context.wrap_socket(sock, server_side=True) as secured:
            secured.sendall(secured.recv(100))

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        proxied = proxy(f"127.0.0.1:{server.server_port}", send_proxy="v1",
                        production_tls="on", tls_ca=str(pki.ca.cert))
        client = proxied.connect()
        client.sendall(b"over tls")
        assert recv_exactly(client, 8) == b"over tls"
        host, port = client.getsockname()
        assert headers == [f"PROXY TCP4 {host} 127.0.0.1 {port} "
                           f"{proxied.sockaddr[1]}\r\n".encode()]
    finally:
        server.stop(timeout=0)


def test_a_send_buffer_set_on_the_plaintext_end_applies_to_the_tls_socket(pki, tls_backends):
    """shadow-memory sizes a shadow's send buffer on the channel the shadow sink gets (the
    pair's end): the bytes it bounds wait in the TLS socket's buffer, which gets it too."""
    backend = tls_backends(pki.server)
    route = make_route("test", listen="127.0.0.1:0", production=backend.address,
                       production_tls="on", tls_ca=str(pki.ca.cert))
    upgrade = RouteTLS(route, {}).production
    outcome = gevent.event.AsyncResult()

    def connected(plain, error):
        plain.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        outcome.set((plain, error))

    channel = connect(route.production, 5)
    bridge = upgrade.secure(channel, route.production, connected)
    plain, error = outcome.get(timeout=5)
    assert error is None
    assert bridge.raw.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == \
        plain.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    plain.close()


def test_handshakes_in_progress_count_against_max_connections_and_drain_closes_them(
        pki, servers, proxy):
    proxied = proxy(servers.echo(), tls_cert=str(pki.server.cert),
                    tls_key=str(pki.server.key), max_connections=1)
    silent = socket.create_connection(proxied.sockaddr, timeout=10)  # never says hello
    wait_until(lambda: len(proxied.listener._handshakes) == 1, what="the handshake")
    refused = socket.create_connection(proxied.sockaddr, timeout=10)
    assert sees_eof(refused, timeout=5)
    assert proxied.stats.rejected == 1
    proxied.listener.close()
    assert proxied.listener.drain(0.2) == 0
    assert sees_eof(silent, timeout=5)
    assert not proxied.listener._handshakes
    assert proxied.stats.tls_handshake_failures == {"client": 0}  # given up, not failed
