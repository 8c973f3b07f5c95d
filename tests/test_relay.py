"""relay.py through a running listener: byte-exact copy loops, half-close, backpressure.

Every route is tried raw (the splice pump) and with a shadow (the copy pump, which shows
each chunk to the shadow sink first): both must move the client's bytes untouched.
"""
import _socket
import errno
import fcntl
import os
import socket
import struct
import termios

import gevent
import pytest
from backends import hash_to_eof, recv_exactly, recv_to_eof, sha256, wait_for_lines, wait_until
from gevent.event import AsyncResult

from gproxyd.channel import Channel, Connecting
from gproxyd.relay import Counter, Direction, Relay
from gproxyd.settings import address

MiB = 1024 * 1024
CHUNK = 256 * 1024  # gproxyd.relay.CHUNK: the most a pump holds in user space or a pipe

PUMPS = ["splice", "copy"]


def start(proxy, servers, production, pump: str, **options):
    """A proxy to `production`; with pump='copy' the route also mirrors to a hashing sink."""
    if pump == "copy":
        shadow = servers.sink()
        return proxy(production, shadow=[shadow], shadow_buffer="64MiB", **options), shadow
    return proxy(production, **options), None


def send_then_half_close(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("pump", PUMPS)
def test_large_streams_both_ways_at_once_are_byte_exact(servers, proxy, caplog, pump):
    echo = servers.echo()
    proxied, shadow = start(proxy, servers, echo, pump)
    data = os.urandom(20 * MiB)
    client = proxied.connect()
    sender = gevent.spawn(send_then_half_close, client, data)
    digest, length = hash_to_eof(client)  # reads while the sender is still sending
    sender.get()
    client.close()

    assert (length, digest) == (len(data), sha256(data))
    assert echo.conns[0].sha256 == sha256(data)
    line, = wait_for_lines(caplog)
    assert (line["up"], line["down"], line["close"]) == (len(data), len(data), "eof")
    production = proxied.stats.production
    assert (production.bytes_sent, production.bytes_received) == (len(data), len(data))
    if shadow is not None:
        assert shadow.conns[0].eof.wait(5)
        assert shadow.conns[0].sha256 == sha256(data)


@pytest.mark.parametrize("pump", PUMPS)
def test_large_stream_up_only_reaches_a_hashing_sink_with_its_eof(servers, proxy, pump):
    sink = servers.sink()
    proxied, _ = start(proxy, servers, sink, pump)
    data = os.urandom(20 * MiB)
    client = proxied.connect()
    send_then_half_close(client, data)

    assert recv_to_eof(client) == b""  # the sink answers nothing and closes after the EOF
    conn = sink.conns[0]
    assert conn.eof.wait(5)
    assert (conn.received, conn.sha256) == (len(data), sha256(data))


@pytest.mark.parametrize("pump", PUMPS)
def test_200_concurrent_connections_each_get_exactly_their_own_bytes(servers, proxy, pump):
    echo = servers.echo()
    proxied, _ = start(proxy, servers, echo, pump)

    def exchange(number: int) -> bool:
        data = os.urandom(48 * 1024) + number.to_bytes(4, "big")
        client = proxied.connect()
        try:
            sender = gevent.spawn(send_then_half_close, client, data)
            answer = recv_to_eof(client)
            sender.get()
        finally:
            client.close()
        return answer == data

    exchanges = [gevent.spawn(exchange, number) for number in range(200)]
    gevent.joinall(exchanges, raise_error=True)

    assert [g.value for g in exchanges] == [True] * 200
    assert len(echo.conns) == 200
    wait_until(lambda: proxied.stats.active == 0, what="all sessions ended")
    assert proxied.stats.total == 200


@pytest.mark.parametrize("pump", PUMPS)
def test_client_half_close_reaches_production_which_still_answers(servers, proxy, pump):
    # production reads to EOF, waits, then answers: the proxy must keep the client's
    # read side open after passing the client's EOF on.
    production = servers.sink(reply_at_eof=b"answer after your EOF", delay=0.2)
    proxied, _ = start(proxy, servers, production, pump)
    client = proxied.connect()
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)

    conn = wait_until(lambda: production.conns and production.conns[0])
    assert conn.eof.wait(5), "the client's EOF did not reach production"
    assert recv_to_eof(client) == b"answer after your EOF"
    assert conn.sha256 == sha256(b"question")


@pytest.mark.parametrize("pump", PUMPS)
def test_production_half_close_reaches_client_which_still_sends(servers, proxy, caplog, pump):
    production = servers.reply_then_half_close(b"greeting, then my EOF")
    proxied, _ = start(proxy, servers, production, pump)
    client = proxied.connect()

    assert recv_exactly(client, 21) == b"greeting, then my EOF"
    assert client.recv(1) == b"", "production's EOF did not reach the client"
    data = os.urandom(2 * MiB)
    send_then_half_close(client, data)  # after production's EOF, the client still talks

    conn = production.conns[0]
    assert conn.eof.wait(5)
    assert (conn.received, conn.sha256) == (len(data), sha256(data))
    line, = wait_for_lines(caplog)
    assert (line["up"], line["down"], line["close"]) == (len(data), 21, "eof")


def _queued(sock_or_fd, request: int) -> int:
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


def _unread(sock_or_fd) -> int:
    return _queued(sock_or_fd, termios.FIONREAD)   # SIOCINQ


def _unsent(sock_or_fd) -> int:
    return _queued(sock_or_fd, termios.TIOCOUTQ)   # SIOCOUTQ


def test_a_client_that_does_not_read_stops_production_at_the_kernel_buffers(servers, proxy):
    """Backpressure: with a client not reading, production gets blocked in send(), and
    every byte it managed to send is in a kernel buffer, except at most one pipe's worth
    inside the proxy. Measured, not timed: each socket's queue is asked for its length."""
    block = os.urandom(MiB)
    production = servers.firehose(block)
    proxied = proxy(production)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.settimeout(10)
    client.connect(proxied.sockaddr)
    conn = wait_until(lambda: production.conns and production.conns[0])

    # Wait until production is stuck: nothing more goes out for half a second.
    last = [-1]

    def stuck() -> bool:
        sent, last[0] = last[0], conn.sent
        return sent == conn.sent
    wait_until(stuck, timeout=15, interval=0.5, what="production blocked in send()")

    session, = proxied.listener.sessions
    in_kernel = (_unsent(conn.sock) + _unread(session.production.channel.fd)
                 + _unsent(session.client.fd) + _unread(client))
    assert 0 <= conn.sent - in_kernel <= CHUNK + 64 * 1024, (conn.sent, in_kernel)
    assert conn.sent < 64 * MiB

    # Once the client reads, the stream flows on, byte-exact.
    expected = block * 9
    assert recv_exactly(client, len(expected)) == expected
    client.close()


def test_unix_socket_listener_to_unix_socket_backend(servers, proxy, caplog):
    echo = servers.echo(family="unix")
    proxied = proxy(echo, listen="unix")
    data = os.urandom(4 * MiB)
    client = proxied.connect()
    sender = gevent.spawn(send_then_half_close, client, data)
    assert hash_to_eof(client) == (sha256(data), len(data))
    sender.get()

    line, = wait_for_lines(caplog)
    assert (line["client"], line["production"]) == ("unix", echo.address)
    assert (line["up"], line["down"]) == (len(data), len(data))


def test_ipv6_listener_to_ipv6_backend(servers, proxy, caplog):
    echo = servers.echo(family="tcp6")
    proxied = proxy(echo, listen="tcp6")
    data = os.urandom(4 * MiB)
    client = proxied.connect()
    sender = gevent.spawn(send_then_half_close, client, data)
    assert hash_to_eof(client) == (sha256(data), len(data))
    sender.get()

    line, = wait_for_lines(caplog)
    assert line["client"].startswith("[::1]:")
    assert line["production"] == echo.address


# --- Relay itself, on socket pairs: both ends readable in one turn of the loop ----------

def _relayed_pair():
    """A Relay between two socket pairs: (client app end, production app end, Relay,
    its outcome). The proxy ends are plain sockets in Channels, as a listener makes."""
    client_app, client_proxy = _socket.socketpair()
    production_proxy, production_app = _socket.socketpair()
    client, production = Channel(client_proxy), Channel(production_proxy)
    relay = Relay(Direction(client, production, Counter()),
                  Direction(production, client, Counter()))
    outcome = AsyncResult()

    def done(failure):
        assert not outcome.ready(), "on_done called twice"
        client.close()
        production.close()
        outcome.set(failure)
    relay.start(done)
    # The app ends as the test's own (cooperative) sockets.
    return (socket.socket(fileno=client_app.detach()),
            socket.socket(fileno=production_app.detach()), outcome)


@pytest.mark.parametrize("first", ["client", "production"])
def test_both_ends_closing_in_one_turn_deliver_both_answers_and_eofs(first):
    # As with HTTP's Connection: close: the request, the answer and both EOFs are
    # all there when the loop next looks; in either order of readiness.
    client, production, outcome = _relayed_pair()
    ends = {"client": (client, b"request"), "production": (production, b"answer")}
    order = [first, "production" if first == "client" else "client"]
    for name in order:  # no yield in between: one turn sees both
        sock, data = ends[name]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    assert recv_to_eof(production) == b"request"
    assert recv_to_eof(client) == b"answer"
    assert outcome.get(timeout=5) is None


@pytest.mark.parametrize("first", ["client", "production"])
def test_one_end_closing_while_the_other_sends_in_the_same_turn(first):
    # The client's EOF and production's bytes arrive together: production still gets
    # the EOF (passed on after the read of its bytes), the client its bytes, and the
    # relay goes on until production ends too.
    client, production, outcome = _relayed_pair()
    steps = {"client": lambda: client.shutdown(socket.SHUT_WR),
             "production": lambda: production.sendall(b"not done yet")}
    steps[first]()
    steps["production" if first == "client" else "client"]()

    assert recv_to_eof(production) == b"", "the client's EOF did not reach production"
    assert recv_exactly(client, 12) == b"not done yet"
    assert not outcome.ready()
    send_then_half_close(production, b"now done")
    assert recv_to_eof(client) == b"now done"
    assert outcome.get(timeout=5) is None


# --- Connecting: how a non-blocking connect's outcome is learnt -------------------------

def _connecting(target: str):
    """Connecting(target) and its outcome, (channel, error), once it is known."""
    outcome = AsyncResult()
    Connecting(address(target), 5, lambda *answer: outcome.set(answer))
    return outcome


def test_a_connect_the_server_answers_with_bytes_before_the_loop_looks_is_connected():
    # The socket is then readable as well as writable when the loop first sees it, as a
    # failed connect is: the connect's outcome is asked of the kernel, and it worked.
    # The watcher that saw the connect reads from then on.
    listening = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    outcome = _connecting(f"127.0.0.1:{listening.getsockname()[1]}")
    fd, _ = listening._accept()  # no yield to the hub from here...
    server = socket.socket(fileno=fd)
    server.sendall(b"greeting")  # ...to here
    channel, error = outcome.get(timeout=5)
    assert error is None
    read = AsyncResult()
    channel.start_reading(lambda: read.set(channel.sock.recv(100)))
    assert read.get(timeout=5) == b"greeting"
    channel.close()
    server.close()
    listening.close()


@pytest.mark.parametrize("where", ["127.0.0.1", "[::1]"])
def test_a_refused_connect_is_refused(where):
    probe = _socket.socket(socket.AF_INET6 if ":" in where else socket.AF_INET)
    probe.bind((where.strip("[]"), 0))
    port = probe.getsockname()[1]
    probe.close()  # bound, never listened: the port refuses
    channel, error = _connecting(f"{where}:{port}").get(timeout=5)
    assert channel is None
    assert error.errno == errno.ECONNREFUSED
