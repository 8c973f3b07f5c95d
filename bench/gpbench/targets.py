"""What a client connects to: a direct connection, haproxy, or one gproxyd variant; and
the catalogue of gproxyd variants the sections measure."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from . import BENCH_DIR, BenchError
from .processes import log_tail

# Always started, and measured by the basic sections: the plain gproxyd has a route per
# backend (nginx, and iperf3 and echo when a section needs them).
BASE = ("direct", "haproxy", "gproxyd")


@dataclass
class Target:
    """One thing measured: a direct connection, haproxy, or one gproxyd variant."""
    name: str
    description: str
    http_port: int = 0
    bulk_port: int = 0
    hold_port: int = 0
    shadow_port: int = 0   # set for a stalled shadow: its queues are watched and reset
    proc: subprocess.Popen | None = None
    log: str = ""
    error: str = ""
    scheme: str = "http"   # what wrk speaks to http_port: https for the tls section

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def check_alive(self) -> None:
        if self.error:
            raise BenchError(self.error)
        if self.proc and self.proc.poll() is not None:
            self.error = f"{self.name} exited with status {self.proc.returncode}: " \
                         f"{log_tail(self.log)}"
            raise BenchError(self.error)


@dataclass(frozen=True)
class Variant:
    """A gproxyd of its own with one route to nginx, configured by ROUTE_LINES (after
    the shadow line, when SHADOW names one: "healthy", "stalled" or "dead")."""
    name: str
    description: str
    shadow: str = ""
    route_lines: tuple[str, ...] = ()
    global_lines: tuple[str, ...] = ()


_NOOP_HOOK = f"hooks = {os.path.join(BENCH_DIR, 'noop_hook.py')}"
_BUSY_HOOK = f"hooks = {os.path.join(BENCH_DIR, 'busy_hook.py')}"

# In the order they start and are listed in the report; a section names those it needs.
VARIANTS = (
    Variant("gproxyd+healthy", "gproxyd, shadow = a second nginx", shadow="healthy"),
    Variant("gproxyd+stalled", "gproxyd, shadow = a server that accepts and never reads",
            shadow="stalled"),
    Variant("gproxyd+dead", "gproxyd, shadow port closed (refused)", shadow="dead"),
    Variant("gproxyd+batched", "gproxyd, shadow = a second nginx, shadow-write-delay = 5ms",
            shadow="healthy", route_lines=("shadow-write-delay = 5ms",)),
    Variant("gproxyd+http", "gproxyd, protocol = http (observer)",
            route_lines=("protocol = http",)),
    Variant("gproxyd+hook", "gproxyd, hooks = bench/noop_hook.py (on_data and on_response "
            "return the bytes unchanged)", route_lines=(_NOOP_HOOK,)),
    Variant("gproxyd+http+2w", "gproxyd, protocol = http, workers = 2",
            route_lines=("protocol = http",), global_lines=("workers = 2",)),
    Variant("gproxyd+busy", "gproxyd, hooks = bench/busy_hook.py (~0.1 ms of Python per "
            "request)", route_lines=(_BUSY_HOOK,)),
    Variant("gproxyd+busy+2w", "gproxyd, hooks = bench/busy_hook.py, workers = 2",
            route_lines=(_BUSY_HOOK,), global_lines=("workers = 2",)),
)
