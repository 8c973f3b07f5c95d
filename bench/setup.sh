#!/bin/sh
# Install what bench/run.py drives: haproxy, nginx, wrk, iperf3, redis-server and
# redis-benchmark for the aa section, and a C compiler for the openloop section's sender
# (bench/openloop.c) (Debian/Ubuntu, as root).
# Does nothing when they are all on PATH already.
set -eu
PATH="$PATH:/usr/sbin:/sbin"
missing=""
for tool in haproxy nginx wrk iperf3 redis-server redis-benchmark cc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0
echo "bench/setup.sh: installing:$missing" >&2
if [ "$(id -u)" -ne 0 ]; then
    echo "bench/setup.sh: need root for apt-get (try: sudo sh bench/setup.sh)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# nginx-light is enough (return, static files); iperf3's package asks whether to start a
# daemon, which the noninteractive front end answers with its default (no). The system
# services the packages may start are left alone: the benchmark runs its own instances.
apt-get install -y -q --no-install-recommends haproxy nginx-light wrk iperf3 redis-server \
    redis-tools gcc libc6-dev
