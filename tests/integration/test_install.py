"""`make install-service` into a staging root (DESTDIR): where every file lands, and
that the installed copy runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_install_service_puts_files_under_the_prefix_and_the_copy_runs(tmp_path):
    root = tmp_path / "root"
    result = subprocess.run(["make", "-C", str(REPO), "install-service", f"DESTDIR={root}",
                             "PREFIX=/usr/local", f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = root / "usr/local"
    for path in ("bin/gproxyd", "bin/gproxyctl", "share/man/man8/gproxyd.8",
                 "share/man/man5/gproxyd.conf.5", "share/man/man1/gproxyctl.1",
                 "lib/gproxyd/gproxyd/cli.py",
                 # the dashboard's page (package data: GET / answers 500 without it)
                 "lib/gproxyd/gproxyd/dashboard/index.html",
                 "lib/gproxyd/gproxyd/dashboard/app.js",
                 "lib/gproxyd/gproxyd/dashboard/style.css"):
        assert (prefix / path).is_file(), path
    assert not (prefix / "local").exists()  # Debian's pip scheme would have made /usr/local/local
    launcher = (prefix / "bin/gproxyd").read_text()
    assert launcher.startswith(f"#!{sys.executable} -s\n")
    assert 'sys.path.insert(0, "/usr/local/lib/gproxyd")' in launcher
    assert (prefix / "bin/gproxyd").stat().st_mode & 0o111
    unit = (root / "etc/systemd/system/gproxyd.service").read_text()
    assert "ExecStart=/usr/local/bin/gproxyd -c /etc/gproxyd/gproxyd.conf" in unit
    assert "/usr/bin/gproxyd" not in unit
    assert (root / "etc/gproxyd/gproxyd.conf").is_file()
    assert (root / "etc/logrotate.d/gproxyd").is_file()
    # The installed package (not this checkout) checks the installed config.
    run = subprocess.run(
        [sys.executable, "-s", "-c",
         f"import sys; sys.path.insert(0, {str(prefix / 'lib/gproxyd')!r}); "
         "import gproxyd; print(gproxyd.__file__); from gproxyd.cli import main; "
         f"sys.exit(main(['--check-config', '-c', {str(root / 'etc/gproxyd/gproxyd.conf')!r}]))"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(prefix / "lib/gproxyd/gproxyd/__init__.py"))
    assert "configuration OK" in run.stdout
