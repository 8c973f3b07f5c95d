"""systemd/gproxyd.service: systemd-analyze verify accepts it, and it fits gproxyd's options."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gproxyd.settings import GLOBAL_BY_NAME, duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd/gproxyd.service"
INSTALLED_BINARY = "/usr/bin/gproxyd"


def _verify(tmp_path: Path, unit_text: str) -> tuple[int, list[str]]:
    """Run systemd-analyze verify on UNIT_TEXT as tmp_path/gproxyd.service.

    The binary paths point at this Python (verify insists that they exist), and MANPATH at
    a copy of our man pages, so that Documentation=man:... is checked against them.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (apt-get install systemd); the unit " \
                    "file goes unchecked"
    unit = tmp_path / "gproxyd.service"
    unit.write_text(unit_text.replace(INSTALLED_BINARY, sys.executable), encoding="utf-8")
    for page in ["gproxyd.8", "gproxyd.conf.5"]:
        section = tmp_path / "man" / f"man{page[-1]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "man" / page, section / page)
    env = dict(os.environ, MANPATH=str(tmp_path / "man"), SYSTEMD_LOG_COLOR="0",
               SYSTEMD_PAGER="")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if "gproxyd.service" in line]


def test_unit_verifies_cleanly(tmp_path):
    returncode, problems = _verify(tmp_path, UNIT.read_text(encoding="utf-8"))
    assert returncode == 0 and problems == [], "\n".join(problems)


def test_verify_does_catch_a_broken_unit(tmp_path):
    # Guards the test above: verify reports these with exit status 0, so only the output
    # shows them.
    broken = UNIT.read_text(encoding="utf-8").replace("Type=notify", "Type=notfy")
    broken = broken.replace("[Service]\n", "[Service]\nProtectHome=maybe\n")
    _, problems = _verify(tmp_path, broken)
    assert any("notfy" in line for line in problems), problems
    assert any("maybe" in line for line in problems), problems


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_unit_runs_the_installed_binary_with_the_default_config():
    unit = _directives()
    assert unit["ExecStartPre"] == [f"{INSTALLED_BINARY} --check-config -c "
                                    "/etc/gproxyd/gproxyd.conf"]
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} -c /etc/gproxyd/gproxyd.conf"]
    # The check runs before the HUP, so that a broken config fails `systemctl reload`.
    assert unit["ExecReload"] == [f"{INSTALLED_BINARY} --check-config -c "
                                  "/etc/gproxyd/gproxyd.conf", "/bin/kill -HUP $MAINPID"]
    assert (unit["Type"], unit["NotifyAccess"], unit["KillMode"]) == \
        (["notify"], ["main"], ["mixed"])


def test_stop_timeout_leaves_room_for_the_default_drain():
    stop_timeout = duration(_directives()["TimeoutStopSec"][0])
    assert stop_timeout > duration(GLOBAL_BY_NAME["drain-timeout"].default)


def test_config_and_usage_errors_are_not_restarted():
    assert set(_directives()["RestartPreventExitStatus"][0].split()) == {"64", "78"}


def test_the_unit_gives_the_service_the_directories_its_defaults_write_to():
    """ProtectSystem=strict makes everything else read-only: logs, the pid file and unix
    sockets, and the record files and SQLite archive the docs put in /var/lib/gproxyd."""
    text = UNIT.read_text()
    assert "ProtectSystem=strict" in text
    for line in ("LogsDirectory=gproxyd", "RuntimeDirectory=gproxyd", "StateDirectory=gproxyd"):
        assert line in text.splitlines(), line
