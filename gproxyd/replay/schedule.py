"""When each request of a run is due: the schedules, and a clock that wakes on time.

A schedule is a sequence of (offset in seconds from the run's start, index of the
request): requests go in file order, looping over the input as often as the run needs.

- At a fixed rate R the i-th request is due at i/R (uniform, open-loop).
- At a speed (`--speed 2x`, record files only) a request is due at its recorded time
  after the first record's, divided by the speed; the file is looped with one mean
  recorded gap between its last request and the first again.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Iterator

import gevent
from gevent.hub import get_hub

Schedule = Iterator[tuple[float, int]]

# Recorded times are microseconds apart at best; sums of them carry float error that
# must not add or drop a request at a run's end.
_EPSILON = 1e-7


def uniform(rate: float, duration: float, count: int) -> Schedule:
    """Request i % COUNT at i/RATE, for every i/RATE before DURATION."""
    index = 0
    while True:
        offset = index / rate
        if offset >= duration - _EPSILON:
            return
        yield offset, index % count
        index += 1


def recorded(times: tuple[float, ...], speed: float, duration: float) -> Schedule:
    """The recorded arrival pattern, SPEED times as fast, looped until DURATION."""
    first = times[0]
    # Records appended by several workers may be a little out of time order: file
    # order is kept, and a request is never due before the one ahead of it.
    offsets, latest = [], 0.0
    for stamp in times:
        latest = max(latest, stamp - first)
        offsets.append(latest)
    gap = latest / (len(times) - 1) if len(times) > 1 else 1.0
    period = (latest + gap) / speed
    lap = 0
    while True:
        for index, offset in enumerate(offsets):
            due = lap * period + offset / speed
            if due >= duration - _EPSILON:
                return
            yield due, index
        lap += 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1


class Clock:
    """Sleeps the calling greenlet until a time.monotonic() instant, on time.

    libev's epoll backend wakes timers in whole milliseconds, about 0.6 ms late on
    average: every latency counted from a scheduled time would carry that. A timerfd
    (Linux) set to the instant wakes the loop within tens of microseconds. Where there is
    none, gevent.sleep does the waiting.
    """

    def __init__(self) -> None:
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
            fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        self._fd = fd
        self._settime = libc.timerfd_settime
        self._spec = _Itimerspec()
        self._watcher = get_hub().loop.io(fd, 1)

    def sleep_until(self, instant: float) -> None:
        delay = instant - time.monotonic()
        if delay <= 0:
            return
        if self._fd < 0:
            gevent.sleep(delay)
            return
        seconds = int(instant)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = int((instant - seconds) * 1e9)
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None):
            gevent.sleep(delay)
            return
        get_hub().wait(self._watcher)
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            self._watcher.close()
            os.close(self._fd)
            self._fd = -1
