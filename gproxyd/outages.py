"""Backend outages, logged once each: a production or shadow that cannot be reached is one
warning when it goes down, a reminder with a count while it stays down, and one when it
answers again — not one line per client connection that found it down.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("gproxyd")

REMIND_EVERY = 60.0  # seconds between two "still unreachable" lines of one outage


@dataclass
class _Outage:
    since: float
    failures: int
    last_error: str
    reminded: float


class Outages:
    """Which backends this process found unreachable, by who they are ("route web:
    production 10.0.0.5:80"). Connecting calls failed() or, when it works, recovered();
    Callers test the object first (false while nothing is down) to skip naming who."""

    def __init__(self, clock=time.monotonic, remind_every: float = REMIND_EVERY):
        self._clock = clock
        self._remind_every = remind_every
        self._down: dict[str, _Outage] = {}

    def failed(self, who: str, error: str) -> None:
        now = self._clock()
        outage = self._down.get(who)
        if outage is None:
            self._down[who] = _Outage(now, 1, error, now)
            log.warning("%s unreachable: %s (logged once an outage: failed connections are "
                        "counted, and a line follows every %gs while it lasts)", who, error,
                        self._remind_every)
            return
        outage.failures += 1
        outage.last_error = error
        if now - outage.reminded >= self._remind_every:
            outage.reminded = now
            log.warning("%s still unreachable after %.0fs: %d connection(s) failed (last: "
                        "%s)", who, now - outage.since, outage.failures, error)

    def __bool__(self) -> bool:
        return bool(self._down)

    def recovered(self, who: str) -> None:
        outage = self._down.pop(who, None)
        if outage is not None:
            log.warning("%s reachable again after %.1fs; %d connection(s) failed meanwhile",
                        who, self._clock() - outage.since, outage.failures)

    def down(self) -> dict[str, int]:
        """Backends down now, with how many connections failed on each."""
        return {who: outage.failures for who, outage in self._down.items()}


# One per process: every route's sessions report to it.
OUTAGES = Outages()
