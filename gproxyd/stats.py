"""Counters per route and backend, kept in constant memory; snapshots for logs and admin."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ShadowCounters:
    """One shadow backend of a route, summed over all mirrored connections."""
    mirrored: int = 0          # client connections copied to this shadow
    bytes_sent: int = 0
    bytes_received: int = 0
    connect_failures: int = 0
    dropped: int = 0           # shadow-buffer overflowed: that shadow connection was dropped
    resets: int = 0            # the shadow reset or broke the connection mid-stream


@dataclass
class RouteStats:
    """Everything counted for one route. Survives reloads that keep the route's listener."""
    active: int = 0
    total: int = 0
    rejected: int = 0          # over max-connections
    production_errors: int = 0  # refused, unreachable, timed out, reset
    bytes_up: int = 0
    bytes_down: int = 0
    shadows: dict[str, ShadowCounters] = field(default_factory=dict)

    def shadow(self, name: str) -> ShadowCounters:
        counters = self.shadows.get(name)
        if counters is None:
            counters = self.shadows[name] = ShadowCounters()
        return counters

    def snapshot(self) -> dict:
        return asdict(self)
