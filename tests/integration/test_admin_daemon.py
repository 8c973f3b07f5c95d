"""The admin endpoint of a running daemon: it answers while the daemon drains (/healthz
says "draining"), and /metrics has every per-backend counter /stats has."""
from __future__ import annotations

import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from service import (
    GLOBAL,
    TaggedEcho,
    exchange,
    free_port,
    live_connection,
    route_section,
    wait_until,
)

from gproxyd.exitcodes import EX_OK

DRAIN = 2.0  # drain-timeout, seconds


@pytest.fixture
def backend():
    server = TaggedEcho(b"a")
    yield server
    server.stop()


def get(admin: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{admin}{path}", timeout=5)


def samples(admin: int) -> dict[tuple, float]:
    """/metrics as {(sample name, (label, value), ...): value}."""
    found = {}
    for family in text_string_to_metric_families(get(admin, "/metrics").text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_the_admin_endpoint_answers_while_the_daemon_drains(tmp_path, backend, daemons,
                                                           workers):
    port, admin = free_port(), free_port()
    head = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}").replace(
        "drain-timeout = 10s", f"drain-timeout = {DRAIN:g}s")
    if workers > 1:
        head += f"workers = {workers}\n\n"
    daemon = daemons(tmp_path, head + route_section("web", port, backend.address))
    daemon.start()
    assert (get(admin, "/healthz").status_code, get(admin, "/healthz").text) == (200, "ok\n")
    live = live_connection(port)
    wait_until(lambda: get(admin, "/stats").json()["routes"]["web"]["connections"]
               ["active"] == 1, what="the live connection counted")

    stopped = time.monotonic()
    daemon.signal(signal.SIGTERM)
    daemon.wait_log("stopping;")
    healthz = get(admin, "/healthz")
    assert (healthz.status_code, healthz.text) == (503, "draining\n")
    stats = get(admin, "/stats")
    assert stats.status_code == 200
    assert stats.json()["routes"]["web"]["connections"]["active"] == 1
    assert samples(admin)[("gproxyd_connections_active", ("route", "web"))] == 1
    assert time.monotonic() - stopped < DRAIN  # all of it while the drain went on
    live.sendall(b"2")
    assert live.recv(10) == b"a:2"

    live.close()
    assert daemon.wait() == EX_OK
    assert "drain-timeout passed" not in daemon.log()
    with pytest.raises(requests.ConnectionError):
        get(admin, "/healthz")


def test_metrics_have_the_resets_and_mirrored_counters_of_stats(servers, daemons, tmp_path):
    """gproxyd_resets_total (every backend) and gproxyd_shadow_mirrored_total (shadows)
    say what /stats says: a backend that resets once it has read a byte."""
    production, resetting = TaggedEcho(b"a"), servers.closer(reset=True, after=1)
    try:
        port, broken_port, admin = free_port(), free_port(), free_port()
        daemon = daemons(tmp_path, GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}")
                         + route_section("web", port, production.address,
                                         shadow=resetting.address)
                         + route_section("broken", broken_port, resetting.address))
        daemon.start()
        for number in range(3):
            assert exchange(port, b"%d" % number) == b"a:%d" % number
        with pytest.raises(ConnectionResetError):  # production's reset, passed on
            exchange(broken_port, b"x")

        def settled():  # every shadow connection has ended, and /metrics caught up
            routes = get(admin, "/stats").json()["routes"]
            shadow = routes["web"]["shadows"][resetting.address]
            metrics = samples(admin)
            where = (("backend", resetting.address), ("route", "web"))
            same = (metrics[("gproxyd_shadow_mirrored_total", *where)] == shadow["mirrored"]
                    and metrics[("gproxyd_resets_total", *where)] == shadow["resets"])
            return sum(shadow["outcomes"].values()) == 3 and same and (routes, metrics)
        routes, metrics = wait_until(settled, what="the shadow connections' ends counted, "
                                     "and /metrics saying what /stats says")
        shadow = routes["web"]["shadows"][resetting.address]
        assert shadow["mirrored"] == 3 and shadow["resets"] >= 1
        assert routes["broken"]["production"]["resets"] == 1
        assert metrics[("gproxyd_resets_total", ("backend", "production"),
                        ("route", "broken"))] == 1
        assert metrics[("gproxyd_resets_total", ("backend", "production"),
                        ("route", "web"))] == 0
        # Production has no mirrored counter: it gets every connection.
        assert not any(key[0] == "gproxyd_shadow_mirrored_total" and
                       ("backend", "production") in key for key in metrics)
    finally:
        production.stop()
