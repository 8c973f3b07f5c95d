"""Words and tables from /stats snapshots: the periodic log line and gproxyctl's view.

Pure functions of snapshot dicts (the JSON shape of GET /stats), so the daemon's log,
the demo and gproxyctl all say the same thing the same way.
"""
from __future__ import annotations

import time

from .verdict import words as latency_words

# Fewer requests than this on either side and a latency comparison is noise.
MIN_REQUESTS = 20
# Within this share, p99s show "no significant difference".
PAR = 0.05


def verdict(production: dict, shadow: dict, threshold_ms: float | None = None) -> str:
    """One sentence comparing a shadow ("candidate") with production: latency (the
    paired difference with its confidence interval when there are enough pairs, else
    p99 against p99), errors, differing answers, and how its connections ended."""
    if shadow["requests"] == 0 and (shadow.get("timeouts") or production["requests"]):
        words = "no answers from the candidate"
        return words + (f" ({shadow['timeouts']} requests timed out)"
                        if shadow.get("timeouts") else "") + _outcome_words(shadow)
    if production["requests"] < MIN_REQUESTS or shadow["requests"] < MIN_REQUESTS:
        return ("not enough requests yet to compare" + _answer_words(shadow)
                + _outcome_words(shadow))
    paired = shadow.get("latency_diff_ms") or {}
    if paired.get("pairs", 0) >= MIN_REQUESTS and paired.get("p50") is not None:
        words = latency_words(paired, threshold_ms)
    else:
        words = _p99_words(production, shadow)
    if shadow.get("role") == "baseline":
        words = "baseline (production's build): " + words
    if shadow["errors"] != production["errors"]:
        words += f"; errors: candidate {shadow['errors']}, production {production['errors']}"
    if shadow.get("timeouts"):
        words += f"; {shadow['timeouts']} candidate request(s) timed out"
    return words + _answer_words(shadow) + _outcome_words(shadow)


def _p99_words(production: dict, shadow: dict) -> str:
    base, cand = production["latency_ms"]["p99"], shadow["latency_ms"]["p99"]
    if base <= 0:
        return "candidate p99 cannot be compared (production p99 is 0)"
    change = (cand - base) / base
    if abs(change) <= PAR:
        return f"no significant difference: candidate p99 within {PAR:.0%} of production's"
    return f"candidate p99 is {abs(change):.0%} {'slower' if change > 0 else 'faster'} " \
           "than production"


def _answer_words(shadow: dict) -> str:
    """How many compared answers differ, and where mostly."""
    compared = shadow.get("compared", 0)
    if not compared:
        return ""
    mismatches = shadow.get("mismatches", 0)
    noise = shadow.get("noise", 0)
    quiet = f" ({noise} differ only in the baseline's noise)" if noise else ""
    if not mismatches:
        return f"; all {compared} compared answers match{quiet}"
    top = next(iter(shadow.get("mismatch_paths") or {}), None)
    return (f"; {mismatches / compared:.1%} of answers differ"
            + (f", mostly {top}" if top else "") + quiet)


def _outcome_words(shadow: dict) -> str:
    """The shadow connections that did not end "done", if any."""
    outcomes = shadow.get("outcomes", {})
    ended = ", ".join(f"{count} {outcome}" for outcome, count in outcomes.items()
                      if count and outcome != "done")
    return f"; shadow connections not done: {ended}" if ended else ""


def summary_line(route: str, snapshot: dict) -> str:
    """The periodic one-line summary of a route for the log."""
    production = snapshot["production"]
    parts = [f"stats route={route} connections={snapshot['connections']['active']}/"
             f"{snapshot['connections']['total']}",
             f"production: {_backend_words(production)}"]
    if "archive" in snapshot:
        archive = snapshot["archive"]
        parts.append(f"archive: archived={archive['archived']} "
                     f"archived_total={archive['archived_total']} "
                     f"injected_total={archive['injected_total']} "
                     f"inject_failures={archive['inject_failures']} "
                     f"overdue={archive['overdue_seconds']:.0f}s")
    for name, shadow in snapshot["shadows"].items():
        parts.append(f"shadow {name}: {_backend_words(shadow)} dropped={shadow['dropped']} "
                     f"mismatches={shadow.get('mismatches', 0)} "
                     f"({verdict(production, shadow, snapshot.get('verdict_threshold_ms'))})")
    return "; ".join(parts)


def _archive_words(archive: dict) -> str:
    return (f"{archive['archived']} jobs archived now, {archive['archived_total']} archived "
            f"and {archive['injected_total']} moved into beanstalkd since start, "
            f"{archive['inject_failures']} failed moves, oldest overdue "
            f"{archive['overdue_seconds']:.0f}s ({archive['store']})")


def _backend_words(numbers: dict) -> str:
    latency = numbers["latency_ms"]
    return (f"requests={numbers['requests']} errors={numbers['errors']} "
            f"p50={latency['p50']:.2f}ms p99={latency['p99']:.2f}ms")


_NOTHING_YET = {"requests": 0}


def _rate(now: dict, before: dict | None, elapsed: float) -> str:
    if before is None or elapsed <= 0:
        return "-"
    return f"{max(0, now['requests'] - before['requests']) / elapsed:.1f}"


def recent(history: dict, seconds: float) -> dict:
    """From a /stats/history document: per route and backend, {"rate": requests a second
    over its points of the last `seconds` (at least its newest point), "p50", "p99": ms of
    the newest point, None if nothing was answered in it}."""
    earliest = history["time"] - seconds
    numbers: dict = {}
    for route, backends in history["routes"].items():
        for backend, kept in backends.items():
            points = kept["points"]
            if not points:
                continue
            window = [point for point in points if point["time"] > earliest] or points[-1:]
            length = sum(point["seconds"] for point in window)
            newest = points[-1]
            answered = newest["requests"] > 0
            numbers.setdefault(route, {})[backend] = {
                "rate": sum(point["requests"] for point in window) / length if length else 0.0,
                "p50": newest["p50_ms"] if answered else None,
                "p99": newest["p99_ms"] if answered else None}
    return numbers


def table(document: dict, previous: dict | None = None, elapsed: float = 0.0,
          intervals: dict | None = None) -> str:
    """Side-by-side view of every route: production against each shadow.

    `intervals` (recent()'s numbers): req/s and the p50/p99 of the last interval, where a
    backend has them; else req/s between `previous` and `document`, and the percentiles
    since start."""
    lines = []
    for route, snapshot in document["routes"].items():
        before = (previous or {}).get("routes", {}).get(route)
        connections = snapshot["connections"]
        lines.append(f"route {route}: {connections['active']} active, "
                     f"{connections['total']} total connections")
        lines.append(f"  {'backend':<28} {'req/s':>9} {'requests':>9} {'p50 ms':>9} "
                     f"{'p99 ms':>9} {'errors':>7} {'drops':>6}")
        rows = [("production", snapshot["production"],
                 before["production"] if before else None)]
        rows += [(name, shadow, before["shadows"].get(name, _NOTHING_YET) if before else None)
                 for name, shadow in snapshot["shadows"].items()]
        for name, numbers, old in rows:
            latency = numbers["latency_ms"]
            rate, p50, p99 = (_rate(numbers, old, elapsed), f"{latency['p50']:.2f}",
                              f"{latency['p99']:.2f}")
            interval = (intervals or {}).get(route, {}).get(name)
            if interval is not None:
                rate = f"{interval['rate']:.1f}"
                p50, p99 = (f"{interval[key]:.2f}" if interval[key] is not None else "-"
                            for key in ("p50", "p99"))
            drops = str(numbers["dropped"]) if "dropped" in numbers else "-"
            lines.append(f"  {name:<28} {rate:>9} {numbers['requests']:>9} {p50:>9} "
                         f"{p99:>9} {numbers['errors']:>7} {drops:>6}")
        threshold = snapshot.get("verdict_threshold_ms")
        for name, shadow in snapshot["shadows"].items():
            lines.append(f"  {name}: {verdict(snapshot['production'], shadow, threshold)}")
        if "archive" in snapshot:
            lines.append(f"  archive: {_archive_words(snapshot['archive'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def differences(samples: list[dict]) -> str:
    """gproxyctl diff's view of /mismatches samples, one block each."""
    if not samples:
        return "no differing answers kept (none yet, or compare = off)\n"
    lines = []
    for sample in samples:
        when = time.strftime("%H:%M:%S", time.localtime(sample["time"]))
        lines.append(f"{when} route {sample['route']} shadow {sample['shadow']}: "
                     f"{sample['request']}")
        where = ", ".join(sample["paths"])
        if "offset" in sample:
            where += f" (first difference at byte {sample['offset']})"
        lines.append(f"  differs at: {where}")
        for side in ("production", "candidate"):
            answer = sample[side]
            status = answer["status"] if answer.get("status") is not None else ""
            shown = answer["body"] if "body" in answer else f"hash {answer['hash']}"
            lines.append(f"  {side + ':':<12} {status} {shown}".rstrip())
        lines.append("")
    return "\n".join(lines)
