"""workers = N: SO_REUSEPORT workers under an arbiter; reload, restart, stats, stop;
what a reload promises live connections (the same with one process and with workers);
the processes' titles."""
from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import gevent
import pytest
import requests
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    children,
    exchange,
    free_port,
    live_connection,
    route_section,
    running,
    wait_until,
)

from gproxyd.exitcodes import EX_OK

DRAIN = 1.0  # drain-timeout in these tests, seconds


def title(pid: int) -> str:
    """What ps shows for `pid`: its /proc/PID/cmdline (a process title, once set)."""
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().split(b"\0")[0].decode()


def closed(sock: socket.socket) -> bool:
    """Whether the proxy closed `sock` (a FIN or a reset), waiting up to 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def config(port: int, production: str, workers: int, *more_routes: str) -> str:
    head = GLOBAL.replace("10s", f"{DRAIN:g}s")
    if workers > 1:
        head = head.replace("admin = off", f"admin = off\nworkers = {workers}")
    return head + route_section("web", port, production) + "".join(more_routes)


@pytest.fixture
def backend():
    server = TaggedEcho(b"a")
    yield server
    server.stop()


def test_workers_share_the_load_reload_without_refusing_and_restart(tmp_path):
    a, b = TaggedEcho(b"a"), TaggedEcho(b"b")
    port, admin = free_port(), free_port()
    head = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}\nworkers = 2")
    daemon = Daemon(tmp_path, head + route_section("web", port, a.address))
    try:
        daemon.start()
        workers = children(daemon.pid)
        assert len(workers) == 2
        for number in range(50):
            assert exchange(port, b"%d" % number) == b"a:%d" % number
        wait_until(lambda: requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()
                   ["routes"]["web"]["production"]["requests"] == 50, what="merged stats")

        failures = []

        def load():
            for _ in range(300):
                try:
                    answer = exchange(port, b"x")
                    if answer not in (b"a:x", b"b:x"):
                        failures.append(answer)
                except OSError as error:
                    failures.append(repr(error))
        loader = gevent.spawn(load)
        daemon.write_config(head + route_section("web", port, b.address))
        daemon.reload()
        loader.join(timeout=60)
        assert loader.dead and failures == []
        assert exchange(port, b"new") == b"b:new"
        wait_until(lambda: len(children(daemon.pid)) == 2, what="old workers gone")
        assert set(children(daemon.pid)).isdisjoint(workers)

        # Workers report twice a second and once more as they exit; a SIGKILLed worker
        # takes its last half second of counts with it, so let them report first.
        def total():
            return requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()[
                "routes"]["web"]["connections"]["total"]
        wait_until(lambda: total() >= 50 + 300 + 1, timeout=5, what="totals add up")

        # A worker that dies is replaced.
        victim = children(daemon.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children(daemon.pid)) == 2 and
                   victim not in children(daemon.pid), timeout=15, what="worker restarted")
        daemon.wait_log("exited with status -9; starting another")
        for _ in range(20):
            assert exchange(port, b"y") == b"b:y"
        wait_until(lambda: total() >= 50 + 300 + 1 + 20, timeout=5, what="all counted")


        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert children(daemon.pid) == []
    finally:
        daemon.stop()
        a.stop()
        b.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_leaves_long_lived_connections_alone(tmp_path, backend, daemons, workers):
    """Two reloads in a row, then well past drain-timeout: a connection accepted before
    them is still served, in one process as with workers. With workers the old ones stop
    accepting, show "(draining)", and exit when their last connection ends."""
    port = free_port()
    daemon = daemons(tmp_path, config(port, backend.address, workers))
    daemon.start()
    first = children(daemon.pid)
    live = live_connection(port)
    daemon.reload()
    daemon.reload()
    time.sleep(DRAIN + 1.0)  # the old workers' drain-timeout, had they been told to stop
    live.sendall(b"2")
    assert live.recv(10) == b"a:2"
    assert "drain-timeout passed" not in daemon.log()
    for number in range(10):
        assert exchange(port, b"%d" % number) == b"a:%d" % number
    if workers > 1:
        # Of the first generation, the worker with the connection serves on; the other
        # one, and the second reload's old generation, had none and are gone.
        wait_until(lambda: len(children(daemon.pid)) == 3, what="idle old workers gone")
        [kept] = set(first) & set(children(daemon.pid))
        assert title(kept) == f"gproxyd: worker {first.index(kept)} [web] (draining)"
    live.close()
    if workers > 1:
        wait_until(lambda: not set(first) & set(children(daemon.pid)),
                   what="the first generation gone once its connection ended")
        daemon.wait_log("retired by a reload, exited: its last connection ended")
        assert len(children(daemon.pid)) == 2
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == EX_OK


def test_a_stop_drains_retired_workers_within_drain_timeout(tmp_path, backend, daemons):
    """A retired worker keeps its connections only until the daemon stops: then it
    drains like every other (drain-timeout), and the daemon exits."""
    port = free_port()
    daemon = daemons(tmp_path, config(port, backend.address, workers=2))
    daemon.start()
    first = children(daemon.pid)
    live = live_connection(port)
    daemon.reload()
    wait_until(lambda: len(children(daemon.pid)) == 3, what="the idle old worker gone")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=DRAIN + 10) == EX_OK
    assert time.monotonic() - started >= DRAIN - 0.2
    assert closed(live)  # by the retired worker, at drain-timeout
    assert "drain-timeout passed: closed 1 connection(s)" in daemon.log()
    assert not any(running(pid) for pid in first)


def test_a_hung_retired_worker_is_killed_not_restarted(tmp_path, backend, daemons):
    port = free_port()
    daemon = daemons(tmp_path, config(port, backend.address, workers=2))
    daemon.start()
    first = children(daemon.pid)
    live = live_connection(port)
    daemon.reload()
    wait_until(lambda: len(children(daemon.pid)) == 3, what="the idle old worker gone")
    [retired] = set(first) & set(children(daemon.pid))
    os.kill(retired, signal.SIGSTOP)
    daemon.wait_log(f"(pid {retired}) sent no report for", timeout=10)
    wait_until(lambda: retired not in children(daemon.pid), what="the hung worker killed")
    assert closed(live)
    gevent.sleep(1.0)  # a restart would come 0.25 s after the exit
    assert len(children(daemon.pid)) == 2
    assert "starting another" not in daemon.log()


def test_a_reload_with_workers_keeps_a_unix_listen_address(backend, daemons):
    directory = Path(tempfile.mkdtemp(prefix="gpx", dir="/tmp"))  # sun_path is short
    path = directory / "web.sock"
    text = config(0, backend.address, workers=2).replace("listen = 127.0.0.1:0",
                                                        f"listen = unix:{path}")
    daemon = daemons(directory, text)
    daemon.start()
    daemon.reload()
    wait_until(lambda: len(children(daemon.pid)) == 2, what="the old workers gone")
    for number in range(10):
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(str(path))
            client.sendall(b"%d" % number)
            assert client.recv(10) == b"a:%d" % number


def test_workers_and_the_master_have_process_titles(tmp_path, backend, daemons):
    port, other = free_port(), free_port()
    daemon = daemons(tmp_path, config(port, backend.address, 2,
                                      route_section("api", other, backend.address)))
    daemon.start()
    assert title(daemon.pid) == f"gproxyd: master [2 workers] -c {daemon.config_path}"
    assert [title(pid) for pid in children(daemon.pid)] == [
        "gproxyd: worker 0 [web,api]", "gproxyd: worker 1 [web,api]"]
    live = live_connection(port)
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: title(daemon.pid).endswith(" (draining)"), what="master draining")
    # The worker without a connection exits at once; the other drains `live`.
    [draining] = wait_until(lambda: len(children(daemon.pid)) == 1 and children(daemon.pid),
                            what="the idle worker gone")
    assert title(draining) in [f"gproxyd: worker {slot} [web,api] (draining)"
                               for slot in range(2)]
    live.close()
    assert daemon.wait() == EX_OK
