"""The bytes thrown at the http and redis observers: hand-built malformed requests and
replies (each a way a parser can be led astray), and the fuzzer's protocol-shaped
garbage (valid messages mutated, spliced, or plain random bytes)."""
from __future__ import annotations

import random

LONG = b"a" * 20000   # past observe-max-header (16 KiB)

HTTP_REQUESTS = [
    b"GET / HTTP/1.1\r\n\r\n",                                               # no Host
    b"GET / HTTP/1.1\nHost: x\n\n",                                          # bare LF
    b"GET  /  HTTP/1.1\r\nHost: x\r\n\r\n",                                  # double spaces
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"get / http/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost x\r\n\r\n",                                     # no colon
    b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",                                   # leading space
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",                      # obs-fold
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nabcdefg",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nab",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=\"x\r\nab\r\n0\r\n"
    b"Trailer garbage\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
    b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    b"GET /\r\n\r\n",                                                        # HTTP/0.9
    b"\xff\xfe / HTTP/1.1\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n\x16\x03\x01\x00\x05hello",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    b"\x81\x85\x00\x00\x00\x00hello",
    b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage\r\n\r\nGET /2 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + LONG + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(300)) + b"\r\n",
    b"\r\n\r\n\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\ntrailing bytes",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r",                                      # cut in the end
]

HTTP_REPLIES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef",                  # extra bytes
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",                   # short, then EOF
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 999 Weird\r\n\r\n",
    b"HTTP/1.1 200\r\n\r\nbody until close",
    b"HTTP/1.0 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    b"garbage\r\n\r\n",
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\x00\xffbinary",
    b"HTTP/1.1 200 OK\r\nX-Long: " + LONG + b"\r\nContent-Length: 0\r\n\r\n",
    b"\x00" * 100,
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n\r\n\x1f\x8b",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
]

RESP_COMMANDS = [
    b"*-5\r\n",
    b"*2\r\n$-2\r\nab\r\n",
    b"*1\r\n$3\r\nGETX\r\n",                       # bulk longer than declared
    b"*1\r\n$10\r\nGET\r\n",                       # shorter
    b"*abc\r\n",
    b"PING\r\n",                                   # inline
    b"PING\n",
    b"*1\r\n:1\r\n",
    b"*3\r\n$3\r\nSET\r\n",                        # cut short
    b"*99999999999\r\n",
    b"$5\r\nhello\r\n",
    b"\r\n\r\n\r\n",
    b"*1\r\n*1\r\n*1\r\n$4\r\nPING\r\n",
    b"%1\r\n+a\r\n+b\r\n",
    b"\x00\xff*1\r\n",
    b"*2\r\n$4\r\nECHO\r\n$" + b"%d" % len(LONG) + b"\r\n" + LONG + b"\r\n",
    b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPI",         # pipelined, the second cut
]

RESP_REPLIES = [
    b"+OK",
    b"$5\r\nhi\r\n",
    b"$-5\r\n",
    b"*2\r\n:1\r\n",
    b"!3\r\nerr\r\n",
    b"=5\r\ntxt:a\r\n",
    b"~1\r\n+a\r\n",
    b">2\r\n+a\r\n+b\r\n",
    b"_\r\n",
    b",inf\r\n",
    b"(123456789012345678901234567890\r\n",
    b"|1\r\n+a\r\n+b\r\n+OK\r\n",
    b"?garbage\r\n",
    b"*-1\r\n*3\r\n",
    b"*1\r\n" * 200 + b":1\r\n",
    b"-ERR\r\n-ERR\r\n-ERR\r\n+extra\r\n",
]


def malformed(requests: list[bytes], replies: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every request and every reply at least once, paired in turn."""
    count = max(len(requests), len(replies))
    return [(requests[n % len(requests)], replies[n % len(replies)]) for n in range(count)]


# -- the fuzzer ------------------------------------------------------------------------------

HTTP_SEEDS = [
    b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
]
HTTP_REPLY_SEEDS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 304 Not Modified\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
]
RESP_SEEDS = [
    b"*1\r\n$4\r\nPING\r\n",
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n",
    b"PING\r\nPING\r\n",
    b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n",
    b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
]
RESP_REPLY_SEEDS = [
    b"+PONG\r\n", b"-ERR no\r\n", b":42\r\n", b"$5\r\nhello\r\n", b"$-1\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"%1\r\n+k\r\n+v\r\n", b"_\r\n", b",1.5\r\n",
    b"#t\r\n", b"~2\r\n+a\r\n+b\r\n", b">2\r\n+pubsub\r\n+x\r\n", b"*-1\r\n",
    b"=7\r\ntxt:abc\r\n", b"(99999999999999999999\r\n", b"!5\r\nerror\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b"-1", b"0", b"99999999999999999999", b"4294967296",
          b"*", b"$", b":", b"+", b"-", b"%", b"~", b">", b"|", b"0\r\n\r\n",
          b"Content-Length: ", b"Transfer-Encoding: chunked\r\n", b"\x00", b" ", b"\t",
          b"HTTP/1.1 ", b"Connection: close\r\n", b"Upgrade: x\r\n", b"*1\r\n" * 50]


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        at = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 2 and buf:
            del buf[at:at + rng.randint(1, 16)]
        elif op == 3 and buf:
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start:start + rng.randint(1, 64)] * rng.randint(1, 4)
        elif op == 4:
            buf[at:at] = rng.choice(TOKENS)
        elif op == 5:
            other = rng.choice(seeds)
            buf[at:] = other[rng.randint(0, len(other)):]
        else:
            buf[at:at] = str(rng.choice((-1, 0, 1, 2 ** 31, 2 ** 63, 10 ** 30))).encode()
    return bytes(buf[:65536])


def fuzz_case(rng: random.Random, seeds: list[bytes]) -> bytes:
    """10% random bytes, 20% valid messages (a pipeline of 1-4), 70% mutated ones."""
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.randint(0, 2048))
    message = b"".join(rng.choice(seeds) for _ in range(rng.randint(1, 4)))
    return message if kind < 0.3 else mutate(rng, message, seeds)


def fuzz_replies(seed: int, seeds: list[bytes], count: int = 2048) -> list[bytes]:
    rng = random.Random(seed)
    return [fuzz_case(rng, seeds) for _ in range(count)]
