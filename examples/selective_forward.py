#!/usr/bin/env python3
"""Selective mirroring: production gets every command; shadows get only some of them.

For a line-based command protocol (Redis inline commands, a chat or queue protocol):
each line is one command, and only commands starting with one of the --mirror words
(GET and SET by default) are copied to the shadows. Everything else, say a DEL or a
FLUSHALL, goes to production only.

A command counts only once its line is complete, so the hook holds an unfinished line
back until the rest arrives (the server could not act on it earlier anyway); a line
growing past 64 KiB goes on to production alone as it comes. A chunk
carrying both kinds of command goes to production only: the hook API sends the same
bytes to every backend a chunk goes to, and the shadow is the one that can miss some.

    python3 examples/selective_forward.py --listen 127.0.0.1:6380 \\
        --production 127.0.0.1:6379 --shadow 127.0.0.1:6390 --mirror GET,SET

or in a config file (the default words):

    [route redis]
    listen = 127.0.0.1:6380
    production = 127.0.0.1:6379
    shadow = 127.0.0.1:6390
    hooks = /path/to/examples/selective_forward.py
"""
if __name__ == "__main__":  # as a script, patch first; as a hooks module the daemon does it
    from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402

MAX_LINE = 64 * 1024


class SelectiveForward:
    """Hooks: mirror the lines starting with one of `words` (any case); the rest go to
    production only. `conn.state["skipped"]` counts mirrored-kind lines the shadows
    missed because they shared a chunk with production-only ones."""

    def __init__(self, words=("GET", "SET")):
        self.words = tuple(word.upper().encode() for word in words)

    def mirrored(self, line: bytes) -> bool:
        command = line.lstrip().split(None, 1)[:1]
        return bool(command) and command[0].upper() in self.words

    def on_data(self, conn, data: bytes):
        state = conn.state
        pending = state.pop("partial", b"") + data
        end = pending.rfind(b"\n") + 1
        if len(pending) - end > MAX_LINE or (state.get("midline") and not end):
            end = len(pending)  # an over-long line: on to production as it comes
        if end < len(pending):
            state["partial"] = pending[end:]
        if not end:
            return None  # no complete command yet
        complete = pending[:end]
        kinds = [self.mirrored(line) for line in complete.split(b"\n") if line.strip()]
        # An over-long line goes to production alone, every part of it.
        if state.get("midline"):
            kinds.append(False)
        state["midline"] = not complete.endswith(b"\n")
        if state["midline"]:
            kinds.append(False)
        if all(kinds):
            return complete  # production and every shadow
        if any(kinds):
            conn.state["skipped"] = conn.state.get("skipped", 0) + sum(kinds)
        return complete, ["production"]


# Module-level hooks with the default words, for `hooks = .../selective_forward.py`.
hooks = SelectiveForward()
on_data = hooks.on_data


def build(argv: list[str] | None = None):
    """The proxy the command line asks for, not started yet."""
    import gproxyd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:6380", help="where clients connect")
    parser.add_argument("--production", default="127.0.0.1:6379", help="the real server")
    parser.add_argument("--shadow", action="append", default=None,
                        help="a shadow server (repeat for more; default 127.0.0.1:6390)")
    parser.add_argument("--mirror", default="GET,SET",
                        help="comma-separated command words copied to the shadows")
    args = parser.parse_args(argv)
    words = [word.strip() for word in args.mirror.split(",") if word.strip()]
    return gproxyd.Proxy(listen=args.listen, production=args.production, name="selective",
                         shadow=args.shadow or ["127.0.0.1:6390"],
                         hooks=SelectiveForward(words))


def main(argv: list[str] | None = None) -> None:
    build(argv).serve_forever()


if __name__ == "__main__":
    main()
