"""What a section of the benchmark declares (the targets and backends it needs, its rows
in the main table) and does (its measurements, its own part of the report)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rig import Rig


@dataclass(frozen=True)
class Row:
    metric: str        # measurement.metric as recorded
    label: str
    digits: int = 0
    ratios: bool = True    # False where a ratio means nothing (counts, signed growth)


class Section:
    """One section: `--only NAME` selects it, and `--list` and `--help` show SUMMARY.

    A subclass sets the class attributes it needs and overrides the methods it needs;
    an instance is added to the registry in gpbench/sections/__init__.py. Everything the
    rig starts is derived from the sections that run: the plain targets (direct, haproxy,
    gproxyd) always, the gproxyd VARIANTS the sections name, the BACKENDS they name.
    """
    name = ""
    summary = ""
    # gproxyd variants it measures, by name (gpbench/targets.py VARIANTS)
    variants: tuple[str, ...] = ()
    # "echo" (holds idle connections) or "iperf3", besides nginx and the shadows its
    # variants need
    backends: tuple[str, ...] = ()
    # targets that get one 1 s wrk run of /small before the first measurement (the
    # plain ones always do)
    warm_up: tuple[str, ...] = ()
    # sections whose measurements measure this section's variants too, in the same
    # interleaved runs; they run whenever this one does
    joins: tuple[str, ...] = ()
    # variant -> its label in the main table, where it gets the VARIANT_ROWS of the
    # sections it joins
    labels: dict[str, str] = {}
    # its rows of the main table (direct, haproxy, gproxyd, ratios)
    rows: tuple[Row, ...] = ()
    # the rows a variant of a section that joins this one gets in the main table
    variant_rows: tuple[Row, ...] = ()

    def prepare(self, rig: Rig) -> None:
        """Called before any process starts (limits, notes)."""

    def run(self, rig: Rig) -> None:
        """Measure, with rig.interleaved(), in the order of the registry."""

    def chapter(self, rig: Rig) -> list[str]:
        """Its own part of results.md after the main table, as Markdown lines."""
        return []

    def console(self, rig: Rig) -> list[str]:
        """Its own lines of the summary printed at the end, after the main table."""
        return []


def per(total: float | None, count: float) -> float | None:
    """TOTAL seconds per COUNT, in microseconds (None when either is missing)."""
    return total * 1e6 / count if total is not None and count else None
