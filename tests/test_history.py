"""history.History on a fake clock: each interval's counts and percentiles are those of
the values recorded in it (for one process and for workers' stats merged as the arbiter
merges them), memory stays bounded over hours, and resets, late samples, removed routes
and the /stats/history query behave as documented."""
from __future__ import annotations

import gc
import random
import tracemalloc
from collections import deque

import pytest

from gproxyd import history as history_module
from gproxyd.dashboard import history_document
from gproxyd.history import POINT_FIELDS, TIERS, History
from gproxyd.stats import Histogram, RouteStats

START = 1_800_000_000.0  # a whole multiple of 10 s: the coarse tier's intervals align


def latency(rng: random.Random, slow: bool) -> float:
    """A latency (seconds) spread over many histogram buckets, exact ones (< 64 µs) too."""
    base = rng.choice((0.00002, 0.0008, 0.004, 0.03))
    return base * rng.uniform(0.5, 3.0) * (4 if slow else 1)


class Traffic:
    """Records random requests into RouteStats and, per interval, into reference
    Histograms and counts of what was recorded in that interval alone."""

    def __init__(self, stats: RouteStats, seed: int = 7):
        self.stats = stats
        self.rng = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        self.latency = {"production": Histogram(), "shadow": Histogram()}
        self.counts = {"production": dict.fromkeys(("requests", "errors"), 0),
                       "shadow": dict.fromkeys(("requests", "errors", "dropped", "compared",
                                                "mismatches"), 0)}

    def second(self, requests: int, slow: bool = False) -> None:
        shadow = self.stats.shadow("shadow")
        for _ in range(requests):
            error = self.rng.random() < 0.05
            value = latency(self.rng, False)
            self.stats.production.record(value, error)
            self.latency["production"].record(value)
            shadow_value = latency(self.rng, slow)
            shadow.record(shadow_value, error)
            self.latency["shadow"].record(shadow_value)
            for side in ("production", "shadow"):
                self.counts[side]["requests"] += 1
                self.counts[side]["errors"] += error
            shadow.compared += 1
            self.counts["shadow"]["compared"] += 1
            if self.rng.random() < 0.1:
                shadow.mismatches += 1
                self.counts["shadow"]["mismatches"] += 1
        if self.rng.random() < 0.2:
            shadow.dropped += 1
            self.counts["shadow"]["dropped"] += 1


def bucket(value_ms: float) -> int:
    """The histogram bucket a value (ms, as a point holds it) falls in."""
    probe = Histogram()
    probe.record(value_ms / 1e3)
    return next(index for index, hits in enumerate(probe.counts) if hits)


def assert_interval(point: dict, counts: dict, reference: Histogram, new_maximum: bool):
    """The point holds what `counts` and `reference` (this interval's alone) hold."""
    for name, count in counts.items():
        assert point[name] == count, (name, point)
    top = max(index for index, hits in enumerate(reference.counts) if hits)
    for field, share in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99),
                         ("max_ms", 1.0)):
        expected = round(reference.percentile(share) * 1e3, 3)
        if field == "max_ms":
            expected = round(reference.max * 1e3, 3)
        if new_maximum or bucket(expected) < top:
            assert point[field] == expected, (field, point, expected)
        else:
            # In the top bucket of an interval that set no new maximum the history knows
            # the bucket, not the interval's largest value: its midpoint, at most the
            # all-time maximum. Same bucket, never below what Histogram says.
            assert bucket(point[field]) == bucket(expected), (field, point, expected)
            assert point[field] >= expected or field == "max_ms", (field, point, expected)


def test_each_second_holds_what_was_recorded_in_it():
    stats = RouteStats(baseline="")
    stats.shadow("shadow")
    traffic = Traffic(stats)
    history = History()
    history.sample(START, {"web": stats})
    expected, maxima = [], {"production": 0.0, "shadow": 0.0}
    for second in range(1, 121):
        traffic.reset()
        traffic.second(requests=traffic.rng.randrange(0, 150), slow=second > 60)
        news = {}
        for side in ("production", "shadow"):
            news[side] = traffic.latency[side].max > maxima[side]
            maxima[side] = max(maxima[side], traffic.latency[side].max)
        expected.append((traffic.counts, traffic.latency, news))
        history.sample(START + second, {"web": stats})
    document = history.document(START + 120, since=900)
    assert document["step"] == 1.0 and document["fields"] == list(POINT_FIELDS)
    backends = document["routes"]["web"]
    assert backends["production"]["role"] == "production"
    assert backends["shadow"]["role"] == "candidate"
    for side in ("production", "shadow"):
        points = backends[side]["points"]
        assert [point["time"] for point in points] == [START + s for s in range(1, 121)]
        assert all(point["seconds"] == 1.0 for point in points)
        for point, (counts, references, news) in zip(points, expected, strict=True):
            if counts[side]["requests"]:
                assert_interval(point, counts[side], references[side], news[side])
            else:
                assert point["p50_ms"] == point["p99_ms"] == point["max_ms"] == 0
    # The candidate made 4x slower halfway shows in the later points, not in the earlier.
    shadow = backends["shadow"]["points"]
    early = sorted(point["p50_ms"] for point in shadow[:60] if point["requests"])
    late = sorted(point["p50_ms"] for point in shadow[60:] if point["requests"])
    assert late[len(late) // 2] > 2 * early[len(early) // 2]


def test_ten_second_points_hold_their_ten_seconds():
    stats = RouteStats()
    traffic = Traffic(stats, seed=11)
    history = History()
    history.sample(START, {"web": stats})
    expected = []
    maximum = 0.0
    for ten in range(12):
        traffic.reset()
        for second in range(1, 11):
            traffic.second(requests=40)
            history.sample(START + ten * 10 + second, {"web": stats})
        new = traffic.latency["production"].max > maximum
        maximum = max(maximum, traffic.latency["production"].max)
        expected.append((traffic.counts["production"], traffic.latency["production"], new))
    points = history.document(START + 120, since=3600)["routes"]["web"]["production"]["points"]
    assert [point["time"] for point in points] == [START + 10 * n for n in range(1, 13)]
    assert all(point["seconds"] == 10.0 for point in points)
    for point, (counts, reference, new) in zip(points, expected, strict=True):
        assert_interval(point, counts, reference, new)


def test_workers_merged_as_the_arbiter_merges_them():
    """Two workers' stats, exported and added each second into fresh RouteStats (what
    Arbiter.stats() does), give the history of both workers' requests together."""
    workers = [RouteStats(), RouteStats()]
    traffics = [Traffic(stats, seed=seed) for seed, stats in enumerate(workers)]

    def merged():
        total = RouteStats(samples=deque(maxlen=100))
        for stats in workers:
            total.add(stats.export())
        return {"web": total}

    history = History()
    history.sample(START, merged())
    for second in range(1, 31):
        reference, counts = Histogram(), {"requests": 0, "errors": 0}
        for traffic in traffics:
            traffic.reset()
            traffic.second(requests=30)
            for name in counts:
                counts[name] += traffic.counts["production"][name]
            reference.add(traffic.latency["production"].export())
        history.sample(START + second, merged())
        point = history.document(START + second, since=1.5)["routes"]["web"]["production"][
            "points"][-1]
        assert point["time"] == START + second
        for name, count in counts.items():
            assert point[name] == count
        assert point["p50_ms"] == round(reference.percentile(0.5) * 1e3, 3)


def test_memory_is_bounded_over_hours():
    """Two simulated hours of a route with two shadows, a sample a second: the rings hold
    900 and 360 points, and what history.py allocated after the second hour is what it
    held after the first, within the documented bound (144 KB a backend)."""
    stats = RouteStats(baseline="baseline")
    stats.shadow("baseline")
    traffic = Traffic(stats, seed=3)
    history = History()
    tracemalloc.start()
    try:
        def held() -> int:
            gc.collect()  # a full collection empties the interpreter's free lists too
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, history_module.__file__)])
            return sum(stat.size for stat in snapshot.statistics("filename"))

        now = START
        for hour in range(2):
            for _ in range(3600):
                traffic.second(requests=3)
                now += 1
                history.sample(now, {"web": stats})
            if hour == 0:
                after_one_hour = held()
        after_two_hours = held()
    finally:
        tracemalloc.stop()
    document = history.document(now, since=900)
    for backend in ("production", "shadow", "baseline"):
        assert len(document["routes"]["web"][backend]["points"]) == TIERS[0][1]
        assert len(history.document(now, since=3600)["routes"]["web"][backend]["points"]) \
            == TIERS[1][1]
    assert document["routes"]["web"]["baseline"]["role"] == "baseline"
    assert after_two_hours <= after_one_hour + 4096
    assert after_two_hours <= 3 * 145_000, after_two_hours  # bound: 143,648 B each


def test_a_late_sample_makes_a_longer_interval_and_loses_nothing():
    stats = RouteStats()
    history = History()
    history.sample(START, {"web": stats})
    for _ in range(10):
        stats.production.record(0.001)
    history.sample(START + 3.5, {"web": stats})  # the loop was busy for 2.5 s
    points = history.document(START + 3.5, since=60)["routes"]["web"]["production"]["points"]
    assert [(point["time"], point["seconds"], point["requests"]) for point in points] == \
        [(START + 3.5, 3.5, 10)]


def test_stats_that_began_again_count_from_zero():
    """A route removed and added again (new RouteStats): no negative counts."""
    old = RouteStats()
    for _ in range(50):
        old.production.record(0.01, error=True)
    history = History()
    history.sample(START, {"web": old})
    new, reference = RouteStats(), Histogram()
    for value in (0.002, 0.003, 0.0005):
        new.production.record(value)
        reference.record(value)
    history.sample(START + 1, {"web": new})
    point = history.document(START + 1, since=10)["routes"]["web"]["production"]["points"][-1]
    assert (point["requests"], point["errors"]) == (3, 0)
    assert (point["p50_ms"], point["max_ms"]) == \
        (round(reference.percentile(0.5) * 1e3, 3), 3.0)


def test_what_appears_after_the_first_sample_counts_from_zero():
    """The first sample is where counting begins; a route or shadow added later (a
    reload) counts everything since the sample before it appeared."""
    web = RouteStats()
    for _ in range(7):
        web.production.record(0.001)
    history = History()
    history.sample(START, {"web": web})
    web.shadow("new").record(0.004)
    api = RouteStats()
    api.production.record(0.002)
    api.production.record(0.002)
    history.sample(START + 1, {"web": web, "api": api})
    document = history.document(START + 1, since=60)["routes"]
    assert document["web"]["production"]["points"][0]["requests"] == 0  # the 7: before
    for route, backend, requests in (("web", "new", 1), ("api", "production", 2)):
        point = document[route][backend]["points"][0]
        assert (point["time"], point["seconds"], point["requests"]) == \
            (START + 1, 1.0, requests)
    assert document["web"]["new"]["points"][0]["p50_ms"] == 4.0


def test_routes_and_shadows_gone_are_forgotten():
    stats = RouteStats()
    stats.shadow("a")
    other = RouteStats()
    history = History()
    history.sample(START, {"web": stats, "api": other})
    history.sample(START + 1, {"web": stats, "api": other})
    assert sorted(history.routes()) == ["api", "web"]
    del stats.shadows["a"]
    history.sample(START + 2, {"web": stats})
    assert history.routes() == ["web"]
    assert list(history.document(START + 2, since=60)["routes"]["web"]) == ["production"]


@pytest.mark.parametrize("query, error", [
    ("since=abc", "bad since 'abc' (expected seconds)"),
    ("since=0", "bad since '0' (expected seconds above 0, at most 3600)"),
    ("since=nan", "bad since 'nan' (expected seconds)"),
    ("step=5", "bad step '5' (expected one of: 1, 10)"),
])
def test_history_query_errors(query, error):
    history = History()
    history.sample(START, {"web": RouteStats()})
    with pytest.raises(ValueError) as raised:
        history_document(history, query, START)
    assert str(raised.value) == error


def test_history_query_picks_the_tier_and_the_route():
    stats, other = RouteStats(), RouteStats()
    history = History()
    for second in range(0, 31):
        stats.production.record(0.001)
        history.sample(START + second, {"web": stats, "api": other})
    short = history_document(history, "route=web&since=5", START + 30)
    assert list(short["routes"]) == ["web"] and short["step"] == 1.0
    assert [point["time"] for point in short["routes"]["web"]["production"]["points"]] == \
        [START + s for s in range(26, 31)]
    assert history_document(history, "", START + 30)["since"] == 300
    hour = history_document(history, "since=86400", START + 30)
    assert hour["step"] == 10.0 and hour["since"] == 3600
    assert [point["requests"] for point in hour["routes"]["web"]["production"]["points"]] \
        == [10, 10, 10]
    assert history_document(history, "since=60&step=10", START + 30)["step"] == 10.0
    with pytest.raises(LookupError) as raised:
        history_document(history, "route=nope", START + 30)
    assert raised.value.args[0] == "no route 'nope' (routes: web, api)"
