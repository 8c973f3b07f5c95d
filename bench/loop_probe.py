"""A hook module that measures how long each turn of gproxyd's event loop holds it: `hooks
= bench/loop_probe.py` on a route of its own. The first connection through that route
starts two libev watchers: a check watcher (the first to run once the poll returns: the
turn's work begins) and a prepare watcher (the last to run before the next poll: the
work is done). A turn that held the loop longer than REPORTED (wall clock) is appended
to the file BENCH_LOOP_PROBE names, as "turn MONOTONIC_SECONDS WALL_SECONDS CPU_SECONDS",
every quarter of a second: WALL is how long an event that came during it waited at most,
CPU (the thread's CPU time) is how much of that gproxyd worked, the rest being time the
machine did not run it. A garbage collection longer than REPORTED is appended as "gc
MONOTONIC_SECONDS SECONDS GENERATION" (gc.callbacks). CLOCK_MONOTONIC is the same in
every process, so the benchmark cuts the lines into its own runs' windows. The `admin`
section of bench/run.py uses it; it costs a few microseconds a turn.
"""
import gc
import os
import time

import gevent

REPORTED = 0.00025
_FLUSH_EVERY = 0.25

_state = {"watchers": None, "wall": None, "cpu": 0.0, "flushed": 0.0, "turns": [],
          "collecting": 0.0}


def _work_begins() -> None:
    _state["wall"], _state["cpu"] = time.perf_counter(), time.thread_time()


def _work_done() -> None:
    began = _state["wall"]
    if began is None:
        return
    wall = time.perf_counter() - began
    if wall > REPORTED:
        cpu = time.thread_time() - _state["cpu"]
        _state["turns"].append(f"turn {time.monotonic():.6f} {wall:.6f} {cpu:.6f}\n")
    now = time.monotonic()
    if now - _state["flushed"] > _FLUSH_EVERY:
        _state["flushed"] = now
        lines, _state["turns"] = _state["turns"], []
        if lines:
            with open(os.environ["BENCH_LOOP_PROBE"], "a") as handle:
                handle.writelines(lines)
    _state["wall"] = None


def _collecting(phase: str, info: dict) -> None:
    now = time.perf_counter()
    if phase == "start":
        _state["collecting"] = now
    elif now - _state["collecting"] > REPORTED:
        _state["turns"].append(f"gc {time.monotonic():.6f} {now - _state['collecting']:.6f} "
                               f"{info['generation']}\n")


def on_connect(conn) -> None:
    if _state["watchers"] is None:
        loop = gevent.get_hub().loop
        begins, done = loop.check(), loop.prepare()
        begins.priority, done.priority = loop.MAXPRI, loop.MINPRI
        begins.ref = done.ref = False  # they do not keep the loop running
        begins.start(_work_begins)
        done.start(_work_done)
        _state["watchers"] = (begins, done)
        _state["flushed"] = time.monotonic()
        gc.callbacks.append(_collecting)
