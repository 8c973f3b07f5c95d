"""diff.py: comparing production's and a shadow's answers, by example and by property."""
import gzip
import hashlib
import json
import tracemalloc
import zlib

import pytest
from framing import FAST
from hypothesis import given
from hypothesis import strategies as st

from gproxyd.diff import (
    DIGEST_SIZE,
    MAX_PATHS,
    Answer,
    Difference,
    Rules,
    body_start,
    compare,
    describe_answer,
    describe_request,
    generalise,
    matches,
)


def response(body: bytes = b"", status: int = 200, headers=(), chunks=None,
             interim: bytes = b"") -> bytes:
    """An HTTP/1.1 response: Content-Length framing, or chunked when `chunks` are given."""
    head = [f"HTTP/1.1 {status} X".encode()]
    head += [f"{name}: {value}".encode() for name, value in headers]
    if chunks is None:
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        head.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return interim + b"\r\n".join(head) + b"\r\n\r\n" + payload


def json_response(document, **kwargs) -> bytes:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return response(body, headers=[("Content-Type", "application/json")], **kwargs)


def http(rules: Rules, production: bytes, shadow: bytes) -> Difference | None:
    return compare("http", rules, Answer(production), Answer(shadow))


def paths(difference: Difference | None) -> list[str] | None:
    return None if difference is None else difference.paths


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


BODY = Rules()

# --- HTTP: JSON bodies --------------------------------------------------------------------

ORDER = {"id": 7, "price": 10, "items": [{"price": 1}, {"price": 2}, {"price": 3},
                                         {"price": 4, "name": "x"}],
         "meta": {"time": 1, "tags": ["a"]}}

JSON_CASES = [
    ("key order and whitespace",
     b'{"b": [1, 2], "a": {"x": null, "y": true}}', b'{"a":{"y":true,"x":null},"b":[1,2]}',
     (), None),
    ("1 equals 1.0", {"a": 1, "b": 0.5}, b'{"a": 1.0, "b": 5e-1}', (), None),
    ("one field", {"id": 1, "price": 10}, {"id": 1, "price": 11}, (), ["$.price"]),
    ("nested array element", ORDER,
     {**ORDER, "items": ORDER["items"][:3] + [{"price": 5, "name": "x"}]}, (),
     ["$.items[3].price"]),
    ("key missing from the shadow", {"a": 1, "b": 2}, {"a": 1}, (), ["$.b"]),
    ("key only the shadow has", {"a": 1}, {"a": 1, "b": {"c": 2}}, (), ["$.b"]),
    ("extra array elements", {"a": [1, 2]}, {"a": [1, 2, 3, 4]}, (), ["$.a[2]", "$.a[3]"]),
    ("shorter array", {"a": [1, 2, 3]}, {"a": [1, 9]}, (), ["$.a[1]", "$.a[2]"]),
    ("number became a string", {"a": 1}, {"a": "1"}, (), ["$.a"]),
    ("true is not 1", {"a": True}, {"a": 1}, (), ["$.a"]),
    ("null is not absent", {"a": None}, {}, (), ["$.a"]),
    ("object became an array", {"a": {"b": 1}}, {"a": [1]}, (), ["$.a"]),
    ("root type", [1], {"a": 1}, (), ["$"]),
    ("document order", {"z": 1, "a": {"b": 1, "c": 2}, "m": [0, 1]},
     {"m": [0, 2], "a": {"c": 3, "b": 1}, "z": 0, "new": 1}, (),
     ["$.z", "$.a.c", "$.m[1]", "$.new"]),
    ("keys that are not identifiers", {"a b": 1, "1": 2, 'q"': 3, "é": 4},
     {"a b": 0, "1": 0, 'q"': 0, "é": 0}, (),
     ['$["a b"]', '$["1"]', '$["q\\""]', '$["é"]']),
    ("ignored: exact", {"timestamp": 1, "a": 1}, {"timestamp": 2, "a": 1}, ("$.timestamp",),
     None),
    ("ignored: exact, others still count", {"timestamp": 1, "a": 1}, {"timestamp": 2, "a": 2},
     ("$.timestamp",), ["$.a"]),
    ("ignored: [*]", {"items": [{"u": 1, "v": 1}, {"u": 1, "v": 1}]},
     {"items": [{"u": 2, "v": 1}, {"u": 3, "v": 2}]}, ("$.items[*].u",), ["$.items[1].v"]),
    ("ignored: .*", {"a": {"id": 1}, "b": {"id": 1, "n": 1}},
     {"a": {"id": 2}, "b": {"id": 3, "n": 2}}, ("$.*.id",), ["$.b.n"]),
    ("ignored: a prefix covers what is below", {"meta": {"time": 1, "tags": ["a"]}, "x": 1},
     {"meta": {"time": 2, "tags": ["b", "c"]}, "x": 1}, ("$.meta",), None),
    ("ignored: a missing key", {"a": 1, "t": 1}, {"a": 1}, ("$.t",), None),
    ("ignored: quoted key", {"a b": 1}, {"a b": 2}, ('$["a b"]',), None),
]


@pytest.mark.parametrize("production, shadow, ignore, expected",
                         [case[1:] for case in JSON_CASES], ids=[case[0] for case in JSON_CASES])
def test_json_bodies(production, shadow, ignore, expected):
    rules = Rules(ignore=ignore)
    assert paths(http(rules, json_response(production), json_response(shadow))) == expected


def test_json_is_recognised_by_either_side_and_by_plus_json():
    a, b = b'{"a": 1, "b": 2}', b'{"b": 2, "a": 1}'
    assert http(BODY, response(a, headers=[("Content-Type", "text/plain")]),
                response(b, headers=[("content-type", "Application/JSON; charset=utf-8")])) is None
    problem = [("Content-Type", "application/problem+json")]
    assert http(BODY, response(a, headers=problem), response(b, headers=problem)) is None
    assert paths(http(BODY, response(a), response(b))) == ["body"]  # no JSON type: bytes


def test_json_that_does_not_parse_is_compared_as_bytes():
    difference = http(BODY, json_response(b'{"a": 1'), json_response(b'{"a": 2'))
    assert difference == Difference(["body"], 6)


def test_json_paths_are_capped():
    production = {f"k{i}": i for i in range(50)}
    shadow = {f"k{i}": -i - 1 for i in range(50)}
    got = paths(http(BODY, json_response(production), json_response(shadow)))
    assert got == [f"$.k{i}" for i in range(MAX_PATHS)]


def test_status_and_header_paths_come_first_and_count_towards_the_cap():
    production = response(json.dumps({f"k{i}": i for i in range(50)}).encode(),
                          headers=[("Content-Type", "application/json"), ("ETag", "1")])
    shadow = response(json.dumps({f"k{i}": -1 for i in range(50)}).encode(), status=201,
                      headers=[("Content-Type", "application/json"), ("ETag", "2")])
    got = paths(http(Rules(headers=("etag",)), production, shadow))
    assert got == ["status", "header etag"] + [f"$.k{i}" for i in range(MAX_PATHS - 2)]


def test_deep_json_is_fine():
    deep = b"[" * 500 + b"]" * 500
    other = b"[" * 500 + b"1" + b"]" * 500
    assert paths(http(BODY, json_response(deep), json_response(other))) == ["$" + "[0]" * 500]
    deeper = b"[" * 5000 + b"]" * 5000
    other = b"[" * 5000 + b"1" + b"]" * 5000
    # Deeper than json.loads goes: compared as bytes, never a RecursionError.
    assert http(BODY, json_response(deeper), json_response(other)) == Difference(["body"], 5000)


# --- HTTP: status, headers, modes ---------------------------------------------------------

STATUS = Rules(mode="status")

HEAD_CASES = [
    ("equal", BODY, response(b"x"), response(b"x"), None),
    ("status differs, mode body", BODY, response(b"x"), response(b"x", status=500), ["status"]),
    ("status and body differ", BODY, response(b"x"), response(b"y", status=500),
     ["status", "body"]),
    ("status differs, mode status", STATUS, response(b"x"), response(b"y", status=404),
     ["status"]),
    ("mode status ignores the body", STATUS, response(b"x"), response(b"yy"), None),
    ("named header differs", Rules(headers=("Content-Type",)),
     response(b"x", headers=[("Content-Type", "text/plain")]),
     response(b"x", headers=[("content-type", "text/html")]), ["header content-type"]),
    ("named header: names case-insensitive, values stripped", Rules(headers=("x-a",)),
     response(b"x", headers=[("X-A", "1 ")]), response(b"x", headers=[("x-a", " 1")]), None),
    ("named header missing", Rules(headers=("x-a",)),
     response(b"x", headers=[("X-A", "1")]), response(b"x"), ["header x-a"]),
    ("named header, mode status", Rules(mode="status", headers=("x-a",)),
     response(b"x", headers=[("X-A", "1")]), response(b"y", headers=[("X-A", "2")]),
     ["header x-a"]),
    ("other headers are not compared", BODY,
     response(b"x", headers=[("Date", "Mon")]), response(b"x", headers=[("Date", "Tue")]), None),
    ("obs-fold", Rules(headers=("x-a",)),
     response(b"x", headers=[("X-A", "a\r\n b")]), response(b"x", headers=[("X-A", "a b")]),
     None),
    ("bare LF line ends", BODY, b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
     response(b"x"), None),
    ("100 Continue before the final head", BODY,
     response(b"x", interim=b"HTTP/1.1 100 Continue\r\n\r\n"), response(b"x"), None),
    ("several interim heads", BODY,
     response(b"x", interim=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
              b"Link: </a>\r\n\r\n"), response(b"y"), ["body"]),
    ("chunked vs Content-Length", BODY, response(b"hello world"),
     response(chunks=[b"hello world"]), None),
    ("chunks split differently", BODY, response(chunks=[b"hel", b"lo wor", b"ld"]),
     response(chunks=[b"hello ", b"world"]), None),
    ("chunk extensions, bare LF, trailers", BODY,
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2;x=1\r\nab\r\n2 ; y\ncd\n0\r\nX-Trailer: 1\r\n\r\n", response(b"abcd"), None),
    ("a body cut short: what there is", BODY,
     response(b"hello world")[:-3], b"HTTP/1.0 200 OK\r\n\r\nhello wo", None),
    ("chunked cut short: what there is", BODY,
     response(chunks=[b"hello", b" world"])[:-10], response(b"hello wo"), None),
    ("body to the end", BODY, b"HTTP/1.0 200 OK\r\n\r\nabc", response(b"abc"), None),
    ("not HTTP: bytes", BODY, b"garbage\r\n\r\nbody", b"garbage\r\n\r\nbodY",
     ["body"]),
    ("head not complete: bytes", BODY, b"HTTP/1.1 200 OK\r\nA: 1", b"HTTP/1.1 200 OK\r\nA: 1",
     None),
]


@pytest.mark.parametrize("rules, production, shadow, expected",
                         [case[1:] for case in HEAD_CASES], ids=[case[0] for case in HEAD_CASES])
def test_heads_and_framing(rules, production, shadow, expected):
    assert paths(http(rules, production, shadow)) == expected


def test_rules_store_header_names_lower_case():
    assert Rules(headers=("Content-Type", "ETag")).headers == ("content-type", "etag")


def test_non_json_body_differs_at_offset():
    assert http(BODY, response(b"hello world"), response(b"hello_world")) == \
        Difference(["body"], 5)
    assert http(BODY, response(b"hello"), response(b"hello world")) == Difference(["body"], 5)
    long = bytes(range(256)) * 100
    changed = long[:9000] + b"!" + long[9001:]
    assert http(BODY, response(long), response(changed)) == Difference(["body"], 9000)


def test_garbage_is_compared_as_whole_bytes():
    assert http(BODY, b"garbage one", b"garbage two") == Difference(["body"], 8)
    assert http(BODY, b"", b"HTTP/1.1 200 OK\r\n\r\n") == Difference(["body"], 0)


def test_ignore_rules_do_not_apply_to_other_bodies():
    rules = Rules(ignore=("$",))
    assert paths(http(rules, response(b"a"), response(b"b"))) == ["body"]


# --- HTTP: content codings ----------------------------------------------------------------

GZIP = [("Content-Encoding", "gzip")]
DOCUMENT = {"name": "widget", "price": 10, "tags": ["a", "b"]}
DOCUMENT_BYTES = json.dumps(DOCUMENT).encode()


def with_type(headers):
    return [("Content-Type", "application/json"), *headers]


CODING_CASES = [
    ("gzip vs identity", response(gzip.compress(DOCUMENT_BYTES), headers=with_type(GZIP)),
     json_response(DOCUMENT), None),
    ("x-gzip, JSON differs", response(gzip.compress(DOCUMENT_BYTES),
                                      headers=with_type([("Content-Encoding", "x-gzip")])),
     json_response({**DOCUMENT, "price": 11}), ["$.price"]),
    ("deflate (zlib) vs gzip", response(zlib.compress(b"plain text"),
                                        headers=[("Content-Encoding", "deflate")]),
     response(gzip.compress(b"plain text"), headers=GZIP), None),
    ("raw deflate", response(raw_deflate(b"plain text"), headers=[("Content-Encoding", "Deflate")]),
     response(b"plain text"), None),
    ("gzip, chunked", response(chunks=[gzip.compress(b"abc")[:5], gzip.compress(b"abc")[5:]],
                               headers=GZIP), response(b"abc"), None),
    ("several gzip members", response(gzip.compress(b"ab") + gzip.compress(b"c"), headers=GZIP),
     response(b"abc"), None),
    ("stacked codings", response(gzip.compress(zlib.compress(b"abc")),
                                 headers=[("Content-Encoding", "deflate, gzip")]),
     response(b"abc"), None),
    ("garbage gzip falls back to bytes", response(b"not gzip at all", headers=GZIP),
     response(b"not gzip at all"), None),
    ("garbage gzip differing", response(b"not gzip at all", headers=GZIP),
     response(b"not gzip at ALL", headers=GZIP), ["body"]),
    ("unknown coding: encoded bytes", response(b"xyz", headers=[("Content-Encoding", "br")]),
     response(b"xyz"), None),
    ("truncated gzip: encoded bytes", response(gzip.compress(b"abc" * 100)[:-8], headers=GZIP),
     response(b"abc" * 100), ["body"]),
]


@pytest.mark.parametrize("production, shadow, expected",
                         [case[1:] for case in CODING_CASES],
                         ids=[case[0] for case in CODING_CASES])
def test_content_codings(production, shadow, expected):
    assert paths(http(BODY, production, shadow)) == expected


def test_decoding_beyond_max_decoded_compares_the_encoded_bytes():
    rules = Rules(max_decoded=1000)
    packed = gzip.compress(b"a" * 2000)
    assert paths(http(rules, response(packed, headers=GZIP), response(b"a" * 2000))) == ["body"]
    assert http(rules, response(packed, headers=GZIP), response(packed, headers=GZIP)) is None
    assert http(Rules(max_decoded=2000), response(packed, headers=GZIP),
                response(b"a" * 2000)) is None


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """50 MiB of zeros, gzipped (about 50 KiB)."""
    packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(50)) + packer.flush()


def test_zip_bomb_is_bounded(bomb):
    rules = Rules(max_decoded=1 << 20)
    production = response(bomb, headers=GZIP)
    shadow = response(bomb[:-9] + bytes([bomb[-9] ^ 1]) + bomb[-8:], headers=GZIP)
    tracemalloc.start()
    try:
        assert http(rules, production, production) is None
        assert http(rules, production, shadow) == Difference(["body"], len(bomb) - 9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the encoded bodies and max_decoded, not 50 MiB


# --- HTTP: oversized bodies ---------------------------------------------------------------

def digested(raw: bytes, keep: int = 4) -> Answer:
    """`raw` captured as an oversized answer: its head, `keep` body bytes, and a digest."""
    start = body_start("http", raw)
    return Answer(raw[:start + keep], len(raw) - start,
                  hashlib.blake2b(raw[start:], digest_size=DIGEST_SIZE).digest())


BIG = b"0123456789" * 10
OVERSIZED_CASES = [
    ("both digested, equal", digested(response(BIG)), digested(response(BIG)), None),
    ("both digested, body differs", digested(response(BIG)),
     digested(response(BIG[:-1] + b"!")), ["body"]),
    ("both digested, length differs", digested(response(BIG)), digested(response(BIG + b"!")),
     ["length"]),
    ("status differs too", digested(response(BIG)), digested(response(BIG, status=503)),
     ["status"]),
    ("one side digested, equal", digested(response(BIG)), Answer(response(BIG)), None),
    ("one side digested, different", Answer(response(BIG)),
     digested(response(BIG[:-1] + b"!")), ["body"]),
    ("one side digested, length", Answer(response(BIG + b"!")), digested(response(BIG)),
     ["length"]),
    ("compared as transferred: framing counts", digested(response(BIG)),
     digested(response(chunks=[BIG])), ["length"]),
]


@pytest.mark.parametrize("production, shadow, expected",
                         [case[1:] for case in OVERSIZED_CASES],
                         ids=[case[0] for case in OVERSIZED_CASES])
def test_oversized_bodies(production, shadow, expected):
    difference = compare("http", BODY, production, shadow)
    assert paths(difference) == expected
    assert difference is None or difference.offset is None


def test_bodies_over_max_body_are_compared_by_digest():
    rules = Rules(max_body=50)
    assert http(rules, response(BIG), response(BIG[:-1] + b"!")) == Difference(["body"])
    assert http(rules, response(BIG), response(BIG)) is None
    assert http(Rules(max_body=50, mode="status"), response(BIG), response(BIG + b"!")) is None


# --- body_start ---------------------------------------------------------------------------

BODY_START_CASES = [
    ("plain", "http", b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\nbody", 25),
    ("bare LF", "http", b"HTTP/1.1 200 OK\nA: 1\n\nbody", 22),
    ("after 100 Continue", "http", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nxy",
     44),
    ("101 is final", "http", b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\nframes", 38),
    ("incomplete head", "http", b"HTTP/1.1 200 OK\r\nA: 1\r\n", 23),
    ("incomplete final head after 100", "http", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2",
     35),
    ("empty", "http", b"", 0),
    ("redis", "redis", b"$3\r\nbar\r\n", 0),
]


@pytest.mark.parametrize("protocol, raw, expected", [case[1:] for case in BODY_START_CASES],
                         ids=[case[0] for case in BODY_START_CASES])
def test_body_start(protocol, raw, expected):
    for kind in (bytes, bytearray, memoryview):
        assert body_start(protocol, kind(raw)) == expected


# --- Redis --------------------------------------------------------------------------------

def redis(production: bytes, shadow: bytes, rules: Rules = BODY) -> Difference | None:
    return compare("redis", rules, Answer(production), Answer(shadow))


REDIS_CASES = [
    ("equal", b"$3\r\nbar\r\n", b"$3\r\nbar\r\n", None),
    ("bulk differs", b"$3\r\nbar\r\n", b"$3\r\nbaz\r\n", ["reply"]),
    ("simple string vs bulk", b"+OK\r\n", b"$2\r\nOK\r\n", ["reply"]),
    ("error vs bulk", b"-ERR no\r\n", b"$3\r\nbar\r\n", ["reply"]),
    ("errors: - and ! alike", b"-ERR x\r\n", b"!5\r\nERR x\r\n", None),
    ("integer differs", b":3\r\n", b":4\r\n", ["reply"]),
    ("array element", b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
     b"*3\r\n$1\r\na\r\n$1\r\nX\r\n$1\r\nc\r\n", ["[1]"]),
    ("nested array element", b"*2\r\n:1\r\n*2\r\n:2\r\n:3\r\n", b"*2\r\n:1\r\n*2\r\n:9\r\n:3\r\n",
     ["[1][0]"]),
    ("extra elements", b"*1\r\n:1\r\n", b"*3\r\n:1\r\n:2\r\n:3\r\n", ["[1]", "[2]"]),
    ("array vs null array", b"*1\r\n:1\r\n", b"*-1\r\n", ["reply"]),
    ("map value", b"%2\r\n+name\r\n+ann\r\n+age\r\n:3\r\n",
     b"%2\r\n+age\r\n:3\r\n+name\r\n+bob\r\n", ["[name]"]),
    ("map key missing, key only the shadow has", b"%2\r\n+a\r\n:1\r\n+b\r\n:2\r\n",
     b"%2\r\n+a\r\n:1\r\n+c\r\n:2\r\n", ["[b]", "[c]"]),
    ("map in array", b"*1\r\n%1\r\n:7\r\n+x\r\n", b"*1\r\n%1\r\n:7\r\n+y\r\n", ["[0][7]"]),
    ("set in another order", b"~2\r\n+a\r\n+b\r\n", b"~2\r\n+b\r\n+a\r\n", None),
    ("set differs", b"~2\r\n+a\r\n+b\r\n", b"~2\r\n+a\r\n+c\r\n", ["[1]"]),
    ("push", b">2\r\n+a\r\n:1\r\n", b">2\r\n+a\r\n:2\r\n", ["[1]"]),
    ("double by value", b",1.50\r\n", b",1.5\r\n", None),
    ("double differs", b",1.5\r\n", b",2.5\r\n", ["reply"]),
    ("double vs integer", b",1\r\n", b":1\r\n", ["reply"]),
    ("bool differs", b"#t\r\n", b"#f\r\n", ["reply"]),
    ("RESP3 null vs RESP2 null", b"_\r\n", b"$-1\r\n", None),
    ("null vs empty string", b"_\r\n", b"$0\r\n\r\n", ["reply"]),
    ("big number", b"(12345678901234567890\r\n", b"(12345678901234567891\r\n", ["reply"]),
    ("verbatim", b"=7\r\ntxt:abc\r\n", b"=7\r\ntxt:abd\r\n", ["reply"]),
    ("attribute skipped", b"|1\r\n+ttl\r\n:5\r\n$3\r\nbar\r\n", b"$3\r\nbar\r\n", None),
    ("attribute inside an array", b"*2\r\n:1\r\n|1\r\n+a\r\n+b\r\n:2\r\n", b"*2\r\n:1\r\n:2\r\n",
     None),
    ("push before the reply is skipped", b">2\r\n+invalidate\r\n*1\r\n+k\r\n+OK\r\n", b"+OK\r\n",
     None),
    ("bare LF", b"*1\n$3\nbar\n", b"*1\r\n$3\r\nbar\r\n", None),
    ("unparsable: bytes", b"?what\r\n", b"?whot\r\n", ["reply"]),
    ("cut short: bytes", b"$5\r\nab", b"$5\r\nabcde\r\n", ["reply"]),
]


@pytest.mark.parametrize("production, shadow, expected", [case[1:] for case in REDIS_CASES],
                         ids=[case[0] for case in REDIS_CASES])
def test_redis_replies(production, shadow, expected):
    assert paths(redis(production, shadow)) == expected


def test_redis_garbage_has_an_offset():
    assert redis(b"?what\r\n", b"?whot\r\n") == Difference(["reply"], 3)
    assert redis(b"$3\r\nbar\r\n", b"$3\r\nbar\r\nextra") == Difference(["reply"], 9)


def test_redis_nesting_beyond_the_bound_is_compared_as_bytes():
    deep = b"*1\r\n" * 1000 + b":1\r\n"
    assert redis(deep, deep) is None
    assert redis(deep, deep[:-3] + b"2\r\n") == Difference(["reply"], len(deep) - 3)


def test_redis_oversized():
    reply = b"$100\r\n" + BIG + b"\r\n"
    whole = hashlib.blake2b(reply, digest_size=DIGEST_SIZE).digest()
    assert compare("redis", BODY, Answer(reply[:10], len(reply), whole), Answer(reply)) is None
    other = reply[:-3] + b"!\r\n"
    assert compare("redis", BODY, Answer(reply[:10], len(reply), whole),
                   Answer(other)) == Difference(["reply"])
    assert compare("redis", BODY, Answer(reply[:10], len(reply) + 1, whole),
                   Answer(reply)) == Difference(["length"])
    assert redis(reply, other, Rules(max_body=50)) == Difference(["reply"])


# --- paths --------------------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    ("$.items[3].price", "$.items[*].price"),
    ("$[0][12]", "$[*][*]"),
    ("$.a", "$.a"),
    ('$["[3]"][4]', '$["[3]"][*]'),
    ("[2][0]", "[*][*]"),
    ("[name][1]", "[name][*]"),
    ("reply", "reply"),
    ("status", "status"),
])
def test_generalise(path, expected):
    assert generalise(path) == expected


@pytest.mark.parametrize("pattern, path, expected", [
    ("$.timestamp", "$.timestamp", True),
    ("$.timestamp", "$.timestamps", False),
    ("$.items[*].x", "$.items[3].x", True),
    ("$.items[*].x", "$.items[3].y", False),
    ("$.items[*].x", "$.items.x", False),
    ("$.*.id", "$.a.id", True),
    ("$.*.id", '$["a b"].id', True),
    ("$.*.id", "$[0].id", True),
    ("$.meta", "$.meta.time", True),
    ("$.meta", "$.meta[0]", True),
    ("$.meta", "$.metadata", False),
    ("$.meta.time", "$.meta", False),
    ("$", "$.anything[1]", True),
    ('$["a b"]', '$["a b"].c', True),
    ('$["a"]', "$.a", True),
    ("$[1]", '$["1"]', False),
    ("$.items[*]", "$.items[*].x", True),
    ("$.items[2]", "$.items[*]", False),
    ("not a path", "not a path", True),
    ("not a path", "$.a", False),
])
def test_matches(pattern, path, expected):
    assert matches(pattern, path) is expected


# --- samples ------------------------------------------------------------------------------

def test_describe_http_answer():
    raw = response(gzip.compress(json.dumps({"a": "é" * 300}, ensure_ascii=False).encode()),
                   headers=with_type(GZIP))
    described = describe_answer("http", Answer(raw))
    assert described == {"status": 200, "body": '{"a": "' + "é" * 193}
    assert describe_answer("http", Answer(response(chunks=[b"ab", b"c"], status=404)), 2) == \
        {"status": 404, "body": "ab"}
    assert describe_answer("http", Answer(response("é".encode()[:1] + b"x"))) == \
        {"status": 200, "body": "\ufffdx"}
    assert describe_answer("http", Answer(b"garbage")) == {"status": None, "body": "garbage"}


def test_describe_oversized_http_answer_decodes_what_it_has():
    raw = response(gzip.compress(b"hello " * 10000), headers=GZIP)
    answer = digested(raw, keep=200)
    assert describe_answer("http", answer, 11) == {"status": 200, "body": "hello hello"}


@pytest.mark.parametrize("reply, expected", [
    (b"$3\r\nbar\r\n", '"bar"'),
    (b"+OK\r\n", "OK"),
    (b":3\r\n", "(integer) 3"),
    (b"-ERR x\r\n", "(error) ERR x"),
    (b"*2\r\n$1\r\na\r\n$1\r\nb\r\n", '["a", "b"]'),
    (b"*-1\r\n", "(nil)"),
    (b"%1\r\n+k\r\n#t\r\n", '{k: (true)}'),
    (b"~1\r\n,1.5\r\n", "{(double) 1.5}"),
    (b"=7\r\ntxt:a\"b\r\n", '"a\\"b"'),
    (b"garbage", "garbage"),
])
def test_describe_redis_answer(reply, expected):
    assert describe_answer("redis", Answer(reply)) == {"status": None, "body": expected}


def test_describe_redis_answer_is_cut():
    reply = b"*1000\r\n" + b"$5\r\nhello\r\n" * 1000
    body = describe_answer("redis", Answer(reply), 50)["body"]
    assert body == '["hello", "hello", "hello", "hello", "hello", "hel'


@pytest.mark.parametrize("protocol, raw, expected", [
    ("http", b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n", "GET /a?b=1 HTTP/1.1"),
    ("http", b"\r\nPOST / HTTP/1.0\nA: b\n\n", "POST / HTTP/1.0"),
    ("http", b"GET /" + b"x" * 300, "GET /" + "x" * 195),
    ("redis", b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n", "SET key value"),
    ("redis", b"*2\r\n$3\r\nGET\r\n$50\r\n" + b"k" * 50 + b"\r\n", "GET " + "k" * 40 + "..."),
    ("redis", b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nva", "SET key va..."),
    ("redis", b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n", "SET key ..."),
    ("redis", b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5", "SET key ..."),
    ("redis", b"*3\r\n$3\r\nSET\r\n$3\r\nk y\r\n$0\r\n\r\n", 'SET "k y" ""'),
    ("redis", b"*2", "..."),
    ("redis", b"set key value\r\n", "set key value"),
    ("redis", b"PING\n", "PING"),
    ("redis", b"set key val", "set key val ..."),
])
def test_describe_request(protocol, raw, expected):
    assert describe_request(protocol, raw) == expected


def test_describe_request_limit():
    raw = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"
    assert describe_request("redis", raw, 6) == "SET ke"


# --- garbage, by property -----------------------------------------------------------------

HTTP_PIECES = st.sampled_from([
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"\r\n", b"\n",
    b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Encoding: gzip\r\n",
    b"Content-Encoding: deflate\r\n", b"Content-Type: application/json\r\n", b"5\r\n", b"0\r\n",
    b'{"a": [1, 2]}', b"\x1f\x8b\x08", b"x", b" ", b"\xff"])
HTTP_GARBAGE = st.lists(HTTP_PIECES, max_size=12).map(b"".join) | st.binary(max_size=60)
REDIS_PIECES = st.sampled_from([
    b"*2\r\n", b"%1\r\n", b"~1\r\n", b">1\r\n", b"|1\r\n", b"$3\r\n", b"$-1\r\n", b"*-1\r\n",
    b"+OK\r\n", b":1\r\n", b",x\r\n", b"#t\r\n", b"_\r\n", b"abc\r\n", b"\r\n", b"-E\r\n"])
REDIS_GARBAGE = st.lists(REDIS_PIECES, max_size=12).map(b"".join) | st.binary(max_size=60)


@FAST
@given(HTTP_GARBAGE, HTTP_GARBAGE, st.booleans())
def test_http_garbage_never_raises(production, shadow, digest):
    rules = Rules(headers=("content-type",), ignore=("$.a[*]",))
    compare("http", rules, Answer(production), digested(shadow) if digest else Answer(shadow))
    assert compare("http", rules, Answer(production), Answer(production)) is None
    describe_answer("http", Answer(production))
    describe_request("http", production)
    assert 0 <= body_start("http", production) <= len(production)


@FAST
@given(REDIS_GARBAGE, REDIS_GARBAGE)
def test_redis_garbage_never_raises(production, shadow):
    difference = compare("redis", BODY, Answer(production), Answer(shadow))
    if production == shadow:
        assert difference is None
    describe_answer("redis", Answer(production))
    describe_request("redis", production)
