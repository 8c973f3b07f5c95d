"""small: ~100-byte responses over keep-alive, wrk -c50."""
from __future__ import annotations

from ..rig import Rig
from ..section import Row, Section, per
from ..targets import BASE, Target


def measure_small(rig: Rig, target: Target) -> dict[str, float]:
    result = rig.wrk.run(target, "/small", 50, rig.args.duration, rig.wrk.script())
    return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "cpu_us": per(result.cpu_seconds, result.requests),
            "cpu_user_us": per(result.cpu_user_seconds, result.requests),
            "errors": result.errors}


class Small(Section):
    name = "small"
    summary = "1. ~100-byte responses over keep-alive, wrk -c50: req/s, p50, p99, proxy CPU/req"
    rows = (
        Row("small.rps", "small keep-alive (wrk -c50): req/s"),
        Row("small.p50_ms", "small keep-alive: p50 ms", 3),
        Row("small.p99_ms", "small keep-alive: p99 ms", 3),
        Row("small.cpu_us", "small keep-alive: proxy CPU us/req", 1),
        Row("small.cpu_user_us", "small keep-alive: ...of which user space (not kernel)", 1),
    )
    variant_rows = (
        Row("small.rps", "small keep-alive: req/s"),
        Row("small.p99_ms", "small keep-alive: p99 ms", 3),
        Row("small.cpu_us", "small keep-alive: proxy CPU us/req", 1),
        Row("small.cpu_user_us", "small keep-alive: ...of which user space (not kernel)", 1),
    )

    def run(self, rig: Rig) -> None:
        rig.interleaved("small", [*BASE, *rig.riders("small")],
                        lambda target: measure_small(rig, target))


SECTION = Small()
