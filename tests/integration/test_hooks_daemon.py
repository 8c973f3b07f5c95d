"""Hooks cannot stop the daemon (issue #15 item 1), with the installed gproxyd: whatever a
hook raises, leaves behind or loops in closes its own connection only; a hooks file whose
import calls sys.exit() is a configuration error; the watchdog (hook-timeout) interrupts
a hook that holds the event loop, so other routes and SIGTERM are served again."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    children,
    exchange,
    free_port,
    gproxyd_command,
    live_connection,
    route_section,
    wait_until,
)

from gproxyd.exitcodes import EX_CONFIG, EX_OK

HOOK_TIMEOUT = 0.5
DRAIN_TIMEOUT = 2.0

MISBEHAVING_HOOKS = '''\
import sys
import time

import gevent
from greenlet import GreenletExit


def on_data(conn, data):
    word = data.strip()
    if word == b"spin":
        open({marker!r}, "w").close()
        deadline = time.monotonic() + 30  # bounded: without a watchdog a test fails
        while time.monotonic() < deadline:
            pass
    elif word == b"exit":
        sys.exit(3)
    elif word == b"interrupt":
        raise KeyboardInterrupt
    elif word == b"greenletexit":
        raise GreenletExit
    elif word == b"timeout":
        with gevent.Timeout(0.01):
            gevent.sleep(1)
    elif word == b"leave-timeout":
        gevent.Timeout(0.05).start()
    elif word == b"leave-exit":
        gevent.Timeout(0.05, SystemExit(9)).start()
    elif word == b"spawn-exit":
        gevent.spawn(sys.exit, 7)
    return data
'''

PASSING_HOOKS = "def on_data(conn, data):\n    return data\n"
EXITING_HOOKS = "import sys\n\nsys.exit()\n"


@pytest.fixture
def backend():
    server = TaggedEcho(b"a")
    yield server
    server.stop()


class Setup:
    """A daemon with a hooked route (MISBEHAVING_HOOKS) and a plain one, same backend."""

    def __init__(self, tmp_path, backend, daemons, hook_timeout: str = f"{HOOK_TIMEOUT}s",
                 workers: int = 1, hooks: str | None = None):
        self.marker = tmp_path / "spinning"
        self.hooks_file = tmp_path / "misbehaving.py"
        self.hooks_file.write_text(hooks or MISBEHAVING_HOOKS.format(marker=str(self.marker)))
        self.hooked, self.plain = free_port(), free_port()
        self.text = (GLOBAL.replace("drain-timeout = 10s",
                                    f"drain-timeout = {DRAIN_TIMEOUT}s\n"
                                    f"hook-timeout = {hook_timeout}\nworkers = {workers}")
                     + route_section("hooked", self.hooked, backend.address,
                                     hooks=str(self.hooks_file))
                     + route_section("plain", self.plain, backend.address))
        self.hooks_line = self.text.splitlines().index(f"hooks = {self.hooks_file}") + 1
        self.daemon = daemons(tmp_path, self.text)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.hooked), timeout=10)

    def closed_line(self, sock: socket.socket) -> str:
        """The connection's log line, once the daemon has logged it."""
        client = f" client=127.0.0.1:{sock.getsockname()[1]} "
        return wait_until(lambda: next((line for line in self.daemon.log().splitlines()
                                        if client in line and " close=" in line), None),
                          what=f"the log line of{client}")


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the daemon sends until it closes the connection (FIN or RST)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def watchdog_threads(pid: int) -> int:
    """The threads of process `pid` named hook-watchdog."""
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                count += comm.read().strip() == "hook-watchdog"
        except OSError:
            pass
    return count


def stop(daemon: Daemon) -> None:
    """SIGTERM: the daemon drains and exits 0 within drain-timeout (and a margin)."""
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=DRAIN_TIMEOUT + 5) == EX_OK


# --- a hook in a CPU loop ----------------------------------------------------------------------

def test_a_hook_in_a_cpu_loop_is_interrupted_and_other_routes_and_sigterm_are_served(
        tmp_path, backend, daemons):
    setup = Setup(tmp_path, backend, daemons)
    daemon = setup.daemon.start()
    plain = live_connection(setup.plain)

    spinning = setup.connect()
    started = time.monotonic()
    spinning.sendall(b"spin")
    assert read_until_closed(spinning) == b""
    assert time.monotonic() - started < 10, "the hook ran its 30 s: it was not interrupted"
    line = setup.closed_line(spinning)
    assert line.endswith(" close=hook on_data failed: HookTimeout")
    client = f"127.0.0.1:{spinning.getsockname()[1]}"
    failure = re.search(
        rf"error: route hooked client {client}: hook on_data \({setup.hooks_file}\) failed, "
        r"closing the connection: HookTimeout: held the event loop for more than "
        rf"[0-9.]+s without yielding \(hook-timeout {HOOK_TIMEOUT:g}s\)\n"
        rf'  File "{setup.hooks_file}", line 1[34], in on_data\n', daemon.log())
    assert failure, daemon.log()

    plain.sendall(b"2")  # the other route's live connection was only delayed
    assert plain.recv(100) == b"a:2"
    plain.close()
    assert exchange(setup.hooked, b"fine") == b"a:fine"
    stop(daemon)


def test_sigterm_while_a_hook_spins_stops_the_daemon(tmp_path, backend, daemons):
    setup = Setup(tmp_path, backend, daemons)
    daemon = setup.daemon.start()
    spinning = setup.connect()
    spinning.sendall(b"spin")
    wait_until(setup.marker.exists, what="the hook spinning")
    stop(daemon)  # queued while the hook spins, handled once it is interrupted
    log = daemon.log()
    assert "failed, closing the connection: HookTimeout" in log
    assert log.index("HookTimeout") < log.index("SIGTERM: stopping")
    assert read_until_closed(spinning) == b""


@pytest.mark.parametrize("workers", [1, 2])
def test_the_watchdog_thread_runs_only_with_hooks_and_a_hook_timeout(tmp_path, backend,
                                                                     daemons, workers):
    """hook-timeout = 0: no thread; a reload to 0.5s starts it (in each serving process:
    the workers, not the arbiter). A daemon without hooks has none either."""
    (tmp_path / "hooked").mkdir()
    setup = Setup(tmp_path / "hooked", backend, daemons, hook_timeout="0", workers=workers)
    daemon = setup.daemon.start()
    serving = children(daemon.pid) if workers > 1 else [daemon.pid]
    assert len(serving) == workers
    for number in range(4):  # the loops have turned since the hooks were loaded
        assert exchange(setup.hooked, b"%d" % number) == b"a:%d" % number
    assert [watchdog_threads(pid) for pid in serving + [daemon.pid]] == [0] * (workers + 1)

    daemon.write_config(setup.text.replace("hook-timeout = 0\n", "hook-timeout = 0.5s\n"))
    daemon.reload()
    if workers > 1:  # new workers replace the old ones
        wait_until(lambda: len(set(children(daemon.pid)) - set(serving)) == workers,
                   what="the new workers")
        wait_until(lambda: len(children(daemon.pid)) == workers, what="the old workers gone")
        serving = children(daemon.pid)
    wait_until(lambda: all(watchdog_threads(pid) == 1 for pid in serving),
               what="one watchdog thread in each serving process")
    if workers > 1:
        assert watchdog_threads(daemon.pid) == 0  # the arbiter runs no hooks

    (tmp_path / "plain").mkdir()
    plain_only = daemons(tmp_path / "plain",
                         GLOBAL.replace("admin = off", "admin = off\nhook-timeout = 0.5s")
                         + route_section("plain", free_port(), backend.address)).start()
    assert watchdog_threads(plain_only.pid) == 0


# --- what a hook raises or leaves behind --------------------------------------------------------

def test_whatever_a_hook_raises_or_leaves_behind_closes_its_connection_only(tmp_path, backend,
                                                                            daemons):
    setup = Setup(tmp_path, backend, daemons)
    daemon = setup.daemon.start()
    plain = live_connection(setup.plain)
    cases = [  # what the hook does, what the client gets, the connection's close reason
        (b"exit", b"", "hook on_data failed: SystemExit"),
        (b"interrupt", b"", "hook on_data failed: KeyboardInterrupt"),
        (b"greenletexit", b"", "hook on_data failed: GreenletExit"),
        (b"timeout", b"", "hook on_data failed: Timeout"),
        # A timeout the hook started and left running fires in the connection's greenlet
        # after the hook returned (here: raising SystemExit, which used to end the daemon).
        (b"leave-timeout", b"a:leave-timeout", "hook failed: Timeout"),
        (b"leave-exit", b"a:leave-exit", "hook failed: SystemExit"),
    ]
    for word, answer, reason in cases:
        sock = setup.connect()
        sock.sendall(word)
        assert read_until_closed(sock) == answer, word
        assert setup.closed_line(sock).endswith(f" close={reason}"), word
        assert daemon.process.poll() is None, f"{word!r} stopped the daemon"
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        assert f"error: route hooked client {client}: hook" in daemon.log(), word

    plain.sendall(b"2")
    assert plain.recv(100) == b"a:2"
    plain.close()
    assert exchange(setup.hooked, b"fine") == b"a:fine"
    stop(daemon)
    assert "Traceback" not in daemon.process.stderr.read().decode()


def test_a_greenlet_a_hook_spawns_cannot_exit_the_daemon(tmp_path, backend, daemons):
    """gevent's hub ends the process when a greenlet raises SystemExit; the daemon's
    does not: that greenlet ends, its traceback goes to standard error."""
    setup = Setup(tmp_path, backend, daemons)
    daemon = setup.daemon.start()
    sock = setup.connect()
    sock.sendall(b"spawn-exit")
    assert sock.recv(100) == b"a:spawn-exit"
    time.sleep(0.3)  # the spawned greenlet has run
    assert daemon.process.poll() is None, "a greenlet's SystemExit stopped the daemon"
    sock.sendall(b"more")
    assert sock.recv(100) == b"a:more"
    sock.close()
    assert exchange(setup.hooked, b"fine") == b"a:fine"
    stop(daemon)
    assert "SystemExit: 7" in daemon.process.stderr.read().decode()


# --- a hooks file whose import calls sys.exit() --------------------------------------------------

def import_failure(setup: Setup) -> str:
    return (f"{setup.daemon.config_path}:{setup.hooks_line}: hooks: cannot import "
            f"'{setup.hooks_file}': SystemExit at {setup.hooks_file}:3 (expected")


def test_a_hooks_file_calling_sys_exit_fails_check_config_and_start_with_file_and_line(
        tmp_path, backend, daemons):
    setup = Setup(tmp_path, backend, daemons, hooks=EXITING_HOOKS)
    checked = subprocess.run(gproxyd_command() + ["--check-config", "-c",
                                                  str(setup.daemon.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == EX_CONFIG, checked
    assert checked.stderr.startswith(f"gproxyd: {import_failure(setup)}"), checked.stderr

    daemon = setup.daemon.start(wait_ready=False)
    assert daemon.wait(timeout=30) == EX_CONFIG
    assert daemon.process.stderr.read().decode().startswith(f"gproxyd: {import_failure(setup)}")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_to_a_hooks_file_calling_sys_exit_keeps_the_running_config(
        tmp_path, backend, daemons, workers):
    setup = Setup(tmp_path, backend, daemons, workers=workers, hooks=PASSING_HOOKS)
    daemon = setup.daemon.start()
    setup.hooks_file.write_text(EXITING_HOOKS)
    daemon.reload()
    assert f"reload failed: {import_failure(setup)}" in daemon.log()
    assert daemon.process.poll() is None
    for number in range(4):
        assert exchange(setup.hooked, b"%d" % number) == b"a:%d" % number
    stop(daemon)
