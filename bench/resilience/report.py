"""The table: one row per scenario, what #15 reported and what was measured now."""
from __future__ import annotations

from .harness import Row


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(rows: list[Row]) -> str:
    lines = ["| # | scenario | reported in #15 | measured now | verdict | s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.number} | {_cell(row.title)} | {_cell(row.before)} | "
                     f"{_cell(row.now)} | {_cell(row.verdict)} | {row.seconds:.0f} |")
    return "\n".join(lines) + "\n"
