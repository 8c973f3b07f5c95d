"""Exit statuses of gproxyd and gproxyctl: declared here once, used everywhere else.

The numbers follow sysexits.h where one fits; the man pages' EXIT STATUS sections are
generated from `EXIT_CODES`.
"""
from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1       # could not start or serve; gproxyctl: could not signal or write
EX_USAGE = 64        # bad command-line usage
EX_UNAVAILABLE = 69  # gproxyctl: the admin endpoint, or a replay --target, unreachable
EX_CONFIG = 78       # the configuration is wrong

# (code, what it means), in the order the man pages list them. Each meaning is one or
# more whole sentences, printed as they are under EXIT STATUS in gproxyd(8) and
# gproxyctl(1); tools/docs.py picks which statuses each command can exit with.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EX_OK, "Success: gproxyd stopped on request, or --check-config found the configuration "
            "good; gproxyctl printed what was asked for."),
    (EX_FAILURE, "Runtime failure: gproxyd could not start or serve, such as a listen address "
                 "that cannot be bound, a log file that cannot be opened or privileges that "
                 "cannot be dropped. For gproxyctl: reload could not signal the daemon, or "
                 "replay could not write its --csv, --json or --plot file after the runs."),
    (EX_USAGE, "Usage error: the command line cannot be parsed, such as an unknown option or "
               "a missing option argument, or an input file gproxyctl replay cannot replay."),
    (EX_UNAVAILABLE, "gproxyd's admin endpoint could not be reached, or did not report a "
                     "reload in time; for gproxyctl replay, a --target could not be "
                     "connected to."),
    (EX_CONFIG, "Configuration error: the file, a GPROXYD_* variable or a command-line option "
                "value is wrong, and the message names the file and line, the variable or the "
                "option; for gproxyctl, also a file with admin = off."),
)
