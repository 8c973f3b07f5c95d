"""Feeding framers the way the relay does, for the protocol tests."""
from __future__ import annotations

from hypothesis import settings

from gproxyd.protocols import ProtocolError, Upgraded

FAST = settings(max_examples=200, deadline=None)


def feed(framer, chunk: bytes) -> list:
    """Feed `chunk` as the relay does: a memoryview of a buffer reused right after."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        got = framer.feed(view)
    finally:
        view[:] = b"\xa5" * len(buf)  # nothing of it may be kept by reference
    assert got is None or (isinstance(got, list) and got), got
    return got or []


def run(framer, chunks, close: bool = False) -> tuple[list, str | None]:
    """(every item completed, including what close() completes, and the name of the
    exception that stopped the framer or None)."""
    items = []
    try:
        for chunk in chunks:
            items += feed(framer, chunk)
        if close:
            items += framer.close() or []
    except (ProtocolError, Upgraded) as exc:
        assert isinstance(exc.completed, list)
        return items + exc.completed, type(exc).__name__
    return items, None


def whole(data: bytes) -> list:
    return [data]


def bytewise(data: bytes) -> list:
    return [data[i:i + 1] for i in range(len(data))]
