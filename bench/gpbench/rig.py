"""The running benchmark: its temporary directory, the backends and targets the running
sections need, the interleaved runs and every value they measured."""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from . import BENCH_DIR, REPO_DIR, BenchError
from .configs import gproxyd_conf, haproxy_conf, nginx_conf
from .load import Wrk, wrk_supports_rate
from .processes import Processes, log_tail, parse_cpus, readline_bounded, wait_listening
from .procfs import dead_port, free_port, shadow_queues
from .section import Section
from .source import check_config, export_revision, gproxyd_available, gproxyd_env
from .targets import BASE, VARIANTS, Target, Variant

PLAIN = Variant("gproxyd", "gproxyd, plain tcp route")


class Rig:
    """Owns every process it starts (close() stops them and removes the temporary
    directory) and the samples: (target, "measurement.metric") -> one value per run.

    SECTIONS are the sections that run, in the order of the registry."""

    def __init__(self, args: argparse.Namespace, sections: tuple[Section, ...]):
        self.args = args
        self.sections = sections
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
        self.proxy_cpus = parse_cpus(args.pin_proxy)
        self.load_cpus = parse_cpus(args.pin_load)
        self.samples: dict[tuple[str, str], list[float]] = {}   # (target, metric) -> runs
        self.raw: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.targets: dict[str, Target] = {}
        self.nginx_port = self.shadow_nginx_port = self.iperf_port = 0
        self.nginx_pids: dict[str, int] = {}   # "nginx", "nginx-shadow" -> pid
        self.stall_port = self.echo_port = self.dead_port = 0
        self.iperf_proc: subprocess.Popen | None = None
        self.stall_proc: subprocess.Popen | None = None
        self.wrk = Wrk(self.workdir, args.threads, self.load_cpus, self.nginx_pids)
        self.wrk_rate_flag = wrk_supports_rate()
        _, self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        names = {name for section in sections for name in section.variants}
        self.variants = [variant for variant in VARIANTS if variant.name in names]
        for section in sections:
            section.prepare(self)

    # -- what the running sections need

    def needs(self, backend: str) -> bool:
        """BACKEND is "echo", "iperf3", or a shadow: "healthy", "stalled", "dead"."""
        return (any(backend in section.backends for section in self.sections)
                or any(variant.shadow == backend for variant in self.variants))

    def riders(self, measurement: str) -> list[str]:
        """The variants of the running sections that join MEASUREMENT's section."""
        return [name for section in self.sections if measurement in section.joins
                for name in section.variants]

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
        if self.needs("healthy"):
            self.shadow_nginx_port = self.start_nginx("nginx-shadow", www)
        if self.needs("stalled"):
            self.stall_port = self.start_python_server("stall")
            self.stall_proc = self.procs.running[-1][1]
        if self.needs("dead"):
            self.dead_port = dead_port()
        if self.needs("echo"):
            self.echo_port = self.start_python_server("echo")
        if self.needs("iperf3"):
            self.iperf_port = free_port()
            self.start_iperf_server()

    def start_nginx(self, name: str, www: str) -> int:
        prefix = os.path.join(self.workdir, name)
        os.makedirs(prefix)
        port = free_port()
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(nginx_conf(prefix, port, www))
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
        line = readline_bounded(proc, 10.0)
        if not line.startswith("PORT "):
            raise BenchError(f"{kind} server did not start: {log_tail(log)}")
        return int(line.split()[1])

    def start_iperf_server(self) -> None:
        """(Re)start the iperf3 server: a failed test can leave it busy."""
        if self.iperf_proc:
            self.procs.stop(self.iperf_proc)
        proc, log = self.procs.start(
            "iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
            cpus=self.load_cpus)
        wait_listening([self.iperf_port], proc, log)
        self.iperf_proc = proc

    def start_targets(self) -> None:
        self.targets["direct"] = Target("direct", "client straight to the backend",
                                        self.nginx_port, self.iperf_port, self.echo_port)
        self.targets["haproxy"] = self.start_haproxy()
        gproxyd_error = gproxyd_available(self.gproxyd_source)
        shadow_ports = {"healthy": self.shadow_nginx_port, "stalled": self.stall_port,
                        "dead": self.dead_port}
        for variant in [PLAIN] + self.variants:
            target = Target(variant.name, variant.description)
            if variant.shadow == "stalled":
                target.shadow_port = self.stall_port
            self.targets[variant.name] = target
            if gproxyd_error:
                target.error = gproxyd_error
                continue
            route_lines = variant.route_lines
            if variant.shadow:
                route_lines = (f"shadow = 127.0.0.1:{shadow_ports[variant.shadow]}",
                               *route_lines)
            try:
                self.start_gproxyd(target, route_lines, variant is PLAIN,
                                   variant.global_lines)
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
        listens = [(name, port, backend)
                   for name, port, backend in (("http", target.http_port, self.nginx_port),
                                               ("bulk", target.bulk_port, self.iperf_port),
                                               ("hold", target.hold_port, self.echo_port))
                   if port]
        conf = os.path.join(self.workdir, "haproxy.cfg")
        with open(conf, "w") as handle:
            handle.write(haproxy_conf(maxconn, maxpipes, self.args.haproxy_splice, listens))
        try:
            target.proc, target.log = self.procs.start(
                "haproxy", ["haproxy", "-db", "-f", conf], cpus=self.proxy_cpus)
            wait_listening([p for p in (target.http_port, target.bulk_port, target.hold_port)
                            if p], target.proc, target.log)
        except (BenchError, OSError) as error:
            target.error = str(error)
        return target

    def start_gproxyd(self, target: Target, route_lines: tuple[str, ...], all_routes: bool,
                      global_lines: tuple[str, ...]) -> None:
        target.http_port = free_port()
        routes = [("http", target.http_port, self.nginx_port, route_lines)]
        if all_routes:
            if self.iperf_port:
                target.bulk_port = free_port()
                routes.append(("bulk", target.bulk_port, self.iperf_port, ()))
            if self.echo_port:
                target.hold_port = free_port()
                routes.append(("hold", target.hold_port, self.echo_port, ()))
        conf = os.path.join(self.workdir, f"{target.name}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(global_lines, routes))
        check_config(conf, self.gproxyd_source)
        target.proc, target.log = self.procs.start(
            target.name, [sys.executable, "-m", "gproxyd", "-c", conf],
            cpus=self.proxy_cpus, env=gproxyd_env(self.gproxyd_source), cwd=self.gproxyd_source)
        wait_listening([port for port in (target.http_port, target.bulk_port,
                                          target.hold_port) if port], target.proc, target.log)

    # -- measuring

    def run(self) -> None:
        """Warm the targets up, then let every running section measure, in turn."""
        names = list(BASE)
        for section in self.sections:
            names += [name for name in section.warm_up if name not in names]
        self.warm_up(names)
        for section in self.sections:
            section.run(self)

    def warm_up(self, names: list[str]) -> None:
        for name in names:
            target = self.targets[name]
            if target.error or not target.http_port:
                continue
            try:
                self.wrk.run(target, "/small", 10, 1, self.wrk.script())
            except BenchError as error:
                target.error = f"{name}: warm-up failed: {error}"

    def interleaved(self, measurement: str, targets: list[str],
                    measure: Callable[[Target], dict[str, Any]],
                    runs: int | None = None) -> None:
        """Run MEASURE for each target in turn, RUNS times round (direct, haproxy, gproxyd,
        direct, ...), so slow drifts of the machine hit every target alike. Numbers it
        returns are recorded as MEASUREMENT.metric."""
        runs = runs or self.args.runs
        print(f"{measurement}: {runs} runs x {', '.join(targets)}", file=sys.stderr)
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
                    self.failed(target, measurement, error)
                    continue
                for metric, value in values.items():
                    if isinstance(value, (int, float)):
                        self.record(name, f"{measurement}.{metric}", value)
                self.raw.append({"target": name, "section": measurement, "run": run,
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

    # -- recording

    def record(self, target: str, metric: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault((target, metric), []).append(value)

    def median(self, target: str, metric: str) -> float | None:
        values = self.samples.get((target, metric))
        return statistics.median(values) if values else None

    def failed(self, target: Target, measurement: str, error: Exception) -> None:
        message = f"{target.name} {measurement}: {error}"
        # A target that never started is explained once, in the list of targets.
        if str(error) != target.error and message not in self.notes:
            self.notes.append(message)
        self.raw.append({"target": target.name, "section": measurement, "error": str(error)})
        print(f"  {target.name:16} {measurement}: FAILED {error}", file=sys.stderr)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
