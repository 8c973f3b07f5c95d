"""The machine a run measured on, for the report: CPUs, memory, kernel, the versions of
everything involved, and the load on it."""
from __future__ import annotations

import os
import platform
import resource
import subprocess

from . import REPO_DIR
from .source import gproxyd_version


def machine_description(gproxyd_rev: str, gproxyd_source: str) -> list[tuple[str, str]]:
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

    if gproxyd_rev:
        source = f"commit {git('rev-parse', '--short', gproxyd_rev)}"
    else:
        changed = git("status", "--porcelain", "--", "gproxyd")
        source = f"working tree at commit {git('rev-parse', '--short', 'HEAD')}" + (
            f", with uncommitted changes in {len(changed.splitlines())} files of gproxyd/"
            if changed else ", no uncommitted changes in gproxyd/")
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", cpu_model),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("distribution", distro),
        ("python", platform.python_version()),
        ("gevent", gevent_version),
        ("gproxyd", f"{gproxyd_version(gproxyd_source)} ({source})"),
        ("haproxy", first_line(["haproxy", "-v"])),
        ("nginx", first_line(["nginx", "-v"])),
        ("wrk", first_line(["wrk", "-v"])),
        ("iperf3", first_line(["iperf3", "-v"])),
        ("open files limit", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])),
        ("load average at start", loadavg()),
        ("net.ipv4.tcp_rmem / tcp_wmem", f"{sysctl('net.ipv4.tcp_rmem')} / "
                                          f"{sysctl('net.ipv4.tcp_wmem')}"),
    ]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews the numbers."""
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])
