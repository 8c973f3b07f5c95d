"""shadow-matrix: ~1 KiB POSTs through gproxyd with no, a healthy, a stalled, a dead and
a batched (shadow-write-delay) shadow, at a fixed rate and at saturation, and a long run
that shows the proxy's RSS against a stalled shadow."""
from __future__ import annotations

from typing import Any

from ..rig import Rig
from ..section import Row, Section, per
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target

POST_BODY_SIZE = 1024
LONG_RUN_CONNECTIONS = 10
MATRIX = (("gproxyd", "a) none"), ("gproxyd+healthy", "b) healthy"),
          ("gproxyd+stalled", "c) stalled"), ("gproxyd+dead", "d) dead"),
          ("gproxyd+batched", "e) healthy, 5ms"))
MATRIX_ROWS = (
    Row("fixed.rps", "fixed rate: achieved req/s"),
    Row("fixed.p50_ms", "fixed rate: p50 ms", 3),
    Row("fixed.p99_ms", "fixed rate: p99 ms", 3),
    Row("fixed.errors", "fixed rate: wrk errors", ratios=False),
    Row("saturation.rps", "saturation (wrk -c50): req/s"),
    Row("saturation.p50_ms", "saturation: p50 ms", 3),
    Row("saturation.p99_ms", "saturation: p99 ms", 3),
    Row("saturation.errors", "saturation: wrk errors", ratios=False),
    Row("saturation.cpu_us", "saturation: CPU us/req, gproxyd", 1),
    Row("saturation.cpu_user_us", "saturation: ...of which gproxyd's user space", 1),
    Row("saturation.cpu_us_nginx", "saturation: CPU us/req, production nginx", 1),
    Row("saturation.cpu_us_nginx_shadow", "saturation: CPU us/req, shadow nginx", 1,
        ratios=False),
    Row("saturation.cpu_us_wrk", "saturation: CPU us/req, wrk", 1),
    Row("saturation.rss_growth_kib", "saturation: proxy RSS growth in one run, KiB",
        ratios=False),
    Row("saturation.kernel_queued_per_conn_kib",
        "saturation: kernel-queued KiB, most for one shadow conn", ratios=False),
)


def _delay_ms(rig: Rig) -> int:
    """What each connection waits before each request when wrk has no -R."""
    return max(1, round(rig.args.rate_connections * 1000 / rig.args.rate))


def measure_fixed_rate(rig: Rig, target: Target) -> dict[str, Any]:
    """~1 KiB POSTs at a fixed offered load below saturation."""
    connections = rig.args.rate_connections
    if rig.wrk_rate_flag:
        script, rate = rig.wrk.script("POST", POST_BODY_SIZE), rig.args.rate
    else:
        # Stock wrk has no -R: each connection waits delay() ms before each request,
        # which caps it at 1000/delay requests a second (a little less: plus latency).
        script, rate = rig.wrk.script("POST", POST_BODY_SIZE, _delay_ms(rig)), 0
    result = rig.wrk.run(target, "/post", connections, rig.args.duration, script, rate=rate)
    return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "errors": result.errors, **_rss_summary(result.rss_kib),
            **_queue_summary(result.queued)}


def measure_saturation(rig: Rig, target: Target, seconds: float | None = None,
                       connections: int = 50) -> dict[str, Any]:
    result = rig.wrk.run(target, "/post", connections, seconds or rig.args.duration,
                         rig.wrk.script("POST", POST_BODY_SIZE))
    # Where the two CPUs went, per request: the proxy, production's and the healthy
    # shadow's nginx, and wrk (what a shadow costs besides the proxy's own work).
    budget = {f"cpu_us_{name.replace('-', '_')}": per(seconds_used, result.requests)
              for name, seconds_used in result.others_cpu.items()}
    return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "errors": result.errors, "cpu_us": per(result.cpu_seconds, result.requests),
            "cpu_user_us": per(result.cpu_user_seconds, result.requests), **budget,
            **_rss_summary(result.rss_kib), **_queue_summary(result.queued)}


def _queue_summary(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    if not samples:
        return {}
    return {"kernel_queued_max_kib": max(sample[1] for sample in samples) // 1024,
            "kernel_queued_per_conn_kib": max(sample[2] for sample in samples) // 1024,
            "kernel_queued_kib": [sample[1] // 1024 for sample in samples]}


def _rss_summary(samples: list[int]) -> dict[str, Any]:
    if not samples:
        return {}
    return {"rss_start_kib": samples[0], "rss_max_kib": max(samples),
            "rss_end_kib": samples[-1], "rss_growth_kib": samples[-1] - samples[0],
            "rss_samples_kib": samples}


def matrix_table(rig: Rig) -> list[list[str]]:
    rows = [["metric (median), ~1 KiB POSTs"] + [label for _, label in MATRIX]
            + [f"{label[0]}/a" for _, label in MATRIX[1:]]]
    for row in MATRIX_ROWS:
        values = [rig.median(name, row.metric) for name, _ in MATRIX]
        rows.append([row.label] + [fmt(v, row.digits) for v in values]
                    + [ratio(v, values[0]) if row.ratios else "" for v in values[1:]])
    return rows


def long_run_lines(rig: Rig) -> list[str]:
    """One line per long run: throughput, the proxy's RSS over time and, with a stalled
    shadow, what the kernel held for it (the proxy's own buffer only fills after that)."""
    lines = []
    for item in rig.raw:
        if item.get("section") != "long" or "values" not in item:
            continue
        values = item["values"]
        samples = values.get("rss_samples_kib", [])
        every = max(1, len(samples) // 12)
        series = ", ".join(f"{kib / 1024:.0f}" for kib in samples[::every])
        line = (f"{item['target']}: {rig.args.stall_seconds:g} s at saturation (wrk "
                f"-c{LONG_RUN_CONNECTIONS}), "
                f"{values['rps']:,.0f} req/s, {values['errors']} wrk errors; proxy RSS "
                f"{values.get('rss_start_kib', 0) / 1024:.1f} -> "
                f"{values.get('rss_end_kib', 0) / 1024:.1f} MiB (max "
                f"{values.get('rss_max_kib', 0) / 1024:.1f}, growth "
                f"{values.get('rss_growth_kib', 0) / 1024:+.1f} MiB); RSS MiB every "
                f"{every} s: {series}")
        if "kernel_queued_kib" in values:
            queued = values["kernel_queued_kib"][::every]
            line += (f"; kernel-queued for the shadow, max "
                     f"{values['kernel_queued_max_kib'] / 1024:.1f} MiB "
                     f"(at most {values['kernel_queued_per_conn_kib'] / 1024:.2f} MiB for one "
                     "connection),"
                     f" MiB every {every} s: {', '.join(f'{q / 1024:.0f}' for q in queued)}")
        lines.append(line)
    return lines


class ShadowMatrix(Section):
    name = "shadow-matrix"
    summary = ("shadow issue: no/healthy/stalled/dead shadow at a fixed rate and at "
               "saturation, ~1 KiB POSTs, RSS over a long stalled run")
    variants = ("gproxyd+healthy", "gproxyd+stalled", "gproxyd+dead", "gproxyd+batched")

    def run(self, rig: Rig) -> None:
        matrix = [name for name, _ in MATRIX]
        rig.interleaved("fixed", matrix, lambda target: measure_fixed_rate(rig, target))
        rig.interleaved("saturation", matrix, lambda target: measure_saturation(rig, target))
        # Ten connections, not fifty: each then carries five times the bytes, so the
        # kernel's buffers for the stalled shadow (up to tcp_wmem's max per connection)
        # fill within seconds and the rest of the run tests gproxyd's shadow-buffer.
        long_runs = ["gproxyd+stalled"] if rig.args.quick else ["gproxyd", "gproxyd+stalled"]
        rig.interleaved("long", long_runs, lambda target: measure_saturation(
            rig, target, rig.args.stall_seconds, LONG_RUN_CONNECTIONS), 1)

    def chapter(self, rig: Rig) -> list[str]:
        args = rig.args
        rate_method = ("wrk -R" if rig.wrk_rate_flag else
                       f"stock wrk with a Lua delay(): {args.rate_connections} connections, "
                       f"each waiting {_delay_ms(rig)} ms before each request (closed loop: "
                       "a slow response delays the next one)")
        md = ["", "## Shadow cost (shadow issue)", "",
              f"~{POST_BODY_SIZE} B POST bodies to /post, every variant a gproxyd of its "
              f"own. Fixed rate: {args.rate} req/s offered by {rate_method}. Saturation: "
              "wrk -c50. The proxy's RSS is sampled once a second; kernel-queued is what "
              "/proc/net/tcp shows waiting in the send queues towards the stalled shadow "
              "and unread at its end: only past that does gproxyd's own shadow-buffer "
              "fill. Before each stalled run the stalled server resets the connections "
              "earlier runs left.", "",
              markdown_table(matrix_table(rig)), "",
              f"Long runs ({args.stall_seconds:g} s):", ""]
        return md + ([f"- {line}" for line in long_run_lines(rig)] or ["- n/a"])

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(matrix_table(rig)), *long_run_lines(rig)]


SECTION = ShadowMatrix()
