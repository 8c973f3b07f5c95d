"""A ready-made hooks module: `hooks = gproxyd.trace` logs every chunk both ways.

For looking at a protocol on the wire without a packet capture: each chunk is logged
(at info level, on the "gproxyd.trace" logger) with its direction, size and first
bytes, and relayed unchanged. It costs a Python call per chunk: a debugging aid, not
something to leave on under load.
"""
from __future__ import annotations

import logging

log = logging.getLogger("gproxyd.trace")

PREVIEW = 120  # bytes shown per chunk


def on_connect(conn) -> None:
    log.info("route %s client %s: connected", conn.route, conn.client)


def on_data(conn, data: bytes) -> bytes:
    log.info("route %s client %s -> %d bytes: %r", conn.route, conn.client, len(data),
             data[:PREVIEW])
    return data


def on_response(conn, backend: str, data: bytes) -> bytes:
    log.info("route %s client %s <- %s %d bytes: %r", conn.route, conn.client, backend,
             len(data), data[:PREVIEW])
    return data


def on_finish(conn, backend: str) -> None:
    log.info("route %s client %s: %s finished", conn.route, conn.client, backend)
