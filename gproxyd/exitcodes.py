"""Exit statuses of gproxyd and gproxyctl: declared here once, used everywhere else.

The numbers follow sysexits.h where one fits; the man pages' EXIT STATUS sections are
generated from `EXIT_CODES`.
"""
from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1       # could not start or serve: a bind, privilege or log-file problem
EX_USAGE = 64        # bad command-line usage
EX_UNAVAILABLE = 69  # gproxyctl: the daemon's admin endpoint cannot be reached
EX_CONFIG = 78       # the configuration is wrong

# (code, what it means), in the order the man pages list them.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EX_OK, "success"),
    (EX_FAILURE, "could not start or serve: a listen address, the log file or the "
                 "privilege drop failed"),
    (EX_USAGE, "bad command-line usage"),
    (EX_UNAVAILABLE, "gproxyctl only: the admin endpoint cannot be reached"),
    (EX_CONFIG, "the configuration is wrong (the message names FILE:LINE)"),
)
