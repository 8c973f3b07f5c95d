"""connect: new connections per second, wrk with `Connection: close`."""
from __future__ import annotations

from ..rig import Rig
from ..section import Row, Section, per
from ..targets import BASE, Target


def measure_connect(rig: Rig, target: Target) -> dict[str, float]:
    result = rig.wrk.run(target, "/small", 50, rig.args.duration, rig.wrk.script(),
                         headers=("Connection: close",))
    return {"cps": result.rps, "p99_ms": result.p99_ms,
            "cpu_us": per(result.cpu_seconds, result.requests), "errors": result.errors}


class Connect(Section):
    name = "connect"
    summary = "4. new connections per second (Connection: close)"
    rows = (
        Row("connect.cps", "new connections (Connection: close): conn/s"),
        Row("connect.p99_ms", "new connections: p99 ms", 3),
        Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
    )
    variant_rows = (
        Row("connect.cps", "new connections: conn/s"),
        Row("connect.cpu_us", "new connections: proxy CPU us/conn", 1),
    )

    def run(self, rig: Rig) -> None:
        rig.interleaved("connect", [*BASE, *rig.riders("connect")],
                        lambda target: measure_connect(rig, target))


SECTION = Connect()
