"""cost: what mirroring and observing cost per request (#19 item 2), this tree against an
earlier commit in the same interleaved runs.

One gproxyd per source (the measured one, and the commit named by BENCH_BEFORE, exported
with `git archive`), each with the same routes: plain tcp to nginx, a healthy shadow
(the second nginx), protocol = http, protocol = http with the healthy shadow, tcp to a
redis-server and protocol = redis to it. Every load runs against every route of both in
turn, round after round, so the machine's drifts hit before and after alike. Proxy CPU
per request is utime+stime of that gproxyd over the load (the other routes are idle),
divided by the requests the load completed.

Loads: `wrk -c50` GET /small; redis-benchmark -c50 `-t set,get` with -P 1 and -P 16,
and `LRANGE mylist 0 99` (-P 1) on a list of 100 three-byte elements written first.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time

from .. import BenchError
from ..configs import gproxyd_conf
from ..processes import child_setup, last_line, wait_listening
from ..procfs import free_port, tree_cpu_times
from ..rig import Rig
from ..section import Section, per
from ..source import export_revision, start_gproxyd
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target

# The routes of each gproxyd: wrk's, and redis-benchmark's.
HTTP_ROUTES = ("tcp", "shadow", "http", "http+shadow")
REDIS_ROUTES = ("redis-tcp", "redis")
LABELS = {"tcp": "plain tcp route", "shadow": "healthy shadow", "http": "protocol = http",
          "http+shadow": "protocol = http, healthy shadow", "redis-tcp": "tcp route to redis",
          "redis": "protocol = redis"}
# redis loads: name -> (redis-benchmark arguments, commands per -n)
REDIS_LOADS = {"p1": (["-t", "set,get", "-P", "1"], 2),
               "p16": (["-t", "set,get", "-P", "16"], 2),
               "lrange": (["-P", "1", "LRANGE", "mylist", "0", "99"], 1)}
REDIS_REQUESTS = {"p1": 60_000, "p16": 400_000, "lrange": 30_000}  # per -n, --duration 10
CLIENTS = 50


class Cost(Section):
    name = "cost"
    summary = ("#19 item 2: proxy CPU per request of tcp, healthy-shadow, http and redis "
               "routes, this tree against BENCH_BEFORE=REV in the same interleaved runs")
    backends = ("healthy",)

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.redis_port = 0
        self.error = ""

    def prepare(self, rig: Rig) -> None:
        self.sources = {"after": rig.gproxyd_source}
        before = os.environ.get("BENCH_BEFORE", "")
        if before:
            self.sources = {"before": export_revision(before, os.path.join(rig.workdir,
                                                                            "before")),
                            "after": rig.gproxyd_source}
            rig.notes.append(f"cost: before = commit {before} (BENCH_BEFORE)")

    def run(self, rig: Rig) -> None:
        self.error = self.start_redis(rig)
        for source in self.sources:
            self.start_gproxyd(rig, source)
        for route in HTTP_ROUTES:  # warm up: one wrk second each
            for source in self.sources:
                target = rig.targets[f"{source}:{route}"]
                if not target.error:
                    try:
                        rig.wrk.run(target, "/small", 10, 1, rig.wrk.script())
                    except BenchError as error:
                        rig.failed(target, "cost warm-up", error)
        rig.interleaved("cost-small", [f"{s}:{r}" for r in HTTP_ROUTES for s in self.sources],
                        lambda target: self.measure_http(rig, target))
        if self.error:
            rig.notes.append(f"cost: redis rows n/a: {self.error}")
            return
        for load in REDIS_LOADS:
            rig.interleaved(f"cost-{load}",
                            [f"{s}:{r}" for r in REDIS_ROUTES for s in self.sources],
                            lambda target, load=load: self.measure_redis(rig, target, load))

    # -- processes

    def start_redis(self, rig: Rig) -> str:
        missing = [tool for tool in ("redis-server", "redis-benchmark", "redis-cli")
                   if not shutil.which(tool)]
        if missing:
            return f"{', '.join(missing)} not found (apt-get install redis-server redis-tools)"
        directory = os.path.join(rig.workdir, "cost-redis")
        os.makedirs(directory)
        self.redis_port = free_port()
        proc, log = rig.procs.start(
            "cost-redis", ["redis-server", "--bind", "127.0.0.1", "--port",
                           str(self.redis_port), "--save", "", "--appendonly", "no",
                           "--daemonize", "no", "--dir", directory, "--logfile", ""],
            cpus=rig.load_cpus)
        wait_listening([self.redis_port], proc, log)
        fill = subprocess.run(["redis-cli", "-p", str(self.redis_port), "RPUSH", "mylist",
                               *(["xxx"] * 100)], capture_output=True, text=True, timeout=30)
        if fill.returncode != 0:
            return f"redis-cli RPUSH failed: {last_line(fill)}"
        return ""

    def start_gproxyd(self, rig: Rig, source: str) -> None:
        ports = {route: free_port() for route in (*HTTP_ROUTES, *REDIS_ROUTES)}
        shadow = f"shadow = 127.0.0.1:{rig.shadow_nginx_port}"
        lines = {"tcp": (), "shadow": (shadow,), "http": ("protocol = http",),
                 "http+shadow": (shadow, "protocol = http"), "redis-tcp": (),
                 "redis": ("protocol = redis",)}
        routes = [(route.replace("+", "-"), ports[route],
                   self.redis_port if route.startswith("redis") else rig.nginx_port,
                   lines[route])
                  for route in ports if self.redis_port or not route.startswith("redis")]
        conf = os.path.join(rig.workdir, f"cost-{source}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(("drain-timeout = 1s",), routes))
        code = self.sources[source]
        targets = [Target(f"{source}:{route}", f"gproxyd ({source}), {LABELS[route]}",
                          http_port=ports[route]) for route in ports]
        try:
            proc, log = start_gproxyd(rig, f"cost-{source}", conf, code,
                                      [port for _, port, _, _ in routes])
        except BenchError as error:
            for target in targets:
                target.error = f"gproxyd ({source}): {error}"
        else:
            for target in targets:
                target.proc, target.log = proc, log
        for target in targets:
            rig.targets[target.name] = target

    # -- measuring

    def measure_http(self, rig: Rig, target: Target) -> dict[str, float]:
        result = rig.wrk.run(target, "/small", CLIENTS, rig.args.duration, rig.wrk.script())
        return {"rps": result.rps, "cpu_us": per(result.cpu_seconds, result.requests),
                "cpu_user_us": per(result.cpu_user_seconds, result.requests),
                "errors": result.errors}

    def measure_redis(self, rig: Rig, target: Target, load: str) -> dict[str, float]:
        arguments, commands = REDIS_LOADS[load]
        requests = max(1000, int(REDIS_REQUESTS[load] * rig.args.duration / 10))
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(target.http_port),
                "-c", str(CLIENTS), "-n", str(requests), "--csv", *arguments]
        user, system = tree_cpu_times(target.pid)
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=rig.args.duration * 10 + 60,
                                  stdin=subprocess.DEVNULL,
                                  preexec_fn=child_setup(rig.load_cpus))
        except subprocess.TimeoutExpired:
            raise BenchError("redis-benchmark did not finish in time") from None
        seconds = time.monotonic() - started
        user_after, system_after = tree_cpu_times(target.pid)
        rows = list(csv.DictReader(line for line in done.stdout.splitlines()
                                   if line.startswith('"')))
        if done.returncode != 0 or len(rows) != commands:
            raise BenchError(f"redis-benchmark failed (exit {done.returncode}): "
                             f"{last_line(done)}")
        count = requests * commands
        cpu = user_after - user + system_after - system
        return {"rps": count / seconds, "cpu_us": per(cpu, count),
                "cpu_user_us": per(user_after - user, count)}

    # -- the report

    def table(self, rig: Rig) -> list[list[str]]:
        sources = list(self.sources)
        head = ["metric (median)"]
        for source in sources:
            head += [source, f"{source}: ratio"]
        rows = [head]

        def value(source: str, route: str, metric: str) -> float | None:
            return rig.median(f"{source}:{route}", metric)

        def add(label: str, measurement: str, route: str, base: str, digits: int = 1,
                metric: str = "cpu_us") -> None:
            row = [label]
            for source in sources:
                mine = value(source, route, f"{measurement}.{metric}")
                row += [fmt(mine, digits),
                        ratio(mine, value(source, base, f"{measurement}.{metric}"))
                        if route != base else ""]
            rows.append(row)

        for route in HTTP_ROUTES:
            add(f"wrk -c50 /small, {LABELS[route]}: CPU us/req (ratio: / tcp)", "cost-small",
                route, "tcp")
            add("...of which user space", "cost-small", route, "tcp", metric="cpu_user_us")
            add("...req/s", "cost-small", route, "tcp", 0, "rps")
        row = ["Python (user) time a shadow adds per mirrored request, us"]
        for source in sources:
            shadow = value(source, "shadow", "cost-small.cpu_user_us")
            tcp = value(source, "tcp", "cost-small.cpu_user_us")
            row += [fmt(shadow - tcp if shadow is not None and tcp is not None else None, 1),
                    ""]
        rows.append(row)
        for load, label in (("p1", "redis-benchmark -c50 -P1 SET/GET"),
                            ("p16", "redis-benchmark -c50 -P16 SET/GET"),
                            ("lrange", "redis-benchmark -c50 LRANGE mylist 0 99")):
            for route in REDIS_ROUTES:
                add(f"{label}, {LABELS[route]}: CPU us/command (ratio: / tcp)",
                    f"cost-{load}", route, "redis-tcp", 2)
                add("...of which user space", f"cost-{load}", route, "redis-tcp", 2,
                    "cpu_user_us")
        return rows

    def chapter(self, rig: Rig) -> list[str]:
        return ["", "## Cost of mirroring and observing (#19 item 2)", "",
                (__doc__ or "").split("\n\n", 1)[1].replace("\n", " ").strip(), "",
                markdown_table(self.table(rig))]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(self.table(rig))]


SECTION = Cost()
