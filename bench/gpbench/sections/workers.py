"""workers: workers = 1 against workers = 2, small keep-alive, on a route where wrk and
nginx need the second core and on one where the proxy's own work leaves it mostly free."""
from __future__ import annotations

from ..rig import Rig
from ..section import Row, Section
from ..tables import fmt, markdown_table, ratio, text_table
from .small import measure_small

# (workers = 1, workers = 2) pairs: where wrk and nginx need the second core, and where
# the proxy's own work leaves it mostly free.
WORKERS = ((("gproxyd+http", "protocol = http"), ("gproxyd+http+2w", "")),
           (("gproxyd+busy", "hooks = busy_hook.py"), ("gproxyd+busy+2w", "")))
WORKERS_ROWS = (
    Row("workers.rps", "small keep-alive (wrk -c50): req/s"),
    Row("workers.p99_ms", "small keep-alive: p99 ms", 3),
    Row("workers.cpu_us", "proxy CPU us/req (all processes)", 1),
)


def workers_table(rig: Rig) -> list[list[str]]:
    rows = [["metric (median)", "route", "workers = 1", "workers = 2", "2/1"]]
    for (one_name, route), (two_name, _) in WORKERS:
        for row in WORKERS_ROWS:
            one, two = (rig.median(name, row.metric) for name in (one_name, two_name))
            rows.append([row.label, route, fmt(one, row.digits), fmt(two, row.digits),
                         ratio(two, one)])
    return rows


class Workers(Section):
    name = "workers"
    summary = ("workers = 1 against workers = 2, small keep-alive, on a protocol = http "
               "route and on a route whose hook needs ~0.1 ms of CPU per request: req/s "
               "and proxy CPU/req")
    variants = tuple(name for pair in WORKERS for name, _ in pair)
    warm_up = variants

    def run(self, rig: Rig) -> None:
        rig.interleaved("workers", list(self.variants),
                        lambda target: measure_small(rig, target))

    def chapter(self, rig: Rig) -> list[str]:
        return ["", "## workers = N", "",
                "Two routes, each with workers = 1 and workers = 2 (SO_REUSEPORT, one "
                "master), small keep-alive requests: protocol = http, where wrk and nginx "
                "need most of what one worker leaves of two cores, and hooks = "
                "bench/busy_hook.py (~0.1 ms of Python per request), where the proxy needs "
                "several times the CPU of wrk and nginx, so a second core is mostly free "
                "for a second worker.",
                "", markdown_table(workers_table(rig))]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(workers_table(rig))]


SECTION = Workers()
