"""verdict.py: intervals that cover, verdicts on synthetic candidates, and the reservoir.

Every sample is drawn from a seeded random.Random, so each test is deterministic; the
bounds on random outcomes are loose enough that other seeds pass too.
"""
from __future__ import annotations

import json
import math
import random

import pytest

from gproxyd.verdict import MIN_PAIRS, RESERVOIR, PairedLatency, interval, judge, words

MS = 1e-3
MEDIAN = 2 * MS   # production latencies: lognormal around 2 ms
SIGMA = 0.5       # of log(latency): p99 about 6.4 ms


def _production(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(MEDIAN), SIGMA)


def _paired(shadow_of, pairs: int = 5000, seed: int = 1) -> PairedLatency:
    """Pairs of a production latency and shadow_of(that latency, rng)."""
    rng = random.Random(seed)
    paired = PairedLatency(seed=seed)
    for _ in range(pairs):
        production = _production(rng)
        paired.add(production, shadow_of(production, rng))
    return paired


def _shifted(extra: float, noise: float, pairs: int = 5000, seed: int = 1) -> PairedLatency:
    """Pairs whose shadow takes production's latency plus `extra` and normal noise."""
    return _paired(lambda production, rng: production + extra + rng.gauss(0, noise),
                   pairs, seed)


def test_a_candidate_3_ms_slower_is_slower_on_p50_and_p99():
    summary = _shifted(3 * MS, 0.1 * MS).summary()
    # The median paired difference is exactly the shift (the noise is symmetric).
    assert summary["p50_low"] <= 3.0 <= summary["p50_high"]
    assert summary["p50_high"] - summary["p50_low"] < 0.05
    # p99(shadow) - p99(production): the shift, moved by the noise by far less than 0.1 ms.
    assert summary["p99_low"] - 0.1 <= 3.0 <= summary["p99_high"] + 0.1
    assert summary["p99_low"] <= summary["p99"] <= summary["p99_high"]
    assert summary["pairs"] == 5000
    assert judge(summary) == ("slower", summary["p99"])
    assert judge(summary, "p50") == ("slower", summary["p50"])
    assert words(summary).startswith("candidate is slower: p99 +3.")
    assert words(summary).endswith(", 5000 pairs)")
    assert "95% CI +" in words(summary)


def test_a_candidate_twice_as_fast_is_faster():
    summary = _paired(lambda production, rng: production / 2).summary()
    assert summary["p50_low"] <= -summary["production_p50"] / 2 <= summary["p50_high"]
    assert judge(summary)[0] == "faster"
    assert judge(summary, "p50")[0] == "faster"
    assert words(summary).startswith("candidate is faster: p99 -")


def test_an_identical_candidate_is_the_same_in_19_of_20_runs():
    same = 0
    for seed in range(20):
        rng = random.Random(seed)
        paired = PairedLatency(seed=seed)
        for _ in range(5000):
            paired.add(_production(rng), _production(rng))
        summary = paired.summary()
        same += words(summary) == "no significant difference (5000 pairs)"
    assert same >= 19


def test_the_p99_is_the_difference_of_percentiles_not_the_percentile_of_differences():
    # Identical backends disagree a lot on single requests: the 99th percentile of
    # shadow - production is several ms. The difference of their p99s is not.
    rng = random.Random(7)
    paired = PairedLatency(seed=7)
    differences = []
    for _ in range(RESERVOIR):
        production, shadow = _production(rng), _production(rng)
        paired.add(production, shadow)
        differences.append(shadow - production)
    differences.sort()
    assert differences[int(0.99 * RESERVOIR)] > 2 * MS
    summary = paired.summary()
    assert summary["p99_low"] < 0 < summary["p99_high"]
    assert judge(summary) == ("same", summary["p99"])


def test_a_significant_p50_is_reported_when_the_p99_is_the_same():
    # A shift of 0.3 ms in the middle is clear on paired differences but drowns in the
    # width of the p99 interval, so the words report the p50.
    summary = _shifted(0.3 * MS, 0.05 * MS).summary()
    assert judge(summary)[0] == "same"
    assert judge(summary, "p50")[0] == "slower"
    assert words(summary).startswith("candidate is slower: p50 +0.30 ms (95% CI +0.")


def test_a_difference_under_the_threshold_is_the_same_however_certain():
    summary = _shifted(0.05 * MS, 0.001 * MS).summary()
    assert summary["p50_low"] > 0
    assert judge(summary, "p50") == ("same", summary["p50"])
    assert judge(summary, "p50", threshold=0.01) == ("slower", summary["p50"])
    assert words(summary) == "no significant difference (5000 pairs)"


@pytest.mark.parametrize("pairs", [0, 1, MIN_PAIRS - 1])
def test_too_few_pairs_give_none_and_unknown(pairs):
    paired = _shifted(3 * MS, 0.1 * MS, pairs=pairs)
    summary = paired.summary()
    assert summary["pairs"] == pairs
    assert [key for key, value in summary.items() if value is not None] == ["pairs",
                                                                          "confidence"]
    assert set(summary) == set(_shifted(0, 0, pairs=MIN_PAIRS).summary())
    assert judge(summary) == ("unknown", None)
    assert judge(summary, "p50") == ("unknown", None)
    assert words(summary) == f"not enough pairs yet ({pairs})"


def test_judge_names_the_shares_it_knows():
    with pytest.raises(ValueError, match="share 'p90'"):
        judge(_shifted(0, 0).summary(), "p90")


@pytest.mark.parametrize("share", [0.5, 0.99])
def test_the_interval_covers_the_true_quantile(share):
    covered = 0
    for seed in range(200):
        rng = random.Random(seed)
        values = sorted(rng.random() for _ in range(500))
        low, high = interval(values, share)
        assert low in values and high in values
        assert low <= values[max(1, int(share * 500 + 0.5)) - 1] <= high
        covered += low <= share <= high  # uniform 0..1: the quantile is the share
    assert covered >= 180


def _binomial_coverage(count: int, share: float, low: int, high: int) -> float:
    """P(low <= B <= high - 1), B binomial(count, share): how often the interval from the
    low-th to the high-th smallest of `count` values covers the `share` quantile."""
    return sum(math.comb(count, below) * share ** below * (1 - share) ** (count - below)
               for below in range(low, high))


def test_the_interval_uses_the_order_statistics_of_the_tables():
    values = list(range(1, 101))  # the k-th smallest is k
    assert interval(values, 0.5) == (40, 61)
    # Too few values above the p99 for an upper bound: the maximum.
    assert interval(values, 0.99)[1] == 100
    assert interval([5.0], 0.5) == (5.0, 5.0)


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_the_ranks_cover_the_median_with_the_confidence_asked(confidence):
    for count in range(MIN_PAIRS, 301):
        low, high = interval(list(range(1, count + 1)), 0.5, confidence)
        assert _binomial_coverage(count, 0.5, low, high) >= confidence, count


@pytest.mark.parametrize("arguments, message", [
    (([], 0.5), "interval of an empty sample"),
    (([1.0], 1.0), "share 1.0 and confidence 0.95 must lie between 0 and 1"),
    (([1.0], 0.5, 0.0), "share 0.5 and confidence 0.0 must lie between 0 and 1"),
])
def test_the_interval_refuses_what_has_no_interval(arguments, message):
    with pytest.raises(ValueError, match=message):
        interval(*arguments)


def test_the_reservoir_stays_bounded_and_uniform():
    paired = PairedLatency(seed=3)
    for index in range(100_000):
        paired.add(index, index + 0.5)  # production: where the pair came, shadow: a marker
    exported = paired.export()
    assert paired.pairs == exported["pairs"] == 100_000
    sample = exported["sample"]
    assert len(sample) == RESERVOIR
    assert all(shadow == production + 0.5 for production, shadow in sample)
    assert len({production for production, _ in sample}) == RESERVOIR
    # Uniform over 0..99999: mean 50000, standard error 28868/sqrt(4096) = 451.
    mean = sum(production for production, _ in sample) / RESERVOIR
    assert abs(mean - 50_000) < 2_000
    # As many from each tenth of the stream: 409.6 expected, standard deviation ~19.
    tenths = [0] * 10
    for production, _ in sample:
        tenths[int(production) // 10_000] += 1
    assert all(330 < count < 490 for count in tenths)


def test_a_reservoir_not_yet_full_keeps_every_pair_in_order():
    paired = PairedLatency(size=8, seed=1)
    for index in range(5):
        paired.add(index, 2 * index)
    assert paired.export() == {"pairs": 5, "sample": [[i, 2 * i] for i in range(5)]}


def test_export_is_json_and_round_trips():
    paired = _shifted(3 * MS, 0.1 * MS)
    exported = json.loads(json.dumps(paired.export()))
    copy = PairedLatency(seed=2)
    copy.add_exported(exported)
    assert copy.pairs == paired.pairs
    assert sorted(map(tuple, copy.export()["sample"])) == sorted(map(tuple, exported["sample"]))
    assert copy.summary() == paired.summary()


def test_merging_weighs_each_side_by_its_pairs():
    bigger, smaller = PairedLatency(seed=4), PairedLatency(seed=5)
    for _ in range(9000):
        bigger.add(MEDIAN, MEDIAN + 1 * MS)
    for _ in range(1000):
        smaller.add(MEDIAN, MEDIAN + 5 * MS)
    merged = PairedLatency(seed=6)
    merged.add_exported(bigger.export())
    merged.add_exported(json.loads(json.dumps(smaller.export())))
    assert merged.pairs == 10_000
    sample = merged.export()["sample"]
    assert len(sample) == RESERVOIR
    slow = sum(shadow - production > 3 * MS for production, shadow in sample)
    # 10% expected: 409.6, standard deviation ~18 (hypergeometric).
    assert 330 < slow < 490
    assert merged.summary()["p50"] == 1.0


def test_merging_small_samples_keeps_them_all_and_the_reservoir_goes_on():
    first, second = PairedLatency(size=16, seed=1), PairedLatency(size=16, seed=2)
    for index in range(5):
        first.add(index, index)
    for index in range(5, 12):
        second.add(index, index)
    first.add_exported(second.export())
    assert first.pairs == 12
    assert sorted(production for production, _ in first.export()["sample"]) == list(range(12))
    for index in range(12, 100):
        first.add(index, index)
    assert first.pairs == 100
    assert len(first.export()["sample"]) == 16


def test_merging_an_export_of_a_smaller_reservoir_is_refused():
    small = PairedLatency(size=10, seed=1)
    for index in range(100):
        small.add(index, index)
    with pytest.raises(ValueError, match="an export of 100 pairs keeping only 10 cannot be "
                                         "merged into a sample of 4096"):
        PairedLatency(seed=1).add_exported(small.export())



def summary_by_sorting(paired: PairedLatency, confidence: float = 0.95) -> dict:
    """summary() as it was first written, every side sorted whole: the oracle."""
    kept = min(paired.pairs, paired.size)
    production, shadow = paired._production[:kept], paired._shadow[:kept]
    differences = sorted(s - p for p, s in zip(production, shadow, strict=True))
    production, shadow = sorted(production), sorted(shadow)
    low, high = interval(differences, 0.5, confidence)
    each = 1 - (1 - confidence) / 2
    shadow_low, shadow_high = interval(shadow, 0.99, each)
    production_low, production_high = interval(production, 0.99, each)
    index = max(1, int(0.99 * kept + 0.5)) - 1
    ms = lambda seconds: round(seconds * 1e3, 3)  # noqa: E731
    return {"pairs": paired.pairs, "confidence": confidence,
            "p50": ms(differences[max(1, int(0.5 * kept + 0.5)) - 1]), "p50_low": ms(low),
            "p50_high": ms(high), "p99": ms(shadow[index] - production[index]),
            "p99_low": ms(shadow_low - production_high),
            "p99_high": ms(shadow_high - production_low),
            "production_p50": ms(production[max(1, int(0.5 * kept + 0.5)) - 1]),
            "production_p99": ms(production[index])}


@pytest.mark.parametrize("pairs", [20, 21, 57, 100, 1000, 4095, 4096, 20000])
def test_the_summary_reads_what_sorting_every_side_reads(pairs):
    rng = random.Random(pairs)
    paired = PairedLatency(seed=pairs)
    for _ in range(pairs):
        production = rng.lognormvariate(-7, 1.5)
        # ties too: a share of the shadow's values repeat production's
        shadow = production if rng.random() < 0.2 else production * rng.uniform(0.5, 2)
        paired.add(production, shadow)
    for confidence in (0.9, 0.95, 0.99):
        assert paired.summary(confidence) == summary_by_sorting(paired, confidence)
