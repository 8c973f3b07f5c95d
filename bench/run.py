#!/usr/bin/env python3
"""The benchmark suite (issue 7): gproxyd side by side with haproxy and a direct connection.

    python3 bench/run.py [--quick] [--runs N] [--duration S] [--only SECTION,...] [--list]

Starts nginx, iperf3 and two tiny Python backends on 127.0.0.1, one haproxy (mode tcp,
nbthread 1) and one gproxyd per variant (plain, with shadows, with an http observer), then
measures every target in interleaved runs and reports medians: a table on standard output
and bench/results.md with the machine description. The code is the package
bench/gpbench/, one module per section in bench/gpbench/sections/. See bench/README.md.

Standard library only. Every wait is bounded; every process it starts is stopped at exit.
"""
import sys

from gpbench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
