"""large: 1 MiB responses, wrk -c10."""
from __future__ import annotations

from ..rig import Rig
from ..section import Row, Section, per
from ..targets import BASE, Target


def measure_large(rig: Rig, target: Target) -> dict[str, float]:
    result = rig.wrk.run(target, "/1m", 10, rig.args.duration, rig.wrk.script())
    return {"mibps": result.bytes / result.seconds / (1 << 20),
            "cpu_us": per(result.cpu_seconds, result.requests), "errors": result.errors}


class Large(Section):
    name = "large"
    summary = "2. 1 MiB responses, wrk -c10: MiB/s"
    rows = (
        Row("large.mibps", "1 MiB responses (wrk -c10): MiB/s"),
        Row("large.cpu_us", "1 MiB responses: proxy CPU us/response", 0),
    )

    def run(self, rig: Rig) -> None:
        rig.interleaved("large", list(BASE), lambda target: measure_large(rig, target))


SECTION = Large()
