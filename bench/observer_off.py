"""gproxyd with the observers' work switched off, to see what observing costs in the
running daemon: Exchanges.sent() and received() do nothing, while the relay keeps what
it does for an observed route (stamped reads of the answers, the taps). A diagnostic,
not a mode of gproxyd: the routes count no requests.

    .venv/bin/python bench/observer_off.py -c CONF     # as `gproxyd -c CONF`

Compare the CPU per request of a `protocol = http` route served by this with the same
route served by gproxyd itself, and with a plain tcp route (bench/results.md, #19).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxyd import observe  # noqa: E402
from gproxyd.cli import run  # noqa: E402


def _nothing(self, data, at: float = 0.0) -> None:
    """What an observer does with the bytes here."""


if __name__ == "__main__":
    observe.Exchanges.sent = _nothing
    observe.Exchanges.received = _nothing
    sys.argv[0] = "gproxyd"
    run()
