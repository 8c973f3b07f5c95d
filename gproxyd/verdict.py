"""Whether a shadow is slower or faster than production, with confidence intervals.

Every mirrored request gives a pair of latencies measured on the same request: production's
and the shadow's. `PairedLatency` keeps a bounded uniform sample of those pairs per shadow;
`summary()` turns it into two differences, shadow minus production, in milliseconds:

  * p50: the median of the paired differences (shadow - production, request by request).
    Pairing removes what both sides share (a large request is slow on both), so this sees
    small shifts early; when the two backends behave alike the difference of each pair is
    as likely to be positive as negative and the median is 0.
  * p99: the difference of the 99th percentiles, p99(shadow) - p99(production). Not the
    99th percentile of the paired differences: that one measures how much the two sides
    disagree on single requests, and is large and positive even for two identical backends.
    Its interval combines the two sides' own intervals, so it ignores the pairing and is
    conservative: wide (about ±1.2 ms at 4096 pairs when production's p99 is 6 ms), so a
    p99 change is called late rather than wrongly.

Each comes with a distribution-free confidence interval (see `interval()`), and `judge()`
calls a difference "slower" or "faster" only when its interval excludes 0 and it exceeds
a practical threshold: statistically and practically significant, as automated canary
judges (Kayenta) require. Pure: no I/O, no clock; randomness from a seeded `random.Random`.
"""
from __future__ import annotations

import heapq
import math
import random
from operator import sub
from statistics import NormalDist

RESERVOIR = 4096   # pairs kept per shadow
MIN_PAIRS = 20     # fewer kept pairs than this and no difference is computed

# A difference smaller than this share of production's value (or than THRESHOLD_MS) is
# not worth reporting however certain it is.
THRESHOLD_SHARE = 0.05
THRESHOLD_MS = 0.1

_SHARES = {"p50": 0.5, "p99": 0.99}


class PairedLatency:
    """A bounded, uniform sample of (production, shadow) latency pairs of one shadow.

    Vitter's algorithm R: the first `size` pairs are kept, then the n-th pair replaces a
    random kept one with probability size/n, so at any time every pair seen is in the
    sample with the same probability. Invariant: the first min(pairs, size) slots hold it.
    """
    __slots__ = ("size", "pairs", "_production", "_shadow", "_rng", "_random")

    def __init__(self, size: int = RESERVOIR, seed: int | None = None):
        self.size = size
        self.pairs = 0  # every pair ever added, kept or not
        # Two preallocated lists rather than a list of tuples: add() allocates nothing.
        self._production = [0.0] * size
        self._shadow = [0.0] * size
        self._rng = random.Random(seed)
        self._random = self._rng.random

    def add(self, production: float, shadow: float) -> None:
        """Count one pair of latencies (seconds) of the same request. O(1), on the hot path."""
        seen = self.pairs
        self.pairs = seen + 1
        if seen < self.size:
            slot = seen
        else:
            # random() rather than randrange(): several times cheaper, and its 53 bits
            # make the bias negligible for any count of pairs a process can see.
            slot = int(self._random() * (seen + 1))
            if slot >= self.size:
                return
        self._production[slot] = production
        self._shadow[slot] = shadow

    def _kept(self) -> int:
        return min(self.pairs, self.size)

    def export(self) -> dict:
        """The raw numbers, JSON-able, for merging several processes' samples."""
        kept = self._kept()
        return {"pairs": self.pairs,
                "sample": [[production, shadow] for production, shadow
                           in zip(self._production[:kept], self._shadow[:kept], strict=True)]}

    def add_exported(self, exported: dict) -> None:
        """Merge another process's export() into this sample.

        The result is a uniform sample of min(size, pairs of both) pairs of the union: how
        many come from each side is drawn as if drawing that many pairs without replacement
        from all pairs of both (a hypergeometric draw, so each side counts by its `pairs`),
        then that many are taken at random from each side's sample. Raises ValueError when
        the export kept fewer pairs than that could require (it came from a smaller
        reservoir), since the merge could then not be uniform.
        """
        theirs, sample = exported["pairs"], exported["sample"]
        ours = self.pairs
        kept = min(self.size, ours + theirs)
        if len(sample) < min(theirs, kept):
            raise ValueError(f"paired latencies: an export of {theirs} pairs keeping only "
                             f"{len(sample)} cannot be merged into a sample of {self.size}")
        from_ours, left_ours, left_theirs = 0, ours, theirs
        for _ in range(kept):
            if self._random() * (left_ours + left_theirs) < left_ours:
                from_ours += 1
                left_ours -= 1
            else:
                left_theirs -= 1
        mine = self._rng.sample(range(self._kept()), from_ours)
        taken = self._rng.sample(range(len(sample)), kept - from_ours)
        production = [self._production[i] for i in mine] + [float(sample[i][0]) for i in taken]
        shadow = [self._shadow[i] for i in mine] + [float(sample[i][1]) for i in taken]
        # Slice assignment of as many values as the slice: the lists keep length `size`.
        self._production[:kept] = production
        self._shadow[:kept] = shadow
        self.pairs = ours + theirs

    def summary(self, confidence: float = 0.95) -> dict:
        """The differences (see the module docstring) and production's own percentiles.

        {"pairs", "confidence", "p50", "p50_low", "p50_high", "p99", "p99_low", "p99_high",
        "production_p50", "production_p99"}: milliseconds rounded to 3 decimals, computed
        on the sample; `pairs` counts all pairs ever added. With fewer than MIN_PAIRS kept,
        the millisecond values are None.
        """
        result = {"pairs": self.pairs, "confidence": confidence,
                  "p50": None, "p50_low": None, "p50_high": None,
                  "p99": None, "p99_low": None, "p99_high": None,
                  "production_p50": None, "production_p99": None}
        kept = self._kept()
        if kept < MIN_PAIRS:
            return result
        # /stats renders this for every shadow at most once a second (and a dashboard
        # asks every second): sorting 4,096 floats is ~0.4 ms, so the shadow's values,
        # of which only the top percent is read, are not sorted (nlargest: ~0.1 ms).
        production = self._production[:kept]
        differences = sorted(map(sub, self._shadow[:kept], production))
        production.sort()
        low, high = interval(differences, 0.5, confidence)
        result.update(p50=_ms(differences[_rank(0.5, kept)]), p50_low=_ms(low),
                      p50_high=_ms(high))
        # Both intervals hold at once with at least `confidence` when each is built at
        # 1 - (1 - confidence)/2 (Bonferroni), whatever the dependence between the sides.
        each = 1 - (1 - confidence) / 2
        first, last = bounds(kept, 0.99, each)
        index = _rank(0.99, kept)  # between the bounds (see interval())
        top = heapq.nlargest(kept - first, self._shadow[:kept])  # sorted from index `first`
        shadow = top[::-1]
        result.update(p99=_ms(shadow[index - first] - production[index]),
                      p99_low=_ms(shadow[0] - production[last]),
                      p99_high=_ms(shadow[last - first] - production[first]),
                      production_p50=_ms(production[_rank(0.5, kept)]),
                      production_p99=_ms(production[index]))
        return result


def _rank(share: float, count: int) -> int:
    """The index of the `share` quantile among `count` sorted values: the nearest rank,
    as stats.Histogram.percentile() reports it."""
    return max(1, int(share * count + 0.5)) - 1


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def interval(sorted_values: list[float], share: float,
             confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the `share` quantile of a sorted sample.

    The bounds are two order statistics of the sample. The number B of n sample values
    below the true quantile q is binomial(n, share); the k-th smallest value is <= q
    exactly when B >= k, and the m-th smallest >= q when B < m. So the interval from the
    k-th to the m-th smallest covers q with probability P(k <= B <= m - 1), whatever the
    distribution. k and m come from the normal approximation of that binomial:
    k = floor(n*share - z*s), m = ceil(n*share + z*s) + 1 with s = sqrt(n*share*(1-share))
    and z the normal quantile of (1 + confidence)/2, both clamped to the sample (for n =
    100 and the median: the 40th and 61st values, as the exact tables give). The
    approximation is good for n >= 20 near the median; in the tail, when n*(1-share) is
    small, the upper bound is the sample's maximum and the coverage falls short of
    `confidence` (the true quantile exceeds the maximum with probability share**n).
    The nearest-rank estimate of the quantile always lies between the bounds.
    """
    low, high = bounds(len(sorted_values), share, confidence)
    return sorted_values[low], sorted_values[high]


def bounds(count: int, share: float, confidence: float = 0.95) -> tuple[int, int]:
    """The 0-based indices, among `count` sorted values, of interval()'s two bounds."""
    if not count:
        raise ValueError("interval of an empty sample")
    if not 0 < share < 1 or not 0 < confidence < 1:
        raise ValueError(f"interval: share {share} and confidence {confidence} "
                         "must lie between 0 and 1")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    middle = count * share
    spread = z * math.sqrt(middle * (1 - share))
    # 0-based indices of the k-th and m-th smallest values.
    low = max(0, math.floor(middle - spread) - 1)
    high = min(count - 1, math.ceil(middle + spread))
    return low, high


def judge(summary: dict, share: str = "p99",
          threshold: float | None = None) -> tuple[str, float | None]:
    """("slower" | "faster" | "same" | "unknown", difference in ms) for one difference.

    `share` is "p50" or "p99". `threshold` (ms) defaults to the larger of THRESHOLD_MS and
    THRESHOLD_SHARE of production's own value at that share. "slower" when the interval
    lies above 0 and the difference exceeds the threshold, "faster" when the interval lies
    below 0 and the difference is below minus the threshold, "same" otherwise; "unknown"
    (difference None) while the summary has too few pairs.
    """
    if share not in _SHARES:
        raise ValueError(f"judge: share {share!r} (expected one of {', '.join(_SHARES)})")
    difference = summary[share]
    if difference is None:
        return "unknown", None
    if threshold is None:
        threshold = max(THRESHOLD_MS, THRESHOLD_SHARE * summary[f"production_{share}"])
    if summary[f"{share}_low"] > 0 and difference > threshold:
        return "slower", difference
    if summary[f"{share}_high"] < 0 and -difference > threshold:
        return "faster", difference
    return "same", difference


def words(summary: dict, threshold: float | None = None) -> str:
    """One clause for the verdict line, from a summary() and judge()'s threshold.

    The p99 difference when it is significant, else the p50 difference when that one is,
    else "no significant difference (N pairs)"; "not enough pairs yet (N)" before that.
    """
    pairs = summary["pairs"]
    for share in ("p99", "p50"):
        verdict, difference = judge(summary, share, threshold)
        if verdict == "unknown":
            return f"not enough pairs yet ({pairs})"
        if verdict != "same":
            return (f"candidate is {verdict}: {share} {difference:+.2f} ms "
                    f"({summary['confidence']:.0%} CI {summary[f'{share}_low']:+.2f}.."
                    f"{summary[f'{share}_high']:+.2f}, {pairs} pairs)")
    return f"no significant difference ({pairs} pairs)"
