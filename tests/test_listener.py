"""listener.py: binding, connection limits, idle reaping, route updates, close and drain."""
import dataclasses
import grp
import os
import pwd
import socket
import stat
import time

import gevent
import pytest
from backends import recv_exactly, recv_to_eof, sees_eof, unused_port, wait_for_lines, wait_until

from gproxyd.listener import ListenError, bind
from gproxyd.settings import address


def ping(client: socket.socket, data: bytes = b"ping") -> bytes:
    client.sendall(data)
    return recv_exactly(client, len(data))


def test_over_max_connections_a_client_is_closed_at_once_until_one_leaves(
        servers, proxy, caplog):
    echo = servers.echo()
    proxied = proxy(echo, max_connections=3)
    clients = [proxied.connect() for _ in range(3)]
    assert [ping(client) for client in clients] == [b"ping"] * 3

    extra = proxied.connect()  # the kernel accepts it; gproxyd closes it
    assert sees_eof(extra, timeout=2)
    assert (proxied.stats.rejected, proxied.stats.active) == (1, 3)
    assert len(echo.conns) == 3, "a rejected client must not reach production"
    assert "max-connections (3) reached" in caplog.text
    assert ping(clients[1]) == b"ping", "a rejection must not disturb the others"

    clients[0].close()
    wait_until(lambda: proxied.stats.active == 2, what="the closed client's session ended")
    newcomer = proxied.connect()
    assert ping(newcomer, b"welcome") == b"welcome"
    assert (proxied.stats.rejected, proxied.stats.total) == (1, 4)


def test_an_idle_connection_is_closed_after_idle_timeout(servers, proxy, caplog):
    proxied = proxy(servers.echo(), idle_timeout="300ms")
    client = proxied.connect()
    assert ping(client) == b"ping"
    last_byte = time.monotonic()

    assert sees_eof(client, timeout=5), "an idle connection stayed open"
    assert time.monotonic() - last_byte >= 0.29, "closed before idle-timeout passed"
    line, = wait_for_lines(caplog)
    assert line["close"] == "idle-timeout"


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_connection_moving_a_byte_every_100ms_outlives_idle_timeout(
        servers, proxy, caplog, direction):
    """Traffic in either direction alone keeps a connection alive; an idle neighbour is
    closed meanwhile, so the reaper is known to be running."""
    if direction == "up":
        production = servers.sink()             # takes bytes, answers nothing
    else:
        production = servers.sink(reply_each=b".")  # one byte back per byte
    proxied = proxy(production, idle_timeout="300ms")
    idle = proxied.connect()
    busy = proxied.connect()
    started = time.monotonic()
    idle_closed = gevent.spawn(sees_eof, idle, 5)
    while time.monotonic() - started < 1.2:     # four idle-timeouts
        busy.sendall(b"x")
        if direction == "down":
            assert busy.recv(1) == b"."
        gevent.sleep(0.1)

    assert idle_closed.get(), "the idle neighbour was not closed"
    assert not sees_eof(busy, timeout=0.05), "the busy connection was closed"
    busy.shutdown(socket.SHUT_WR)
    assert recv_to_eof(busy) == b""
    lines = wait_for_lines(caplog, 2)
    assert sorted(line["close"] for line in lines) == ["eof", "idle-timeout"]


def test_update_changes_the_route_for_new_connections_only(servers, proxy):
    first, second = servers.echo(), servers.sink(reply_at_eof=b"from the second")
    proxied = proxy(first)
    old = proxied.connect()
    assert ping(old) == b"ping"

    proxied.listener.update(dataclasses.replace(proxied.route,
                                                production=address(second.address)))
    new = proxied.connect()
    new.sendall(b"hello")
    new.shutdown(socket.SHUT_WR)
    assert recv_to_eof(new) == b"from the second"
    assert ping(old, b"still the first") == b"still the first"
    assert len(first.conns) == 1


def test_close_stops_accepting_and_drain_aborts_what_is_left(servers, proxy, caplog):
    proxied = proxy(servers.echo())
    client = proxied.connect()
    assert ping(client) == b"ping"

    proxied.listener.close()
    with pytest.raises(ConnectionRefusedError):
        proxied.connect()
    assert ping(client) == b"ping", "close() must leave live connections alone"
    assert proxied.listener.drain(0.2) == 1
    assert sees_eof(client)
    line, = wait_for_lines(caplog)
    assert line["close"] == "stopped: drain-timeout passed"


def test_drain_returns_zero_when_every_session_finished_in_time(servers, proxy):
    proxied = proxy(servers.echo())
    client = proxied.connect()
    assert ping(client) == b"ping"
    proxied.listener.close()
    client.shutdown(socket.SHUT_WR)
    ender = gevent.spawn(recv_to_eof, client)
    assert proxied.listener.drain(5) == 0
    assert ender.get(timeout=1) == b""


def test_unix_listener_replaces_a_stale_socket_file_and_removes_its_own(
        servers, proxy, sockdir):
    path = os.path.join(sockdir, "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)      # a socket file nobody listens on, as after a crash
    leftover.close()

    proxied = proxy(servers.echo(), listen=f"unix:{path}")
    assert ping(proxied.connect()) == b"ping"
    proxied.stop()
    assert not os.path.exists(path)


def test_bind_names_the_address_the_cause_and_a_hint():
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        cases = [
            (f"127.0.0.1:{port}", f"cannot listen on 127.0.0.1:{port}: Address already in use "
                                  "(another process listens there)"),
            ("192.0.2.1:8080", "cannot listen on 192.0.2.1:8080: Cannot assign requested "
                               "address (no interface of this host has that address)"),
        ]
        for text, message in cases:
            with pytest.raises(ListenError) as raised:
                bind(address(text))
            assert str(raised.value) == message
    finally:
        taken.close()


def test_bind_refuses_a_unix_socket_someone_listens_on(sockdir):
    path = os.path.join(sockdir, "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ListenError) as raised:
            bind(address(f"unix:{path}"))
        assert str(raised.value) == (f"cannot listen on unix:{path}: Address already in use "
                                     "(another process listens there)")
        assert os.path.exists(path), "a live socket's file must not be removed"
    finally:
        live.close()


def test_a_listener_port_is_free_again_after_close(servers, proxy):
    port = unused_port()
    proxied = proxy(servers.echo(), listen=f"127.0.0.1:{port}")
    assert ping(proxied.connect()) == b"ping"
    proxied.stop()
    again = proxy(servers.echo(), listen=f"127.0.0.1:{port}")
    assert ping(again.connect()) == b"ping"


def test_a_reload_changes_what_the_routes_numbers_are_read_with(proxy, servers):
    """Baseline, verdict-threshold and compare-samples live with the route's stats
    (they outlive reloads): a reload must change them too."""
    from gproxyd.config import make_route
    proxied = proxy(servers.echo(), protocol="http", shadow=["127.0.0.1:9"],
                    verdict_threshold="2ms", compare_samples="5")
    stats = proxied.stats
    assert (stats.baseline, stats.verdict_threshold, stats.samples.maxlen) == ("", 0.002, 5)
    changed = make_route("test", listen=proxied.route.listen.text,
                         production=proxied.route.production.text, protocol="http",
                         shadow=["127.0.0.1:9"], baseline="127.0.0.1:10",
                         verdict_threshold="", compare_samples="50")
    proxied.listener.update(changed)
    assert (stats.baseline, stats.verdict_threshold, stats.samples.maxlen) == (
        "127.0.0.1:10", None, 50)


def test_a_unix_listen_socket_gets_listen_mode_and_listen_owner(servers, proxy, sockdir):
    # CI runs as root, which chown needs; the nobody user and nogroup group are Debian's.
    assert os.geteuid() == 0, "chown to another user needs root (CI runs the tests as root)"
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    path = os.path.join(sockdir, "moded.sock")
    proxied = proxy(servers.echo(), listen=f"unix:{path}", listen_mode="0660",
                    listen_owner="nobody:nogroup")
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nogroup.gr_gid)
    assert ping(proxied.connect()) == b"ping"
    # Without them, the umask decides and the file is ours.
    plain = os.path.join(sockdir, "plain.sock")
    old = os.umask(0o077)
    try:
        proxy(servers.echo(), listen=f"unix:{plain}")
    finally:
        os.umask(old)
    info = os.stat(plain)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()


def test_bind_names_a_listen_owner_that_does_not_exist(sockdir):
    path = os.path.join(sockdir, "owner.sock")
    with pytest.raises(ListenError) as raised:
        bind(address(f"unix:{path}"), owner="no-such-user-gproxyd")
    assert str(raised.value) == (f"cannot listen on unix:{path}: listen-owner: no such user "
                                 "'no-such-user-gproxyd'")
