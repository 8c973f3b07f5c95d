"""gproxyctl against a running gproxyd: the table, --json, --watch, and its errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from service import GLOBAL, Daemon, TaggedEcho, exchange, free_port, route_section, wait_until


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
    assert route["connections"] == {"active": 0, "total": 25, "rejected": 0}
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
