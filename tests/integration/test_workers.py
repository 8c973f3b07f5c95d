"""workers = N: SO_REUSEPORT workers under an arbiter; reload, restart, stats, stop."""
from __future__ import annotations

import os
import signal

import gevent
import requests
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    children,
    exchange,
    free_port,
    route_section,
    wait_until,
)


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
