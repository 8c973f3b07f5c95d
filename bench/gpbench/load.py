"""The load generators: wrk and iperf3 runs against a target, with the CPU and RSS of
the proxy (and the CPU of the other processes involved) measured around each run."""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import time
from dataclasses import dataclass, field

from . import BenchError
from .processes import child_setup
from .procfs import shadow_queues, tree_cpu_seconds, tree_cpu_times, tree_rss_kib
from .targets import Target

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


class Wrk:
    """Runs wrk pinned to CPUS with THREADS threads; its Lua scripts and output go to
    WORKDIR. WATCHED maps a name to the pid of each process (the nginx instances) whose
    CPU every run also reports; the rig adds to it as they start."""

    def __init__(self, workdir: str, threads: int, cpus: set[int] | None,
                 watched: dict[str, int]):
        self.workdir = workdir
        self.threads = threads
        self.cpus = cpus
        self.watched = watched
        self.scripts: dict[tuple, str] = {}

    def script(self, method: str = "GET", body_size: int = 0, delay_ms: int = 0) -> str:
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

    def run(self, target: Target, path: str, connections: int, seconds: float,
            script: str, headers: tuple[str, ...] = (), rate: int = 0) -> WrkResult:
        threads = min(self.threads, connections)
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
                "--timeout", "5s", "-s", script]
        if rate:
            argv += ["-R", str(rate)]
        for header in headers:
            argv += ["-H", header]
        argv.append(f"{target.scheme}://127.0.0.1:{target.http_port}{path}")
        pid = target.pid
        user_before, system_before = tree_cpu_times(pid) if pid else (0.0, 0.0)
        others_before = {name: tree_cpu_seconds(p) for name, p in self.watched.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss: list[int] = []
        queued: list[tuple[int, int, int]] = []
        out_path = os.path.join(self.workdir, "wrk.out")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    preexec_fn=child_setup(self.cpus))
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
                  for name, p in self.watched.items()}
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


def wrk_supports_rate() -> bool:
    """True for wrk2-style builds that take -R/--rate (stock wrk does not)."""
    try:
        done = subprocess.run(["wrk"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(re.search(r"^\s+-R,\s+--rate", done.stdout + done.stderr, re.M))


def run_iperf3(port: int, seconds: int, cpus: set[int] | None) -> dict:
    """One iperf3 TCP stream to 127.0.0.1:PORT; its report's `sum_received`. A failure
    raises BenchError and may leave the iperf3 server busy: the caller restarts it."""
    try:
        done = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
             "-J", "--connect-timeout", "3000"],
            capture_output=True, text=True, timeout=seconds + 30,
            preexec_fn=child_setup(cpus))
    except subprocess.TimeoutExpired:
        raise BenchError(f"iperf3 did not finish within {seconds + 30} s") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"error": (done.stdout + done.stderr).strip()[-200:]}
    if "error" in report or done.returncode != 0:
        raise BenchError(f"iperf3: {report.get('error', 'exit %d' % done.returncode)}")
    return report["end"]["sum_received"]
