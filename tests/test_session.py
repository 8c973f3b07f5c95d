"""session.py: connecting production, ending a connection, and its log line and counters."""
import logging
import socket
import struct
import time

import gevent
import pytest
from backends import recv_exactly, recv_to_eof, sees_eof, unused_port, wait_for_lines, wait_until


def test_refused_production_closes_the_client_promptly_and_says_why(servers, proxy, caplog):
    port = unused_port()
    proxied = proxy(f"127.0.0.1:{port}")
    client = proxied.connect()
    client.sendall(b"anyone there?")

    assert sees_eof(client, timeout=2), "the client was left hanging"
    line, = wait_for_lines(caplog)
    assert line["close"] == f"production 127.0.0.1:{port} unreachable: Connection refused"
    assert line["production"] == f"127.0.0.1:{port}"
    production = proxied.stats.production
    assert (production.connect_failures, production.errors, proxied.stats.active) == (1, 1, 0)

    # The listener goes on serving: once production is back, the next client gets through.
    servers.echo(port=port)
    again = proxied.connect()
    again.sendall(b"now?")
    assert recv_exactly(again, 4) == b"now?"
    assert (production.connect_failures, production.errors) == (1, 1)


def test_production_that_never_answers_the_connect_is_given_up_after_connect_timeout(
        servers, proxy, caplog):
    hole = servers.black_hole()
    proxied = proxy(hole, connect_timeout="300ms")
    started = time.monotonic()
    client = proxied.connect()

    assert sees_eof(client, timeout=5)
    assert time.monotonic() - started >= 0.29, "gave up before connect-timeout"
    line, = wait_for_lines(caplog)
    assert line["close"] == f"production {hole.address} unreachable: Connection timed out"
    assert proxied.stats.production.connect_failures == 1


def test_the_connection_line_names_route_peers_duration_bytes_and_reason(
        servers, proxy, caplog):
    production = servers.sink(reply_at_eof=b"0123456789", delay=0.2)
    proxied = proxy(production)
    client = proxied.connect()
    client.sendall(b"x" * 1000)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b"0123456789"
    host, port = client.getsockname()
    client.close()

    line, = wait_for_lines(caplog)
    assert line["level"] == "INFO"
    assert line["route"] == "test"
    assert line["client"] == f"{host}:{port}"
    assert line["production"] == production.address
    assert 0.2 <= line["duration"] < 5
    assert (line["up"], line["down"]) == (1000, 10)
    assert line["shadows"] == {}
    assert line["close"] == "eof"
    assert (proxied.stats.total, proxied.stats.active) == (1, 0)
    production = proxied.stats.production
    assert (production.bytes_sent, production.bytes_received) == (1000, 10)
    assert (production.connect_failures, production.resets, production.errors) == (0, 0, 0)


def test_production_reset_ends_the_session_without_a_warning(servers, proxy, caplog):
    production = servers.closer(reset=True, after=5)
    proxied = proxy(production)
    client = proxied.connect()
    client.sendall(b"hello")

    assert sees_eof(client, timeout=2)
    line, = wait_for_lines(caplog)
    assert line["close"] == "production: Connection reset by peer"
    assert line["up"] == 5
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    wait_until(lambda: proxied.stats.active == 0)
    assert proxied.stats.production.resets == 1


def test_a_client_reset_ends_the_session_and_production_is_let_go(servers, proxy, caplog):
    production = servers.echo()
    proxied = proxy(production)
    client = proxied.connect()
    client.sendall(b"x" * 100_000)
    recv_exactly(client, 10)  # the rest of the echo stays unread in the client's buffer
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()            # an RST

    conn = production.conns[0]
    assert conn.done.wait(5), "production's connection was not ended"
    line, = wait_for_lines(caplog)
    assert line["close"].startswith("client: "), line["close"]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    wait_until(lambda: proxied.stats.active == 0)
    assert proxied.stats.production.resets == 0, "the client's reset is not production's"


def test_counters_sum_over_sessions_and_track_the_live_ones(servers, proxy, caplog):
    proxied = proxy(servers.echo())
    clients = [proxied.connect() for _ in range(5)]
    for number, client in enumerate(clients):
        client.sendall(b"x" * (number + 1))
        assert recv_exactly(client, number + 1) == b"x" * (number + 1)
    assert (proxied.stats.active, proxied.stats.total) == (5, 5)

    for client in clients:
        client.shutdown(socket.SHUT_WR)
    gevent.joinall([gevent.spawn(recv_to_eof, client) for client in clients], raise_error=True)
    wait_until(lambda: proxied.stats.active == 0)
    assert proxied.stats.total == 5
    production = proxied.stats.production
    assert (production.bytes_sent, production.bytes_received) == (15, 15)
    assert sorted(line["up"] for line in wait_for_lines(caplog, 5)) == [1, 2, 3, 4, 5]


def test_a_host_name_production_is_resolved_and_served(proxy, servers):
    backend = servers.echo()
    port = backend.address.rsplit(":", 1)[1]
    proxied = proxy(f"localhost:{port}")
    client = proxied.connect()
    client.sendall(b"by name")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b"by name"
    client.close()


def test_a_client_reset_on_a_unix_production_closes_the_session_once(servers, proxy, caplog):
    """A unix connect completes at once; the session once kept a stale connect in
    progress that abort() ended a second time: two close lines, active -1, production's
    bytes counted twice."""
    echo = servers.echo(family="unix")
    proxied = proxy(echo)
    client = proxied.connect()
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset

    line, = wait_for_lines(caplog)
    assert (line["up"], line["down"]) == (4, 4), line
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    gevent.sleep(0.2)  # a second close would come from the same loop turns
    assert proxied.stats.active == 0 and proxied.stats.total == 1
    assert proxied.stats.production.bytes_sent == 4
    assert len([r for r in caplog.records if r.name == "gproxyd.session"
                and "close=" in r.getMessage()]) == 1


def _answer_then_reset(size: int):
    """Read the request, send `size` bytes of answer, then close with an RST."""
    def handle(conn) -> None:
        conn.take(conn.sock.recv(65536))
        conn.sock.sendall(b"a" * size)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()
    return handle


def test_a_production_reset_reaches_the_client_as_a_reset(serve, proxy, caplog):
    """Not as a clean EOF: a close-delimited answer cut short must not look complete."""
    production = serve(_answer_then_reset(4 * 1024 * 1024))
    proxied = proxy(production)
    client = proxied.connect()
    client.sendall(b"GET /big\r\n")
    received = 0
    with pytest.raises(ConnectionResetError):
        while True:
            data = client.recv(65536)
            if not data:
                raise AssertionError(f"a clean EOF after {received} bytes")
            received += len(data)
    line, = wait_for_lines(caplog)
    assert line["close"].startswith("production: ")


def test_a_client_reset_reaches_production_as_a_reset(servers, proxy):
    production = servers.echo()
    proxied = proxy(production)
    client = proxied.connect()
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    conn = production.conns[0]
    assert conn.done.wait(5)
    assert isinstance(conn.error, ConnectionResetError), conn.error


@pytest.mark.parametrize("ends", ["both-eof", "client-reset"])
def test_an_ended_session_is_freed_by_reference_counting_alone(servers, proxy, ends):
    # Reference cycles would leave each connection's objects to the cycle collector,
    # whose passes cost more than the rest of a short connection's Python.
    import gc

    from gproxyd.channel import Channel
    from gproxyd.relay import Direction, Relay
    from gproxyd.session import Session
    from gproxyd.upstream import Upstream
    ours = (Session, Upstream, Channel, Relay, Direction)
    proxied = proxy(servers.echo())
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            client = proxied.connect()
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            if ends == "client-reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                client.shutdown(socket.SHUT_WR)
                assert recv_to_eof(client) == b""
            client.close()
        wait_until(lambda: proxied.stats.active == 0)
        gc.collect()
        left = [type(thing).__name__ for thing in gc.garbage if isinstance(thing, ours)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
    assert proxied.stats.total == 3
