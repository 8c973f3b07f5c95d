"""The registry of sections: SECTIONS, in the order they run and are listed. A section is
a module of this package that defines SECTION; adding one is adding its line here."""
from __future__ import annotations

from ..section import Section
from . import (
    aa,
    admin,
    beanstalkd,
    bulk,
    compare,
    connect,
    cost,
    large,
    memory,
    observer,
    openloop,
    shadow,
    shadow_matrix,
    small,
    tls,
    workers,
)

SECTIONS: tuple[Section, ...] = (
    small.SECTION,
    large.SECTION,
    bulk.SECTION,
    connect.SECTION,
    memory.SECTION,
    shadow.SECTION,
    observer.SECTION,
    shadow_matrix.SECTION,
    openloop.SECTION,
    workers.SECTION,
    tls.SECTION,
    aa.SECTION,
    compare.SECTION,
    beanstalkd.SECTION,
    admin.SECTION,
    cost.SECTION,
)
NAMES = tuple(section.name for section in SECTIONS)


def running(names: set[str]) -> tuple[Section, ...]:
    """The sections that measure when NAMES are selected: those, and the sections they
    join (whose measurements also take their variants), in registry order."""
    joined = {name for section in SECTIONS if section.name in names
              for name in section.joins}
    return tuple(section for section in SECTIONS
                 if section.name in names or section.name in joined)
