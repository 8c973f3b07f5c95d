"""The ramp: every rate, every run, every target in turn; live progress; Ctrl-C; the report.

Runs go rate by rate, lowest first as given; at each rate run 1 against each target
(A, then B), then run 2, and so on, so that drift on the machine falls on both alike.
Ctrl-C drops the run under way and reports the runs finished before it (exit 0).
"""
from __future__ import annotations

import argparse
import resource
import signal
import sys
from time import monotonic

import gevent

from ..exitcodes import EX_FAILURE, EX_OK, EX_UNAVAILABLE
from . import engine, results, schedule
from .sources import Source

_PROGRESS_EVERY = 0.5  # seconds between two updates of the progress line


class Interrupted(Exception):
    """Ctrl-C: the run under way is dropped; the runs before it are reported."""


def _raise_open_files_limit(needed: int) -> None:
    """Lets the process hold NEEDED descriptors if the hard limit allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Runner:
    """One `gproxyctl replay`: owns the runs' greenlet, the progress line and the rows."""

    def __init__(self, args: argparse.Namespace, source: Source, rates: list[float]) -> None:
        self.args = args
        self.source = source
        self.rates = rates  # [] with --speed: one step, at the recorded pace
        self.targets = [str(target) for target in args.target]
        self.rows: list[dict] = []
        self.error_kinds: dict[str, dict[str, int]] = {target: {} for target in self.targets}
        self._run: gevent.Greenlet | None = None
        self._interrupted = False
        self._live: engine.Tally | None = None
        self._step = ""
        self._progress = sys.stderr.isatty()

    def main(self) -> int:
        args = self.args
        for target in args.target:
            why = engine.reachable(target, args.timeout)
            if why is not None:
                print(f"gproxyctl replay: cannot connect to {target}: {why} (is the target "
                      "up and listening there?)", file=sys.stderr)
                return EX_UNAVAILABLE
        _raise_open_files_limit(args.connections + 64)
        print(f"replaying {self.source.name} at {', '.join(self.targets)}", file=sys.stderr)
        handler = gevent.signal_handler(signal.SIGINT, self._interrupt)
        ticker = gevent.spawn(self._tick) if self._progress else None
        try:
            self._ramp()
        except Interrupted:
            self._clear_progress()
            runs = len(self.rows)
            print(f"gproxyctl replay: interrupted; {runs} whole run{'s' * (runs != 1)} "
                  "reported", file=sys.stderr)
        finally:
            handler.cancel()
            if ticker is not None:
                ticker.kill()
            self._clear_progress()
        return self._report()

    def _ramp(self) -> None:
        args = self.args
        steps = self.rates or [None]
        for step_number, rate in enumerate(steps, 1):
            for run in range(1, args.runs + 1):
                for number, address in enumerate(args.target):
                    target = self.targets[number]
                    who = f" {'AB'[number]}" if len(self.targets) > 1 else ""
                    pace = f"{rate:g} req/s" if rate is not None else f"{args.speed:g}x"
                    self._step = (f"{pace} ({step_number}/{len(steps)}), run {run}/"
                                  f"{args.runs}{who}")
                    tally = self._one_run(address, target, rate)
                    offered = rate if rate is not None else tally.scheduled / args.duration
                    self.rows.append(results.row(tally, target, offered, run, args.speed))
                    kinds = self.error_kinds[target]
                    for kind, count in tally.error_kinds.items():
                        kinds[kind] = kinds.get(kind, 0) + count

    def _one_run(self, address, target: str, rate: float | None) -> engine.Tally:
        args = self.args
        # A Host header names a host; a unix socket has none, so it is "localhost".
        requests = self.source.requests_for("localhost" if target.startswith("unix:")
                                            else target)
        if rate is None:
            plan = schedule.recorded(self.source.times, args.speed, args.duration)
        else:
            plan = schedule.uniform(rate, args.duration, len(requests))
        if self._interrupted:
            raise Interrupted
        self._run = gevent.spawn(engine.run, address, requests, plan, duration=args.duration,
                                 connections=args.connections, timeout=args.timeout,
                                 on_start=self._started)
        try:
            tally = self._run.get()
        finally:
            self._run = None
            self._live = None
        if isinstance(tally, gevent.GreenletExit):  # what a killed greenlet returns
            raise Interrupted
        return tally

    def _started(self, tally: engine.Tally) -> None:
        self._live = tally

    def _interrupt(self) -> None:
        self._interrupted = True
        if self._run is not None:
            self._run.kill(block=False)

    # --- the progress line (stderr, only on a terminal) -----------------------------------

    def _tick(self) -> None:
        shown, answered, at = None, 0, monotonic()
        while True:
            gevent.sleep(_PROGRESS_EVERY)
            tally, now = self._live, monotonic()
            if tally is None:
                continue
            if tally is not shown:  # a new run: its rate counts from its own start
                shown, answered, at = tally, 0, tally.started
            live = (tally.answered - answered) / (now - at) if now > at else 0.0
            answered, at = tally.answered, now
            elapsed = max(0.0, now - tally.started)
            sys.stderr.write(f"\r\x1b[K{self._step}: {elapsed:.1f}/{self.args.duration:g} s, "
                             f"{live:.0f} req/s, {tally.errors} errors, {tally.timeouts} "
                             "timeouts")
            sys.stderr.flush()

    def _clear_progress(self) -> None:
        if self._progress:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    # --- the report ---------------------------------------------------------------------

    def _report(self) -> int:
        """Prints the table and writes the files asked for; returns the exit status."""
        args = self.args
        if self.rows:
            sys.stdout.write(results.table(self.rows, self.targets))
        else:
            sys.stdout.write("no run finished\n")
        for target in self.targets:
            lines = results.error_lines(self.error_kinds[target])
            if lines and len(self.targets) > 1:
                lines = f"{target} " + lines
            sys.stdout.write(lines)
        sys.stdout.flush()
        path = ""
        try:
            if args.csv:
                path = args.csv
                results.write_csv(path, self.rows)
            if args.json:
                path = args.json
                results.write_json(path, self.rows)
            if args.plot and self.rows:
                from .plot import draw
                path = args.plot
                draw(path, self.rows, self.targets)
        except OSError as error:
            print(f"gproxyctl replay: cannot write {path}: {error.strerror or error}",
                  file=sys.stderr)
            return EX_FAILURE
        return EX_OK
