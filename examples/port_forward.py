#!/usr/bin/env python3
"""The simplest proxy: forward a port, byte for byte, with no hooks at all.

With nothing to look at, gproxyd moves the bytes kernel to kernel (splice), and passes
half-closes on, so this is as fast as the machine allows.

    python3 examples/port_forward.py --listen 127.0.0.1:8080 --production 127.0.0.1:80

The same as a config file route:

    [route forward]
    listen = 127.0.0.1:8080
    production = 127.0.0.1:80
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402

import gproxyd  # noqa: E402


def build(argv: list[str] | None = None) -> gproxyd.Proxy:
    """The proxy the command line asks for, not started yet."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="where clients connect")
    parser.add_argument("--production", default="127.0.0.1:80", help="where bytes go")
    args = parser.parse_args(argv)
    return gproxyd.Proxy(listen=args.listen, production=args.production, name="forward")


def main(argv: list[str] | None = None) -> None:
    build(argv).serve_forever()


if __name__ == "__main__":
    main()
