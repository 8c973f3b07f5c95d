"""compare.py on its own: Capture cuts whole answers, Comparison pairs them in order
whoever answers first, learns the baseline's noise, and keeps its memory bounded."""
from __future__ import annotations

import hashlib

from framing import FAST
from hypothesis import given
from hypothesis import strategies as st

from gproxyd import compare, diff
from gproxyd.compare import PRODUCTION, Capture, Comparison
from gproxyd.config import make_route
from gproxyd.protocols import FRAMERS
from gproxyd.stats import RouteStats

CANDIDATE, BASELINE = "127.0.0.1:2", "127.0.0.1:3"


def json_answer(body: bytes) -> diff.Answer:
    return diff.Answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def comparison(**options) -> tuple[Comparison, RouteStats]:
    route = make_route(listen="127.0.0.1:0", production="127.0.0.1:1", protocol="http",
                       shadow=[CANDIDATE], **options)
    stats = RouteStats()
    stats.baseline = route.baseline.text if route.baseline is not None else ""
    names = [CANDIDATE] + ([route.baseline.text] if route.baseline is not None else [])
    return Comparison(route, stats, names), stats


@FAST
@given(points=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
       limit=st.sampled_from([60, 100, 10_000]))
def test_capture_cuts_whole_answers_however_the_stream_is_cut(points, limit):
    """Limits are above every head here, as in use: a capture keeps compare-max-body plus
    64 KiB, and the framers fall back on a longer head."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"a" * 300,
               b"HTTP/1.1 204 No Content\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
    stream = b"".join(answers)
    cuts = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    framer, capture = FRAMERS["http"][1](), Capture("http", limit)
    framer.ends = []
    for _ in answers:
        framer.expect("GET")
    got = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        chunk = bytearray(stream[start:end])
        framer.feed(memoryview(chunk))
        got += capture.feed(memoryview(chunk), framer.ends)
        chunk[:] = b"\xa5" * len(chunk)  # nothing may be kept by reference
    assert len(got) == 3
    for answer, expected in zip(got, answers, strict=True):
        if len(expected) <= limit:
            assert (answer.raw, answer.digest) == (expected, None)
        else:  # the head, a preview, and the whole body's length and hash
            body = expected[diff.body_start("http", expected):]
            assert answer.body_length == len(body)
            assert answer.digest == hashlib.blake2b(body, digest_size=diff.DIGEST_SIZE).digest()
            assert expected.startswith(answer.raw)


def test_answers_pair_in_order_whoever_answers_first():
    pairing, stats = comparison()
    pairing.answered(CANDIDATE, json_answer(b'{"a": 1}'), 0.002)  # the shadow first
    pairing.answered(PRODUCTION, json_answer(b'{"a": 1}'), 0.001, b"GET /1 HTTP/1.1\r\n")
    pairing.answered(PRODUCTION, json_answer(b'{"a": 2}'), 0.001, b"GET /2 HTTP/1.1\r\n")
    pairing.answered(CANDIDATE, json_answer(b'{"a": 3}'), 0.002)
    shadow = stats.shadow(CANDIDATE)
    assert (shadow.compared, shadow.mismatches, shadow.paired.pairs) == (2, 1, 2)
    assert shadow.mismatch_paths == {"$.a": 1}
    [sample] = stats.samples
    assert sample["request"] == "GET /2 HTTP/1.1" and sample["paths"] == ["$.a"]


def test_the_baseline_is_judged_first_and_its_differences_are_noise():
    pairing, stats = comparison(baseline="127.0.0.1:3")
    production = json_answer(b'{"t": 1, "price": 10}')
    # The candidate answers before the baseline: it waits for the baseline's judgement.
    pairing.answered(PRODUCTION, production, 0.001)
    pairing.answered(CANDIDATE, json_answer(b'{"t": 2, "price": 10}'), 0.001)
    assert stats.shadow(CANDIDATE).compared == 0
    pairing.answered(BASELINE, json_answer(b'{"t": 3, "price": 10}'), 0.001)
    candidate = stats.shadow(CANDIDATE)
    assert (candidate.compared, candidate.noise, candidate.mismatches) == (1, 1, 0)
    pairing.answered(PRODUCTION, production, 0.001)
    pairing.answered(BASELINE, json_answer(b'{"t": 4, "price": 10}'), 0.001)
    pairing.answered(CANDIDATE, json_answer(b'{"t": 5, "price": 11}'), 0.001)
    assert (candidate.compared, candidate.noise, candidate.mismatches) == (2, 1, 1)
    assert candidate.mismatch_paths == {"$.price": 1}
    assert stats.noise_paths == {"$.t": 2}
    assert [sample["shadow"] for sample in stats.samples] == [CANDIDATE]


def test_a_baseline_that_ends_stops_holding_the_candidates_back():
    pairing, stats = comparison(baseline="127.0.0.1:3")
    pairing.answered(PRODUCTION, json_answer(b'{"a": 1}'), 0.001)
    pairing.answered(CANDIDATE, json_answer(b'{"a": 2}'), 0.001)
    assert stats.shadow(CANDIDATE).compared == 0
    pairing.ended(BASELINE)
    assert (stats.shadow(CANDIDATE).compared, stats.shadow(CANDIDATE).mismatches) == (1, 1)


def test_production_ending_keeps_what_it_answered_comparable():
    pairing, stats = comparison()
    for _ in range(3):
        pairing.answered(PRODUCTION, json_answer(b"{}"), 0.001)
    pairing.ended(PRODUCTION)
    for _ in range(4):  # the last one answers nothing production answered
        pairing.answered(CANDIDATE, json_answer(b"{}"), 0.001)
    shadow = stats.shadow(CANDIDATE)
    assert (shadow.compared, shadow.uncompared) == (3, 1)


def test_a_silent_shadow_cannot_make_exchanges_pile_up():
    pairing, stats = comparison()
    for _ in range(compare.MAX_ROWS + 500):
        pairing.answered(PRODUCTION, json_answer(b'{"a": 1}'), 0.001)
    assert len(pairing._rows) <= compare.MAX_ROWS
    # Answers for exchanges given up are not paired with the wrong ones.
    pairing.answered(CANDIDATE, json_answer(b'{"a": 1}'), 0.001)
    shadow = stats.shadow(CANDIDATE)
    assert (shadow.compared, shadow.uncompared) == (0, 1)


def test_held_bytes_stay_within_the_budget():
    pairing, _ = comparison(compare_max_body="64KiB")
    big = json_answer(b'"' + b"x" * 60_000 + b'"')
    for _ in range(200):
        pairing.answered(PRODUCTION, big, 0.001)
        assert pairing._held <= pairing._budget
    for _ in range(200):
        pairing.answered(CANDIDATE, big, 0.001)
    assert pairing._held <= pairing._budget


def test_filtered_requests_are_skipped_when_pairing():
    pairing, stats = comparison(shadow_filter="GET")
    for mirrored in (False, True, False, True):
        pairing.decided(mirrored)
    for body in (b'{"w": 1}', b'{"r": 1}', b'{"w": 2}', b'{"r": 2}'):
        pairing.answered(PRODUCTION, json_answer(body), 0.001)
    pairing.answered(CANDIDATE, json_answer(b'{"r": 1}'), 0.001)
    pairing.answered(CANDIDATE, json_answer(b'{"r": 3}'), 0.001)
    shadow = stats.shadow(CANDIDATE)
    assert (shadow.compared, shadow.mismatches, stats.filtered) == (2, 1, 2)
    assert shadow.mismatch_paths == {"$.r": 1}


def test_compare_off_still_pairs_latencies():
    pairing, stats = comparison(compare="off")
    assert pairing.rules is None
    pairing.answered(PRODUCTION, None, 0.001)
    pairing.answered(CANDIDATE, None, 0.004)
    shadow = stats.shadow(CANDIDATE)
    assert (shadow.compared, shadow.paired.pairs) == (0, 1)
