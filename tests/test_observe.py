"""Live benchmarking with real servers and real clients: HTTP, Redis, tcp, fallback."""
from __future__ import annotations

import itertools
import logging
import math
import shutil
import socket
import subprocess
import time
from collections import deque

import gevent
import gevent.monkey
import pytest
import redis
import requests
from backends import (
    recv_exactly,
    recv_to_eof,
    redis_pings,
    unused_port,
    wait_for_lines,
    wait_until,
)
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gproxyd.admin import AdminServer
from gproxyd.observe import DEFAULT_MAX_HEAD, Exchanges
from gproxyd.settings import ROUTE_BY_NAME, address
from gproxyd.stats import BackendStats, RouteStats


def http_backend(name: str, delay: float = 0.0, status: int = 200):
    """A keep-alive pywsgi server answering `name`, after `delay` seconds."""
    def app(environ, start_response):
        environ["wsgi.input"].read()
        if delay:
            gevent.sleep(delay)
        body = name.encode() * 10
        start_response(f"{status} X", [("Content-Length", str(len(body)))])
        return [body]
    listening = gsocket.socket()
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    server = WSGIServer(listening, app, log=None, error_log=None)
    server.start()
    server.address = f"127.0.0.1:{server.server_port}"
    return server


@pytest.fixture
def http_servers():
    started = []

    def make(*args, **kwargs):
        server = http_backend(*args, **kwargs)
        started.append(server)
        return server
    yield make
    for server in started:
        server.stop(timeout=1)


def url(proxied, path="/"):
    return f"http://{proxied.sockaddr[0]}:{proxied.sockaddr[1]}{path}"


def settle(proxied, expected: int, shadows=()):
    """Wait until production and each shadow have counted `expected` requests."""
    wait_until(lambda: proxied.stats.production.requests >= expected and all(
        proxied.stats.shadows[s].requests >= expected for s in shadows), timeout=10,
        what=f"{expected} requests counted")


def test_http_keepalive_counts_each_request_and_sees_the_candidate_delay(proxy, http_servers):
    production, candidate = http_servers("prod"), http_servers("cand", delay=0.03)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    with requests.Session() as client:
        for number in range(40):
            answer = client.get(url(proxied, f"/{number}"), timeout=5)
            assert answer.content == b"prod" * 10
            time.sleep(0.035)  # let the slower candidate keep up: no queue on its side
    settle(proxied, 40, [candidate.address])
    stats = proxied.stats
    assert stats.total == 1  # one keep-alive connection, 40 requests
    assert stats.production.requests == 40
    shadow = stats.shadows[candidate.address]
    assert shadow.requests == 40 and shadow.errors == 0 and shadow.dropped == 0
    gap = shadow.latency.percentile(0.5) - stats.production.latency.percentile(0.5)
    assert 0.02 < gap < 0.5, gap
    assert stats.parser_fallbacks == 0


def send_pipelined(proxied, count: int) -> bytes:
    """`count` GETs in one write, the last with Connection: close; the answers to EOF."""
    pipeline = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n
                        for n in range(count - 1))
    pipeline += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    client = proxied.connect()
    client.sendall(pipeline)
    answers = recv_to_eof(client)
    client.close()
    return answers


@pytest.mark.parametrize("delays", [(0.0, 0.0), (0.0, 0.02)])
def test_production_and_two_shadows_follow_one_framing_of_the_client_stream(
        proxy, http_servers, delays):
    """30 keep-alive requests, one write each: the client stream is framed 30 times,
    not once per backend (90), and each backend still pairs all 30 with its answers,
    timed on its own (a shadow 20 ms slower is seen as such)."""
    production = http_servers("p")
    fast, slow = http_servers("a", delay=delays[0]), http_servers("b", delay=delays[1])
    proxied = proxy(production.address, shadow=[fast.address, slow.address],
                    protocol="http")
    client = proxied.connect()
    try:
        for number in range(30):
            client.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % number)
            answer = b""
            while not answer.endswith(b"p" * 10):  # one answer; its body ends it
                data = client.recv(4096)
                assert data, f"EOF after {answer!r}"
                answer += data
        [session] = proxied.listener.sessions
        shared = session.production.observer.shared
        assert shared is not None
        assert [sink.upstream.observer.shared for sink in session.shadows] == [shared, shared]
        settle(proxied, 30, [fast.address, slow.address])
        assert shared.parses == 30
    finally:
        client.close()
    stats = proxied.stats
    for backend in (stats.production, stats.shadows[fast.address], stats.shadows[slow.address]):
        assert backend.requests == 30 and backend.errors == 0
    assert stats.parser_fallbacks == 0
    gap = (stats.shadows[slow.address].latency.percentile(0.5)
           - stats.shadows[fast.address].latency.percentile(0.5))
    assert (0.015 < gap < 0.5) if delays[1] else gap < 0.015, gap


def test_http_pipelined_requests_are_paired_in_order(proxy, http_servers):
    production = http_servers("p")
    proxied = proxy(production.address, protocol="http")
    answers = send_pipelined(proxied, 6)
    assert answers.count(b"HTTP/1.1 200") == 6
    settle(proxied, 6)
    assert proxied.stats.production.requests == 6
    assert proxied.stats.parser_fallbacks == 0


def test_pipelined_requests_are_timed_from_when_the_backend_could_start_on_them(
        proxy, http_servers):
    """Four requests in one write to a server taking 0.1 s each: the fourth answer
    comes 0.4 s after it was sent, but the server spent 0.1 s on it, as on each."""
    production = http_servers("p", delay=0.1)
    proxied = proxy(production.address, protocol="http")
    answers = send_pipelined(proxied, 4)
    assert answers.count(b"HTTP/1.1 200") == 4
    settle(proxied, 4)
    latency = proxied.stats.production.latency
    assert latency.percentile(0.01) >= 0.09
    assert latency.percentile(1.0) < 0.25, "a request was timed from when it was sent"


def test_http_chunked_head_and_5xx(proxy, servers):
    """A raw server: a chunked answer, a HEAD answer with Content-Length but no body, a 503."""
    def handler(conn):
        data = b""
        while data.count(b"\r\n\r\n") < 3:
            more = conn.sock.recv(4096)
            if not more:
                return
            data += more
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                          b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\nno")
    backend = servers._start(handler)
    proxied = proxy(backend.address, protocol="http")
    client = proxied.connect()
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: proxied.stats.production.requests == 3, what="3 answers paired")
    client.close()
    assert proxied.stats.production.errors == 1  # the 503
    assert proxied.stats.parser_fallbacks == 0


def test_garbage_falls_back_to_tcp_and_bytes_pass_untouched(proxy, servers):
    backend = servers.echo()
    proxied = proxy(backend, protocol="http")
    garbage = bytes(range(256)) * 40
    client = proxied.connect()
    client.sendall(garbage)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == garbage
    client.close()
    wait_until(lambda: proxied.stats.parser_fallbacks == 1, what="one fallback counted")


def test_tcp_route_counts_a_connection_as_a_request(proxy, servers):
    backend = servers.echo()
    proxied = proxy(backend)
    for _ in range(3):
        client = proxied.connect()
        client.sendall(b"x" * 100)
        client.shutdown(socket.SHUT_WR)
        assert recv_to_eof(client) == b"x" * 100
        client.close()
    settle(proxied, 3)
    production = proxied.stats.production
    assert production.requests == 3 and production.errors == 0
    assert production.bytes_sent == 300 and production.bytes_received == 300
    assert 0 < production.latency.max < 1.0


def test_redis_commands_and_pipelines_are_paired_on_both_sides(proxy, shadow_redis):
    production = redis.Redis(host="127.0.0.1", port=6379)
    assert redis_pings(production), "the machine's redis-server on 127.0.0.1:6379 is not running"
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis], protocol="redis")
    client = redis.Redis(host=proxied.sockaddr[0], port=proxied.sockaddr[1])
    # redis-py opens with its own handshake (HELLO 3, CLIENT ...): count it first. A reply
    # reached the client only after the proxy paired it, so the count is final here.
    assert client.ping() is True
    handshake = proxied.stats.production.requests
    handshake_errors = proxied.stats.production.errors
    assert handshake >= 1
    key = f"gproxyd-test-{time.time_ns()}"
    assert client.set(key, "v") is True
    assert client.get(key) == b"v"
    with client.pipeline(transaction=False) as pipe:
        for _ in range(10):
            pipe.incr(key + ":n")
        assert pipe.execute() == list(range(1, 11))
    with pytest.raises(redis.exceptions.ResponseError):
        client.incr(key)                          # not an integer: an error reply
    client.delete(key, key + ":n")
    client.close()
    expected = handshake + 1 + 1 + 10 + 1 + 1
    settle(proxied, expected, [shadow_redis])
    assert proxied.stats.production.requests == expected
    assert proxied.stats.production.errors == handshake_errors + 1
    shadow = proxied.stats.shadows[shadow_redis]
    assert shadow.requests == expected and shadow.errors == handshake_errors + 1
    assert redis.Redis(port=int(shadow_redis.rsplit(":", 1)[1])).exists(key) == 0
    assert proxied.stats.parser_fallbacks == 0


def test_admin_stats_and_metrics(proxy, http_servers):
    production, candidate = http_servers("p"), http_servers("c", status=500)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    listen="127.0.0.1:%d" % unused_port())
    with requests.Session() as client:
        for _ in range(5):
            assert client.get(url(proxied), timeout=5).status_code == 200
    settle(proxied, 5, [candidate.address])
    admin_address = address(f"127.0.0.1:{unused_port()}")
    admin = AdminServer(admin_address, lambda: {"test": proxied.stats})
    admin.start()
    try:
        base = f"http://{admin_address}"
        document = requests.get(base + "/stats", timeout=5).json()
        route = document["routes"]["test"]
        assert route["connections"]["total"] == 1
        assert route["production"]["requests"] == 5 and route["production"]["errors"] == 0
        assert set(route["production"]["latency_ms"]) >= {"p50", "p90", "p99", "max"}
        shadow = route["shadows"][candidate.address]
        assert (shadow["requests"], shadow["errors"], shadow["dropped"],
                shadow["mismatches"]) == (5, 5, 0, 5)  # 500 where production says 200

        text = requests.get(base + "/metrics", timeout=5).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text)
                   for s in family.samples}
        production_labels = (("backend", "production"), ("route", "test"))
        shadow_labels = (("backend", candidate.address), ("route", "test"))
        assert samples[("gproxyd_requests_total", production_labels)] == 5
        assert samples[("gproxyd_errors_total", shadow_labels)] == 5
        assert samples[("gproxyd_request_duration_seconds_count", production_labels)] == 5
        assert samples[("gproxyd_request_duration_seconds_bucket",
                        tuple(sorted(production_labels + (("le", "+Inf"),))))] == 5
        assert samples[("gproxyd_connections_active", (("route", "test"),))] == 0
        assert requests.get(base + "/nope", timeout=5).status_code == 404
    finally:
        admin.stop()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=6),
       protocol=st.sampled_from(["http", "redis"]))
def test_no_input_breaks_a_session_or_changes_a_byte(proxy, servers, chunks, protocol):
    """Whatever the client sends, an observed route relays it exactly (echo backend)."""
    proxied = proxy(servers.echo(), protocol=protocol)
    client = proxied.connect()
    for chunk in chunks:
        client.sendall(chunk)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b"".join(chunks)
    client.close()
    proxied.stop()


# --- nothing uncounted ------------------------------------------------------------------------

def test_after_a_fallback_what_was_counted_stays_and_the_rest_counts_by_turn(
        proxy, http_servers):
    """Two requests followed over keep-alive, then bytes that are not HTTP: the two stay
    counted, and each later turn (a client chunk, the answer after it) is one more."""
    backend = http_servers("prod")
    proxied = proxy(backend.address, protocol="http")
    client = proxied.connect()
    for _ in range(2):
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"prodprod" in client.recv(65536)
    wait_until(lambda: proxied.stats.production.requests == 2, what="two requests counted")
    client.sendall(b"\x00\x01 not http\r\n\r\n")  # the server answers 400 and closes
    assert recv_to_eof(client).startswith(b"HTTP/1.1 400")
    client.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    assert proxied.stats.parser_fallbacks == 1
    assert proxied.stats.production.requests == 3
    assert proxied.stats.production.latency.count == 3


NGINX_413 = """\
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {home}/body;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def test_an_early_413_is_paired_with_its_upload(proxy, tmp_path):
    """nginx answers 413 as soon as it has read the headers of a 30 MB upload: the
    answer comes before the request is complete, and is counted with it."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = unused_port()
    (tmp_path / "nginx.conf").write_text(NGINX_413.format(home=tmp_path, port=port))
    server = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                              stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _accepts(port), what="nginx listening")
        proxied = proxy(f"127.0.0.1:{port}", protocol="http")
        upload = tmp_path / "upload"
        upload.write_bytes(b"x" * (30 * 1024 * 1024))
        done = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
             f"@{upload}", "-H", "Expect:", url(proxied, "/upload")],
            capture_output=True, text=True, timeout=60)
        assert done.stdout == "413", done
        wait_until(lambda: proxied.stats.active == 0, what="the session ended")
        production = proxied.stats.production
        assert (production.requests, production.errors) == (1, 0)
        assert production.latency.count == 1
        assert proxied.stats.parser_fallbacks == 0
    finally:
        server.terminate()
        server.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --- fair clocks --------------------------------------------------------------------------

def test_answers_read_late_are_timed_when_they_arrived(proxy, shadow_redis):
    """The proxy's event loop is blocked for 300 ms while both redis-servers' answers
    wait in its sockets: each latency is still the servers' (well under 300 ms), read
    from the kernel's receive timestamps, not from when the loop got to the answer."""
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis], protocol="redis")
    client = proxied.connect()
    client.sendall(b"PING\r\n")
    assert client.recv(64) == b"+PONG\r\n"  # both connected, one exchange each
    session, = proxied.listener.sessions
    shadow, = session.shadows
    wait_until(lambda: shadow.upstream.received.bytes == 7, what="the shadow's first PONG")

    # A check watcher runs after the loop turn's I/O callbacks: the turn that relays
    # this PING then blocks the whole loop for 0.3 s while the answers arrive.
    check = gevent.get_hub().loop.check()
    blocked = []

    def block():
        if session.production.sent.bytes < 12:
            return  # a turn before the PING was relayed
        check.stop()
        blocked.append(session.production.received.bytes)
        gevent.monkey.get_original("time", "sleep")(0.3)
    client.sendall(b"PING\r\n")
    check.start(block)
    assert client.recv(64) == b"+PONG\r\n"
    assert blocked == [7], "the loop was not blocked before the second PONG was read"
    wait_until(lambda: shadow.upstream.received.bytes == 14, what="the shadow's second PONG")
    client.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    for backend in (proxied.stats.production, proxied.stats.shadows[shadow_redis]):
        assert backend.requests == 2
        assert backend.latency.max < 0.15, backend.latency.max  # 0.3 s without stamps


def test_a_shadow_answering_errors_where_production_does_not_is_diverged(
        proxy, http_servers, caplog):
    production, candidate = http_servers("prod"), http_servers("cand", status=500)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    with requests.Session() as client:
        for _ in range(10):
            assert client.get(url(proxied)).status_code == 200
    line, = wait_for_lines(caplog, timeout=10)
    assert line["shadows"] == {candidate.address: "diverged"}
    assert line["why"] == {candidate.address: "errors-10-production-0"}
    shadow = proxied.stats.shadows[candidate.address]
    assert (shadow.requests, shadow.errors, shadow.outcomes) == (10, 10, {"diverged": 1})


# --- bounded observers ------------------------------------------------------------------------

def _http_heads(conn) -> None:
    """A keep-alive HTTP backend for bodiless requests: keeps every byte read in
    conn.data and answers each head (through its blank line) with 200 "ok"."""
    conn.data = bytearray()
    seen = 0
    while True:
        data = conn.sock.recv(65536)
        if not data:
            conn.eof.set()
            return
        conn.take(data)
        conn.data += data
        while (end := conn.data.find(b"\r\n\r\n", seen)) >= 0:
            seen = end + 4
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def _send_slowly(client, data: bytes, piece: int = 1024) -> None:
    for start in range(0, len(data), piece):
        client.sendall(data[start:start + piece])
        gevent.sleep(0.002)


BIG_HEAD = (b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (20 * 1024) + b"\r\n\r\n")
SMALL_HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _big_head_session(proxied) -> bytes:
    """A small request, a 20 KiB head sent 1 KiB at a time, a small request: what the
    client got back."""
    client = proxied.connect()
    got = b""
    for count, head in enumerate((SMALL_HEAD, BIG_HEAD, SMALL_HEAD), 1):
        _send_slowly(client, head)
        while len(got) < count * len(ANSWER):
            chunk = client.recv(65536)
            assert chunk, got
            got += chunk
    client.shutdown(socket.SHUT_WR)
    got += recv_to_eof(client)
    client.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    return got


def test_a_head_over_observe_max_header_falls_back_and_passes_untouched(proxy, serve, caplog):
    """A 20 KiB head, sent slowly, on a route with the default observe-max-header
    (16 KiB): the observer stops buffering it and measures the connection by turn
    (one fallback), and both sides get every byte, unchanged."""
    caplog.set_level(logging.DEBUG, logger="gproxyd.observe")
    backend = serve(_http_heads)
    proxied = proxy(backend.address, protocol="http")
    assert proxied.route.observe_max_header == 16 * 1024
    assert _big_head_session(proxied) == ANSWER * 3
    (conn,) = backend.conns
    assert bytes(conn.data) == SMALL_HEAD + BIG_HEAD + SMALL_HEAD
    assert proxied.stats.parser_fallbacks == 1
    assert "request: header section or line over 16384 bytes" in caplog.text
    assert proxied.stats.production.requests == 3  # one framed, then two turns


def test_a_head_within_a_raised_observe_max_header_is_followed(proxy, serve):
    backend = serve(_http_heads)
    proxied = proxy(backend.address, protocol="http", observe_max_header="32KiB")
    assert _big_head_session(proxied) == ANSWER * 3
    assert proxied.stats.parser_fallbacks == 0
    assert proxied.stats.production.requests == 3


def test_exchanges_give_the_http_framers_their_head_limit():
    option = ROUTE_BY_NAME["observe-max-header"]
    assert DEFAULT_MAX_HEAD == option.parse(option.default)
    for limit, fallbacks in ((4096, 1), (8192, 0)):
        route_stats = RouteStats()
        exchanges = Exchanges("http", route_stats.production, route_stats, "test",
                              max_head=limit)
        exchanges.sent(BIG_HEAD[:6000])
        assert route_stats.parser_fallbacks == fallbacks
    redis_stats = RouteStats()
    exchanges = Exchanges("redis", BackendStats(), redis_stats, "test", max_head=16)
    exchanges.sent(b"*2\r\n$3\r\nGET\r\n$100\r\n" + b"k" * 100 + b"\r\n")  # its own bounds
    assert redis_stats.parser_fallbacks == 0 and exchanges.unanswered == 1


# Conversations as an observer sees them: ("sent" | "received" | "closed", bytes), each
# step a millisecond after the one before.
CONVERSATIONS = {
    "http": [
        ("sent", b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("received", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("sent", b"POST /2 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe"), ("sent", b"llo"),
        ("received", b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"),
        ("sent", b"HEAD /3 HTTP/1.1\r\n\r\nGET /4 HTTP/1.1\r\n\r\n"),
        ("received", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("received", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n\r\n"),
        ("sent", b"PUT /5 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        ("received", b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nno\n"),
        ("sent", b"GET /6 HTTP/1.1\r\n\r\n\r\n"),
        ("received", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"),
        ("sent", b"GET /ws HTTP/1.1\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"),
        ("received", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nhi"),
        ("sent", b"frames"), ("received", b"frames back"),
    ],
    "redis": [
        ("sent", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nxxx\r\n"), ("received", b"+OK\r\n"),
        ("sent", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" * 16),
        ("received", b"$3\r\nxxx\r\n" * 15 + b"-ERR busy\r\n"),
        ("sent", b"*4\r\n$6\r\nLRANGE\r\n$1\r\nl\r\n$1\r\n0\r\n$2\r\n99\r\n"),
        ("received", b"*100\r\n" + b"$3\r\nxxx\r\n" * 100),
        ("sent", b"PING\r\n"), ("received", b"+PONG\r\n"),
        ("sent", b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"), ("received", b"%1\r\n+proto\r\n:3\r\n"),
        ("sent", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), ("received", b"|1\r\n+a\r\n+b\r\n#f\r\n"),
        ("sent", b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n"),
        ("received", b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"),
        ("received", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n"),
    ],
}


def converse(protocol: str, use_native: bool, cuts: list[int]) -> tuple:
    """What an observer made of CONVERSATIONS[protocol], each step cut at `cuts`."""
    route_stats = RouteStats()
    observer = Exchanges(protocol, route_stats.production, route_stats, "test",
                         use_native=use_native)
    now = 100.0
    for step, (direction, data) in enumerate(CONVERSATIONS[protocol]):
        now += 0.001
        edges = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts[step::7])})
        for begin, end in zip(edges, edges[1:], strict=False):
            if observer.watching:
                getattr(observer, direction)(memoryview(bytearray(data[begin:end])), now)
    stats = route_stats.production
    return (stats.requests, stats.errors, stats.latency.export(), observer.answers,
            observer.failures, observer.unanswered, route_stats.parser_fallbacks)


@pytest.mark.parametrize("protocol", ["http", "redis"])
def test_the_c_parsers_in_front_measure_what_the_python_framers_measure(protocol):
    """Requests, errors, every latency, fallbacks: the same with httptools and hiredis
    in front as with the Python framers alone (whole messages, pipelines, a body in two
    writes, HEAD, 1xx, an upgrade; RESP3 after HELLO, a subscription)."""
    python = converse(protocol, False, [])
    assert python == converse(protocol, True, [])
    assert python[0] >= (7 if protocol == "http" else 20)
    observer = Exchanges(protocol, BackendStats(), RouteStats(), "test")
    assert type(observer._requests).__module__ == "gproxyd.protocols.native"


@settings(max_examples=100, deadline=None)
@given(protocol=st.sampled_from(["http", "redis"]),
       cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_both_paths_measure_the_same_however_the_bytes_come(protocol, cuts):
    assert converse(protocol, True, cuts) == converse(protocol, False, cuts)


DEEP_REPLY = b"*1\r\n" * 1_000_000 + b":1\r\n"  # 4 MB, a million arrays deep


def _deep_redis(conn) -> None:
    """A scripted redis-server: answers its first command with DEEP_REPLY and each
    later one with +PONG (commands as redis-py's PING sends them)."""
    command = b"*1\r\n$4\r\nPING\r\n"
    got = b""
    answered = 0
    while True:
        data = conn.sock.recv(65536)
        if not data:
            conn.eof.set()
            return
        conn.take(data)
        got += data
        while got.startswith(command):
            got = got[len(command):]
            conn.sock.sendall(DEEP_REPLY if not answered else b"+PONG\r\n")
            answered += 1


def test_a_reply_nested_past_max_depth_falls_back_and_passes_untouched(proxy, serve, caplog):
    """A reply a million aggregates deep: the observer stops at MAX_DEPTH (one fallback,
    measured by turn from there on), and the client gets every byte of it."""
    caplog.set_level(logging.DEBUG, logger="gproxyd.observe")
    backend = serve(_deep_redis)
    proxied = proxy(backend.address, protocol="redis")
    client = proxied.connect()
    client.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert recv_exactly(client, len(DEEP_REPLY)) == DEEP_REPLY
    client.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert recv_exactly(client, 7) == b"+PONG\r\n"
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""
    client.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    assert proxied.stats.parser_fallbacks == 1
    assert "response: reply nested deeper than 128" in caplog.text
    production = proxied.stats.production
    assert production.requests == 2 and production.errors == 0  # then by turn
    assert production.bytes_received == len(DEEP_REPLY) + 7


# --- the answers of one chunk, recorded in one step ---------------------------------------

REDIS_COMMANDS = [b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nxxx\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
                  b"*4\r\n$6\r\nLRANGE\r\n$1\r\nl\r\n$1\r\n0\r\n$2\r\n99\r\n"]
REDIS_REPLIES = [b"+OK\r\n", b"$3\r\nxxx\r\n", b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"]
REDIS_ERROR = b"-ERR busy\r\n"


@st.composite
def pipelined_conversation(draw, whole_runs: bool = False) -> list:
    """Writes of 1 to 20 commands and chunks of their replies (some errors), each piece
    at a time after the one before or at the same time, some cut in two: [(direction,
    bytes, when in µs, [completions: (kind, is_error) per answer or None per request])].
    `whole_runs`: mostly writes of one command, answered all at once without errors in
    one chunk (the framers' path for answers of one type)."""
    steps, owed, now = [], [], 0
    for _ in range(draw(st.integers(1, 30))):
        if owed and draw(st.booleans()):
            whole = whole_runs and draw(st.booleans())
            count = len(owed) if whole else draw(st.integers(1, len(owed)))
            answered, owed = owed[:count], owed[count:]
            errors = ([False] * count if whole else
                      draw(st.lists(st.booleans(), min_size=count, max_size=count)))
            replies = [REDIS_ERROR if error else REDIS_REPLIES[kind]
                       for kind, error in zip(answered, errors, strict=True)]
            steps.append(("received", replies, errors))
        else:
            if whole_runs and draw(st.booleans()):
                kinds = [draw(st.integers(0, 2))] * draw(st.integers(1, 20))
            else:
                kinds = draw(st.lists(st.integers(0, 2), min_size=1, max_size=20))
            owed += kinds
            steps.append(("sent", [REDIS_COMMANDS[kind] for kind in kinds], None))
    timed = []
    for direction, messages, errors in steps:
        data = b"".join(messages)
        ends = list(itertools.accumulate(map(len, messages)))
        cut = 0 if whole_runs and draw(st.booleans()) else draw(st.integers(0, len(data)))
        for begin, end in ((0, cut), (cut, len(data))):
            if begin == end:
                continue
            now += draw(st.sampled_from([0, 0, 1, 7, 50, 333, 4000]))
            done = [index for index, stop in enumerate(ends) if begin < stop <= end]
            timed.append((direction, data[begin:end], now,
                          [errors[index] if errors else None for index in done]))
    return timed


def answer_by_answer(conversation) -> tuple:
    """What the pairing rule gives when each answer is recorded on its own: an answer is
    timed from its request's last byte, or from the answer before it when that came
    later (the chunk before: answers of one chunk share it)."""
    stats = BackendStats()
    pending, answered = deque(), 0.0
    for direction, _, micros, completed in conversation:
        now = 100.0 + micros / 1e6
        if direction == "sent":
            pending.extend(now for _ in completed)
            continue
        for is_error in completed:
            sent = pending.popleft()
            stats.record(now - max(sent, answered), is_error)
        if completed:
            answered = now
    return stats, len(pending)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=st.booleans().flatmap(pipelined_conversation), use_native=st.booleans())
def test_the_answers_of_a_chunk_recorded_at_once_count_as_one_by_one(conversation,
                                                                    use_native):
    """Pipelines written at once, answered in chunks of any size (from one write or
    several, cut anywhere, some errors; or all at once, of one type): requests, errors,
    every histogram bucket, the maximum and what is still owed are what recording each
    answer on its own gives."""
    route_stats = RouteStats()
    observer = Exchanges("redis", route_stats.production, route_stats, "test",
                         use_native=use_native)
    for direction, data, micros, _ in conversation:
        getattr(observer, direction)(memoryview(bytearray(data)), 100.0 + micros / 1e6)
    expected, owed = answer_by_answer(conversation)
    got = route_stats.production
    assert route_stats.parser_fallbacks == 0
    assert (got.requests, got.errors) == (expected.requests, expected.errors)
    assert (observer.answers, observer.failures) == (expected.requests, expected.errors)
    assert got.latency.counts == expected.latency.counts
    assert (got.latency.count, got.latency.max) == (expected.latency.count,
                                                      expected.latency.max)
    assert math.isclose(got.latency.total, expected.latency.total, rel_tol=1e-9)
    assert got.snapshot() == expected.snapshot()
    assert observer.unanswered == owed


@pytest.mark.parametrize("mirrored", [False, True], ids=["alone", "with-a-shadow"])
def test_pipelines_of_16_through_the_proxy_are_counted_answer_by_answer(
        proxy, shadow_redis, mirrored):
    """redis-benchmark -P 16's traffic against real redis-servers: 16 commands in one
    write (5 of them errors), their replies read before the next 16, on 3 connections:
    every request, every error and every latency counted, on production and shadow."""
    production = redis.Redis(host="127.0.0.1", port=6379)
    assert redis_pings(production), "the machine's redis-server on 127.0.0.1:6379 is not running"
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis] if mirrored else [],
                    protocol="redis")
    key = f"gproxyd-test-{time.time_ns()}".encode()
    set_ = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nxxx\r\n" % (len(key), key)
    get = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
    incr = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key)  # not a number: an error
    pipeline = (set_ + get + incr) * 5 + get
    direct = socket.create_connection(("127.0.0.1", 6379), timeout=10)
    direct.sendall(set_ + incr)  # the error's text, as this redis-server words it
    error = b""
    while not error.endswith(b"\r\n") or error.count(b"\r\n") < 2:
        error += direct.recv(4096)
    direct.close()
    assert error.startswith(b"+OK\r\n-")
    reply = (b"+OK\r\n$3\r\nxxx\r\n" + error[5:]) * 5 + b"$3\r\nxxx\r\n"
    rounds, connections = 50, 3
    clients = [proxied.connect() for _ in range(connections)]
    for _ in range(rounds):
        for client in clients:
            client.sendall(pipeline)
        for client in clients:
            assert recv_exactly(client, len(reply)) == reply
    clients[0].sendall(b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(key), key))
    assert recv_exactly(clients[0], 4) == b":1\r\n"
    for client in clients:
        client.close()
    expected = rounds * connections * 16 + 1
    shadows = [shadow_redis] if mirrored else []
    settle(proxied, expected, shadows)
    for backend in [proxied.stats.production] + [proxied.stats.shadows[s] for s in shadows]:
        assert backend.requests == expected
        assert backend.errors == rounds * connections * 5
        assert backend.latency.count == expected
        assert sum(backend.latency.counts) == expected
        assert 0 < backend.latency.max < 10
    assert proxied.stats.parser_fallbacks == 0
