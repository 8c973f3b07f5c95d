"""The scenarios about the daemon's life: reloads under load, hooks that exit, SIGUSR1
after a privilege drop, --daemonize with a relative config path, a planted pid-file
symlink."""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import gevent
from service import TaggedEcho

from .harness import (
    Bench,
    Row,
    Wrk,
    alive,
    connect,
    free_port,
    global_section,
    gproxyd_command,
    log_problems,
    processes_of,
    route,
    wait_until,
)
from .peers import read_to_eof


def _exchange(port: int, payload: bytes) -> bytes | str:
    """Send, half-close, read to EOF; the bytes, or the error's name."""
    try:
        with connect(port, timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return read_to_eof(sock)
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error))


def _live_turn(sock: socket.socket, tag: bytes, turn: int) -> bool:
    try:
        sock.sendall(b"%d" % turn)
        return sock.recv(100) == tag + b":%d" % turn
    except OSError:
        return False


# -- 5 ----------------------------------------------------------------------------------

def reloads(bench: Bench, count: int) -> Row:
    row = Row(5, f"{count} reloads (SIGHUP, a changed route each time) under load "
                 "(wrk -c8 Connection: close and wrk -c8 keep-alive through an unchanged "
                 "route to nginx), workers = 1 and 2, with a long-lived connection checked "
                 "after each reload and once more past drain-timeout",
              "workers = 1: 0 failed requests; workers = 2: a second SIGHUP was taken as "
              "stop at once, a long-lived connection cut at drain-timeout")
    nginx = bench.nginx()
    echo = TaggedEcho(b"live")
    try:
        outcomes = [_reloads_with(bench, workers, count, nginx, echo) for workers in (1, 2)]
    finally:
        echo.stop()
    parts = [text for text, _ in outcomes]
    good = all(ok for _, ok in outcomes)
    row.now = "; ".join(parts)
    row.verdict = "ok" if good else "DEFECT"
    return row


def _reloads_with(bench: Bench, workers: int, count: int, nginx: int,
                  echo: TaggedEcho) -> tuple[str, bool]:
    load_port, live_port, spare_port = free_port(), free_port(), free_port()

    def config(turn: int) -> str:
        return (global_section("off", f"workers = {workers}")
                + route("load", load_port, f"127.0.0.1:{nginx}")
                + route("live", live_port, echo.address)
                + route("spare", spare_port, f"127.0.0.1:{nginx}",
                        connect_timeout=f"{5 + turn % 2}s"))
    daemon = bench.daemon(f"reload-w{workers}", config(0))
    try:
        live = connect(live_port)
        live_ok = _live_turn(live, b"live", 0)
        loads = [Wrk(bench.workdir, load_port, "/small", 8, 600,
                     headers=("Connection: close",)),
                 Wrk(bench.workdir, load_port, "/small", 8, 600)]
        gevent.sleep(1.0)
        reloaded, slowest, live_turns = 0, 0.0, 0
        for turn in range(1, count + 1):
            daemon.write_config(config(turn))
            began = time.monotonic()
            try:
                daemon.reload()
                reloaded += 1
            except AssertionError:
                pass
            slowest = max(slowest, time.monotonic() - began)
            live_turns += _live_turn(live, b"live", turn)
            gevent.sleep(0.3)
        gevent.sleep(6.0)   # past drain-timeout (5 s)
        live_turns += _live_turn(live, b"live", count + 1)
        live.close()
        for load in loads:
            load.interrupt()
        results = [load.result() for load in loads]
        processes = processes_of(daemon.pid)
        served = alive(daemon)
        problems = log_problems(daemon.log())
    finally:
        bench.stop(daemon)
    failed = sum(result["errors"] for result in results)
    requests = sum(result["requests"] for result in results)
    ok = live_ok and reloaded == count and live_turns == count + 1 and failed == 0 and served
    return (f"workers = {workers}: {reloaded}/{count} reloads done (slowest "
            f"{slowest:.1f} s), {failed} failed of {requests:,} requests "
            f"(close: {results[0]['errors']}, keep-alive: {results[1]['errors']})"
            f", long-lived connection answered {live_turns}/{count + 1}, "
            f"{processes} processes at the end, {len(problems)} traceback lines", ok)


# -- 6 ----------------------------------------------------------------------------------

RAISING_HOOK = '''\
"""Raises what the client asks for."""
import sys


def on_data(conn, data):
    if data.startswith(b"systemexit"):
        raise SystemExit(3)
    if data.startswith(b"keyboardinterrupt"):
        raise KeyboardInterrupt
    if data.startswith(b"sys.exit"):
        sys.exit(4)
    return data
'''
EXIT_AT_IMPORT = '''\
import sys
sys.exit(5)


def on_data(conn, data):
    return data
'''


def hooks(bench: Bench) -> Row:
    row = Row(6, "a hook raising SystemExit, KeyboardInterrupt, sys.exit() in on_data; a "
                 "hooks file calling sys.exit() at import (reload, --check-config, start); "
                 "another route's live connection checked after each",
              "SystemExit/KeyboardInterrupt ended the daemon within 0.2 s; sys.exit() at "
              "import made SIGHUP exit it (rc 1); --check-config rc 1 without FILE:LINE")
    directory = bench.directory("hooks")
    raising, exiting = directory / "raising.py", directory / "exit_at_import.py"
    raising.write_text(RAISING_HOOK)
    exiting.write_text(EXIT_AT_IMPORT)
    plain, hooked = TaggedEcho(b"a"), TaggedEcho(b"b")
    plain_port, hooked_port = free_port(), free_port()

    def config(hook: Path) -> str:
        return (global_section() + route("plain", plain_port, plain.address)
                + route("hooked", hooked_port, hooked.address, hooks=str(hook)))
    daemon = bench.daemon("hooks", config(raising))
    results, good = [], True
    try:
        live = connect(plain_port)
        turn = 0
        for trigger in (b"systemexit", b"keyboardinterrupt", b"sys.exit"):
            answer = _exchange(hooked_port, trigger)
            gevent.sleep(0.3)
            turn += 1
            ok = (alive(daemon) and _live_turn(live, b"a", turn)
                  and _exchange(hooked_port, b"ok") == b"b:ok")
            good &= ok
            results.append(f"{trigger.decode()}: its connection got "
                           f"{answer if isinstance(answer, str) else f'{len(answer)} bytes'}"
                           f", daemon {'serving' if ok else 'NOT serving'}")
        daemon.write_config(config(exiting))
        daemon.signal(signal.SIGHUP)
        try:
            daemon.wait_log("exit_at_import.py", timeout=15)
            logged = True
        except AssertionError:
            logged = False
        gevent.sleep(0.5)
        turn += 1
        reload_ok = (alive(daemon) and _live_turn(live, b"a", turn)
                     and _exchange(hooked_port, b"ok") == b"b:ok")
        good &= reload_ok and logged
        results.append(f"sys.exit() at import, SIGHUP: {'logged, ' if logged else ''}"
                       f"{'old config kept, serving' if reload_ok else 'NOT serving'}")
        live.close()
        problems = log_problems(daemon.log())
    finally:
        bench.stop(daemon)
    check = subprocess.run(gproxyd_command() + ["--check-config", "-c",
                                                str(daemon.config_path)],
                           capture_output=True, text=True, timeout=60)
    named = f"{exiting}:2" in check.stderr
    start = subprocess.run(gproxyd_command() + ["-c", str(daemon.config_path), "--log-file",
                                                str(directory / "start.log")],
                           capture_output=True, text=True, timeout=60)
    plain.stop()
    hooked.stop()
    good &= check.returncode == 78 and named and start.returncode == 78
    results.append(f"--check-config rc {check.returncode}"
                   f"{' naming ' + exiting.name + ':2' if named else ' WITHOUT FILE:LINE'}; "
                   f"start rc {start.returncode}")
    row.now = "; ".join(results) + f"; {len(problems)} traceback lines in the log"
    row.verdict = "ok" if good else "DEFECT"
    return row


# -- 7 ----------------------------------------------------------------------------------

def usr1_as_nobody(bench: Bench) -> Row:
    row = Row(7, "SIGUSR1 with user = nobody and a log file: reopen in place; after "
                 "logrotate moved the file (directory root's); after it moved it "
                 "(directory nobody's)",
              "exit 1, connections dropped, stale pid file")
    if os.getuid() != 0:
        row.now, row.verdict = "needs root (user = nobody)", "error"
        return row
    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="gproxyd-resilience-usr1-"))
    os.chmod(home, 0o755)
    echo = TaggedEcho(b"a")
    port = free_port()
    steps, good = [], True
    try:
        daemon = bench.daemon("usr1", global_section("off", "user = nobody")
                              + route("web", port, echo.address), directory=home)
        try:
            info = os.stat(daemon.log_path)
            steps.append(f"log owner {pwd.getpwuid(info.st_uid).pw_name} mode "
                         f"{info.st_mode & 0o777:o}")
            daemon.signal(signal.SIGUSR1)
            gevent.sleep(1.0)
            first = alive(daemon) and _exchange(port, b"1") == b"a:1"
            steps.append(f"USR1: {'serving' if first else 'NOT serving'}")
            rotated = home / "gproxyd.log.1"
            os.rename(daemon.log_path, rotated)
            daemon.signal(signal.SIGUSR1)
            try:
                wait_until(lambda: "cannot reopen" in rotated.read_text(), timeout=10)
                said = "says it cannot reopen, writes on to the old file"
            except AssertionError:
                said = "says nothing"
            second = alive(daemon) and _exchange(port, b"2") == b"a:2"
            steps.append(f"moved, root's directory: {said}, "
                         f"{'serving' if second else 'NOT serving'}")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
            os.rename(rotated, home / "gproxyd.log.2")
            daemon.signal(signal.SIGUSR1)
            try:
                wait_until(lambda: daemon.log_path.exists(), timeout=10)
                created = "a new log file"
            except AssertionError:
                created = "NO new log file"
            third = alive(daemon) and _exchange(port, b"3") == b"a:3"
            steps.append(f"moved, nobody's directory: {created}, "
                         f"{'serving' if third else 'NOT serving'}")
            good = first and second and third and daemon.log_path.exists()
        finally:
            bench.stop(daemon)
    finally:
        echo.stop()
        shutil.rmtree(home, ignore_errors=True)
    row.now = "; ".join(steps)
    row.verdict = "ok" if good else "DEFECT"
    return row


# -- 13 ---------------------------------------------------------------------------------

def daemonize_relative(bench: Bench) -> Row:
    row = Row(13, "--daemonize -c rel.conf (relative path) --log-file/--pid-file absolute, "
                  "run from the config's directory",
              "exit 0, nothing running, nothing said")
    directory = bench.directory("daemonize")
    echo = TaggedEcho(b"a")
    port = free_port()
    (directory / "rel.conf").write_text(global_section(level="info")
                                        + route("web", port, echo.address))
    log, pid_file = directory / "d.log", directory / "d.pid"
    try:
        started = subprocess.run(gproxyd_command() + [
            "-c", "rel.conf", "--daemonize", "--log-file", str(log), "--pid-file",
            str(pid_file)], cwd=directory, capture_output=True, text=True, timeout=60)
        if started.returncode != 0:
            row.now = f"exit {started.returncode}: {started.stderr.strip()[-200:]}"
            row.verdict = "ok" if started.stderr.strip() else "DEFECT"
            return row
        pid = int(pid_file.read_text())
        answer = _exchange(port, b"rel")
        os.kill(pid, signal.SIGHUP)
        try:
            wait_until(lambda: "reloaded" in log.read_text(), timeout=10)
            reloaded = True
        except AssertionError:
            reloaded = False
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=15)
        row.now = (f"exit 0 once serving; answered {answer!r}; SIGHUP "
                   f"{'reloaded by the full path' if reloaded else 'NOT reloaded'}; "
                   f"pid file {'removed' if not pid_file.exists() else 'LEFT'} at SIGTERM")
        row.verdict = "ok" if answer == b"a:rel" and reloaded and not pid_file.exists() \
            else "DEFECT"
    finally:
        echo.stop()
    return row


# -- 14 ---------------------------------------------------------------------------------

def pid_symlink(bench: Bench) -> Row:
    row = Row(14, "a symlink planted at the pid file's path (to a file of root's), "
                  "foreground and --daemonize",
              "followed as root: the target was overwritten")
    directory = bench.directory("pid-symlink")
    config = directory / "c.conf"
    config.write_text(global_section() + route("web", free_port(), "127.0.0.1:9"))
    parts, good = [], True
    for daemonize in (False, True):
        precious = directory / f"precious-{int(daemonize)}"
        precious.write_text("keep me\n")
        pid_file = directory / f"gproxyd-{int(daemonize)}.pid"
        pid_file.symlink_to(precious)
        result = subprocess.run(gproxyd_command() + [
            "-c", str(config), "--pid-file", str(pid_file), "--log-file",
            str(directory / "d.log")] + (["--daemonize"] if daemonize else []),
            capture_output=True, text=True, timeout=60)
        kept = precious.read_text() == "keep me\n"
        refused = result.returncode != 0 and "symbolic link" in result.stderr
        good &= kept and refused
        parts.append(f"{'--daemonize' if daemonize else 'foreground'}: exit "
                     f"{result.returncode}, target {'untouched' if kept else 'OVERWRITTEN'}"
                     + (f" ({result.stderr.strip().splitlines()[-1]})" if daemonize
                        and result.stderr.strip() else ""))
    row.now = "; ".join(parts)
    row.verdict = "ok" if good else "DEFECT"
    return row
