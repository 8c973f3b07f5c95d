"""`gproxyd demo`, the README's first command: it runs, and what it prints is true."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from service import gproxyd_command


def test_the_demo_measures_a_slower_candidate_that_answers_the_same():
    done = subprocess.run(gproxyd_command() + ["demo", "--requests", "50", "--clients", "2",
                                               "--candidate-delay", "0.01"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "sent 100 HTTP requests over 2 keep-alive connections" in out
    # 10 ms more on every request: the paired difference cannot be near zero.
    verdict = re.search(r"candidate is slower: p\d+ \+([0-9.]+) ms \(95% CI \+([0-9.]+)\.\.",
                        out)
    assert verdict, out
    assert float(verdict.group(2)) > 5
    assert "all 100 compared answers match" in out


def test_the_demo_keeps_serving_with_its_numbers_live_on_an_admin_endpoint():
    demo = subprocess.Popen(gproxyd_command() + ["demo", "--serve", "--requests", "20",
                                                 "--clients", "2", "--candidate-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("live numbers: "):
            line = demo.stdout.readline()
            assert line, f"the demo ended early: {''.join(lines)} {demo.stderr.read()}"
            lines.append(line)
        admin = re.search(r"--admin (\S+)", lines[-1]).group(1)
        listen = re.search(r"serving on (\S+):", "".join(lines)).group(1)
        with urllib.request.urlopen(f"http://{listen}/more", timeout=10) as answer:
            assert answer.status == 200
        ctl = Path(sys.executable).with_name("gproxyctl")
        stats = subprocess.run([str(ctl), "stats", "--json", "--admin", admin],
                               capture_output=True, text=True, timeout=30)
        assert stats.returncode == 0, stats.stderr
        route = json.loads(stats.stdout)["routes"]["demo"]
        assert route["production"]["requests"] == 41  # the tour's 40, then ours
        dashboard = re.search(r"the dashboard: (\S+)", "".join(lines)).group(1)
        with urllib.request.urlopen(dashboard, timeout=10) as page:
            assert b"dashboard/app.js" in page.read()
        with urllib.request.urlopen(f"http://{admin}/stats/history?route=demo",
                                    timeout=10) as answer:
            assert set(json.loads(answer.read())["routes"]["demo"]) == {
                "production", *route["shadows"]}
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=20) == 0


def test_help_names_the_demo_and_ends_with_our_own_words():
    done = subprocess.run(gproxyd_command() + ["--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0
    assert done.stdout.splitlines()[1].strip().startswith("gproxyd demo [--serve]")
    assert "In general, command-line values" not in done.stdout
    assert " ".join(done.stdout.split()).endswith("environment < command line.")
