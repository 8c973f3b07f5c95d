"""The processes a run starts: each leads its own process group, is pinned and given the
full open-files limit, logs into the temporary directory, and is stopped at the end."""
from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import time
from typing import Callable

from . import BenchError
from .procfs import is_listening


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
                preexec_fn=child_setup(cpus), start_new_session=True, env=env, cwd=cwd)
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


def child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """A preexec_fn: the full open-files limit, and CPUS as the affinity when given."""
    def setup() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def parse_cpus(text: str) -> set[int] | None:
    """'0', '0,2', '1-3' -> a CPU set; '' -> None (no pinning)."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as handle:
            text = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


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


def readline_bounded(proc: subprocess.Popen, timeout: float) -> str:
    """The first line PROC writes to its stdout pipe, or '' after TIMEOUT seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().decode(errors="replace").strip()
