"""What every scenario shares: gproxyd started from a temporary config (the integration
tests' Daemon: readiness by NOTIFY_SOCKET), the real servers (nginx, redis-server, the
stalled shadow), wrk, a process's RSS and CPU from /proc, and the row a scenario reports."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gevent
from gpbench.configs import nginx_conf  # noqa: E402
from gpbench.load import WRK_REPORT  # noqa: E402
from gpbench.processes import Processes, wait_listening  # noqa: E402
from gpbench.procfs import process_tree, tree_cpu_seconds, tree_fds, tree_rss_kib  # noqa: E402
from service import Daemon, free_port, gproxyd_command, wait_until  # noqa: E402,F401

from . import BENCH_DIR, REPO_DIR  # noqa: F401 - re-exported to the scenarios

MIB = 1 << 20


class ScenarioError(Exception):
    """A scenario could not be measured (a server did not start, a wait ran out)."""


@dataclass
class Row:
    """One scenario's line of the table. VERDICT: "ok" (behaves as #15 asks), "DEFECT"
    (it does not: the report says how to reproduce), "measured" (a number, no pass/fail),
    "error" (could not be measured)."""
    number: int
    title: str
    before: str
    now: str = ""
    verdict: str = ""
    seconds: float = 0.0


def global_section(admin: str = "off", *lines: str, level: str = "warning") -> str:
    """warning by default: a log line per connection would be most of the daemon's work
    in the scenarios that open thousands."""
    return ("[gproxyd]\n"
            f"admin = {admin}\n"
            f"log-level = {level}\n"
            "drain-timeout = 5s\n"
            + "".join(line + "\n" for line in lines) + "\n")


def route(name: str, port: int, production: str, **keys: str) -> str:
    text = f"[route {name}]\nlisten = 127.0.0.1:{port}\nproduction = {production}\n"
    return text + "".join(f"{key.replace('_', '-')} = {value}\n"
                          for key, value in keys.items()) + "\n"


def fd_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: the child's open-files limit, soft and hard (what `prlimit
    --nofile=LIMIT:LIMIT` does to a running process)."""
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return setup


class Bench:
    """The temporary directory, every process started (stopped by close()), and the real
    servers, started once and shared by the scenarios that need them."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.daemons: list[Daemon] = []
        self._nginx: dict[str, int] = {}
        self._redis: dict[str, int] = {}

    def directory(self, name: str) -> Path:
        path = Path(self.workdir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def daemon(self, name: str, config: str, extra_args: list[str] | None = None,
               preexec_fn: Callable[[], None] | None = None, ready: bool = True,
               directory: Path | None = None) -> Daemon:
        daemon = Daemon(directory or self.directory(name), config, extra_args=extra_args)
        self.daemons.append(daemon)
        daemon.start(wait_ready=False, preexec_fn=preexec_fn)
        if ready:
            try:
                daemon.notify.wait_for("READY=1", timeout=20)
            except AssertionError:
                status = daemon.process.poll()
                said = daemon.process.stderr.read().decode(errors="replace") \
                    if status is not None else ""
                raise ScenarioError(f"{name}: gproxyd not ready in 20 s (exit {status}): "
                                    f"{(said + daemon.log())[-300:]!r}") from None
        return daemon

    def stop(self, daemon: Daemon) -> None:
        daemon.stop()
        if daemon in self.daemons:
            self.daemons.remove(daemon)

    def nginx(self, name: str = "nginx") -> int:
        """An nginx of bench/run.py's configuration (/small, /1m, /post); NAME tells a
        second instance (a healthy shadow) from the first."""
        if name not in self._nginx:
            prefix = self.directory(name)
            www = self.directory("www")
            (www / "1m").write_bytes(os.urandom(MIB))
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(nginx_conf(str(prefix), port, str(www)))
            proc, log = self.procs.start(name, ["nginx", "-p", str(prefix), "-c", str(conf),
                                                "-e", str(prefix / "error.log")])
            wait_listening([port], proc, log)
            self._nginx[name] = port
        return self._nginx[name]

    def redis(self, name: str = "redis") -> int:
        """A redis-server of our own on a free port (not the system's on 6379)."""
        if name not in self._redis:
            port = free_port()
            proc, log = self.procs.start(name, [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.directory(name))])
            wait_listening([port], proc, log)
            self._redis[name] = port
        return self._redis[name]

    def close(self) -> None:
        for daemon in list(self.daemons):
            try:
                daemon.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        self.daemons.clear()
        self.procs.stop_all()


# -- numbers from /proc and the admin endpoint -----------------------------------------------

def rss_mib(pid: int) -> float:
    return tree_rss_kib(pid) / 1024


def cpu_seconds(pid: int) -> float:
    return tree_cpu_seconds(pid)


class PeakRss:
    """Samples a process tree's RSS every INTERVAL seconds in a greenlet until stopped."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.peak = 0.0
        self.samples: list[float] = []
        self.greenlet = gevent.spawn(self._run, interval)

    def _run(self, interval: float) -> None:
        while True:
            value = rss_mib(self.pid)
            self.samples.append(value)
            self.peak = max(self.peak, value)
            gevent.sleep(interval)

    def stop(self) -> float:
        self.greenlet.kill()
        return self.peak


def settle_fds(pid: int, at_most: int, timeout: float = 20.0) -> int:
    """Wait until the tree holds AT_MOST descriptors (bounded); returns the count."""
    deadline = time.monotonic() + timeout
    count = tree_fds(pid)
    while count > at_most and time.monotonic() < deadline:
        gevent.sleep(0.25)
        count = tree_fds(pid)
    return count


def admin_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
        return answer.read()


def stats(port: int) -> dict:
    return json.loads(admin_get(port, "/stats"))


def log_problems(text: str) -> list[str]:
    """The log lines that say something broke inside gproxyd itself (a traceback, an
    unexpected exception), as opposed to a client's or backend's error."""
    return [line for line in text.splitlines()
            if "Traceback" in line or "unexpected" in line.lower()
            or "Exception" in line]


def alive(daemon: Daemon) -> bool:
    return daemon.process.poll() is None


def processes_of(pid: int) -> int:
    return len(process_tree(pid))


# -- wrk -----------------------------------------------------------------------------------

class Wrk:
    """One wrk run in the background; result() waits for it (or stops it with SIGINT,
    after which wrk still reports) and returns its counts."""

    def __init__(self, workdir: str, port: int, path: str, connections: int, seconds: float,
                 headers: tuple[str, ...] = (), lua: str = ""):
        script = os.path.join(workdir, f"wrk-{os.getpid()}-{id(self)}.lua")
        with open(script, "w") as handle:
            handle.write(lua + "\n" + WRK_REPORT)
        argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
                "--timeout", "5s", "-s", script]
        for header in headers:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{port}{path}")
        self.out = os.path.join(workdir, f"wrk-{id(self)}.out")
        self.seconds = seconds
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def result(self) -> dict:
        try:
            self.proc.wait(self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise ScenarioError("wrk did not finish") from None
        with open(self.out, errors="replace") as handle:
            output = handle.read()
        match = re.search(r"^BENCH-RESULT (\{.*\})$", output, re.M)
        if not match:
            raise ScenarioError(f"wrk failed (exit {self.proc.returncode}): "
                                f"{' '.join(output.split())[-200:]}")
        data = json.loads(match.group(1))
        # "status" counts the answers that were not 2xx/3xx
        data["errors"] = int(sum(data[key] for key in ("connect", "read", "write", "timeout",
                                                       "status")))
        data["p50_ms"], data["p99_ms"] = data["p50_us"] / 1000, data["p99_us"] / 1000
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        return data


def run_wrk(workdir: str, port: int, path: str, connections: int, seconds: float,
            headers: tuple[str, ...] = (), lua: str = "") -> dict:
    return Wrk(workdir, port, path, connections, seconds, headers, lua).result()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks, size = [], 0
    while size < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)
