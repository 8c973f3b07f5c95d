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
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from gproxyd import __version__
from gproxyd.admin import (
    _ARCHIVE,
    _BACKEND_COUNTERS,
    _GAUGES,
    _RECORD_METRICS,
    _ROUTE_METRICS,
    _SHADOW_DROPS,
    AdminServer,
    LoopBudget,
    ReloadStatus,
    _Slicer,
    metrics_text,
    mismatches_text,
    read_histogram,
    stats_text,
)
from gproxyd.listener import bind
from gproxyd.settings import address
from gproxyd.stats import (
    DROP_CAUSES,
    OUTCOMES,
    Histogram,
    RecordStats,
    RouteStats,
    ShadowMemoryStats,
)

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
    [0.0005, 0.001, 0.0025, 0.01, 10.0, 0.000999, 0.0010001],  # on and around the bounds
    [1e6, 3.5, 0.2],  # far beyond the last bound
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


# --- the renderers write what they wrote before ------------------------------------------

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)
QUANTILES = (0.5, 0.9, 0.99, 0.999)


class ReferenceCollector:
    """/metrics as prometheus_client's families and generate_latest() made it before the
    endpoint wrote the text itself: the oracle for metrics_text()."""

    def __init__(self, routes: dict, status: ReloadStatus | None,
                 memory: ShadowMemoryStats | None = None):
        self.routes, self.status, self.memory = routes, status, memory

    def collect(self):
        status = self.status
        if status is not None:
            yield GaugeMetricFamily(
                "gproxyd_config_generation",
                "Configuration generation: 1 at start, plus one per successful reload",
                value=status.generation)
            yield GaugeMetricFamily(
                "gproxyd_config_last_reload_success",
                "Whether the last reload attempt succeeded (1) or failed, the previous "
                "configuration still serving (0)", value=int(status.ok))
            yield GaugeMetricFamily(
                "gproxyd_config_last_reload_timestamp_seconds",
                "Unix time the configuration in use was loaded (start or successful reload)",
                value=status.time)
            yield CounterMetricFamily(
                "gproxyd_config_reload_failures",
                "Reloads that failed and kept the running configuration", value=status.failures)
        memory = self.memory
        if memory is not None:
            for name, value in (("limit", memory.limit), ("queued", memory.queued),
                                ("high_water", memory.high_water)):
                yield GaugeMetricFamily(f"gproxyd_shadow_memory_{name}_bytes",
                                        SHADOW_MEMORY_HELP[name], value=value)
            yield GaugeMetricFamily("gproxyd_shadow_send_buffer_bytes",
                                    SHADOW_MEMORY_HELP["send_buffers"],
                                    value=memory.send_buffers)
            for name in ("drops", "dropped_bytes"):
                family = CounterMetricFamily(f"gproxyd_shadow_memory_{name}",
                                             SHADOW_MEMORY_HELP[name], labels=["cause"])
                for cause in DROP_CAUSES:
                    family.add_metric([cause], getattr(memory, name).get(cause, 0))
                yield family
        routes = [(GaugeMetricFamily if attr in _GAUGES else CounterMetricFamily)(
            name, doc, labels=["route"]) for attr, name, doc in _ROUTE_METRICS]
        counters = [CounterMetricFamily(name, doc, labels=["route", "backend"])
                    for _, name, doc, _ in _BACKEND_COUNTERS]
        latency = HistogramMetricFamily("gproxyd_request_duration_seconds",
                                        "Request latency per backend",
                                        labels=["route", "backend"])
        quantiles = Metric("gproxyd_request_latency_seconds",
                           "Request latency quantiles per backend", "summary")
        drops = CounterMetricFamily("gproxyd_shadow_drops", _SHADOW_DROPS,
                                    labels=["route", "backend", "cause"])
        outcomes = CounterMetricFamily(
            "gproxyd_shadow_connections", "Shadow connections by how they ended",
            labels=["route", "backend", "outcome"])
        records = [CounterMetricFamily(name, doc, labels=["route"])
                   for _, name, doc in _RECORD_METRICS]
        for name, stats in self.routes.items():
            for family, (attr, _, _) in zip(routes, _ROUTE_METRICS, strict=True):
                if stats.archive or attr not in _ARCHIVE:
                    family.add_metric([name], getattr(stats, attr))
            if stats.record is not None:
                for family, (attr, _, _) in zip(records, _RECORD_METRICS, strict=True):
                    family.add_metric([name], getattr(stats.record, attr))
            for backend, numbers in [("production", stats.production),
                                     *stats.shadows.items()]:
                for family, (attr, _, _, shadow_only) in zip(counters, _BACKEND_COUNTERS,
                                                             strict=True):
                    if backend != "production" or not shadow_only:
                        family.add_metric([name, backend], getattr(numbers, attr))
                if backend != "production":
                    for cause in DROP_CAUSES:
                        drops.add_metric([name, backend, cause], numbers.drops.get(cause, 0))
                    for outcome in OUTCOMES:
                        outcomes.add_metric([name, backend, outcome],
                                            numbers.outcomes.get(outcome, 0))
                histogram = numbers.latency
                buckets = [(str(bound), histogram.count_below(bound)) for bound in BUCKETS]
                latency.add_metric([name, backend], buckets + [("+Inf", histogram.count)],
                                   histogram.total)
                where = {"route": name, "backend": backend}
                for share in QUANTILES:
                    quantiles.add_sample("gproxyd_request_latency_seconds",
                                         dict(where, quantile=str(share)),
                                         histogram.percentile(share))
                quantiles.add_sample("gproxyd_request_latency_seconds_count", where,
                                     histogram.count)
                quantiles.add_sample("gproxyd_request_latency_seconds_sum", where,
                                     histogram.total)
        yield from [*routes, *records, *counters, drops, outcomes, latency, quantiles]


SHADOW_MEMORY_HELP = {
    "limit": "shadow-memory: most bytes held for shadows at once (summed over workers)",
    "queued": "Bytes waiting to be written to shadows now",
    "high_water": "Most bytes waiting to be written to shadows at once since start",
    "send_buffers": "Kernel send buffers of the open shadow sockets (their sizes as set)",
    "drops": "Shadow connections whose waiting bytes were let go, by cause (all routes)",
    "dropped_bytes": "Bytes waiting for shadows that were let go unwritten, by cause",
}


def reference_metrics(routes: dict, status: ReloadStatus | None = None,
                      memory: ShadowMemoryStats | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReferenceCollector(routes, status, memory))
    return generate_latest(registry)


def some_shadow_memory() -> ShadowMemoryStats:
    return ShadowMemoryStats(limit=512 * 2 ** 20, queued=70000, high_water=3 * 2 ** 20,
                             send_buffers=4 * 2 ** 20,
                             drops={"over-budget": 2, "shadow-failed": 5},
                             dropped_bytes={"over-budget": 900000, "shadow-failed": 12})


def many_routes(count: int = 3, requests: int = 400) -> dict[str, RouteStats]:
    """Routes with a production and a shadow each, latencies spread over many buckets,
    shadow outcomes, paired latencies; odd values and names in some."""
    rng = random.Random(count)
    routes = {}
    for number in range(count):
        stats = routes[f"r{number}"] = RouteStats(total=requests, active=number)
        shadow = stats.shadow("127.0.0.1:8082")
        for _ in range(requests):
            production = rng.lognormvariate(-7, 1.5)
            shadow.paired.add(production, production * rng.uniform(0.8, 1.5))
            stats.production.record(production, error=rng.random() < 0.01)
            shadow.record(production * rng.uniform(0.8, 1.5))
        shadow.ended("done")
        shadow.ended("diverged")
    return routes


def odd_routes() -> tuple[dict[str, RouteStats], ReloadStatus]:
    routes = many_routes()
    routes["r1"].record = RecordStats(file="/var/lib/gproxyd/r1.rec", recorded=7, dropped=2,
                                      skipped=1, bytes=900, errors=3)
    routes["r2"].archive = "sqlite:///var/lib/gproxyd/a.db"
    routes["r2"].archived, routes["r2"].overdue_seconds = 5, 1.5
    routes['we"ird\\name\n'] = routes.pop("r0")  # label escaping
    routes["r1"].production.bytes_sent = 12345678901  # written with an exponent, as Go does
    routes["r1"].shadows["127.0.0.1:8082"].mirrored = 10 ** 17
    routes["r1"].shadows["127.0.0.1:8082"].drops = {"over-buffer": 3, "shadow-failed": 1}
    routes["idle"] = RouteStats()  # empty histograms
    status = ReloadStatus("/etc/gproxyd/gproxyd.conf")
    status.time = 1700000000.25
    status.failed("cannot listen\non 0.0.0.0:80")
    return routes, status


def test_metrics_text_is_the_text_generate_latest_wrote():
    routes, status = odd_routes()
    assert metrics_text(routes, status) == reference_metrics(routes, status)
    memory = some_shadow_memory()
    assert metrics_text(routes, status, shadow_memory=memory) == \
        reference_metrics(routes, status, memory)
    assert metrics_text(routes) == reference_metrics(routes)
    assert metrics_text({}) == reference_metrics({})
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(metrics_text(routes).decode())
               for sample in family.samples}
    assert samples[("gproxyd_backend_sent_bytes_total",
                    (("backend", "production"), ("route", "r1")))] == 12345678901
    assert samples[("gproxyd_connections_active", (("route", 'we"ird\\name\n'),))] == 0


def test_stats_text_is_the_json_of_every_routes_snapshot():
    """What json.dumps(document, indent=1) writes, each route's text written on its own."""
    for (routes, status), memory in [(odd_routes(), some_shadow_memory()),
                                     (odd_routes(), None), ((many_routes(1), None), None),
                                     (({}, None), None)]:
        body = stats_text(routes, status, shadow_memory=memory)
        document = json.loads(body)
        expected = {"version": __version__, "time": document["time"]}
        if status is not None:
            expected.update(pid=os.getpid(), reload=status.document())
        if memory is not None:
            expected["shadow_memory"] = memory.snapshot()
        expected["routes"] = {name: stats.snapshot() for name, stats in routes.items()}
        assert body == json.dumps(expected, indent=1).encode() + b"\n"


def add_mismatches(routes: dict[str, RouteStats]) -> None:
    """Differing exchanges, as compare.py keeps them, in every route."""
    for number, (name, stats) in enumerate(routes.items()):
        for index in range(3):
            stats.samples.append({
                "time": 1700000000 + number + index / 10, "route": name,
                "shadow": f"127.0.0.1:{8082 + index % 2}",
                "request": {"method": "GET", "path": f"/items/{index}"},
                "paths": ["$.price"], "production": {"status": 200, "body": '{"price": 1}'},
                "candidate": {"status": 200, "body": '{"price": 2}\n"é"'}})


@pytest.mark.parametrize("query", ["", "route=r1", "shadow=127.0.0.1:8083",
                                   "route=r2&shadow=127.0.0.1:8082&limit=1", "limit=4",
                                   "route=nowhere"])
def test_mismatches_text_is_the_json_of_the_exchanges_asked_for(query):
    routes, _ = odd_routes()
    add_mismatches(routes)
    body = mismatches_text(routes, query)
    document = json.loads(body)
    asked = dict(part.split("=") for part in query.split("&") if part)
    expected = sorted((sample for name, stats in routes.items()
                       if asked.get("route", name) == name for sample in stats.samples
                       if asked.get("shadow", sample["shadow"]) == sample["shadow"]),
                      key=lambda sample: sample["time"], reverse=True)
    if "limit" in asked:
        expected = expected[:int(asked["limit"])]
    reference = {"version": __version__, "time": document["time"], "mismatches": expected}
    assert body == json.dumps(reference, indent=1).encode() + b"\n"


def test_a_rendering_ticks_after_every_backend_and_every_route():
    routes, status = odd_routes()
    backends = sum(1 + len(stats.shadows) for stats in routes.values())
    add_mismatches(routes)
    ticks = []
    metrics_text(routes, status, lambda: ticks.append("metrics"))
    stats_text(routes, status, lambda: ticks.append("stats"))
    mismatches_text(routes, "", lambda: ticks.append("mismatches"))
    assert (ticks.count("metrics"), ticks.count("stats"), ticks.count("mismatches")) == (
        backends, len(routes), sum(len(stats.samples) for stats in routes.values()))


def test_a_slicer_lets_the_loop_turn_once_a_slice_is_used_up():
    loop = gevent.get_hub().loop
    every, never = _Slicer(length=0), _Slicer(length=3600)
    turns = []
    for _ in range(5):
        before = loop.iteration
        every.tick()
        turns.append(loop.iteration - before)
        never.tick()
    assert every.yields == 5 and min(turns) >= 1
    assert never.yields == 0


def test_a_budget_fills_at_its_share_up_to_its_burst():
    now = [100.0]
    budget = LoopBudget(share=0.05, burst=0.02, clock=lambda: now[0])
    assert budget.left() == 0.02
    budget.spend(0.03)
    assert budget.left() == pytest.approx(-0.01)
    now[0] += 0.1  # 0.1 s go by: 5 ms come back
    assert budget.left() == pytest.approx(-0.005)
    now[0] += 3600
    assert budget.left() == 0.02  # never more than the burst


def test_a_budget_in_debt_waits_until_it_is_paid_back():
    budget = LoopBudget(share=1.0, burst=0.0)
    budget.wait()
    assert budget.waits == 0
    budget.spend(0.002)
    budget.wait()
    assert budget.waits >= 1 and budget.left() >= 0


def test_answers_are_spent_from_the_budget_and_renderings_are_not(admin_server):
    """max_age bounds the renderings; the budget bounds how often anyone is answered."""
    routes, _ = odd_routes()
    admin = admin_server(lambda: routes, loop_share=1e-9, loop_burst=10.0)
    admin.metrics.get()
    admin.stats.get()
    assert admin.budget.left() == 10.0
    assert requests.get(base(admin) + "/healthz", timeout=5).text == "ok\n"
    assert admin.budget.left() < 10.0


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


def test_requests_pipelined_on_one_connection_each_wait_for_a_turn_of_the_loop(
        admin_server):
    """A client that asks again before its answer is out (or right after) finds its next
    request already read: each is still answered in a turn of the loop of its own, so that
    one connection cannot hold the loop for as long as it asks."""
    loop = gevent.get_hub().loop
    turns = []

    def source():
        turns.append(loop.iteration)
        return {}

    admin = admin_server(source)
    client = connect(admin)
    client.sendall(b"GET /mismatches HTTP/1.1\r\nHost: admin\r\n\r\n" * 20)
    received = b""
    while received.count(b"HTTP/1.1 200 OK") < 20 or not received.endswith(b"]\n}\n"):
        received += client.recv(65536)
    client.close()
    assert len(turns) == 20 and len(set(turns)) == 20


def test_a_scrape_loop_gets_answers_at_the_pace_of_the_loop_share(admin_server):
    """With no burst, whatever one answer took must be paid back (at loop_share of the
    time going by) before the next one: a client asking back to back waits every time."""
    admin = admin_server(dict, loop_share=0.05, loop_burst=0)
    client = connect(admin)
    for _ in range(10):
        client.sendall(HEALTHZ)
        assert answer(client).endswith(b"ok\n")
    client.close()
    assert admin.budget.waits >= 9


def test_answers_are_not_held_back_for_the_clients_ack(admin_server):
    """pywsgi writes the head and the body apart: without TCP_NODELAY the body waits for
    the ACK of the head, which the client delays (~40 ms an answer on a kept-alive
    connection)."""
    admin = admin_server(dict)
    client = connect(admin)
    client.sendall(HEALTHZ)
    assert answer(client).endswith(b"ok\n")
    held = [connection.sock for connection in admin._server.connections.values()]
    assert [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in held] == [1]
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


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("request_bytes, status, closes", [
    (b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n", b"200 OK", False),
    # absolute form and percent-encoding reach the same path
    (b"GET http://admin:9901/heal%74hz HTTP/1.1\r\nHost: admin\r\n\r\n", b"200 OK", False),
    # HTTP/1.0 closes unless it asks to keep alive; 1.1 keeps unless it asks to close
    (b"GET /healthz HTTP/1.0\r\n\r\n", b"200 OK", True),
    (b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"200 OK", False),
    (b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", b"200 OK", True),
    # a body is not read: answered, then closed (where the next request begins is unknown)
    (b"POST /stats HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody", b"405 Method Not Allowed", True),
    (b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"200 OK", True),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", b"404 Not Found", False),
    # what the endpoint does not take: said, and closed
    (b"GET /healthz\r\n\r\n", b"400 Bad Request", True),
    (b"GET /healthz HTTP/2.0\r\n\r\n", b"400 Bad Request", True),
    (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400 Bad Request", True),
    (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
     b"431 Request Header Fields Too Large", True),
])
def test_requests_are_answered_or_refused_as_http_1_1_says(admin_server, request_bytes,
                                                           status, closes):
    admin = admin_server(dict)
    client = connect(admin)
    client.sendall(request_bytes)
    received = answer(client)
    assert received.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert (b"\r\nConnection: close\r\n" in received) == closes
    if closes:
        assert read_to_eof(client) == b""
    else:  # a second request on the same connection
        client.sendall(HEALTHZ)
        assert answer(client).endswith(b"\r\n\r\nok\n")
    client.close()


def test_head_gets_the_head_of_the_answer_without_its_body(admin_server):
    admin = admin_server(dict)
    client = connect(admin)
    client.sendall(b"HEAD /healthz HTTP/1.1\r\n\r\n" + HEALTHZ)
    received = b""
    while received.count(b"HTTP/1.1 200 OK") < 2 or not received.endswith(b"ok\n"):
        received += client.recv(4096)
    first, second = received.split(b"HTTP/1.1 200 OK")[1:]
    assert b"Content-Length: 3\r\n" in first and first.endswith(b"\r\n\r\n")
    assert second.endswith(b"\r\n\r\nok\n")
    client.close()


def test_an_answer_that_fails_is_a_500_and_the_endpoint_serves_on(admin_server):
    def broken():
        raise RuntimeError("the numbers are not there")
    admin = admin_server(broken, max_age=0)
    client = connect(admin)
    client.sendall(b"GET /mismatches HTTP/1.1\r\n\r\n")
    assert answer(client).startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    client.sendall(HEALTHZ)
    assert answer(client).endswith(b"ok\n")
    client.close()
