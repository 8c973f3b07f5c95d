#!/usr/bin/env python3
"""Rewrite production's answers line by line: every "Hello" the client sees becomes "Jello".

Production's bytes arrive in chunks that may cut a line, even a word, anywhere; the
hook keeps the unfinished last line in `conn.state` and rewrites only whole lines, so
a word split across two chunks is still caught. The unfinished line left when
production closes is handed to the client in on_finish. A line growing past 64 KiB
(binary data, say) is passed on as it comes, so memory stays bounded; a word split
right at a chunk boundary inside such a line is missed.

    python3 examples/line_interceptor.py --listen 127.0.0.1:8080 --production 127.0.0.1:8081

or in a config file, with the default words:

    [route jello]
    listen = 127.0.0.1:8080
    production = 127.0.0.1:8081
    hooks = /path/to/examples/line_interceptor.py
"""
if __name__ == "__main__":  # as a script, patch first; as a hooks module the daemon does it
    from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402

MAX_LINE = 64 * 1024


class LineInterceptor:
    """Hooks replacing `old` with `new` in whole lines of production's answers."""

    def __init__(self, old: bytes = b"Hello", new: bytes = b"Jello"):
        self.old, self.new = old, new

    def on_response(self, conn, backend: str, data: bytes) -> bytes | None:
        if backend != "production":
            return None  # a shadow's answer never reaches the client anyway
        state = conn.state
        pending = state.pop("partial", b"") + data
        end = pending.rfind(b"\n") + 1
        if len(pending) - end > MAX_LINE or (state.get("midline") and not end):
            end = len(pending)  # an over-long line: passed on as it comes
        if end < len(pending):
            state["partial"] = pending[end:]
        if end:
            state["midline"] = not pending[:end].endswith(b"\n")
        # Returning b"" (nothing complete yet) sends nothing to the client.
        return pending[:end].replace(self.old, self.new)

    def on_finish(self, conn, backend: str) -> None:
        partial = conn.state.pop("partial", b"") if backend == "production" else b""
        if partial:
            conn.reply(partial.replace(self.old, self.new))


# Module-level hooks with the default words, for `hooks = .../line_interceptor.py`.
hooks = LineInterceptor()
on_response = hooks.on_response
on_finish = hooks.on_finish


def build(argv: list[str] | None = None):
    """The proxy the command line asks for, not started yet."""
    import gproxyd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="where clients connect")
    parser.add_argument("--production", default="127.0.0.1:8081", help="the real server")
    parser.add_argument("--old", default="Hello", help="the word to replace")
    parser.add_argument("--new", default="Jello", help="what to put in its place")
    args = parser.parse_args(argv)
    interceptor = LineInterceptor(args.old.encode(), args.new.encode())
    return gproxyd.Proxy(listen=args.listen, production=args.production, name="jello",
                         hooks=interceptor)


def main(argv: list[str] | None = None) -> None:
    build(argv).serve_forever()


if __name__ == "__main__":
    main()
