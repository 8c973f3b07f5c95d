"""openloop: production's latency at half of saturation, open-loop, with no shadow, a
healthy shadow and a stalled one (#19 item 2).

Two saturations of the plain route with the shadow matrix's ~1 KiB POSTs: the closed-loop
one, its req/s under `wrk -c50` (the median of the section's first runs), and the
open-loop knee: the highest rate bench/openloop.c (compiled with cc into the temporary
directory) can offer the plain route open-loop while it keeps up (KNEE below), found by
bisection. wrk's 50 connections each send the next request as soon as the answer is in,
so the proxy serves them in batches; open-loop requests come one at a time, evenly
spaced, and each costs the proxy more, so the route saturates at a lower rate: half of
*that* is where an open-loop latency target has headroom to mean something. The rates
measured: half of the knee, and half and a quarter of wrk's saturation (the earlier
runs' rates). Open-loop: request i is due at i/RATE whatever happened to the ones
before, goes out on an idle one of 50 kept-alive connections (or waits for the first to
come free), and its latency counts from its due time. Rounds of the three routes in turn
(plain, shadow = the second nginx, shadow = the server that accepts and never reads),
each a gproxyd of its own, and of the control: the sender straight to nginx; with
BENCH_BEFORE=REV
the same three routes of that commit's gproxyd join every round, so before and after meet
the same machine. The sender reports its own lateness (how long after its due time it
handed each request on): when that is high, the machine made the latency.

The verdict is on the pooled p99: the p99 of every request of every round of a route
(the sender writes each latency to a file), ~5 x 65,000 requests at 5 rounds. A single
round's p99 is its ~650 slowest requests, which the machine's rare stalls decide (the
rounds' ratios spread from 0.3 to 28 in one quiet run); the median of the rounds' p99s
is shown beside it.

Targets: p99 with a healthy shadow at most 1.2x the plain route's, with a stalled one at
most 1.1x.

The shadow's load (CONTROL): on one machine the healthy shadow's nginx shares the CPUs of
production's nginx and of the sender, so part of the healthy route's ratio is the shadow
backend's own work, which a shadow on another host would not add. The plain route is
measured again while a second sender offers the same rate straight to the shadow's
nginx: its p99 over the plain route's is that share (an upper bound: the second sender
costs CPU too), and the healthy route's p99 over its p99 is what mirroring in gproxyd
adds on top.

The A/A route (AGAIN): a second gproxyd with the plain route's configuration, measured in
the same rounds. Its pooled p99 over the plain route's is what this machine makes of two
identical routes; a shadow ratio closer to 1 than that is not a measured difference.
On the 2-CPU benchmark VM (December 2026) two identical routes read 0.49x and 0.77x
apart (the p99 of 50 connections at ~14k req/s is decided by a few of the machine's
stalls; one route's 4 s rounds spread from 0.34 to 1.59 ms).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from array import array
from typing import Any

from .. import BENCH_DIR, BenchError
from ..configs import gproxyd_conf
from ..processes import child_setup
from ..procfs import free_port, shadow_queues, tree_cpu_times
from ..rig import Rig
from ..section import Section, per
from ..source import export_revision, start_gproxyd
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target
from .shadow_matrix import POST_BODY_SIZE, measure_saturation

CONNECTIONS = 50
# The rates offered: (name, share, of what): half of the open-loop knee (the issue's "half
# of saturation", open-loop), and the shares of wrk's saturation the earlier runs used.
POINTS = (("knee-50", 0.5, "knee"), ("50", 0.5, "wrk"), ("25", 0.25, "wrk"))
OF = {"knee": "the open-loop knee", "wrk": "wrk -c50 saturation"}
# The knee: the plain route keeps up with an offered rate when at least 97% of it is
# answered within the run, under 1% of the requests waited for a free connection, and
# its p99 is at most KNEE_P99 times the p99 at a tenth of wrk's saturation.
KNEE_P99 = 4.0
KNEE_STEPS = 6          # bisection steps between a tenth and all of wrk's saturation
KNEE_SECONDS = 3.0      # each step's run, at most
KNEE_TRIES = 3          # runs per step: a rate is kept up with when most of them keep up
# (one 3 s run decided each step before: two quiet runs put the knee at 25.9k and 47.4k)
POOLED = ((0.99, "p99 ms"), (0.999, "p99.9 ms"))
ROUTES = (("gproxyd", "none"), ("gproxyd+healthy", "healthy"),
          ("gproxyd+stalled", "stalled"))
TARGETS = {"healthy": 1.2, "stalled": 1.1}   # p99 ÷ none, at most
# The plain gproxyd again, with a second sender loading the shadow's nginx (see above).
CONTROL = "gproxyd+shadow-load"
# A second gproxyd with the plain route, for the A/A check (see above).
AGAIN = "gproxyd-again"
ROWS = (("achieved", "achieved req/s", 0), ("p50_ms", "p50 ms", 3),
        ("p90_ms", "p90 ms", 3), ("p99_ms", "p99 ms", 3), ("p999_ms", "p99.9 ms", 3),
        ("max_ms", "max ms", 2), ("lag_p50_ms", "sender late, p50 ms", 3),
        ("lag_p99_ms", "sender late, p99 ms", 3), ("lag_max_ms", "sender late, max ms", 2),
        ("waited", "requests that waited for a free connection", 0),
        ("errors", "errors + unanswered", 0), ("cpu_us", "gproxyd CPU us/req", 1),
        ("cpu_user_us", "...of which user space", 1),
        ("queued_kib", "kernel-queued towards the shadow at the end, KiB", 0),
        ("load_achieved", "second sender straight to the shadow's nginx, req/s", 0))


class OpenLoop(Section):
    name = "openloop"
    summary = ("#19 item 2: production's p50/p99 at half of saturation, open-loop "
               "(bench/openloop.c), with no / a healthy / a stalled shadow")
    variants = ("gproxyd+healthy", "gproxyd+stalled")
    warm_up = ("gproxyd+healthy", "gproxyd+stalled")

    def __init__(self) -> None:
        self.sender = ""
        self.error = ""
        self.rates: dict[str, int] = {}   # point (POINTS) -> offered req/s
        self.saturation = 0.0
        self.knee = 0
        # (rate, the sender's results of its KNEE_TRIES runs, kept up with)
        self.knee_steps: list[tuple[int, list[dict[str, Any]], bool]] = []
        self.calm_p99 = 0.0   # the median p99 at a tenth of wrk's saturation
        # (target, point) -> every answered request's latency of every round, in us
        self.pooled: dict[tuple[str, str], array] = {}
        self.before = ""   # the commit BENCH_BEFORE names, if any
        self.sources: list[str] = ["after"]

    def prepare(self, rig: Rig) -> None:
        self.before = os.environ.get("BENCH_BEFORE", "")
        if self.before:
            self.sources = ["before", "after"]

    def names(self, source: str) -> list[str]:
        return [name if source == "after" else f"before:{name}" for name, _ in ROUTES]

    def run(self, rig: Rig) -> None:
        self.sender = os.path.join(rig.workdir, "openloop")
        built = subprocess.run(["cc", "-O2", "-o", self.sender,
                                os.path.join(BENCH_DIR, "openloop.c")],
                               capture_output=True, text=True, timeout=120)
        if built.returncode != 0:
            self.error = f"cc bench/openloop.c failed: {built.stderr.strip()[-300:]}"
            return
        if self.before:
            self.start_before(rig)
        rig.interleaved("openloop-saturation", ["gproxyd"],
                        lambda target: measure_saturation(rig, target))
        self.saturation = rig.median("gproxyd", "openloop-saturation.rps") or 0.0
        if not self.saturation:
            self.error = "no saturation run of the plain route finished"
            return
        self.knee = self.find_knee(rig)
        plain = rig.targets["gproxyd"]
        rig.targets[CONTROL] = Target(
            CONTROL, "the plain route, while a second sender offers the same rate straight "
            "to the shadow's nginx", http_port=plain.http_port, proc=plain.proc)
        self.start_again(rig)
        # direct: the sender straight to nginx, the control: what the machine and the
        # sender make of the latency with no proxy at all.
        targets = ["direct"] + [name for source in self.sources
                                for name in self.names(source)] + [AGAIN, CONTROL]
        for point, share, of in POINTS:
            base = self.knee if of == "knee" else self.saturation
            if not base:
                continue
            rate = self.rates[point] = round(base * share)
            rig.interleaved(measurement(point), targets,
                            lambda target, rate=rate, point=point:
                            self.measure(rig, target, rate, point))

    def find_knee(self, rig: Rig) -> int:
        """The plain route's open-loop knee (KNEE), by bisection between a tenth and all
        of wrk's saturation; 0 if even a tenth is too much."""
        target = rig.targets["gproxyd"]
        seconds = min(rig.args.duration, KNEE_SECONDS)

        def kept_up(rate: int) -> bool:
            """KNEE_TRIES runs at RATE: did most of them keep up?"""
            results = [self.send(rig, target, rate, seconds) for _ in range(KNEE_TRIES)]
            if not self.calm_p99:   # the first step, a tenth of saturation, sets the bar
                self.calm_p99 = statistics.median(result["p99_ms"] for result in results)
            ok = sum(self.keeps_up(result, rate, self.calm_p99) for result in results)
            self.knee_steps.append((rate, results, 2 * ok > len(results)))
            return self.knee_steps[-1][2]

        low = round(self.saturation / 10)
        try:
            high = round(self.saturation)
            if not kept_up(low):
                return 0
            for _ in range(KNEE_STEPS):
                middle = (low + high) // 2
                if kept_up(middle):
                    low = middle
                else:
                    high = middle
        except BenchError as error:
            rig.failed(target, "openloop-knee", error)
            return 0
        return low

    @staticmethod
    def keeps_up(result: dict[str, Any], rate: int, calm_p99: float) -> bool:
        due = max(result["due"], 1)
        return (result["rate"] >= 0.97 * rate
                and result["waited_for_connection"] < 0.01 * due
                and result["p99_ms"] <= KNEE_P99 * calm_p99)

    def start_again(self, rig: Rig) -> None:
        """AGAIN: a gproxyd of its own with the plain route, the same code."""
        start_route(rig, Target(AGAIN, "the plain route again, another gproxyd"),
                    rig.gproxyd_source, ())

    def start_before(self, rig: Rig) -> None:
        """The three routes again, each a gproxyd of its own, as committed at BEFORE."""
        try:
            code = export_revision(self.before, os.path.join(rig.workdir, "before"))
        except BenchError as error:
            self.error = str(error)
            return
        shadows = {"gproxyd": "", "gproxyd+healthy": f"127.0.0.1:{rig.shadow_nginx_port}",
                   "gproxyd+stalled": f"127.0.0.1:{rig.stall_port}"}
        for name, shadow in shadows.items():
            target = Target(f"before:{name}", f"{name} at {self.before}")
            if "stalled" in name:
                target.shadow_port = rig.stall_port
            start_route(rig, target, code, (f"shadow = {shadow}",) if shadow else ())

    def send(self, rig: Rig, target: Target, rate: int, seconds: float,
             latencies: str = "") -> dict[str, Any]:
        """One run of the open-loop sender against TARGET: its JSON result (and every
        latency written to the file LATENCIES, if given)."""
        argv = [self.sender, str(target.http_port), str(rate),
                f"{seconds:g}", str(CONNECTIONS), str(POST_BODY_SIZE)]
        if latencies:
            argv.append(latencies)
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=seconds + 30, stdin=subprocess.DEVNULL,
                                  preexec_fn=child_setup(rig.load_cpus))
        except subprocess.TimeoutExpired:
            raise BenchError("the open-loop sender did not finish in time") from None
        if done.returncode != 0:
            raise BenchError(f"open-loop sender failed (exit {done.returncode}): "
                             f"{done.stderr.strip()[-200:]}")
        return json.loads(done.stdout)

    def measure(self, rig: Rig, target: Target, rate: int, point: str) -> dict[str, Any]:
        pid = target.pid
        latencies = os.path.join(rig.workdir, "openloop-latencies")
        load = self.load_shadow(rig, rate) if target.name == CONTROL else None
        user, system = tree_cpu_times(pid) if pid else (0.0, 0.0)
        try:
            result = self.send(rig, target, rate, rig.args.duration, latencies)
        finally:
            shadow_load = self.finish_load(load) if load else None
        user_after, system_after = tree_cpu_times(pid) if pid else (0.0, 0.0)
        with open(latencies, "rb") as handle:
            self.pooled.setdefault((target.name, point), array("I")).frombytes(handle.read())
        values = {key: result[key] for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms",
                                               "max_ms", "lag_p50_ms", "lag_p99_ms",
                                               "lag_max_ms")}
        values.update(achieved=result["rate"], waited=result["waited_for_connection"],
                      errors=result["errors"] + result["unanswered"])
        if pid:
            values.update(cpu_us=per(user_after - user + system_after - system,
                                     result["answered"]),
                          cpu_user_us=per(user_after - user, result["answered"]))
        if target.shadow_port:
            values["queued_kib"] = shadow_queues(target.shadow_port)[1] // 1024
        if shadow_load is not None:
            values["load_achieved"] = shadow_load["rate"]
        return values

    def load_shadow(self, rig: Rig, rate: int) -> subprocess.Popen:
        """The control's second sender: RATE straight to the shadow's nginx, for as long
        as the measured run."""
        argv = [self.sender, str(rig.shadow_nginx_port), str(rate),
                f"{rig.args.duration:g}", str(CONNECTIONS), str(POST_BODY_SIZE)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True,
                                preexec_fn=child_setup(rig.load_cpus))

    @staticmethod
    def finish_load(load: subprocess.Popen) -> dict[str, Any]:
        try:
            out, err = load.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            load.kill()
            load.communicate()
            raise BenchError("the control's second sender did not finish in time") from None
        if load.returncode != 0:
            raise BenchError(f"the control's second sender failed (exit {load.returncode}): "
                             f"{err.strip()[-200:]}")
        return json.loads(out)

    # -- the report

    def round_ratios(self, rig: Rig, point: str, source: str, label: str,
                     metric: str) -> list[float]:
        """Each round's METRIC of the shadow route over the plain route's that round."""
        names = dict(zip((label for _, label in ROUTES), self.names(source), strict=True))
        top = rig.samples.get((names[label], f"{measurement(point)}.{metric}"), [])
        bottom = rig.samples.get((names["none"], f"{measurement(point)}.{metric}"), [])
        return [a / b for a, b in zip(top, bottom, strict=False) if b]

    def table(self, rig: Rig, point: str) -> list[list[str]]:
        key = measurement(point)
        head = ["metric (median of rounds)", "direct (control)"]
        columns = ["direct"]
        for source in self.sources:
            for name, (_, label) in zip(self.names(source), ROUTES, strict=True):
                columns.append(name)
                head.append(label if len(self.sources) == 1 else f"{source}: {label}")
        columns += [AGAIN, CONTROL]
        head += ["none, again (A/A)", "none + the shadow's load"]
        rows = [head]
        for metric, label, digits in ROWS:
            rows.append([label] + [fmt(rig.median(name, f"{key}.{metric}"), digits)
                                   for name in columns])
        for share, label in POOLED:
            rows.append([f"{label}, all rounds' requests pooled"]
                        + [fmt(self.pooled_ms(name, point, share), 3) for name in columns])
        for share, label in POOLED:
            for which in ("healthy", "stalled"):
                row = [f"{label} {which} / none, pooled", ""]
                for source in self.sources:
                    names = self.names(source)
                    cell = ratio(self.pooled_ms(names[1 if which == "healthy" else 2],
                                                point, share),
                                 self.pooled_ms(names[0], point, share))
                    row += ["", "", cell] if which == "stalled" else ["", cell, ""]
                rows.append(row + ["", ""])
        for share, label in POOLED:
            plain = self.pooled_ms("gproxyd", point, share)
            loaded = self.pooled_ms(CONTROL, point, share)
            blank = [""] * (1 + 3 * len(self.sources))
            rows.append([f"{label} none again / none, pooled (A/A)"] + blank
                        + [ratio(self.pooled_ms(AGAIN, point, share), plain), ""])
            rows.append([f"{label} none + the shadow's load / none, pooled"] + blank
                        + ["", ratio(loaded, plain)])
            rows.append([f"{label} healthy / none + the shadow's load, pooled"] + blank
                        + ["", ratio(self.pooled_ms("gproxyd+healthy", point, share),
                                     loaded)])
        for metric in ("p50_ms", "p99_ms"):
            for which in ("healthy", "stalled"):
                row = [f"{metric[:3]} {which} / none: of medians; median of rounds' ratios",
                       ""]
                for source in self.sources:
                    names = self.names(source)
                    plain = rig.median(names[0], f"{key}.{metric}")
                    mine = rig.median(names[1 if which == "healthy" else 2], f"{key}.{metric}")
                    each = self.round_ratios(rig, point, source, which, metric)
                    cell = ratio(mine, plain)
                    if each:
                        cell += f"; {statistics.median(each):.2f}"
                    row += ["", "", cell] if which == "stalled" else ["", cell, ""]
                rows.append(row + ["", ""])
        return rows

    def pooled_ms(self, name: str, point: str, share: float) -> float | None:
        """The SHARE percentile (the sender's rank rule) of every request NAME answered
        at POINT, all rounds pooled, in ms; None without any."""
        values = self.pooled.get((name, point))
        if not values:
            return None
        ranked = sorted(values)
        return ranked[max(1, int(share * len(ranked) + 0.999999999)) - 1] / 1000

    def verdict(self, rig: Rig, point: str) -> list[str]:
        lines = []
        key = f"{measurement(point)}.p99_ms"
        for source in self.sources:
            names = self.names(source)
            plain = self.pooled_ms(names[0], point, 0.99)
            for index, (which, limit) in enumerate(TARGETS.items(), 1):
                mine = self.pooled_ms(names[index], point, 0.99)
                if plain and mine:
                    got = mine / plain
                    of_medians = ratio(rig.median(names[index], key), rig.median(names[0], key))
                    each = ", ".join(f"{value:.2f}" for value in
                                     self.round_ratios(rig, point, source, which, "p99_ms"))
                    lines.append(f"{describe(point)}, {source}: p99 {which} / none, pooled = "
                                 f"{got:.2f} (target <= {limit:g}: "
                                 f"{'met' if got <= limit else 'NOT met'}; of the rounds' "
                                 f"medians {of_medians}; rounds: {each})")
        plain = self.pooled_ms("gproxyd", point, 0.99)
        again = self.pooled_ms(AGAIN, point, 0.99)
        if plain and again:
            aa = again / plain
            spread = max(aa, 1 / aa)
            trusted = spread <= min(TARGETS.values())
            lines.append(f"{describe(point)}: A/A, p99 of a second plain route / the plain "
                         f"route's, pooled = {aa:.2f}: "
                         + ("identical routes read within the targets' margins"
                            if trusted else "identical routes differ by more than the "
                            f"targets' margins: a ratio between {1 / spread:.2f} and "
                            f"{spread:.2f} is this machine's noise, not a measured "
                            "difference"))
        loaded = self.pooled_ms(CONTROL, point, 0.99)
        healthy = self.pooled_ms("gproxyd+healthy", point, 0.99)
        if plain and loaded and healthy:
            lines.append(f"{describe(point)}: the shadow's load alone (the plain route while a "
                         f"second sender loads the shadow's nginx) makes p99 "
                         f"{loaded / plain:.2f}x the plain route's; the healthy route is "
                         f"{healthy / loaded:.2f}x that: what mirroring in gproxyd adds")
        return lines

    def intro(self, rig: Rig) -> str:
        if self.error:
            return f"n/a: {self.error}"
        before = f" Before = commit {self.before} (BENCH_BEFORE)." if self.before else ""
        offered = ", ".join(f"{rate:,} req/s ({describe(point)})"
                            for point, rate in self.rates.items())
        steps = "; ".join(
            f"{rate:,} {'ok' if kept else 'no'} (" + ", ".join(
                f"p99 {result['p99_ms']:.2f} ms {result['rate']:,.0f} req/s "
                f"{result['waited_for_connection']:,} waited" for result in results) + ")"
            for rate, results, kept in self.knee_steps)
        return (f"Saturation of the plain route (wrk -c50, ~{POST_BODY_SIZE} B POSTs, median "
                f"of {rig.args.runs} runs): {self.saturation:,.0f} req/s; its open-loop knee: "
                f"{self.knee:,} req/s (the plain route keeps up: at least 97% answered, "
                f"under 1% waited for a connection, p99 at most {KNEE_P99:g}x the median p99 "
                f"at a tenth of wrk's saturation ({self.calm_p99:.2f} ms), in most of "
                f"{KNEE_TRIES} runs of {min(rig.args.duration, KNEE_SECONDS):g} s; "
                f"bisection: {steps}); offered open-loop: "
                f"{offered}, over {CONNECTIONS} connections, {rig.args.runs} rounds of "
                f"{rig.args.duration:g} s each.{before}")

    def chapter(self, rig: Rig) -> list[str]:
        lines = ["", "## Open-loop latency with shadows (#19 item 2)", "", self.intro(rig)]
        for point, rate in self.rates.items():
            lines += ["", f"At {describe(point)}, {rate:,} req/s offered:", "",
                      markdown_table(self.table(rig, point)), ""]
            lines += [f"- {line}" for line in self.verdict(rig, point)]
        return lines

    def console(self, rig: Rig) -> list[str]:
        lines = ["", self.intro(rig)]
        for point, rate in self.rates.items():
            lines += ["", f"at {describe(point)}, {rate:,} req/s offered:",
                      text_table(self.table(rig, point)), *self.verdict(rig, point)]
        return lines


def start_route(rig: Rig, target: Target, code: str, lines: tuple[str, ...]) -> None:
    """TARGET (added to the rig): a gproxyd of its own, from the source tree CODE, with
    one route to nginx configured by LINES, warmed up; a failure to start is the
    target's error."""
    rig.targets[target.name] = target
    target.http_port = free_port()
    conf = os.path.join(rig.workdir, f"{target.name.replace(':', '-')}.conf")
    with open(conf, "w") as handle:
        handle.write(gproxyd_conf((), [("http", target.http_port, rig.nginx_port, lines)]))
    try:
        target.proc, target.log = start_gproxyd(rig, target.name, conf, code,
                                                [target.http_port])
        rig.wrk.run(target, "/small", 10, 1, rig.wrk.script())
    except BenchError as error:
        target.error = str(error)


def measurement(point: str) -> str:
    """The measurement's name at POINT (POINTS): openloop-knee-50, openloop-50, ..."""
    return f"openloop-{point}"


def describe(point: str) -> str:
    """POINT in words: "50% of the open-loop knee"."""
    share, of = next((share, of) for name, share, of in POINTS if name == point)
    return f"{share:.0%} of {OF[of]}"


SECTION = OpenLoop()
