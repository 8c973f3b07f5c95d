"""beanstalkd: what the beanstalkd archive costs and what it saves. puts/s, put latency and
reserve latency straight to beanstalkd, through gproxyd passing beanstalkd through, and
through gproxyd archiving far-future puts in SQLite and in MariaDB; then beanstalkd's
memory holding a million far-future jobs itself, against gproxyd archiving them.

The load generator is in this module too: run as `python3 -c GENERATOR` in processes of
its own (raw sockets, a selector over its connections), it writes what it measured to a
JSON file."""
from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

from .. import BENCH_DIR, BenchError
from ..configs import gproxyd_conf
from ..processes import last_line, log_tail, wait_listening
from ..procfs import free_port, tree_cpu_seconds, tree_cpu_times, tree_rss_kib
from ..rig import Rig
from ..section import Section, per
from ..source import check_config, gproxyd_available, gproxyd_env
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target

ROUTE = "jobs"
DIRECT, PASS, SQLITE, MYSQL = ("beanstalkd-direct", "beanstalkd-pass", "beanstalkd-sqlite",
                               "beanstalkd-mysql")
TARGETS = (DIRECT, PASS, SQLITE, MYSQL)
ARCHIVED = (SQLITE, MYSQL)
COLUMNS = {DIRECT: "direct", PASS: "pass-through", SQLITE: "SQLite archive",
           MYSQL: "MariaDB archive"}
ARCHIVE_AFTER = "1m"
PUT_DELAY = 3600           # above archive-after: archived, or kept delayed by beanstalkd
BODY = b"gproxyd benchmark job " + b"x" * 78   # 100 bytes
LOAD_PROCESSES = 2         # generator processes (fewer when there are fewer connections)
IO_TIMEOUT = 30.0          # seconds the generator waits for any reply before it gives up
SETTLE_SECONDS = 10.0      # for /stats' `archived` (refreshed once a second) to catch up
BUSY = 0.9                 # the machine's CPUs busy above this share: a CPU-bound row
# The MySQL/MariaDB server of the archived runs (a database of its own is created for
# each run and dropped at the end); user and password URL-encoded.
MYSQL_SERVER = os.environ.get("BENCH_MYSQL", "mysql://root@127.0.0.1:3306")
DATABASE = f"gproxyd_bench_{os.getpid()}"

# Reserve latency: this many ready jobs put through the route (pipelined), then one
# consumer reserves and deletes them one at a time.
RESERVE_JOBS = 20_000
QUICK_RESERVE_JOBS = 5_000
FILL_DEPTH = 100

# Memory: this many far-future jobs put straight into beanstalkd, and through gproxyd
# into an SQLite archive. BENCH_BEANSTALKD_JOBS overrides the count (an archived put is
# an SQLite commit, synced to disk: ~2,000 a second here, so a million take minutes).
MILLION_JOBS = 1_000_000
QUICK_MILLION_JOBS = 50_000
MILLION_DELAY = 86400
MILLION_TARGETS = (DIRECT, SQLITE)
MILLION_CONNECTIONS = 4
MILLION_DEPTH = 64
MILLION_RUNS = 1           # each takes minutes


@dataclass(frozen=True)
class Load:
    """CONNECTIONS connections, each with DEPTH puts in flight (1: request-reply),
    against TARGETS."""
    name: str
    connections: int
    depth: int
    targets: tuple[str, ...] = TARGETS

    @property
    def label(self) -> str:
        return (f"{self.connections} connections, request-reply" if self.depth == 1 else
                f"{self.connections} connections, {self.depth} puts in flight each")


# Not pipelined into the archives: gproxyd commits archived puts one at a time, so puts in
# flight only wait longer for their turn (same puts/s, p50 ~100 ms), and those runs would
# push the section past 15 minutes.
LOADS = (Load("c4", 4, 1), Load("c16", 16, 1), Load("c16-p16", 16, 16, (DIRECT, PASS)))

GENERATOR = ("import sys\n"
             "from gpbench.sections.beanstalkd import generator_main\n"
             "sys.exit(generator_main(sys.argv[1:]))\n")

# Runs with the interpreter and source of the gproxyd being measured, which needs PyMySQL
# for its archive anyway (the bench itself stays stdlib-only). Reads JSON on stdin.
MYSQL_SCRIPT = ("import json, sys, pymysql\n"
                "order = json.load(sys.stdin)\n"
                "connection = pymysql.connect(connect_timeout=10, **order['server'])\n"
                "with connection.cursor() as cursor:\n"
                "    for statement in order['statements']:\n"
                "        cursor.execute(statement)\n"
                "connection.close()\n")


def reserve_jobs(rig: Rig) -> int:
    return QUICK_RESERVE_JOBS if rig.args.quick else RESERVE_JOBS


def million_jobs(rig: Rig) -> int:
    """The count of the memory runs: BENCH_BEANSTALKD_JOBS, or the default."""
    given = os.environ.get("BENCH_BEANSTALKD_JOBS", "")
    if given:
        return int(given)
    return QUICK_MILLION_JOBS if rig.args.quick else MILLION_JOBS


def jobs_error() -> str:
    """'' or what is wrong with BENCH_BEANSTALKD_JOBS."""
    given = os.environ.get("BENCH_BEANSTALKD_JOBS", "")
    if given and (not given.isdigit() or not int(given)):
        return (f"BENCH_BEANSTALKD_JOBS: bad count {given!r} (expected a whole number above "
                "0, e.g. 1000000)")
    return ""


class Beanstalkd(Section):
    name = "beanstalkd"
    summary = ("the beanstalkd archive: puts/s, put and reserve latency direct, through "
               "gproxyd passing through, archiving in SQLite and in MariaDB; beanstalkd's "
               "RSS with 1,000,000 far-future jobs, direct vs archived")

    def prepare(self, rig: Rig) -> None:
        self.beanstalkd: subprocess.Popen | None = None   # the current run's
        self.beanstalkd_port = 0
        self.admins: dict[str, int] = {}                  # target -> its admin port
        self.archives: dict[str, str] = {}                # target -> this run's archive URL
        self.sqlite_path = ""                             # this run's SQLite file
        self.fresh_runs = 0
        self.version = ""
        self.mysql_error = ""
        if jobs_error():  # before anything starts (close() removes the directory)
            rig.close()
            sys.exit(f"bench: {jobs_error()}")

    def run(self, rig: Rig) -> None:
        error = "" if shutil.which("beanstalkd") else \
            "beanstalkd not found (apt-get install beanstalkd)"
        if not error:
            done = subprocess.run(["beanstalkd", "-v"], capture_output=True, text=True,
                                  timeout=10)
            self.version = last_line(done)
        gproxyd_error = error or gproxyd_available(rig.gproxyd_source)
        self.mysql_error = gproxyd_error or self.recreate_database(rig)
        server = urlsplit(MYSQL_SERVER)
        database = f"{server.hostname}:{server.port or 3306}"
        descriptions = {
            DIRECT: f"client straight to beanstalkd ({self.version or 'n/a'}, in memory, no "
                    "binlog; a fresh one per run)",
            PASS: "gproxyd, protocol = beanstalkd, no archive (pass-through)",
            SQLITE: f"gproxyd, protocol = beanstalkd, archive = sqlite (a fresh file per run "
                    f"in the temporary directory), archive-after = {ARCHIVE_AFTER}",
            MYSQL: f"gproxyd, protocol = beanstalkd, archive = MariaDB/MySQL at {database} "
                   f"(database {DATABASE}, created afresh per run, dropped at the end), "
                   f"archive-after = {ARCHIVE_AFTER}"}
        for name in TARGETS:
            rig.targets[name] = Target(name, descriptions[name])
            rig.targets[name].error = (error if name == DIRECT else
                                       self.mysql_error if name == MYSQL else gproxyd_error)
            if rig.targets[name].error:
                print(f"{name}: n/a: {rig.targets[name].error}", file=sys.stderr)
        try:
            for load in LOADS:
                rig.interleaved(f"beanstalkd-put-{load.name}", list(load.targets),
                                lambda target, load=load: self.measure_puts(rig, target, load))
            rig.interleaved("beanstalkd-reserve", list(TARGETS),
                            lambda target: self.measure_reserve(rig, target))
            rig.interleaved("beanstalkd-million", list(MILLION_TARGETS),
                            lambda target: self.measure_million(rig, target), MILLION_RUNS)
        finally:
            if not self.mysql_error:
                try:
                    self.mysql(rig, [f"DROP DATABASE IF EXISTS {DATABASE}"])
                except BenchError as drop_error:
                    rig.notes.append(f"beanstalkd: cannot drop database {DATABASE}: "
                                     f"{drop_error}")

    # -- the servers, afresh for every run

    @contextmanager
    def fresh(self, rig: Rig, target: Target) -> Iterator[None]:
        """A fresh beanstalkd, and for a gproxyd target a fresh gproxyd (with its admin
        endpoint, and its archive: a new SQLite file or a recreated database) in front of
        it; target.http_port is where clients connect. Everything is stopped, and the
        SQLite file removed, when the block ends."""
        self.fresh_runs += 1
        try:
            self.beanstalkd_port = self.start_beanstalkd(rig)
            target.http_port = self.beanstalkd_port
            if target.name != DIRECT:
                self.archives[target.name] = self.new_archive(rig, target.name)
                self.start_gproxyd(rig, target)
            yield
        finally:
            if target.proc:
                rig.procs.stop(target.proc)
                target.proc = None
            if self.beanstalkd:
                rig.procs.stop(self.beanstalkd)
                self.beanstalkd = None
            if self.sqlite_path:
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(self.sqlite_path + suffix):
                        os.unlink(self.sqlite_path + suffix)
                self.sqlite_path = ""

    def start_beanstalkd(self, rig: Rig) -> int:
        """A beanstalkd of its own (in memory), on a free port; another try when another
        job took the port first."""
        for attempt in range(3):
            port = free_port()
            proc, log = rig.procs.start(f"beanstalkd-{self.fresh_runs}",
                                        ["beanstalkd", "-l", "127.0.0.1", "-p", str(port)],
                                        cpus=rig.load_cpus)
            self.beanstalkd = proc
            try:
                wait_listening([port], proc, log)
                return port
            except BenchError as error:
                rig.procs.stop(proc)
                self.beanstalkd = None
                if "in use" not in str(error) or attempt == 2:
                    raise BenchError(f"beanstalkd: {error}") from None
        raise AssertionError("unreachable")

    def new_archive(self, rig: Rig, name: str) -> str:
        """This run's archive URL for target NAME ('' for none): a new SQLite file, or
        the MariaDB database dropped and created again."""
        if name == SQLITE:
            self.sqlite_path = os.path.join(rig.workdir, f"archive-{self.fresh_runs}.db")
            return "sqlite:///" + self.sqlite_path
        if name == MYSQL:
            self.recreate_database(rig, raise_error=True)
            server = urlsplit(MYSQL_SERVER)
            return f"{server.scheme}://{server.netloc}/{DATABASE}"
        return ""

    def start_gproxyd(self, rig: Rig, target: Target) -> None:
        """A gproxyd of its own for TARGET (target.proc, until fresh() stops it): one
        protocol = beanstalkd route in front of this run's beanstalkd, with the target's
        archive; its admin endpoint in self.admins. A port taken by another job between
        free_port() and the bind costs another try."""
        for attempt in range(3):
            try:
                self._start_gproxyd(rig, target)
                return
            except BenchError as error:
                if target.proc:
                    rig.procs.stop(target.proc)
                    target.proc = None
                if "in use" not in str(error) or attempt == 2:
                    raise

    def _start_gproxyd(self, rig: Rig, target: Target) -> None:
        target.http_port, admin = free_port(), free_port()
        lines = ["protocol = beanstalkd"]
        if self.archives[target.name]:
            lines += [f"archive = {self.archives[target.name]}",
                      f"archive-after = {ARCHIVE_AFTER}"]
        conf = os.path.join(rig.workdir, f"{target.name}.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf(("drain-timeout = 1s",),
                                      [(ROUTE, target.http_port, self.beanstalkd_port,
                                        tuple(lines))],
                                      admin=f"127.0.0.1:{admin}"))
        source = rig.gproxyd_source
        check_config(conf, source)
        target.proc, target.log = rig.procs.start(
            f"{target.name}-{self.fresh_runs}", [sys.executable, "-m", "gproxyd", "-c", conf],
            cpus=rig.proxy_cpus, env=gproxyd_env(source), cwd=source)
        wait_listening([target.http_port, admin], target.proc, target.log)
        self.admins[target.name] = admin

    def recreate_database(self, rig: Rig, raise_error: bool = False) -> str:
        """Drop and create DATABASE; '' or why not (raised as BenchError if RAISE_ERROR)."""
        try:
            self.mysql(rig, [f"DROP DATABASE IF EXISTS {DATABASE}",
                             f"CREATE DATABASE {DATABASE}"])
        except BenchError as error:
            if raise_error:
                raise
            return f"MariaDB/MySQL at {hide_password(MYSQL_SERVER)}: {error}"
        return ""

    def mysql(self, rig: Rig, statements: list[str]) -> None:
        """Run STATEMENTS on the MYSQL_SERVER (BenchError with its last line if one fails)."""
        server = urlsplit(MYSQL_SERVER)
        order = {"server": {"host": server.hostname or "127.0.0.1",
                            "port": server.port or 3306,
                            "user": unquote(server.username or "root"),
                            "password": unquote(server.password or "")},
                 "statements": statements}
        source = rig.gproxyd_source
        try:
            done = subprocess.run([sys.executable, "-c", MYSQL_SCRIPT], input=json.dumps(order),
                                  capture_output=True, text=True, timeout=60, cwd=source,
                                  env=gproxyd_env(source))
        except subprocess.TimeoutExpired:
            raise BenchError("the MySQL statements did not finish within 60 s") from None
        if done.returncode != 0:
            raise BenchError(last_line(done))

    # -- measuring

    def measure_puts(self, rig: Rig, target: Target, load: Load) -> dict[str, Any]:
        with self.fresh(rig, target):
            servers, machine = self.cpu(target), cpu_ticks()
            results = generate(rig, target.name, target.http_port, load.connections,
                               ["put", "--depth", str(load.depth), "--delay", str(PUT_DELAY),
                                "--seconds", f"{rig.args.duration:g}"],
                               timeout=rig.args.duration + 60)
            values = merged_puts(results)
            values["machine_busy"] = busy_since(machine)
            values.update(self.cpu_per(target, servers, values["puts"]))
            values.update(self.checks(target, values["puts"]))
        return values

    def measure_reserve(self, rig: Rig, target: Target) -> dict[str, Any]:
        jobs = reserve_jobs(rig)
        with self.fresh(rig, target):
            servers, machine = self.cpu(target), cpu_ticks()
            (result,) = generate(rig, target.name, target.http_port, 1,
                                 ["reserve", "--count", str(jobs)], timeout=60 + jobs / 50)
            if result["errors"]:
                raise BenchError(f"{result['errors']} unexpected replies, the first: "
                                 f"{result['first_error']}")
            values = {"jobs": result["reserves"],
                      "fill_rps": result["fill_puts"] / result["fill_seconds"],
                      "rps": result["reserves"] / result["seconds"],
                      **percentiles(histogram(result["reserve_us"]), "reserve"),
                      **percentiles(histogram(result["delete_us"]), "delete"),
                      "load_cpu_us": per(result["cpu"], jobs),
                      "machine_busy": busy_since(machine)}
            values.update(self.cpu_per(target, servers, jobs))
            stats = beanstalkd_stats(self.beanstalkd_port)
            values["ready_left"] = int(stats["current-jobs-ready"])
            values["total_jobs"] = int(stats["total-jobs"])
        return values

    def measure_million(self, rig: Rig, target: Target) -> dict[str, Any]:
        count = million_jobs(rig)
        values: dict[str, Any] = {"jobs": count}
        with self.fresh(rig, target):
            beanstalkd_pid = self.beanstalkd.pid
            values["beanstalkd_rss_before_kib"] = tree_rss_kib(beanstalkd_pid)
            if target.pid:
                values["gproxyd_rss_before_kib"] = tree_rss_kib(target.pid)
            servers, machine = self.cpu(target), cpu_ticks()
            results = generate(rig, target.name, target.http_port, MILLION_CONNECTIONS,
                               ["put", "--depth", str(MILLION_DEPTH), "--delay",
                                str(MILLION_DELAY), "--count", str(count)],
                               timeout=120 + count / 100)
            puts = merged_puts(results)
            values.update(seconds=puts["seconds"], rps=puts["rps"], puts=puts["puts"],
                          errors=puts["errors"], load_cpu_us=puts["load_cpu_us"],
                          machine_busy=busy_since(machine))
            if puts["errors"]:
                values["first_error"] = puts["first_error"]
            values.update(self.cpu_per(target, servers, puts["puts"]))
            values.update(tenths(results, count))
            values.update(self.checks(target, puts["puts"]))
            values["beanstalkd_rss_kib"] = tree_rss_kib(beanstalkd_pid)
            if target.pid:
                values["gproxyd_rss_kib"] = tree_rss_kib(target.pid)
            if self.sqlite_path:
                values["sqlite_bytes"] = sqlite_bytes(self.sqlite_path)
                # Stopped, gproxyd checkpoints the write-ahead log into the file.
                rig.procs.stop(target.proc)
                target.proc = None
                values["sqlite_stopped_bytes"] = sqlite_bytes(self.sqlite_path)
        return values

    def cpu(self, target: Target) -> tuple[float, float, float]:
        """CPU seconds so far of beanstalkd, and of gproxyd in user space and in the
        kernel (0 for a direct target)."""
        return (tree_cpu_seconds(self.beanstalkd.pid),
                *(tree_cpu_times(target.pid) if target.pid else (0.0, 0.0)))

    def cpu_per(self, target: Target, before: tuple[float, float, float],
                count: int) -> dict[str, Any]:
        after = self.cpu(target)
        values = {"beanstalkd_cpu_us": per(after[0] - before[0], count)}
        if target.pid:
            values["gproxyd_cpu_us"] = per(sum(after[1:]) - sum(before[1:]), count)
            values["gproxyd_user_us"] = per(after[1] - before[1], count)
        return values

    def checks(self, target: Target, puts: int) -> dict[str, Any]:
        """What beanstalkd holds after PUTS far-future puts (current-jobs-delayed: they
        all for direct and pass-through, none when archived), and for an archive its
        /stats block (archived_total must be PUTS; archived once it caught up)."""
        stats = beanstalkd_stats(self.beanstalkd_port)
        values: dict[str, Any] = {"delayed": int(stats["current-jobs-delayed"]),
                                  "total_jobs": int(stats["total-jobs"])}
        if target.name in ARCHIVED:
            deadline = time.monotonic() + SETTLE_SECONDS
            while True:
                block = archive_block(self.admins[target.name], target)
                if block["archived"] == block["archived_total"] == puts \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            values.update(archived=block["archived"], archived_total=block["archived_total"],
                          injected_total=block["injected_total"],
                          inject_failures=block["inject_failures"])
        return values

    # -- the report

    def column(self, rig: Rig, names: tuple[str, ...], metric: str) -> list[float | None]:
        return [rig.median(name, metric) for name in names]

    def put_table(self, rig: Rig) -> list[list[str]]:
        rows = [["metric (median)"] + [COLUMNS[name] for name in TARGETS]
                + [f"{COLUMNS[name]}/direct" for name in TARGETS[1:]]]
        for load in LOADS:
            rows.append([f"{load.label}:"]
                        + [""] * (2 * len(TARGETS) - 1))
            for metric, label, digits, ratios in (
                    ("rps", "puts/s", 0, True),
                    ("p50_ms", "p50 put ms", 3, True),
                    ("p99_ms", "p99 put ms", 3, True),
                    ("gproxyd_cpu_us", "gproxyd CPU us/put", 1, False),
                    ("gproxyd_user_us", "...of which user space", 1, False),
                    ("beanstalkd_cpu_us", "beanstalkd CPU us/put", 1, False),
                    ("load_cpu_us", "load generator CPU us/put", 1, False),
                    ("machine_busy", "machine's CPUs busy", 2, False),
                    ("errors", "replies other than INSERTED", 0, False)):
                values = self.column(rig, TARGETS, f"beanstalkd-put-{load.name}.{metric}")
                cells = [fmt(v, digits) if name in load.targets else "-"
                         for name, v in zip(TARGETS, values, strict=True)]
                rows.append([f"  {label}"] + cells
                            + ([ratio(v, values[0]) if name in load.targets else "-"
                                for name, v in zip(TARGETS[1:], values[1:], strict=True)]
                               if ratios else [""] * (len(TARGETS) - 1)))
        return rows

    def put_checks(self, rig: Rig) -> list[str]:
        """Per target and load, each run's puts against what beanstalkd and /stats hold."""
        lines = []
        for load in LOADS:
            measurement = f"beanstalkd-put-{load.name}"
            for name in load.targets:
                runs = runs_of(rig, name, measurement)
                if not runs:
                    continue
                puts = [values["puts"] for values in runs]
                delayed = [values["delayed"] for values in runs]
                shown = f"puts {slashed(puts)}, beanstalkd current-jobs-delayed {slashed(delayed)}"
                if name in ARCHIVED:
                    totals = [values.get("archived_total") for values in runs]
                    archived = [values.get("archived") for values in runs]
                    passed = totals == puts and archived == puts and not any(delayed)
                    shown += (f", /stats archived_total {slashed(totals)}, archived "
                              f"{slashed(archived)}")
                    expected = "archived_total = archived = puts, nothing delayed in beanstalkd"
                else:
                    passed = delayed == puts
                    expected = "every put delayed in beanstalkd"
                lines.append(f"{load.name} {COLUMNS[name]}: {shown} per run: "
                             + ("ok" if passed else f"MISMATCH (expected {expected})"))
        return lines

    def reserve_table(self, rig: Rig) -> list[list[str]]:
        rows = [["metric (median)"] + [COLUMNS[name] for name in TARGETS]
                + [f"{COLUMNS[name]}/direct" for name in TARGETS[1:]]]
        for metric, label, digits, ratios in (
                ("jobs", "jobs reserved and deleted", 0, False),
                ("fill_rps", f"ready puts/s (filling, {FILL_DEPTH} in flight)", 0, True),
                ("rps", "reserve+delete per second", 0, True),
                ("reserve_p50_ms", "p50 reserve ms", 3, True),
                ("reserve_p99_ms", "p99 reserve ms", 3, True),
                ("delete_p50_ms", "p50 delete ms", 3, True),
                ("delete_p99_ms", "p99 delete ms", 3, True),
                ("gproxyd_cpu_us", "gproxyd CPU us per job (put, reserve, delete)", 1, False),
                ("gproxyd_user_us", "...of which user space", 1, False),
                ("beanstalkd_cpu_us", "beanstalkd CPU us per job", 1, False),
                ("load_cpu_us", "load generator CPU us per job", 1, False),
                ("machine_busy", "machine's CPUs busy", 2, False),
                ("ready_left", "beanstalkd current-jobs-ready after", 0, False)):
            values = self.column(rig, TARGETS, f"beanstalkd-reserve.{metric}")
            rows.append([label] + [fmt(v, digits) for v in values]
                        + ([ratio(v, values[0]) for v in values[1:]] if ratios
                           else [""] * (len(TARGETS) - 1)))
        return rows

    def million_table(self, rig: Rig) -> list[list[str]]:
        rows = [[f"{million_jobs(rig):,} jobs delayed {MILLION_DELAY} s"]
                + [COLUMNS[name] for name in MILLION_TARGETS]]
        for metric, label, digits, scale in (
                ("puts", "puts answered INSERTED", 0, 1),
                ("seconds", "seconds for them", 1, 1),
                ("rps", "puts/s", 0, 1),
                ("rps_first", "puts/s, first tenth", 0, 1),
                ("rps_last", "puts/s, last tenth", 0, 1),
                ("beanstalkd_rss_before_kib", "beanstalkd RSS before, MiB", 1, 1024),
                ("beanstalkd_rss_kib", "beanstalkd RSS after, MiB", 1, 1024),
                ("gproxyd_rss_before_kib", "gproxyd RSS before, MiB", 1, 1024),
                ("gproxyd_rss_kib", "gproxyd RSS after, MiB", 1, 1024),
                ("sqlite_bytes", "SQLite file + -wal + -shm, MiB", 1, 1 << 20),
                ("sqlite_stopped_bytes", "SQLite file after gproxyd stopped, MiB", 1, 1 << 20),
                ("gproxyd_cpu_us", "gproxyd CPU us/put", 1, 1),
                ("gproxyd_user_us", "...of which user space", 1, 1),
                ("beanstalkd_cpu_us", "beanstalkd CPU us/put", 1, 1),
                ("load_cpu_us", "load generator CPU us/put", 1, 1),
                ("machine_busy", "machine's CPUs busy", 2, 1),
                ("delayed", "beanstalkd current-jobs-delayed", 0, 1),
                ("archived_total", "/stats archived_total", 0, 1),
                ("archived", "/stats archived", 0, 1)):
            values = self.column(rig, MILLION_TARGETS, f"beanstalkd-million.{metric}")
            rows.append([label] + [fmt(v / scale if v is not None else None, digits)
                                   for v in values])
        return rows

    def million_lines(self, rig: Rig) -> list[str]:
        lines = []
        direct = rig.median(DIRECT, "beanstalkd-million.beanstalkd_rss_kib")
        archived = rig.median(SQLITE, "beanstalkd-million.beanstalkd_rss_kib")
        count = million_jobs(rig)
        if direct is not None and archived is not None:
            lines.append(f"beanstalkd RSS with the jobs kept by beanstalkd: {direct / 1024:.0f} "
                         f"MiB ({direct * 1024 / count:.0f} bytes/job); archived: "
                         f"{archived / 1024:.1f} MiB")
        size = rig.median(SQLITE, "beanstalkd-million.sqlite_stopped_bytes")
        if size is not None:
            lines.append(f"SQLite archive: {size / count:.0f} bytes/job on disk")
        for name in MILLION_TARGETS:
            for values in runs_of(rig, name, "beanstalkd-million"):
                if values.get("rps_tenths"):
                    lines.append(f"{COLUMNS[name]}: puts/s in each tenth of the puts: "
                                 + ", ".join(fmt(rate, 0) for rate in values["rps_tenths"]))
                ok = (values["puts"] == count and not values["errors"]
                      and (values["delayed"] == count if name == DIRECT else
                           values["delayed"] == 0
                           and values.get("archived_total") == values.get("archived") == count))
                lines.append(f"{COLUMNS[name]}: {values['puts']:,} of {count:,} puts INSERTED "
                             f"in {values['seconds']:,.1f} s, {values['errors']} other replies"
                             + (f" (first: {values['first_error']})" if values.get("first_error")
                                else "")
                             + (": ok" if ok else ": MISMATCH"))
        return lines

    def bottleneck_lines(self, rig: Rig) -> list[str]:
        """The put rows this machine's CPUs limit, and who used them."""
        lines = []
        for load in LOADS:
            for name in load.targets:
                measurement = f"beanstalkd-put-{load.name}"
                busy = rig.median(name, f"{measurement}.machine_busy")
                if busy is None or busy < BUSY:
                    continue
                users = [(rig.median(name, f"{measurement}.{metric}"), who) for metric, who in
                         (("load_cpu_us", "the load generator"),
                          ("beanstalkd_cpu_us", "beanstalkd"), ("gproxyd_cpu_us", "gproxyd"))]
                lines.append(f"{load.name} {COLUMNS[name]}: the machine's CPUs were {busy:.0%} "
                             "busy, so this row is CPU-bound on this machine; per put: "
                             + ", ".join(f"{who} {value:.1f} us" for value, who in users
                                         if value is not None))
        return lines

    def chapter(self, rig: Rig) -> list[str]:
        return ["", "## beanstalkd archive", "",
                f"One `protocol = beanstalkd` route in front of a beanstalkd "
                f"({self.version or 'n/a'}, in memory). A fresh beanstalkd, gproxyd (with its "
                "admin endpoint) and archive (a new SQLite file; the MariaDB database dropped "
                "and created again) for every run. The load generator is raw sockets in "
                f"up to {LOAD_PROCESSES} processes of its own, each running a selector over "
                f"its connections; jobs have {len(BODY)}-byte bodies.", "",
                f"Puts: {rig.args.runs} interleaved runs of {rig.args.duration:g} s per load, "
                f"every put delayed {PUT_DELAY} s: above archive-after ({ARCHIVE_AFTER}), so the "
                "archived targets keep every job out of beanstalkd (each put is a committed "
                "transaction before INSERTED: an fsync for SQLite, a commit for InnoDB), "
                "direct and pass-through leave them delayed in beanstalkd. The pipelined "
                "load (16 puts in flight) runs against direct and pass-through only: gproxyd "
                "commits archived puts one at a time, so more in flight would only queue "
                "longer ('-' in the table). Latency is from "
                "the put's write to its INSERTED; CPU is utime+stime during the run over "
                "puts (the generator's too); the machine's CPUs busy is the share of all CPU time "
                "(/proc/stat, I/O wait counted as idle) that was busy during the run.", "",
                markdown_table(self.put_table(rig)), "",
                *[f"- {line}" for line in self.put_checks(rig) + self.bottleneck_lines(rig)],
                "", f"Reserve: {reserve_jobs(rig):,} ready jobs (delay 0: never archived) put "
                f"through the target, {FILL_DEPTH} in flight, then one consumer connection "
                "reserves (`reserve-with-timeout 5`) and deletes them one at a time: the "
                "round trip of each reserve (until the whole job is read) and each delete.",
                "", markdown_table(self.reserve_table(rig)), "",
                f"Memory: {million_jobs(rig):,} puts delayed {MILLION_DELAY} s over "
                f"{MILLION_CONNECTIONS} connections with {MILLION_DEPTH} puts in flight each, "
                "straight into beanstalkd and through gproxyd into an SQLite archive "
                f"({MILLION_RUNS} run each); RSS is VmRSS from /proc. The rates of each "
                "tenth of the puts show whether the target slows down as it fills up.", "",
                markdown_table(self.million_table(rig)), "",
                *[f"- {line}" for line in self.million_lines(rig)]]

    def console(self, rig: Rig) -> list[str]:
        return ["", text_table(self.put_table(rig)), *self.put_checks(rig),
                *self.bottleneck_lines(rig), "", text_table(self.reserve_table(rig)), "",
                text_table(self.million_table(rig)), *self.million_lines(rig)]


# -- talking to the servers (from the benchmark process)

class _Reader:
    """Buffered reads of a blocking socket: lines and counted bytes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buffer += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._more()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def beanstalkd_stats(port: int) -> dict[str, str]:
    """beanstalkd's own `stats` (straight to it, not through gproxyd)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"stats\r\n")
            reader = _Reader(sock)
            head = reader.line()
            if not head.startswith(b"OK "):
                raise BenchError(f"beanstalkd answered stats with {head[:60]!r}")
            body = reader.exactly(int(head.split()[1]) + 2).decode()
    except OSError as error:
        raise BenchError(f"beanstalkd stats: {error}") from None
    return {key: value.strip() for key, _, value in
            (line.partition(":") for line in body.splitlines()[1:]) if value}


def archive_block(admin: int, target: Target) -> dict:
    """routes.jobs.archive of gproxyd's GET /stats."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats",
                                    timeout=10) as response:
            return json.load(response)["routes"][ROUTE]["archive"]
    except (OSError, ValueError, KeyError) as error:
        raise BenchError(f"GET /stats: {error}: {log_tail(target.log)}") from None


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def cpu_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, from /proc/stat: (busy, all), in ticks; waiting
    for I/O counts as idle."""
    with open("/proc/stat") as handle:
        ticks = [int(value) for value in handle.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_since(before: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time that was busy since BEFORE (cpu_ticks())."""
    busy, total = cpu_ticks()
    return (busy - before[0]) / (total - before[1]) if total > before[1] else None


def sqlite_bytes(path: str) -> int:
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal", "-shm")
               if os.path.exists(path + suffix))


def tenths(results: list[dict], count: int) -> dict[str, Any]:
    """puts/s over each tenth of COUNT puts, from the times each generator process had
    its 1%, 2%, ... 100% answered (the slowest process's time for each): does the
    target slow down as it fills up?"""
    if not all(len(result["marks"]) == 100 for result in results):
        return {}
    marks = [max(result["marks"][index] for result in results) for index in range(100)]
    ends = [0.0] + marks[9::10]
    rates = [count / 10 / (end - start) if end > start else None
             for start, end in zip(ends[:-1], ends[1:], strict=True)]
    return {"rps_first": rates[0], "rps_last": rates[-1], "rps_tenths": rates}


def runs_of(rig: Rig, name: str, measurement: str) -> list[dict[str, Any]]:
    return [item["values"] for item in rig.raw
            if item.get("target") == name and item.get("section") == measurement
            and "values" in item]


def slashed(values: list) -> str:
    return "/".join("n/a" if value is None else f"{value:,}" for value in values)


# -- the load generator: its processes, from the benchmark's side

def generate(rig: Rig, name: str, port: int, connections: int, arguments: list[str],
             timeout: float) -> list[dict]:
    """Run the generator in min(LOAD_PROCESSES, CONNECTIONS) processes against
    127.0.0.1:PORT, the connections shared out among them (a --count too). Returns what
    each process measured;
    raises BenchError when one fails or all have not finished within TIMEOUT seconds."""
    processes = min(LOAD_PROCESSES, connections)
    mode, options = arguments[0], list(arguments[1:])
    running = []
    for index in range(processes):
        share = connections // processes + (index < connections % processes)
        mine = list(options)
        if "--count" in mine:
            at = mine.index("--count") + 1
            total = int(mine[at])
            mine[at] = str(total // processes + (index < total % processes))
        out = os.path.join(rig.workdir, f"load-{name}-{index}.json")
        if os.path.exists(out):
            os.unlink(out)
        proc, log = rig.procs.start(
            f"load-{name}-{index}",
            [sys.executable, "-c", GENERATOR, mode, "--port", str(port), "--connections",
             str(share), "--out", out, *mine], cpus=rig.load_cpus, cwd=BENCH_DIR)
        running.append((proc, log, out))
    deadline = time.monotonic() + timeout
    try:
        for proc, _, _ in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"the load generator did not finish within "
                                 f"{timeout:.0f} s") from None
    finally:
        for proc, _, _ in running:
            if proc.poll() is None:
                rig.procs.stop(proc)
    results = []
    for proc, log, out in running:
        if proc.returncode != 0:
            raise BenchError(f"the load generator failed (exit {proc.returncode}): "
                             f"{log_tail(log)}")
        with open(out) as handle:
            results.append(json.load(handle))
    return results


def merged_puts(results: list[dict]) -> dict[str, Any]:
    """The put load of all generator processes as one."""
    latencies: Counter = Counter()
    for result in results:
        latencies.update(histogram(result["latency_us"]))
    seconds = max(result["seconds"] for result in results)
    puts = sum(result["puts"] for result in results)
    values: dict[str, Any] = {
        "puts": puts, "errors": sum(result["errors"] for result in results),
        "seconds": seconds, "rps": puts / seconds,
        "load_cpu_us": per(sum(result["cpu"] for result in results), puts),
        **{key[len("put_"):]: value for key, value in percentiles(latencies, "put").items()}}
    errors = [result["first_error"] for result in results if result["first_error"]]
    values["first_error"] = errors[0] if errors else ""
    if not puts:
        raise BenchError(f"no put answered INSERTED (first reply: {values['first_error']})")
    return values


def histogram(counts: dict[str, int]) -> Counter:
    """A latency histogram as read back from JSON (its keys became strings)."""
    return Counter({int(us): count for us, count in counts.items()})


def percentiles(latencies: Counter, name: str) -> dict[str, float]:
    """NAME_p50_ms and NAME_p99_ms of a histogram of microseconds."""
    total = sum(latencies.values())
    values: dict[str, float] = {}
    if not total:
        return values
    wanted = [(0.50, f"{name}_p50_ms"), (0.99, f"{name}_p99_ms")]
    seen = 0
    for us in sorted(latencies):
        seen += latencies[us]
        while wanted and seen >= wanted[0][0] * total:
            values[wanted.pop(0)[1]] = us / 1000
    return values


# -- the load generator: one process

def generator_main(argv: list[str]) -> int:
    """`put`: CONNECTIONS connections, each keeping DEPTH puts in flight (1: request-reply)
    for SECONDS or until COUNT puts were answered; `reserve`: COUNT ready jobs put over one
    connection (FILL_DEPTH in flight), then reserved and deleted one at a time over
    another. Writes what it measured to OUT (JSON)."""
    parser = argparse.ArgumentParser(prog="gpbench beanstalkd load")
    parser.add_argument("mode", choices=("put", "reserve"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--delay", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mode == "put":
        result = put_load(args.port, args.connections, args.depth, args.delay, args.seconds,
                          args.count)
    else:
        result = reserve_load(args.port, args.count)
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    return 0


class _Putter:
    """One generator connection: its socket, the send times of its puts in flight, the
    part of a reply line not yet read."""
    __slots__ = ("sock", "sent", "rest")

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent: deque[float] = deque()
        self.rest = b""


def put_load(port: int, connections: int, depth: int, delay: int, seconds: float,
             count: int) -> dict[str, Any]:
    put = b"put 1024 %d 60 %d\r\n%s\r\n" % (delay, len(BODY), BODY)
    putters = [_Putter(port) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for putter in putters:
        selector.register(putter.sock, selectors.EVENT_READ, putter)
    latencies: Counter = Counter()
    inserted = errors = 0
    first_error = ""
    left = count if count else -1      # puts still to send (-1: until the end of SECONDS)
    marks: list[float] = []            # with a COUNT: when 1%, 2%, ... 100% were answered
    next_mark = count / 100 if count else float("inf")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    end = started + seconds if seconds else float("inf")

    def send(putter: _Putter, wanted: int, now: float) -> None:
        nonlocal left
        if now >= end or not left:
            return
        if left > 0:
            wanted = min(wanted, left)
            left -= wanted
        putter.sock.sendall(put * wanted)
        putter.sent.extend([now] * wanted)

    for putter in putters:
        send(putter, depth, time.perf_counter())
    while any(putter.sent for putter in putters):
        events = selector.select(IO_TIMEOUT)
        if not events:
            raise TimeoutError(f"no reply within {IO_TIMEOUT:g} s")
        for key, _ in events:
            putter = key.data
            data = putter.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            lines = (putter.rest + data).split(b"\r\n")
            putter.rest = lines.pop()
            now = time.perf_counter()
            for line in lines:
                latencies[int((now - putter.sent.popleft()) * 1e6)] += 1
                if line.startswith(b"INSERTED "):
                    inserted += 1
                else:
                    errors += 1
                    first_error = first_error or line[:80].decode(errors="replace")
                while inserted + errors >= next_mark and len(marks) < 100:
                    marks.append(now - started)
                    next_mark = count * (len(marks) + 1) / 100
            if lines:
                send(putter, depth - len(putter.sent), now)
    elapsed = time.perf_counter() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    for putter in putters:
        putter.sock.close()
    return {"puts": inserted, "errors": errors, "first_error": first_error,
            "seconds": elapsed, "latency_us": latencies, "marks": marks,
            "cpu": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime}


def reserve_load(port: int, count: int) -> dict[str, Any]:
    fill = put_load(port, 1, FILL_DEPTH, 0, 0.0, count)
    reserves: Counter = Counter()
    deletes: Counter = Counter()
    errors = 0
    first_error = fill["first_error"]
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _Reader(sock)
        done = 0
        while done < fill["puts"]:
            sending = time.perf_counter()
            sock.sendall(b"reserve-with-timeout 5\r\n")
            line = reader.line()
            if not line.startswith(b"RESERVED "):
                errors += 1
                first_error = first_error or line[:80].decode(errors="replace")
                break
            _, job_id, size = line.split()
            reader.exactly(int(size) + 2)
            answered = time.perf_counter()
            reserves[int((answered - sending) * 1e6)] += 1
            sock.sendall(b"delete %s\r\n" % job_id)
            line = reader.line()
            deleted = time.perf_counter()
            deletes[int((deleted - answered) * 1e6)] += 1
            if line != b"DELETED":
                errors += 1
                first_error = first_error or line[:80].decode(errors="replace")
            done += 1
    elapsed = time.perf_counter() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"fill_puts": fill["puts"], "fill_seconds": fill["seconds"], "reserves": done,
            "seconds": elapsed, "reserve_us": reserves, "delete_us": deletes,
            "errors": errors + fill["errors"], "first_error": first_error,
            "cpu": fill["cpu"] + used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime}


SECTION = Beanstalkd()
