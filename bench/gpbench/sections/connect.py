"""connect: new connections per second, wrk with `Connection: close`.

With BENCH_BEFORE=REV, the gproxyd targets of the run (the plain one, and the variants
of the sections that join this one, such as `shadow`'s) are started a second time from
that commit (`git archive`), as `before:NAME`, and measured in the same interleaved
runs; the report gets a chapter comparing the two sources, with the ratio of each
round as well as the ratio of the medians.
"""
from __future__ import annotations

import os
import statistics

from .. import BenchError
from ..configs import gproxyd_conf
from ..procfs import free_port
from ..rig import Rig
from ..section import Row, Section, per
from ..source import export_revision, start_gproxyd
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import BASE, VARIANTS, Target

BEFORE = "before:"


def measure_connect(rig: Rig, target: Target) -> dict[str, float]:
    result = rig.wrk.run(target, "/small", 50, rig.args.duration, rig.wrk.script(),
                         headers=("Connection: close",))
    return {"cps": result.rps, "p99_ms": result.p99_ms,
            "cpu_us": per(result.cpu_seconds, result.requests),
            "cpu_user_us": per(result.cpu_user_seconds, result.requests),
            "errors": result.errors}


class Connect(Section):
    name = "connect"
    summary = "4. new connections per second (Connection: close)"
    rows = (
        Row("connect.cps", "new connections (Connection: close): conn/s"),
        Row("connect.p99_ms", "new connections: p99 ms", 3),
        Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
        Row("connect.cpu_user_us", "new connections: ...of which user space", 1),
    )
    variant_rows = (
        Row("connect.cps", "new connections: conn/s"),
        Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
    )

    def __init__(self) -> None:
        self.before = ""         # the commit BENCH_BEFORE names, if any
        self.before_source = ""  # ...exported
        self.compared: list[str] = []  # the gproxyd targets measured from both sources

    def prepare(self, rig: Rig) -> None:
        self.before = os.environ.get("BENCH_BEFORE", "")
        if self.before:
            self.before_source = export_revision(self.before,
                                                 os.path.join(rig.workdir, "connect-before"))
            rig.notes.append(f"connect: {BEFORE}NAME is gproxyd NAME as at commit "
                             f"{self.before} (BENCH_BEFORE), in the same interleaved runs")

    def run(self, rig: Rig) -> None:
        names = [*BASE, *rig.riders("connect")]
        if self.before:
            self.compared = [name for name in names if name.startswith("gproxyd")]
            for name in self.compared:
                self.start_before(rig, name)
                names.append(BEFORE + name)
            for name in self.compared:  # as the rig warms its own up
                target = rig.targets[BEFORE + name]
                if not target.error:
                    try:
                        rig.wrk.run(target, "/small", 10, 1, rig.wrk.script())
                    except BenchError as error:
                        target.error = f"{target.name}: warm-up failed: {error}"
        rig.interleaved("connect", names, lambda target: measure_connect(rig, target))

    def start_before(self, rig: Rig, name: str) -> None:
        """gproxyd NAME's route to nginx, run from the BENCH_BEFORE commit."""
        variant = next((v for v in VARIANTS if v.name == name), None)
        lines: tuple[str, ...] = ()
        global_lines: tuple[str, ...] = ()
        if variant is not None:
            shadow_ports = {"healthy": rig.shadow_nginx_port, "stalled": rig.stall_port,
                            "dead": rig.dead_port}
            lines = ((f"shadow = 127.0.0.1:{shadow_ports[variant.shadow]}",)
                     if variant.shadow else ()) + variant.route_lines
            global_lines = variant.global_lines
        target = Target(BEFORE + name, f"{name} as at {self.before}",
                        http_port=free_port())
        if variant is not None and variant.shadow == "stalled":
            target.shadow_port = rig.stall_port
        rig.targets[target.name] = target
        conf = os.path.join(rig.workdir, f"before-{name}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(global_lines,
                                      [("http", target.http_port, rig.nginx_port, lines)]))
        code = self.before_source
        try:
            target.proc, target.log = start_gproxyd(rig, target.name, conf, code,
                                                    [target.http_port])
        except BenchError as error:
            target.error = f"{target.name}: {error}"

    # -- the report (only with BENCH_BEFORE)

    def table(self, rig: Rig) -> list[list[str]]:
        rows = [["metric (median of runs)", "before", "after", "after/before",
                 "after/before per run: median (min-max)"]]

        # run -> value, so that a ratio pairs values of the same round (a run that
        # failed for one target leaves that round out)
        Runs = dict[int, float]

        def runs(target: str, metric: str) -> Runs:
            return {entry["run"]: entry["values"][metric] for entry in rig.raw
                    if entry.get("section") == "connect" and entry["target"] == target
                    and isinstance(entry.get("values", {}).get(metric), (int, float))}

        def add(label: str, after: Runs, before: Runs, digits: int) -> None:
            mine = statistics.median(after.values()) if after else None
            theirs = statistics.median(before.values()) if before else None
            each = over(after, before).values()
            spread = (f"{statistics.median(each):.2f} ({min(each):.2f}-{max(each):.2f})"
                      if each else "n/a")
            rows.append([label, fmt(theirs, digits), fmt(mine, digits), ratio(mine, theirs),
                         spread])

        def over(top: Runs, bottom: Runs) -> Runs:
            return {run: value / bottom[run] for run, value in top.items()
                    if bottom.get(run)}

        haproxy = runs("haproxy", "cps")
        plain_after, plain_before = runs("gproxyd", "cps"), runs(BEFORE + "gproxyd", "cps")
        for name in self.compared:
            for metric, label, digits in (("cps", "conn/s", 0), ("cpu_us", "CPU us/conn", 1),
                                          ("cpu_user_us", "...of which user space", 1),
                                          ("p99_ms", "p99 ms", 3)):
                add(f"{name}: {label}", runs(name, metric), runs(BEFORE + name, metric),
                    digits)
            after, before = runs(name, "cps"), runs(BEFORE + name, "cps")
            add(f"{name}: conn/s / haproxy's (same run)", over(after, haproxy),
                over(before, haproxy), 2)
            if name != "gproxyd":
                add(f"{name}: conn/s / the plain route's (same source, same run)",
                    over(after, plain_after), over(before, plain_before), 2)
        cpu = runs("haproxy", "cpu_us")
        add("gproxyd: CPU per connection / haproxy's (same run)",
            over(runs("gproxyd", "cpu_us"), cpu), over(runs(BEFORE + "gproxyd", "cpu_us"), cpu),
            2)
        return rows

    def chapter(self, rig: Rig) -> list[str]:
        if not self.compared:
            return []
        return ["", f"## New connections: this tree against {self.before} (BENCH_BEFORE)", "",
                (__doc__ or "").split("\n\n", 1)[1].replace("\n", " ").strip(), "",
                markdown_table(self.table(rig))]

    def console(self, rig: Rig) -> list[str]:
        if not self.compared:
            return []
        return ["", f"connect: this tree against {self.before}", text_table(self.table(rig))]


SECTION = Connect()
