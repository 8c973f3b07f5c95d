"""Test certificates made by the openssl command line: a small CA, and server
certificates it signs (SAN 127.0.0.1 and localhost by default), with the serial asked for.
EC P-256 keys: quick to make and to use."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    assert binary, "the openssl command is not installed (apt-get install openssl)"
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str = "ca") -> Pair:
    """A self-signed CA certificate and its key, in `directory`."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl("req", "-x509", *_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
             "-days", "2", "-subj", f"/CN=gproxyd test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return pair


def make_server(directory: Path, ca: Pair, name: str = "server", serial: int = 1,
                names: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost")) -> Pair:
    """A server certificate for `names` (subjectAltName entries) signed by `ca`."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={','.join(names)}\n"
                          "basicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature,keyEncipherment\n"
                          "extendedKeyUsage=serverAuth\n"
                          "subjectKeyIdentifier=hash\n"
                          "authorityKeyIdentifier=keyid\n")
    _openssl("req", *_KEY, "-keyout", str(pair.key), "-out", str(request),
             "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey",
             str(ca.key), "-set_serial", str(serial), "-days", "2", "-out", str(pair.cert),
             "-extfile", str(extensions), cwd=directory)
    return pair


def serial_of(der: bytes) -> int:
    """The serial number of a DER certificate (what a client's getpeercert(True) gives)."""
    binary = shutil.which("openssl")
    assert binary, "the openssl command is not installed (apt-get install openssl)"
    result = subprocess.run([binary, "x509", "-inform", "DER", "-noout", "-serial"],
                            input=der, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return int(result.stdout.decode().strip().partition("=")[2], 16)
