"""``python -m mpiqsgd``: the command line."""

from .cli import run

run()
