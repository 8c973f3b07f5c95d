"""admin: what a scrape loop on the admin endpoint costs the connections gproxyd relays.

One gproxyd with 13 `protocol = http` routes, each to nginx with a second nginx as its
shadow and a second of latency history in both histograms (wrk before the windows), a
plain tcp route to nginx for a paced load (wrk, a fixed delay before each request), and
a route whose hook (bench/loop_probe.py) reports the turns of the event loop that held
it. Windows in turn with nobody scraping, with one client scraping /metrics back to back
and with one scraping /stats back to back (rounds of the three, so that the machine's
drifts hit each alike); each window's latencies, loop turns and CPU are its own.

The scraper is this module run in a process of its own (raw socket, standard library
only); it writes what it measured to a JSON file when it is stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from .. import BENCH_DIR, BenchError
from ..configs import gproxyd_conf
from ..load import WRK_REPORT
from ..processes import log_tail, readline_bounded, wait_listening
from ..procfs import free_port
from ..rig import Rig
from ..section import Section
from ..source import check_config, gproxyd_env
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target

ROUTES = 13
CONNECTIONS = 20           # paced keep-alive connections through the tcp route, each
DELAY_MS = 10              # waiting 0 to 2x this long before each request: ~2000 req/s

HISTORY_SECONDS = 1.0      # wrk -c4 per http route first: histograms with history
SETTLE = 0.3               # between windows: the last one's scraper gone, lines flushed
# target -> the path scraped back to back in its windows ("": nobody scrapes), and
# whether on the gproxyd that relays the paced load or on the other one (the control: the
# same scraping on the same machine, the relaying process left alone)
CONDITIONS = {"admin-none": ("", False), "admin-metrics": ("/metrics", False),
              "admin-stats": ("/stats", False), "admin-elsewhere": ("/metrics", True)}
LABELS = {"admin-none": "no scraping", "admin-metrics": "/metrics loop",
          "admin-stats": "/stats loop", "admin-elsewhere": "/metrics loop, other gproxyd"}
PROBE_HOOK = os.path.join(BENCH_DIR, "loop_probe.py")
SMALL_REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"

SCRAPER = ("import sys\n"
           "from gpbench.sections.admin import scraper_main\n"
           "sys.exit(scraper_main(sys.argv[1:]))\n")


# -- the clients (run in processes of their own) -------------------------------------------

def _answer_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    raise ConnectionError(f"answer without Content-Length: {head[:80]!r}")


def scrape(port: int, path: str, out: str) -> None:
    """GET PATH back to back over one keep-alive connection until SIGTERM; prints
    "scraping" once the first answer is in. Writes to OUT {"answers": [[MONOTONIC_END,
    LATENCY_US, BYTES], ...], "cpu": its CPU seconds}."""
    stopped: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    request = f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode()
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not stopped:
            began = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the admin endpoint closed the scraping connection")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise BenchError(f"{path}: {head[:60]!r}")
            size = _answer_length(head)
            left = size - len(body)
            while left > 0:
                chunk = sock.recv(min(left, 1 << 20))
                if not chunk:
                    raise BenchError("the admin endpoint closed the scraping connection")
                left -= len(chunk)
            answers.append((time.monotonic(), (time.perf_counter() - began) * 1e6, size))
            if len(answers) == 1:
                print("scraping", flush=True)
    with open(out, "w") as handle:
        json.dump({"answers": answers, "cpu": time.process_time()}, handle)


def scraper_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="admin scraper")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    scrape(args.port, args.path, args.out)
    return 0


# -- reading what they measured ----------------------------------------------------------

def quantile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def runqueue_wait(pid: int) -> float:
    """Seconds PID's threads have spent runnable but waiting for a CPU (schedstat): on a
    busy machine, the part of a stall that is the scheduler's, not gproxyd's."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def lines_between(path: str, kind: str, started: float, ended: float
                  ) -> list[list[float]]:
    """The numbers of the lines of PATH that begin with KIND and whose next field
    (CLOCK_MONOTONIC seconds) is in the window."""
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.split("\n"):
        fields = line.split()
        if fields and fields[0] == kind and started <= float(fields[1]) <= ended:
            rows.append([float(field) for field in fields[1:]])
    return rows


# -- the section -----------------------------------------------------------------------------

class Admin(Section):
    name = "admin"
    summary = ("the admin endpoint under a scrape loop: proxied p50/p99 at a fixed rate "
               "with no scraping, a back-to-back /metrics loop and a /stats loop "
               "(13 http routes with a shadow and latency history), the longest loop turn")

    def prepare(self, rig: Rig) -> None:
        self.admin_port = self.other_admin_port = self.paced_port = 0
        self.probe_file = os.path.join(rig.workdir, "loop-probe.txt")
        # A random delay before each request, so that the connections do not send in step
        # (with a fixed one they send in bursts of 20, which queue behind each other).
        self.script = os.path.join(rig.workdir, "admin-paced.lua")
        with open(self.script, "w") as handle:
            handle.write(f"function delay() return math.random(0, {2 * DELAY_MS}) end\n"
                         + WRK_REPORT)
        self.proc: subprocess.Popen | None = None
        self.other: subprocess.Popen | None = None

    def run(self, rig: Rig) -> None:
        error = ""
        try:
            self.start(rig)
        except BenchError as failure:
            error = str(failure)
            print(f"admin: n/a: {error}", file=sys.stderr)
        for name in CONDITIONS:
            target = rig.targets[name] = Target(
                name, f"gproxyd, {ROUTES} http routes with a shadow each, admin endpoint; "
                      f"paced tcp route, {LABELS[name]}", http_port=self.paced_port)
            target.proc, target.error = self.proc, error
        try:
            rig.interleaved("admin", list(CONDITIONS), lambda target: self.measure(rig, target))
        finally:
            for proc in (self.proc, self.other):
                if proc:
                    rig.procs.stop(proc)

    def start(self, rig: Rig) -> None:
        """The shadows' nginx, the measured gproxyd (its probe started) and the other one."""
        shadow = rig.start_nginx("admin-nginx-shadow", os.path.join(rig.workdir, "www"))
        self.paced_port, probe_port = free_port(), free_port()
        self.proc, self.admin_port = self.start_gproxyd(
            rig, "gproxyd-admin", shadow,
            [("paced", self.paced_port, rig.nginx_port, ()),
             ("probe", probe_port, rig.nginx_port, (f"hooks = {PROBE_HOOK}",))])
        with socket.create_connection(("127.0.0.1", probe_port), timeout=5) as sock:
            sock.sendall(SMALL_REQUEST)  # its on_connect starts the probe
            if not sock.recv(4096).startswith(b"HTTP/1.1 200"):
                raise BenchError("the probe's route does not answer")
        self.other, self.other_admin_port = self.start_gproxyd(
            rig, "gproxyd-admin-other", shadow, [])

    def start_gproxyd(self, rig: Rig, name: str, shadow: int,
                      more: list[tuple[str, int, int, tuple[str, ...]]]
                      ) -> tuple[subprocess.Popen, int]:
        """A gproxyd with the http routes (each given history), the MORE routes and an
        admin endpoint; returns it and its admin port."""
        http_ports = [free_port() for _ in range(ROUTES)]
        admin = free_port()
        routes = [(f"r{index}", port, rig.nginx_port,
                   (f"shadow = 127.0.0.1:{shadow}", "protocol = http"))
                  for index, port in enumerate(http_ports)] + more
        conf = os.path.join(rig.workdir, f"{name}.conf")
        with open(conf, "w") as handle:
            # hook-timeout = 0: no watchdog thread (only the probe's route has a hook)
            handle.write(gproxyd_conf(("hook-timeout = 0",), routes,
                                      admin=f"127.0.0.1:{admin}"))
        source = rig.gproxyd_source
        check_config(conf, source)
        env = dict(gproxyd_env(source), BENCH_LOOP_PROBE=self.probe_file)
        proc, log = rig.procs.start(name, [sys.executable, "-m", "gproxyd", "-c", conf],
                                    cpus=rig.proxy_cpus, env=env, cwd=source)
        wait_listening([*http_ports, *[port for _, port, _, _ in more], admin], proc, log)
        for index, port in enumerate(http_ports):
            history = Target(f"r{index}", "", http_port=port)
            rig.wrk.run(history, "/small", 4, HISTORY_SECONDS, rig.wrk.script())
        return proc, admin

    def start_scraper(self, rig: Rig, port: int, path: str
                      ) -> tuple[subprocess.Popen, str, str]:
        out = os.path.join(rig.workdir, "admin-scrape.json")
        if os.path.exists(out):
            os.unlink(out)
        proc, log = rig.procs.start(
            "admin-scrape", [sys.executable, "-c", SCRAPER, "--port", str(port),
                             "--path", path, "--out", out],
            cpus=rig.load_cpus, cwd=BENCH_DIR, stdout_pipe=True)
        if readline_bounded(proc, 10.0) != "scraping":
            rig.procs.stop(proc)
            raise BenchError(f"the scraper did not start: {log_tail(log)}")
        return proc, log, out

    def stop_scraper(self, rig: Rig, scraper: tuple[subprocess.Popen, str, str]) -> dict:
        proc, log, out = scraper
        rig.procs.stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"the scraper failed (exit {proc.returncode}): {log_tail(log)}")
        with open(out) as handle:
            return json.load(handle)

    def measure(self, rig: Rig, target: Target) -> dict[str, Any]:
        """One window: the scraper (if any) started, then --duration seconds of the paced
        load through the tcp route."""
        path, elsewhere = CONDITIONS[target.name]
        port = self.other_admin_port if elsewhere else self.admin_port
        scraper = self.start_scraper(rig, port, path) if path else None
        try:
            started = time.monotonic()
            waited_before = runqueue_wait(target.pid)
            result = rig.wrk.run(target, "/small", CONNECTIONS, rig.args.duration,
                                 self.script)
            waited = runqueue_wait(target.pid) - waited_before
            ended = time.monotonic()
        finally:
            scraped = self.stop_scraper(rig, scraper) if scraper else None
        time.sleep(SETTLE)  # the probe's lines written, the scraper gone
        seconds = ended - started
        turns = [row[1:] for row in lines_between(self.probe_file, "turn", started, ended)]
        collections = [row[1] for row in lines_between(self.probe_file, "gc", started, ended)]
        values: dict[str, Any] = {
            "rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "errors": result.errors,
            "cpu_pct": 100 * (result.cpu_seconds or 0.0) / result.seconds,
            "runqueue_ms_per_s": 1000 * waited / seconds,
            "turn_max_ms": 1000 * max((wall for wall, _ in turns), default=0.0),
            "turn_cpu_max_ms": 1000 * max((cpu for _, cpu in turns), default=0.0),
            "turns_over_05ms_per_s": sum(cpu > 0.0005 for _, cpu in turns) / seconds,
            "turns_over_1ms_per_s": sum(cpu > 0.001 for _, cpu in turns) / seconds,
            "gc_max_ms": 1000 * max(collections, default=0.0),
            "gc_over_1ms_per_s": sum(pause > 0.001 for pause in collections) / seconds}
        if scraped:
            mine = [answer for answer in scraped["answers"] if started <= answer[0] <= ended]
            values.update(scrapes_per_s=len(mine) / seconds,
                          scraper_cpu_pct=100 * scraped["cpu"] / seconds,
                          scrape_kib=statistics.mean(a[2] for a in mine) / 1024 if mine
                          else None,
                          scrape_p50_ms=quantile([a[1] / 1000 for a in mine], 0.5),
                          scrape_max_ms=max((a[1] / 1000 for a in mine), default=None))
        return values

    # -- the report

    def table(self, rig: Rig) -> list[list[str]]:
        names = list(CONDITIONS)
        rows = [["metric (median of windows)"] + [LABELS[name] for name in names]
                + ["/metrics ÷ none", "/stats ÷ none", "other gproxyd ÷ none"]]
        for metric, label, digits, ratios in (
                ("rps", "proxied req/s", 0, False),
                ("p50_ms", "proxied p50 ms", 3, True),
                ("p99_ms", "proxied p99 ms", 3, True),
                ("errors", "wrk errors", 0, False),
                ("turn_cpu_max_ms", "longest loop turn, gproxyd CPU ms (probe)", 2, True),
                ("turn_max_ms", "longest loop turn, wall ms (probe)", 2, True),
                ("turns_over_05ms_per_s", "loop turns > 0.5 ms CPU per s", 1, False),
                ("turns_over_1ms_per_s", "loop turns > 1 ms CPU per s", 1, False),
                ("gc_max_ms", "longest garbage collection ms (probe)", 2, False),
                ("gc_over_1ms_per_s", "garbage collections > 1 ms per s", 2, False),
                ("cpu_pct", "gproxyd CPU %", 0, False),
                ("runqueue_ms_per_s", "gproxyd waiting for a CPU ms per s (schedstat)", 1,
                 False),
                ("scraper_cpu_pct", "scraper CPU %", 0, False),
                ("scrapes_per_s", "scrapes/s", 0, False),
                ("scrape_kib", "scrape size KiB", 1, False),
                ("scrape_p50_ms", "scrape p50 ms", 3, False),
                ("scrape_max_ms", "longest scrape (one waits for a render) ms", 1, False)):
            values = [rig.median(name, f"admin.{metric}") for name in names]
            rows.append([label] + [fmt(value, digits) for value in values]
                        + ([ratio(value, values[0]) for value in values[1:]]
                           if ratios else ["", "", ""]))
        return rows

    def lines(self, rig: Rig) -> list[str]:
        """p99 ratios round by round (each round has a window of each condition)."""
        runs = {name: rig.samples.get((name, "admin.p99_ms"), []) for name in CONDITIONS}
        lines = []
        for name in ("admin-metrics", "admin-stats", "admin-elsewhere"):
            if runs[name] and len(runs[name]) == len(runs["admin-none"]):
                each = [scraped / alone for alone, scraped
                        in zip(runs["admin-none"], runs[name], strict=True)]
                lines.append(f"{LABELS[name]}: proxied p99 ÷ no scraping, round by round: "
                             + ", ".join(f"{value:.2f}" for value in each)
                             + f" (median {statistics.median(each):.2f})")
        return lines

    def chapter(self, rig: Rig) -> list[str]:
        return ["", "## Admin endpoint under a scrape loop", "",
                f"One gproxyd: {ROUTES} `protocol = http` routes to nginx, each with a second "
                f"nginx as its shadow and {HISTORY_SECONDS:g} s of `wrk -c4` through it "
                "first (latency history in every histogram), a plain tcp route to nginx "
                "for the paced load, and a route whose hook (`bench/loop_probe.py`) "
                "reports each turn of the event loop that held it over 0.25 ms (libev's "
                "check to prepare watcher: wall time, and gproxyd's CPU time in it). "
                f"Paced load: `wrk -c{CONNECTIONS}` GET /small through the tcp route, each "
                f"connection waiting 0-{2 * DELAY_MS} ms (uniform, a Lua `delay()`) before "
                f"each request: ~{CONNECTIONS * 1000 // DELAY_MS} req/s, far below what the "
                "route can do. Scraper: one keep-alive connection (Python, raw socket), "
                "GET back to back, started before the window. Control: the same /metrics "
                "loop against a second gproxyd with the same routes and history, which "
                "relays nothing: what the scraping costs the machine, the relaying process "
                f"left alone. {rig.args.runs} rounds of a {rig.args.duration:g} s window "
                "per condition, each window's numbers its own; medians of the windows.",
                "",
                markdown_table(self.table(rig)), "",
                *[f"- {line}" for line in self.lines(rig)]]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(self.table(rig)), *self.lines(rig)]


SECTION = Admin()
