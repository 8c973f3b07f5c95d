"""The hook watchdog: a hook that holds the event loop is interrupted after hook-timeout.

A hook stuck in a CPU loop never yields: no other connection is served and no signal is
handled, not even SIGTERM. A greenlet cannot see that (it waits for the loop too), so a
real thread looks, every quarter of hook-timeout, at two things of the thread running
gevent's hub: the loop's iteration counter (libev moves it each time the loop goes
round) and the frame executing there now. When the counter has not moved for
hook-timeout and the same hook call (the frame of the function given to `watch()`) was
executing at every look since, that hook has held the loop all along: HookTimeout is
raised in it (PyThreadState_SetAsyncExc), its frames unwind, and the hook dispatch treats
it as that hook's failure (logged with its stack; its connection only is closed). The
loop turns again, and with it every other connection and the signal handlers.

A loop held by anything else is logged with its stack, once per stall; nothing else is
interrupted. A hook suspended in a gevent-friendly wait is not running, so it is never
interrupted, however long it waits.

The thread exists only in a process that loaded hooks, and only while hook-timeout is
not 0; it wakes four times per hook-timeout and reads a counter.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import time
import traceback
from types import CodeType, FrameType
from typing import Callable

from gevent import monkey

from .settings import GLOBAL_BY_NAME

log = logging.getLogger("gproxyd.hooks")

# The originals: after monkey-patching, threading's threads would be greenlets, and a
# greenlet cannot watch the loop it waits for.
_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int

_STACK_LIMIT = 30  # innermost frames logged for a loop held outside any hook


class HookTimeout(BaseException):
    """Raised inside a hook that held the event loop longer than hook-timeout.

    A BaseException, so that a hook's `except Exception` does not swallow it."""


def _default_timeout() -> float:
    option = GLOBAL_BY_NAME["hook-timeout"]
    return option.parse(option.default)


_timeout: float = _default_timeout()
_hook_call: CodeType | None = None
_describe: Callable[[FrameType], str] = repr
_watcher: "_Watcher | None" = None
_interruption = ""  # what the last interruption was about, for the hook's failure line


def configure(timeout: float) -> None:
    """Apply hook-timeout (seconds; 0 turns the watchdog off). The lifecycle calls it at
    start and on every reload; until then the option's default applies."""
    global _timeout
    _timeout = timeout
    _start_or_stop()


def watch(hook_call: CodeType, describe: Callable[[FrameType], str]) -> None:
    """Hooks are loaded in this process: watch the loop from when it next turns (by then
    the lifecycle has configured hook-timeout: with 0, no thread is ever started).
    `hook_call` is the code of the function that calls every hook; `describe(frame)`
    names the hook, route and client of such a call's frame. Called from the thread
    running gevent's hub."""
    global _hook_call, _describe
    import gevent
    _hook_call, _describe = hook_call, describe
    gevent.get_hub().loop.run_callback(_start_or_stop)


def running() -> bool:
    """Whether the watchdog's thread is running in this process."""
    return _watcher is not None


def interruption() -> str:
    """What the last interruption was about: how long the hook held the loop."""
    return _interruption


def _start_or_stop() -> None:
    global _watcher
    if _watcher is not None and not _timeout:
        _watcher.stop()
        _watcher = None
    elif _watcher is None and _timeout and _hook_call is not None:
        import gevent
        hub = gevent.get_hub()
        _watcher = _Watcher(hub.loop, hub.thread_ident, type(hub).run.__code__)


class _Watcher:
    """The watchdog's thread and what it saw at its last look."""

    def __init__(self, loop, ident: int, hub_run: CodeType):
        self._loop, self._ident, self._hub_run = loop, ident, hub_run
        self._iteration = -1
        self._holder: FrameType | None = None  # the hook call seen executing, if any
        self._since = 0.0          # since when the loop has not turned with this holder
        self._reported = False     # this stall outside any hook has been logged
        self._interrupted = 0      # interruptions of this holder so far
        self._stopping = _allocate_lock()
        self._stopping.acquire()
        _start_thread(self._run, ())

    def stop(self) -> None:
        self._stopping.release()

    def _run(self) -> None:
        _name_thread(b"hook-watchdog")
        while not self._stopping.acquire(timeout=max(_timeout, 0.01) / 4):
            try:
                self._look(time.monotonic())
            except Exception:  # the thread must outlive a bug of its own
                log.exception("hook watchdog")
        self._holder = None

    def _look(self, now: float) -> None:
        # From reading the frame to raising the exception nothing here waits or does I/O,
        # so this thread keeps the GIL: the hub's thread executes nothing meanwhile, and
        # the exception lands where the frame was read. Logging comes after.
        iteration = self._loop.iteration
        frame = sys._current_frames().get(self._ident)
        if frame is None:
            return
        hook = None if frame.f_code is self._hub_run else _hook_call_in(frame)
        if iteration != self._iteration or frame.f_code is self._hub_run:
            # The loop turned, or is in libev (waiting for events): nothing holds it.
            self._new_holder(iteration, hook, now)
            return
        if hook is not self._holder:
            self._new_holder(iteration, hook, now)
            return
        held = now - self._since
        if held < _timeout:
            return
        if hook is not None:
            self._interrupt(hook, held, now)
        elif not self._reported:
            self._reported = True
            stack = "".join(traceback.format_stack(frame, limit=_STACK_LIMIT)).rstrip()
            log.warning("the event loop has not turned for %.1fs (hook-timeout %gs) and "
                        "no hook is running: every connection waits; it is held at:\n%s",
                        held, _timeout, stack)

    def _new_holder(self, iteration: int, hook: FrameType | None, now: float) -> None:
        self._iteration, self._holder, self._since = iteration, hook, now
        self._reported = False
        self._interrupted = 0

    def _interrupt(self, hook: FrameType, held: float, now: float) -> None:
        global _interruption
        _interruption = (f"held the event loop for more than {held:.1f}s without "
                         f"yielding (hook-timeout {_timeout:g}s)")
        _set_async_exc(self._ident, HookTimeout)
        self._since = now
        self._interrupted += 1
        if self._interrupted == 2:  # once per stall: the hook caught the first one
            log.error("%s: still holds the event loop after it was interrupted (does it "
                      "catch BaseException?); interrupting it again every %gs",
                      _describe(hook), _timeout)


def _hook_call_in(frame: FrameType) -> FrameType | None:
    """The innermost hook call on `frame`'s stack, if any."""
    while frame is not None:
        if frame.f_code is _hook_call:
            return frame
        frame = frame.f_back
    return None


def _name_thread(name: bytes) -> None:
    """Name this thread for ps/top -H (Linux; elsewhere it stays unnamed)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
