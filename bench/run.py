#!/usr/bin/env python3
"""The benchmark suite (issue 7): gproxyd side by side with haproxy and a direct connection.

    python3 bench/run.py [--quick] [--runs N] [--duration S] [--only SECTION,...]

Starts nginx, iperf3 and two tiny Python backends on 127.0.0.1, one haproxy (mode tcp,
nbthread 1) and one gproxyd per variant (plain, with shadows, with an http observer), then
measures every target in interleaved runs and reports medians: a table on standard output
and bench/results.md with the machine description. See bench/README.md.

Standard library only. Every wait is bounded; every process it starts is stopped at exit.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
CLK_TCK = os.sysconf("SC_CLK_TCK")
EX_CONFIG = 78
SMALL_BODY = ("gproxyd benchmark small response body " * 3)[:100]
POST_BODY_SIZE = 1024
LONG_RUN_CONNECTIONS = 10
TOOLS = ("haproxy", "nginx", "wrk", "iperf3")

SECTIONS = ("small", "large", "bulk", "connect", "memory", "shadow", "observer",
            "shadow-matrix", "workers")
SECTION_HELP = {
    "small": "1. ~100-byte responses over keep-alive, wrk -c50: req/s, p50, p99, proxy CPU/req",
    "large": "2. 1 MiB responses, wrk -c10: MiB/s",
    "bulk": "3. one iperf3 stream through the proxy: Gbit/s",
    "connect": "4. new connections per second (Connection: close)",
    "memory": "5. proxy RSS per idle proxied connection, 10,000 held",
    "shadow": "6. small and connect again with a healthy and with a stalled shadow",
    "observer": "7. small and connect again with protocol = http, and with a no-op hook",
    "shadow-matrix": "shadow issue: no/healthy/stalled/dead shadow at a fixed rate and at "
                     "saturation, ~1 KiB POSTs, RSS over a long stalled run",
    "workers": "workers = 1 against workers = 2, small keep-alive, on a protocol = http "
               "route and on a route whose hook needs ~0.1 ms of CPU per request: req/s "
               "and proxy CPU/req",
}


# --- /proc: the process tree of a proxy ---------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) "


def process_tree(pid: int) -> list[int]:
    """PID and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of the tree, seconds (a process's stat counts all its threads)."""
    user = system = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_times(pid))


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def tree_fds(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
    return total


def is_listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:PORT or 0.0.0.0:PORT (no connection made,
    so backends such as iperf3 never see a stray client)."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                if parts[1] in wanted and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_port() -> int:
    """A 127.0.0.1 port that was bound and closed again: connecting to it is refused."""
    return free_port()


# --- processes this run started --------------------------------------------------------------

class Processes:
    """Every long-running process the benchmark starts; all stopped by stop_all()."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, name: str, argv: list[str], cpus: set[int] | None = None,
              env: dict[str, str] | None = None, cwd: str | None = None,
              stdout_pipe: bool = False) -> tuple[subprocess.Popen, str]:
        log = os.path.join(self.workdir, f"{name}.log")
        log_handle = open(log, "wb")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_handle, stderr=log_handle,
                preexec_fn=_child_setup(cpus), start_new_session=True, env=env, cwd=cwd)
        finally:
            log_handle.close()
        self.running.append((name, proc, log))
        return proc, log

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout:
            proc.stdout.close()

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.running):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc, _ in reversed(self.running):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    pass
        self.running.clear()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    # Each child leads its own session (start_new_session), so its pid is its group id:
    # this reaches the workers a proxy forked, and nothing this run did not start.
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as handle:
            text = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def wait_listening(ports: list[int], proc: subprocess.Popen, log: str,
                   timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode}: {log_tail(log)}")
        if all(is_listening(port) for port in ports):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"not listening on {ports} after {timeout:.0f} s: {log_tail(log)}")
        time.sleep(0.05)


class BenchError(Exception):
    """A target or a measurement failed; str() says why, and ends up in the report."""


# --- targets: what a client connects to ------------------------------------------------------

@dataclass
class Target:
    """One thing measured: a direct connection, haproxy, or one gproxyd variant."""
    name: str
    description: str
    http_port: int = 0
    bulk_port: int = 0
    hold_port: int = 0
    shadow_port: int = 0
    proc: subprocess.Popen | None = None
    log: str = ""
    error: str = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def check_alive(self) -> None:
        if self.error:
            raise BenchError(self.error)
        if self.proc and self.proc.poll() is not None:
            self.error = f"{self.name} exited with status {self.proc.returncode}: " \
                         f"{log_tail(self.log)}"
            raise BenchError(self.error)


# --- wrk ------------------------------------------------------------------------------------

WRK_REPORT = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT {\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"bytes\\": %.0f, " ..
    "\\"connect\\": %.0f, \\"read\\": %.0f, \\"write\\": %.0f, \\"status\\": %.0f, " ..
    "\\"timeout\\": %.0f, \\"p50_us\\": %.0f, \\"p99_us\\": %.0f}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_seconds: float | None = None   # of the proxy's process tree during the run
    cpu_user_seconds: float | None = None  # ...of which in user space (the rest: kernel)
    rss_kib: list[int] = field(default_factory=list)  # proxy tree RSS, one sample a second
    queued: list[tuple[int, int, int]] = field(default_factory=list)  # shadow_queues() each s
    # CPU seconds during the run of the other processes: each nginx, and wrk itself
    others_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


# --- the benchmark --------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="gproxyd-bench-")
        self.procs = Processes(self.workdir)
        self.closed = False
        self.machine: list[tuple[str, str]] = []
        try:
            self.gproxyd_source = (export_revision(args.gproxyd_rev, self.workdir)
                                   if args.gproxyd_rev else REPO_DIR)
        except BenchError as error:
            shutil.rmtree(self.workdir, ignore_errors=True)
            sys.exit(f"bench: {error}")
        self.memory_baseline: dict[str, int] = {}   # target -> RSS KiB before its first hold
        self.proxy_cpus = parse_cpus(args.pin_proxy)
        self.load_cpus = parse_cpus(args.pin_load)
        self.samples: dict[tuple[str, str], list[float]] = {}   # (target, metric) -> runs
        self.raw: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.scripts: dict[tuple, str] = {}
        self.targets: dict[str, Target] = {}
        self.nginx_port = self.shadow_nginx_port = self.iperf_port = 0
        self.nginx_pids: dict[str, int] = {}   # "nginx", "nginx-shadow" -> pid
        self.stall_port = self.echo_port = self.dead_port = 0
        self.iperf_proc: subprocess.Popen | None = None
        self.stall_proc: subprocess.Popen | None = None
        self.wrk_rate_flag = wrk_supports_rate()
        _, self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        # A proxy holds two descriptors per proxied connection; leave room for the rest
        # (haproxy's splice pipes, listeners, logs).
        self.idle_conns = min(args.idle_conns, (self.nofile - 1000) // 2)
        if self.idle_conns < args.idle_conns and "memory" in args.only:
            self.notes.append(
                f"memory: the open-files limit here is {self.nofile} and cannot be raised "
                f"(hard limit), so {self.idle_conns} idle connections were held instead of "
                f"{args.idle_conns} (a proxy needs two descriptors per connection).")

    # -- lifecycle

    def close(self) -> None:
        """Stop everything this run started; safe to call twice (finally and atexit)."""
        self.procs.stop_all()
        if self.closed:
            return
        self.closed = True
        if self.args.keep:
            print(f"kept {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_backends(self) -> None:
        www = os.path.join(self.workdir, "www")
        os.makedirs(www)
        with open(os.path.join(www, "1m"), "wb") as handle:
            handle.write(os.urandom(1 << 20))
        self.nginx_port = self.start_nginx("nginx", www)
        if self.wants("shadow", "shadow-matrix"):
            self.shadow_nginx_port = self.start_nginx("nginx-shadow", www)
            self.stall_port = self.start_python_server("stall")
            self.stall_proc = self.procs.running[-1][1]
            self.dead_port = dead_port()
        if self.wants("memory"):
            self.echo_port = self.start_python_server("echo")
        if self.wants("bulk"):
            self.iperf_port = free_port()
            self.start_iperf_server()

    def start_nginx(self, name: str, www: str) -> int:
        prefix = os.path.join(self.workdir, name)
        os.makedirs(prefix)
        port = free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(NGINX_CONF.format(prefix=prefix, port=port, www=www,
                                           small=SMALL_BODY))
        proc, log = self.procs.start(
            name, ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")],
            cpus=self.load_cpus)
        wait_listening([port], proc, log)
        self.nginx_pids[name] = proc.pid
        return port

    def start_python_server(self, kind: str) -> int:
        proc, log = self.procs.start(
            kind, [sys.executable, os.path.join(BENCH_DIR, "servers.py"), kind],
            cpus=self.load_cpus, stdout_pipe=True)
        line = _readline_bounded(proc, 10.0)
        if not line.startswith("PORT "):
            raise BenchError(f"{kind} server did not start: {log_tail(log)}")
        return int(line.split()[1])

    def start_iperf_server(self) -> None:
        if self.iperf_proc:
            self.procs.stop(self.iperf_proc)
        proc, log = self.procs.start(
            "iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
            cpus=self.load_cpus)
        wait_listening([self.iperf_port], proc, log)
        self.iperf_proc = proc

    def wants(self, *sections: str) -> bool:
        return any(section in self.args.only for section in sections)

    def start_targets(self) -> None:
        direct = Target("direct", "client straight to the backend", self.nginx_port,
                        self.iperf_port, self.echo_port)
        self.targets["direct"] = direct
        self.targets["haproxy"] = self.start_haproxy()
        gproxyd_error = gproxyd_available(self.gproxyd_source)
        variants = [("gproxyd", "gproxyd, plain tcp route", [], True)]
        if self.wants("shadow", "shadow-matrix"):
            variants += [
                ("gproxyd+healthy", "gproxyd, shadow = a second nginx",
                 [f"shadow = 127.0.0.1:{self.shadow_nginx_port}"], False),
                ("gproxyd+stalled", "gproxyd, shadow = a server that accepts and never reads",
                 [f"shadow = 127.0.0.1:{self.stall_port}"], False)]
        if self.wants("shadow-matrix"):
            variants.append(("gproxyd+dead", "gproxyd, shadow port closed (refused)",
                             [f"shadow = 127.0.0.1:{self.dead_port}"], False))
            variants.append(("gproxyd+batched", "gproxyd, shadow = a second nginx, "
                             "shadow-write-delay = 5ms",
                             [f"shadow = 127.0.0.1:{self.shadow_nginx_port}",
                              "shadow-write-delay = 5ms"], False))
        if self.wants("observer", "workers"):
            variants.append(("gproxyd+http", "gproxyd, protocol = http (observer)",
                             ["protocol = http"], False))
        if self.wants("observer"):
            variants.append(("gproxyd+hook", "gproxyd, hooks = bench/noop_hook.py "
                             "(on_data and on_response return the bytes unchanged)",
                             [f"hooks = {os.path.join(BENCH_DIR, 'noop_hook.py')}"], False))
        if self.wants("workers"):
            variants.append(("gproxyd+http+2w", "gproxyd, protocol = http, workers = 2",
                             ["protocol = http"], False))
            busy = [f"hooks = {os.path.join(BENCH_DIR, 'busy_hook.py')}"]
            variants.append(("gproxyd+busy", "gproxyd, hooks = bench/busy_hook.py "
                             "(~0.1 ms of Python per request)", busy, False))
            variants.append(("gproxyd+busy+2w", "gproxyd, hooks = bench/busy_hook.py, "
                             "workers = 2", busy, False))
        for name, description, extra, all_routes in variants:
            target = Target(name, description)
            if name == "gproxyd+stalled":
                target.shadow_port = self.stall_port
            self.targets[name] = target
            if gproxyd_error:
                target.error = gproxyd_error
                continue
            try:
                self.start_gproxyd(target, extra, all_routes,
                                   ["workers = 2"] if name.endswith("+2w") else [])
            except BenchError as error:
                target.error = str(error)

    def start_haproxy(self) -> Target:
        description = "haproxy, mode tcp, nbthread 1" + (
            ", option splice-request, splice-response" if self.args.haproxy_splice
            else ", defaults (no splicing)")
        target = Target("haproxy", description, free_port(),
                        free_port() if self.iperf_port else 0,
                        free_port() if self.echo_port else 0)
        # haproxy refuses to start when maxconn (and its splice pipes) need more descriptors
        # than the hard limit allows.
        maxpipes = 256
        maxconn = min(30000, (self.nofile - 200) // 2 - maxpipes)
        lines = [HAPROXY_GLOBAL.format(maxconn=maxconn, maxpipes=maxpipes)]
        if self.args.haproxy_splice:
            lines.append("    option splice-request\n    option splice-response\n")
        for name, port, backend in (("http", target.http_port, self.nginx_port),
                                     ("bulk", target.bulk_port, self.iperf_port),
                                     ("hold", target.hold_port, self.echo_port)):
            if port:
                lines.append(HAPROXY_PROXY.format(name=name, port=port, backend=backend))
        conf = os.path.join(self.workdir, "haproxy.cfg")
        with open(conf, "w") as handle:
            handle.write("\n".join(lines))
        try:
            target.proc, target.log = self.procs.start(
                "haproxy", ["haproxy", "-db", "-f", conf], cpus=self.proxy_cpus)
            wait_listening([p for p in (target.http_port, target.bulk_port, target.hold_port)
                            if p], target.proc, target.log)
        except (BenchError, OSError) as error:
            target.error = str(error)
        return target

    def start_gproxyd(self, target: Target, extra: list[str], all_routes: bool,
                      global_lines: list[str]) -> None:
        target.http_port = free_port()
        routes = [("http", target.http_port, self.nginx_port, extra)]
        if all_routes:
            if self.iperf_port:
                target.bulk_port = free_port()
                routes.append(("bulk", target.bulk_port, self.iperf_port, []))
            if self.echo_port:
                target.hold_port = free_port()
                routes.append(("hold", target.hold_port, self.echo_port, []))
        text = [GPROXYD_GLOBAL + "".join(line + "\n" for line in global_lines)]
        for name, listen, production, lines in routes:
            text.append(GPROXYD_ROUTE.format(name=name, listen=listen, production=production))
            text.extend(line + "\n" for line in lines)
        conf = os.path.join(self.workdir, f"{target.name}.conf")
        with open(conf, "w") as handle:
            handle.write("\n".join(text))
        check = subprocess.run(
            [sys.executable, "-m", "gproxyd", "--check-config", "-c", conf],
            capture_output=True, text=True, timeout=30, cwd=self.gproxyd_source,
            env=gproxyd_env(self.gproxyd_source))
        if check.returncode == EX_CONFIG:
            raise BenchError(f"config rejected (exit 78): {_last_line(check)}")
        if check.returncode != 0:
            raise BenchError(f"--check-config failed (exit {check.returncode}): "
                             f"{_last_line(check)}")
        target.proc, target.log = self.procs.start(
            target.name, [sys.executable, "-m", "gproxyd", "-c", conf],
            cpus=self.proxy_cpus, env=gproxyd_env(self.gproxyd_source), cwd=self.gproxyd_source)
        wait_listening([port for port in (target.http_port, target.bulk_port,
                                          target.hold_port) if port], target.proc, target.log)

    # -- recording

    def record(self, target: str, metric: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault((target, metric), []).append(value)

    def median(self, target: str, metric: str) -> float | None:
        values = self.samples.get((target, metric))
        return statistics.median(values) if values else None

    def failed(self, target: Target, section: str, error: Exception) -> None:
        message = f"{target.name} {section}: {error}"
        # A target that never started is explained once, in the list of targets.
        if str(error) != target.error and message not in self.notes:
            self.notes.append(message)
        self.raw.append({"target": target.name, "section": section, "error": str(error)})
        print(f"  {target.name:16} {section}: FAILED {error}", file=sys.stderr)

    def interleaved(self, section: str, targets: list[str],
                    measure: Callable[[Target], dict[str, float]], runs: int | None = None) -> None:
        """Run MEASURE for each target in turn, RUNS times round (direct, haproxy, gproxyd,
        direct, ...), so slow drifts of the machine hit every target alike."""
        runs = runs or self.args.runs
        print(f"{section}: {runs} runs x {', '.join(targets)}", file=sys.stderr)
        for run in range(runs):
            for name in targets:
                target = self.targets[name]
                if target.error:
                    continue  # never started: said once at start-up and in the report
                try:
                    target.check_alive()
                    if target.shadow_port:
                        self.reset_stalled_shadow(target.shadow_port)
                    values = measure(target)
                except BenchError as error:
                    self.failed(target, section, error)
                    continue
                for metric, value in values.items():
                    if isinstance(value, (int, float)):
                        self.record(name, f"{section}.{metric}", value)
                self.raw.append({"target": name, "section": section, "run": run,
                                 "values": values})
                shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items()
                                  if not isinstance(v, list))
                print(f"  run {run + 1}/{runs} {name:16} {shown}", file=sys.stderr)

    def reset_stalled_shadow(self, port: int) -> None:
        """Reset what earlier runs left with the stalled shadow: the proxy's closed
        connections to it linger in the kernel, data and FIN stuck behind a zero window."""
        if not self.stall_proc or self.stall_proc.poll() is not None:
            raise BenchError("the stalled shadow server is gone")
        self.stall_proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while shadow_queues(port)[0] and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- tools

    def wrk_script(self, method: str = "GET", body_size: int = 0, delay_ms: int = 0) -> str:
        key = (method, body_size, delay_ms)
        if key not in self.scripts:
            lines = [f'wrk.method = "{method}"']
            if body_size:
                lines.append(f'wrk.body = string.rep("x", {body_size})')
                lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
            if delay_ms:
                lines.append(f"function delay() return {delay_ms} end")
            path = os.path.join(self.workdir, f"wrk-{len(self.scripts)}.lua")
            with open(path, "w") as handle:
                handle.write("\n".join(lines) + "\n" + WRK_REPORT)
            self.scripts[key] = path
        return self.scripts[key]

    def wrk(self, target: Target, path: str, connections: int, seconds: float,
            script: str, headers: tuple[str, ...] = (), rate: int = 0) -> WrkResult:
        threads = min(self.args.threads, connections)
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
                "--timeout", "5s", "-s", script]
        if rate:
            argv += ["-R", str(rate)]
        for header in headers:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{target.http_port}{path}")
        pid = target.pid
        user_before, system_before = tree_cpu_times(pid) if pid else (0.0, 0.0)
        others_before = {name: tree_cpu_seconds(p) for name, p in self.nginx_pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss: list[int] = []
        queued: list[tuple[int, int, int]] = []
        out_path = os.path.join(self.workdir, "wrk.out")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    preexec_fn=_child_setup(self.load_cpus))
        try:
            deadline = time.monotonic() + seconds + 30
            while True:
                if pid:
                    rss.append(tree_rss_kib(pid))
                if target.shadow_port:
                    queued.append(shadow_queues(target.shadow_port))
                try:
                    proc.wait(1.0)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"wrk did not finish within {seconds + 30:.0f} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        cpu = user = None
        if pid:
            user_after, system_after = tree_cpu_times(pid)
            user = user_after - user_before
            cpu = user + system_after - system_before
        others = {name: tree_cpu_seconds(p) - others_before[name]
                  for name, p in self.nginx_pids.items()}
        # wrk is the only child reaped during the run: the rest run until the end.
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        others["wrk"] = (reaped.ru_utime + reaped.ru_stime
                         - children.ru_utime - children.ru_stime)
        with open(out_path, errors="replace") as handle:
            output = handle.read()
        match = re.search(r"^BENCH-RESULT (\{.*\})$", output, re.M)
        if proc.returncode != 0 or not match:
            raise BenchError(f"wrk failed (exit {proc.returncode}): "
                             f"{' '.join(output.split())[-200:]}")
        data = json.loads(match.group(1))
        errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
        if data["requests"] == 0:
            raise BenchError(f"no request completed ({errors} errors)")
        return WrkResult(int(data["requests"]), data["duration_us"] / 1e6, int(data["bytes"]),
                         int(errors), data["p50_us"] / 1000, data["p99_us"] / 1000, cpu, user,
                         rss, queued, others)

    # -- sections

    def measure_small(self, target: Target) -> dict[str, float]:
        result = self.wrk(target, "/small", 50, self.args.duration, self.wrk_script())
        return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "cpu_us": _per(result.cpu_seconds, result.requests),
                "cpu_user_us": _per(result.cpu_user_seconds, result.requests),
                "errors": result.errors}

    def measure_large(self, target: Target) -> dict[str, float]:
        result = self.wrk(target, "/1m", 10, self.args.duration, self.wrk_script())
        return {"mibps": result.bytes / result.seconds / (1 << 20),
                "cpu_us": _per(result.cpu_seconds, result.requests), "errors": result.errors}

    def measure_connect(self, target: Target) -> dict[str, float]:
        result = self.wrk(target, "/small", 50, self.args.duration, self.wrk_script(),
                          headers=("Connection: close",))
        return {"cps": result.rps, "p99_ms": result.p99_ms,
                "cpu_us": _per(result.cpu_seconds, result.requests), "errors": result.errors}

    def measure_bulk(self, target: Target) -> dict[str, float]:
        seconds = max(1, round(self.args.duration))
        pid = target.pid
        cpu_before = tree_cpu_seconds(pid) if pid else 0.0
        try:
            done = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(target.bulk_port), "-t", str(seconds),
                 "-J", "--connect-timeout", "3000"],
                capture_output=True, text=True, timeout=seconds + 30,
                preexec_fn=_child_setup(self.load_cpus))
        except subprocess.TimeoutExpired:
            self.start_iperf_server()  # a half-finished test leaves the server busy
            raise BenchError(f"iperf3 did not finish within {seconds + 30} s") from None
        try:
            report = json.loads(done.stdout)
        except ValueError:
            report = {"error": (done.stdout + done.stderr).strip()[-200:]}
        if "error" in report or done.returncode != 0:
            self.start_iperf_server()
            raise BenchError(f"iperf3: {report.get('error', 'exit %d' % done.returncode)}")
        received = report["end"]["sum_received"]
        cpu = tree_cpu_seconds(pid) - cpu_before if pid else None
        return {"gbps": received["bits_per_second"] / 1e9,
                "cpu_us_per_mib": _per(cpu, received["bytes"] / (1 << 20))}

    def measure_memory(self, target: Target) -> dict[str, float]:
        pid = target.pid
        if not pid:
            raise BenchError("no proxy process")
        settle(pid)
        fds_before = tree_fds(pid)
        # The baseline is the RSS before the *first* hold: memory an allocator keeps after
        # the connections close and reuses the next time is part of what they cost.
        rss_before = self.memory_baseline.setdefault(target.name, tree_rss_kib(pid))
        socks: list[socket.socket] = []
        try:
            error = hold_connections(target.hold_port, self.idle_conns, socks)
            if not socks:
                raise BenchError(error or "no connection held")
            time.sleep(1.0)  # let the proxy finish whatever it does after the echo
            rss_after, fds_after = tree_rss_kib(pid), tree_fds(pid)
        finally:
            for sock in socks:
                sock.close()
        held = len(socks)
        if error:
            self.notes.append(f"{target.name} memory: {error}")
        settle(pid, fds_before)
        return {"kib_per_conn": (rss_after - rss_before) / held,
                "fds_per_conn": (fds_after - fds_before) / held, "held": held}

    def measure_fixed_rate(self, target: Target) -> dict[str, float]:
        """~1 KiB POSTs at a fixed offered load below saturation."""
        connections = self.args.rate_connections
        if self.wrk_rate_flag:
            script, rate = self.wrk_script("POST", POST_BODY_SIZE), self.args.rate
        else:
            # Stock wrk has no -R: each connection waits delay() ms before each request,
            # which caps it at 1000/delay requests a second (a little less: plus latency).
            delay = max(1, round(connections * 1000 / self.args.rate))
            script, rate = self.wrk_script("POST", POST_BODY_SIZE, delay), 0
        result = self.wrk(target, "/post", connections, self.args.duration, script, rate=rate)
        return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "errors": result.errors, **_rss_summary(result.rss_kib),
                **_queue_summary(result.queued)}

    def measure_saturation(self, target: Target, seconds: float | None = None,
                           connections: int = 50) -> dict[str, Any]:
        result = self.wrk(target, "/post", connections, seconds or self.args.duration,
                          self.wrk_script("POST", POST_BODY_SIZE))
        # Where the two CPUs went, per request: the proxy, production's and the healthy
        # shadow's nginx, and wrk (what a shadow costs besides the proxy's own work).
        budget = {f"cpu_us_{name.replace('-', '_')}": _per(seconds_used, result.requests)
                  for name, seconds_used in result.others_cpu.items()}
        return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "errors": result.errors, "cpu_us": _per(result.cpu_seconds, result.requests),
                "cpu_user_us": _per(result.cpu_user_seconds, result.requests), **budget,
                **_rss_summary(result.rss_kib), **_queue_summary(result.queued)}

    def run(self) -> None:
        only = self.args.only
        base = ["direct", "haproxy", "gproxyd"]
        variants = []
        if "shadow" in only:
            variants += ["gproxyd+healthy", "gproxyd+stalled"]
        if "observer" in only:
            variants += ["gproxyd+http", "gproxyd+hook"]
        workers = [name for pair in WORKERS for name, _ in pair] if "workers" in only else []
        self.warm_up(base + variants + [name for name in workers if name not in variants])
        if only & {"small", "shadow", "observer"}:
            self.interleaved("small", base + variants, self.measure_small)
        if "large" in only:
            self.interleaved("large", base, self.measure_large)
        if "bulk" in only:
            self.interleaved("bulk", base, self.measure_bulk)
        if only & {"connect", "shadow", "observer"}:
            self.interleaved("connect", base + variants, self.measure_connect)
        if "memory" in only:
            self.interleaved("memory", ["haproxy", "gproxyd"], self.measure_memory)
        if "shadow-matrix" in only:
            matrix = [name for name, _ in MATRIX]
            self.interleaved("fixed", matrix, self.measure_fixed_rate)
            self.interleaved("saturation", matrix, self.measure_saturation)
            # Ten connections, not fifty: each then carries five times the bytes, so the
            # kernel's buffers for the stalled shadow (up to tcp_wmem's max per connection)
            # fill within seconds and the rest of the run tests gproxyd's shadow-buffer.
            long_runs = ["gproxyd+stalled"] if self.args.quick else ["gproxyd", "gproxyd+stalled"]
            self.interleaved("long", long_runs, lambda target: self.measure_saturation(
                target, self.args.stall_seconds, LONG_RUN_CONNECTIONS), 1)
        if workers:
            self.interleaved("workers", workers, self.measure_small)

    def warm_up(self, names: list[str]) -> None:
        for name in names:
            target = self.targets[name]
            if target.error or not target.http_port:
                continue
            try:
                self.wrk(target, "/small", 10, 1, self.wrk_script())
            except BenchError as error:
                target.error = f"{name}: warm-up failed: {error}"


def gproxyd_env(source: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                  else "")
    return env


def export_revision(revision: str, workdir: str) -> str:
    """The gproxyd package of REVISION (`git archive`, the repository is only read) in a
    directory of its own, so a run measures a commit, not a working tree in flux."""
    source = os.path.join(workdir, "gproxyd-src")
    os.makedirs(source)
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", "--format=tar", revision,
                              "gproxyd"], capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise BenchError(f"cannot export gproxyd at {revision!r}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True, timeout=60)
    return source


def gproxyd_available(source: str) -> str:
    """'' when `python3 -m gproxyd --help` works, else why not."""
    try:
        done = subprocess.run([sys.executable, "-m", "gproxyd", "--help"], capture_output=True,
                              text=True, timeout=30, cwd=source, env=gproxyd_env(source))
    except subprocess.TimeoutExpired:
        return "`python3 -m gproxyd --help` did not finish within 30 s"
    if done.returncode != 0:
        return f"`python3 -m gproxyd --help` failed (exit {done.returncode}): {_last_line(done)}"
    return ""


def wrk_supports_rate() -> bool:
    """True for wrk2-style builds that take -R/--rate (stock wrk does not)."""
    try:
        done = subprocess.run(["wrk"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(re.search(r"^\s+-R,\s+--rate", done.stdout + done.stderr, re.M))


def hold_connections(port: int, count: int, socks: list[socket.socket]) -> str:
    """Open COUNT connections to PORT, each proven end to end by a one-byte echo, appending
    them to SOCKS. Returns '' or why fewer were held (the caller closes SOCKS)."""
    batch_size = 200  # below the listen backlogs, so connect() never waits for a SYN retry
    deadline = time.monotonic() + 120
    while len(socks) < count:
        if time.monotonic() > deadline:
            return f"{len(socks)} of {count} connections held: timed out after 120 s"
        batch: list[socket.socket] = []
        try:
            for _ in range(min(batch_size, count - len(socks))):
                sock = socket.socket()
                batch.append(sock)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))
            for sock in batch:
                sock.sendall(b"x")
            for sock in batch:
                if sock.recv(1) != b"x":
                    raise ConnectionError("closed by the proxy before the echo came back")
        except OSError as error:
            for sock in batch:
                sock.close()
            return f"{len(socks)} of {count} connections held: {error}"
        socks.extend(batch)
    return ""


def settle(pid: int, fds: int | None = None, timeout: float = 15.0) -> None:
    """Wait until the proxy's descriptor count stops falling (or reaches FDS)."""
    deadline = time.monotonic() + timeout
    last = tree_fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = tree_fds(pid)
        if (fds is not None and now <= fds + 2) or (fds is None and now == last):
            return
        last = now


def shadow_queues(port: int) -> tuple[int, int, int]:
    """What the kernel buffers for the shadow at 127.0.0.1:PORT, before any of the proxy's
    own buffering, from /proc/net/tcp: (connections to PORT, bytes in all their send
    queues plus bytes unread at PORT's end, the most for one connection)."""
    wanted = f"0100007F:{port:04X}"
    by_connection: dict[str, int] = {}  # client-side address -> bytes queued both ends
    try:
        with open("/proc/net/tcp") as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                tx_queue, rx_queue = (int(x, 16) for x in parts[4].split(":"))
                if parts[2] == wanted:
                    by_connection[parts[1]] = by_connection.get(parts[1], 0) + tx_queue
                elif parts[1] == wanted and parts[3] != "0A":
                    by_connection[parts[2]] = by_connection.get(parts[2], 0) + rx_queue
    except OSError:
        pass
    return (len(by_connection), sum(by_connection.values()),
            max(by_connection.values(), default=0))


def _queue_summary(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    if not samples:
        return {}
    return {"kernel_queued_max_kib": max(sample[1] for sample in samples) // 1024,
            "kernel_queued_per_conn_kib": max(sample[2] for sample in samples) // 1024,
            "kernel_queued_kib": [sample[1] // 1024 for sample in samples]}


def _rss_summary(samples: list[int]) -> dict[str, Any]:
    if not samples:
        return {}
    return {"rss_start_kib": samples[0], "rss_max_kib": max(samples),
            "rss_end_kib": samples[-1], "rss_growth_kib": samples[-1] - samples[0],
            "rss_samples_kib": samples}


def _per(total: float | None, count: float) -> float | None:
    return total * 1e6 / count if total is not None and count else None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _readline_bounded(proc: subprocess.Popen, timeout: float) -> str:
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().decode(errors="replace").strip()


def parse_cpus(text: str) -> set[int] | None:
    """'0', '0,2', '1-3' -> a CPU set; '' -> None (no pinning)."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


# --- configuration templates -----------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    default_type text/plain;
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
        location = /small {{ return 200 "{small}"; }}
        location = /1m {{ root {www}; }}
        # `return` reads and discards the request body, so keep-alive POSTs work.
        location = /post {{ return 200 "ok"; }}
    }}
}}
"""

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 15m
    timeout server 15m
"""

HAPROXY_PROXY = """\
listen {name}
    bind 127.0.0.1:{port}
    server backend 127.0.0.1:{backend}
"""

GPROXYD_GLOBAL = """\
[gproxyd]
admin = off
log-level = warning
"""

GPROXYD_ROUTE = """\
[route {name}]
listen = 127.0.0.1:{listen}
production = 127.0.0.1:{production}
shadow-buffer = 4MiB
max-connections = 20000
idle-timeout = 15m"""


# --- the report ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    metric: str        # section.metric as recorded
    label: str
    digits: int = 0
    ratios: bool = True    # False where a ratio means nothing (counts, signed growth)


MAIN_ROWS = (
    Row("small.rps", "small keep-alive (wrk -c50): req/s"),
    Row("small.p50_ms", "small keep-alive: p50 ms", 3),
    Row("small.p99_ms", "small keep-alive: p99 ms", 3),
    Row("small.cpu_us", "small keep-alive: proxy CPU us/req", 1),
    Row("small.cpu_user_us", "small keep-alive: ...of which user space (not kernel)", 1),
    Row("large.mibps", "1 MiB responses (wrk -c10): MiB/s"),
    Row("large.cpu_us", "1 MiB responses: proxy CPU us/response", 0),
    Row("bulk.gbps", "iperf3 single stream: Gbit/s", 2),
    Row("bulk.cpu_us_per_mib", "iperf3: proxy CPU us/MiB", 1),
    Row("connect.cps", "new connections (Connection: close): conn/s"),
    Row("connect.p99_ms", "new connections: p99 ms", 3),
    Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
    Row("memory.kib_per_conn", "idle connections: proxy RSS KiB/conn", 2),
    Row("memory.fds_per_conn", "idle connections: proxy fds/conn", 2),
)
VARIANT_ROWS = (
    Row("small.rps", "small keep-alive: req/s"),
    Row("small.p99_ms", "small keep-alive: p99 ms", 3),
    Row("small.cpu_us", "small keep-alive: proxy CPU us/req", 1),
    Row("small.cpu_user_us", "small keep-alive: ...of which user space (not kernel)", 1),
    Row("connect.cps", "new connections: conn/s"),
    Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
)
VARIANT_LABELS = {"gproxyd+healthy": ("healthy shadow", "shadow"),
                  "gproxyd+stalled": ("stalled shadow", "shadow"),
                  "gproxyd+http": ("http observer", "observer"),
                  "gproxyd+hook": ("no-op hook", "observer")}
MATRIX = (("gproxyd", "a) none"), ("gproxyd+healthy", "b) healthy"),
          ("gproxyd+stalled", "c) stalled"), ("gproxyd+dead", "d) dead"),
          ("gproxyd+batched", "e) healthy, 5ms"))
MATRIX_ROWS = (
    Row("fixed.rps", "fixed rate: achieved req/s"),
    Row("fixed.p50_ms", "fixed rate: p50 ms", 3),
    Row("fixed.p99_ms", "fixed rate: p99 ms", 3),
    Row("fixed.errors", "fixed rate: wrk errors", ratios=False),
    Row("saturation.rps", "saturation (wrk -c50): req/s"),
    Row("saturation.p50_ms", "saturation: p50 ms", 3),
    Row("saturation.p99_ms", "saturation: p99 ms", 3),
    Row("saturation.errors", "saturation: wrk errors", ratios=False),
    Row("saturation.cpu_us", "saturation: CPU us/req, gproxyd", 1),
    Row("saturation.cpu_user_us", "saturation: ...of which gproxyd's user space", 1),
    Row("saturation.cpu_us_nginx", "saturation: CPU us/req, production nginx", 1),
    Row("saturation.cpu_us_nginx_shadow", "saturation: CPU us/req, shadow nginx", 1,
        ratios=False),
    Row("saturation.cpu_us_wrk", "saturation: CPU us/req, wrk", 1),
    Row("saturation.rss_growth_kib", "saturation: proxy RSS growth in one run, KiB",
        ratios=False),
    Row("saturation.kernel_queued_per_conn_kib",
        "saturation: kernel-queued KiB, most for one shadow conn", ratios=False),
)


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(top: float | None, bottom: float | None) -> str:
    if top is None or not bottom:
        return "n/a"
    return f"{top / bottom:.2f}"


def main_table(bench: Bench) -> list[list[str]]:
    header = ["metric (median)", "direct", "haproxy", "gproxyd", "gproxyd/haproxy",
              "gproxyd/direct"]
    rows = [header]
    for row in MAIN_ROWS:
        if not any(k[1] == row.metric for k in bench.samples) and \
                row.metric.split(".")[0] not in bench.args.sections_run:
            continue
        direct, haproxy, gproxyd = (bench.median(t, row.metric)
                                    for t in ("direct", "haproxy", "gproxyd"))
        rows.append([row.label, fmt(direct, row.digits), fmt(haproxy, row.digits),
                     fmt(gproxyd, row.digits), ratio(gproxyd, haproxy), ratio(gproxyd, direct)])
    for name, (label, section) in VARIANT_LABELS.items():
        if name not in bench.targets or section not in bench.args.only:
            continue
        if not any(k[0] == name for k in bench.samples):
            rows.append([f"[{label}]: every metric", "", "", "n/a", "", ""])
            continue
        for row in VARIANT_ROWS:
            direct, haproxy, value = (bench.median(t, row.metric)
                                      for t in ("direct", "haproxy", name))
            rows.append([f"{row.label} [{label}]", fmt(direct, row.digits),
                         fmt(haproxy, row.digits), fmt(value, row.digits),
                         ratio(value, haproxy), ratio(value, direct)])
    return rows


def matrix_table(bench: Bench) -> list[list[str]]:
    rows = [["metric (median), ~1 KiB POSTs"] + [label for _, label in MATRIX]
            + [f"{label[0]}/a" for _, label in MATRIX[1:]]]
    for row in MATRIX_ROWS:
        values = [bench.median(name, row.metric) for name, _ in MATRIX]
        rows.append([row.label] + [fmt(v, row.digits) for v in values]
                    + [ratio(v, values[0]) if row.ratios else "" for v in values[1:]])
    return rows


# (workers = 1, workers = 2) pairs: where wrk and nginx need the second core, and where
# the proxy's own work leaves it mostly free.
WORKERS = ((("gproxyd+http", "protocol = http"), ("gproxyd+http+2w", "")),
           (("gproxyd+busy", "hooks = busy_hook.py"), ("gproxyd+busy+2w", "")))
WORKERS_ROWS = (
    Row("workers.rps", "small keep-alive (wrk -c50): req/s"),
    Row("workers.p99_ms", "small keep-alive: p99 ms", 3),
    Row("workers.cpu_us", "proxy CPU us/req (all processes)", 1),
)


def workers_table(bench: Bench) -> list[list[str]]:
    rows = [["metric (median)", "route", "workers = 1", "workers = 2", "2/1"]]
    for (one_name, route), (two_name, _) in WORKERS:
        for row in WORKERS_ROWS:
            one, two = (bench.median(name, row.metric) for name in (one_name, two_name))
            rows.append([row.label, route, fmt(one, row.digits), fmt(two, row.digits),
                         ratio(two, one)])
    return rows


def long_run_lines(bench: Bench) -> list[str]:
    """One line per long run: throughput, the proxy's RSS over time and, with a stalled
    shadow, what the kernel held for it (the proxy's own buffer only fills after that)."""
    lines = []
    for item in bench.raw:
        if item.get("section") != "long" or "values" not in item:
            continue
        values = item["values"]
        samples = values.get("rss_samples_kib", [])
        every = max(1, len(samples) // 12)
        series = ", ".join(f"{kib / 1024:.0f}" for kib in samples[::every])
        line = (f"{item['target']}: {bench.args.stall_seconds:g} s at saturation (wrk "
                f"-c{LONG_RUN_CONNECTIONS}), "
                f"{values['rps']:,.0f} req/s, {values['errors']} wrk errors; proxy RSS "
                f"{values.get('rss_start_kib', 0) / 1024:.1f} -> "
                f"{values.get('rss_end_kib', 0) / 1024:.1f} MiB (max "
                f"{values.get('rss_max_kib', 0) / 1024:.1f}, growth "
                f"{values.get('rss_growth_kib', 0) / 1024:+.1f} MiB); RSS MiB every "
                f"{every} s: {series}")
        if "kernel_queued_kib" in values:
            queued = values["kernel_queued_kib"][::every]
            line += (f"; kernel-queued for the shadow, max "
                     f"{values['kernel_queued_max_kib'] / 1024:.1f} MiB "
                     f"(at most {values['kernel_queued_per_conn_kib'] / 1024:.2f} MiB for one "
                     "connection),"
                     f" MiB every {every} s: {', '.join(f'{q / 1024:.0f}' for q in queued)}")
        lines.append(line)
    return lines


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        out.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                             for i, cell in enumerate(row)))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def machine_description(bench: Bench) -> list[tuple[str, str]]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"unavailable ({error})"
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines()
                 if line.strip()]
        return lines[0] if lines else "?"

    cpu_model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kib = int(handle.readline().split()[1])
    distro = "?"
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        import gevent
        gevent_version = gevent.__version__
    except ImportError:
        gevent_version = "not installed"

    def sysctl(name: str) -> str:
        try:
            with open("/proc/sys/" + name.replace(".", "/")) as handle:
                return " ".join(handle.read().split())
        except OSError:
            return "?"

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", REPO_DIR, *argv], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    if bench.args.gproxyd_rev:
        source = f"commit {git('rev-parse', '--short', bench.args.gproxyd_rev)}"
    else:
        changed = git("status", "--porcelain", "--", "gproxyd")
        source = f"working tree at commit {git('rev-parse', '--short', 'HEAD')}" + (
            f", with uncommitted changes in {len(changed.splitlines())} files of gproxyd/"
            if changed else ", no uncommitted changes in gproxyd/")
    version = subprocess.run([sys.executable, "-m", "gproxyd", "--version"],
                             capture_output=True, text=True, timeout=30,
                             cwd=bench.gproxyd_source, env=gproxyd_env(bench.gproxyd_source))
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", cpu_model),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("distribution", distro),
        ("python", platform.python_version()),
        ("gevent", gevent_version),
        ("gproxyd", f"{_last_line(version)} ({source})"),
        ("haproxy", first_line(["haproxy", "-v"])),
        ("nginx", first_line(["nginx", "-v"])),
        ("wrk", first_line(["wrk", "-v"])),
        ("iperf3", first_line(["iperf3", "-v"])),
        ("open files limit", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])),
        ("load average at start", _loadavg()),
        ("net.ipv4.tcp_rmem / tcp_wmem", f"{sysctl('net.ipv4.tcp_rmem')} / "
                                          f"{sysctl('net.ipv4.tcp_wmem')}"),
    ]


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews the numbers."""
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def report(bench: Bench, elapsed: float) -> str:
    args = bench.args
    pinning = ("proxies on CPUs %s, nginx/wrk/iperf3/backends on CPUs %s"
               % (args.pin_proxy or "any", args.pin_load or "any")
               if args.pin_proxy or args.pin_load else
               "none: every process may run on every CPU")
    rate_method = ("wrk -R" if bench.wrk_rate_flag else
                   f"stock wrk with a Lua delay(): {args.rate_connections} connections, each "
                   f"waiting {max(1, round(args.rate_connections * 1000 / args.rate))} ms "
                   "before each request (closed loop: a slow response delays the next one)")
    md = ["# gproxyd benchmark results", "",
          f"Generated by `bench/run.py` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in "
          f"{elapsed / 60:.1f} minutes.", "",
          "Command:", "", "```", "python3 bench/run.py " + " ".join(
              shlex.quote(a) for a in args.argv), "```", "",
          f"Settings: {args.runs} interleaved runs of {args.duration:g} s per measurement, "
          f"medians reported; sections: {', '.join(s for s in SECTIONS if s in args.only)}; "
          f"wrk threads: {args.threads}; CPU pinning: {pinning}; load average at the end: "
          f"{_loadavg()}.", "",
          "## Machine", ""]
    md += [f"- {key}: {value}" for key, value in bench.machine]
    md += ["", "## Targets", ""]
    md += [f"- **{t.name}**: {t.description}" + (f" — n/a: {t.error}" if t.error else "")
           for t in bench.targets.values()]
    table = main_table(bench)
    if len(table) > 1:
        md += ["", "## Results", "",
               "Ratios are gproxyd's value over the other one's: above 1 is better for "
               "req/s, MiB/s, Gbit/s and conn/s, worse for latency, CPU and memory. Rows "
               "marked [...] are gproxyd variants; their direct and haproxy columns repeat "
               "the plain numbers for comparison. Proxy CPU is utime+stime of the proxy's "
               "whole process tree from /proc, over the run, divided by completed requests "
               "(or MiB). Idle memory: (RSS with the connections held - RSS before the "
               "first hold) / connections, each proven open end to end by a 1-byte echo.",
               "", markdown_table(table)]
    if "shadow-matrix" in args.only:
        md += ["", "## Shadow cost (shadow issue)", "",
               f"~{POST_BODY_SIZE} B POST bodies to /post, every variant a gproxyd of its "
               f"own. Fixed rate: {args.rate} req/s offered by {rate_method}. Saturation: "
               "wrk -c50. The proxy's RSS is sampled once a second; kernel-queued is what "
               "/proc/net/tcp shows waiting in the send queues towards the stalled shadow "
               "and unread at its end: only past that does gproxyd's own shadow-buffer "
               "fill. Before each stalled run the stalled server resets the connections "
               "earlier runs left.", "",
               markdown_table(matrix_table(bench)), "",
               f"Long runs ({args.stall_seconds:g} s):", ""]
        md += [f"- {line}" for line in long_run_lines(bench)] or ["- n/a"]
    if "workers" in args.only:
        md += ["", "## workers = N", "",
               "Two routes, each with workers = 1 and workers = 2 (SO_REUSEPORT, one "
               "master), small keep-alive requests: protocol = http, where wrk and nginx "
               "need most of what one worker leaves of two cores, and hooks = "
               "bench/busy_hook.py (~0.1 ms of Python per request), where the proxy needs "
               "several times the CPU of wrk and nginx, so a second core is mostly free "
               "for a second worker.",
               "", markdown_table(workers_table(bench))]
    md += ["", "## Notes", ""]
    md += [f"- {note}" for note in bench.notes] or ["- none"]
    if not args.haproxy_splice:
        md.append("- haproxy runs with its defaults, which do not splice; gproxyd splices "
                  "raw routes. `--haproxy-splice` adds `option splice-request` and "
                  "`option splice-response`, which matters for 1 MiB and iperf3.")
    md += ["- Everything runs on one machine over loopback: load generator, backends and "
           "proxy share its CPUs, so absolute numbers say little about a real network; "
           "the ratios are the point.",
           f"- Raw per-run values: {os.path.relpath(args.raw_path, REPO_DIR)} (not committed)."]
    return "\n".join(md) + "\n"


# --- command line ----------------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if not missing:
        return
    print(f"missing {', '.join(missing)}: running bench/setup.sh", file=sys.stderr)
    done = subprocess.run(["sh", os.path.join(BENCH_DIR, "setup.sh")], timeout=900)
    still = [tool for tool in TOOLS if not shutil.which(tool)]
    if done.returncode != 0 or still:
        sys.exit(f"bench: cannot find {', '.join(still or missing)} "
                 "(run bench/setup.sh as root, or install them)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections:\n" + "\n".join(f"  {k:14} {v}" for k, v in SECTION_HELP.items()))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 runs of 2 s, a 10 s stalled run (a few minutes)")
    parser.add_argument("--runs", type=int, help="interleaved runs per measurement "
                                                 "(default 5; --quick 3)")
    parser.add_argument("--duration", type=float,
                        help="seconds per wrk/iperf3 run (default 10; --quick 2)")
    parser.add_argument("--stall-seconds", type=float,
                        help="length of the long stalled-shadow run (default 60; --quick 10)")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION,...",
                        help="sections to run (default: all)")
    parser.add_argument("--idle-conns", type=int, default=10000,
                        help="idle connections held for the memory section (default 10000)")
    parser.add_argument("--rate", type=int, default=2000,
                        help="offered req/s for the fixed-rate shadow runs (default 2000)")
    parser.add_argument("--rate-connections", type=int, default=50,
                        help="connections for the fixed-rate runs (default 50)")
    parser.add_argument("--threads", type=int, default=1 if (os.cpu_count() or 1) <= 2 else 2,
                        help="wrk threads (default 1 on <= 2 CPUs, else 2)")
    parser.add_argument("--pin-proxy", default="", metavar="CPUS",
                        help="pin haproxy and gproxyd to these CPUs, e.g. 1 (default: no pinning)")
    parser.add_argument("--pin-load", default="", metavar="CPUS",
                        help="pin nginx, wrk, iperf3 and the test servers, e.g. 0")
    parser.add_argument("--haproxy-splice", action="store_true",
                        help="let haproxy splice (option splice-request and "
                             "splice-response; off in its defaults)")
    parser.add_argument("--output", default=os.path.join(BENCH_DIR, "results.md"),
                        help="where the report goes (default bench/results.md)")
    parser.add_argument("--gproxyd-rev", default="", metavar="REV",
                        help="measure gproxyd as committed at REV (git archive into the "
                             "temporary directory) instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.argv = argv
    args.runs = args.runs or (3 if args.quick else 5)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.stall_seconds = args.stall_seconds or (10.0 if args.quick else 60.0)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section {', '.join(sorted(unknown))} "
                     f"(expected some of: {', '.join(SECTIONS)})")
    for flag in ("pin_proxy", "pin_load"):
        try:
            parse_cpus(getattr(args, flag))
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')}: bad CPU list "
                         f"{getattr(args, flag)!r} (expected e.g. 0 or 0,2 or 1-3)")
    args.sections_run = set(args.only)
    if args.only & {"shadow", "observer"}:
        args.sections_run |= {"small", "connect"}
    args.raw_path = os.path.join(BENCH_DIR, "out", time.strftime("raw-%Y%m%d-%H%M%S.json"))
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ensure_tools()
    bench = Bench(args)
    atexit.register(bench.close)  # also on an exception; close() is idempotent
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        bench.machine = machine_description(bench)
        bench.start_backends()
        bench.start_targets()
        for target in bench.targets.values():
            if target.error:
                print(f"{target.name}: n/a: {target.error}", file=sys.stderr)
        bench.run()
    finally:
        bench.close()
    elapsed = time.monotonic() - started
    text = report(bench, elapsed)
    with open(args.output, "w") as handle:
        handle.write(text)
    os.makedirs(os.path.dirname(args.raw_path), exist_ok=True)
    with open(args.raw_path, "w") as handle:
        json.dump({"argv": argv, "runs": bench.raw}, handle, indent=1)
    table = main_table(bench)
    if len(table) > 1:
        print()
        print(text_table(table))
    if "shadow-matrix" in args.only:
        print()
        print(text_table(matrix_table(bench)))
        for line in long_run_lines(bench):
            print(line)
    if "workers" in args.only:
        print()
        print(text_table(workers_table(bench)))
    if bench.notes:
        print("\nnotes:\n" + "\n".join(f"- {note}" for note in bench.notes))
    print(f"\nwrote {os.path.relpath(args.output)} ({elapsed / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
