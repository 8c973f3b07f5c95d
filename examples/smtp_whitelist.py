#!/usr/bin/env python3
"""An SMTP recipient whitelist in front of a mail server.

`RCPT TO:<someone>` for a recipient not on the list never reaches the server: the
proxy answers `550 5.1.1 recipient not allowed` itself. Every other command, and the
message itself, passes through untouched.

The proxy's own answer must come in its turn: a client that pipelines commands
(RFC 2920) reads the answers in the order it sent the commands. So the hooks count the
server's answers still owed and queue a refusal behind them. STARTTLS is taken out
of the server's EHLO answer (and refused if asked for anyway): once encrypted, the
RCPT commands could not be read. CHUNKING goes too, as BDAT data is not line based.
The message ends at a line holding only "." whether it ends in CRLF or a bare LF, as
the laxest mail server would see it: commands smuggled after a lax end of the message
are still read as commands. A line over 64 KiB closes the connection.

    python3 examples/smtp_whitelist.py --listen 127.0.0.1:2525 \\
        --production 127.0.0.1:25 --allow alice@example.com,bob@example.com

or in a config file, with the addresses in the GPROXYD_SMTP_WHITELIST environment
variable (comma-separated):

    [route smtp]
    listen = 0.0.0.0:25
    production = 10.0.0.5:25
    hooks = /path/to/examples/smtp_whitelist.py
"""
if __name__ == "__main__":  # as a script, patch first; as a hooks module the daemon does it
    from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from collections import deque  # noqa: E402

REFUSED = b"550 5.1.1 recipient not allowed\r\n"
NO_TLS = b"454 4.7.0 TLS not available\r\n"
TOO_LONG = b"500 5.5.2 line too long\r\n"
MAX_LINE = 64 * 1024
_SERVER = None  # a slot in the answer queue: the server's next answer goes here
_RCPT = re.compile(rb"^RCPT\s+TO:\s*<?([^>\s]*)>?", re.IGNORECASE)
_HIDDEN = re.compile(rb"^250[- ](STARTTLS|CHUNKING)\b", re.IGNORECASE)


class SMTPWhitelist:
    """Hooks: refuse RCPT TO for recipients not in `allowed` (compared without case)."""

    def __init__(self, allowed):
        self.allowed = {address.strip().lower().encode() for address in allowed
                        if address.strip()}

    def on_connect(self, conn) -> None:
        conn.state.update(
            partial=b"",          # the client's unfinished line
            answer=b"",           # the server's unfinished answer line
            lines=[],             # lines of the server's multi-line answer so far
            owed=deque([_SERVER]),  # answers due to the client, in order: the greeting first
            message=False)        # between DATA's 354 and the closing "."

    # --- client -> server ------------------------------------------------------------

    def on_data(self, conn, data: bytes) -> bytes | None:
        state = conn.state
        pending = state["partial"] + data
        end = pending.rfind(b"\n") + 1
        state["partial"] = pending[end:]
        if len(state["partial"]) > MAX_LINE:
            conn.reply(TOO_LONG)
            conn.close()
            return None
        passed = []
        for line in _lines(pending[:end]):
            if state["message"]:
                passed.append(line)
                if line in (b".\r\n", b".\n"):
                    state["message"] = False
                    state["owed"].append(_SERVER)
                continue
            refusal = self._refusal(line)
            if refusal is None:
                passed.append(line)
                state["owed"].append(_SERVER)
            elif state["owed"]:
                state["owed"].append(refusal)  # after the answers the server still owes
            else:
                conn.reply(refusal)
        return b"".join(passed) or None

    def _refusal(self, line: bytes) -> bytes | None:
        rcpt = _RCPT.match(line)
        if rcpt:
            return None if rcpt.group(1).lower() in self.allowed else REFUSED
        if line.strip().upper() == b"STARTTLS":
            return NO_TLS
        return None

    # --- server -> client ------------------------------------------------------------

    def on_response(self, conn, backend: str, data: bytes) -> bytes | None:
        if backend != "production":
            return None  # a shadow's answers never reach the client
        state = conn.state
        pending = state["answer"] + data
        end = pending.rfind(b"\n") + 1
        state["answer"] = pending[end:]
        out = []
        for line in _lines(pending[:end]):
            state["lines"].append(line)
            if line[3:4] == b"-":
                continue  # more lines of this answer follow
            answer, state["lines"] = state["lines"], []
            out.append(_without_hidden(answer))
            if line.startswith(b"354"):
                state["message"] = True
            owed = state["owed"]
            if owed and owed[0] is _SERVER:
                owed.popleft()
            while owed and owed[0] is not _SERVER:
                out.append(owed.popleft())
        return b"".join(out) or None


def _lines(data: bytes) -> list[bytes]:
    """Complete lines, each with its LF (CR is no line end to a mail server)."""
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def _without_hidden(lines: list[bytes]) -> bytes:
    """A (multi-line) answer without the extensions we cannot pass on."""
    kept = [line for line in lines if not _HIDDEN.match(line)]
    if kept and kept[-1][3:4] == b"-":  # the old last line was dropped: end the answer here
        kept[-1] = kept[-1][:3] + b" " + kept[-1][4:]
    return b"".join(kept)


def _from_environment() -> SMTPWhitelist:
    return SMTPWhitelist(os.environ.get("GPROXYD_SMTP_WHITELIST", "").split(","))


# Module-level hooks, for `hooks = .../smtp_whitelist.py`: the list comes from the
# environment (empty: every recipient is refused).
hooks = _from_environment()
on_connect = hooks.on_connect
on_data = hooks.on_data
on_response = hooks.on_response


def build(argv: list[str] | None = None):
    """The proxy the command line asks for, not started yet."""
    import gproxyd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:2525", help="where clients connect")
    parser.add_argument("--production", default="127.0.0.1:25", help="the mail server")
    parser.add_argument("--allow", default="",
                        help="comma-separated recipients let through (default: "
                             "$GPROXYD_SMTP_WHITELIST)")
    args = parser.parse_args(argv)
    whitelist = SMTPWhitelist(args.allow.split(",")) if args.allow else _from_environment()
    return gproxyd.Proxy(listen=args.listen, production=args.production, name="smtp",
                         hooks=whitelist)


def main(argv: list[str] | None = None) -> None:
    build(argv).serve_forever()


if __name__ == "__main__":
    main()
