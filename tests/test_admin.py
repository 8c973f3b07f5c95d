"""The admin endpoint under abuse: a flood of idle connections, slow and idle clients, a
scrape loop. The endpoint holds at most its cap, times clients out, renders /stats and
/metrics at most once per max-age, and the proxy beside it relays every byte."""
from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys

import gevent
import pytest
import requests
from backends import recv_exactly, sees_eof, sha256, wait_until
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

from gproxyd.admin import AdminServer, read_histogram
from gproxyd.listener import bind
from gproxyd.settings import address
from gproxyd.stats import Histogram, RecordStats, RouteStats

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n"


@pytest.fixture
def admin_server():
    """admin_server(source, **options) -> a started AdminServer on a port of its own."""
    started: list[AdminServer] = []

    def start(source, **options) -> AdminServer:
        listening = bind(address("127.0.0.1:0", lowest_port=0))
        admin = AdminServer(address(f"127.0.0.1:{listening.getsockname()[1]}"), source,
                            listening, **options)
        admin.start()
        started.append(admin)
        return admin

    yield start
    for admin in started:
        admin.stop()


def base(admin: AdminServer) -> str:
    return f"http://{admin.address}"


def connect(admin: AdminServer) -> socket.socket:
    return socket.create_connection(admin.address.sockaddr, timeout=5)


def still_open(sock: socket.socket) -> bool:
    """No EOF or reset so far (a look, not a wait)."""
    before = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(before)


def answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return data + recv_exactly(sock, length - len(body))


def relays_exactly(proxied, size: int = 256 * 1024) -> bool:
    """A connection through the echo route gets back exactly what it sent."""
    data = random.Random(size).randbytes(size)
    client = proxied.connect()
    try:
        sender = gevent.spawn(client.sendall, data)
        echoed = recv_exactly(client, size)
        sender.get()
        return sha256(echoed) == sha256(data)
    finally:
        client.close()


# --- the numbers are those of the histogram ----------------------------------------------

@pytest.mark.parametrize("values", [
    [],
    [0.0],
    [0.0004],
    [20.0, 30.0],  # beyond the last bound: only +Inf
    [0.001] * 999 + [7.5],
    [random.Random(seed).lognormvariate(-6, 2) for seed in range(5000)],
    [random.Random(seed).uniform(0, 0.02) for seed in range(3000)],
])
def test_one_pass_reads_what_count_below_and_percentile_say(values):
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    below, quantiles = read_histogram(histogram)
    bounds = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0)
    assert below == [histogram.count_below(bound) for bound in bounds]
    assert quantiles == [histogram.percentile(share) for share in (0.5, 0.9, 0.99, 0.999)]


# --- a connection flood ------------------------------------------------------------------

FLOOD = """
import socket, sys
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
print("connected", flush=True)
sys.stdin.read()  # hold them until the test closes our stdin
"""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_idle_flood_takes_no_descriptors_from_the_proxy(proxy, servers, admin_server):
    """200 idle connections from another process, with this process's descriptor limit
    set so that holding them all would leave none to accept or connect with: the admin
    holds 64 (the oldest are closed), the route relays, /healthz answers."""
    proxied = proxy(servers.echo())
    admin = admin_server(lambda: {"test": proxied.stats})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the 64 held, those the test opens and a margin, not for 200.
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_descriptors() + 64 + 40, hard))
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(admin.address.port), "200"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                   (soft, hard)))
    try:
        assert flood.stdout.readline() == b"connected\n"
        wait_until(lambda: admin.evicted == 200 - 64, what="the oldest 136 closed")
        assert admin.connections == 64 and admin.rejected == 0
        assert relays_exactly(proxied)
        for _ in range(3):
            answer = requests.get(base(admin) + "/healthz", timeout=5)
            assert (answer.status_code, answer.text) == (200, "ok\n")
        assert admin.connections <= 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        flood.stdin.close()
        flood.wait(timeout=10)


def test_over_the_cap_the_oldest_waiting_connection_is_closed(admin_server):
    admin = admin_server(dict, max_connections=4)
    clients = [connect(admin) for _ in range(10)]
    wait_until(lambda: admin.evicted == 6, what="six closed")
    assert [sees_eof(client) for client in clients[:6]] == [True] * 6
    assert [still_open(client) for client in clients[6:]] == [True] * 4
    clients[9].sendall(HEALTHZ)  # the newest is still served
    assert answer(clients[9]).endswith(b"ok\n")
    for client in clients:
        client.close()


def test_when_every_connection_is_being_answered_a_new_one_is_closed_at_once(admin_server):
    release = Event()

    def slow_source():
        release.wait()
        return {}

    admin = admin_server(slow_source, max_connections=2, max_age=0)
    asking = [connect(admin) for _ in range(2)]
    for client in asking:
        client.sendall(b"GET /stats HTTP/1.1\r\nHost: admin\r\n\r\n")
    late = connect(admin)
    assert sees_eof(late)
    assert (admin.rejected, admin.evicted) == (1, 0)
    release.set()
    for client in asking:
        assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
        client.close()
    late.close()


# --- slow and idle clients ---------------------------------------------------------------

def test_a_client_that_sends_nothing_is_closed_after_request_timeout(admin_server):
    admin = admin_server(dict, request_timeout=0.2)
    client = connect(admin)
    assert sees_eof(client, timeout=5)
    wait_until(lambda: admin.connections == 0, what="the connection gone")


def test_a_request_sent_a_byte_at_a_time_is_cut_at_request_timeout(admin_server):
    """Progress does not extend the deadline: the request must be complete in time."""
    admin = admin_server(dict, request_timeout=0.3)
    client = connect(admin)
    client.sendall(b"GET /healthz HTTP/1.1\r\n")

    def cut() -> bool:
        try:
            client.sendall(b"X-A: b\r\n")  # a header line at a time, never the blank line
        except OSError:
            return True  # reset: the server closed
        return admin.connections == 0

    wait_until(cut, timeout=10, interval=0.05, what="the slow request cut")
    assert sees_eof(client)  # and no answer was sent


def test_a_kept_alive_connection_is_closed_after_idle_timeout(admin_server):
    admin = admin_server(dict, idle_timeout=0.2)
    client = connect(admin)
    for _ in range(2):  # kept alive between the two
        client.sendall(HEALTHZ)
        assert answer(client).endswith(b"\r\n\r\nok\n")
    assert sees_eof(client, timeout=5)
    wait_until(lambda: admin.connections == 0, what="the connection gone")


def test_stop_closes_idle_connections_at_once(admin_server):
    admin = admin_server(dict)
    client = connect(admin)
    client.sendall(HEALTHZ)
    assert answer(client).endswith(b"ok\n")
    admin.stop()
    assert admin.connections == 0
    assert sees_eof(client, timeout=5)


# --- a scrape loop -----------------------------------------------------------------------

def scrape_loop(admin: AdminServer, path: str, bodies: list, stop: Event) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            answer = session.get(base(admin) + path, timeout=5)
            assert answer.status_code == 200
            bodies.append(answer.text)


def test_a_scrape_loop_is_served_from_one_render_and_relaying_goes_on(proxy, servers,
                                                                       admin_server):
    """Within max-age every scrape gets the same text, rendered once, however the numbers
    moved meanwhile; the route relays exactly what it relays without the loop."""
    proxied = proxy(servers.echo())
    assert relays_exactly(proxied)
    admin = admin_server(lambda: {"test": proxied.stats}, max_age=3600)
    stop, metrics, stats = Event(), [], []
    loops = [gevent.spawn(scrape_loop, admin, "/metrics", metrics, stop),
             gevent.spawn(scrape_loop, admin, "/stats", stats, stop)]
    wait_until(lambda: len(metrics) >= 3 and len(stats) >= 3, what="the loops scraping")
    for _ in range(5):
        assert relays_exactly(proxied)
    wait_until(lambda: proxied.stats.total == 6 and proxied.stats.active == 0)
    count = len(metrics)
    wait_until(lambda: len(metrics) > count + 3, what="more scrapes after the relaying")
    stop.set()
    gevent.joinall(loops, raise_error=True, timeout=10)
    assert (admin.metrics.renders, admin.stats.renders) == (1, 1)
    assert len(set(metrics)) == 1 and len(set(stats)) == 1  # the same `time` in every one
    samples = {(sample.name, tuple(sample.labels.values())): sample.value
               for family in text_string_to_metric_families(metrics[-1])
               for sample in family.samples}
    assert samples[("gproxyd_connections_total", ("test",))] == 1  # as it was first read


def test_past_max_age_a_scrape_renders_the_numbers_anew(proxy, servers, admin_server):
    proxied = proxy(servers.echo())
    admin = admin_server(lambda: {"test": proxied.stats}, max_age=0)
    first = requests.get(base(admin) + "/stats", timeout=5).json()
    assert first["routes"]["test"]["connections"]["total"] == 0
    assert relays_exactly(proxied)
    wait_until(lambda: proxied.stats.active == 0)
    second = requests.get(base(admin) + "/stats", timeout=5).json()
    assert second["routes"]["test"]["connections"]["total"] == 1
    assert second["time"] >= first["time"] and admin.stats.renders == 2
    text = requests.get(base(admin) + "/metrics", timeout=5).text
    assert 'gproxyd_connections_total{route="test"} 1.0' in text.splitlines()


def test_many_routes_render_with_the_same_names_and_shapes(admin_server):
    routes = {}
    for number in range(13):
        stats = routes[f"r{number}"] = RouteStats()
        for latency in (0.0009, 0.002, 0.2):
            stats.production.record(latency)
            stats.shadow("127.0.0.1:8082").record(latency * 2)
    admin = admin_server(lambda: routes)
    document = requests.get(base(admin) + "/stats", timeout=5).json()
    assert set(document) == {"version", "time", "routes"}
    assert document["routes"]["r12"] == json.loads(json.dumps(routes["r12"].snapshot()))
    families = {family.name: family for family in
                text_string_to_metric_families(requests.get(base(admin) + "/metrics",
                                                            timeout=5).text)}
    assert {"gproxyd_requests", "gproxyd_request_duration_seconds",
            "gproxyd_request_latency_seconds", "gproxyd_connections_active"} <= set(families)
    buckets = {sample.labels["le"]: sample.value
               for sample in families["gproxyd_request_duration_seconds"].samples
               if sample.name.endswith("_bucket") and sample.labels["route"] == "r12"
               and sample.labels["backend"] == "production"}
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.25"], buckets["+Inf"]) == (
        1, 2, 3, 3)


def test_rendering_many_routes_lets_relays_through_meanwhile(proxy, servers, admin_server):
    """Echo round trips through a route go on while /metrics and /stats are rendered for
    13 routes: the rendering lets the loop poll between backends and families."""
    proxied = proxy(servers.echo())
    routes = {}
    for number in range(13):
        stats = routes[f"r{number}"] = RouteStats()
        for value in range(2000):
            stats.production.record(value / 1e5)
            stats.shadow("127.0.0.1:8082").record(value / 5e4)
    rendering = Event()

    def source():
        rendering.set()
        return routes

    admin = admin_server(source, max_age=0)
    client = proxied.connect()
    during = []

    def round_trips():
        while True:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            if rendering.is_set():
                during.append(1)

    trips = gevent.spawn(round_trips)
    try:
        for rendered in (admin.metrics, admin.stats):
            during.clear()
            rendered.get()
            rendering.clear()
            assert during, "no round trip while rendering"
    finally:
        trips.kill()
        client.close()


def test_a_recording_routes_numbers_are_metrics_and_others_have_none(admin_server):
    recording, plain = RouteStats(), RouteStats()
    recording.record = RecordStats(file="/var/lib/gproxyd/web.rec", recorded=7, dropped=2,
                                   skipped=1, bytes=900, errors=3)
    admin = admin_server(lambda: {"web": recording, "api": plain})
    families = {family.name: family for family in
                text_string_to_metric_families(requests.get(base(admin) + "/metrics",
                                                            timeout=5).text)}
    got = {name: {sample.labels["route"]: sample.value for sample in families[name].samples
                  if sample.name.endswith("_total")}
           for name in ("gproxyd_record_recorded", "gproxyd_record_dropped",
                        "gproxyd_record_skipped", "gproxyd_record_bytes",
                        "gproxyd_record_errors")}
    assert got == {"gproxyd_record_recorded": {"web": 7}, "gproxyd_record_dropped": {"web": 2},
                   "gproxyd_record_skipped": {"web": 1}, "gproxyd_record_bytes": {"web": 900},
                   "gproxyd_record_errors": {"web": 3}}
