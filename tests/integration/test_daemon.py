"""The installed gproxyd as a service: start, serve, reload, drain, stop, daemonize, logs."""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import gevent
import pytest
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    exchange,
    free_port,
    gproxyd_command,
    live_connection,
    route_section,
    wait_until,
)


@pytest.fixture
def backends():
    servers = {tag: TaggedEcho(tag.encode()) for tag in ("a", "b", "c")}
    yield servers
    for server in servers.values():
        server.stop()


def test_check_config_good_and_bad(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9"))
    result = subprocess.run(gproxyd_command() + ["--check-config", "-c", str(good)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "configuration OK, 1 route(s)" in result.stdout

    bad = tmp_path / "bad.conf"
    bad.write_text(GLOBAL + "[route web]\nlisten = 127.0.0.1:notaport\nproduction = x:1\n")
    for args in (["--check-config", "-c", str(bad)], ["-c", str(bad)]):
        result = subprocess.run(gproxyd_command() + args, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 78
        assert result.stderr == (f"gproxyd: {bad}:7: listen: bad port 'notaport' "
                                 "(expected 1-65535)\n")


def test_usage_error_exits_64(tmp_path):
    result = subprocess.run(gproxyd_command() + ["--no-such-flag"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 64
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_listen_failure_names_address_and_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.conf"
        config.write_text(GLOBAL + route_section("web", port, "127.0.0.1:9"))
        result = subprocess.run(gproxyd_command() + ["-c", str(config)], capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 1
    assert (f"gproxyd: cannot listen on 127.0.0.1:{port}: Address already in use "
            "(another process listens there)") in result.stderr


def test_serves_logs_and_notifies_until_sigterm(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address))
    daemon.start()
    assert exchange(port, b"hello") == b"a:hello"
    daemon.wait_log("route=web client=127.0.0.1:")
    line = [entry for entry in daemon.log().splitlines() if "route=web client=" in entry][0]
    assert f"production={backends['a'].address}" in line
    assert "up=5 down=7" in line and "close=eof" in line and "duration=" in line
    assert f"route web: 127.0.0.1:{port} -> production {backends['a'].address}" in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    daemon.notify.wait_for("STOPPING=1")


def test_reload_reconciles_routes_without_failing_a_request(tmp_path, backends, daemons):
    steady, changed, removed, added = (free_port() for _ in range(4))
    a, b = backends["a"].address, backends["b"].address
    first = GLOBAL + route_section("steady", steady, a) + route_section("changed", changed, a) \
        + route_section("removed", removed, a)
    second = GLOBAL + route_section("steady", steady, a) + route_section("changed", changed, b) \
        + route_section("added", added, b)
    daemon = daemons(tmp_path, first)
    daemon.start()
    live = live_connection(changed, first=b"before")

    results = {"ok": 0, "failed": []}

    def load():
        for number in range(400):
            payload = b"load%d" % number
            try:
                answer = exchange(steady, payload)
                if answer == b"a:" + payload:
                    results["ok"] += 1
                else:
                    results["failed"].append(answer)
            except OSError as error:
                results["failed"].append(repr(error))
    loader = gevent.spawn(load)
    for config in (second, first, second):
        gevent.sleep(0.05)
        daemon.write_config(config)
        daemon.reload()
    loader.join(timeout=60)
    assert loader.dead
    assert results == {"ok": 400, "failed": []}

    # The live connection on the changed route keeps its old production...
    live.sendall(b"after")
    assert live.recv(100) == b"a:after"
    live.close()
    # ...new connections use the new one; the added route serves; the removed one is gone.
    assert exchange(changed, b"x") == b"b:x"
    assert exchange(added, b"y") == b"b:y"
    with pytest.raises(ConnectionRefusedError):
        exchange(removed, b"z")
    daemon.wait_log("reloaded")
    assert "added: added; changed: changed; removed: removed" in daemon.log()


def test_removed_route_lets_live_connection_finish(tmp_path, backends, daemons):
    keep, gone = free_port(), free_port()
    a = backends["a"].address
    daemon = daemons(tmp_path, GLOBAL + route_section("keep", keep, a)
                     + route_section("gone", gone, a))
    daemon.start()
    live = live_connection(gone)
    daemon.write_config(GLOBAL + route_section("keep", keep, a))
    daemon.reload()
    with pytest.raises(ConnectionRefusedError):
        exchange(gone)
    live.sendall(b"2")
    assert live.recv(10) == b"a:2"
    live.close()


def test_bad_reload_keeps_running_config(tmp_path, backends, daemons):
    port = free_port()
    good = GLOBAL + route_section("web", port, backends["a"].address)
    daemon = daemons(tmp_path, good)
    daemon.start()
    daemon.write_config(good + "[route broken]\nlisten = 127.0.0.1:1\n")
    daemon.reload()
    daemon.wait_log("reload failed:")
    assert (f"reload failed: {daemon.config_path}:10: production: missing in [route broken] "
            "(expected production = address); keeping the running configuration") in daemon.log()
    assert exchange(port, b"still") == b"a:still"


def test_sigterm_drains_live_connections_and_refuses_new_ones(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address))
    daemon.start()
    live = live_connection(port)
    daemon.signal(signal.SIGTERM)
    daemon.wait_log("draining 1 live connection(s)")
    with pytest.raises(ConnectionRefusedError):
        exchange(port)
    live.sendall(b"2")
    assert live.recv(10) == b"a:2"
    assert daemon.process.poll() is None
    live.close()
    assert daemon.wait() == 0
    assert "gproxyd stopped" in daemon.log()


def test_second_sigterm_stops_at_once(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL.replace("10s", "60s")
                     + route_section("web", port, backends["a"].address))
    daemon.start()
    live = live_connection(port)
    daemon.signal(signal.SIGTERM)
    daemon.wait_log("draining 1 live connection(s)")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert live.recv(10) == b""  # closed by the proxy
    live.close()


def test_drain_timeout_closes_what_is_left(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL.replace("10s", "300ms")
                     + route_section("web", port, backends["a"].address))
    daemon.start()
    live = live_connection(port)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert live.recv(10) == b""
    assert "drain-timeout passed: closed 1 connection(s)" in daemon.log()
    live.close()


def test_sigusr1_reopens_log_file(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address))
    daemon.start()
    rotated = tmp_path / "gproxyd.log.1"
    os.rename(daemon.log_path, rotated)
    daemon.signal(signal.SIGUSR1)
    daemon.wait_log("log file reopened")
    assert exchange(port, b"x") == b"a:x"
    daemon.wait_log("route=web client=")
    assert "route=web client=" not in rotated.read_text()


def test_json_log_format(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address),
                     extra_args=["--log-format", "json"])
    daemon.start()
    exchange(port)
    daemon.wait_log("route=web client=")
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    # ISO 8601 with milliseconds and the UTC offset
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d",
                        entries[0]["time"]), entries[0]["time"]
    connection, = [e for e in entries if e["message"].startswith("route=web client=")]
    assert connection["route"] == "web"
    assert connection["client"].startswith("127.0.0.1:")
    assert connection["production"] == backends["a"].address
    assert connection["close"] == "eof"
    assert connection["up"] == 4 and connection["down"] == 6  # "ping", "a:ping"
    assert isinstance(connection["duration"], float) and connection["shadows"] == {}


def test_an_outage_is_logged_once_at_warning_with_a_count_not_once_a_connection(
        tmp_path, daemons):
    down, shadow_down = free_port(), free_port()
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, f"127.0.0.1:{down}",
                                                      shadow=f"127.0.0.1:{shadow_down}"))
    daemon.start()
    for _ in range(5):  # production refuses: each client is closed (or reset)
        try:
            assert exchange(port) == b""
        except (ConnectionResetError, BrokenPipeError, OSError):
            pass  # closed before our shutdown (ENOTCONN) or reset: as refused as can be
    daemon.wait_log(f"close=production 127.0.0.1:{down} unreachable", count=5)
    log = daemon.log()
    went = [line for line in log.splitlines() if f"production 127.0.0.1:{down} unreachable"
            in line and "close=" not in line]
    assert len(went) == 1, log
    assert " warning: route web: production 127.0.0.1:" in went[0]
    assert went[0].endswith("unreachable: Connection refused (logged once an outage: failed "
                            "connections are counted, and a line follows every 60s while it "
                            "lasts)")
    # Production comes up: one line says so, with how many connections failed meanwhile.
    production = TaggedEcho(b"p", port=down)
    try:
        assert exchange(port, b"x") == b"p:x"
        daemon.wait_log("reachable again after")
        back = [line for line in daemon.log().splitlines() if "reachable again" in line]
        assert len(back) == 1 and f"route web: production 127.0.0.1:{down} reachable " \
                                  "again after" in back[0]
        assert back[0].endswith("5 connection(s) failed meanwhile")
        # The shadow has been down all along: once, at warning, not per connection.
        assert exchange(port, b"y") == b"p:y"
        daemon.wait_log("route=web client=", count=7)
        shadow_lines = [line for line in daemon.log().splitlines()
                        if f"route web: shadow 127.0.0.1:{shadow_down} unreachable" in line]
        assert len(shadow_lines) == 1 and " warning: " in shadow_lines[0]
    finally:
        production.stop()


def test_daemonize_writes_and_removes_pid_file(tmp_path, backends):
    port = free_port()
    daemon = Daemon(tmp_path, GLOBAL + route_section("web", port, backends["a"].address),
                    extra_args=["--daemonize", "--pid-file", str(tmp_path / "gproxyd.pid")])
    pid_file = tmp_path / "gproxyd.pid"
    try:
        daemon.start(wait_ready=False)
        assert daemon.wait(timeout=15) == 0  # the parent returns once detached
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                             what="pid file"))
        assert pid != daemon.pid
        daemon.notify.wait_for("READY=1")
        assert exchange(port, b"bg") == b"a:bg"
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="daemon exit")
        assert not pid_file.exists()
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        daemon.stop()


def test_daemonize_with_a_relative_config_path_serves_and_reloads(tmp_path, backends):
    """The daemon runs in /: the config file is read again (SIGHUP) by its full path.
    The caller returns once the daemon serves."""
    port = free_port()
    (tmp_path / "rel.conf").write_text(GLOBAL + route_section("web", port,
                                                              backends["a"].address))
    log, pid_file = tmp_path / "d.log", tmp_path / "d.pid"
    started = subprocess.run(gproxyd_command() + [
        "-c", "rel.conf", "--daemonize", "--log-file", str(log), "--pid-file", str(pid_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    try:
        assert exchange(port, b"rel") == b"a:rel"  # serving when the caller returned
        (tmp_path / "rel.conf").write_text(GLOBAL + route_section("web", port,
                                                                  backends["b"].address))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "reloaded" in log.read_text(), what="the reload logged")
        assert f"reloaded {tmp_path / 'rel.conf'}" in log.read_text()
        assert exchange(port, b"rel") == b"b:rel"
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="daemon exit")


def test_a_daemon_that_fails_after_detaching_tells_its_caller(tmp_path):
    """What fails after the fork (here: an archive that cannot be opened) reaches the
    caller's exit status and stderr, not just the log."""
    config = tmp_path / "c.conf"
    config.write_text(GLOBAL + route_section("jobs", free_port(), "127.0.0.1:9",
                                             protocol="beanstalkd",
                                             archive="mysql://root:pw@127.0.0.1:1/x"))
    result = subprocess.run(gproxyd_command() + [
        "-c", str(config), "--daemonize", "--log-file", str(tmp_path / "d.log")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "gproxyd: route jobs: archive: cannot open archive mysql://root:***@127.0.0.1:1/x" \
        in result.stderr
    assert "pw@" not in result.stderr


def test_daemonize_refuses_relative_log_and_pid_files(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9"))
    result = subprocess.run(gproxyd_command() + ["-c", str(config), "--daemonize",
                                                 "--log-file", "relative.log"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert result.stderr == ("gproxyd: --log-file: log-file: relative path 'relative.log' "
                             "with daemonize (expected an absolute path: a daemon runs in /)\n")


@pytest.mark.parametrize("daemonize", [False, True])
def test_a_symlink_planted_as_pid_file_is_refused(tmp_path, daemonize):
    """The pid file is written as root: a symlink at its path must not lead the write
    to another file."""
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    pid_file = tmp_path / "gproxyd.pid"
    pid_file.symlink_to(precious)
    config = tmp_path / "c.conf"
    config.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9"))
    args = ["-c", str(config), "--pid-file", str(pid_file), "--log-file",
            str(tmp_path / "d.log")] + (["--daemonize"] if daemonize else [])
    result = subprocess.run(gproxyd_command() + args, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert f"gproxyd: pid-file: {pid_file} is a symbolic link (expected a regular file or " \
           "nothing)" in result.stderr
    assert precious.read_text() == "keep me\n"


def test_daemonize_refuses_stderr_logging(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9"))
    result = subprocess.run(gproxyd_command() + ["-c", str(config), "--daemonize"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "log-file: '-' (standard error) is closed when daemonized" in result.stderr


def _free_privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


def test_privilege_drop_after_binding_a_privileged_port(tmp_path, backends, daemons):
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    nobody = pwd.getpwnam("nobody")
    port = _free_privileged_port()
    os.chmod(tmp_path, 0o777)  # the log file is opened before the switch; its dir must stay usable
    daemon = daemons(tmp_path, GLOBAL.replace("admin = off", "admin = off\nuser = nobody")
                     + route_section("web", port, backends["a"].address))
    daemon.start()
    status = open(f"/proc/{daemon.pid}/status").read()
    uid_line = [line for line in status.splitlines() if line.startswith("Uid:")][0]
    assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
    assert exchange(port, b"low") == b"a:low"
    assert f"running as user nobody (uid {nobody.pw_uid})" in daemon.log()


def test_sigusr1_after_a_privilege_drop_reopens_or_keeps_the_log(request, backends, daemons):
    """The log is created by root before the drop: it is handed to the user, so SIGUSR1
    can reopen it; when the user cannot (logrotate moved it out of a root-owned
    directory), the daemon says so, keeps writing to the old file, and keeps serving."""
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    nobody = pwd.getpwnam("nobody")
    # pytest's directories are root's alone: the log goes where nobody can reach it, but
    # not create files beside it.
    home = Path(tempfile.mkdtemp(prefix="gproxyd-usr1-"))
    os.chmod(home, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    port = free_port()
    daemon = daemons(home, GLOBAL.replace("admin = off", "admin = off\nuser = nobody")
                     + route_section("web", port, backends["a"].address))
    daemon.start()
    info = os.stat(daemon.log_path)
    assert (info.st_uid, info.st_mode & 0o777) == (nobody.pw_uid, 0o640)
    daemon.signal(signal.SIGUSR1)
    daemon.wait_log("log file reopened")
    rotated = home / "gproxyd.log.1"
    os.rename(daemon.log_path, rotated)
    daemon.signal(signal.SIGUSR1)
    wait_until(lambda: "cannot reopen the log file: Permission denied; writing on to the "
                       "old one" in rotated.read_text(), what="the failed reopen logged")
    assert exchange(port, b"still") == b"a:still"
    assert daemon.process.poll() is None


def test_a_user_that_does_not_exist_is_a_config_error(tmp_path, daemons):
    """Caught when the config is read (so by --check-config too), not at the drop."""
    config = GLOBAL.replace("admin = off", "admin = off\nuser = no-such-user-gproxyd") \
        + route_section("web", free_port(), "127.0.0.1:9")
    daemon = daemons(tmp_path, config)
    daemon.start(wait_ready=False)
    assert daemon.wait() == 78
    assert ":3: user: no such user 'no-such-user-gproxyd' on this host" in \
        daemon.process.stderr.read().decode()


def test_watchdog_pings_when_systemd_asks(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address),
                     env={"WATCHDOG_USEC": "200000"})  # WatchdogSec=200ms: ping every 100ms
    daemon.start()
    first = daemon.notify.wait_for("WATCHDOG=1")
    daemon.notify.wait_for("WATCHDOG=1", after=first + 1)


def test_periodic_summary_line_per_route(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + "stats-interval = 200ms\n\n"
                     + route_section("web", port, backends["a"].address))
    daemon.start()
    for _ in range(3):
        exchange(port)
    daemon.wait_log("stats route=web connections=0/3")
    line = [entry for entry in daemon.log().splitlines()
            if "stats route=web connections=0/3" in entry][0]
    assert "production: requests=3 errors=0 p50=" in line


def test_a_reload_onto_an_address_gproxyd_itself_holds_says_so(tmp_path, backends, daemons):
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL + route_section("web", port, backends["a"].address)
                     .replace(f"127.0.0.1:{port}", f"0.0.0.0:{port}", 1))
    daemon.start()
    daemon.write_config(GLOBAL + route_section("api", port, backends["a"].address))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload failed")
    line = next(line for line in daemon.log().splitlines() if "reload failed" in line)
    assert f"cannot listen on 127.0.0.1:{port}: gproxyd itself listens on 0.0.0.0:{port} " \
           "(route web of the running configuration)" in line
    assert "another process" not in line
    assert exchange(port, b"still") == b"a:still"


def test_a_unix_listen_socket_of_the_daemon_gets_its_mode_and_owner(tmp_path, backends,
                                                                     daemons):
    assert os.geteuid() == 0, "chown to another user needs root (CI runs the tests as root)"
    folder = tempfile.mkdtemp(prefix="gpx", dir="/tmp")
    try:
        path = os.path.join(folder, "web.sock")
        daemon = daemons(tmp_path, GLOBAL + f"[route web]\nlisten = unix:{path}\n"
                         f"production = {backends['a'].address}\nlisten-mode = 0660\n"
                         "listen-owner = nobody:nogroup\n")
        daemon.start()
        info = os.stat(path)
        assert oct(info.st_mode & 0o777) == oct(0o660)
        assert (info.st_uid, info.st_gid) == (pwd.getpwnam("nobody").pw_uid,
                                              grp.getgrnam("nogroup").gr_gid)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(path)
            client.sendall(b"hi")
            assert client.recv(100) == b"a:hi"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


LOADED_MODULES_HOOK = '''\
import sys


def on_connect(conn):
    conn.reply(" ".join(sorted(name for name in sys.modules
                               if name.startswith("gproxyd"))).encode() + b"\\n")
    conn.close()
'''


def test_with_user_every_module_is_imported_before_the_drop(tmp_path, backends, daemons):
    """The dropped user may not be able to read the installation (a Python under /root):
    whatever a serving process imports later must be imported before the drop."""
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    import pkgutil

    import gproxyd
    from gproxyd.cli import _NOT_SERVING
    expected = {module.name for module in pkgutil.walk_packages(gproxyd.__path__, "gproxyd.")
                if not module.name.startswith(_NOT_SERVING)}
    (tmp_path / "hooks").mkdir(mode=0o755)  # root's: hooks files must be trusted
    hooks = tmp_path / "hooks" / "loaded.py"
    hooks.write_text(LOADED_MODULES_HOOK)
    os.chmod(tmp_path, 0o777)  # the log file's directory stays usable after the switch
    port = free_port()
    daemon = daemons(tmp_path, GLOBAL.replace("admin = off", "admin = off\nuser = nobody")
                     + route_section("web", port, backends["a"].address, hooks=str(hooks)))
    daemon.start()
    loaded = set(exchange(port, b"").decode().split())
    assert expected - loaded == set()
