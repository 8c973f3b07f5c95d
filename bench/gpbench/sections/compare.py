"""compare: what answer comparison costs gproxyd. CPU per request with compare = off,
status and body (~1.6 KiB JSON answers, one identical shadow, a fixed rate), and its
memory bound: RSS over thousands of 5 MiB exchanges through a comparing route."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any, Callable

from .. import BenchError
from ..configs import gproxyd_conf
from ..processes import log_tail, wait_listening
from ..procfs import free_port, process_tree, tree_cpu_times
from ..rig import Rig
from ..section import Section, per
from ..source import check_config, gproxyd_env
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target

ROUTE = "compare"
MODES = ("off", "status", "body")      # compare = ..., in the order they run
MEMORY_MODES = ("off", "body")
JSON_PATH = "/answer.json"
BIG_PATH = "/5m"
BIG_SIZE = 5 << 20
MEMORY_EXCHANGES = 10_000              # per memory run; --quick: QUICK_EXCHANGES
QUICK_EXCHANGES = 2_000
CHECKPOINT_SHARE = 0.2                 # RSS is also read after this share (2,000 of 10,000)
MEMORY_CONNECTIONS = 4
# The memory runs take minutes each (gproxyd hashes every 5 MiB answer of both sides),
# so each mode runs once; the CPU runs take --runs.
MEMORY_RUNS = 1
SETTLE_SECONDS = 15.0                  # shadow-linger (5 s) and then some
# RSS growth from the checkpoint to the end of the exchanges above which the report
# says the memory grows with the exchanges (a leak of 512 bytes each would pass it).
GROWTH_LIMIT_KIB = 4096

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = {json_path} {{ default_type application/json; }}
        location = {big_path} {{ default_type application/octet-stream; }}
    }}
}}
"""


def json_document() -> bytes:
    """A deterministic ~1.6 KiB JSON answer, a page of a catalogue: nested objects and
    lists, so that diff.compare walks a tree rather than comparing bytes."""
    items = [{"id": i, "name": f"item {i}", "price": 10 + i, "tags": ["a", "b", "c"],
              "stock": {"warehouse": "north", "count": i * 7}} for i in range(14)]
    return json.dumps({"page": 1, "per_page": 14, "total": 14, "items": items}).encode()


def memory_exchanges(rig: Rig) -> int:
    return QUICK_EXCHANGES if rig.args.quick else MEMORY_EXCHANGES


def tree_status_kib(pid: int, key: str) -> int:
    """KEY ("VmRSS", "VmHWM") of /proc/PID/status summed over the process tree, KiB."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def download(port: int, path: str, connections: int, count: int, timeout: float,
             watch: Callable[[int], None]) -> float:
    """COUNT keep-alive GETs of PATH over CONNECTIONS connections to 127.0.0.1:PORT,
    one thread per connection, each answer read into a reused buffer and dropped.
    WATCH(exchanges done) is called from this thread every 50 ms while they run.
    Returns the seconds they took; raises BenchError when one fails, or when all have
    not finished within TIMEOUT seconds (the sockets are then shut down)."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    lock = threading.Lock()
    state = {"taken": 0, "done": 0}
    errors: list[str] = []
    socks: list[socket.socket] = []

    def exchange(sock: socket.socket, buffer: bytearray) -> None:
        sock.sendall(request)
        head = bytearray()
        while b"\r\n\r\n" not in head:
            received = sock.recv_into(buffer)
            if not received:
                raise ConnectionError("closed before the answer's head")
            head += buffer[:received]
        head, _, body = bytes(head).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 200 "):
            raise ConnectionError(f"answer {lines[0][:80]!r}")
        lengths = [line.split(b":", 1)[1] for line in lines[1:]
                   if line.lower().startswith(b"content-length:")]
        if len(lengths) != 1:
            raise ConnectionError("answer without one Content-Length")
        left = int(lengths[0]) - len(body)
        while left > 0:
            received = sock.recv_into(buffer, min(left, len(buffer)))
            if not received:
                raise ConnectionError(f"closed with {left} bytes of the body unread")
            left -= received

    def client(sock: socket.socket) -> None:
        buffer = bytearray(1 << 20)
        try:
            while not errors:
                with lock:
                    if state["taken"] >= count:
                        return
                    state["taken"] += 1
                exchange(sock, buffer)
                with lock:
                    state["done"] += 1
        except (OSError, ValueError) as error:
            errors.append(f"exchange {state['done'] + 1}: {error}")

    started = time.monotonic()
    try:
        try:
            for _ in range(connections):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        except OSError as error:
            raise BenchError(f"cannot connect to 127.0.0.1:{port}: {error}") from None
        threads = [threading.Thread(target=client, args=(sock,), daemon=True)
                   for sock in socks]
        for thread in threads:
            thread.start()
        deadline = started + timeout
        while any(thread.is_alive() for thread in threads):
            watch(state["done"])
            if time.monotonic() > deadline:
                errors.append(f"{state['done']} of {count} exchanges done after "
                              f"{timeout:.0f} s")
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
    finally:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            sock.close()
    if errors:
        raise BenchError(errors[0])
    watch(state["done"])
    return seconds


class Compare(Section):
    name = "compare"
    summary = ("answer comparison: gproxyd CPU/req with compare = off, status, body "
               "(~1.6 KiB JSON, one identical shadow, fixed rate; /stats A/A check), and "
               "RSS over 10,000 5 MiB exchanges, compare = body vs off")

    def prepare(self, rig: Rig) -> None:
        self.ports: tuple[int, int] = (0, 0)   # production's and the shadow's nginx
        self.admins: dict[str, int] = {}       # target -> its admin port

    def run(self, rig: Rig) -> None:
        error = self.start_nginx(rig)
        cpu = [f"compare-{mode}" for mode in MODES]
        memory = [f"compare-mem-{mode}" for mode in MEMORY_MODES]
        for name in cpu + memory:
            mode = name.rsplit("-", 1)[1]
            path = JSON_PATH if name in cpu else BIG_PATH
            rig.targets[name] = Target(name, f"gproxyd, protocol = http, compare = {mode}, "
                                             f"shadow = a second identical nginx ({path})")
            rig.targets[name].error = error
        # The CPU runs share one gproxyd per mode, warmed up once; the memory runs get a
        # fresh one each, so that its VmHWM is that run's peak.
        for name in cpu:
            self.start_persistent(rig, rig.targets[name])
        try:
            rig.interleaved("compare-cpu", cpu, lambda target: self.measure_cpu(rig, target))
        finally:
            for name in cpu:
                if rig.targets[name].proc:
                    rig.procs.stop(rig.targets[name].proc)
        rig.interleaved("compare-memory", memory,
                        lambda target: self.measure_memory(rig, target), MEMORY_RUNS)

    # -- the backends and the proxies

    def start_nginx(self, rig: Rig) -> str:
        """Production and its identical shadow: two nginx serving the same two files.
        Returns '' or why they cannot run."""
        www = os.path.join(rig.workdir, "compare-www")
        os.makedirs(www)
        with open(os.path.join(www, JSON_PATH.lstrip("/")), "wb") as handle:
            handle.write(json_document())
        with open(os.path.join(www, BIG_PATH.lstrip("/")), "wb") as handle:
            handle.write(os.urandom(BIG_SIZE))
        ports = []
        for name in ("compare-nginx", "compare-nginx-shadow"):
            prefix = os.path.join(rig.workdir, name)
            os.makedirs(prefix)
            port = free_port()
            conf = os.path.join(prefix, "nginx.conf")
            with open(conf, "w") as handle:
                handle.write(NGINX_CONF.format(prefix=prefix, port=port, www=www,
                                               json_path=JSON_PATH, big_path=BIG_PATH))
            try:
                proc, log = rig.procs.start(
                    name, ["nginx", "-p", prefix, "-c", conf,
                           "-e", os.path.join(prefix, "error.log")], cpus=rig.load_cpus)
                wait_listening([port], proc, log)
            except (BenchError, OSError) as error:
                return f"{name}: {error}"
            ports.append(port)
        self.ports = (ports[0], ports[1])
        return ""

    def start_gproxyd(self, rig: Rig, target: Target) -> None:
        """A gproxyd of its own for TARGET (target.proc, until the caller stops it): one
        http route to production with the identical shadow, compare = the target's
        mode, its admin endpoint in self.admins. A port taken by another job between
        free_port() and the bind costs another try."""
        for attempt in range(3):
            try:
                self._start_gproxyd(rig, target)
                return
            except BenchError as error:
                if target.proc:
                    rig.procs.stop(target.proc)
                    target.proc = None
                if "in use" not in str(error) or attempt == 2:
                    raise

    def _start_gproxyd(self, rig: Rig, target: Target) -> None:
        mode = target.name.rsplit("-", 1)[1]
        target.http_port, admin = free_port(), free_port()
        conf = os.path.join(rig.workdir, f"{target.name}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(
                ("drain-timeout = 1s",),
                [(ROUTE, target.http_port, self.ports[0],
                  (f"shadow = 127.0.0.1:{self.ports[1]}", "protocol = http",
                   f"compare = {mode}"))],
                admin=f"127.0.0.1:{admin}"))
        source = rig.gproxyd_source
        check_config(conf, source)
        target.proc, target.log = rig.procs.start(
            target.name, [sys.executable, "-m", "gproxyd", "-c", conf], cpus=rig.proxy_cpus,
            env=gproxyd_env(source), cwd=source)
        wait_listening([target.http_port, admin], target.proc, target.log)
        self.admins[target.name] = admin

    def start_persistent(self, rig: Rig, target: Target) -> None:
        """Start TARGET's gproxyd for all the CPU runs and warm it up (1 s at the fixed
        rate); a failure marks the target n/a."""
        if target.error:
            return
        try:
            self.start_gproxyd(rig, target)
            script, rate = self.fixed_load(rig)
            rig.wrk.run(target, JSON_PATH, rig.args.rate_connections, 1, script, rate=rate)
            settled_route(self.admins[target.name], target)
        except BenchError as error:
            target.error = str(error)
            print(f"{target.name}: n/a: {error}", file=sys.stderr)

    # -- measuring

    def fixed_load(self, rig: Rig) -> tuple[str, int]:
        """The wrk script and -R of the fixed rate: the shadow matrix's (--rate over
        --rate-connections; stock wrk: a Lua delay() before each request)."""
        if rig.wrk_rate_flag:
            return rig.wrk.script(), rig.args.rate
        return rig.wrk.script("GET", 0, delay_ms(rig)), 0

    def measure_cpu(self, rig: Rig, target: Target) -> dict[str, Any]:
        admin = self.admins[target.name]
        before = shadow_counts(settled_route(admin, target))
        script, rate = self.fixed_load(rig)
        result = rig.wrk.run(target, JSON_PATH, rig.args.rate_connections,
                             rig.args.duration, script, rate=rate)
        after = shadow_counts(settled_route(admin, target))
        return {"rps": result.rps, "requests": result.requests, "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms, "errors": result.errors,
                "cpu_us": per(result.cpu_seconds, result.requests),
                "cpu_user_us": per(result.cpu_user_seconds, result.requests),
                **{key: after[key] - before[key] for key in after}}

    def measure_memory(self, rig: Rig, target: Target) -> dict[str, Any]:
        count = memory_exchanges(rig)
        checkpoint = round(count * CHECKPOINT_SHARE)
        values: dict[str, Any] = {"exchanges": count}
        try:
            self.start_gproxyd(rig, target)
            pid = target.pid
            admin = self.admins[target.name]
            values["rss_start_kib"] = tree_status_kib(pid, "VmRSS")
            series: list[int] = []
            next_sample = time.monotonic()

            def watch(done: int) -> None:
                nonlocal next_sample
                now = time.monotonic()
                if now >= next_sample:
                    series.append(tree_status_kib(pid, "VmRSS"))
                    next_sample = now + 1.0
                if done >= checkpoint and "rss_checkpoint_kib" not in values:
                    values["checkpoint"] = done
                    values["rss_checkpoint_kib"] = tree_status_kib(pid, "VmRSS")
                    values["hwm_checkpoint_kib"] = tree_status_kib(pid, "VmHWM")

            cpu_before = sum(tree_cpu_times(pid))
            # Bounded generously: on two loaded CPUs compare = body has done ~35 a second.
            seconds = download(target.http_port, BIG_PATH, MEMORY_CONNECTIONS, count,
                               60 + count, watch)
            cpu_seconds = sum(tree_cpu_times(pid)) - cpu_before
            values.update(seconds=seconds, cpu_ms=cpu_seconds * 1000 / count,
                          rss_kib=tree_status_kib(pid, "VmRSS"),
                          hwm_kib=tree_status_kib(pid, "VmHWM"),
                          rss_samples_kib=series)
            values.update(shadow_counts(settled_route(admin, target)))
            values["rss_end_kib"] = tree_status_kib(pid, "VmRSS")
        finally:
            if target.proc:
                rig.procs.stop(target.proc)
                target.proc = None
        values["rss_growth_kib"] = values["rss_kib"] - values["rss_checkpoint_kib"]
        values["hwm_growth_kib"] = values["hwm_kib"] - values["hwm_checkpoint_kib"]
        return values

    # -- the report

    def cpu_table(self, rig: Rig) -> list[list[str]]:
        names = [f"compare-{mode}" for mode in MODES]
        rows = [["metric (median), ~1.6 KiB JSON GETs"]
                + [f"compare = {mode}" for mode in MODES] + ["status/off", "body/off"]]
        for metric, label, digits, ratios in (
                ("rps", "achieved req/s", 0, False),
                ("p50_ms", "p50 ms", 3, True),
                ("p99_ms", "p99 ms", 3, True),
                ("errors", "wrk errors", 0, False),
                ("cpu_us", "gproxyd CPU us/req", 1, True),
                ("cpu_user_us", "...of which user space", 1, True),
                ("prod_requests", "/stats: production requests", 0, False),
                ("compared", "/stats: compared", 0, False),
                ("mismatches", "/stats: mismatches", 0, False),
                ("noise", "/stats: noise", 0, False),
                ("uncompared", "/stats: uncompared", 0, False),
                ("parser_fallbacks", "/stats: parser fallbacks", 0, False)):
            values = [rig.median(name, f"compare-cpu.{metric}") for name in names]
            rows.append([label] + [fmt(v, digits) for v in values]
                        + ([ratio(values[1], values[0]), ratio(values[2], values[0])]
                           if ratios else ["", ""]))
            if metric == "cpu_us":  # how far apart the runs were: the noise
                spreads = [rig.samples.get((name, "compare-cpu.cpu_us"), []) for name in names]
                rows.append(["...lowest-highest run"]
                            + [f"{min(runs):.1f}-{max(runs):.1f}" if runs else "n/a"
                               for runs in spreads] + ["", ""])
        return rows

    def cpu_lines(self, rig: Rig) -> list[str]:
        off = rig.median("compare-off", "compare-cpu.cpu_us")
        off_runs = rig.samples.get(("compare-off", "compare-cpu.cpu_us"), [])
        lines = []
        for mode in ("status", "body"):
            value = rig.median(f"compare-{mode}", "compare-cpu.cpu_us")
            if not value or off is None:
                continue
            # Each interleaved round on its own too, as a measure of the noise (when a
            # run failed the rounds no longer line up, and this part is left out).
            runs = rig.samples.get((f"compare-{mode}", "compare-cpu.cpu_us"), [])
            shares = [f"{(mine - theirs) / mine:.0%}"
                      for mine, theirs in zip(runs, off_runs, strict=True)
                      ] if len(runs) == len(off_runs) == rig.args.runs else []
            rounds = f" (per run: {', '.join(shares)})" if shares else ""
            lines.append(f"compare = {mode}: comparison's share of the proxy's CPU "
                         f"(cpu_{mode} - cpu_off) / cpu_{mode} = "
                         f"{(value - off) / value:.1%} ({value - off:+.1f} us/req){rounds}")
        lines += aa_check(rig, "compare-body", "compare-cpu", "CPU runs")
        return lines

    def memory_table(self, rig: Rig) -> list[list[str]]:
        names = [f"compare-mem-{mode}" for mode in MEMORY_MODES]
        count = memory_exchanges(rig)
        checkpoint = round(count * CHECKPOINT_SHARE)
        rows = [[f"5 MiB answers, {MEMORY_CONNECTIONS} keep-alive connections"]
                + [f"compare = {mode}" for mode in MEMORY_MODES] + ["body/off"]]
        for metric, label, digits, ratios in (
                ("exchanges", "exchanges", 0, False),
                ("seconds", "seconds for them", 1, True),
                ("cpu_ms", "gproxyd CPU ms/exchange", 2, True),
                ("rss_start_kib", "RSS before, MiB", 1, False),
                ("rss_checkpoint_kib", f"RSS after ~{checkpoint:,}, MiB", 1, False),
                ("hwm_checkpoint_kib", f"VmHWM after ~{checkpoint:,}, MiB", 1, False),
                ("rss_kib", f"RSS after {count:,}, MiB", 1, False),
                ("hwm_kib", f"VmHWM (peak) after {count:,}, MiB", 1, False),
                ("rss_growth_kib", f"RSS growth ~{checkpoint:,} -> {count:,}, MiB", 1, False),
                ("hwm_growth_kib", f"VmHWM growth ~{checkpoint:,} -> {count:,}, MiB", 1,
                 False),
                ("rss_end_kib", "RSS at the end (connections closed), MiB", 1, False),
                ("compared", "/stats: compared", 0, False),
                ("mismatches", "/stats: mismatches", 0, False),
                ("uncompared", "/stats: uncompared", 0, False)):
            values = [rig.median(name, f"compare-memory.{metric}") for name in names]
            if metric.endswith("_kib"):
                values = [v / 1024 if v is not None else None for v in values]
            rows.append([label] + [fmt(v, digits) for v in values]
                        + [ratio(values[1], values[0]) if ratios else ""])
        return rows

    def memory_lines(self, rig: Rig) -> list[str]:
        lines = []
        for mode in MEMORY_MODES:
            name = f"compare-mem-{mode}"
            growth = rig.median(name, "compare-memory.rss_growth_kib")
            peak = rig.median(name, "compare-memory.hwm_growth_kib")
            if growth is None or peak is None:
                lines.append(f"compare = {mode}: n/a")
                continue
            bounded = max(growth, peak) <= GROWTH_LIMIT_KIB
            lines.append(f"compare = {mode}: RSS {growth / 1024:+.1f} MiB, VmHWM "
                         f"{peak / 1024:+.1f} MiB from the checkpoint to the end: "
                         + ("bounded" if bounded else
                            f"GROWS (more than {GROWTH_LIMIT_KIB // 1024} MiB)"))
            for item in rig.raw:
                if item.get("target") == name and "values" in item:
                    samples = item["values"].get("rss_samples_kib", [])
                    every = max(1, len(samples) // 12)
                    lines.append(f"  RSS MiB every {every} s: " + ", ".join(
                        f"{kib / 1024:.0f}" for kib in samples[::every]))
        lines += aa_check(rig, "compare-mem-body", "compare-memory", "memory runs")
        return lines

    def chapter(self, rig: Rig) -> list[str]:
        count = memory_exchanges(rig)
        rate = (f"wrk -R {rig.args.rate} over {rig.args.rate_connections} connections"
                if rig.wrk_rate_flag else
                f"stock wrk, {rig.args.rate_connections} connections each waiting "
                f"{delay_ms(rig)} ms before each request (a closed loop: the achieved rate "
                "is shown)")
        return ["", "## Answer comparison", "",
                "One `protocol = http` route, production and one shadow: two nginx "
                "instances serving the same files, so every answer should compare equal "
                "(an A/A check of the comparison). Only `compare` changes: `off` (latencies "
                "are still paired), `status`, `body` (the default: status and body, JSON "
                "compared as a tree). Each gproxyd has its admin endpoint; the /stats "
                "counters are read once the shadow connections have ended.", "",
                f"CPU: GETs of a {len(json_document()):,}-byte JSON answer "
                f"(`application/json`) at a fixed rate, {rate}; {rig.args.runs} interleaved "
                f"runs of {rig.args.duration:g} s, one gproxyd per mode for all of them, "
                "warmed up by 1 s of the same load. CPU is utime+stime of the gproxyd "
                "process during the run over completed requests; the /stats rows count "
                "the run's requests only.", "",
                markdown_table(self.cpu_table(rig)), "",
                *[f"- {line}" for line in self.cpu_lines(rig)], "",
                f"Memory: {count:,} GETs of a {BIG_SIZE >> 20} MiB file over "
                f"{MEMORY_CONNECTIONS} keep-alive connections (a client in the benchmark "
                "that reads each answer into a reused buffer), production and shadow both "
                f"answering it, a fresh gproxyd per mode and run ({MEMORY_RUNS} run each: "
                "they take minutes). 5 MiB is over `compare-max-body` (1 MiB, the "
                "default), so each answer is kept as its head and first KiB and compared "
                "by length and BLAKE2b of the whole body. RSS (VmRSS) and the peak "
                f"(VmHWM) are read after {CHECKPOINT_SHARE:.0%} of the exchanges and at "
                "the end: the difference should be about nil when memory is bounded "
                f"(the report flags more than {GROWTH_LIMIT_KIB // 1024} MiB).", "",
                markdown_table(self.memory_table(rig)), "",
                *[f"- {line}" for line in self.memory_lines(rig)]]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(self.cpu_table(rig)), *self.cpu_lines(rig), "",
                text_table(self.memory_table(rig)), *self.memory_lines(rig)]


def delay_ms(rig: Rig) -> int:
    """What each connection waits before each request when wrk has no -R."""
    return max(1, round(rig.args.rate_connections * 1000 / rig.args.rate))


def settled_route(admin: int, target: Target) -> dict:
    """routes.compare of GET /stats once no client connection is open and every shadow
    connection has ended (bounded by SETTLE_SECONDS)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                        timeout=5) as response:
                route = json.load(response)["routes"][ROUTE]
            (shadow,) = route["shadows"].values()
        except (OSError, ValueError, KeyError) as error:
            raise BenchError(f"GET /stats: {error}: {log_tail(target.log)}") from None
        ended = sum(shadow["outcomes"].values())
        if route["connections"]["active"] == 0 and ended >= shadow["mirrored"]:
            return route
        if time.monotonic() > deadline:
            raise BenchError(f"/stats not settled after {SETTLE_SECONDS:g} s: "
                             f"{route['connections']['active']} connections open, "
                             f"{ended} of {shadow['mirrored']} shadow connections ended")
        time.sleep(0.1)


def shadow_counts(route: dict) -> dict[str, int]:
    """The comparison counters of the route's one shadow, and what production answered."""
    (shadow,) = route["shadows"].values()
    counts = {key: shadow[key] for key in ("compared", "mismatches", "noise", "uncompared",
                                           "requests")}
    counts["shadow_requests"] = counts.pop("requests")
    counts["prod_requests"] = route["production"]["requests"]
    counts["parser_fallbacks"] = route["parser_fallbacks"]
    return counts


def aa_check(rig: Rig, name: str, measurement: str, what: str) -> list[str]:
    """Identical backends: every run of NAME (compare = body) must have compared answers
    and found no mismatch; uncompared ones are reported too."""
    runs = [item["values"] for item in rig.raw
            if item.get("target") == name and item.get("section") == measurement
            and "values" in item]
    if not runs:
        return [f"A/A check ({what}, compare = body): n/a"]
    compared = [values["compared"] for values in runs]
    mismatches = [values["mismatches"] for values in runs]
    uncompared = [values["uncompared"] for values in runs]
    passed = all(c > 0 for c in compared) and not any(mismatches)
    line = (f"A/A check ({what}, compare = body, identical backends): compared "
            f"{'/'.join(map(str, compared))}, mismatches {'/'.join(map(str, mismatches))}, "
            f"uncompared {'/'.join(map(str, uncompared))} per run: "
            + ("ok" if passed else "FAILED (expected compared > 0 and no mismatch)"))
    if passed and any(uncompared):
        line += " (but some answers were not compared)"
    return [line]


SECTION = Compare()
