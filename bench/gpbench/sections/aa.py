"""aa: an A/A test of gproxyd's shadow measurement. Production and shadow are identical
(two nginx behind a protocol = http route, two redis-servers behind a protocol = redis
route), so /stats must read the same for both, at light load and near saturation."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import BENCH_DIR, BenchError
from ..configs import gproxyd_conf
from ..processes import child_setup, last_line, log_tail, wait_listening
from ..procfs import free_port
from ..rig import Rig
from ..section import Section
from ..source import check_config, gproxyd_available, gproxyd_env
from ..tables import fmt, markdown_table, text_table
from ..targets import Target

ROUTE = "aa"
SHARE = 0.8                   # the "near saturation" point: this share of the -c50 req/s
SATURATION_CONNECTIONS = 50
P50_TOLERANCE = 0.05          # shadow/production within these counts as "the same"
P99_TOLERANCE = 0.10
PIPELINES = (1, 16)           # redis-benchmark -P
PROBE_SECONDS = 2             # each short run while searching for the 80% -c (wrk: whole s)
# Stock wrk's fixed rate (a Lua delay() in whole ms, a closed loop) is set by the number
# of connections each waiting this long before each request: fine-grained, unlike the ms.
HTTP_DELAY_MS = 5
HTTP_MAX_CONNECTIONS = 400
SETTLE_SECONDS = 15.0         # shadow-linger (5 s) and then some
REDIS_TOOLS = ("redis-server", "redis-benchmark")
OUTCOMES = ("done", "dropped", "failed", "reset", "timeout", "diverged")

# The sentence gproxyd itself gives, from the gproxyd source being measured (the bench
# stays stdlib-only and never imports gproxyd).
VERDICT = ("import json, sys\n"
           "from gproxyd.report import verdict\n"
           "numbers = json.load(sys.stdin)\n"
           "print(verdict(numbers['production'], numbers['shadow']))\n")


@dataclass(frozen=True)
class Case:
    """One measured case: a fresh gproxyd per run, its /stats read after the load."""
    protocol: str      # "http" or "redis"
    load: str          # "light", "saturation", "80%" (in the order they run)
    pipeline: int = 1  # redis-benchmark -P

    @property
    def group(self) -> str:
        return "http" if self.protocol == "http" else f"redis -P {self.pipeline}"

    @property
    def name(self) -> str:
        load = {"light": "light", "saturation": "sat", "80%": "80"}[self.load]
        protocol = "http" if self.protocol == "http" else f"redis-p{self.pipeline}"
        return f"aa-{protocol}-{load}"

    @property
    def description(self) -> str:
        if self.protocol == "http":
            backends = "protocol = http, production and shadow two identical nginx"
            load = {"light": "wrk -c1, closed loop",
                    "saturation": f"wrk -c{SATURATION_CONNECTIONS}, closed loop",
                    "80%": f"wrk at a fixed rate of {SHARE:.0%} of this run's saturation"}
        else:
            backends = "protocol = redis, production and shadow two identical redis-servers"
            load = {"light": "redis-benchmark -c1",
                    "saturation": f"redis-benchmark -c{SATURATION_CONNECTIONS}",
                    "80%": f"redis-benchmark with the -c nearest {SHARE:.0%} of this run's "
                           "saturation"}
            tool = f"redis-benchmark -P {self.pipeline} -t set,get"
            load = {key: text.replace("redis-benchmark", tool) for key, text in load.items()}
        return f"A/A, a fresh gproxyd with admin per run: {backends}; {load[self.load]}"


CASES = tuple(Case("http", load) for load in ("light", "saturation", "80%")) + tuple(
    Case("redis", load, pipeline) for pipeline in PIPELINES
    for load in ("light", "saturation", "80%"))
BY_NAME = {case.name: case for case in CASES}
# The table: light, then 80%, then saturation, per group.
TABLE_ORDER = tuple(case for group in dict.fromkeys(case.group for case in CASES)
                    for load in ("light", "80%", "saturation")
                    for case in CASES if case.group == group and case.load == load)


class AA(Section):
    name = "aa"
    summary = ("A/A test of the shadow numbers: identical production and shadow (nginx, "
               "protocol = http; redis-server, protocol = redis) at light load and ~80% "
               "of saturation: /stats p50/p99 of both sides, ratios, verdict")
    backends = ("healthy",)   # the second nginx: the shadow, configured like production

    def prepare(self, rig: Rig) -> None:
        self.redis_ports: tuple[int, int] = (0, 0)
        self.saturation: dict[str, float] = {}     # group -> this run's -c50 req/s
        self.clients: dict[str, int] = {}          # group -> this run's 80% -c
        self.rps_seen: dict[tuple[int, int], float] = {}   # (-P, -c) -> req/s, sizes -n
        missing = [tool for tool in REDIS_TOOLS if not shutil.which(tool)]
        if missing:
            print(f"aa: missing {', '.join(missing)}: running bench/setup.sh", file=sys.stderr)
            subprocess.run(["sh", os.path.join(BENCH_DIR, "setup.sh")], timeout=900)

    def run(self, rig: Rig) -> None:
        gproxyd_error = gproxyd_available(rig.gproxyd_source)
        redis_error = gproxyd_error or self.start_redis(rig)
        if not redis_error:
            try:
                self.calibrate(rig)
            except BenchError as error:
                redis_error = f"calibrating redis-benchmark: {error}"
        for case in CASES:
            target = Target(case.name, case.description)
            target.error = redis_error if case.protocol == "redis" else gproxyd_error
            if target.error:
                print(f"{case.name}: n/a: {target.error}", file=sys.stderr)
            rig.targets[case.name] = target
        rig.interleaved("aa", [case.name for case in CASES],
                        lambda target: self.measure(rig, BY_NAME[target.name], target))

    # -- the backends and the proxies

    def start_redis(self, rig: Rig) -> str:
        """Start the two redis-servers, configured alike; '' or why they cannot run."""
        missing = [tool for tool in REDIS_TOOLS if not shutil.which(tool)]
        if missing:
            return f"{', '.join(missing)} not found (bench/setup.sh installs redis-server " \
                   "and redis-tools)"
        ports = []
        for name in ("redis", "redis-shadow"):
            directory = os.path.join(rig.workdir, name)
            os.makedirs(directory)
            port = free_port()
            proc, log = rig.procs.start(
                name, ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                       "--save", "", "--appendonly", "no", "--daemonize", "no",
                       "--dir", directory, "--logfile", ""], cpus=rig.load_cpus)
            try:
                wait_listening([port], proc, log)
            except BenchError as error:
                return f"{name}: {error}"
            ports.append(port)
        self.redis_ports = (ports[0], ports[1])
        return ""

    def start_gproxyd(self, rig: Rig, target: Target, protocol: str) -> int:
        """A gproxyd of its own for TARGET (target.proc, until the caller stops it): one
        route, production and the identical shadow; returns its admin port. Other jobs
        on the machine take ports too: a port taken between free_port() and the bind
        costs another try."""
        for attempt in range(3):
            try:
                return self._start_gproxyd(rig, target, protocol)
            except BenchError as error:
                if target.proc:
                    rig.procs.stop(target.proc)
                    target.proc = None
                if "in use" not in str(error) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_gproxyd(self, rig: Rig, target: Target, protocol: str) -> int:
        production, shadow = ((rig.nginx_port, rig.shadow_nginx_port) if protocol == "http"
                              else self.redis_ports)
        target.http_port, admin = free_port(), free_port()
        conf = os.path.join(rig.workdir, f"{target.name}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(
                ("drain-timeout = 1s",),
                [(ROUTE, target.http_port, production,
                  (f"shadow = 127.0.0.1:{shadow}", f"protocol = {protocol}"))],
                admin=f"127.0.0.1:{admin}"))
        check_config(conf, rig.gproxyd_source)
        source = rig.gproxyd_source
        target.proc, target.log = rig.procs.start(
            target.name, [sys.executable, "-m", "gproxyd", "-c", conf], cpus=rig.proxy_cpus,
            env=gproxyd_env(source), cwd=source)
        wait_listening([target.http_port, admin], target.proc, target.log)
        return admin

    # -- measuring

    def measure(self, rig: Rig, case: Case, target: Target) -> dict[str, Any]:
        if case.load == "light":  # the first case of its group in a run
            self.saturation.pop(case.group, None)
            self.clients.pop(case.group, None)
        try:
            admin = self.start_gproxyd(rig, target, case.protocol)
            values = (self.load_http(rig, case, target) if case.protocol == "http"
                      else self.load_redis(rig, case, target))
            route = settled_route(admin, target)
            if case.load == "saturation" and not (case.protocol == "http"
                                                  and rig.wrk_rate_flag):
                # Its /stats are read: the search for the 80% -c may use this proxy.
                self.clients[case.group] = self.choose_clients(rig, case, target)
        finally:
            if target.proc:
                rig.procs.stop(target.proc)
                target.proc = None
        return {**values, **compare(rig, route)}

    def load_http(self, rig: Rig, case: Case, target: Target) -> dict[str, Any]:
        seconds = rig.args.duration
        if case.load == "light":
            result = rig.wrk.run(target, "/small", 1, seconds, rig.wrk.script())
            return {"rps": result.rps, "errors": result.errors}
        if case.load == "saturation":
            result = rig.wrk.run(target, "/small", SATURATION_CONNECTIONS, seconds,
                                 rig.wrk.script())
            self.saturation[case.group] = result.rps
            return {"rps": result.rps, "errors": result.errors}
        saturation = self.this_run_saturation(case)
        if rig.wrk_rate_flag:
            offered = round(SHARE * saturation)
            result = rig.wrk.run(target, "/small", rig.args.rate_connections, seconds,
                                 rig.wrk.script(), rate=offered)
            return {"rps": result.rps, "errors": result.errors, "offered": offered,
                    "share": result.rps / saturation}
        clients = self.chosen_clients(case)
        result = rig.wrk.run(target, "/small", clients, seconds,
                             rig.wrk.script("GET", 0, HTTP_DELAY_MS))
        return {"rps": result.rps, "errors": result.errors, "connections": clients,
                "share": result.rps / saturation}

    def load_redis(self, rig: Rig, case: Case, target: Target) -> dict[str, Any]:
        pipeline = case.pipeline
        if case.load == "light":
            clients = 1
        elif case.load == "saturation":
            clients = SATURATION_CONNECTIONS
        else:
            clients = self.chosen_clients(case)
        result = self.timed_benchmark(rig, target, pipeline, clients, rig.args.duration)
        values = {"rps": result["rps"], "connections": clients}
        if case.load == "saturation":
            self.saturation[case.group] = result["rps"]
        elif case.load == "80%":
            values["share"] = result["rps"] / self.this_run_saturation(case)
        return values

    def chosen_clients(self, case: Case) -> int:
        if case.group not in self.clients:
            raise BenchError("no -c chosen in this run (its saturation run failed)")
        return self.clients[case.group]

    def this_run_saturation(self, case: Case) -> float:
        if case.group not in self.saturation:
            raise BenchError("no saturation figure in this run (its saturation run failed)")
        return self.saturation[case.group]

    def choose_clients(self, rig: Rig, case: Case, target: Target) -> int:
        """The -c whose req/s is nearest SHARE of this run's saturation, by bisection
        with short runs (req/s grows with -c until the proxy saturates): redis-benchmark
        over 1..50, wrk with HTTP_DELAY_MS before each request over 1..400."""
        goal = SHARE * self.saturation[case.group]
        seconds = min(PROBE_SECONDS, rig.args.duration)

        def probe(clients: int) -> float:
            if case.protocol == "http":
                return rig.wrk.run(target, "/small", clients, seconds,
                                   rig.wrk.script("GET", 0, HTTP_DELAY_MS)).rps
            return self.timed_benchmark(rig, target, case.pipeline, clients, seconds,
                                        retry=True)["rps"]

        low = 1
        if case.protocol == "http":
            high = HTTP_MAX_CONNECTIONS
            rps = {low: probe(low), high: probe(high)}
        else:
            high = SATURATION_CONNECTIONS
            rps = {low: probe(low), high: self.saturation[case.group]}
        if rps[low] >= goal:
            return low
        if rps[high] <= goal:
            return high
        while high - low > 1:
            middle = min(high - 1, max(low + 1, round(math.sqrt(low * high))))
            rps[middle] = probe(middle)
            if rps[middle] < goal:
                low = middle
            else:
                high = middle
        return min((low, high), key=lambda clients: abs(rps[clients] - goal))

    def calibrate(self, rig: Rig) -> None:
        """req/s at -c1 and -c50 for each -P, through a gproxyd of its own, so that each
        measured run gets an -n that lasts about --duration (redis-benchmark counts
        requests, not seconds)."""
        target = Target("aa-redis-calibration", "")
        try:
            self.start_gproxyd(rig, target, "redis")
            for pipeline in PIPELINES:
                for clients in (1, SATURATION_CONNECTIONS):
                    requests = 100 * pipeline
                    for _ in range(12):
                        result = redis_benchmark(target.http_port, pipeline, clients,
                                                 requests, rig.load_cpus, 60)
                        if result["seconds"] >= 0.3:
                            break
                        requests *= 4
                    self.rps_seen[(pipeline, clients)] = result["rps"]
        finally:
            if target.proc:
                rig.procs.stop(target.proc)

    def timed_benchmark(self, rig: Rig, target: Target, pipeline: int, clients: int,
                        seconds: float, retry: bool = False) -> dict[str, float]:
        """redis-benchmark -t set,get sized to last about SECONDS, from the req/s last
        seen at this -c (or at the next lower one seen: at least as fast). RETRY: run
        again when the guess was far too low (probes only: a measured run is run once)."""
        known = [c for p, c in self.rps_seen if p == pipeline and c <= clients]
        estimate = self.rps_seen[(pipeline, max(known))]
        for _ in range(2 if retry else 1):
            requests = max(10 * pipeline, round(estimate * seconds / 2))  # two tests
            result = redis_benchmark(target.http_port, pipeline, clients, requests,
                                     rig.load_cpus, 10 * seconds + 30)
            estimate = self.rps_seen[(pipeline, clients)] = result["rps"]
            if result["seconds"] >= seconds / 3:
                break
        return result

    # -- the report

    def table(self, rig: Rig) -> list[list[str]]:
        rows = [["case", "load (median)", "requests prod / shadow", "prod p50 ms",
                 "prod p99 ms", "shadow p50 ms", "shadow p99 ms", "p50 shadow/prod",
                 f"p50 within ±{P50_TOLERANCE:.0%}", "p99 shadow/prod",
                 f"p99 within ±{P99_TOLERANCE:.0%}", "shadow outcomes", "verdicts (runs)"]]
        for case in TABLE_ORDER:
            def get(metric: str, name: str = case.name) -> float | None:
                return rig.median(name, f"aa.{metric}")

            if get("prod_requests") is None:
                rows.append([f"{case.group}, {case.load}", "n/a"] + [""] * 11)
                continue
            outcomes = ", ".join(f"{outcome} {fmt(get(f'outcome_{outcome}'), 0)}"
                                 for outcome in OUTCOMES if get(f"outcome_{outcome}"))
            rows.append([f"{case.group}, {case.load}", load_words(rig, case),
                         f"{fmt(get('prod_requests'), 0)} / {fmt(get('shadow_requests'), 0)}",
                         fmt(get("prod_p50"), 3), fmt(get("prod_p99"), 3),
                         fmt(get("shadow_p50"), 3), fmt(get("shadow_p99"), 3),
                         fmt(get("p50_ratio"), 3), within(rig, case, "p50", P50_TOLERANCE),
                         fmt(get("p99_ratio"), 3), within(rig, case, "p99", P99_TOLERANCE),
                         outcomes or "none ended", verdicts(rig, case)])
        return rows

    def chapter(self, rig: Rig) -> list[str]:
        rate = (f"wrk -R over {rig.args.rate_connections} connections" if rig.wrk_rate_flag
                else f"stock wrk with the shadow matrix's Lua delay(): each connection waits "
                f"{HTTP_DELAY_MS} ms before each request, and short runs "
                f"({PROBE_SECONDS:g} s) bisect the number of connections over "
                f"1..{HTTP_MAX_CONNECTIONS} for the req/s nearest {SHARE:.0%} of that run's "
                "saturation (delay() takes whole ms, so the connection count is the fine "
                "setting; a closed loop: the achieved share is shown)")
        return ["", "## A/A: identical production and shadow", "",
                "Production and shadow are the same program with the same configuration: "
                "two nginx instances (`/small`, a 100-byte answer, keep-alive) behind a "
                "`protocol = http` route, and two fresh redis-servers (`--save \"\" "
                "--appendonly no`) behind a `protocol = redis` route. Every case of every "
                "run gets a fresh gproxyd with its admin endpoint; `GET /stats` is read "
                "once its shadow connections have all ended (at most "
                f"{SETTLE_SECONDS:g} s). p50/p99 are gproxyd's own (routes.{ROUTE}."
                f"production and routes.{ROUTE}.shadows.ADDRESS latency_ms), in ms; the "
                "ratios are the median of each run's shadow/production ratio, \"within\" "
                f"is that median against ±{P50_TOLERANCE:.0%} (p50) and "
                f"±{P99_TOLERANCE:.0%} (p99), with how many runs were within on their own; "
                "outcomes are medians of how shadow connections ended; the verdict is "
                "`gproxyd.report.verdict()` of the gproxyd being measured, per run.", "",
                f"Near saturation: each run first measures the route's saturation, closed "
                f"loop at -c{SATURATION_CONNECTIONS} (wrk GETs; redis-benchmark), then "
                f"offers {SHARE:.0%} of it. HTTP: a fixed rate by {rate}. redis-benchmark "
                "has no rate option, so the load is set by its connection count: short "
                f"runs ({PROBE_SECONDS:g} s) bisect -c over 1..{SATURATION_CONNECTIONS} "
                f"for the req/s nearest {SHARE:.0%} of that run's saturation, and the "
                "measured run uses it (a closed loop; the achieved share is shown, and "
                "-c1 may already be above it). redis-benchmark runs -t set,get, one "
                "gproxyd for both tests; it counts requests, not seconds, so -n is sized "
                "from the req/s seen before to last about --duration. Requests also "
                "count redis-benchmark's CONFIG GET at start-up.", "",
                markdown_table(self.table(rig))]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(self.table(rig))]


def redis_benchmark(port: int, pipeline: int, clients: int, requests: int,
                    cpus: set[int] | None, timeout: float) -> dict[str, float]:
    """One `redis-benchmark -t set,get --csv` against 127.0.0.1:PORT: req/s over both
    tests, and the seconds they took (by its own count)."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
            "-P", str(pipeline), "-c", str(clients), "-n", str(requests), "--csv"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, preexec_fn=child_setup(cpus))
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark did not finish within {timeout:.0f} s") from None
    rows = list(csv.DictReader(line for line in done.stdout.splitlines()
                               if line.startswith('"')))
    try:
        seconds = sum(requests / float(row["rps"]) for row in rows)
    except (KeyError, ValueError, ZeroDivisionError):
        seconds = 0.0
    if done.returncode != 0 or len(rows) != 2 or not seconds:
        raise BenchError(f"redis-benchmark failed (exit {done.returncode}): {last_line(done)}")
    return {"rps": 2 * requests / seconds, "seconds": seconds}


def settled_route(admin: int, target: Target) -> dict:
    """routes.aa of GET /stats once no client connection is open and every shadow
    connection has ended (bounded by SETTLE_SECONDS; then as it is, and said)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                        timeout=5) as response:
                route = json.load(response)["routes"][ROUTE]
        except (OSError, ValueError, KeyError) as error:
            raise BenchError(f"GET /stats: {error}: {log_tail(target.log)}") from None
        shadow = only_shadow(route)
        ended = sum(shadow["outcomes"].values())
        if route["connections"]["active"] == 0 and ended >= shadow["mirrored"]:
            return route
        if time.monotonic() > deadline:
            raise BenchError(f"/stats not settled after {SETTLE_SECONDS:g} s: "
                             f"{route['connections']['active']} connections open, "
                             f"{ended} of {shadow['mirrored']} shadow connections ended")
        time.sleep(0.2)


def only_shadow(route: dict) -> dict:
    if len(route["shadows"]) != 1:
        raise BenchError(f"expected one shadow in /stats, got {sorted(route['shadows'])}")
    return next(iter(route["shadows"].values()))


def compare(rig: Rig, route: dict) -> dict[str, Any]:
    """Production against the shadow, from one /stats route."""
    production, shadow = route["production"], only_shadow(route)
    values: dict[str, Any] = {"prod_requests": production["requests"],
                              "shadow_requests": shadow["requests"],
                              "prod_errors": production["errors"],
                              "shadow_errors": shadow["errors"]}
    for side, numbers in (("prod", production), ("shadow", shadow)):
        for share in ("p50", "p99"):
            values[f"{side}_{share}"] = numbers["latency_ms"][share]
    for share in ("p50", "p99"):
        if values[f"prod_{share}"]:
            values[f"{share}_ratio"] = values[f"shadow_{share}"] / values[f"prod_{share}"]
    values.update({f"outcome_{outcome}": count
                   for outcome, count in shadow["outcomes"].items()})
    values["verdict"] = verdict(rig, production, shadow)
    return values


def verdict(rig: Rig, production: dict, shadow: dict) -> str:
    """gproxyd.report.verdict() of the gproxyd source being measured."""
    source = rig.gproxyd_source
    try:
        done = subprocess.run([sys.executable, "-c", VERDICT], capture_output=True, text=True,
                              input=json.dumps({"production": production, "shadow": shadow}),
                              timeout=30, cwd=source, env=gproxyd_env(source))
    except subprocess.TimeoutExpired:
        return "n/a: gproxyd.report.verdict() did not finish within 30 s"
    if done.returncode != 0:
        return f"n/a: gproxyd.report.verdict(): {last_line(done)}"
    return done.stdout.strip()


def runs_of(rig: Rig, case: Case) -> list[dict[str, Any]]:
    return [item["values"] for item in rig.raw
            if item.get("section") == "aa" and item["target"] == case.name
            and "values" in item]


def load_words(rig: Rig, case: Case) -> str:
    rps = fmt(rig.median(case.name, "aa.rps"), 0)
    share = rig.median(case.name, "aa.share")
    of_saturation = f" ({share:.0%} of saturation)" if share is not None else ""
    tool = "wrk" if case.protocol == "http" else "redis-benchmark"
    if case.load == "light":
        return f"{tool} -c1: {rps} req/s"
    if case.load == "saturation":
        return f"{tool} -c{SATURATION_CONNECTIONS}: {rps} req/s"
    if case.protocol == "http" and rig.wrk_rate_flag:
        return (f"wrk -R {fmt(rig.median(case.name, 'aa.offered'), 0)}: "
                f"{rps} req/s{of_saturation}")
    clients = "/".join(str(values["connections"]) for values in runs_of(rig, case))
    if case.protocol == "http":
        return (f"wrk -c {clients}, {HTTP_DELAY_MS} ms delay(): "
                f"{rps} req/s{of_saturation}")
    return f"redis-benchmark -c {clients}: {rps} req/s{of_saturation}"


def within(rig: Rig, case: Case, share: str, tolerance: float) -> str:
    ratios = rig.samples.get((case.name, f"aa.{share}_ratio"), [])
    median = rig.median(case.name, f"aa.{share}_ratio")
    if median is None:
        return "n/a"
    runs = sum(abs(value - 1) <= tolerance for value in ratios)
    return f"{'yes' if abs(median - 1) <= tolerance else 'NO'} ({runs}/{len(ratios)})"


def verdicts(rig: Rig, case: Case) -> str:
    counts = Counter(values["verdict"] for values in runs_of(rig, case))
    return " ".join(f"[{count}x] {sentence}" for sentence, count in counts.most_common())


SECTION = AA()
