"""How the last reload went, in /stats ("reload") and /metrics (gproxyd_config_*), with one
process and with workers; and the unit's ExecReload, which checks the config before it
sends SIGHUP, run the way systemd runs it."""
from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from service import (
    GLOBAL,
    Daemon,
    TaggedEcho,
    exchange,
    free_port,
    gproxyd_command,
    route_section,
    wait_until,
)

from gproxyd.exitcodes import EX_CONFIG, EX_OK

UNIT = Path(__file__).resolve().parents[2] / "systemd/gproxyd.service"
FAILING_HOOKS = "value = 1 / 0\n"


@pytest.fixture
def backends():
    servers = {tag: TaggedEcho(tag.encode()) for tag in ("a", "b")}
    yield servers
    for server in servers.values():
        server.stop()


def config(port: int, admin: int, production: str, workers: int, **keys: str) -> str:
    head = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}")
    if workers > 1:
        head += f"workers = {workers}\n\n"
    return head + route_section("web", port, production, **keys)


def reload_status(admin: int) -> dict:
    return requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()["reload"]


def config_metrics(admin: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    return {sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("gproxyd_config_")}


def failure_logged(daemon: Daemon, count: int) -> str:
    """The message of the `count`-th "reload failed" line of the log."""
    pattern = r"reload failed: (.*); keeping the running configuration$"
    wait_until(lambda: len(re.findall(pattern, daemon.log(), re.M)) >= count,
               what=f"reload failure {count} logged")
    return re.findall(pattern, daemon.log(), re.M)[count - 1]


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_status_in_stats_and_metrics(tmp_path, backends, daemons, workers):
    port, admin = free_port(), free_port()
    good = config(port, admin, backends["a"].address, workers)
    daemon = daemons(tmp_path, good)
    before = time.time()
    daemon.start()
    started = reload_status(admin)
    assert started == {"generation": 1, "time": started["time"],
                       "config": str(daemon.config_path), "ok": True, "error": None,
                       "failed_at": None}
    assert before <= started["time"] <= time.time()
    assert config_metrics(admin) == pytest.approx({  # /stats rounds times to 1 ms
        "gproxyd_config_generation": 1, "gproxyd_config_last_reload_success": 1,
        "gproxyd_config_last_reload_timestamp_seconds": started["time"],
        "gproxyd_config_reload_failures_total": 0}, abs=1e-3)

    # A config error: the running configuration stays, and the status says why.
    daemon.write_config(good.replace(f"listen = 127.0.0.1:{port}",
                                     "listen = 127.0.0.1:notaport"))
    asked = time.time()
    daemon.reload()
    message = failure_logged(daemon, 1)
    assert "listen: bad port 'notaport'" in message
    failed = wait_until(lambda: (status := reload_status(admin))["ok"] is False and status,
                        what="the failed reload in /stats")
    assert failed == {"generation": 1, "time": started["time"],
                      "config": str(daemon.config_path), "ok": False, "error": message,
                      "failed_at": failed["failed_at"]}
    assert asked <= failed["failed_at"] <= time.time()
    assert exchange(port, b"x") == b"a:x"
    wait_until(lambda: config_metrics(admin)["gproxyd_config_last_reload_success"] == 0,
               what="the failed reload in /metrics")
    assert config_metrics(admin)["gproxyd_config_reload_failures_total"] == 1
    assert config_metrics(admin)["gproxyd_config_generation"] == 1

    # Hooks that cannot be imported (with workers: the new generation cannot start).
    hooks = tmp_path / "failing.py"
    hooks.write_text(FAILING_HOOKS)
    daemon.write_config(config(port, admin, backends["a"].address, workers, hooks=str(hooks)))
    daemon.reload()
    message = failure_logged(daemon, 2)
    assert "ZeroDivisionError: division by zero" in message
    wait_until(lambda: reload_status(admin)["error"] == message, what="the second failure")
    # /stats and /metrics are rendered apart, each up to 1 s old.
    wait_until(lambda: config_metrics(admin)["gproxyd_config_reload_failures_total"] == 2,
               what="the second failure in /metrics")

    # A good one: generation 2, ok again; the last failure stays on record.
    daemon.write_config(config(port, admin, backends["b"].address, workers))
    daemon.reload()
    assert exchange(port, b"y") == b"b:y"
    done = wait_until(lambda: (status := reload_status(admin))["ok"] and status,
                      what="the good reload in /stats")
    assert done["generation"] == 2 and done["error"] == message
    assert done["failed_at"] <= done["time"] <= time.time()
    wait_until(lambda: config_metrics(admin) == pytest.approx({
        "gproxyd_config_generation": 2, "gproxyd_config_last_reload_success": 1,
        "gproxyd_config_last_reload_timestamp_seconds": done["time"],
        "gproxyd_config_reload_failures_total": 2}, abs=1e-3), what="the good reload in /metrics")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == EX_OK


def exec_reload(daemon: Daemon) -> list[int]:
    """Run the unit's ExecReload= lines as systemd does: in order, with $MAINPID, the
    installed binary and the unit's config path being this daemon's; the first that
    fails fails the reload. Returns the exit statuses of those that ran."""
    lines = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
             if line.startswith("ExecReload=")]
    statuses = []
    for line in lines:
        command = [{"/usr/bin/gproxyd": gproxyd_command()[0],
                    "/etc/gproxyd/gproxyd.conf": str(daemon.config_path),
                    "$MAINPID": str(daemon.pid)}.get(word, word)
                   for word in shlex.split(line)]
        statuses.append(subprocess.run(command, capture_output=True, timeout=30).returncode)
        if statuses[-1] != 0:
            break
    return statuses


def test_exec_reload_checks_the_config_before_it_signals(tmp_path, backends, daemons):
    port, admin = free_port(), free_port()
    good = config(port, admin, backends["a"].address, 1)
    daemon = daemons(tmp_path, good)
    daemon.start()

    daemon.write_config(good + "[route broken]\n")
    assert exec_reload(daemon) == [EX_CONFIG]  # `systemctl reload` fails
    # The daemon was not even asked: no failed reload, and the RELOADING=1 never came.
    assert "reload failed" not in daemon.log()
    assert not any("RELOADING=1" in message for message in daemon.notify.collect())
    assert reload_status(admin)["ok"] is True

    daemon.write_config(config(port, admin, backends["b"].address, 1))
    assert exec_reload(daemon) == [EX_OK, EX_OK]
    daemon.notify.wait_for("RELOADING=1")
    wait_until(lambda: reload_status(admin)["generation"] == 2, what="the reload")
    assert exchange(port, b"z") == b"b:z"
