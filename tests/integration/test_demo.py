"""`gproxyd demo`, the README's first command: it runs, and what it prints is true."""
from __future__ import annotations

import re
import subprocess

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
