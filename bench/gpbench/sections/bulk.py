"""bulk: one iperf3 TCP stream through the proxy."""
from __future__ import annotations

from .. import BenchError
from ..load import run_iperf3
from ..procfs import tree_cpu_seconds
from ..rig import Rig
from ..section import Row, Section, per
from ..targets import BASE, Target


def measure_bulk(rig: Rig, target: Target) -> dict[str, float]:
    seconds = max(1, round(rig.args.duration))
    pid = target.pid
    cpu_before = tree_cpu_seconds(pid) if pid else 0.0
    try:
        received = run_iperf3(target.bulk_port, seconds, rig.load_cpus)
    except BenchError:
        rig.start_iperf_server()  # a failed or half-finished test leaves the server busy
        raise
    cpu = tree_cpu_seconds(pid) - cpu_before if pid else None
    return {"gbps": received["bits_per_second"] / 1e9,
            "cpu_us_per_mib": per(cpu, received["bytes"] / (1 << 20))}


class Bulk(Section):
    name = "bulk"
    summary = "3. one iperf3 stream through the proxy: Gbit/s"
    backends = ("iperf3",)
    rows = (
        Row("bulk.gbps", "iperf3 single stream: Gbit/s", 2),
        Row("bulk.cpu_us_per_mib", "iperf3: proxy CPU us/MiB", 1),
    )

    def run(self, rig: Rig) -> None:
        rig.interleaved("bulk", list(BASE), lambda target: measure_bulk(rig, target))


SECTION = Bulk()
