"""The benchmark behind bench/run.py, one module per concern; what the package shares:
where the bench and the repository are, and the error a failed target or run raises.

rig (processes, backends, targets, interleaved runs) -> sections (what is measured and
how it is reported) -> report (results.md, the console tables) -> cli (the options).
"""
from __future__ import annotations

import os

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)


class BenchError(Exception):
    """A target or a measurement failed; str() says why, and ends up in the report."""
