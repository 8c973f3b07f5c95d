"""Which gproxyd is measured: the working tree, or a commit exported with `git archive`;
and how it is run (`python3 -m gproxyd` with that source first on PYTHONPATH)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

from . import REPO_DIR, BenchError
from .processes import last_line, wait_listening

if TYPE_CHECKING:
    from .rig import Rig

EX_CONFIG = 78


def gproxyd_env(source: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                  else "")
    return env


def export_revision(revision: str, workdir: str) -> str:
    """The gproxyd package of REVISION (`git archive`, the repository is only read) in a
    directory of its own, so a run measures a commit, not a working tree in flux."""
    source = os.path.join(workdir, "gproxyd-src")
    os.makedirs(source)
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", "--format=tar", revision,
                              "gproxyd"], capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise BenchError(f"cannot export gproxyd at {revision!r}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True, timeout=60)
    return source


def gproxyd_available(source: str) -> str:
    """'' when `python3 -m gproxyd --help` works, else why not."""
    try:
        done = subprocess.run([sys.executable, "-m", "gproxyd", "--help"], capture_output=True,
                              text=True, timeout=30, cwd=source, env=gproxyd_env(source))
    except subprocess.TimeoutExpired:
        return "`python3 -m gproxyd --help` did not finish within 30 s"
    if done.returncode != 0:
        return f"`python3 -m gproxyd --help` failed (exit {done.returncode}): {last_line(done)}"
    return ""


def check_config(conf: str, source: str) -> None:
    """Raise BenchError when `python3 -m gproxyd --check-config` rejects CONF."""
    check = subprocess.run(
        [sys.executable, "-m", "gproxyd", "--check-config", "-c", conf],
        capture_output=True, text=True, timeout=30, cwd=source, env=gproxyd_env(source))
    if check.returncode == EX_CONFIG:
        raise BenchError(f"config rejected (exit 78): {last_line(check)}")
    if check.returncode != 0:
        raise BenchError(f"--check-config failed (exit {check.returncode}): "
                         f"{last_line(check)}")


def gproxyd_version(source: str) -> str:
    """The last line `python3 -m gproxyd --version` prints (or why it failed)."""
    version = subprocess.run([sys.executable, "-m", "gproxyd", "--version"],
                             capture_output=True, text=True, timeout=30,
                             cwd=source, env=gproxyd_env(source))
    return last_line(version)


def start_gproxyd(rig: "Rig", name: str, conf: str, source: str, ports: list[int]):
    """Check CONF with the gproxyd in SOURCE, start that gproxyd as NAME (on the proxy's
    CPUs) and wait until it listens on PORTS: (its process, its log). Raises BenchError."""
    check_config(conf, source)
    proc, log = rig.procs.start(name, [sys.executable, "-m", "gproxyd", "-c", conf],
                                cpus=rig.proxy_cpus, env=gproxyd_env(source), cwd=source)
    wait_listening(ports, proc, log)
    return proc, log
