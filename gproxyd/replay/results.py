"""A replay's numbers: one row per run, the median row per rate, the knee, the table,
and the CSV and JSON files.

Rates are over a run's time: its schedule's length, or longer while answers were still
coming in (like httperf's test duration). `achieved_rate` (req/s) counts requests
written whole to a connection; `reply_rate` (replies/s) counts whole answers of any
status. Latency percentiles are of answered requests, from the time each was due.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from statistics import median

from .engine import Tally

# The keys of a row, in the CSV's column order; JSON objects have the same keys.
ROW_KEYS = ("target", "offered_rate", "speed", "run", "duration_s", "scheduled", "sent",
            "answered", "achieved_rate", "reply_rate", "p50_ms", "p90_ms", "p99_ms",
            "max_ms", "errors", "timeouts", "status_2xx", "status_3xx", "status_4xx",
            "status_5xx", "status_other", "net_io_kb_s", "bytes_out", "bytes_in",
            "lag_p99_ms")

KEEPING_UP = 0.95     # achieved and reply rate at least this share of the offered rate
P99_GROWTH = 2.0      # and p99 at most this many times the lowest rate's
LAG_WARNING_MS = 10.0  # a sender this late (p99) measured this machine, not the target


def percentile(ordered: list[float], share: float) -> float | None:
    """The nearest-rank percentile of an ascending list; None for an empty one."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def row(tally: Tally, target: str, offered_rate: float, run: int,
        speed: float | None = None) -> dict:
    """One run's row (ROW_KEYS)."""
    elapsed = tally.elapsed
    latencies = sorted(tally.latencies)
    statuses = tally.statuses
    return {
        "target": target,
        "offered_rate": round(offered_rate, 3),
        "speed": speed,
        "run": run,
        "duration_s": round(elapsed, 3),
        "scheduled": tally.scheduled,
        "sent": tally.sent,
        "answered": tally.answered,
        "achieved_rate": round(tally.sent / elapsed, 3),
        "reply_rate": round(tally.answered / elapsed, 3),
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p90_ms": _ms(percentile(latencies, 0.90)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "max_ms": _ms(latencies[-1] if latencies else None),
        "errors": tally.errors,
        "timeouts": tally.timeouts,
        "status_2xx": statuses[2],
        "status_3xx": statuses[3],
        "status_4xx": statuses[4],
        "status_5xx": statuses[5],
        "status_other": sum(statuses) - sum(statuses[2:6]),
        "net_io_kb_s": round((tally.bytes_in + tally.bytes_out) / 1024.0 / elapsed, 3),
        "bytes_out": tally.bytes_out,
        "bytes_in": tally.bytes_in,
        "lag_p99_ms": _ms(percentile(sorted(tally.lags), 0.99)),
    }


@dataclass
class Summary:
    """The runs of one target at one offered rate: the median of each number, and
    each number's lowest and highest over the runs."""
    target: str
    offered_rate: float
    speed: float | None
    runs: int
    median: dict
    low: dict
    high: dict
    knee: bool = False

    def spread(self, key: str) -> float | None:
        """Half the distance between the runs' lowest and highest KEY."""
        if self.runs < 2 or self.low[key] is None:
            return None
        return (self.high[key] - self.low[key]) / 2.0


def _numbers(rows: list[dict], key: str) -> list[float]:
    return [value for value in (row[key] for row in rows) if value is not None]


def summarize(rows: list[dict]) -> list[Summary]:
    """One Summary per (target, offered rate), in the order the rates were first run,
    with the knee marked per target."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for each in rows:
        groups.setdefault((each["target"], each["offered_rate"]), []).append(each)
    summaries = []
    for (target, rate), runs in groups.items():
        numeric = [key for key in ROW_KEYS if key not in ("target", "speed", "run")]
        middle, low, high = {}, {}, {}
        for key in numeric:
            values = _numbers(runs, key)
            middle[key] = median(values) if values else None
            low[key] = min(values) if values else None
            high[key] = max(values) if values else None
        summaries.append(Summary(target, rate, runs[0]["speed"], len(runs), middle, low,
                                 high))
    for target in dict.fromkeys(summary.target for summary in summaries):
        own = [summary for summary in summaries if summary.target == target]
        knee = find_knee(own)
        if knee is not None:
            knee.knee = True
    return summaries


def keeps_up(summary: Summary, base_p99: float | None) -> bool:
    """The knee's test for one rate (its median numbers)."""
    numbers, offered = summary.median, summary.offered_rate
    return (numbers["achieved_rate"] >= KEEPING_UP * offered
            and numbers["reply_rate"] >= KEEPING_UP * offered
            and numbers["errors"] == 0 and numbers["timeouts"] == 0
            and numbers["status_5xx"] == 0
            and base_p99 is not None and numbers["p99_ms"] is not None
            and numbers["p99_ms"] <= P99_GROWTH * base_p99)


def find_knee(summaries: list[Summary]) -> Summary | None:
    """The highest offered rate that keeps up (see keeps_up), of one target's
    summaries; its p99 is compared with the lowest offered rate's."""
    if not summaries:
        return None
    base = min(summaries, key=lambda summary: summary.offered_rate).median["p99_ms"]
    passing = [summary for summary in summaries if keeps_up(summary, base)]
    return max(passing, key=lambda summary: summary.offered_rate) if passing else None


# --- the table --------------------------------------------------------------------------

def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _latency(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _with_spread(text: str, spread: float | None, formatter) -> str:
    return text if spread is None else f"{text} ±{formatter(spread)}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


_COLUMNS = ("rate", "target", "req/s", "replies/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
            "errors", "timeouts", "2xx", "3xx", "4xx", "5xx", "net KB/s", "")


def _cells(summary: Summary, label: str) -> list[str]:
    numbers = summary.median
    rate = f"{summary.speed:g}x" if summary.speed else _rate(summary.offered_rate)
    return [rate, label,
            _with_spread(_rate(numbers["achieved_rate"]), summary.spread("achieved_rate"),
                         _rate),
            _rate(numbers["reply_rate"]),
            _with_spread(_latency(numbers["p50_ms"]), summary.spread("p50_ms"), _latency),
            _latency(numbers["p90_ms"]),
            _with_spread(_latency(numbers["p99_ms"]), summary.spread("p99_ms"), _latency),
            _latency(numbers["max_ms"]),
            _count(numbers["errors"]), _count(numbers["timeouts"]),
            _count(numbers["status_2xx"]), _count(numbers["status_3xx"]),
            _count(numbers["status_4xx"]), _count(numbers["status_5xx"]),
            _rate(numbers["net_io_kb_s"]),
            "<- knee" if summary.knee else ""]


def _ratio_cells(first: Summary, second: Summary) -> list[str]:
    a, b = first.median, second.median
    return ["", "B/A", _ratio(b["achieved_rate"], a["achieved_rate"]),
            _ratio(b["reply_rate"], a["reply_rate"]), _ratio(b["p50_ms"], a["p50_ms"]),
            _ratio(b["p90_ms"], a["p90_ms"]), _ratio(b["p99_ms"], a["p99_ms"]),
            _ratio(b["max_ms"], a["max_ms"]), "", "", "", "", "", "", "", ""]


def table(rows: list[dict], targets: list[str]) -> str:
    """The terminal table: one row per rate (the median of its runs, ± half the spread
    between runs), the knee marked; with two targets, A's and B's rows and their ratio."""
    summaries = summarize(rows)
    labels = {target: "AB"[number] if len(targets) > 1 else "" for number, target in
              enumerate(targets)}
    lines: list[list[str]] = []
    by_rate: dict[float, dict[str, Summary]] = {}
    for summary in summaries:
        by_rate.setdefault(summary.offered_rate, {})[summary.target] = summary
    for per_target in by_rate.values():
        for target in targets:
            if target in per_target:
                lines.append(_cells(per_target[target], labels[target]))
        if len(targets) > 1 and all(target in per_target for target in targets[:2]):
            lines.append(_ratio_cells(per_target[targets[0]], per_target[targets[1]]))
    keep = [index for index in range(len(_COLUMNS))
            if not (_COLUMNS[index] == "target" and len(targets) < 2)]
    grid = [[_COLUMNS[index] for index in keep]] + [[line[index] for index in keep]
                                                   for line in lines]
    widths = [max(len(line[column]) for line in grid) for column in range(len(keep))]
    text = []
    for line in grid:
        cells = [cell.rjust(width) if column < len(keep) - 1 else cell
                 for column, (cell, width) in enumerate(zip(line, widths, strict=True))]
        text.append("  ".join(cells).rstrip())
    out = "\n".join(text) + "\n"
    if len(targets) > 1:
        out += "".join(f"{labels[target]} = {target}\n" for target in targets)
    out += _knee_lines(summaries, targets, labels)
    out += _notes(summaries)
    return out


def _knee_lines(summaries: list[Summary], targets: list[str], labels: dict) -> str:
    lines = []
    for target in targets:
        knee = [summary for summary in summaries if summary.target == target and summary.knee]
        who = f"{labels[target]} " if labels[target] else ""
        if knee:
            lines.append(f"knee: {who}{_rate(knee[0].offered_rate)} req/s")
        elif any(summary.target == target for summary in summaries):
            lines.append(f"knee: {who}none")
    if lines:
        lines.append(f"(the knee: the highest offered rate whose req/s and replies/s are at "
                     f"least {KEEPING_UP:.0%} of it, with no errors, timeouts or 5xx, and a "
                     f"p99 at most {P99_GROWTH:g}x the lowest rate's)")
    return "".join(line + "\n" for line in lines)


def _notes(summaries: list[Summary]) -> str:
    lines = []
    for summary in summaries:
        lag = summary.median["lag_p99_ms"]
        if lag is not None and lag > LAG_WARNING_MS:
            lines.append(f"note: at {_rate(summary.offered_rate)} req/s the sender itself "
                         f"ran late (p99 {lag:.1f} ms behind schedule): its latencies and "
                         "rates measure this machine as much as the target")
    return "".join(line + "\n" for line in lines)


def error_lines(kinds: dict[str, int]) -> str:
    """'errors: 12 Connection refused, 3 bad answer: ...' (all runs together)."""
    if not kinds:
        return ""
    ordered = sorted(kinds.items(), key=lambda item: -item[1])
    return "errors: " + ", ".join(f"{count} {kind}" for kind, count in ordered) + "\n"


# --- files ------------------------------------------------------------------------------

def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_KEYS)
        writer.writeheader()
        for each in rows:
            writer.writerow({key: "" if each[key] is None else each[key] for key in ROW_KEYS})


def write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([{key: each[key] for key in ROW_KEYS} for each in rows], handle, indent=1)
        handle.write("\n")
