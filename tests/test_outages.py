"""Outages: one line when a backend goes down, a reminder with a count while it stays
down, one when it is back (the clock is the test's, so the minute passes at once)."""
from __future__ import annotations

import logging

from gproxyd.outages import Outages


def test_an_outage_is_three_kinds_of_line_however_many_connections_fail(caplog):
    now = [100.0]
    outages = Outages(clock=lambda: now[0], remind_every=60.0)
    who = "route web: production 10.0.0.5:80"
    assert not outages
    with caplog.at_level(logging.WARNING, logger="gproxyd"):
        for second in range(130):  # ten failed connections a second for 130 s
            now[0] = 100.0 + second
            for _ in range(10):
                outages.failed(who, "Connection refused")
        assert outages and outages.down() == {who: 1300}
        outages.recovered("route web: production 10.0.0.6:80")  # another one: nothing
        now[0] = 231.5
        outages.recovered(who)
        outages.recovered(who)  # already up: nothing
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        f"{who} unreachable: Connection refused (logged once an outage: failed connections "
        "are counted, and a line follows every 60s while it lasts)",
        f"{who} still unreachable after 60s: 601 connection(s) failed (last: Connection "
        "refused)",
        f"{who} still unreachable after 120s: 1201 connection(s) failed (last: Connection "
        "refused)",
        f"{who} reachable again after 131.5s; 1300 connection(s) failed meanwhile",
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)
    assert not outages and outages.down() == {}
