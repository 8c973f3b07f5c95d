"""`--plot`: latency percentiles and achieved rate against offered rate, the knee marked.

matplotlib is an optional extra (`pip install gproxyd[plot]`), imported only here and
only when a plot is asked for, with the Agg backend (no display needed).
"""
from __future__ import annotations

import os

from .results import summarize

FORMATS = (".png", ".svg")


class PlotError(Exception):
    """A plot that cannot be drawn; str() is one line saying why and what to do."""


def check(path: str) -> None:
    """Raises PlotError unless PATH can be drawn here: a .png or .svg name, matplotlib
    installed. Called before the runs, so a long ramp does not end in this error."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise PlotError(f"--plot {path}: expected a file name ending in .png or .svg")
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib, which is not installed (install the "
                        "extra: pip install gproxyd[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def draw(path: str, rows: list[dict], targets: list[str]) -> None:
    """Writes the plot of ROWS (the median of each rate's runs) to PATH."""
    pyplot = _pyplot()
    summaries = summarize(rows)
    figure, (latency, rate) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 7))
    styles = ("-", "--")
    for number, target in enumerate(targets):
        own = sorted((summary for summary in summaries if summary.target == target),
                     key=lambda summary: summary.offered_rate)
        if not own:
            continue
        offered = [summary.offered_rate for summary in own]
        name = f" {target}" if len(targets) > 1 else ""
        style = styles[number % len(styles)]
        for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99")):
            latency.plot(offered, [summary.median[key] for summary in own], style,
                         marker="o", label=label + name)
        rate.plot(offered, [summary.median["achieved_rate"] for summary in own], style,
                  marker="o", label="achieved req/s" + name)
        rate.plot(offered, [summary.median["reply_rate"] for summary in own], style,
                  marker="x", label="replies/s" + name)
        for summary in own:
            if summary.knee:
                for axes in (latency, rate):
                    axes.axvline(summary.offered_rate, color="grey", linestyle=":")
                rate.annotate(f"knee{name}", (summary.offered_rate, summary.offered_rate),
                              textcoords="offset points", xytext=(5, -15))
    if summaries:
        highest = max(summary.offered_rate for summary in summaries)
        rate.plot([0, highest], [0, highest], color="lightgrey", linewidth=1,
                  label="offered")
    latency.set_ylabel("latency (ms, from the scheduled time)")
    latency.set_yscale("log")
    latency.legend(fontsize="small")
    latency.grid(True, which="both", alpha=0.3)
    rate.set_xlabel("offered rate (requests/s)")
    rate.set_ylabel("requests/s")
    rate.legend(fontsize="small")
    rate.grid(True, alpha=0.3)
    latency.set_title("gproxyctl replay")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
