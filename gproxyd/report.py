"""Words and tables from /stats snapshots: the periodic log line and gproxyctl's view.

Pure functions of snapshot dicts (the JSON shape of GET /stats), so the daemon's log,
the demo and gproxyctl all say the same thing the same way.
"""
from __future__ import annotations

# Fewer requests than this on either side and a latency comparison is noise.
MIN_REQUESTS = 20
# Within this share, p99s show "no significant difference".
PAR = 0.05


def verdict(production: dict, shadow: dict) -> str:
    """One sentence comparing a shadow ("candidate") with production on p99 and errors."""
    if shadow["requests"] == 0 and (shadow.get("timeouts") or production["requests"]):
        words = "no answers from the candidate"
        return words + (f" ({shadow['timeouts']} requests timed out)"
                        if shadow.get("timeouts") else "") + _outcome_words(shadow)
    if production["requests"] < MIN_REQUESTS or shadow["requests"] < MIN_REQUESTS:
        return "not enough requests yet to compare" + _outcome_words(shadow)
    base, cand = production["latency_ms"]["p99"], shadow["latency_ms"]["p99"]
    if base <= 0:
        words = "candidate p99 cannot be compared (production p99 is 0)"
    else:
        change = (cand - base) / base
        if abs(change) <= PAR:
            words = (f"no significant difference: candidate p99 within {PAR:.0%} of "
                     "production's")
        else:
            words = (f"candidate p99 is {abs(change):.0%} "
                     f"{'slower' if change > 0 else 'faster'} than production")
    if shadow["errors"] != production["errors"]:
        words += f"; errors: candidate {shadow['errors']}, production {production['errors']}"
    if shadow.get("timeouts"):
        words += f"; {shadow['timeouts']} candidate request(s) timed out"
    return words + _outcome_words(shadow)


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
    for name, shadow in snapshot["shadows"].items():
        parts.append(f"shadow {name}: {_backend_words(shadow)} dropped={shadow['dropped']} "
                     f"({verdict(production, shadow)})")
    return "; ".join(parts)


def _backend_words(numbers: dict) -> str:
    latency = numbers["latency_ms"]
    return (f"requests={numbers['requests']} errors={numbers['errors']} "
            f"p50={latency['p50']:.2f}ms p99={latency['p99']:.2f}ms")


_NOTHING_YET = {"requests": 0}


def _rate(now: dict, before: dict | None, elapsed: float) -> str:
    if before is None or elapsed <= 0:
        return "-"
    return f"{max(0, now['requests'] - before['requests']) / elapsed:.1f}"


def table(document: dict, previous: dict | None = None, elapsed: float = 0.0) -> str:
    """Side-by-side view of every route: production against each shadow."""
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
            drops = str(numbers["dropped"]) if "dropped" in numbers else "-"
            lines.append(f"  {name:<28} {_rate(numbers, old, elapsed):>9} "
                         f"{numbers['requests']:>9} {latency['p50']:>9.2f} "
                         f"{latency['p99']:>9.2f} {numbers['errors']:>7} {drops:>6}")
        for name, shadow in snapshot["shadows"].items():
            lines.append(f"  {name}: {verdict(snapshot['production'], shadow)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
