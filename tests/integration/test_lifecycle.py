"""The lifecycle's failure paths, with real processes: hooks that cannot be imported at
start and on reload, the arbiter's supervision of workers that crash, hang or do not
stop (see gproxyd/lifecycle/arbiter.py for the constants these tests rely on), and the
pid file of a daemon that dropped its privileges."""
from __future__ import annotations

import ast
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    children,
    exchange,
    free_port,
    live_connection,
    route_section,
    running,
    wait_until,
)

import gproxyd
from gproxyd.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from gproxyd.lifecycle.arbiter import GIVE_UP_AFTER, KILL_GRACE

# Each process that imports it notes its pid, then fails on line 3.
FAILING_HOOKS = "import os\nopen({marks!r}, 'a').write('%d\\n' % os.getpid())\nvalue = 1 / 0\n"
TAGGING_HOOKS = "def on_data(conn, data):\n    return {tag!r} + data\n"


@pytest.fixture
def backend():
    server = TaggedEcho(b"a")
    yield server
    server.stop()


def hooked_config(port: int, production: str, hooks_file, workers: int = 1,
                  drain_timeout: str = "10s") -> tuple[str, int]:
    """A config with one hooked route; returns (text, the line of its `hooks` key)."""
    head = GLOBAL.replace("10s", drain_timeout)
    if workers > 1:
        head = head.replace("admin = off", f"admin = off\nworkers = {workers}")
    text = head + route_section("web", port, production, hooks=str(hooks_file))
    return text, text.splitlines().index(f"hooks = {hooks_file}") + 1


def worker_config(port: int, production: str, drain_timeout: str = "10s") -> str:
    head = GLOBAL.replace("10s", drain_timeout).replace("admin = off", "admin = off\nworkers = 2")
    return head + route_section("web", port, production)


def import_error(daemon: Daemon, line: int, hooks_file) -> str:
    return (f"{daemon.config_path}:{line}: hooks: cannot import '{hooks_file}': "
            f"ZeroDivisionError: division by zero at {hooks_file}:3")


# --- hooks that cannot be imported -----------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_hooks_that_fail_at_start_exit_78_with_one_line_and_no_restart(tmp_path, daemons,
                                                                       workers):
    """Single process or arbiter: the serving processes import the hooks (no worker is
    restarted), and the one-line FILE:LINE message is what the user sees."""
    marks = tmp_path / "imported-by"
    hooks_file = tmp_path / "failing.py"
    hooks_file.write_text(FAILING_HOOKS.format(marks=str(marks)))
    text, line = hooked_config(free_port(), "127.0.0.1:9", hooks_file, workers)
    daemon = daemons(tmp_path, text)
    daemon.start(wait_ready=False)
    assert daemon.wait(timeout=30) == EX_CONFIG
    stderr = daemon.process.stderr.read().decode()
    assert stderr.startswith(f"gproxyd: {import_error(daemon, line, hooks_file)} (expected")
    assert stderr.count("\n") == 1
    assert import_error(daemon, line, hooks_file) in daemon.log()
    assert "Traceback" not in daemon.log()
    importers = [int(pid) for pid in marks.read_text().split()]
    if workers == 1:
        assert importers == [daemon.pid]
    else:  # each worker at most once (the first failure stops the others); the arbiter never
        assert 1 <= len(importers) <= workers and daemon.pid not in importers
        assert not any(running(pid) for pid in importers)


def test_a_reload_imports_the_hooks_again_and_a_failing_import_keeps_the_old(tmp_path,
                                                                            backend, daemons):
    port = free_port()
    hooks_file = tmp_path / "tagging.py"
    hooks_file.write_text(TAGGING_HOOKS.format(tag=b"v1/"))
    text, line = hooked_config(port, backend.address, hooks_file)
    daemon = daemons(tmp_path, text)
    daemon.start()
    assert exchange(port, b"x") == b"a:v1/x"

    hooks_file.write_text(FAILING_HOOKS.format(marks=str(tmp_path / "marks")))
    daemon.reload()
    assert f"reload failed: {import_error(daemon, line, hooks_file)} (expected" in daemon.log()
    assert "; keeping the running configuration" in daemon.log()
    assert exchange(port, b"y") == b"a:v1/y"

    # The route compares equal, yet its listener takes the hooks imported again.
    hooks_file.write_text(TAGGING_HOOKS.format(tag=b"v2/"))
    daemon.reload()
    assert exchange(port, b"z") == b"a:v2/z"


def test_workers_reload_with_failing_hooks_keeps_the_old_workers(tmp_path, backend, daemons):
    port = free_port()
    hooks_file = tmp_path / "tagging.py"
    hooks_file.write_text(TAGGING_HOOKS.format(tag=b"v1/"))
    text, line = hooked_config(port, backend.address, hooks_file, workers=2)
    daemon = daemons(tmp_path, text)
    daemon.start()
    workers = children(daemon.pid)
    assert len(workers) == 2

    hooks_file.write_text(FAILING_HOOKS.format(marks=str(tmp_path / "marks")))
    daemon.reload()
    assert f"reload failed: {import_error(daemon, line, hooks_file)} (expected" in daemon.log()
    assert "; keeping the running configuration" in daemon.log()
    wait_until(lambda: children(daemon.pid) == workers, what="the failed generation gone")
    for number in range(10):
        assert exchange(port, b"%d" % number) == b"a:v1/%d" % number
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == EX_OK


def test_a_restarted_worker_that_cannot_load_the_config_stops_the_arbiter(tmp_path, backend,
                                                                         daemons):
    """Restarting cannot fix a configuration: no restart loop, the arbiter exits 78."""
    port = free_port()
    daemon = daemons(tmp_path, worker_config(port, backend.address))
    daemon.start()
    workers = children(daemon.pid)
    daemon.write_config(worker_config(port, backend.address) + "[route broken]\n")
    os.kill(workers[0], signal.SIGKILL)
    assert daemon.wait(timeout=30) == EX_CONFIG
    # The config's first error (a loader that reports every error adds a line each).
    assert (f"cannot start: {daemon.config_path}:11: listen: missing in [route broken] "
            "(expected listen = address)") in daemon.log()
    assert "; restarting it cannot fix the configuration: stopping" in daemon.log()
    assert daemon.log().count("starting another") == 1
    assert not any(running(pid) for pid in workers)


def test_a_second_reload_lets_the_first_ones_old_workers_drain(tmp_path, backend, daemons):
    port = free_port()
    daemon = daemons(tmp_path, worker_config(port, backend.address))
    daemon.start()
    first = children(daemon.pid)
    live = live_connection(port)
    daemon.reload()
    daemon.reload()
    wait_until(lambda: len(set(children(daemon.pid)) - set(first)) == 2, what="new workers")
    live.sendall(b"2")
    assert live.recv(10) == b"a:2"  # its worker, told to drain once, still serves it
    live.close()
    wait_until(lambda: not set(first) & set(children(daemon.pid)), what="old workers gone")


# --- supervision ------------------------------------------------------------------------------

def test_crashing_workers_are_restarted_with_back_off_until_the_arbiter_gives_up(
        tmp_path, backend, daemons):
    port = free_port()
    daemon = daemons(tmp_path, worker_config(port, backend.address))
    daemon.start()
    started = set(children(daemon.pid))
    for crash in range(1, GIVE_UP_AFTER + 1):
        victim = children(daemon.pid)[0]
        os.kill(victim, signal.SIGKILL)
        if crash < GIVE_UP_AFTER:
            wait_until(lambda victim=victim: len(children(daemon.pid)) == 2
                       and victim not in children(daemon.pid), timeout=15,
                       what=f"restart after crash {crash}")
            assert exchange(port, b"%d" % crash) == b"a:%d" % crash
            started.update(children(daemon.pid))
    assert daemon.wait(timeout=30) == EX_FAILURE
    log = daemon.log()
    delays = [line.rsplit("starting another in ", 1)[1] for line in log.splitlines()
              if "starting another in " in line]
    assert delays == ["0.25s", "0.5s", "1s", "2s"]
    assert f"{GIVE_UP_AFTER} worker crashes within 60s; giving up" in log
    assert "gproxyd stopped" in log
    assert not any(running(pid) for pid in started)


def test_a_hung_worker_is_killed_and_restarted(tmp_path, backend, daemons):
    port = free_port()
    daemon = daemons(tmp_path, worker_config(port, backend.address))
    daemon.start()
    victim, other = children(daemon.pid)
    os.kill(victim, signal.SIGSTOP)  # really hung: it runs no code at all
    daemon.wait_log(f"(pid {victim}) sent no report for", timeout=10)
    wait_until(lambda: len(children(daemon.pid)) == 2 and victim not in children(daemon.pid),
               timeout=15, what="the hung worker replaced")
    assert other in children(daemon.pid)
    line = [entry for entry in daemon.log().splitlines() if "sent no report" in entry][0]
    assert line.endswith(": hung; killing it")
    assert float(line.split("sent no report for ")[1].split("s:")[0]) >= 1.5  # 3 x 0.5 s
    assert f"(pid {victim}) exited with status -9; starting another" in daemon.log()
    for number in range(20):  # the kernel spreads these over both workers' sockets
        assert exchange(port, b"%d" % number) == b"a:%d" % number


def test_stop_kills_a_worker_still_running_past_drain_timeout_and_grace(tmp_path, backend,
                                                                       daemons):
    port = free_port()
    daemon = daemons(tmp_path, worker_config(port, backend.address, drain_timeout="300ms"))
    daemon.start()
    stuck, other = children(daemon.pid)
    os.kill(stuck, signal.SIGSTOP)  # it cannot drain, nor exit
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=0.3 + KILL_GRACE + 10) == EX_OK
    took = time.monotonic() - started
    assert 0.3 + KILL_GRACE - 0.5 < took < 0.3 + KILL_GRACE + 5
    assert (f"(pid {stuck}) still running 5.3s after it was told to stop "
            f"(drain-timeout + 5s); killing it") in daemon.log()
    assert f"pid {other}) still running" not in daemon.log()
    assert "gproxyd stopped" in daemon.log()
    assert not running(stuck) and not running(other)


# --- the pid file -----------------------------------------------------------------------------

@pytest.mark.parametrize("daemonize", [False, True])
def test_the_pid_file_goes_at_exit_after_a_privilege_drop(request, backend, daemons,
                                                           daemonize):
    """Root writes the pid file in a directory of its own, then the daemon runs as nobody,
    who may not remove it: the process left with root's privileges for that does.
    (One process: here nobody may not run this Python, which workers would need.)"""
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    home = Path(tempfile.mkdtemp(prefix="gproxyd-pid-"))
    os.chmod(home, 0o755)  # nobody may read here, and create or remove nothing
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    pid_file = home / "gproxyd.pid"
    port = free_port()
    text = GLOBAL.replace("admin = off", "admin = off\nuser = nobody") + route_section(
        "web", port, backend.address)
    daemon = daemons(home, text, extra_args=["--pid-file", str(pid_file)]
                     + (["--daemonize"] if daemonize else []))
    daemon.start(wait_ready=not daemonize)
    if daemonize:
        assert daemon.wait() == EX_OK  # the caller, once the daemon serves
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                         what="pid file"))
    assert pid == daemon.pid or daemonize
    assert exchange(port, b"x") == b"a:x"
    uid = [line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")][0]
    assert uid.split()[1] != "0"
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not running(pid), what="the daemon's exit")
    wait_until(lambda: not pid_file.exists(), timeout=5, what="the pid file removed")


# --- shape ------------------------------------------------------------------------------------

def test_only_the_entry_point_imports_the_lifecycle():
    """Imports follow the data: config, listener, admin, hooks... never reach back up."""
    package = Path(gproxyd.__file__).parent
    importers = []
    for path in package.rglob("*.py"):
        if "lifecycle" in path.relative_to(package).parts or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any("lifecycle" in name.split(".") for name in names):
                importers.append(f"{path.relative_to(package)}:{node.lineno}")
    assert importers == []
