"""tls: TLS termination with the same certificate, gproxyd (tls-cert) against haproxy
(bind ... ssl crt), both in front of the same nginx in plain HTTP: small keep-alive
requests, and a full handshake per request."""
from __future__ import annotations

import os
import subprocess
import sys

from .. import BenchError
from ..configs import gproxyd_conf
from ..processes import wait_listening
from ..procfs import free_port
from ..rig import Rig
from ..section import Row, Section, per
from ..source import check_config, gproxyd_env
from ..tables import fmt, markdown_table, ratio, text_table
from ..targets import Target
from .small import measure_small

HAPROXY_TLS = """\
global
    nbthread 1
    maxconn {maxconn}
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 15m
    timeout server 15m

listen tls
    bind 127.0.0.1:{port} ssl crt {pem}
    server backend 127.0.0.1:{backend}
"""

# (target, what it is); the plain ones are the rig's, measured in the same runs.
TARGETS = (("haproxy", "haproxy, mode tcp, nbthread 1, plain"),
           ("gproxyd", "gproxyd, plain tcp route"),
           ("haproxy+tls", "haproxy, mode tcp, nbthread 1, bind ssl crt (TLS terminated)"),
           ("gproxyd+tls", "gproxyd, tcp route, tls-cert/tls-key (TLS terminated)"))
ROWS = (
    Row("tls.rps", "small keep-alive (wrk -c50): req/s"),
    Row("tls.p99_ms", "small keep-alive: p99 ms", 3),
    Row("tls.cpu_us", "small keep-alive: proxy CPU us/req", 1),
    Row("tls-connect.cps", "a handshake per request (Connection: close): conn/s"),
    Row("tls-connect.p99_ms", "a handshake per request: p99 ms", 3),
    Row("tls-connect.cpu_us", "a handshake per request: proxy CPU us/conn", 1),
)


def measure_handshakes(rig: Rig, target: Target) -> dict[str, float]:
    result = rig.wrk.run(target, "/small", 50, rig.args.duration, rig.wrk.script(),
                         headers=("Connection: close",))
    return {"cps": result.rps, "p99_ms": result.p99_ms,
            "cpu_us": per(result.cpu_seconds, result.requests), "errors": result.errors}


def _certificate(workdir: str) -> tuple[str, str, str]:
    """A self-signed EC P-256 certificate for 127.0.0.1 (wrk does not verify): the
    certificate, the key, and both in one file (haproxy's crt)."""
    cert, key = os.path.join(workdir, "tls.crt"), os.path.join(workdir, "tls.key")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert, "-days",
         "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        raise BenchError(f"openssl could not make the certificate: {made.stderr.strip()}")
    both = os.path.join(workdir, "tls.pem")
    with open(both, "w") as handle:
        handle.write(open(cert).read() + open(key).read())
    return cert, key, both


class TLS(Section):
    name = "tls"
    summary = ("TLS termination with one certificate: gproxyd (tls-cert) against haproxy "
               "(bind ssl crt), small keep-alive and a handshake per request: req/s, p99, "
               "proxy CPU/req")

    def run(self, rig: Rig) -> None:
        names = [name for name, _ in TARGETS]
        for name, description in TARGETS[2:]:
            rig.targets[name] = Target(name, description, scheme="https")
        try:
            cert, key, both = _certificate(rig.workdir)
            self._start_haproxy(rig, rig.targets["haproxy+tls"], both)
            self._start_gproxyd(rig, rig.targets["gproxyd+tls"], cert, key)
        except BenchError as error:
            for name, _ in TARGETS[2:]:
                rig.targets[name].error = rig.targets[name].error or str(error)
        rig.warm_up(names[2:])
        rig.interleaved("tls", names, lambda target: measure_small(rig, target))
        rig.interleaved("tls-connect", names[2:],
                        lambda target: measure_handshakes(rig, target))

    @staticmethod
    def _start_haproxy(rig: Rig, target: Target, pem: str) -> None:
        target.http_port = free_port()
        conf = os.path.join(rig.workdir, "haproxy-tls.cfg")
        with open(conf, "w") as handle:
            # haproxy refuses to start when maxconn needs more descriptors than allowed.
            handle.write(HAPROXY_TLS.format(port=target.http_port, pem=pem,
                                            backend=rig.nginx_port,
                                            maxconn=min(20000, (rig.nofile - 200) // 2)))
        try:
            target.proc, target.log = rig.procs.start(
                "haproxy-tls", ["haproxy", "-db", "-f", conf], cpus=rig.proxy_cpus)
            wait_listening([target.http_port], target.proc, target.log)
        except (BenchError, OSError) as error:
            target.error = str(error)

    @staticmethod
    def _start_gproxyd(rig: Rig, target: Target, cert: str, key: str) -> None:
        target.http_port = free_port()
        conf = os.path.join(rig.workdir, "gproxyd-tls.conf")
        with open(conf, "w") as handle:
            handle.write(gproxyd_conf((), [("tls", target.http_port, rig.nginx_port,
                                            (f"tls-cert = {cert}", f"tls-key = {key}"))]))
        try:
            check_config(conf, rig.gproxyd_source)
            target.proc, target.log = rig.procs.start(
                "gproxyd-tls", [sys.executable, "-m", "gproxyd", "-c", conf],
                cpus=rig.proxy_cpus, env=gproxyd_env(rig.gproxyd_source),
                cwd=rig.gproxyd_source)
            wait_listening([target.http_port], target.proc, target.log)
        except (BenchError, OSError) as error:
            target.error = str(error)

    def _table(self, rig: Rig) -> list[list[str]]:
        rows = [["metric (median)", "haproxy", "gproxyd", "gproxyd/haproxy",
                 "haproxy+tls", "gproxyd+tls", "gproxyd+tls/haproxy+tls"]]
        for row in ROWS:
            plain = [rig.median(name, row.metric) for name in ("haproxy", "gproxyd")]
            tls = [rig.median(name, row.metric) for name in ("haproxy+tls", "gproxyd+tls")]
            rows.append([row.label, *(fmt(value, row.digits) for value in plain),
                         ratio(plain[1], plain[0]),
                         *(fmt(value, row.digits) for value in tls), ratio(tls[1], tls[0])])
        return rows

    def chapter(self, rig: Rig) -> list[str]:
        return ["", "## TLS termination", "",
                "haproxy (`bind ... ssl crt`, mode tcp, nbthread 1) and gproxyd (a tcp "
                "route with `tls-cert`/`tls-key`) terminate TLS with the same self-signed "
                "EC P-256 certificate in front of the same nginx (plain HTTP); wrk speaks "
                "HTTPS to both (TLS 1.3, OpenSSL's choice of cipher on both sides, no "
                "session resumption). The plain haproxy and gproxyd are measured in the "
                "same interleaved runs. Keep-alive: wrk -c50 /small; handshakes: the same "
                "with `Connection: close`, a full handshake per request.",
                "", markdown_table(self._table(rig))]

    def console(self, rig: Rig) -> list[str]:
        return ["", "TLS termination (same certificate):", text_table(self._table(rig))]


SECTION = TLS()
