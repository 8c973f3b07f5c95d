"""gproxyctl against a running gproxyd: the table, --json, --watch, and its errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from service import GLOBAL, Daemon, TaggedEcho, exchange, free_port, route_section, wait_until

from gproxyd.config import load_config
from gproxyd.settings import ROUTE_OPTIONS


def gproxyctl() -> list[str]:
    beside = Path(sys.executable).with_name("gproxyctl")
    found = str(beside) if beside.exists() else shutil.which("gproxyctl")
    assert found, "the gproxyctl console script is not installed (pip install .)"
    return [found]


@pytest.fixture
def running(tmp_path):
    production, candidate = TaggedEcho(b"p"), TaggedEcho(b"c")
    port, admin = free_port(), free_port()
    config = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}") + route_section(
        "web", port, production.address, shadow=candidate.address)
    daemon = Daemon(tmp_path, config).start()
    for number in range(25):
        assert exchange(port, b"%d" % number) == b"p:%d" % number

    def settled():  # the client has production's answers; the shadow's may still be coming
        route = requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()["routes"]["web"]
        return (route["connections"]["active"] == 0
                and route["shadows"][candidate.address]["requests"] == 25)
    wait_until(settled, what="every connection and shadow answer counted")
    yield daemon, candidate.address
    daemon.stop()
    production.stop()
    candidate.stop()


def run_ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(gproxyctl() + list(args), capture_output=True, text=True, timeout=30)


def test_stats_table_shows_production_against_the_shadow(running):
    daemon, shadow = running
    result = run_ctl("stats", "-c", str(daemon.config_path), "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("route web: 0 active, 25 total connections")
    assert lines[1].split() == ["backend", "req/s", "requests", "p50", "ms", "p99", "ms",
                                "errors", "drops"]
    production_row, shadow_row = lines[2].split(), lines[3].split()
    assert production_row[0] == "production" and production_row[2] == "25"
    assert shadow_row[0] == shadow and shadow_row[2] == "25" and shadow_row[-1] == "0"
    # "candidate p99 is N% slower/faster ..." or "no significant difference: candidate p99
    # within 5% ...": which one depends on the run.
    assert lines[4].startswith(f"  {shadow}: ") and "candidate p99" in lines[4]


def test_stats_json_and_watch(running):
    daemon, shadow = running
    result = run_ctl("stats", "--json", "-c", str(daemon.config_path))
    assert result.returncode == 0, result.stderr
    route = json.loads(result.stdout)["routes"]["web"]
    assert route["connections"] == {"active": 0, "total": 25, "rejected": 0, "refused": 0}
    assert route["production"]["requests"] == 25
    assert route["shadows"][shadow]["requests"] == 25
    watched = run_ctl("stats", "--watch", "--count", "2", "--interval", "0.1", "-c",
                      str(daemon.config_path))
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count("route web:") == 2


def test_errors_say_what_to_do(tmp_path):
    off = tmp_path / "off.conf"
    off.write_text(GLOBAL + route_section("web", free_port(), "127.0.0.1:9"))
    result = run_ctl("stats", "-c", str(off))
    assert result.returncode == 78
    assert "admin is off" in result.stderr
    down = tmp_path / "down.conf"
    down.write_text(GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{free_port()}")
                    + route_section("web", free_port(), "127.0.0.1:9"))
    result = run_ctl("stats", "-c", str(down))
    assert result.returncode == 69
    assert "cannot read stats from http://127.0.0.1:" in result.stderr
    assert "is gproxyd running with this config?" in result.stderr


def test_a_broken_file_on_disk_does_not_stop_gproxyctl_reaching_the_daemon(running):
    """The daemon serves its last good config; gproxyctl needs only the admin address
    (read from that one key, from GPROXYD_ADMIN, or from --admin)."""
    daemon, _ = running
    good = daemon.config_path.read_text()
    admin = next(line.split("=", 1)[1].strip() for line in good.splitlines()
                 if line.startswith("admin ="))
    daemon.config_path.write_text(good + "\nthis line is broken\n[route web]\n")
    result = run_ctl("stats", "--json", "-c", str(daemon.config_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["routes"]["web"]["production"]["requests"] == 25
    by_env = subprocess.run(gproxyctl() + ["stats", "--json"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "GPROXYD_ADMIN": admin})
    assert by_env.returncode == 0, by_env.stderr
    assert "web" in json.loads(by_env.stdout)["routes"]
    assert run_ctl("diff", "--admin", admin, "--json").returncode == 0


def test_check_and_reload_show_the_daemons_view_of_its_config(running):
    daemon, _ = running
    result = run_ctl("check", "-c", str(daemon.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"serving {daemon.config_path}, generation 1" in result.stdout
    assert "last reload: none since start" in result.stdout
    assert f"{daemon.config_path} on disk: loads" in result.stdout

    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace("drain-timeout = 10s", "drain-timeout = 9s"))
    result = run_ctl("reload", "-c", str(daemon.config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"reloaded {daemon.config_path}: generation 2\n"

    # A broken file: reload refuses before signalling; check says a reload would fail.
    daemon.config_path.write_text(good + "colour = blue\n")
    result = run_ctl("reload", "-c", str(daemon.config_path))
    assert result.returncode == 78
    assert "colour: unknown key in [route web]" in result.stderr
    assert "not reloading: the running daemon keeps its configuration" in result.stderr
    result = run_ctl("check", "-c", str(daemon.config_path))
    assert result.returncode == 78
    assert "generation 2" in result.stdout and "last reload: succeeded" in result.stdout
    assert "1 error(s), a reload would fail:" in result.stdout

    # A reload that fails in the daemon (SIGHUP sent behind gproxyctl's back): check
    # shows it, with the error, and the daemon still serves generation 2.
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: not json.loads(run_ctl("check", "--json", "-c",
                                              str(daemon.config_path)).stdout)["reload"]["ok"],
               what="the failed reload reported")
    result = run_ctl("check", "-c", str(daemon.config_path))
    assert result.returncode == 78
    assert "last reload: FAILED at" in result.stdout
    assert "still serving generation 2: " in result.stdout and "colour" in result.stdout
    assert exchange(daemon_port(daemon), b"after") == b"p:after"


def daemon_port(daemon) -> int:
    text = daemon.config_path.read_text()
    return int(next(line for line in text.splitlines()
                    if line.startswith("listen =")).rsplit(":", 1)[1])


def test_config_prints_the_effective_configuration_which_loads_back(tmp_path):
    path = tmp_path / "gproxyd.conf"
    path.write_text("[gproxyd]\nlog-level = debug\n[route web]\nlisten = 127.0.0.1:8080\n"
                    "production = 127.0.0.1:8081\nshadow-sample = 12.5%\nidle-timeout = 90s\n"
                    "[route jobs]\nlisten = 127.0.0.1:11301\nproduction = 127.0.0.1:11300\n"
                    "protocol = beanstalkd\narchive = mysql://app:s3cret@db:3306/jobs\n")
    result = subprocess.run(gproxyctl() + ["config", "-c", str(path)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "GPROXYD_WORKERS": "2"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "log-level = debug" in lines and "workers = 2" in lines
    assert "shadow-sample = 12.5%" in lines and "idle-timeout = 90s" in lines
    assert any(line.startswith("drain-timeout = 30s") and line.endswith("; default")
               for line in lines)
    assert "archive = mysql://app:***@db:3306/jobs" in lines
    assert "s3cret" not in result.stdout
    # What it prints is a config gproxyd reads the same way (the password aside).
    again = tmp_path / "effective.conf"
    again.write_text(result.stdout.replace("***", "s3cret"))
    printed, read = load_config(str(again), [], {}), load_config(str(path), [], {
        "GPROXYD_WORKERS": "2"})
    assert printed.settings == read.settings
    assert [[getattr(route, option.attr) for option in ROUTE_OPTIONS]
            for route in printed.routes] == [[getattr(route, option.attr)
                                              for option in ROUTE_OPTIONS]
                                             for route in read.routes]
    broken = tmp_path / "broken.conf"
    broken.write_text("[route web]\nlisten = 127.0.0.1:8080\n")
    result = run_ctl("config", "-c", str(broken))
    assert result.returncode == 78
    assert "production: missing in [route web]" in result.stderr
