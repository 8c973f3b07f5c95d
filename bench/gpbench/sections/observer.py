"""observer: small and connect again, with protocol = http and with a no-op hook."""
from __future__ import annotations

from ..section import Section


class Observer(Section):
    name = "observer"
    summary = "7. small and connect again with protocol = http, and with a no-op hook"
    variants = ("gproxyd+http", "gproxyd+hook")
    warm_up = variants
    joins = ("small", "connect")
    labels = {"gproxyd+http": "http observer", "gproxyd+hook": "no-op hook"}


SECTION = Observer()
