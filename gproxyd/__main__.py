"""`python -m gproxyd` is the `gproxyd` command."""
from .cli import run

run()
