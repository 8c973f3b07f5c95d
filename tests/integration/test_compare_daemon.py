"""Answer comparison in the installed daemon: merged counts and samples of two workers,
a baseline's noise, shadow-filter, --check-config errors for the compare keys, and a
reload that turns comparison off."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from pathlib import Path

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from service import GLOBAL, children, free_port, gproxyd_command, route_section, wait_until


def curl(*args: str) -> str:
    """Run curl (-sS, HTTP/1.1) and return what it printed; it must succeed."""
    found = shutil.which("curl")
    assert found, "curl is not installed (.ci/install-system-deps installs it)"
    result = subprocess.run([found, "-sS", "--http1.1", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_ctl(*args: str) -> subprocess.CompletedProcess:
    """The installed gproxyctl next to gproxyd."""
    command = [str(Path(gproxyd_command()[0]).with_name("gproxyctl")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


class Admin:
    """The daemon's admin endpoint, read with requests."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        answer = requests.get(self.base + path, timeout=5)
        assert answer.status_code == 200, answer.text
        return answer

    def route(self, name: str = "web") -> dict:
        return self.get("/stats").json()["routes"][name]

    def mismatches(self, query: str = "") -> list[dict]:
        return self.get("/mismatches" + query).json()["mismatches"]

    def settled(self, shadows: dict[str, int], count: int, name: str = "web") -> dict:
        """Wait until production answered `count` requests, each shadow named in
        `shadows` had that many answers judged (compared or uncompared), and no
        connection is open; the route's /stats then."""
        seen = {}

        def done():
            route = seen["route"] = self.route(name)
            judged = {shadow: route["shadows"].get(shadow, {}).get("compared", 0)
                      + route["shadows"].get(shadow, {}).get("uncompared", 0)
                      for shadow in shadows}
            return route if (route["connections"]["active"] == 0
                             and route["production"]["requests"] == count
                             and judged == shadows) else None
        try:
            return wait_until(done, what=f"{count} requests and {shadows} judged")
        except AssertionError as error:
            raise AssertionError(f"{error}; last /stats of the route: {seen}") from None


def admin_global(admin: int, extra: str = "") -> str:
    return GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}{extra}")


def item_of(request_line: str) -> int:
    match = re.fullmatch(r"GET /items/(\d+) HTTP/1\.1", request_line)
    assert match, request_line
    return int(match.group(1))


# --- workers = 2: the master merges counts, samples and latency pairs -------------------

CONNECTIONS = 16    # curl processes, each one keep-alive connection...
PER_CONNECTION = 3  # ...fetching this many items; the first of each differs in price
TOTAL = CONNECTIONS * PER_CONNECTION


def test_two_workers_merge_counts_samples_and_verdict(tmp_path, daemons, json_servers):
    """Production answers price 10; the candidate 11 for every item divisible by 3, one
    per connection. Both stamp each answer with a random `trace`, which is ignored. Over
    16 connections both workers get some (the kernel spreads them; all on one worker:
    probability 2**-15); /stats, /mismatches, /metrics and gproxyctl show the sum."""
    production = json_servers(noisy=("trace",))
    candidate = json_servers(noisy=("trace",),
                             price_of=lambda item: 11 if item % 3 == 0 else 10)
    port, admin_port = free_port(), free_port()
    daemon = daemons(tmp_path, admin_global(admin_port, "\nworkers = 2") + route_section(
        "web", port, production.address, shadow=candidate.address, protocol="http",
        compare_ignore_fields="$.trace"))
    daemon.start()
    assert len(children(daemon.pid)) == 2
    admin = Admin(admin_port)

    def fetch(connection: int) -> list[str]:
        """One curl, one keep-alive connection: "client-port url status" per item."""
        items = range(connection * PER_CONNECTION, (connection + 1) * PER_CONNECTION)
        urls = [arg for item in items
                for arg in ("-o", "/dev/null", f"http://127.0.0.1:{port}/items/{item}")]
        return curl("-w", "%{local_port} %{url_effective} %{http_code}\n", *urls).splitlines()
    fetches = [gevent.spawn(fetch, number) for number in range(CONNECTIONS)]
    gevent.joinall(fetches, timeout=30, raise_error=True)
    port_of = {}  # item -> the client port of its connection
    for line in (line for one in fetches for line in one.value):
        local_port, url, code = line.split()
        assert code == "200"
        port_of[int(url.rsplit("/", 1)[1])] = int(local_port)
    assert sorted(port_of) == list(range(TOTAL))
    assert len(set(port_of.values())) == CONNECTIONS
    differing = {item for item in range(TOTAL) if item % 3 == 0}

    route = admin.settled({candidate.address: TOTAL}, TOTAL)
    assert route["connections"]["total"] == CONNECTIONS
    shadow = route["shadows"][candidate.address]
    assert route["production"]["requests"] == shadow["requests"] == TOTAL
    assert (shadow["compared"], shadow["mismatches"], shadow["noise"],
            shadow["uncompared"]) == (TOTAL, len(differing), 0, 0)
    assert shadow["mismatch_paths"] == {"$.price": len(differing)}
    assert shadow["role"] == "candidate"
    assert shadow["latency_diff_ms"]["pairs"] == TOTAL  # both workers' pairs, merged
    assert route["noise_paths"] == {} and route["filtered"] == 0

    # Every differing exchange is sampled once (the cap, compare-samples, is 100), newest
    # first, and they came from both workers: each connection's close line in the log
    # names its client port, logged by the worker (gproxyd[PID]) that served it.
    samples = admin.mismatches()
    assert len(samples) == len(differing)
    times = [sample["time"] for sample in samples]
    assert times == sorted(times, reverse=True)
    assert {item_of(sample["request"]) for sample in samples} == differing
    for sample in samples:
        assert sample["route"] == "web" and sample["shadow"] == candidate.address
        assert sample["paths"] == ["$.price"]
        assert sample["production"]["status"] == sample["candidate"]["status"] == 200
        assert '"price": 10' in sample["production"]["body"]
        assert '"price": 11' in sample["candidate"]["body"]
    worker_of = {}  # client port -> the pid that logged its connection
    pattern = re.compile(r"gproxyd\[(\d+)\] info: route=web client=127\.0\.0\.1:(\d+) ")
    wait_until(lambda: len({int(p) for _, p in pattern.findall(daemon.log())}
                           & set(port_of.values())) == CONNECTIONS,
               what="a close line for every connection")
    for pid, client in pattern.findall(daemon.log()):
        worker_of[int(client)] = int(pid)
    sampled_by = {worker_of[port_of[item_of(sample["request"])]] for sample in samples}
    assert sampled_by == set(children(daemon.pid))

    newest = admin.mismatches("?limit=2")
    assert newest == samples[:2]
    assert admin.mismatches(f"?route=web&shadow={candidate.address}&limit=0") == samples
    assert admin.mismatches("?route=other") == []

    config = str(daemon.config_path)
    result = run_ctl("diff", "-c", config, "--limit", "2")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip("\n").split("\n\n")
    assert len(blocks) == 2
    for block, sample in zip(blocks, newest, strict=True):
        lines = block.splitlines()
        assert lines[0].endswith(f" route web shadow {candidate.address}: "
                                 f"{sample['request']}")
        assert lines[1] == "  differs at: $.price"
        assert lines[2].startswith("  production:  200 {") and '"price": 10' in lines[2]
        assert lines[3].startswith("  candidate:   200 {") and '"price": 11' in lines[3]

    result = run_ctl("diff", "-c", config, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mismatches"] == samples[:10]  # --limit: 10 by default

    result = run_ctl("stats", "-c", config, "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    verdict_line = [line for line in result.stdout.splitlines()
                    if line.startswith(f"  {candidate.address}: ")]
    assert len(verdict_line) == 1
    assert verdict_line[0].endswith("; 33.3% of answers differ, mostly $.price")

    metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(admin.get("/metrics").text)
               for sample in family.samples}
    labels = (("backend", candidate.address), ("route", "web"))
    assert metrics[("gproxyd_shadow_mismatches_total", labels)] == len(differing)
    assert metrics[("gproxyd_shadow_compared_total", labels)] == TOTAL
    assert metrics[("gproxyd_shadow_noise_total", labels)] == 0
    assert metrics[("gproxyd_shadow_filtered_total", (("route", "web"),))] == 0


@pytest.mark.parametrize("workers, cap", [(1, 4), (1, 120), (2, 4), (2, 120)])
def test_mismatches_keep_compare_samples_per_route(tmp_path, daemons, json_servers,
                                                   workers, cap):
    """128 differing answers over 16 connections: /mismatches keeps the newest
    `compare-samples` of the route (README: "newest first, compare-samples per route"),
    however many workers served them."""
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11)
    port, admin_port = free_port(), free_port()
    daemons(tmp_path, admin_global(admin_port, f"\nworkers = {workers}") + route_section(
        "web", port, production.address, shadow=candidate.address, protocol="http",
        compare_samples=str(cap))).start()
    admin = Admin(admin_port)

    def fetch(connection: int) -> None:
        curl(*(arg for item in range(connection * 8, connection * 8 + 8)
               for arg in ("-o", "/dev/null", f"http://127.0.0.1:{port}/items/{item}")))
    gevent.joinall([gevent.spawn(fetch, number) for number in range(16)], timeout=30,
                   raise_error=True)
    route = admin.settled({candidate.address: 128}, 128)
    assert route["shadows"][candidate.address]["mismatches"] == 128
    samples = admin.mismatches()
    times = [sample["time"] for sample in samples]
    assert times == sorted(times, reverse=True)
    assert len(samples) == cap


# --- a baseline in the daemon ------------------------------------------------------------

def test_baseline_noise_is_learned_and_only_the_real_difference_counts(tmp_path, daemons,
                                                                        json_servers):
    """Production, its twin (baseline) and the candidate all add a random `rid`; only
    the candidate's price on item 3 is a real difference."""
    production = json_servers(noisy=("rid",))
    baseline = json_servers(noisy=("rid",))
    candidate = json_servers(noisy=("rid",), price_of=lambda item: 11 if item == 3 else 10)
    port, admin_port = free_port(), free_port()
    daemons(tmp_path, admin_global(admin_port) + route_section(
        "web", port, production.address, shadow=candidate.address,
        baseline=baseline.address, protocol="http")).start()
    admin = Admin(admin_port)
    bodies = curl("-w", "\n", *(f"http://127.0.0.1:{port}/items/{item}" for item in range(10)))
    assert [json.loads(body)["price"] for body in bodies.splitlines()] == [10] * 10

    route = admin.settled({candidate.address: 10, baseline.address: 10}, 10)
    twin, shadow = route["shadows"][baseline.address], route["shadows"][candidate.address]
    assert twin["role"] == "baseline" and shadow["role"] == "candidate"
    assert (twin["compared"], twin["mismatches"]) == (10, 10)
    assert twin["mismatch_paths"] == {"$.rid": 10}
    assert (shadow["compared"], shadow["mismatches"], shadow["noise"],
            shadow["uncompared"]) == (10, 1, 9, 0)
    assert shadow["mismatch_paths"] == {"$.price": 1}
    assert route["noise_paths"] == {"$.rid": 1.0}
    [sample] = admin.mismatches()
    assert sample["shadow"] == candidate.address  # the baseline's differences are not sampled
    assert sample["request"] == "GET /items/3 HTTP/1.1" and sample["paths"] == ["$.price"]

    result = run_ctl("diff", "--admin", f"127.0.0.1:{admin_port}", "--shadow",
                     baseline.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no differing answers kept (none yet, or compare = off)\n"


# --- shadow-filter ------------------------------------------------------------------------

def test_shadow_filter_keeps_writes_from_the_candidate(tmp_path, daemons, json_servers):
    """One curl connection mixes GET, POST, PUT, DELETE and HEAD; only GET and HEAD reach
    the candidate, and its answers pair with production's to the same requests: the
    candidate's price differs on the POST and DELETE items too, but only item 5 counts."""
    production_seen, candidate_seen = [], []
    production = json_servers(seen=production_seen)
    candidate = json_servers(seen=candidate_seen,
                             price_of=lambda item: 11 if item in (2, 4, 5) else 10)
    port, admin_port = free_port(), free_port()
    daemons(tmp_path, admin_global(admin_port) + route_section(
        "web", port, production.address, shadow=candidate.address, protocol="http",
        shadow_filter="GET HEAD")).start()
    admin = Admin(admin_port)

    sent = [("GET", []), ("POST", ["-d", "a=1"]), ("PUT", ["-d", "a=2"]), ("DELETE", []),
            ("GET", []), ("HEAD", ["-I"]), ("GET", [])]
    args = []
    for item, (method, extra) in enumerate(sent, 1):
        args += ["--next"] if args else []
        args += ["-o", "/dev/null", "-w", "%{local_port} %{http_code}\n", *extra]
        args += [] if method in ("GET", "HEAD") else ["-X", method]
        args.append(f"http://127.0.0.1:{port}/items/{item}")
    lines = curl(*args).splitlines()
    assert [line.split()[1] for line in lines] == ["200"] * 7
    assert len({line.split()[0] for line in lines}) == 1  # one connection for all seven
    assert production_seen == ["GET", "POST", "PUT", "DELETE", "GET", "HEAD", "GET"]

    route = admin.settled({candidate.address: 4}, 7)
    assert candidate_seen == ["GET", "GET", "HEAD", "GET"]
    assert route["filtered"] == 3
    shadow = route["shadows"][candidate.address]
    assert (shadow["requests"], shadow["compared"], shadow["mismatches"],
            shadow["uncompared"]) == (4, 4, 1, 0)
    [sample] = admin.mismatches()
    assert sample["request"] == "GET /items/5 HTTP/1.1" and sample["paths"] == ["$.price"]
    metrics = admin.get("/metrics").text
    assert 'gproxyd_shadow_filtered_total{route="web"} 3.0' in metrics.splitlines()


# --- --check-config -----------------------------------------------------------------------

# The route section starts on line 6 (GLOBAL is 5 lines): listen 7, production 8, then
# the keys below from line 9 on.
BAD_COMPARE_KEYS = [
    ({"protocol": "redis", "compare": "status"}, 10, "compare: status compares HTTP status "
     "codes (expected body or off on a redis route)"),
    ({"protocol": "http", "shadow_filter": "readonly"}, 10, "shadow-filter: bad filter "
     "'readonly' (expected HTTP methods in capitals, e.g. GET HEAD OPTIONS)"),
    ({"protocol": "redis", "shadow_filter": "GET"}, 10, "shadow-filter: bad filter 'GET' "
     "(expected readonly on a redis route)"),
    ({"shadow_filter": "GET"}, 9, "shadow-filter: requests are told apart only on http and "
     "redis routes (expected protocol = http or redis)"),
    ({"protocol": "http", "shadow": "127.0.0.1:9002", "baseline": "127.0.0.1:9002"}, 11,
     "baseline: 127.0.0.1:9002 is also a shadow (expected the baseline apart from the "
     "shadows compared with it)"),
    ({"protocol": "http", "baseline": "127.0.0.1:9001"}, 10, "baseline: 127.0.0.1:9001 is "
     "production itself (expected a second instance of production's build)"),
    ({"protocol": "http", "compare": "off", "baseline": "127.0.0.1:9003"}, 11, "baseline: a "
     "baseline only serves answer comparison (expected protocol = http or redis, and "
     "compare not off)"),
    ({"protocol": "http", "compare_ignore_fields": "items.price"}, 10, "compare-ignore-fields: "
     "bad JSON path 'items.price' (expected $ then .key, [index], [\"key\"] or * for any "
     "one, e.g. $.items[*].updated_at)"),
    ({"protocol": "http", "compare": "maybe"}, 10, "compare: bad value 'maybe' (expected one "
     "of: body, status, off)"),
    ({"protocol": "redis", "compare_headers": "Content-Type"}, 10, "compare-headers: headers "
     "are HTTP's (expected no compare-headers on a redis route)"),
]


@pytest.mark.parametrize("keys, line, problem", BAD_COMPARE_KEYS,
                         ids=[problem.split(":")[0] + "-" + str(index)
                              for index, (_, _, problem) in enumerate(BAD_COMPARE_KEYS)])
def test_check_config_names_the_bad_compare_key(tmp_path, keys, line, problem):
    config = tmp_path / "gproxyd.conf"
    config.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9001", **keys))
    result = subprocess.run(gproxyd_command() + ["--check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr == f"gproxyd: {config}:{line}: {problem}\n"


# --- reload ---------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_reload_turning_compare_off_keeps_serving_and_the_old_numbers(tmp_path, daemons,
                                                                       json_servers, workers):
    """compare = body, then SIGHUP with compare = off: requests keep being answered;
    connections accepted since count no comparison (their latencies are still paired),
    the numbers so far stay, and a connection accepted before keeps its route (with
    workers: on an old worker, whose numbers stay once it has drained and exited)."""
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11)  # every answer differs
    port, admin_port = free_port(), free_port()

    def config(compare: str) -> str:
        return admin_global(admin_port, f"\nworkers = {workers}") + route_section(
            "web", port, production.address, shadow=candidate.address, protocol="http",
            compare=compare)
    daemon = daemons(tmp_path, config("body"))
    daemon.start()
    admin = Admin(admin_port)
    url = f"http://127.0.0.1:{port}/items"

    def answered_by_both(count: int) -> tuple[dict, dict]:
        """Wait until production and the shadow answered `count` requests in all and the
        shadow's latency pairs caught up; the route's and the shadow's numbers then."""
        def done():
            route = admin.route()
            shadow = route["shadows"].get(candidate.address, {})
            return (route, shadow) if (route["production"]["requests"] == count
                                       and shadow.get("requests") == count
                                       and shadow["latency_diff_ms"]["pairs"] == count) else None
        return wait_until(done, what=f"{count} requests answered by both")

    # One keep-alive connection accepted under compare = body (http.client: it closes
    # its socket when told to, whatever response objects are still around).
    early = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def early_price(item: int) -> int:
        early.request("GET", f"/items/{item}")
        answer = early.getresponse()
        assert answer.status == 200
        return json.loads(answer.read())["price"]
    try:
        assert [early_price(item) for item in range(3)] == [10, 10, 10]
        curl(f"{url}/3", f"{url}/4")
        _, before = answered_by_both(5)
        assert (before["compared"], before["mismatches"]) == (5, 5)
        old_workers = set(children(daemon.pid))

        daemon.write_config(config("off"))
        daemon.reload()
        daemon.wait_log("reloaded")
        for item in range(10, 15):  # one connection each
            assert json.loads(curl(f"{url}/{item}"))["price"] == 10
        _, after = answered_by_both(10)
        assert (after["compared"], after["mismatches"], after["uncompared"]) == (5, 5, 0)
        assert len(admin.mismatches()) == 5

        # The connection accepted before the reload still compares.
        assert early_price(20) == 10
        _, last = answered_by_both(11)
        assert (last["compared"], last["mismatches"]) == (6, 6)
    finally:
        early.close()
    if workers > 1:
        wait_until(lambda: len(children(daemon.pid)) == workers
                   and old_workers.isdisjoint(children(daemon.pid)), what="old workers gone")
    wait_until(lambda: admin.route()["connections"]["active"] == 0, what="connections closed")
    route, final = answered_by_both(11)
    assert route["connections"]["total"] == 1 + 1 + 5  # early, one curl for 3 and 4, five
    assert (final["compared"], final["mismatches"], final["uncompared"]) == (6, 6, 0)
    assert len(admin.mismatches()) == 6
    assert daemon.process.poll() is None
