"""The resilience re-measurement behind bench/resilience.py (#15): issue #15's attack
scenarios run again against the installed gproxyd, one table row each.

harness (daemons, real servers, /proc numbers, the row) -> peers (scripted backends and
clients) -> traffic, lifecycle, limits (the scenarios) -> report (the table).
"""

import os
import sys

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)
# The integration tests' Daemon (NOTIFY_SOCKET readiness, reload, logs) and TaggedEcho
# drive gproxyd here as they do there.
sys.path.insert(0, os.path.join(REPO_DIR, "tests", "integration"))
