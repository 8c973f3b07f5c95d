"""stats.py: Histogram percentiles against the exact ones, and merging across workers.

What the histogram promises (its docstring): values in whole microseconds, exact below
64 µs; above, each power of two [2^(b-1), 2^b) µs is cut into 32 equal buckets, so a value
of bit length b lies in a bucket 2^(b-6) µs wide. A percentile is reported as the middle
of the bucket holding the value of the chosen rank (no higher than the recorded maximum).

From that, the bound each check below uses (all in µs; x the exact value, v = floor(x)):
  * v < 64: the bucket is [v, v+1) and the report is v: error < 1 µs (the truncation);
  * v >= 64: x lies in [low, low + w) with w = 2^(bit_length(v) - 6), the report is
    low + w/2 (or the maximum, which lies between x and that): error <= w/2 µs.
    Since low >= 32 w, that is at most 1/64 of the value (the docstring's "~3%" is the
    bucket width, 1/32; reporting the middle halves it).
So error <= max(1, w/2) µs, plus the two roundings of doubles on the way (seconds to
µs and back), each at most 2^-53 of the value.

Which value is the exact percentile: the nearest rank, ties rounding up, at least the
first: the k-th smallest, k = max(1, floor(share * n + 1/2)). `share * n` is computed in
doubles, so where share * n is within a rounding of k + 1/2 either neighbour is right.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from gproxyd.stats import Histogram, RouteStats

MAX_MICROS = 2 ** 63                   # "covers microseconds up to ~2^63"
SHARES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)  # summary_ms()'s, and the two ends
DOUBLE = Fraction(1, 2 ** 53)          # the most one rounding of a double is off, relatively

EXAMPLES = settings(max_examples=300, deadline=None)


def _seconds_from(micros: int, fraction: float) -> float:
    return (micros + fraction) / 1e6


# Every power of two from [1, 2) µs to [2^62, 2^63) µs equally often (a uniform float
# would almost never be small), its edges often (hypothesis favours the ends of a range),
# with a fraction of a microsecond; plus the exact region, zero, and plain floats.
_micros_any_magnitude = st.integers(0, 62).flatmap(
    lambda bits: st.integers(1 << bits, (2 << bits) - 1))
latencies = st.one_of(
    st.builds(_seconds_from, _micros_any_magnitude, st.floats(0, 1, exclude_max=True)),
    st.builds(_seconds_from, st.integers(0, 127), st.sampled_from([0.0, 0.5, 0.999999])),
    st.just(0.0),
    st.floats(0, MAX_MICROS / 1e6, allow_nan=False, allow_infinity=False),
)
# Few distinct values, each possibly many times: ties and piles in one bucket.
samples = st.one_of(
    st.lists(latencies, min_size=1, max_size=300),
    st.lists(latencies, min_size=1, max_size=4).flatmap(
        lambda pool: st.lists(st.sampled_from(pool), min_size=1, max_size=300)),
)
shares = st.lists(st.floats(0, 1), max_size=8).map(lambda drawn: SHARES + tuple(drawn))


def _bucket_width(micros: int) -> int:
    """µs: 1 below 64 µs, else 1/32 of the power of two the value lies in."""
    return 1 if micros < 64 else 1 << (micros.bit_length() - 6)


def _error_bound(value: float, reported: float) -> Fraction:
    """Seconds: how far a reported percentile may be from the exact `value` (see above)."""
    micros = int(value * 1e6)  # the histogram's own rounding to whole microseconds
    bucket = Fraction(max(2, _bucket_width(micros)), 2 * 10 ** 6)
    return bucket + 2 * DOUBLE * (Fraction(value) + Fraction(reported))


def _ranks(share: float, count: int) -> set[int]:
    """The 1-based ranks `share` may name among `count` values (see above)."""
    exact = Fraction(share) * count + Fraction(1, 2)
    slack = 4 * DOUBLE * exact
    return {min(count, max(1, math.floor(exact + d))) for d in (-slack, 0, slack)}


def _histogram(values) -> Histogram:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    return histogram


def _sequential_sum(values) -> float:
    total = 0.0  # as record() adds them: sum() could round differently
    for value in values:
        total += value
    return total


def _check_percentile(histogram: Histogram, ordered: list[float], share: float) -> None:
    reported = histogram.percentile(share)
    misses = []
    for rank in sorted(_ranks(share, len(ordered))):
        exact = ordered[rank - 1]
        error = abs(Fraction(reported) - Fraction(exact))
        bound = _error_bound(exact, reported)
        if error <= bound:
            return
        misses.append(f"rank {rank}: exact {exact!r}, off by {float(error)!r} > "
                      f"{float(bound)!r}")
    raise AssertionError(f"percentile({share!r}) of {len(ordered)} values = {reported!r}: "
                         + "; ".join(misses))


@EXAMPLES
@given(values=samples, wanted=shares)
def test_every_percentile_is_within_half_a_bucket_of_the_exact_one(values, wanted):
    histogram = _histogram(values)
    ordered = sorted(values)
    for share in wanted:
        _check_percentile(histogram, ordered, share)
    assert histogram.count == len(values)
    assert histogram.max == ordered[-1]
    assert histogram.total == _sequential_sum(values)
    reported = [histogram.percentile(share) for share in sorted(wanted)]
    assert reported == sorted(reported), "a higher share reported a lower value"
    assert reported[-1] <= histogram.max
    summary = histogram.summary_ms()
    assert summary["max"] == round(ordered[-1] * 1e3, 3)
    for key, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        assert summary[key] == round(histogram.percentile(share) * 1e3, 3)


@EXAMPLES
@given(values=samples, limit=latencies)
def test_count_below_is_exact_to_a_bucket(values, limit):
    # count_below(t): the values in buckets wholly at or below t's microsecond; so at
    # most those <= t's microsecond, and at least those a bucket width below it.
    histogram = _histogram(values)
    micros = [int(value * 1e6) for value in values]
    top = int(limit * 1e6)
    counted = histogram.count_below(limit)
    assert counted <= sum(1 for m in micros if m <= top)
    assert counted >= sum(1 for m in micros if m <= top - _bucket_width(top))


def test_an_empty_histogram_reports_zeros():
    histogram = Histogram()
    assert [histogram.percentile(share) for share in SHARES] == [0.0] * len(SHARES)
    assert histogram.count_below(1.0) == 0
    assert histogram.summary_ms() == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0,
                                      "max": 0.0}


def test_values_below_64_microseconds_are_exact():
    values = [micros / 1e6 for micros in range(64)]
    histogram = _histogram(values)
    assert [histogram.percentile((rank + 0.5) / 64) for rank in range(64)] == values


def _split(values: list, cuts: list[int]) -> list[list]:
    edges = [0] + sorted(cut % (len(values) + 1) for cut in cuts) + [len(values)]
    return [values[start:end] for start, end in zip(edges, edges[1:], strict=False)]


@EXAMPLES
@given(values=samples, cuts=st.lists(st.integers(0, 10 ** 6), max_size=5), wanted=shares)
def test_merged_histograms_report_what_one_histogram_of_everything_reports(
        values, cuts, wanted):
    parts = _split(values, cuts)
    whole = _histogram(values)
    merged = Histogram()
    for part in parts:
        # As a worker sends it to its master: one JSON line (bucket keys become text).
        merged.add(json.loads(json.dumps(_histogram(part).export())))
    assert merged.counts == whole.counts
    assert (merged.count, merged.max) == (whole.count, whole.max)
    assert merged.total == _sequential_sum(_sequential_sum(part) for part in parts)
    assert [merged.percentile(share) for share in wanted] == \
        [whole.percentile(share) for share in wanted]
    assert merged.summary_ms() == whole.summary_ms()


@EXAMPLES
@given(values=samples, cuts=st.lists(st.integers(0, 10 ** 6), max_size=5),
       errors=st.lists(st.booleans(), min_size=300, max_size=300))
def test_merged_route_stats_snapshot_as_one_process_would(values, cuts, errors):
    whole = RouteStats()
    merged = RouteStats()
    for part in _split(list(enumerate(values)), cuts):
        worker = RouteStats()
        for stats in (whole, worker):
            for index, value in part:
                stats.total += 1
                stats.production.record(value, errors[index])
                stats.shadow("127.0.0.1:9").record(value * 2, not errors[index])
                stats.shadow("127.0.0.1:9").ended("done" if errors[index] else "diverged")
        merged.add(json.loads(json.dumps(worker.export())))
    assert merged.snapshot() == whole.snapshot()
    assert merged.production.latency.counts == whole.production.latency.counts
    assert merged.shadows["127.0.0.1:9"].latency.counts == \
        whole.shadows["127.0.0.1:9"].latency.counts


@EXAMPLES
@given(runs=st.lists(st.tuples(latencies, st.integers(1, 40), st.integers(0, 40)),
                     min_size=1, max_size=20))
def test_a_value_recorded_with_a_count_is_that_many_values_recorded_one_by_one(runs):
    """record(seconds, count), as the observer records the answers of one chunk to
    requests written at once: the same counts, buckets, maximum, percentiles and
    requests and errors as `count` records of one; the total within its roundings."""
    grouped, single = RouteStats().production, RouteStats().production
    for value, count, errors in runs:
        errors = min(errors, count)
        grouped.record(value, errors, count)
        for index in range(count):
            single.record(value, index < errors)
    assert grouped.latency.counts == single.latency.counts
    assert (grouped.latency.count, grouped.latency.max) == (single.latency.count,
                                                              single.latency.max)
    assert (grouped.requests, grouped.errors) == (single.requests, single.errors)
    assert math.isclose(grouped.latency.total, single.latency.total, rel_tol=1e-12)
    assert [grouped.latency.percentile(share) for share in SHARES] == \
        [single.latency.percentile(share) for share in SHARES]
    assert grouped.snapshot() == single.snapshot()


def test_every_value_up_to_twice_the_looked_up_range_lands_in_its_bucket():
    """Values below ~16 ms find their bucket in a table, larger ones by arithmetic:
    each whole microsecond on both sides of the seam lands in the bucket whose bounds
    hold it."""
    histogram = Histogram()
    values = range(2 * 16384 + 100)
    for micros in values:
        histogram.record((micros + 0.5) / 1e6)
    for index, hits in enumerate(histogram.counts):
        if hits:
            low, high = Histogram._bounds(index)
            assert hits == len(range(low, min(high, len(values))))
    assert histogram.count == len(values)
