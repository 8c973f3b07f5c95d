"""shadow: small and connect again, with a healthy and with a stalled shadow."""
from __future__ import annotations

from ..section import Section


class Shadow(Section):
    name = "shadow"
    summary = "6. small and connect again with a healthy and with a stalled shadow"
    variants = ("gproxyd+healthy", "gproxyd+stalled")
    warm_up = variants
    joins = ("small", "connect")
    labels = {"gproxyd+healthy": "healthy shadow", "gproxyd+stalled": "stalled shadow"}


SECTION = Shadow()
